"""Deterministic EDM sampling: the Euler / Heun loop both samplers share, and plain
single-model sampling of sequences (the reference orbit and video of the conditions stage).

The composed matrix sampler (:mod:`d2.stages.sampling`) and the conditions stage
(:mod:`d2.stages.conditions`) both use this loop, so neither imports the other.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from d2.stages.priors import Prior, PriorCondition
from d2.stages.schedules import karras_sigmas


def chunks(n: int, size: int) -> list[slice]:
    """Contiguous slices of length <= size, all equal where that costs at most 1.5 times the calls.

    Equal chunks mean one input shape per UNet (one compilation with ``priors.compile``):
    21 by 5 -> 7 x 3, 25 by 5 -> 5 x 5, 21 by 7 -> 3 x 7; otherwise near-equal: 23 by 5 -> 5, 5, 5, 4, 4.
    """
    parts = math.ceil(n / size)
    for p in range(parts, min(parts + parts // 2, n) + 1):
        if n % p == 0:
            parts = p
            break
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(parts)]


def edm_sample(
    denoiser: Callable[[Tensor, float, int], Tensor],
    noise: Tensor,
    sigmas: Tensor,
    solver: Literal["euler", "heun"] = "euler",
    rollback_steps: int = 0,
    rollback_noise: Literal["linear", "vp"] = "linear",
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "sampling",
    on_step: Callable[[int, int, Tensor, float], None] | None = None,
) -> Tensor:
    """Deterministic EDM sampling from unit ``noise`` (any shape, fp32) with ``denoiser(x, sigma, i)``.

    x starts at ``noise * sqrt(1 + sigma_0^2)``; step i goes from sigmas[i] to sigmas[i+1]. The
    first ``rollback_steps`` steps are each taken twice: step, add N(0, std^2) noise (std =
    |dt| for "linear", sqrt(sigma_i^2 - sigma_{i+1}^2) for "vp"; drawn from ``generator`` on the
    CPU), step again from sigmas[i]. ``on_step(i + 1, n, x, sigma)`` (optional) sees every step.
    """
    x = noise.float() * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    n = len(sigmas) - 1
    for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        passes = 2 if i < rollback_steps else 1
        for j in range(passes):
            d0 = (x - denoiser(x, s, i)) / s
            x_next = x + (s_next - s) * d0
            if solver == "heun" and s_next > 0:
                d1 = (x_next - denoiser(x_next, s_next, i)) / s_next
                x_next = x + (s_next - s) * (d0 + d1) / 2
            if j < passes - 1:
                std = abs(s - s_next) if rollback_noise == "linear" else math.sqrt(max(s * s - s_next * s_next, 0.0))
                eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
                x = x_next + std * eps
            else:
                x = x_next
        if on_step is not None:  # (step done, steps, the new x, its sigma)
            on_step(i + 1, n, x, s_next)
    return x


def sample_sequences(prior: Prior, cond: PriorCondition, num_frames: int, cfg_scale: Tensor, num_steps: int,
                     seed: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0,
                     solver: Literal["euler", "heun"] = "euler", chunk_size: int = 4,
                     progress: bool = False) -> Tensor:
    """Plain single-model sampling of N sequences (one per ``cond`` element): latents [N, T, C, h, w]."""
    n = len(cond)
    gen = torch.Generator().manual_seed(seed)
    c, h = prior.latent_channels, prior.latent_size
    noise = torch.randn((n, num_frames, c, h, h), generator=gen, dtype=torch.float32)
    scale = cfg_scale.float().reshape(1, -1).expand(n, num_frames)

    def denoiser(x: Tensor, sigma: float, i: int) -> Tensor:
        out = torch.empty_like(x)
        for sl in chunks(n, chunk_size):
            b = x[sl].shape[0]
            out[sl] = prior.denoise(x[sl], torch.full((b,), sigma, device=x.device), cond.select(sl),
                                    scale[sl].to(x.device))
        return out

    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)
    with torch.no_grad():
        x = edm_sample(denoiser, noise.to(prior.device), sigmas, solver, progress=progress, desc="reference")
    return x.float().cpu()
