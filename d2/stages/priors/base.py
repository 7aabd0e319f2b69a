"""The prior interface: one ``nn.Module`` for the video model and the multi-view model.

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

Every backend (:mod:`d2.stages.priors`) builds a :class:`Prior`; :class:`MissingWeightsError`
is how a backend says its weights are absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2.stages.unet_runtime import ATTENTION_BACKENDS, CUDA_GRID_LIMIT, attention_context, prepare_unet

Family = Literal["video", "multiview"]
FAMILIES: tuple[Family, ...] = ("video", "multiview")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # PriorsConfig.dtype -> torch


class MissingWeightsError(FileNotFoundError):
    """Weights not found: the message lists every missing file, where it looked and how to get it."""


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
