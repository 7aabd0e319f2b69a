"""The diffusion priors: one interface for the video model and the multi-view model.

A :class:`Prior` is an ``nn.Module`` holding diffusers-style components

    unet               diffusers ``UNetSpatioTemporalConditionModel`` (video family) or
                       :class:`d2.stages.sv3d.SV3DUNet` (multi-view family: per-frame cameras)
    vae                ``AutoencoderKLTemporalDecoder`` or :class:`PixelSpaceVAE` (identity,
                       scale factor 1, 3 channels: pixel-space miniature priors)
    image_encoder      transformers ``CLIPVisionModelWithProjection``
    feature_extractor  transformers ``CLIPImageProcessor`` (only its mean/std are used)

and offers

    encode(images [N,3,H,W] in [0,1]) -> latents [N,C,h,w] (scaled diffusion space)
    decode(latents [N,C,h,w]) -> images [N,3,H,W] in [0,1] (N consecutive latents = one video)
    condition(images [N,3,H,W], ...) -> PriorCondition (N batch elements)
    denoise(x [B,T,C,h,w] fp32, sigma [B], cond, cfg_scale [B,T]) -> D(x; sigma) [B,T,C,h,w] fp32

``denoise`` is EDM v-prediction preconditioning with sigma_data = 1:
``c_skip = 1/(s^2+1)``, ``c_out = -s/sqrt(s^2+1)``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = ln(s)/4``,
``D = c_skip x + c_out F(c_in x, c_noise)`` with classifier-free guidance inside:
``D = D_u + cfg (D_c - D_u)``, where the unconditional branch has the CLIP context and the
concatenated latent zeroed and the vector conditioning kept. It has no ``torch.no_grad``
inside (callers wrap it), so the miniature-priors trainer trains through the same path.

Conditioning (``PriorCondition``):
    video family:      added ids per batch element ``[N, 3]`` = (fps_id, motion_bucket_id, cond_aug)
    multi-view family: added ids per frame ``[N, T, 3]`` = (cond_aug, polar_rad, azimuth_rad),
                       azimuth measured from the input view (SV3D_p: view v at (v+1)*360/T deg,
                       the last = 360 = the input view), polar = 90 deg - elevation.
    context: CLIP image embedding of the clean image ``[N, 1, D]``;
    concat: un-scaled VAE latent (distribution mode) of the image plus ``cond_aug`` Gaussian
    noise in model space ``[N, C, h, w]``, concatenated to every frame's input.

Backends (:data:`BACKENDS`, name -> a factory function of this module, so a backend's code is
in the cache key of the stages that load it). A factory is
``factory(cfg: PriorsConfig, family, device) -> Prior``.

    gaussian   analytic prior: data ~ a known Gaussian, D in closed form (proves the sampler)
    tiny       both families from tiny configs with seeded random weights (tests, CPU runs)
    svd        video: SVD-XT in diffusers layout (``cfg.video_path`` or the HF cache of
               ``stabilityai/stable-video-diffusion-img2vid-xt``, ``local_files_only``)
    sv3d_p     multi-view: Stability's ``sv3d_p.safetensors`` (``cfg.multiview_path``), UNet keys
               converted and loaded with ``strict=True``; VAE + CLIP from the SVD-XT folder
    stability  video -> svd, multi-view -> sv3d_p (the paper's pair)

Prior folder layout (what :func:`save_prior_folder` writes and :func:`load_prior_folder`,
``svd``, ``sv3d_p`` and ``mini`` read; :mod:`d2.train.priors` saves trained priors this way)::

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

import importlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from d2.stages.unet_runtime import ATTENTION_BACKENDS, CUDA_GRID_LIMIT, attention_context, prepare_unet

Family = Literal["video", "multiview"]
FAMILIES: tuple[Family, ...] = ("video", "multiview")

SVD_XT_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
SV3D_REPO = "stabilityai/sv3d"
PRIOR_META = "d2_prior.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------


class TinyPriorConfig(BaseModel):
    """Sizes of the ``tiny`` backend (random weights; tests and CPU runs)."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = 32  # image side in pixels
    block_out_channels: tuple[int, ...] = (32, 64)  # UNet widths per level (multiples of 32: GroupNorm)
    layers_per_block: int = 1  # resnets per UNet level
    num_attention_heads: int = 2  # heads in every UNet attention
    cross_attention_dim: int = 32  # CLIP projection width = UNet context width
    addition_time_embed_dim: int = 32  # sinusoidal width per added id (SV3D camera ids get 2x)
    vae: bool = True  # True: tiny AutoencoderKLTemporalDecoder (scale 2, 4 ch); False: PixelSpaceVAE
    vae_block_out_channels: tuple[int, ...] = (32, 64)  # tiny VAE widths (scale factor 2^(n-1))
    clip_hidden_size: int = 32  # tiny CLIP vision width
    clip_layers: int = 2  # tiny CLIP vision depth
    clip_image_size: int = 32  # tiny CLIP input side
    seed: int = 0  # weights seed (video uses seed, multi-view seed + 1)


class GaussianPriorConfig(BaseModel):
    """The analytic prior: x0 ~ N(m, std^2 R) per element, R_ij = rho^|i-j| along the sequence axis."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = 8  # image side (pixel space, 3 channels)
    std: float = 0.5  # marginal std of every latent entry
    video_rho: float = 0.9  # correlation of neighbouring frames (video family)
    multiview_rho: float = 0.5  # correlation of neighbouring views (multi-view family)
    video_offset: float = 0.0  # constant added to the video family's mean
    multiview_offset: float = 0.0  # constant added to the multi-view family's mean
    cond_weight: float = 1.0  # conditional mean = offset + cond_weight * latent of the conditioning image


class PriorsConfig(BaseModel):
    """Which priors to load and how."""

    model_config = ConfigDict(extra="forbid")
    backend: str = "tiny"  # registry name used for both families unless overridden below
    video_backend: str | None = None  # override for the video family (e.g. "svd", "mini")
    multiview_backend: str | None = None  # override for the multi-view family (e.g. "sv3d_p", "mini")
    video_path: str | None = None  # video weights: diffusers-layout / d2 prior folder (svd, mini)
    multiview_path: str | None = None  # multi-view weights: sv3d_p.safetensors file or d2 prior folder
    components_path: str | None = None  # folder with vae/ image_encoder/ feature_extractor/ for sv3d_p (default: SVD-XT)
    hf_repo_id: str = SVD_XT_REPO  # Hugging Face repo searched in the local cache when video_path is unset
    hf_cache_dir: str | None = None  # Hugging Face cache dir (default: HF_HUB_CACHE / ~/.cache/huggingface/hub)
    device: str = "cpu"  # torch device of the models
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights / activations dtype (x stays fp32)
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"  # preferred attention kernel (d2/stages/unet_runtime.py)
    attention_max_batch: int = Field(32767, ge=1)  # attention sequences per kernel call (CUDA grid limit 65535)
    cross_attention_shortcut: bool = True  # single-token cross-attention in closed form (exact; skips its GEMMs)
    channels_last: bool = False  # NHWC convolution weights
    temporal_conv: Literal["conv3d", "gemm"] = "conv3d"  # temporal (3,1,1) convolution as cuDNN Conv3d or one GEMM
    temporal_norm: Literal["groupnorm", "framewise"] = "groupnorm"  # temporal GroupNorm statistics: as built or per frame
    cudnn_benchmark: bool = False  # cuDNN times its convolution algorithms per shape (process-wide; not bitwise reproducible)
    compile: bool = False  # torch.compile the UNets (the first call of each shape compiles: minutes at full size)
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"] = "default"  # torch.compile mode
    compile_freezing: bool = False  # Inductor freezing: weights folded in as constants (inference only)
    resnet_norm_eps: float | None = Field(None, gt=0, le=1e-3)  # GroupNorm eps of every UNet ResNet block; None: as diffusers builds them (1e-6, 1e-5 in the mid and attention-free down blocks), as the miniature priors were trained; Stability's sgm (SVD-XT, SV3D_p): 1e-5
    autocast: Literal["none", "float16", "bfloat16"] = "none"  # UNet calls under torch.autocast of this dtype (authors: float16, weights fp32); none: plain `dtype`, reproducible and CPU-friendly
    clip_preprocess: Literal["sgm", "torch"] = "sgm"  # CLIP input resize: sgm = Gaussian antialias + bicubic align_corners=True, unclamped (Stability's and diffusers' SVD pipeline); torch = F.interpolate bicubic antialias, align_corners=False, clamped
    tiny: TinyPriorConfig = Field(default_factory=TinyPriorConfig)  # sizes of the tiny backend
    gaussian: GaussianPriorConfig = Field(default_factory=GaussianPriorConfig)  # the analytic prior


# ---------------------------------------------------------------------------------------
# conditioning
# ---------------------------------------------------------------------------------------


@dataclass
class PriorCondition:
    """Batched conditioning of N sequences (one entry per batch element)."""

    context: Tensor  # [N, L, D] CLIP image embeddings (cross-attention)
    concat: Tensor  # [N, C, h, w] un-scaled latent of the (noised) conditioning image
    added_ids: Tensor  # video [N, 3]; multi-view [N, T, 3]

    def __len__(self) -> int:
        return self.context.shape[0]

    def select(self, idx: slice | Tensor | list[int]) -> "PriorCondition":
        """Rows ``idx`` of every field."""
        return PriorCondition(self.context[idx], self.concat[idx], self.added_ids[idx])

    def to(self, device: torch.device | str) -> "PriorCondition":
        return PriorCondition(self.context.to(device), self.concat.to(device), self.added_ids.to(device))

    def unconditional(self) -> "PriorCondition":
        """CLIP context and concatenated latent zeroed, vector conditioning kept."""
        return replace(self, context=torch.zeros_like(self.context), concat=torch.zeros_like(self.concat))

    @staticmethod
    def cat(items: list["PriorCondition"]) -> "PriorCondition":
        return PriorCondition(
            torch.cat([c.context for c in items]), torch.cat([c.concat for c in items]),
            torch.cat([c.added_ids for c in items]),
        )

    def state(self) -> dict[str, Tensor]:
        return {"context": self.context, "concat": self.concat, "added_ids": self.added_ids}


def edm_coefficients(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM v-prediction preconditioning (sigma_data = 1): c_skip, c_out, c_in, c_noise, all shaped like sigma."""
    sigma = sigma.to(torch.float32)
    s2 = sigma**2 + 1.0
    return 1.0 / s2, -sigma / s2.sqrt(), 1.0 / s2.sqrt(), sigma.log() / 4.0


# ---------------------------------------------------------------------------------------
# pixel-space "VAE"
# ---------------------------------------------------------------------------------------


class PixelSpaceVAE(nn.Module):
    """Identity autoencoder: latents are the images in [-1, 1] (3 channels, scale factor 1)."""

    latent_channels = 3
    scale_factor = 1
    scaling_factor = 1.0

    def encode_images(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> the same tensor."""
        return x

    def decode_latents(self, z: Tensor, num_frames: int) -> Tensor:
        return z


# ---------------------------------------------------------------------------------------
# the prior interface
# ---------------------------------------------------------------------------------------


class Prior(nn.Module):
    """A video (rows) or multi-view (columns) diffusion prior; see the module docstring."""

    def __init__(
        self,
        family: Family,
        unet: nn.Module | None,
        vae: nn.Module,
        image_encoder: nn.Module | None,
        feature_extractor: Any | None,
        resolution: int,
        name: str = "",
        image_decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        self.family: Family = family
        self.unet = unet
        self.vae = vae
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.resolution = int(resolution)
        self.name = name or family
        self.image_decoder = image_decoder  # per-frame decoder of the model's own first stage (SV3D_p), or None
        self.autocast_dtype: torch.dtype | None = None  # torch.autocast dtype of the UNet calls
        self.clip_preprocess: str = "torch"  # "torch" | "sgm": see PriorsConfig.clip_preprocess
        mean = getattr(feature_extractor, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]
        std = getattr(feature_extractor, "image_std", None) or [0.26862954, 0.26130258, 0.27577711]
        self.register_buffer("clip_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.attention_backend: str = "auto"
        if unet is not None:  # split huge temporal-attention batches (CUDA grid limit), whatever the chunk
            prepare_unet(unet)

    def configure_runtime(self, *, attention_backend: str = "auto", attention_max_batch: int = CUDA_GRID_LIMIT // 2,
                          cross_attention_shortcut: bool = True, channels_last: bool = False,
                          temporal_conv: str = "conv3d", temporal_norm: str = "groupnorm", compile: bool = False,
                          compile_mode: str = "default", compile_freezing: bool = False) -> "Prior":
        """How the UNet executes (kernels, layouts, compilation; d2/stages/unet_runtime.py)."""
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        self.attention_backend = attention_backend
        if self.unet is not None:
            prepare_unet(self.unet, attention_max_batch=attention_max_batch,
                         cross_attention_shortcut=cross_attention_shortcut, channels_last=channels_last,
                         temporal_conv=temporal_conv, temporal_norm=temporal_norm,  # type: ignore[arg-type]
                         compile=compile, compile_mode=compile_mode, compile_freezing=compile_freezing)  # type: ignore[arg-type]
        return self

    def configure_numerics(self, *, resnet_norm_eps: float | None = None, autocast: str = "none",
                           clip_preprocess: str = "torch") -> "Prior":
        """Numerical choices that change results slightly (PriorsConfig: resnet_norm_eps, autocast, clip_preprocess)."""
        if autocast not in _AUTOCAST:
            raise ValueError(f"autocast must be one of {sorted(_AUTOCAST)}, got {autocast!r}")
        if clip_preprocess not in ("torch", "sgm"):
            raise ValueError(f"clip_preprocess must be 'torch' or 'sgm', got {clip_preprocess!r}")
        if resnet_norm_eps is not None and self.unet is not None:
            set_resnet_norm_eps(self.unet, resnet_norm_eps)
        self.autocast_dtype = _AUTOCAST[autocast]
        self.clip_preprocess = clip_preprocess
        return self

    def _autocast(self):
        """torch.autocast of ``autocast_dtype`` on this prior's device (a no-op context when None)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    # ---- properties ----
    @property
    def latent_channels(self) -> int:
        if isinstance(self.vae, PixelSpaceVAE):
            return 3
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        if isinstance(self.vae, PixelSpaceVAE):
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        if isinstance(self.vae, PixelSpaceVAE):
            return 1.0
        return float(self.vae.config.scaling_factor)

    @property
    def device(self) -> torch.device:
        return self.clip_mean.device

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    @property
    def default_num_frames(self) -> int:
        """Sequence length the model was built for (25 for SVD-XT, 21 for SV3D_p)."""
        if self.unet is not None and hasattr(self.unet, "config"):
            return int(self.unet.config.num_frames)
        return 8

    # ---- images <-> latents ----
    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"images must be {self.resolution}x{self.resolution} for this prior, got "
                             f"{tuple(images.shape[-2:])}")

    def _encode_unscaled(self, images_pm1: Tensor) -> Tensor:
        """[N, 3, H, W] in [-1, 1] -> VAE latent mode [N, C, h, w] (fp32, not scaled)."""
        if isinstance(self.vae, PixelSpaceVAE):
            return images_pm1.float()
        vdtype = next(self.vae.parameters()).dtype
        return self.vae.encode(images_pm1.to(vdtype)).latent_dist.mode().float()

    def encode(self, images: Tensor, chunk: int = 16) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] -> latents [N, C, h, w] in the diffusion space (scaled), fp32."""
        self._check_images(images)
        x = images.to(self.device, torch.float32) * 2 - 1
        out = [self._encode_unscaled(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
        return torch.cat(out) * self.scaling_factor

    def decode(self, latents: Tensor, chunk: int = 14, decoder: Literal["temporal", "image"] = "temporal") -> Tensor:
        """Latents [N, C, h, w] (one sequence of N frames) -> images [N, 3, H, W] in [0, 1], fp32.

        ``decoder="temporal"``: the VAE's decoder sees ``chunk`` consecutive frames at a time
        (SVD-XT's temporal decoder mixes neighbouring frames). ``decoder="image"``: the prior's own
        per-frame :attr:`image_decoder` (SV3D_p's first stage), ``chunk`` frames per call. A
        pixel-space prior decodes every frame on its own either way.
        """
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [N, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        self.check_decoder(decoder)
        z = latents.to(self.device, torch.float32) / self.scaling_factor
        outs = []
        for i in range(0, z.shape[0], chunk):
            zi = z[i:i + chunk]
            if isinstance(self.vae, PixelSpaceVAE):
                outs.append(zi)
            elif decoder == "image":
                ddtype = next(self.image_decoder.parameters()).dtype
                outs.append(self.image_decoder(zi.to(ddtype)).float())
            else:
                vdtype = next(self.vae.parameters()).dtype
                outs.append(self.vae.decode(zi.to(vdtype), num_frames=zi.shape[0]).sample.float())
        return ((torch.cat(outs) + 1) / 2).clamp(0, 1)

    def check_decoder(self, decoder: str) -> None:
        """ValueError unless :meth:`decode` can use ``decoder`` ("temporal" | "image") on this prior."""
        if decoder not in ("temporal", "image"):
            raise ValueError(f"decoder must be 'temporal' or 'image', got {decoder!r}")
        if decoder == "image" and self.image_decoder is None and not isinstance(self.vae, PixelSpaceVAE):
            raise ValueError(f"the {self.family} prior {self.name!r} has no per-frame image decoder; decode with "
                             "the temporal decoder (conditions.orbit_decoder=temporal)")

    def clip_embed(self, images: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] -> CLIP image embeddings [N, 1, D] (fp32)."""
        size = int(self.image_encoder.config.image_size)
        x = images.to(self.device, torch.float32)
        if x.shape[-1] != size or x.shape[-2] != size:
            if self.clip_preprocess == "sgm":
                x = sgm_clip_resize(x, size)
            else:
                x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1)
        x = (x - self.clip_mean) / self.clip_std
        edtype = next(self.image_encoder.parameters()).dtype
        return self.image_encoder(pixel_values=x.to(edtype)).image_embeds.float()[:, None]

    # ---- conditioning ----
    def condition(
        self,
        images: Tensor,
        *,
        cond_aug: float,
        azimuths_deg: list[float] | None = None,
        elevations_deg: list[float] | float | None = None,
        fps_id: int = 24,
        motion_bucket_id: int = 127,
        generator: torch.Generator | None = None,
    ) -> PriorCondition:
        """Conditioning images [N, 3, H, W] in [0, 1] -> :class:`PriorCondition` of N elements.

        Multi-view family: ``azimuths_deg`` (T values, from the input view; SV3D_p orbit:
        ``cameras.orbit_azimuths(T)``) and ``elevations_deg`` (one or T values) give the
        per-frame cameras shared by all N elements. The cond_aug noise is drawn from
        ``generator`` (a CPU generator) so results are reproducible on any device.
        """
        self._check_images(images)
        n = images.shape[0]
        x = images.to(self.device, torch.float32) * 2 - 1
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(self.device)
        concat = torch.cat([self._encode_unscaled(x[i:i + 16] + cond_aug * noise[i:i + 16]) for i in range(0, n, 16)])
        context = self.clip_embed(images)
        if self.family == "video":
            ids = torch.tensor([[float(fps_id), float(motion_bucket_id), float(cond_aug)]] * n, device=self.device)
        else:
            if azimuths_deg is None:
                raise ValueError("the multi-view prior needs azimuths_deg (one per generated view)")
            t = len(azimuths_deg)
            if elevations_deg is None:
                elevations_deg = 0.0
            elevs = [float(elevations_deg)] * t if isinstance(elevations_deg, (int, float)) else list(elevations_deg)
            if len(elevs) != t:
                raise ValueError(f"elevations_deg has {len(elevs)} values for {t} azimuths")
            polar = torch.tensor([math.radians(90.0 - e) for e in elevs])
            azim = torch.tensor([math.radians(a) for a in azimuths_deg])
            per_frame = torch.stack([torch.full((t,), float(cond_aug)), polar, azim], dim=-1)  # [T, 3]
            ids = per_frame[None].expand(n, t, 3).clone().to(self.device)
        return PriorCondition(context=context, concat=concat, added_ids=ids)

    # ---- denoising ----
    def network(self, x_in: Tensor, c_noise: Tensor, cond: PriorCondition) -> Tensor:
        """Raw network output F for scaled inputs ``x_in`` [B, T, C, h, w] -> [B, T, C, h, w] fp32."""
        b, t = x_in.shape[:2]
        dtype = self.dtype
        concat = cond.concat.to(dtype)[:, None].expand(b, t, *cond.concat.shape[1:])
        sample = torch.cat([x_in.to(dtype), concat], dim=2)  # [B, T, 2C, h, w]
        ids = cond.added_ids
        if self.family == "multiview" and ids.shape[1] != t:
            raise ValueError(f"conditioning has cameras for {ids.shape[1]} views, sample has {t}")
        with attention_context(self.attention_backend), self._autocast():  # type: ignore[arg-type]
            out = self.unet(sample, c_noise.to(torch.float32), encoder_hidden_states=cond.context.to(dtype),
                            added_time_ids=ids.float(), return_dict=False)[0]  # ids stay fp32 (angles)
        return out.float()

    def denoise_raw(self, x: Tensor, sigma: Tensor, cond: PriorCondition) -> Tensor:
        """D(x; sigma) without guidance: x [B, T, C, h, w] fp32, sigma [B] -> [B, T, C, h, w] fp32."""
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
        shape = (-1, 1, 1, 1, 1)
        f = self.network(c_in.view(shape) * x, c_noise, cond)
        return c_skip.view(shape) * x + c_out.view(shape) * f

    def denoise(self, x: Tensor, sigma: Tensor, cond: PriorCondition, cfg_scale: Tensor | float) -> Tensor:
        """Guided D(x; sigma): x [B, T, C, h, w] fp32, sigma [B], cond with B elements, cfg_scale [B, T].

        ``D = D_u + cfg (D_c - D_u)``, both branches in one network call; when every scale
        is 1 the unconditional branch is skipped.
        """
        if x.ndim != 5:
            raise ValueError(f"x must be [B, T, C, h, w], got {tuple(x.shape)}")
        b, t = x.shape[:2]
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        cfg = torch.broadcast_to(torch.as_tensor(cfg_scale, dtype=torch.float32, device=x.device), (b, t))
        if len(cond) != b:
            raise ValueError(f"conditioning has {len(cond)} elements, x has {b}")
        if bool((cfg == 1).all()):
            return self.denoise_raw(x, sigma, cond)
        both = PriorCondition.cat([cond.unconditional(), cond])
        d = self.denoise_raw(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        d_u, d_c = d[:b], d[b:]
        return d_u + cfg.view(b, t, 1, 1, 1) * (d_c - d_u)


_AUTOCAST: dict[str, torch.dtype | None] = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def set_resnet_norm_eps(unet: nn.Module, eps: float) -> int:
    """Set the eps of both GroupNorms of every ResNet block (spatial and temporal) of ``unet``; returns the count.

    diffusers builds most of them with 1e-6 (1e-5 in the mid block and the attention-free down
    blocks); Stability's sgm VideoUNet (where SVD-XT and SV3D_p were trained) uses 1e-5 in
    all. Attention and output norms are untouched (equal in both).
    """
    from diffusers.models.resnet import ResnetBlock2D, TemporalResnetBlock

    n = 0
    for m in unet.modules():
        if isinstance(m, (ResnetBlock2D, TemporalResnetBlock)):
            for norm in (m.norm1, m.norm2):
                if isinstance(norm, nn.GroupNorm):
                    norm.eps = float(eps)
                    n += 1
    return n


def _gaussian_kernel1d(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    if size % 2 == 0:
        x = x + 0.5
    g = torch.exp(-x**2 / (2 * sigma**2))
    return (g / g.sum()).float()


def sgm_clip_resize(images: Tensor, size: int) -> Tensor:
    """[N, 3, H, W] -> [N, 3, size, size] as Stability's CLIP embedder resizes (kornia ``resize``, antialias).

    A separable Gaussian blur (sigma = max((factor - 1) / 2, 0.001) per axis, kernel
    ``int(max(4 sigma, 3))`` made odd, reflect padding), then bicubic with
    ``align_corners=True``; no clamp. diffusers' SVD pipeline does the same.
    """
    h, w = images.shape[-2:]
    out = images
    sig = (max((h / size - 1.0) / 2.0, 0.001), max((w / size - 1.0) / 2.0, 0.001))
    ks = [int(max(4.0 * s, 3)) for s in sig]
    ks = [k + 1 if k % 2 == 0 else k for k in ks]
    c = out.shape[1]
    for axis in (1, 0):  # columns (W) first, then rows (H)
        k, s = ks[axis], sig[axis]
        kern = _gaussian_kernel1d(k, s).to(out.device, out.dtype)
        pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)
        if axis == 1:
            out = F.pad(out, (*pad, 0, 0), mode="reflect")
            weight = kern.view(1, 1, 1, k).expand(c, 1, 1, k)
        else:
            out = F.pad(out, (0, 0, *pad), mode="reflect")
            weight = kern.view(1, 1, k, 1).expand(c, 1, k, 1)
        out = F.conv2d(out, weight, groups=c)
    return F.interpolate(out, size=(size, size), mode="bicubic", align_corners=True)


class GaussianPrior(Prior):
    """Analytic prior: x0 of a sequence ~ N(m, std^2 R (x) I), R_ij = rho^|i-j| along T.

    Conditional mean ``m = offset + cond_weight * concat`` (the latent of the conditioning
    image, repeated over T); unconditional ``m = offset``. D is the posterior mean
    ``m + A (x - m)`` with ``A = S (S + sigma^2 I)^-1`` along T, computed in float64.
    Pixel space (3 channels, scale factor 1).
    """

    def __init__(self, family: Family, cfg: GaussianPriorConfig) -> None:
        super().__init__(family, None, PixelSpaceVAE(), None, None, cfg.resolution, name=f"gaussian-{family}")
        self.cfg = cfg
        self.rho = cfg.video_rho if family == "video" else cfg.multiview_rho
        self.offset = cfg.video_offset if family == "video" else cfg.multiview_offset

    @property
    def default_num_frames(self) -> int:
        return 8

    def covariance(self, t: int) -> Tensor:
        """[T, T] float64 covariance along the sequence axis."""
        i = torch.arange(t, dtype=torch.float64)
        return self.cfg.std**2 * self.rho ** (i[:, None] - i[None, :]).abs()

    def clip_embed(self, images: Tensor) -> Tensor:
        return torch.zeros(images.shape[0], 1, 1, device=self.device)

    def mean(self, cond: PriorCondition) -> Tensor:
        """[B, 1, C, h, w] conditional mean (the unconditional branch has concat = 0)."""
        return self.offset + self.cfg.cond_weight * cond.concat.float()[:, None]

    def denoise_raw(self, x: Tensor, sigma: Tensor, cond: PriorCondition) -> Tensor:
        b, t = x.shape[:2]
        cov = self.covariance(t).to(x.device)  # [T, T]
        eye = torch.eye(t, dtype=torch.float64, device=x.device)
        s2 = sigma.to(torch.float64).view(b, 1, 1) ** 2
        a = torch.linalg.solve(cov[None] + s2 * eye, cov[None].expand(b, t, t)).transpose(1, 2)  # S (S+s2)^-1
        m = self.mean(cond).to(torch.float64)
        r = x.to(torch.float64) - m
        return (m + torch.einsum("bts,bs...->bt...", a, r)).float()


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

BackendFactory = Callable[["PriorsConfig", Family, torch.device], Prior]


def get_backend(name: str) -> BackendFactory:
    """The factory ``(cfg, family, device) -> Prior`` of backend ``name`` (see :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise KeyError(f"unknown priors backend {name!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[name]


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
            prior = get_backend(name)(cfg, family, dev)
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


def build_gaussian(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """The analytic Gaussian prior of ``cfg.gaussian``."""
    return GaussianPrior(family, cfg.gaussian).to(device)


# ---------------------------------------------------------------------------------------
# tiny backend
# ---------------------------------------------------------------------------------------


def spatiotemporal_unet_config(
    *,
    family: Family,
    latent_channels: int,
    block_out_channels: Sequence[int],
    attention: Sequence[bool],
    addition_time_embed_dim: int,
    layers_per_block: int,
    cross_attention_dim: int,
    num_attention_heads: int,
    num_frames: int,
    sample_size: int | None = None,
) -> dict:
    """diffusers UNetSpatioTemporalConditionModel config of a small prior of ``family``.

    ``attention[i]`` puts cross-attention blocks at level ``i`` (mirrored on the way up). The
    added-ids width follows the family: video (fps_id, motion_bucket_id, cond_aug) x d;
    multi-view (SV3D_p) cond_aug d + polar 2d + azimuth 2d.
    """
    d = addition_time_embed_dim
    return dict(
        sample_size=sample_size,
        in_channels=2 * latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal"
                               for a in attention),
        up_block_types=tuple("CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal"
                             for a in attention[::-1]),
        block_out_channels=tuple(block_out_channels),
        addition_time_embed_dim=d,
        projection_class_embeddings_input_dim=3 * d if family == "video" else 5 * d,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        num_attention_heads=num_attention_heads,
        num_frames=num_frames,
    )


def tiny_unet_config(t: TinyPriorConfig, family: Family, latent_channels: int, num_frames: int) -> dict:
    """diffusers UNet config of the tiny backend (cross-attention on every level but the last)."""
    n = len(t.block_out_channels)
    return spatiotemporal_unet_config(
        family=family, latent_channels=latent_channels, block_out_channels=t.block_out_channels,
        attention=[i < n - 1 for i in range(n)], addition_time_embed_dim=t.addition_time_embed_dim,
        layers_per_block=t.layers_per_block, cross_attention_dim=t.cross_attention_dim,
        num_attention_heads=t.num_attention_heads, num_frames=num_frames,
    )


def build_tiny_prior(t: TinyPriorConfig, family: Family, seed: int | None = None) -> Prior:
    """A prior of ``family`` from tiny configs with seeded random weights (CPU, fp32)."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from d2.stages.sv3d import ImageDecoder, SV3DUNet

    seed = t.seed + (0 if family == "video" else 1) if seed is None else seed
    cpu_rng = torch.random.fork_rng(devices=[])
    with cpu_rng:
        torch.manual_seed(seed)
        if t.vae:
            nb = len(t.vae_block_out_channels)
            vae: nn.Module = AutoencoderKLTemporalDecoder(
                in_channels=3, out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * nb,
                block_out_channels=tuple(t.vae_block_out_channels),
                layers_per_block=1, latent_channels=4, sample_size=t.resolution,
            )
            latent_channels = 4
        else:
            vae = PixelSpaceVAE()
            latent_channels = 3
        ucfg = tiny_unet_config(t, family, latent_channels, 8)
        unet = (UNetSpatioTemporalConditionModel if family == "video" else SV3DUNet)(**ucfg)
        clip_cfg = CLIPVisionConfig(
            hidden_size=t.clip_hidden_size, projection_dim=t.cross_attention_dim, num_hidden_layers=t.clip_layers,
            num_attention_heads=2, intermediate_size=2 * t.clip_hidden_size, image_size=t.clip_image_size,
            patch_size=8,
        )
        encoder = CLIPVisionModelWithProjection(clip_cfg)
        image_decoder = None
        if t.vae and family == "multiview":  # SV3D_p's own per-frame first stage, after the rest (same weights above)
            image_decoder = ImageDecoder(tuple(t.vae_block_out_channels), layers_per_block=1, latent_channels=4)
    fe = CLIPImageProcessor(crop_size=t.clip_image_size, size={"shortest_edge": t.clip_image_size})
    return Prior(family, unet, vae, encoder, fe, t.resolution, name=f"tiny-{family}", image_decoder=image_decoder)


def build_tiny(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``tiny``."""
    prior = build_tiny_prior(cfg.tiny, family)
    return prior.to(device=device, dtype=_DTYPES[cfg.dtype])


# ---------------------------------------------------------------------------------------
# real weights: folders, the HF cache, sv3d_p.safetensors
# ---------------------------------------------------------------------------------------


class MissingWeightsError(FileNotFoundError):
    """Weights not found: the message lists every missing file, where it looked and how to get it."""


_SVD_HOWTO = (
    "Obtain SVD-XT (gated: accept the licence at https://huggingface.co/" + SVD_XT_REPO + " first) with\n"
    "  huggingface-cli download " + SVD_XT_REPO + " --include 'unet/*' 'vae/*' 'image_encoder/*' "
    "'feature_extractor/*' 'model_index.json'\n"
    "then leave it in the Hugging Face cache, or point priors.video_path (and priors.components_path) at a "
    "folder with that layout."
)
_SV3D_HOWTO = (
    "Obtain SV3D_p (gated: accept the licence at https://huggingface.co/" + SV3D_REPO + ") with\n"
    "  huggingface-cli download " + SV3D_REPO + " sv3d_p.safetensors --local-dir <dir>\n"
    "and set priors.multiview_path to <dir>/sv3d_p.safetensors."
)


def _weights_file(folder: Path, stem: str) -> Path | None:
    """``stem.safetensors`` or ``stem.fp16.safetensors`` in folder (None when neither exists)."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    return None


def _required_files(folder: Path, parts: dict[str, str]) -> list[str]:
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


def _svd_folder(cfg: PriorsConfig, explicit: str | None, what: str) -> Path:
    """The folder holding SVD-XT components: ``explicit`` or the HF cache; raises MissingWeightsError."""
    if explicit:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            raise MissingWeightsError(f"{what}: folder {folder} does not exist.\n{_SVD_HOWTO}")
        return folder
    snap, where = _hf_snapshot(cfg)
    if snap is None:
        parts = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "image_encoder/config.json",
                 "image_encoder/model.safetensors", "feature_extractor/preprocessor_config.json"]
        raise MissingWeightsError(
            f"{what}: {cfg.hf_repo_id} is not in the Hugging Face cache at {where} and no path is set.\n"
            "Missing files:\n" + "\n".join(f"  {cfg.hf_repo_id}/{p}" for p in parts) + f"\n{_SVD_HOWTO}"
        )
    return snap


def _load_components(folder: Path, latent: str, dtype: torch.dtype, what: str, need_unet: bool,
                     unet_cls: type | None = None) -> dict[str, Any]:
    """Load unet (optional), vae (or PixelSpaceVAE), image encoder and feature extractor from a folder."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    parts = {"image_encoder": "model", "feature_extractor": ""}
    if need_unet:
        parts["unet"] = "diffusion_pytorch_model"
    if latent == "vae":
        parts["vae"] = "diffusion_pytorch_model"
    missing = _required_files(folder, parts)
    if missing:
        howto = _SVD_HOWTO if not (folder / PRIOR_META).is_file() else (
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
    comps = _load_components(folder, meta["latent"], dtype, f"{fam} prior", need_unet=True,
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


def build_svd(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``svd``: SVD-XT (video family) from ``cfg.video_path`` or the HF cache."""
    if family != "video":
        raise ValueError("backend 'svd' is a video prior; use 'sv3d_p' (or 'stability') for the multi-view slot")
    folder = _svd_folder(cfg, cfg.video_path, "video prior (svd)")
    return load_prior_folder(folder, "video", _DTYPES[cfg.dtype], device)


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
        return load_prior_folder(cfg.multiview_path, "multiview", _DTYPES[cfg.dtype], device)
    problems: list[str] = []
    if not cfg.multiview_path or not Path(cfg.multiview_path).expanduser().is_file():
        looked = cfg.multiview_path or "(priors.multiview_path is unset)"
        problems.append(f"multi-view prior (sv3d_p): missing file sv3d_p.safetensors; looked at {looked}.\n"
                        f"{_SV3D_HOWTO}")
    comps_dir: Path | None = None
    try:
        comps_dir = _svd_folder(cfg, cfg.components_path or cfg.video_path, "sv3d_p components (vae, image encoder)")
        gaps = _required_files(comps_dir, {"image_encoder": "model", "feature_extractor": "",
                                           "vae": "diffusion_pytorch_model"})
        if gaps:
            problems.append(f"sv3d_p components: missing files in {comps_dir}:\n"
                            + "\n".join(f"  {m}" for m in gaps) + f"\n{_SVD_HOWTO}")
    except MissingWeightsError as e:
        problems.append(str(e))
    if problems:
        raise MissingWeightsError("\n".join(problems))
    assert comps_dir is not None
    dtype = _DTYPES[cfg.dtype]
    comps = _load_components(comps_dir, "vae", dtype, "sv3d_p components", need_unet=False)
    sd = _read_checkpoint(Path(cfg.multiview_path).expanduser())
    unet = load_sv3d_unet(sd, dtype)
    image_decoder = load_sv3d_image_decoder(sd, dtype)  # its own first stage (None: conditions.orbit_decoder=temporal)
    prior = Prior("multiview", unet, comps["vae"], comps["image_encoder"], comps["feature_extractor"], 576,
                  name="sv3d_p", image_decoder=image_decoder)
    return prior.to(device)


def build_stability(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``stability``: SVD-XT for the video slot, SV3D_p for the multi-view slot."""
    return build_svd(cfg, family, device) if family == "video" else build_sv3d_p(cfg, family, device)


# ---------------------------------------------------------------------------------------
# mini backend: the miniature priors trained on the procedural world (d2.train.priors)
# ---------------------------------------------------------------------------------------

MINI_DIR = Path(__file__).resolve().parents[2] / "data" / "priors"
"""Where the trained miniature priors live in the checkout (committed to git)."""


def mini_prior_dir(cfg: PriorsConfig, family: Family) -> Path:
    """The folder the ``mini`` backend reads for ``family``: ``cfg.{video,multiview}_path`` when it
    is a folder, else ``data/priors/{video,multiview}`` of the checkout."""
    explicit = cfg.video_path if family == "video" else cfg.multiview_path
    if explicit and Path(explicit).expanduser().is_dir():
        return Path(explicit).expanduser()
    return MINI_DIR / family


def build_mini(cfg: PriorsConfig, family: Family, device: torch.device) -> Prior:
    """Backend ``mini``: the trained miniature prior of ``family``."""
    folder = mini_prior_dir(cfg, family)
    if not (folder / "d2_prior.json").is_file():
        raise MissingWeightsError(
            f"miniature {family} prior: {folder / 'd2_prior.json'} is missing.\n"
            "Train the priors with `python -m d2.train.priors --out data/priors` (or `dvc repro train_priors`).")
    return load_prior_folder(folder, family, _DTYPES[cfg.dtype], device)


BACKENDS: dict[str, BackendFactory] = {
    "gaussian": build_gaussian,  # analytic Gaussian prior (tests with known answers)
    "tiny": build_tiny,  # random small UNets (tests, CPU)
    "mini": build_mini,  # miniature priors trained on the procedural world (CPU demo)
    "svd": build_svd,  # SVD-XT (diffusers layout)
    "sv3d_p": build_sv3d_p,  # SV3D_p (Stability layout, converted)
    "stability": build_stability,  # Stability's checkpoints for both families
}
"""Backend name (``priors.backend``) -> factory. Every backend is a function of this module, so
its code is in the cache key of every stage that loads priors."""
