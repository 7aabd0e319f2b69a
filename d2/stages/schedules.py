"""Schedules of the composed sampler: noise levels, composition weights, CFG scales.

Composition weights. The composed x0 prediction of matrix entry (v, f) at step i is

    D = w_video[v](i) * D_video + w_multiview[v](i) * D_multiview,   w_video + w_multiview = 1.

The paper writes ``score = s * score_video + (1 - s) * score_multiview`` with the logistic
``s = 1 - 1 / (1 + exp(k (i/N - s0)))`` = sigmoid(k (i/N - s0)): ``s`` is the VIDEO weight,
near 0 early (the multi-view model shapes the geometry first) and near 1 late (s0 = 0.5,
k = 20 in the paper). The authors' code schedules the MULTI-VIEW weight instead
(``sv3d_scale``, default constant 0.6; logistic ``1 - 1/(1 + exp(-k (i/(N-1) - s0)))`` between
``min`` and ``max``), which is the same curve seen from the other side. Their scheduler
(``ScaleScheduler`` in their ``sgm/util.py``, ``sv3d_scale_schedule``) has two more shapes
over the same ``min`` and ``max`` and the same progress i/(N-1): ``linear``, a straight line
from ``max`` at the first step to ``min`` at the last, and ``cosine``, half a cosine period
between the same two ends (flat at both ends, steepest half-way). All three drop the
multi-view weight, so the video weight ``s = 1 - m`` rises, as in the paper. Here:

    base multi-view weight  m(i): constant   c
                                  logistic   min + (max - min) * sigmoid(-k (x_i - s0))
                                  linear     (1 - x_i) max + x_i min
                                  cosine     min + (max - min) * cos^2(pi x_i / 2)
                            x_i = i/(N-1) (authors) or i/N (paper); min, max = ``logistic_min``,
                            ``logistic_max`` (the authors' sv3d_scale_min, sv3d_scale_max)
    per-view video profile  p_v = 1 - a (1 - (1 + cos(4 pi (v+1) / V)) / 2)   (a = 0.75; the
                            authors' 2 pi (v+1) / 10.5 for V = 21; p = 1 at the input view)
    w_video[v]     = p_v (1 - m(i))      (p_v = 1 when the per-view profile is off)
    w_multiview[v] = 1 - w_video[v]

so with the profile off, ``w_video`` = the paper's ``s``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

EXP_MAX = 709.78  # math.exp overflows above this (log of the largest float64)
FP32_MAX_SIGMA = 1e30  # the sampler keeps x in fp32 (max 3.4e38); initial noise std = sqrt(1 + sigma_max^2)
SEED_MAX = 2**63 - 2  # torch.Generator.manual_seed takes 64-bit seeds; seed + 1 is used too


def karras_problem(section: str, sigma_min: float, sigma_max: float, rho: float) -> str | None:
    """Why ``section``'s Karras knobs cannot give a descending, finite ramp (one line), or None."""
    if sigma_min >= sigma_max:
        return (f"{section}.sigma_min = {sigma_min:g} >= {section}.sigma_max = {sigma_max:g}: the Karras noise "
                "levels must descend; make sigma_min < sigma_max")
    try:
        hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
        ok = lo > 0 and math.isfinite(hi) and lo ** rho > 0 and math.isfinite(hi ** rho)
    except OverflowError:
        ok = False
    if not ok:
        return (f"{section}.rho = {rho:g}: sigma ** (1/rho) over- or underflows for sigma in "
                f"[{sigma_min:g}, {sigma_max:g}]; use rho >= 0.1 (Karras 7)")
    return None


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0) -> Tensor:
    """Karras et al. noise levels, descending, with a final 0: [num_steps + 1] float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def step_fraction(i: int, num_steps: int, mode: Literal["i/(N-1)", "i/N"] = "i/(N-1)") -> float:
    """Progress x_i of step i in [0, 1]: i/(N-1) (authors' code) or i/N (paper)."""
    if mode == "i/N":
        return i / num_steps
    return i / max(num_steps - 1, 1)


WEIGHT_SCHEDULES = ("constant", "logistic", "linear", "cosine")  # shapes of the base multi-view weight m(i)


def base_multiview_weight(
    i: int,
    num_steps: int,
    schedule: Literal["constant", "logistic", "linear", "cosine"],
    constant: float = 0.6,
    s0: float = 0.5,
    k: float = 20.0,
    w_min: float = 0.0,
    w_max: float = 1.0,
    fraction: Literal["i/(N-1)", "i/N"] = "i/(N-1)",
) -> float:
    """m(i), the multi-view weight before the per-view profile (see the module docstring)."""
    if schedule == "constant":
        return float(constant)
    x = step_fraction(i, num_steps, fraction)
    if schedule == "logistic":
        return w_min + (w_max - w_min) / (1.0 + math.exp(k * (x - s0)))
    if schedule == "linear":
        return w_max + x * (w_min - w_max)
    if schedule == "cosine":
        return w_min + (w_max - w_min) * (1.0 + math.cos(math.pi * x)) / 2.0
    raise ValueError(f"unknown weight schedule {schedule!r}; known: {', '.join(WEIGHT_SCHEDULES)}")


def per_view_video_profile(num_views: int, amplitude: float = 0.75) -> Tensor:
    """p_v = 1 - a (1 - (1 + cos(4 pi (v+1) / V)) / 2): [V] float64; side views lean on the multi-view model."""
    v = torch.arange(num_views, dtype=torch.float64)
    return 1.0 - amplitude * (1.0 - (1.0 + torch.cos(4 * math.pi * (v + 1) / num_views)) / 2.0)


def composition_weights(base_multiview: float, num_views: int, per_view: bool, amplitude: float = 0.75
                        ) -> tuple[Tensor, Tensor]:
    """(w_video [V], w_multiview [V]) float64 from the base multi-view weight m(i)."""
    p = per_view_video_profile(num_views, amplitude) if per_view else torch.ones(num_views, dtype=torch.float64)
    w_video = p * (1.0 - base_multiview)
    return w_video, 1.0 - w_video


def video_cfg_scales(num_frames: int, cfg_min: float = 1.5, cfg_max: float = 3.0) -> Tensor:
    """Video CFG, linear over frames from cfg_min (frame 0) to cfg_max (last): [F] float32."""
    return torch.linspace(cfg_min, cfg_max, num_frames, dtype=torch.float32)


def multiview_cfg_scales(num_views: int, kind: Literal["constant", "triangle"] = "constant", scale: float = 2.5,
                         cfg_min: float = 1.0) -> Tensor:
    """Multi-view CFG per view: constant ``scale``, or a triangle cfg_min -> scale (middle view) -> cfg_min."""
    if kind == "constant":
        return torch.full((num_views,), float(scale), dtype=torch.float32)
    if kind == "triangle":
        if num_views == 1:
            return torch.full((1,), float(scale))
        t = torch.linspace(0, 1, num_views, dtype=torch.float32)
        return cfg_min + (scale - cfg_min) * (1 - (2 * t - 1).abs())
    raise ValueError(f"unknown multi-view CFG kind {kind!r}")
