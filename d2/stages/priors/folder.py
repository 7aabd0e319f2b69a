"""Prior folders: the layout :func:`save_prior_folder` writes and :func:`load_prior_folder` and the
``svd``, ``sv3d_p`` and ``mini`` backends read (:mod:`d2.train.priors` saves trained priors this way)::

    <folder>/
      d2_prior.json        {"family": "video"|"multiview", "latent": "pixel"|"vae",
                            "resolution": 32, ... free extra keys}
      unet/                config.json + diffusion_pytorch_model.safetensors (diffusers save_pretrained;
                            multi-view: SV3DUNet, same config keys as the video UNet)
      image_encoder/       config.json + model.safetensors (CLIPVisionModelWithProjection)
      feature_extractor/   preprocessor_config.json (CLIPImageProcessor)
      vae/                 only when latent == "vae" (AutoencoderKLTemporalDecoder)
      image_decoder/       optional: config.json + model.safetensors of a per-frame ImageDecoder

A folder without ``d2_prior.json`` is read as SVD-XT's diffusers layout (video family, VAE).
Weights are read only from safetensors (or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from d2.stages.priors.base import FAMILIES, Family, MissingWeightsError, PixelSpaceVAE, Prior
from d2.stages.priors.config import SVD_XT_REPO

PRIOR_META = "d2_prior.json"

SVD_HOWTO = (
    "Obtain SVD-XT (gated: accept the licence at https://huggingface.co/" + SVD_XT_REPO + " first) with\n"
    "  huggingface-cli download " + SVD_XT_REPO + " --include 'unet/*' 'vae/*' 'image_encoder/*' "
    "'feature_extractor/*' 'model_index.json'\n"
    "then leave it in the Hugging Face cache, or point priors.video_path (and priors.components_path) at a "
    "folder with that layout."
)


def _weights_file(folder: Path, stem: str) -> Path | None:
    """``stem.safetensors`` or ``stem.fp16.safetensors`` in folder (None when neither exists)."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def required_files(folder: Path, parts: dict[str, str]) -> list[str]:
    """Missing files of the diffusers components ``parts`` (subfolder -> weights stem or '' for config only)."""
    missing: list[str] = []
    for sub, stem in parts.items():
        cfg_name = "preprocessor_config.json" if sub == "feature_extractor" else "config.json"
        if not (folder / sub / cfg_name).is_file():
            missing.append(str(folder / sub / cfg_name))
        if stem and _weights_file(folder / sub, stem) is None:
            missing.append(str(folder / sub / f"{stem}.safetensors") + " (or .fp16.safetensors)")
    return missing


def _variant(folder: Path, stem: str) -> str | None:
    f = _weights_file(folder, stem)
    return "fp16" if f is not None and f.name.endswith(".fp16.safetensors") else None


def load_components(folder: Path, latent: str, dtype: torch.dtype, what: str, need_unet: bool,
                     unet_cls: type | None = None) -> dict[str, Any]:
    """Load unet (optional), vae (or PixelSpaceVAE), image encoder and feature extractor from a folder."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    parts = {"image_encoder": "model", "feature_extractor": ""}
    if need_unet:
        parts["unet"] = "diffusion_pytorch_model"
    if latent == "vae":
        parts["vae"] = "diffusion_pytorch_model"
    missing = required_files(folder, parts)
    if missing:
        howto = SVD_HOWTO if not (folder / PRIOR_META).is_file() else (
            "This is a d2 prior folder: re-save it with d2.stages.priors.save_prior_folder.")
        raise MissingWeightsError(f"{what}: missing files in {folder}:\n" + "\n".join(f"  {m}" for m in missing)
                                  + f"\n{howto}")
    out: dict[str, Any] = {}
    kw = dict(local_files_only=True, use_safetensors=True, torch_dtype=dtype)
    if need_unet:
        from diffusers import UNetSpatioTemporalConditionModel

        cls = unet_cls or UNetSpatioTemporalConditionModel
        out["unet"] = cls.from_pretrained(folder / "unet", variant=_variant(folder / "unet", "diffusion_pytorch_model"),
                                          **kw)
    if latent == "vae":
        out["vae"] = AutoencoderKLTemporalDecoder.from_pretrained(
            folder / "vae", variant=_variant(folder / "vae", "diffusion_pytorch_model"), **kw)
    else:
        out["vae"] = PixelSpaceVAE()
    out["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
        folder / "image_encoder", variant=_variant(folder / "image_encoder", "model"), local_files_only=True,
        use_safetensors=True, dtype=dtype)
    out["feature_extractor"] = CLIPImageProcessor.from_pretrained(folder / "feature_extractor", local_files_only=True)
    return out


def read_prior_meta(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``d2_prior.json`` of a prior folder (None when absent); validates family/latent/resolution."""
    p = Path(folder) / PRIOR_META
    if not p.is_file():
        return None
    meta = json.loads(p.read_text())
    if meta.get("family") not in FAMILIES:
        raise ValueError(f"{p}: 'family' must be one of {FAMILIES}, got {meta.get('family')!r}")
    if meta.get("latent") not in ("pixel", "vae"):
        raise ValueError(f"{p}: 'latent' must be 'pixel' or 'vae', got {meta.get('latent')!r}")
    if not isinstance(meta.get("resolution"), int) or meta["resolution"] <= 0:
        raise ValueError(f"{p}: 'resolution' must be a positive int, got {meta.get('resolution')!r}")
    return meta


def load_prior_folder(folder: str | os.PathLike, family: Family | None = None, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> Prior:
    """A prior from a folder in the layout of the module docstring (d2 prior folder or SVD-XT diffusers folder)."""
    from d2.stages.sv3d import SV3DUNet

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingWeightsError(f"prior folder {folder} does not exist")
    meta = read_prior_meta(folder)
    if meta is None:
        meta = {"family": "video", "latent": "vae", "resolution": 576}
    if family is not None and meta["family"] != family:
        raise ValueError(f"{folder} holds a {meta['family']} prior, a {family} prior was asked for")
    fam: Family = meta["family"]
    comps = load_components(folder, meta["latent"], dtype, f"{fam} prior", need_unet=True,
                             unet_cls=SV3DUNet if fam == "multiview" else None)
    image_decoder = None
    if (folder / "image_decoder" / "config.json").is_file():
        from safetensors.torch import load_file

        from d2.stages.sv3d import ImageDecoder

        dcfg = json.loads((folder / "image_decoder" / "config.json").read_text())
        image_decoder = ImageDecoder(**dcfg)
        image_decoder.load_state_dict(load_file(str(folder / "image_decoder" / "model.safetensors")), strict=True)
        image_decoder = image_decoder.to(dtype)
    prior = Prior(fam, comps["unet"], comps["vae"], comps["image_encoder"], comps["feature_extractor"],
                  meta["resolution"], name=str(folder), image_decoder=image_decoder)
    return prior.to(device)


def save_prior_folder(prior: Prior, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``prior`` as a d2 prior folder (atomically: the folder appears complete or not at all)."""
    from d2.utils.io import atomic_dir, write_json

    if prior.unet is None or prior.image_encoder is None:
        raise ValueError("only network priors (unet + image encoder) can be saved")
    with atomic_dir(folder) as tmp:
        prior.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        prior.image_encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
        prior.feature_extractor.save_pretrained(tmp / "feature_extractor")
        latent = "pixel" if isinstance(prior.vae, PixelSpaceVAE) else "vae"
        if latent == "vae":
            prior.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        if prior.image_decoder is not None:
            from safetensors.torch import save_file

            (tmp / "image_decoder").mkdir()
            write_json(tmp / "image_decoder" / "config.json", dict(prior.image_decoder.config))
            save_file({k: v.contiguous() for k, v in prior.image_decoder.state_dict().items()},
                      str(tmp / "image_decoder" / "model.safetensors"))
        meta = {"family": prior.family, "latent": latent, "resolution": prior.resolution, **(extra or {})}
        write_json(tmp / PRIOR_META, meta)
