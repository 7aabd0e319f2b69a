"""SV4D and SV4D 2.0: Stability's novel-view video UNet (sgm's ``SpatialUNetModelWithTime``), re-written.

SV4D (``stabilityai/sv4d``) and SV4D 2.0 (``stabilityai/sv4d2.0``) denoise a views x frames
matrix of latents at once: ``N = B * T * V`` images in (sequence, time, view) order, each with
the noisy latent and the latent of its motion frame concatenated (8 channels). Every level of
the UNet mixes spatial resnets with temporal resnets over the T * V images of a sequence, and
its attention layers (:class:`~d2.stages.sv4d_blocks.MotionTransformer`) attend over pixels,
then across views (camera attention), then across frames (motion attention).

:class:`SV4DUNet` takes the arguments of sgm's ``SpatialUNetModelWithTime.forward`` with the
same names and layouts, so a sampling loop written against sgm runs either network. Its
parameter names are sgm's: Stability's checkpoint loads after removing ``model.diffusion_model.``
(:func:`convert_sgm_sv4d_state_dict`, :func:`to_sgm_sv4d_state_dict`, :func:`load_sv4d_unet`).
:func:`find_sv4d_checkpoint` looks for the checkpoint in the local Hugging Face cache only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from d2.stages.sv4d_blocks import (Downsample, GroupNorm32, MotionTransformer, TemporalResBlock, Upsample,
                                   sinusoidal_embedding)

SGM_UNET_PREFIX = "model.diffusion_model."

SV4DVersion = Literal["sv4d", "sv4d2", "sv4d2_8views"]


@dataclass(frozen=True)
class SV4DUNetConfig:
    """The architecture of one SV4D UNet (the ``network_config`` of Stability's yaml files).

    What the three released models share is fixed in the code: linear projections in the
    transformers, CLIP context for the camera attention too (``use_spatial_context``), a vector
    input through a 2-layer MLP (``num_classes: sequential``), learned blends
    (``learned_with_images``, ``time_mix_legacy: False``), strided-convolution down / nearest
    up sampling, no dropout.
    """

    in_channels: int = 8  # noisy latent (4) + concatenated latent of the motion frame (4)
    out_channels: int = 4  # predicted latent channels
    model_channels: int = 320  # width of the first level; the timestep embedding is 4x as wide
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of each level, in units of model_channels
    num_res_blocks: int = 2  # resnets per level going down (one more per level going up)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors whose levels have attention
    num_head_channels: int = 64  # width of one attention head (heads = level width // this)
    transformer_depth: int = 1  # transformer blocks per attention layer
    context_dim: int = 1024  # CLIP image embedding width (spatial and camera cross-attention)
    motion_context_dim: int = 4  # latent channels of the reference views (motion cross-attention)
    adm_in_channels: int = 1280  # vector y per image: sinusoids of cond_aug (256), polar (512), azimuth (512)
    time_kernel_size: tuple[int, int, int] = (3, 1, 1)  # kernel of the temporal resnets' Conv3d (frames, h, w)
    merge_factor: float = 0.0  # initial logit of every learned spatial / temporal blend (weights overwrite it)
    extra_ff_mix_layer: bool = True  # camera / motion blocks start with a feed-forward (``ff_in``)
    max_time_embed_period: int = 10000  # longest period of the view / frame index sinusoids
    use_camera_emb: bool = False  # per-view embedding from the UNet's embedding, not the view index (SV4D 2.0)
    use_3d_attention: bool = False  # camera attention rows laid out (sequence, view, pixel) x frames (SV4D 2.0)
    separate_motion_merge_factor: bool = False  # the motion attention has its own learned blend (SV4D 2.0)
    attention_max_batch: int = 32768  # attention batches above this many sequences run in pieces (same result)

    def __post_init__(self) -> None:
        widths = [self.model_channels * m for m in self.channel_mult]
        if any(w % 32 for w in widths):
            raise ValueError(f"SV4DUNetConfig: level widths {widths} must be multiples of 32 (GroupNorm of 32 groups)")
        if any(w % self.num_head_channels for w in widths):
            raise ValueError(f"SV4DUNetConfig: level widths {widths} must be multiples of num_head_channels "
                             f"{self.num_head_channels}")
        if self.use_camera_emb and self.adm_in_channels != 4 * self.model_channels:
            raise ValueError(
                f"SV4DUNetConfig: use_camera_emb feeds the UNet's embedding ({4 * self.model_channels} wide) to a "
                f"layer sgm builds adm_in_channels ({self.adm_in_channels}) wide; set adm_in_channels = "
                f"4 * model_channels")


SV4D_UNET_CONFIG = SV4DUNetConfig()
"""SV4D (scripts/sampling/configs/sv4d.yaml: 5 frames x 8 views per call)."""

SV4D2_UNET_CONFIG = SV4DUNetConfig(use_camera_emb=True, use_3d_attention=True, separate_motion_merge_factor=True)
"""SV4D 2.0 (scripts/sampling/configs/sv4d2.yaml: 12 frames x 4 views per call)."""

SV4D2_8VIEWS_UNET_CONFIG = replace(SV4D2_UNET_CONFIG, use_3d_attention=False)
"""SV4D 2.0, 8 views (scripts/sampling/configs/sv4d2_8views.yaml: 5 frames x 8 views per call)."""

SV4D_CONFIGS: dict[str, SV4DUNetConfig] = {"sv4d": SV4D_UNET_CONFIG, "sv4d2": SV4D2_UNET_CONFIG,
                                           "sv4d2_8views": SV4D2_8VIEWS_UNET_CONFIG}

# version -> (Hugging Face repo, file)
SV4D_CHECKPOINTS: dict[str, tuple[str, str]] = {"sv4d": ("stabilityai/sv4d", "sv4d.safetensors"),
                                                "sv4d2": ("stabilityai/sv4d2.0", "sv4d2.safetensors"),
                                                "sv4d2_8views": ("stabilityai/sv4d2.0", "sv4d2_8views.safetensors")}


def tiny_sv4d_unet_config(version: SV4DVersion = "sv4d", **overrides) -> SV4DUNetConfig:
    """A tiny UNet (0.8 M parameters) with ``version``'s flags, for tests: widths 32, two levels, heads of 16."""
    base = dict(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_resolutions=(1,),
                num_head_channels=16, context_dim=32, adm_in_channels=128)
    flags = {k: getattr(SV4D_CONFIGS[version], k)
             for k in ("use_camera_emb", "use_3d_attention", "separate_motion_merge_factor")}
    return SV4DUNetConfig(**{**base, **flags, **overrides})


class _Stage(nn.Sequential):
    """One entry of sgm's ``input_blocks`` / ``middle_block`` / ``output_blocks`` (its ``TimestepEmbedSequential``)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, cond_view: Tensor,  # type: ignore[override]
                num_frames: int) -> Tensor:
        for layer in self:
            if isinstance(layer, TemporalResBlock):
                x = layer(x, emb, num_frames)
            elif isinstance(layer, MotionTransformer):
                x = layer(x, context, emb, cond_view)
            else:
                x = layer(x)
        return x


class SV4DUNet(nn.Module):
    """SV4D / SV4D 2.0's UNet: ``x [B T V, 8, h, w]`` -> ``[B T V, 4, h, w]`` (sgm's ``SpatialUNetModelWithTime``)."""

    def __init__(self, config: SV4DUNetConfig = SV4D_UNET_CONFIG) -> None:
        super().__init__()
        cfg = self.config = config
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels

        def resblock(ch_in: int, ch_out: int) -> TemporalResBlock:
            return TemporalResBlock(ch_in, emb_dim, ch_out, cfg.time_kernel_size, cfg.merge_factor)

        def attention(ch: int) -> MotionTransformer:
            return MotionTransformer(
                ch, ch // cfg.num_head_channels, cfg.num_head_channels, cfg.transformer_depth, cfg.context_dim,
                cfg.motion_context_dim, emb_dim, cfg.extra_ff_mix_layer, cfg.merge_factor, cfg.use_camera_emb,
                cfg.use_3d_attention, cfg.separate_motion_merge_factor, cfg.max_time_embed_period,
                cfg.attention_max_batch)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Sequential(
            nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([_Stage(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_widths, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(_Stage(*layers))
                skip_widths.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(_Stage(Downsample(ch)))
                skip_widths.append(ch)
                ds *= 2
        self.middle_block = _Stage(resblock(ch, ch), attention(ch), resblock(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [resblock(ch + skip_widths.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Stage(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(
        self,
        x: Tensor,  # [B T V, in_channels, h, w] noisy latents (scaled by c_in) + motion-frame latents, (B, T, V) order
        timesteps: Tensor,  # [B T V] noise conditioning (c_noise)
        context: Tensor | None = None,  # [B, T, context_dim] CLIP embedding of each motion frame
        y: Tensor | None = None,  # [B T V, adm_in_channels] per-image vector (cond_aug, polar, azimuth sinusoids)
        cam: Tensor | None = None,  # unused: sgm hands the attention layers its own embedding in this slot
        time_context: Tensor | None = None,  # unused by this network (as in sgm)
        num_video_frames: int | None = None,  # images per sequence for the temporal resnets (default T * V)
        image_only_indicator: Tensor | None = None,  # [B, T V] unused: sgm zeroes it before every blend
        cond_view: Tensor | None = None,  # [B V, motion_context_dim, h, w] latents of the reference views
        cond_motion: Tensor | None = None,  # [B T, 4, h, w] unused by this network (as in sgm)
        time_step: int | None = None,  # unused (sgm's debugging hook)
    ) -> Tensor:
        """The denoiser's raw output ``[B T V, out_channels, h, w]`` (sgm's argument names and layouts)."""
        n = x.shape[0]
        if context is None or y is None or cond_view is None:
            missing = [k for k, val in (("context", context), ("y", y), ("cond_view", cond_view)) if val is None]
            raise ValueError(f"SV4DUNet needs {', '.join(missing)}: pass the conditioner's crossattn, vector and "
                             f"cond_view")
        b, t = context.shape[:2]
        if cond_view.shape[0] % b:
            raise ValueError(f"cond_view has {cond_view.shape[0]} rows, not a multiple of context's batch {b}")
        v = cond_view.shape[0] // b
        if n != b * t * v or y.shape[0] != n or timesteps.shape != (n,):
            raise ValueError(f"SV4DUNet: x {tuple(x.shape)}, y {tuple(y.shape)} and timesteps {tuple(timesteps.shape)} "
                             f"need B*T*V = {b}*{t}*{v} = {b * t * v} rows (B, T from context, V from cond_view)")
        frames = num_video_frames or t * v
        if n % frames:
            raise ValueError(f"num_video_frames {frames} does not divide the {n} images of x")
        dtype = self.out[-1].weight.dtype
        emb = self.time_embed(sinusoidal_embedding(timesteps, self.config.model_channels).to(dtype))
        emb = emb + self.label_emb(y.to(dtype))  # [N, 4 model_channels]
        context, cond_view = context.to(dtype), cond_view.to(dtype)

        h, skips = x.to(dtype), []
        for stage in self.input_blocks:
            h = stage(h, emb, context, cond_view, frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, cond_view, frames)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, context, cond_view, frames)
        return self.out(h).to(x.dtype)


# ---------------------------------------------------------------------------------------
# Stability's checkpoint layout
# ---------------------------------------------------------------------------------------

def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def convert_sgm_sv4d_state_dict(sd: dict[str, Tensor], unet: SV4DUNet,
                                prefix: str = SGM_UNET_PREFIX) -> dict[str, Tensor]:
    """Stability checkpoint (keys under ``prefix``) -> state dict of ``unet``; refuses any mismatch.

    Keys outside ``prefix`` (conditioner, first stage) are ignored. Under it, a key the UNet
    does not have, a UNet key the checkpoint lacks, or a shape that differs raises a KeyError
    naming them (loading an SV4D checkpoint into an SV4D 2.0 config shows as both).
    """
    ours = unet.state_dict()
    out = {k[len(prefix):]: val for k, val in sd.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no key starts with {prefix!r}: is this a Stability SV4D / SV4D 2.0 checkpoint?")
    unknown = sorted(k for k in out if k not in ours)
    missing = sorted(k for k in ours if k not in out)
    shapes = sorted(f"{k} {tuple(out[k].shape)} vs {tuple(ours[k].shape)}" for k in out
                    if k in ours and out[k].shape != ours[k].shape)
    if unknown or missing or shapes:
        problems = [f"unknown keys: {_listing([prefix + k for k in unknown])}" if unknown else "",
                    f"missing keys: {_listing([prefix + k for k in missing])}" if missing else "",
                    f"shape mismatches (checkpoint vs UNet): {_listing(shapes)}" if shapes else ""]
        hint = ("the checkpoint has SV4D 2.0's time_mixer_motion: load it as version 'sv4d2' or 'sv4d2_8views'"
                if any("time_mixer_motion" in k for k in unknown) else
                "the checkpoint lacks SV4D 2.0's time_mixer_motion: load it as version 'sv4d'"
                if any("time_mixer_motion" in k for k in missing) else "check the config against the checkpoint")
        raise KeyError("checkpoint does not match SV4DUNet(" + str(unet.config) + "): "
                       + "; ".join(p for p in problems if p) + f" ({hint})")
    return out


def to_sgm_sv4d_state_dict(unet: SV4DUNet, prefix: str = SGM_UNET_PREFIX) -> dict[str, Tensor]:
    """The UNet's weights under Stability's key layout (inverse of :func:`convert_sgm_sv4d_state_dict`)."""
    return {prefix + k: val for k, val in unet.state_dict().items()}


def _read_unet_tensors(ckpt: str | os.PathLike | dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The checkpoint's tensors under ``prefix`` (a safetensors file is read for those keys only)."""
    if isinstance(ckpt, dict):
        return ckpt
    path = Path(ckpt).expanduser()
    if path.suffix != ".safetensors":
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return sd.get("state_dict", sd)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def load_sv4d_unet(ckpt: str | os.PathLike | dict[str, Tensor], version: SV4DVersion,
                   dtype: torch.dtype = torch.float32, config: SV4DUNetConfig | None = None,
                   prefix: str = SGM_UNET_PREFIX) -> SV4DUNet:
    """SV4D / SV4D 2.0's UNet from Stability's checkpoint (a path or a state dict), loaded with ``strict=True``.

    ``config`` overrides the version's full-size config (tests use tiny ones).
    """
    if version not in SV4D_CONFIGS:
        raise ValueError(f"version must be one of {sorted(SV4D_CONFIGS)}, got {version!r}")
    if not isinstance(ckpt, dict) and not Path(ckpt).expanduser().is_file():
        raise _missing(version, f"no file at {ckpt}")
    sd = _read_unet_tensors(ckpt, prefix)
    with torch.device("meta"):
        unet = SV4DUNet(config or SV4D_CONFIGS[version])
    unet.load_state_dict(convert_sgm_sv4d_state_dict(sd, unet, prefix), strict=True, assign=True)
    return unet.to(dtype).eval()


def _howto(version: str) -> str:
    repo, name = SV4D_CHECKPOINTS[version]
    return (f"Obtain {name} (gated: accept the licence at https://huggingface.co/{repo} first) with\n"
            f"  huggingface-cli download {repo} {name}\n"
            f"then leave it in the Hugging Face cache, or add --local-dir <dir> and pass <dir>/{name}.")


def _missing(version: str, looked: str) -> Exception:
    from d2.stages.priors.base import MissingWeightsError

    repo, name = SV4D_CHECKPOINTS[version]
    return MissingWeightsError(f"{version} UNet: missing file {name} of {repo}; {looked}.\n{_howto(version)}")


def find_sv4d_checkpoint(version: SV4DVersion, cache_dir: str | os.PathLike | None = None) -> Path:
    """The version's checkpoint in the local Hugging Face cache (never downloads); MissingWeightsError if absent."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    if version not in SV4D_CHECKPOINTS:
        raise ValueError(f"version must be one of {sorted(SV4D_CHECKPOINTS)}, got {version!r}")
    repo, name = SV4D_CHECKPOINTS[version]
    found = try_to_load_from_cache(repo, name, cache_dir=None if cache_dir is None else str(cache_dir))
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    raise _missing(version, f"not in the Hugging Face cache at {cache_dir or HF_HUB_CACHE}")

