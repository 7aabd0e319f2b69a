"""SV4D and SV4D 2.0 (Stability AI) as matrix samplers: their scripts' sampling loops on our V x F matrix.

Stability's ``scripts/sampling/simple_video_sample_4d.py`` (SV4D) and ``simple_video_sample_4d2.py``
(SV4D 2.0, two checkpoints: 4 views x 12 frames and 8 views x 5 frames per window) sample a
matrix of novel-view videos window by window with one multi-view video network. This module
runs the same loops with injected components (:class:`SV4DComponents`): the network (any module
with the forward signature of sgm's ``SpatialUNetModelWithTime``), the first stage (VAE encoder
of the conditioner, per-image decoder) and the CLIP image embedder.

One window (both loops). The network denoises ``N = T * Vw`` latents at once (T frames x Vw novel
views, frame-major: sample ``n = t * Vw + v``) with ``num_video_frames = N`` and, per conditioner
call (sgm's ``GeneralConditioner`` in the scripts' configs, embedders in this order):

    crossattn    [1, T, D]        CLIP of the window's T input frames (cond_frames_without_noise)
    concat       [N, C, h, w]     VAE latent (mode, unscaled) of input frame t, one noised copy per
                                  sample (cond_frames: each frame repeated Vw times)
    vector       [N, 256+512+512] sinusoidal embeddings of the encoder's noise level, the polar and
                                  the azimuth of the sample's view (sgm ``timestep_embedding``)
    cond_view    [Vw, C, h, w]    VAE latents of the window's Vw reference views
    cond_motion  [T, C, h, w]     VAE latents of the window's T input frames

The three VAE inputs go through sgm's ``ZeroSampler`` (noise level 1e-5): the images get
``1e-5 * N(0, 1)`` before encoding, and the 256-wide slot of the vector embeds that 1e-5. This
is the whole cond_aug of both scripts (their ``run_img2vid`` sets ``cond_aug = 0``; SV4D's
``--cond_aug 1e-5`` only reaches SV3D, which here is the conditions stage). The unconditional
branch zeroes every one of these but the polar and azimuth embeddings. The guider doubles the
batch ``[uc; c]``; ``image_only_indicator`` is ``[2, N]`` of 1 (0 in SV4D 2.0's first window,
whose ``cond_view`` is zeroed in both branches: no reference views exist yet). SV4D 2.0's camera
embedding needs no input of its own: its network feeds its time-plus-vector embedding to the
camera attention (the ``cam`` argument of sgm's attention blocks receives ``emb``), so the vector
above is all it gets. Denoiser: ``VScalingWithEDMcNoise`` (:func:`d2.stages.priors.edm_coefficients`);
sampler: sgm's ``EulerEDMSampler`` with ``s_churn = 0``, i.e. plain Euler (:func:`d2.stages.edm.edm_sample`)
on EDM sigmas (0.002, 700, rho 7: the scripts' ``version_dict``; the configs' yaml sampler is
not what the scripts run; :func:`d2.stages.schedules.karras_sigmas`, float64 where sgm's are
float32). Guider scale per sample ``n = (t, v)``:

    spatiotemporal (SV4D, SV4D 2.0 8 views)  min + (max - min) * (t / (T-1) / 2 + tri(v / (Vw-1)) / 2),
                                             tri(x) = 2 |x - round(x)| (0 at the first and last
                                             view, largest half-way: the views behind the object)
    linear (SV4D 2.0 4 views)                linspace(min, max, N) over the flattened samples; the
                                             script's ``min_cfg: 2.0`` does not reach this guider
                                             (sgm's ``get_guider_no_st`` passes it to the
                                             spatiotemporal one only), so min = 1

SV4D loop (``loop="sv4d"``, T = 5, Vw = 8, F = 21). Anchor frames 4, 8, ..., 20 are sampled in one
window conditioned on the reference views at frame 0. Then 5 dense windows start at frames 0,
4, ..., 16 (T frames each, consecutive windows share one frame); each draws fresh noise and
alternates, per step, between the window backwards (even steps, from step 0: frames t0+4 ... t0,
reference views = the anchor views at t0 + 4) and forwards (odd steps: reference views at t0 =
the reference orbit for t0 = 0, otherwise the previous window's decoded last frame), on one state.
A later window overwrites the shared frame.

SV4D 2.0 loop (``loop="sv4d2"``). Windows of T frames start every ``window_stride`` frames; each is
sampled with the full sampler, conditioned on its frame t0's views as decoded from the previous
window (none for the first). Without overlap (stride = T, 4 views) the last window is moved back
to end at the last frame (the script's clamp), re-sampling the frames it shares; with overlap
(stride = T - 1, 8 views) the windows must tile F exactly.

Layouts. The scripts' matrix ``img_matrix[t][v]`` has the input view at v = 0 and novel views
1..Vw in the order of their azimuths; ours has row v at ``azimuths_deg[v]`` measured from the
input view, the input view last (``azimuths_deg[-1] = 360``, SV3D_p order,
:func:`d2.stages.cameras.orbit_azimuths`). Mapped as:

    our row v < V-1   = the script's view v + 1; the network gets azimuth ``azimuths_deg[v] mod 360``
                        in radians (the scripts' azimuths are relative to the input view too)
    our row V-1       = the script's view 0 (the input video, never sampled): the scaled VAE
                        latents of the input frames
    V                 must be Vw + 1 (9 for SV4D and SV4D 2.0 8 views, 5 for SV4D 2.0 4 views)
    F                 SV4D: exactly 21 (T anchors at multiples of T - 1); SV4D 2.0: >= T, tiled as
                      above
    polar             SV4D: 90 deg - elevation of each view; SV4D 2.0: relative to the input
                      view's, plus 90 deg (the script's ``polars - polars_rad[v0] + pi/2``)
    SV4D's references SV4D's script samples 21 SV3D views at k * 360/21 deg (SV3D_u by default,
                      SV3D_p with ``--sv3d_version sv3d_p``) and keeps the 8 nearest to 40 deg steps
                      (k = 2, 5, 7, 9, 12, 14, 16, 19); here they are the conditions stage's
                      reference orbit (SV3D_p) at our azimuths, so with our uniform orbit (V = 9)
                      the views are at 40, 80, ..., 320 deg, up to 5.7 deg from the script's;
                      passing the script's azimuths reproduces its cameras exactly
    SV4D 2.0 azimuths the scripts' defaults are 60, 120, 180, 240 (4 views) and 30, 75, ..., 330
                      (8 views), leaving part of the circle unseen; their ``--azimuths_deg`` takes
                      any, and our uniform orbit is one such choice
    input video       the scripts' ``preprocess_video`` (one box over all frames, the object at
                      ``image_frame_ratio`` 0.917 (SV4D) / 0.9 (SV4D 2.0) of the side, white
                      background, 576 px) is the conditions stage's (``video_framing: fraction``,
                      ``video_box: union``, ``object_fraction``)
    output            the scripts decode per window and keep images; we return the latents (the
                      decoder runs only where a later window is conditioned on its images);
                      decode them per image (the scripts' first stage is a per-image decoder)

Randomness: one CPU generator seeded with ``seed`` makes the scripts' draws in their order and
shapes: per conditioner call (two per window condition, c then uc) ``[1]`` + the cond_frames
noise, ``[1]`` + the cond_view noise, ``[1]`` + the cond_motion noise; the initial latents
(SV4D dense windows: a whole ``[F, V, C, h, w]`` matrix of which the window is used, as the
script does). The scripts seed torch's global generator earlier (model construction and, for
SV4D, SV3D sampling draw from it first; on CUDA the image-space noise comes from the CUDA
generator), so the same seed does not give the scripts' bits with real weights. The scripts run
the network in float16 under autocast; here it runs in the network's own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from d2.stages.edm import edm_sample
from d2.stages.priors import Prior, edm_coefficients
from d2.stages.schedules import FP32_MAX_SIGMA, SEED_MAX, karras_problem, karras_sigmas

ZERO_SAMPLER_SIGMA = 1e-5  # sgm's ZeroSampler: the noise level of the conditioner's VAE inputs
SGM_VECTOR_WIDTHS = (256, 512, 512)  # SV4D configs: ConcatTimestepEmbedderND widths (noise level, polar, azimuth)
SGM_SCALE_FACTOR = 0.18215  # first-stage latents -> diffusion space (SV4D configs' scale_factor)


class SV4DSamplingConfig(BaseModel):
    """Knobs of the SV4D / SV4D 2.0 loops; defaults are SV4D's script (see :meth:`sv4d2`, :meth:`sv4d2_8views`)."""

    model_config = ConfigDict(extra="forbid")
    loop: Literal["sv4d", "sv4d2"] = "sv4d"  # sv4d: anchor frames, then dense windows alternating backward / forward per step; sv4d2: sliding windows
    frames_per_window: int = Field(5, ge=2)  # T: frames per network call (the configs' N_TIME)
    views_per_window: int = Field(8, ge=2)  # Vw: novel views per network call (N_VIEW); the matrix has Vw + 1 views (the input view)
    window_stride: int | None = Field(None, ge=1)  # sv4d2 loop: frames between window starts (None: T, the 4-view script; the 8-view script: T - 1); the sv4d loop steps T - 1
    num_steps: int = Field(20, ge=1)  # Euler steps per sampled window (SV4D script 20; SV4D 2.0 script 50)
    sigma_min: float = Field(0.002, gt=0)  # smallest EDM sigma before the final 0 (both scripts)
    sigma_max: float = Field(700.0, gt=0, le=FP32_MAX_SIGMA)  # largest EDM sigma (both scripts' version_dict; not the yaml's 500)
    rho: float = Field(7.0, gt=0)  # EDM rho (both scripts)
    guider: Literal["spatiotemporal", "linear"] = "spatiotemporal"  # CFG scale over the window's samples (SV4D and 8 views: spatiotemporal; 4 views: linear)
    cfg_max: float = 2.0  # guider max scale (scripts' cfg: SV4D 2.0, 4 views 2.0, 8 views 2.5)
    cfg_min: float = 1.0  # guider min scale (8 views' min_cfg 1.5; the linear guider gets 1.0 whatever min_cfg says)
    seed: int = Field(23, ge=0, le=SEED_MAX)  # seed of the one generator of all draws (scripts: 23)

    @model_validator(mode="after")
    def _consistent(self) -> "SV4DSamplingConfig":
        problem = karras_problem("sv4d", self.sigma_min, self.sigma_max, self.rho)
        if problem:
            raise ValueError(problem)
        if self.loop == "sv4d" and self.window_stride is not None:
            raise ValueError("sv4d.window_stride is for the sv4d2 loop; the sv4d loop's anchors and windows step "
                             "frames_per_window - 1: remove window_stride")
        if self.window_stride is not None and self.window_stride > self.frames_per_window:
            raise ValueError(f"sv4d.window_stride = {self.window_stride} > frames_per_window = "
                             f"{self.frames_per_window} would skip frames; use at most {self.frames_per_window}")
        return self

    @classmethod
    def sv4d2(cls, **overrides) -> "SV4DSamplingConfig":
        """SV4D 2.0's script with ``sv4d2.safetensors``: 4 views x 12 frames, linear guider 1 -> 2, 50 steps."""
        return cls(**{**dict(loop="sv4d2", frames_per_window=12, views_per_window=4, window_stride=12, num_steps=50,
                             guider="linear", cfg_max=2.0, cfg_min=1.0), **overrides})

    @classmethod
    def sv4d2_8views(cls, **overrides) -> "SV4DSamplingConfig":
        """SV4D 2.0's script with ``sv4d2_8views.safetensors``: 8 views x 5 frames every 4, spatiotemporal 1.5 -> 2.5."""
        return cls(**{**dict(loop="sv4d2", frames_per_window=5, views_per_window=8, window_stride=4, num_steps=50,
                             guider="spatiotemporal", cfg_max=2.5, cfg_min=1.5), **overrides})

    @property
    def stride(self) -> int:
        """Frames between window starts (sv4d: T - 1)."""
        if self.loop == "sv4d" or self.window_stride is None:
            return self.frames_per_window - (1 if self.loop == "sv4d" else 0)
        return self.window_stride


@dataclass
class SV4DComponents:
    """What the loops call besides the sampler: the network, the first stage and CLIP (images in [-1, 1])."""

    network: nn.Module  # sgm SpatialUNetModelWithTime.forward(x, timesteps, context, y, ..., num_video_frames, image_only_indicator, cond_view, cond_motion)
    encode: Callable[[Tensor], Tensor]  # images [N, 3, H, W] in [-1, 1] -> VAE latent mode [N, C, h, w], unscaled
    decode: Callable[[Tensor], Tensor]  # diffusion-space latents [N, C, h, w] -> images [N, 3, H, W] in [-1, 1], each on its own
    clip: Callable[[Tensor], Tensor]  # images [N, 3, H, W] in [-1, 1] -> CLIP image embeddings [N, D] (or [N, 1, D])
    scale_factor: float = SGM_SCALE_FACTOR  # diffusion-space latent = scale_factor * VAE latent
    vector_widths: tuple[int, int, int] = SGM_VECTOR_WIDTHS  # sinusoid widths of (noise level, polar, azimuth) in y


def components_from_prior(prior: Prior, network: nn.Module,
                          vector_widths: tuple[int, int, int] = SGM_VECTOR_WIDTHS) -> SV4DComponents:
    """:class:`SV4DComponents` from a multi-view prior's VAE, per-image decoder and CLIP (SV4D shares SV3D_p's)."""
    if prior.image_decoder is None and prior.vae_scale_factor != 1:
        raise ValueError(f"the prior {prior.name!r} has no per-image decoder; SV4D decodes every view on its own "
                         "(SV3D_p's first stage)")
    s = prior.scaling_factor
    return SV4DComponents(
        network=network,
        encode=lambda x: prior.encode((x + 1) / 2) / s,
        decode=lambda z: prior.decode(z, decoder="image") * 2 - 1,
        clip=lambda x: prior.clip_embed((x + 1) / 2),
        scale_factor=s, vector_widths=vector_widths)


# ---------------------------------------------------------------------------------------
# layout: windows, anchors, cameras, guider scales
# ---------------------------------------------------------------------------------------


def check_matrix_shape(cfg: SV4DSamplingConfig, num_views: int, num_frames: int) -> None:
    """ValueError (one line, naming the knobs) unless the loop fills a ``num_views`` x ``num_frames`` matrix."""
    t, vw = cfg.frames_per_window, cfg.views_per_window
    if num_views != vw + 1:
        raise ValueError(f"{cfg.loop} samples {vw} novel views around the input view: conditions.num_views (and "
                         f"sampling.num_views) must be {vw + 1}, got {num_views}")
    if cfg.loop == "sv4d":
        need = t * (t - 1) + 1
        if num_frames != need:
            raise ValueError(f"sv4d samples {need} frames ({t} anchor frames every {t - 1}, then windows of {t}): "
                             f"conditions.num_frames (and sampling.num_frames) must be {need}, got {num_frames}")
        return
    if num_frames < t:
        raise ValueError(f"sv4d2 samples windows of {t} frames: conditions.num_frames must be >= {t}, got {num_frames}")
    if cfg.stride < t and (num_frames - t) % cfg.stride:
        lo = t + (num_frames - t) // cfg.stride * cfg.stride
        raise ValueError(f"sv4d2 windows of {t} frames every {cfg.stride} cover {t} + {cfg.stride} k frames; "
                         f"conditions.num_frames = {num_frames} leaves the last frames unsampled (as Stability's "
                         f"script does): use {lo} or {lo + cfg.stride}")


def window_plan(cfg: SV4DSamplingConfig, num_frames: int) -> dict[str, list]:
    """``{"anchors": [...], "windows": [[frames], ...]}`` in sampling order (anchors empty for sv4d2)."""
    t, stride = cfg.frames_per_window, cfg.stride
    if cfg.loop == "sv4d":
        anchors = list(range(t - 1, num_frames, t - 1))
        starts = list(range(0, num_frames - 1, t - 1))
    else:
        anchors = []
        starts = [min(s, num_frames - t) for s in range(0, num_frames, stride)] if stride == t else \
            list(range(0, num_frames - t + 1, stride))
    return {"anchors": anchors, "windows": [list(range(s, s + t)) for s in starts]}


def model_cameras(cfg: SV4DSamplingConfig, azimuths_deg: Sequence[float],
                  elevations_deg: float | Sequence[float]) -> tuple[Tensor, Tensor]:
    """(polars_rad, azimuths_rad) [Vw] float64 the network gets for our rows 0..V-2 (see the module docstring)."""
    v = len(azimuths_deg)
    elev = ([float(elevations_deg)] * v if isinstance(elevations_deg, (int, float))
            else [float(e) for e in elevations_deg])
    if len(elev) != v:
        raise ValueError(f"elevations_deg has {len(elev)} values for {v} views")
    if abs(math.remainder(float(azimuths_deg[-1]), 360.0)) > 1e-6:
        raise ValueError(f"the input view must be the last orbit view (azimuth 360, SV3D_p order); got "
                         f"azimuths_deg[-1] = {azimuths_deg[-1]}")
    polar = torch.tensor([math.radians(90.0 - e) for e in elev], dtype=torch.float64)
    azim = torch.tensor([math.radians(float(a) % 360.0) for a in azimuths_deg[:-1]], dtype=torch.float64)
    if cfg.loop == "sv4d2":  # relative to the input view's polar, plus 90 deg
        polar = (polar - polar[-1] + math.pi / 2) % (2 * math.pi)
    return polar[:-1], azim


def guider_scales(cfg: SV4DSamplingConfig) -> Tensor:
    """CFG scale per window sample, frame-major (n = t * Vw + v): [T * Vw] float32."""
    t, vw = cfg.frames_per_window, cfg.views_per_window
    if cfg.guider == "linear":
        return torch.linspace(1.0, cfg.cfg_max, t * vw)  # the scripts pass min_cfg to the spatiotemporal guider only
    x = torch.linspace(0, 1, vw)
    tri = 2 * (x - torch.floor(x + 0.5)).abs()
    s = torch.linspace(0, 1, t)[:, None] * 0.5 + tri[None, :] * 0.5
    return (s.flatten() * (cfg.cfg_max - cfg.cfg_min) + cfg.cfg_min).float()


# ---------------------------------------------------------------------------------------
# conditioning of one window
# ---------------------------------------------------------------------------------------


def sinusoid(x: Tensor, width: int) -> Tensor:
    """sgm's ``timestep_embedding`` (cos then sin, max period 10000): [N] -> [N, width] float32."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(x, width, flip_sin_to_cos=True, downscale_freq_shift=0)


@dataclass
class WindowCondition:
    """The guider's two branches of one window (``c``: conditional, ``uc``: unconditional)."""

    c: dict[str, Tensor]  # crossattn [1, T, D], concat [N, C, h, w], vector [N, W], cond_view [Vw, C, h, w], cond_motion [T, C, h, w]
    uc: dict[str, Tensor]  # the same keys and shapes: zeros but the polar / azimuth part of vector
    image_only_indicator: float  # 1 (0 for SV4D 2.0's first window)


def _noised(images: Tensor, generator: torch.Generator) -> Tensor:
    """sgm's VideoPredictionEmbedderWithEncoder with a ZeroSampler: draw its noise level, add 1e-5 N(0, 1)."""
    torch.randn((1,), generator=generator)  # ZeroSampler draws a level it then replaces by 1e-5
    noise = torch.randn(images.shape, generator=generator, dtype=torch.float32).to(images.device, images.dtype)
    return images + noise * ZERO_SAMPLER_SIGMA


def window_condition(frames: Tensor, views: Tensor | None, polars_rad: Tensor, azimuths_rad: Tensor,
                     comps: SV4DComponents, generator: torch.Generator, multiview: bool = True) -> WindowCondition:
    """Conditioning of one window: ``frames`` [T, 3, H, W] (input view, in window order) and reference ``views``
    [Vw, 3, H, W] (None: zeros), both in [-1, 1]; cameras [Vw] (radians) of the novel views.

    Draws from ``generator`` what sgm's conditioner draws, twice (c, then uc, whose draws are discarded).
    ``multiview=False`` zeroes cond_view in both branches (``image_only_indicator`` 0).
    """
    t, vw = frames.shape[0], polars_rad.shape[0]
    n = t * vw
    noised = []
    for _branch in ("c", "uc"):
        cond_frames = _noised(frames.repeat_interleave(vw, dim=0), generator)  # [N, 3, H, W], frame-major
        cond_view = _noised(views if views is not None else torch.zeros_like(frames[:1]).expand(vw, -1, -1, -1),
                            generator)
        cond_motion = _noised(frames, generator)
        noised.append((cond_frames, cond_view, cond_motion))
    cond_frames, cond_view, cond_motion = noised[0]
    concat = comps.encode(cond_frames).float()  # [N, C, h, w]
    motion = comps.encode(cond_motion).float()  # [T, C, h, w]
    if views is not None and multiview:
        view = comps.encode(cond_view).float()  # [Vw, C, h, w]
    else:  # SV4D 2.0's first window: the script encodes blank views, then zeroes them in both branches
        view = torch.zeros((vw, *motion.shape[1:]), device=motion.device)
    crossattn = comps.clip(frames).float().reshape(1, t, -1)  # [1, T, D]
    w_sigma, w_polar, w_azim = comps.vector_widths
    device = concat.device
    sigma_emb = sinusoid(torch.full((1,), ZERO_SAMPLER_SIGMA), w_sigma).repeat(n, 1)  # [N, w_sigma]
    cams = torch.cat([sinusoid(polars_rad.repeat(t), w_polar), sinusoid(azimuths_rad.repeat(t), w_azim)], dim=1)
    vector = torch.cat([sigma_emb, cams], dim=1).to(device)
    vector_uc = torch.cat([torch.zeros_like(sigma_emb), cams], dim=1).to(device)
    c = {"crossattn": crossattn, "concat": concat, "vector": vector, "cond_view": view, "cond_motion": motion}
    uc = {k: torch.zeros_like(v) for k, v in c.items()}
    uc["vector"] = vector_uc
    return WindowCondition(c=c, uc=uc, image_only_indicator=1.0 if multiview else 0.0)


def guided_denoise(network: nn.Module, x: Tensor, sigma: float, cond: WindowCondition, scale: Tensor) -> Tensor:
    """sgm's guided ``Denoiser`` of one window: x [N, C, h, w] -> D(x; sigma) [N, C, h, w] (uc and c in one call)."""
    n = x.shape[0]
    inp = torch.cat([x, x])
    s = torch.full((2 * n,), sigma, dtype=torch.float32, device=x.device)
    c_skip, c_out, c_in, c_noise = (a.view(-1, 1, 1, 1) for a in edm_coefficients(s))
    both = {k: torch.cat([cond.uc[k], cond.c[k]]) for k in cond.c}
    net_in = torch.cat([inp * c_in, both["concat"]], dim=1)
    dtype = next(network.parameters()).dtype
    out = network(net_in.to(dtype), timesteps=c_noise.reshape(-1), context=both["crossattn"].to(dtype),
                  y=both["vector"].to(dtype), num_video_frames=n,
                  image_only_indicator=torch.full((2, n), cond.image_only_indicator, device=x.device, dtype=dtype),
                  cond_view=both["cond_view"].to(dtype), cond_motion=both["cond_motion"].to(dtype)).float()
    d = out * c_out + inp * c_skip
    d_u, d_c = d.chunk(2)
    return d_u + scale.to(x.device).view(-1, 1, 1, 1) * (d_c - d_u)


# ---------------------------------------------------------------------------------------
# the loops
# ---------------------------------------------------------------------------------------


def sample_sv4d_matrix(video: Tensor, orbit: Tensor | None, azimuths_deg: Sequence[float],
                       elevation_deg: float | Sequence[float], comps: SV4DComponents, cfg: SV4DSamplingConfig,
                       progress: bool = False) -> tuple[Tensor, dict]:
    """The V x F latent matrix as Stability's SV4D (``cfg.loop="sv4d"``) or SV4D 2.0 script samples it.

    Args:
        video: [F, 3, H, W] in [0, 1], the input video (our conditions' reference video).
        orbit: [V, 3, H, W] in [0, 1], reference views at ``azimuths_deg`` (SV4D: our conditions'
            reference orbit, from SV3D_p; SV4D 2.0 uses none: pass None).
        azimuths_deg: [V] azimuth of each row from the input view, the input view last (360).
        elevation_deg: the orbit's elevation, or one per view.
    Returns:
        latents [V, F, C, h, w] fp32 on the CPU in diffusion space (row V-1: the input video's
        latents), and what was done (loop, windows, anchors, the network's cameras) for matrix.json.
    """
    num_views, num_frames = len(azimuths_deg), video.shape[0]
    check_matrix_shape(cfg, num_views, num_frames)
    if cfg.loop == "sv4d" and (orbit is None or orbit.shape[0] != num_views):
        raise ValueError(f"sv4d is conditioned on the reference orbit's novel views: pass orbit "
                         f"[{num_views}, 3, H, W] (the conditions stage's reference orbit), got "
                         f"{None if orbit is None else tuple(orbit.shape)}")
    polars, azims = model_cameras(cfg, azimuths_deg, elevation_deg)
    plan = window_plan(cfg, num_frames)
    t, vw = cfg.frames_per_window, cfg.views_per_window
    try:
        device = next(comps.network.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    sigmas = karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    scale = guider_scales(cfg)
    frames_pm1 = video.to(device, torch.float32) * 2 - 1  # the script's images_v0
    views_pm1: dict[int, Tensor] = {}  # frame -> [Vw, 3, H, W] in [-1, 1]: the images windows are conditioned on
    if orbit is not None and cfg.loop == "sv4d":
        views_pm1[0] = orbit[:-1].to(device, torch.float32) * 2 - 1
    latents: Tensor | None = None  # [F, Vw, C, h, w], filled window by window

    def run(cond: WindowCondition, noise: Tensor, desc: str,
            pick: Callable[[int], tuple[WindowCondition, bool]] | None = None) -> Tensor:
        """Euler from ``noise`` [N, C, h, w]; ``pick(i)`` (optional) gives step i's condition and whether the
        window runs backwards (frames reversed) at that step."""
        def denoiser(x: Tensor, sigma: float, i: int) -> Tensor:
            c, backwards = (cond, False) if pick is None else pick(i)
            if not backwards:
                return guided_denoise(comps.network, x, sigma, c, scale)
            flip = (lambda z: z.view(t, vw, *z.shape[1:]).flip(0).flatten(0, 1))
            return flip(guided_denoise(comps.network, flip(x), sigma, c, scale))
        return edm_sample(denoiser, noise.to(device), sigmas, "euler", progress=progress, desc=desc)

    def decoded(z: Tensor) -> Tensor:
        """[n, C, h, w] -> images [n, 3, H, W] in [-1, 1], each image on its own (the per-image first stage)."""
        return torch.cat([comps.decode(z[i:i + 1]).float() for i in range(z.shape[0])])

    with torch.no_grad():
        if cfg.loop == "sv4d":
            anchors = plan["anchors"]
            cond = window_condition(frames_pm1[anchors], views_pm1[0], polars, azims, comps, gen)
            noise = torch.randn((t * vw, *cond.c["concat"].shape[1:]), generator=gen)
            z = run(cond, noise, "sv4d anchors").view(t, vw, *noise.shape[1:])
            for i, f in enumerate(anchors):
                views_pm1[f] = decoded(z[i])
            for w in plan["windows"]:
                t0, t1 = w[0], w[-1]
                # the script draws a whole latent_matrix [F, V, C, h, w] per window and uses the window's part
                full = torch.randn((num_frames, num_views, *noise.shape[1:]), generator=gen)
                forward = window_condition(frames_pm1[w], views_pm1[t0], polars, azims, comps, gen)
                backward = window_condition(frames_pm1[w[::-1]], views_pm1[t1], polars, azims, comps, gen)
                # one state in forward frame order; even steps (step 0 first) run the window backwards
                z = run(forward, full[t0:t1 + 1, 1:].flatten(0, 1), f"sv4d frames {t0}-{t1}",
                        pick=lambda i, f_=forward, b_=backward: (f_, False) if i % 2 == 1 else (b_, True))
                z = z.view(t, vw, *noise.shape[1:]).cpu()
                latents = z.new_zeros((num_frames, vw, *z.shape[2:])) if latents is None else latents
                latents[t0:t1 + 1] = z
                views_pm1[t1] = decoded(z[-1].to(device))  # the next window's forward reference views
        else:
            for k, w in enumerate(plan["windows"]):
                t0 = w[0]
                first = k == 0
                cond = window_condition(frames_pm1[w], None if first else views_pm1[t0], polars, azims, comps, gen,
                                        multiview=not first)
                noise = torch.randn((t * vw, *cond.c["concat"].shape[1:]), generator=gen)
                z = run(cond, noise, f"sv4d2 frames {t0}-{w[-1]}").view(t, vw, *noise.shape[1:]).cpu()
                latents = z.new_zeros((num_frames, vw, *z.shape[2:])) if latents is None else latents
                latents[t0:t0 + t] = z
                for j, f in enumerate(w):  # what the next windows are conditioned on (their first frame)
                    if any(w2[0] == f for w2 in plan["windows"][k + 1:]):
                        views_pm1[f] = decoded(z[j].to(device))
        assert latents is not None
        input_row = comps.encode(frames_pm1).float().cpu() * comps.scale_factor  # [F, C, h, w]
    matrix = torch.cat([latents.transpose(0, 1), input_row[None]], dim=0)  # [V, F, C, h, w]
    info = {"loop": cfg.loop, "frames_per_window": t, "views_per_window": vw, "anchors": plan["anchors"],
            "windows": plan["windows"], "input_view_row": num_views - 1,
            "network_polars_deg": [round(math.degrees(p), 6) for p in polars.tolist()],
            "network_azimuths_deg": [round(math.degrees(a), 6) for a in azims.tolist()]}
    return matrix, info

