"""The ``sv3d_p`` backend: SV3D_p (multi-view family) from Stability's ``sv3d_p.safetensors``.

The UNet keys are converted (:func:`d2.stages.sv3d.convert_sgm_unet_state_dict`) and loaded
with ``strict=True``, the checkpoint's own per-frame image decoder with them; the VAE and CLIP
image encoder come from an SVD-XT folder (``components_path``, ``video_path`` or the Hugging
Face cache). A d2 multi-view prior folder is read as such.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from d2.stages.priors.base import DTYPES, Family, MissingWeightsError, Prior
from d2.stages.priors.config import PriorsConfig
from d2.stages.priors.folder import SVD_HOWTO, load_components, load_prior_folder, required_files
from d2.stages.priors.svd import svd_folder

SV3D_REPO = "stabilityai/sv3d"

_SV3D_HOWTO = (
    "Obtain SV3D_p (gated: accept the licence at https://huggingface.co/" + SV3D_REPO + ") with\n"
    "  huggingface-cli download " + SV3D_REPO + " sv3d_p.safetensors --local-dir <dir>\n"
    "and set priors.multiview_path to <dir>/sv3d_p.safetensors."
)


def _read_checkpoint(ckpt: str | os.PathLike | dict[str, Tensor]) -> dict[str, Tensor]:
    """A Stability checkpoint as a flat state dict (safetensors, or torch.load with weights_only)."""
    if isinstance(ckpt, dict):
        return ckpt
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if ckpt.suffix == ".safetensors":
        return load_file(str(ckpt))
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def load_sv3d_image_decoder(ckpt: str | os.PathLike | dict[str, Tensor], dtype: torch.dtype = torch.float32,
                            config: dict | None = None) -> nn.Module | None:
    """SV3D_p's own first-stage (per-frame image) decoder from its checkpoint; None when it carries none."""
    from d2.stages.sv3d import SGM_DECODER_PREFIX, load_sgm_image_decoder

    sd = _read_checkpoint(ckpt)
    if not any(k.startswith(SGM_DECODER_PREFIX) for k in sd):
        return None
    return load_sgm_image_decoder(sd, config).to(dtype)


def load_sv3d_unet(ckpt: str | os.PathLike | dict[str, Tensor], dtype: torch.dtype = torch.float32,
                   config: dict | None = None) -> nn.Module:
    """SV3D_p's UNet from Stability's ``sv3d_p.safetensors`` (keys converted, ``strict=True``).

    ``config`` overrides the UNet config (default: SV3D_p's full-size config).
    """
    from d2.stages.sv3d import SV3D_P_UNET_CONFIG, SV3DUNet, convert_sgm_unet_state_dict

    sd = _read_checkpoint(ckpt)
    with torch.device("meta"):
        unet = SV3DUNet(**(config or SV3D_P_UNET_CONFIG))
    converted = convert_sgm_unet_state_dict(sd, unet)
    unet.load_state_dict(converted, strict=True, assign=True)
    return unet.to(dtype)


def build_sv3d_p(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``sv3d_p``: ``cfg.multiview_path`` = sv3d_p.safetensors (or a d2 multi-view prior folder)."""
    if family != "multiview":
        raise ValueError("backend 'sv3d_p' is a multi-view prior; use 'svd' (or 'stability') for the video slot")
    if cfg.multiview_path and Path(cfg.multiview_path).is_dir():
        return load_prior_folder(cfg.multiview_path, "multiview", DTYPES[cfg.dtype], device)
    problems: list[str] = []
    if not cfg.multiview_path or not Path(cfg.multiview_path).expanduser().is_file():
        looked = cfg.multiview_path or "(priors.multiview_path is unset)"
        problems.append(f"multi-view prior (sv3d_p): missing file sv3d_p.safetensors; looked at {looked}.\n"
                        f"{_SV3D_HOWTO}")
    comps_dir: Path | None = None
    try:
        comps_dir = svd_folder(cfg, cfg.components_path or cfg.video_path, "sv3d_p components (vae, image encoder)")
        gaps = required_files(comps_dir, {"image_encoder": "model", "feature_extractor": "",
                                           "vae": "diffusion_pytorch_model"})
        if gaps:
            problems.append(f"sv3d_p components: missing files in {comps_dir}:\n"
                            + "\n".join(f"  {m}" for m in gaps) + f"\n{SVD_HOWTO}")
    except MissingWeightsError as e:
        problems.append(str(e))
    if problems:
        raise MissingWeightsError("\n".join(problems))
    assert comps_dir is not None
    dtype = DTYPES[cfg.dtype]
    comps = load_components(comps_dir, "vae", dtype, "sv3d_p components", need_unet=False)
    sd = _read_checkpoint(Path(cfg.multiview_path).expanduser())
    unet = load_sv3d_unet(sd, dtype)
    image_decoder = load_sv3d_image_decoder(sd, dtype)  # its own first stage (None: conditions.orbit_decoder=temporal)
    prior = Prior("multiview", unet, comps["vae"], comps["image_encoder"], comps["feature_extractor"], 576,
                  name="sv3d_p", image_decoder=image_decoder)
    return prior.to(device)
