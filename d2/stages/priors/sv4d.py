"""The SV4D / SV4D 2.0 network a ``sampling.method`` of that name runs, built for the configured backend.

SV4D is one network (:class:`d2.stages.sv4d.SV4DUNet`) that shares the first stage and CLIP of
the multi-view prior (SV3D_p's); this module builds only the network:

    tiny                the same class at tiny width (the tiny priors' CLIP width), seeded random
                        weights (tests, rehearsals)
    stability, sv3d_p   Stability's checkpoint: ``priors.sv4d_path``, else the local Hugging Face
                        cache (``stabilityai/sv4d``, ``stabilityai/sv4d2.0``); a precise message when absent
    mini, gaussian      refused: the miniature world has no SV4D-like model
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from d2.stages.priors.base import DTYPES
from d2.stages.priors.config import PriorsConfig

TINY_SV4D_WIDTHS = (32, 48, 48)  # tiny network: vector widths (noise level, polar, azimuth), adding up to 4 x 32
SV4D_METHODS = ("sv4d", "sv4d2", "sv4d2_8views")  # sampling methods that run an SV4D network (its version)


@dataclass
class SV4DNetwork:
    """An SV4D network and the sinusoid widths of its vector input."""

    network: nn.Module  # sgm SpatialUNetModelWithTime.forward's signature (d2.stages.sv4d.SV4DUNet)
    vector_widths: tuple[int, int, int]  # (noise level, polar, azimuth) widths of y


def sv4d_backend_problem(cfg: PriorsConfig, version: str) -> str | None:
    """Why the configured multi-view backend cannot run ``version`` (None when it can); no file is read."""
    backend = cfg.multiview_backend or cfg.backend
    if backend in ("mini", "gaussian"):
        return (f"sampling.method = {version} runs Stability's {version} network, which the {backend} priors do not "
                "have (the miniature world has no SV4D-like model); set priors.backend=tiny (random weights) or "
                "stability (the real checkpoints)")
    if backend == "tiny" and not cfg.tiny.vae:
        return f"sampling.method = {version} needs the tiny priors' VAE (4 latent channels): set priors.tiny.vae=true"
    return None


def build_sv4d_network(cfg: PriorsConfig, version: str, device: str | torch.device | None = None) -> SV4DNetwork:
    """``version``'s network for the configured multi-view backend, in eval mode without grads."""
    from d2.stages.sv4d import SV4DUNet, find_sv4d_checkpoint, load_sv4d_unet, tiny_sv4d_unet_config
    from d2.stages.sv4d_sampling import SGM_VECTOR_WIDTHS

    problem = sv4d_backend_problem(cfg, version)
    if problem:
        raise ValueError(problem)
    dev = torch.device(device if device is not None else cfg.device)
    if (cfg.multiview_backend or cfg.backend) == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny.seed + 2)  # the video prior has seed, the multi-view prior seed + 1
            net = SV4DUNet(tiny_sv4d_unet_config(version, context_dim=cfg.tiny.cross_attention_dim,
                                                 adm_in_channels=sum(TINY_SV4D_WIDTHS)))
        out = SV4DNetwork(net, TINY_SV4D_WIDTHS)
    else:
        path = Path(cfg.sv4d_path).expanduser() if cfg.sv4d_path else find_sv4d_checkpoint(version, cfg.hf_cache_dir)
        if not path.is_file():
            raise FileNotFoundError(f"priors.sv4d_path = {cfg.sv4d_path}: file not found (the {version} checkpoint)")
        try:
            net = load_sv4d_unet(path, version, DTYPES[cfg.dtype])
        except Exception as e:  # noqa: BLE001  (a truncated or foreign file, whatever the reader raises: named, with why)
            raise ValueError(f"{path}: not a readable {version} checkpoint ({type(e).__name__}: {e})") from None
        out = SV4DNetwork(net, SGM_VECTOR_WIDTHS)
    out.network.to(dev).eval().requires_grad_(False)
    return out
