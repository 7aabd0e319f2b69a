"""The diffusion priors: :func:`load_priors` builds ``(video_prior, multiview_prior)`` from a
:class:`PriorsConfig`, each family by its backend.

    base.py      the :class:`Prior` interface (encode, decode, condition, EDM denoise with CFG)
    config.py    :class:`PriorsConfig` and the backends' configs, with their bounds
    gaussian.py  ``gaussian``: the analytic prior
    tiny.py      ``tiny``: seeded random tiny networks
    mini.py      ``mini``: the miniature priors trained on the procedural world
    folder.py    the prior folder layout (save / load)
    svd.py       ``svd``: SVD-XT from a folder or the Hugging Face cache
    sv3d_p.py    ``sv3d_p``: SV3D_p from Stability's checkpoint (``stability`` = svd + sv3d_p)
    sv4d.py      the SV4D / SV4D 2.0 network of the ``sv4d*`` sampling methods, per backend

:func:`build_prior` names every backend's builder in its code, so each backend module is in the
import closure, hence the cache key, of every stage that loads priors.
"""

from __future__ import annotations

from typing import Any

import torch

from d2.stages.priors.base import (DTYPES, FAMILIES, Family, MissingWeightsError, PixelSpaceVAE, Prior,
                                   PriorCondition, edm_coefficients, set_resnet_norm_eps, sgm_clip_resize)
from d2.stages.priors.config import (BACKENDS, SVD_XT_REPO, Backend, GaussianPriorConfig, PriorsConfig,
                                     TinyPriorConfig)
from d2.stages.priors.folder import PRIOR_META, load_prior_folder, read_prior_meta, save_prior_folder
from d2.stages.priors.gaussian import GaussianPrior, build_gaussian
from d2.stages.priors.mini import MINI_DIR, build_mini, mini_prior_dir
from d2.stages.priors.sv3d_p import build_sv3d_p, load_sv3d_image_decoder, load_sv3d_unet
from d2.stages.priors.svd import build_svd
from d2.stages.priors.tiny import build_tiny, build_tiny_prior, spatiotemporal_unet_config, tiny_unet_config

__all__ = [
    "BACKENDS", "DTYPES", "FAMILIES", "MINI_DIR", "PRIOR_META", "SVD_XT_REPO", "Backend", "Family",
    "GaussianPrior", "GaussianPriorConfig", "MissingWeightsError", "PixelSpaceVAE", "Prior", "PriorCondition",
    "PriorsConfig", "TinyPriorConfig", "build_gaussian", "build_mini", "build_prior", "build_sv3d_p", "build_svd",
    "build_tiny", "build_tiny_prior", "edm_coefficients", "load_prior_folder", "load_priors",
    "load_sv3d_image_decoder", "load_sv3d_unet", "mini_prior_dir", "read_prior_meta", "runtime_options",
    "save_prior_folder", "set_resnet_norm_eps", "sgm_clip_resize", "spatiotemporal_unet_config", "tiny_unet_config",
]


def build_prior(cfg: PriorsConfig, backend: Backend, family: Family, device: torch.device) -> Prior:
    """The ``family`` prior of ``backend`` on ``device`` (as built: not yet configured by :func:`load_priors`)."""
    match backend:
        case "gaussian":
            return build_gaussian(cfg, family, device)
        case "tiny":
            return build_tiny(cfg, family, device)
        case "mini":
            return build_mini(cfg, family, device)
        case "svd":
            return build_svd(cfg, family, device)
        case "sv3d_p":
            return build_sv3d_p(cfg, family, device)
        case "stability":
            return build_svd(cfg, family, device) if family == "video" else build_sv3d_p(cfg, family, device)
    raise ValueError(f"unknown priors backend {backend!r}; known: {', '.join(BACKENDS)}")


def runtime_options(cfg: PriorsConfig) -> dict[str, Any]:
    """The ``priors.*`` fields that :meth:`Prior.configure_runtime` takes."""
    keys = ("attention_backend", "attention_max_batch", "cross_attention_shortcut", "channels_last", "temporal_conv",
            "temporal_norm", "compile", "compile_mode", "compile_freezing")
    return {k: getattr(cfg, k) for k in keys}


def load_priors(cfg: PriorsConfig, device: str | torch.device | None = None) -> tuple[Prior, Prior]:
    """Build ``(video_prior, multiview_prior)`` from the configured backends, in eval mode, no grads."""
    dev = torch.device(device if device is not None else cfg.device)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # process-wide
    out = []
    missing: list[str] = []
    for family in FAMILIES:
        name = (cfg.video_backend if family == "video" else cfg.multiview_backend) or cfg.backend
        try:
            prior = build_prior(cfg, name, family, dev)
        except MissingWeightsError as e:  # report every family's missing files at once
            missing.append(str(e))
            continue
        if prior.family != family:
            raise ValueError(f"backend {name!r} returned a {prior.family} prior for the {family} slot")
        prior.eval().requires_grad_(False)
        prior = prior.to(dev)
        prior.configure_numerics(resnet_norm_eps=cfg.resnet_norm_eps, autocast=cfg.autocast,
                                 clip_preprocess=cfg.clip_preprocess)  # before torch.compile sees the modules
        prior.configure_runtime(**runtime_options(cfg))
        out.append(prior)
    if missing:
        raise MissingWeightsError("\n\n".join(missing))
    return out[0], out[1]
