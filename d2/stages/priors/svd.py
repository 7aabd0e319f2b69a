"""The ``svd`` backend: SVD-XT (video family) from a diffusers-layout folder or the local
Hugging Face cache of ``stabilityai/stable-video-diffusion-img2vid-xt`` (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

from d2.stages.priors.base import DTYPES, Family, MissingWeightsError, Prior
from d2.stages.priors.config import PriorsConfig
from d2.stages.priors.folder import SVD_HOWTO, load_prior_folder


def _hf_snapshot(cfg: PriorsConfig) -> tuple[Path | None, str]:
    """Local snapshot folder of ``cfg.hf_repo_id`` in the HF cache (no network), and where it looked."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    where = cfg.hf_cache_dir or HF_HUB_CACHE
    try:
        p = snapshot_download(cfg.hf_repo_id, local_files_only=True, cache_dir=cfg.hf_cache_dir)
        return Path(p), where
    except Exception:  # LocalEntryNotFoundError and friends: nothing cached
        return None, where


def svd_folder(cfg: PriorsConfig, explicit: str | None, what: str) -> Path:
    """The folder holding SVD-XT components: ``explicit`` or the HF cache; raises MissingWeightsError."""
    if explicit:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            raise MissingWeightsError(f"{what}: folder {folder} does not exist.\n{SVD_HOWTO}")
        return folder
    snap, where = _hf_snapshot(cfg)
    if snap is None:
        parts = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "image_encoder/config.json",
                 "image_encoder/model.safetensors", "feature_extractor/preprocessor_config.json"]
        raise MissingWeightsError(
            f"{what}: {cfg.hf_repo_id} is not in the Hugging Face cache at {where} and no path is set.\n"
            "Missing files:\n" + "\n".join(f"  {cfg.hf_repo_id}/{p}" for p in parts) + f"\n{SVD_HOWTO}"
        )
    return snap


def build_svd(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``svd``: SVD-XT (video family) from ``cfg.video_path`` or the HF cache."""
    if family != "video":
        raise ValueError("backend 'svd' is a video prior; use 'sv3d_p' (or 'stability') for the multi-view slot")
    folder = svd_folder(cfg, cfg.video_path, "video prior (svd)")
    return load_prior_folder(folder, "video", DTYPES[cfg.dtype], device)
