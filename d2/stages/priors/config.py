"""The priors' configuration: the backend of each family, how the UNets run, the tiny and
Gaussian backends' sizes. Bad values fail here, as pydantic errors of one line each that name
the knob, its value, the allowed range and why."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from d2.stages.unet_runtime import CUDA_GRID_LIMIT

Backend = Literal["gaussian", "tiny", "mini", "svd", "sv3d_p", "stability"]
BACKENDS: tuple[str, ...] = get_args(Backend)
"""The priors backends (:func:`d2.stages.priors.build_prior` builds each):

    gaussian   analytic prior: data ~ a known Gaussian, D in closed form (proves the sampler)
    tiny       both families from tiny configs with seeded random weights (tests, CPU runs)
    mini       the miniature priors trained on the procedural world (``data/priors``; CPU demo)
    svd        video: SVD-XT in diffusers layout (``video_path`` or the Hugging Face cache)
    sv3d_p     multi-view: Stability's ``sv3d_p.safetensors`` (``multiview_path``), converted
    stability  video -> svd, multi-view -> sv3d_p (the paper's pair)
"""

SVD_XT_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
SEED_MAX = 2**63 - 2  # torch.Generator.manual_seed takes 64-bit seeds; the multi-view prior uses seed + 1


def _outside(key: str, value: int, lo: int, hi: int, why: str) -> int:
    """``value`` when it is in [lo, hi]; else ValueError naming the knob, value, range and why."""
    if not lo <= value <= hi:
        raise ValueError(f"{key} = {value!r} is outside [{lo}, {hi}]: {why}")
    return value


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

    @field_validator("block_out_channels", "vae_block_out_channels")
    @classmethod
    def _groupnorm_widths(cls, widths: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        if not widths or any(c <= 0 or c % 32 for c in widths):
            raise ValueError(f"priors.tiny.{info.field_name} = {list(widths)}: every width must be a positive "
                             "multiple of 32 (GroupNorm with 32 groups)")
        return widths

    @field_validator("layers_per_block", "num_attention_heads", "clip_layers", "cross_attention_dim",
                     "addition_time_embed_dim")
    @classmethod
    def _at_least_one(cls, v: int, info: ValidationInfo) -> int:
        if v < 1:
            raise ValueError(f"priors.tiny.{info.field_name} = {v} must be >= 1: a network needs one of each")
        return v

    @field_validator("clip_image_size")
    @classmethod
    def _whole_patches(cls, v: int) -> int:
        if v < 8 or v % 8:
            raise ValueError(f"priors.tiny.clip_image_size = {v} must be a positive multiple of 8 (the CLIP patch)")
        return v

    @field_validator("clip_hidden_size")
    @classmethod
    def _two_heads(cls, v: int) -> int:
        if v < 2 or v % 2:
            raise ValueError(f"priors.tiny.clip_hidden_size = {v} must be a positive multiple of 2 (the CLIP heads)")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        return _outside("priors.tiny.seed", v, 0, SEED_MAX, "seeds are non-negative 64-bit integers (seed + 1 "
                        "is used too)")

    @model_validator(mode="after")
    def _resolution_divides(self) -> "TinyPriorConfig":
        factor = 2 ** (len(self.block_out_channels) - 1) * (2 ** (len(self.vae_block_out_channels) - 1)
                                                            if self.vae else 1)
        if self.resolution <= 0 or self.resolution % factor:
            raise ValueError(f"priors.tiny.resolution = {self.resolution} must be a positive multiple of {factor} "
                             "(the VAE and UNet downsampling)")
        return self


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
    backend: Backend = "tiny"  # backend name used for both families unless overridden below
    video_backend: Backend | None = None  # override for the video family (e.g. "svd", "mini")
    multiview_backend: Backend | None = None  # override for the multi-view family (e.g. "sv3d_p", "mini")
    video_path: str | None = None  # video weights: diffusers-layout / d2 prior folder (svd, mini)
    multiview_path: str | None = None  # multi-view weights: sv3d_p.safetensors file or d2 prior folder
    sv4d_path: str | None = None  # SV4D / SV4D 2.0 checkpoint (sampling.method sv4d*: sv4d.safetensors, sv4d2.safetensors, ...); None: the Hugging Face cache
    components_path: str | None = None  # folder with vae/ image_encoder/ feature_extractor/ for sv3d_p (default: SVD-XT)
    hf_repo_id: str = SVD_XT_REPO  # Hugging Face repo searched in the local cache when video_path is unset
    hf_cache_dir: str | None = None  # Hugging Face cache dir (default: HF_HUB_CACHE / ~/.cache/huggingface/hub)
    device: str = "cpu"  # torch device of the models
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights / activations dtype (x stays fp32)
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"  # preferred attention kernel (d2/stages/unet_runtime.py)
    attention_max_batch: int = 32767  # attention sequences per kernel call (CUDA grid limit 65535)
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

    @field_validator("backend", "video_backend", "multiview_backend", mode="before")
    @classmethod
    def _known_backend(cls, v: object, info: ValidationInfo) -> object:
        if v is not None and v not in BACKENDS:
            raise ValueError(f"priors.{info.field_name} = {v!r} is not a priors backend; known: {', '.join(BACKENDS)}")
        return v

    @field_validator("attention_max_batch")
    @classmethod
    def _cuda_grid(cls, v: int) -> int:
        return _outside("priors.attention_max_batch", v, 1, CUDA_GRID_LIMIT, "CUDA launches at most 65535 blocks "
                        "per grid dimension")
