"""Stage: sample the V-views x F-frames latent matrix by composing the two priors' denoisers.

Row v (a video over the F frames at orbit view v) is denoised by the video prior conditioned
on reference-orbit view v; column f (an orbit of V views at frame f) by the multi-view prior
conditioned on reference-video frame f with the orbit's cameras. Both see the same x and
sigma, so the composed score is the same blend of their x0 predictions (each after its own
CFG): ``D = w_video[v] D_video + w_multiview[v] D_multiview`` (see :mod:`d2.stages.schedules`
for the weights and their mapping to the paper's ``s``). Deterministic Euler (Heun optional)
on Karras sigmas, x kept in fp32, the first ``rollback_steps`` steps each taken twice (step,
re-add noise, step again from the same sigma: the authors' variance reduction). Rows and
columns go through the UNets ``chunk_size`` sequences at a time, so memory is bounded by the
chunk, not by V x F. All randomness comes from one CPU generator seeded with ``seed``.

``sampling.method`` picks the matrix (:func:`method_matrix`; the paper's ablation extremes beside
the composition, one benchmark row each):

    diffusion2      the composed sampler above; reads every knob
    video_only      the same sampler, conditions and initial noise with the weights forced to
                    w_video = 1, w_multiview = 0 at every step and view: row v is an independent
                    video-prior sample conditioned on orbit view v
    multiview_only  likewise with w_video = 0, w_multiview = 1: column f is an independent
                    multi-view sample conditioned on video frame f
    static          no prior call: the input view's first frame (the input image when it is
                    frame 0 of the reference video, as for image and first-frame video inputs,
                    else the reference video's frame 0) in every entry
    sv4d            Stability's SV4D (baseline): its script's loop (anchor frames, then dense
                    windows) with its own network, conditioned on the reference video and the
                    reference orbit (SV3D_p's views, as the script takes SV3D's), sharing the
                    multi-view prior's first stage and CLIP (:mod:`d2.stages.sv4d_sampling`,
                    :func:`sv4d_loop_config`: the script's layout, windows and guider, with
                    num_steps, the sigmas and the seed of this config; V = 9, F = 21)
    sv4d2           SV4D 2.0 (4 views x 12 frames a window; V = 5), likewise without the orbit
    sv4d2_8views    SV4D 2.0's 8-view checkpoint (8 views x 5 frames a window; V = 9, F = 5 + 4k)

A knob a method does not read (:func:`ignored_knobs`, recorded in ``matrix.json``) still enters
the stage's cache key: changing it recomputes the same matrix under a new key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from d2.stages.edm import chunks as _chunks
from d2.stages.edm import edm_sample, sample_sequences  # noqa: F401  (part of this stage's API)
from d2.stages.priors import Prior, PriorCondition
from d2.stages.schedules import (
    EXP_MAX,
    FP32_MAX_SIGMA,
    SEED_MAX,
    base_multiview_weight,
    composition_weights,
    karras_problem,
    karras_sigmas,
    multiview_cfg_scales,
    video_cfg_scales,
)
from d2.stages.sv4d_sampling import SV4DSamplingConfig, check_matrix_shape

if TYPE_CHECKING:
    from d2.stages.conditions import Conditions
    from d2.stages.priors.sv4d import SV4DNetwork


SamplingMethod = Literal["diffusion2", "video_only", "multiview_only", "static", "sv4d", "sv4d2", "sv4d2_8views"]

# the weight-schedule knobs (what video_only / multiview_only replace by fixed weights)
WEIGHT_KNOBS = ("weight_schedule", "w_multiview_constant", "s0", "k", "logistic_min", "logistic_max", "step_fraction",
                "per_view_video_weight", "per_view_amplitude")
# what the static method reads (besides the no-effect knobs)
STATIC_KNOBS = ("method", "num_views", "num_frames", "resolution", "grid_thumb", "video_fps")
# what the SV4D methods read: the knobs they share with the composed sampler, their guider scales, the display
SV4D_ONLY = ("sv4d_cfg_min", "sv4d_cfg_max")  # what only the SV4D methods read
SV4D_KNOBS = (*STATIC_KNOBS, "num_steps", "sigma_min", "sigma_max", "rho", "seed", "sv4d_cfg_min", "sv4d_cfg_max")


class SamplingConfig(BaseModel):
    """Knobs of the composed sampler (docs/method.md; the authors' values: params/authors.yaml)."""

    model_config = ConfigDict(extra="forbid")
    method: SamplingMethod = "diffusion2"  # diffusion2: composed scores; video_only / multiview_only: w_video / w_multiview = 1; static: the input frame everywhere
    num_views: int = Field(8, ge=1)  # V: views of the orbit (must match the conditions)
    num_frames: int = Field(8, ge=1)  # F: frames of the video (must match the conditions)
    resolution: int = Field(16, ge=8)  # image side in pixels (must match the priors and the conditions)
    num_steps: int = Field(6, ge=1)  # N: denoising steps
    sigma_min: float = Field(0.002, gt=0)  # smallest Karras sigma (before the final 0)
    sigma_max: float = Field(700.0, gt=0, le=FP32_MAX_SIGMA)  # largest Karras sigma; initial noise std = sqrt(1 + sigma_max^2), in fp32
    rho: float = Field(7.0, gt=0)  # Karras rho
    solver: Literal["euler", "heun"] = "euler"  # deterministic ODE solver
    weight_schedule: Literal["constant", "logistic", "linear", "cosine"] = "logistic"  # base multi-view weight m(i): constant, logistic, linear or cosine (authors: constant)
    w_multiview_constant: float = Field(0.6, ge=0, le=1)  # m for the constant schedule (authors' sv3d_scale 0.6)
    s0: float = Field(0.5, ge=0, le=1)  # logistic midpoint s0, a fraction of the denoising steps (paper 0.5; authors' code 0.6)
    k: float = Field(20.0, ge=0)  # logistic steepness k; below 0 the multi-view weight would rise, not drop (paper 20; authors' code 15)
    logistic_min: float = Field(0.0, ge=0, le=1)  # m after the drop, logistic / linear / cosine (authors' sv3d_scale_min)
    logistic_max: float = Field(1.0, ge=0, le=1)  # m before the drop, logistic / linear / cosine (authors' sv3d_scale_max)
    step_fraction: Literal["i/(N-1)", "i/N"] = "i/(N-1)"  # progress in the logistic / linear / cosine: authors i/(N-1), paper i/N
    per_view_video_weight: bool = True  # scale w_video by the authors' cosine profile over views
    per_view_amplitude: float = Field(0.75, ge=0, le=1)  # depth a of that profile
    video_cfg_min: float = 1.5  # video CFG at frame 0 (linear over frames)
    video_cfg_max: float = 3.0  # video CFG at the last frame
    multiview_cfg: Literal["constant", "triangle"] = "constant"  # multi-view CFG profile over views
    multiview_cfg_scale: float = 2.5  # constant value / triangle peak
    multiview_cfg_min: float = 1.0  # triangle ends (SV3D's own default 1.0 -> 2.5 -> 1.0)
    rollback_steps: int = Field(1, ge=0)  # the first steps taken twice (authors: 10 of 50)
    rollback_noise: Literal["linear", "vp"] = "linear"  # re-added noise std: |sigma - sigma_next| (authors) or sqrt(sigma^2 - sigma_next^2)
    chunk_size: int = Field(4, ge=1, json_schema_extra={"no_effect": True})  # rows / columns per UNet call (CFG doubles the batch); split into equal chunks where possible (one shape per UNet)
    seed: int = Field(23, ge=0, le=SEED_MAX)  # one seed for the initial noise, cond_aug noise and rollback noise (authors: 23)
    fps_id: int = 24  # SVD micro-conditioning fps id
    motion_bucket_id: int = 127  # SVD micro-conditioning motion bucket
    video_cond_aug: float = Field(0.02, ge=0)  # noise added to the video prior's conditioning image (SVD)
    multiview_cond_aug: float = Field(1e-5, ge=0)  # noise added to the multi-view prior's conditioning image (SV3D)
    decode_chunk: int = Field(14, ge=1)  # frames per temporal-decoder call (authors: 10)
    devices: list[str] = []  # spread each step's rows and columns over these devices (a prior replica on each, e.g. [cuda:0, cuda:1]); [] = priors.device
    grid_thumb: int = Field(32, ge=8)  # cell side in grid.png / grid.mp4 (a smaller matrix is enlarged by a whole factor)
    video_fps: int = Field(8, ge=1)  # fps of grid.mp4
    progress: bool = Field(True, json_schema_extra={"no_effect": True})  # show tqdm bars
    sv4d_cfg_min: float | None = Field(None, ge=0)  # sv4d* methods: the guider's min scale; None: the script's (1.0; SV4D 2.0 8 views 1.5)
    sv4d_cfg_max: float | None = Field(None, ge=0)  # sv4d* methods: the guider's max scale; None: the script's (2.0; SV4D 2.0 8 views 2.5)

    @model_validator(mode="after")
    def _finite_schedules(self) -> "SamplingConfig":
        top = self.k * (1.0 - self.s0)
        if self.weight_schedule == "logistic" and top > EXP_MAX:
            raise ValueError(f"sampling.k * (1 - sampling.s0) = {top:g} > {EXP_MAX}: exp() in the logistic weight "
                             "schedule overflows; lower sampling.k (paper 20) or raise sampling.s0")
        problem = karras_problem("sampling", self.sigma_min, self.sigma_max, self.rho)
        if problem:
            raise ValueError(problem)
        if self.method in ("sv4d", "sv4d2", "sv4d2_8views"):
            check_matrix_shape(sv4d_loop_config(self), self.num_views, self.num_frames)
        return self


def sv4d_loop_config(cfg: SamplingConfig) -> SV4DSamplingConfig:
    """The loop of an sv4d* method: its script's layout, windows and guider, with this config's
    steps, EDM sigmas and seed (the knobs the methods share) and the guider scales when set."""
    knobs = dict(num_steps=cfg.num_steps, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho, seed=cfg.seed)
    knobs.update({k: v for k, v in (("cfg_min", cfg.sv4d_cfg_min), ("cfg_max", cfg.sv4d_cfg_max)) if v is not None})
    match cfg.method:
        case "sv4d":
            return SV4DSamplingConfig(**knobs)
        case "sv4d2":
            return SV4DSamplingConfig.sv4d2(**knobs)
        case "sv4d2_8views":
            return SV4DSamplingConfig.sv4d2_8views(**knobs)
    raise ValueError(f"sampling.method = {cfg.method} is not an SV4D method")


def ignored_knobs(cfg: SamplingConfig) -> list[str]:
    """The sampling knobs ``cfg.method`` does not read (no-effect knobs left out)."""
    match cfg.method:
        case "diffusion2":
            return list(SV4D_ONLY)
        case "video_only":  # the multi-view condition is built (same noise draws), never used
            return [*WEIGHT_KNOBS, "multiview_cfg", "multiview_cfg_scale", "multiview_cfg_min", "multiview_cond_aug",
                    *SV4D_ONLY]
        case "multiview_only":  # the video condition is built (same noise draws), never used
            return [*WEIGHT_KNOBS, "video_cfg_min", "video_cfg_max", "fps_id", "motion_bucket_id", "video_cond_aug",
                    *SV4D_ONLY]
        case "static" | "sv4d" | "sv4d2" | "sv4d2_8views":
            read = STATIC_KNOBS if cfg.method == "static" else SV4D_KNOBS
            return [k for k, f in type(cfg).model_fields.items()
                    if k not in read and not (f.json_schema_extra or {}).get("no_effect")]


def weights_at(i: int, cfg: SamplingConfig, num_views: int) -> tuple[Tensor, Tensor]:
    """(w_video [V], w_multiview [V]) float32 at step i: the schedule's, or the method's fixed ones."""
    ones, zeros = torch.ones(num_views), torch.zeros(num_views)
    match cfg.method:
        case "video_only":
            return ones, zeros
        case "multiview_only":
            return zeros, ones
    m = base_multiview_weight(i, cfg.num_steps, cfg.weight_schedule, cfg.w_multiview_constant, cfg.s0,
                              cfg.k, cfg.logistic_min, cfg.logistic_max, cfg.step_fraction)
    wv, wm = composition_weights(m, num_views, cfg.per_view_video_weight, cfg.per_view_amplitude)
    return wv.float(), wm.float()


class ComposedDenoiser:
    """D(x; sigma) of the whole matrix x [V, F, C, h, w] at step i (fp32).

    With ``replicas`` (one ``(video, multiview)`` prior pair per device, the first being
    ``video_prior, multiview_prior``), each step's row and column chunks (the same chunks as on
    one device, so each UNet call sees the same batch) are spread over the devices, one thread
    per device (the UNet calls release the GIL; on GPUs each thread drives its own card, with no
    inter-process communication), balanced by work (longest first to the least loaded device);
    the chunk outputs are summed in the same fixed order as on one device. A device gets work
    only while there are at least as many chunks as devices: keep ``chunk_size`` at or below
    ``min(V, F) / len(devices)``.
    """

    def __init__(self, video_prior: Prior, multiview_prior: Prior, video_cond: PriorCondition,
                 multiview_cond: PriorCondition, cfg: SamplingConfig, num_views: int, num_frames: int,
                 replicas: list[tuple[Prior, Prior]] | None = None) -> None:
        self.video, self.mv = video_prior, multiview_prior
        self.replicas = replicas if replicas and len(replicas) > 1 else None
        self.vcond, self.mcond = video_cond, multiview_cond
        self.cfg = cfg
        self.v, self.f = num_views, num_frames
        self.video_cfg = video_cfg_scales(num_frames, cfg.video_cfg_min, cfg.video_cfg_max)  # [F]
        self.mv_cfg = multiview_cfg_scales(num_views, cfg.multiview_cfg, cfg.multiview_cfg_scale,
                                           cfg.multiview_cfg_min)  # [V]
        self.unet_seconds = 0.0  # wall time spent inside the priors' denoise calls (bench)
        self.timer: Callable[[], float] | None = None

    def _call(self, prior: Prior, x: Tensor, sigma: float, cond: PriorCondition, cfg_scale: Tensor) -> Tensor:
        b = x.shape[0]
        dev = prior.device
        t0 = self.timer() if self.timer else 0.0
        out = prior.denoise(x.to(dev), torch.full((b,), sigma, device=dev), cond.to(dev),
                            cfg_scale.to(dev)[None].expand(b, -1))
        if self.timer:
            self.unet_seconds += self.timer() - t0
        return out.to(x.device)

    def _spread(self, x: Tensor, sigma: float, w_video: Tensor, w_mv: Tensor) -> Tensor:
        """One step's row and column chunks over the replicas' devices (see the class docstring)."""
        from concurrent.futures import ThreadPoolExecutor

        n_dev = len(self.replicas)
        items: list[tuple[str, slice]] = []  # (rows | cols, slice) in the single-device order
        if bool((w_video > 0).any()):
            items += [("rows", sl) for sl in _chunks(self.v, self.cfg.chunk_size)]
        if bool((w_mv > 0).any()):
            items += [("cols", sl) for sl in _chunks(self.f, self.cfg.chunk_size)]
        cost = lambda it: (it[1].stop - it[1].start) * (self.f if it[0] == "rows" else self.v)  # noqa: E731
        load = [0] * n_dev
        plan: list[list[int]] = [[] for _ in range(n_dev)]
        for k in sorted(range(len(items)), key=lambda k: -cost(items[k])):  # longest first to the least loaded
            d = load.index(min(load))
            plan[d].append(k)
            load[d] += cost(items[k])
        outs: dict[int, Tensor] = {}

        def work(d: int) -> None:
            video, mv = self.replicas[d]
            with torch.no_grad():  # grad mode is per thread
                for k in plan[d]:
                    kind, sl = items[k]
                    if kind == "rows":
                        outs[k] = self._call(video, x[sl], sigma, self.vcond.select(sl), self.video_cfg)
                    else:
                        xc = x[:, sl].transpose(0, 1)  # [b, V, C, h, w]
                        outs[k] = self._call(mv, xc, sigma, self.mcond.select(sl), self.mv_cfg).transpose(0, 1)

        with ThreadPoolExecutor(n_dev) as pool:
            list(pool.map(work, range(n_dev)))
        d = torch.zeros_like(x)
        for k, (kind, sl) in enumerate(items):
            if kind == "rows":
                d[sl] += w_video[sl].view(-1, 1, 1, 1, 1) * outs[k]
            else:
                d[:, sl] += w_mv.view(-1, 1, 1, 1, 1) * outs[k]
        return d

    def __call__(self, x: Tensor, sigma: float, i: int) -> Tensor:
        w_video, w_mv = weights_at(i, self.cfg, self.v)
        if self.replicas is not None:
            return self._spread(x, sigma, w_video.to(x.device), w_mv.to(x.device))
        w_video, w_mv = w_video.to(x.device), w_mv.to(x.device)
        d = torch.zeros_like(x)  # [V, F, C, h, w]
        size = self.cfg.chunk_size  # the priors split huge temporal-attention batches themselves
        if bool((w_video > 0).any()):
            for sl in _chunks(self.v, size):  # rows: videos over frames
                dv = self._call(self.video, x[sl], sigma, self.vcond.select(sl), self.video_cfg)
                d[sl] += w_video[sl].view(-1, 1, 1, 1, 1) * dv
        if bool((w_mv > 0).any()):
            for sl in _chunks(self.f, size):  # columns: orbits over views
                xc = x[:, sl].transpose(0, 1)  # [b, V, C, h, w]
                dm = self._call(self.mv, xc, sigma, self.mcond.select(sl), self.mv_cfg).transpose(0, 1)
                d[:, sl] += w_mv.view(-1, 1, 1, 1, 1) * dm
        return d


def build_matrix_conditions(video_prior: Prior, multiview_prior: Prior, conditions: "Conditions",
                            cfg: SamplingConfig, generator: torch.Generator) -> tuple[PriorCondition, PriorCondition]:
    """Row v: video prior on orbit view v (V elements); column f: multi-view prior on video frame f (F elements)."""
    with torch.no_grad():
        vcond = video_prior.condition(conditions.orbit, cond_aug=cfg.video_cond_aug, fps_id=cfg.fps_id,
                                      motion_bucket_id=cfg.motion_bucket_id, generator=generator)
        mcond = multiview_prior.condition(conditions.video, cond_aug=cfg.multiview_cond_aug,
                                          azimuths_deg=list(conditions.azimuths_deg),
                                          elevations_deg=conditions.elevation_deg, generator=generator)
    return vcond, mcond


def check_compatible(video_prior: Prior, multiview_prior: Prior, conditions: "Conditions | None",
                     cfg: SamplingConfig) -> None:
    """Clear errors before any compute: families, latent spaces, sizes."""
    if video_prior.family != "video" or multiview_prior.family != "multiview":
        raise ValueError(f"need (video, multiview) priors, got ({video_prior.family}, {multiview_prior.family})")
    a = (video_prior.latent_channels, video_prior.vae_scale_factor, video_prior.resolution)
    b = (multiview_prior.latent_channels, multiview_prior.vae_scale_factor, multiview_prior.resolution)
    if a != b:
        raise ValueError(f"the priors' latent spaces differ: video (channels, scale, resolution) {a} vs multiview {b}")
    if cfg.resolution != video_prior.resolution:
        raise ValueError(f"sampling.resolution {cfg.resolution} != the priors' resolution {video_prior.resolution}")
    if conditions is not None:
        v, f = conditions.orbit.shape[0], conditions.video.shape[0]
        if (v, f) != (cfg.num_views, cfg.num_frames):
            raise ValueError(f"conditions have {v} views x {f} frames, sampling asks for "
                             f"{cfg.num_views} x {cfg.num_frames}")
        if conditions.orbit.shape[-1] != cfg.resolution or conditions.video.shape[-1] != cfg.resolution:
            raise ValueError(f"conditions are {conditions.orbit.shape[-1]} px, sampling.resolution is {cfg.resolution}")


def sample_matrix(video_prior: Prior, multiview_prior: Prior, conditions: "Conditions", cfg: SamplingConfig,
                  noise: Tensor | None = None, denoiser_hook: Callable[[ComposedDenoiser], None] | None = None,
                  replicas: list[tuple[Prior, Prior]] | None = None,
                  on_step: Callable[[int, int, Tensor, float], None] | None = None) -> Tensor:
    """The composed latent matrix [V, F, C, h, w] fp32 (on the CPU).

    ``noise`` (unit Gaussian [V, F, C, h, w]) replaces the seeded initial noise when given.
    ``denoiser_hook`` sees the :class:`ComposedDenoiser` before sampling (benchmarks).
    ``replicas`` (one prior pair per device) spreads each step over the devices. ``on_step`` (optional)
    sees every step: ``(step, steps, x, sigma)``.
    """
    check_compatible(video_prior, multiview_prior, conditions, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    vcond, mcond = build_matrix_conditions(video_prior, multiview_prior, conditions, cfg, gen)
    v, f = cfg.num_views, cfg.num_frames
    c, h = video_prior.latent_channels, video_prior.latent_size
    if noise is None:
        noise = torch.randn((v, f, c, h, h), generator=gen, dtype=torch.float32)
    if noise.shape != (v, f, c, h, h):
        raise ValueError(f"noise must be {(v, f, c, h, h)}, got {tuple(noise.shape)}")
    denoiser = ComposedDenoiser(video_prior, multiview_prior, vcond, mcond, cfg, v, f, replicas)
    if denoiser_hook is not None:
        denoiser_hook(denoiser)
    sigmas = karras_sigmas(cfg.num_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    with torch.no_grad():
        x = edm_sample(denoiser, noise.to(video_prior.device), sigmas, cfg.solver, cfg.rollback_steps,
                       cfg.rollback_noise, gen, cfg.progress, desc=f"matrix {v}x{f}", on_step=on_step)
    return x.float().cpu()


def static_matrix(conditions: "Conditions", num_views: int, num_frames: int) -> Tensor:
    """[V, F, 3, H, W]: the input view's first frame in every entry (see the module docstring)."""
    first = conditions.input if conditions.input_frame_index == 0 else conditions.video[0]  # [3, H, W]
    return first.float()[None, None].expand(num_views, num_frames, *first.shape).clone()


def method_matrix(priors: tuple[Prior, Prior], conditions: "Conditions", cfg: SamplingConfig,
                  replicas: list[tuple[Prior, Prior]] | None = None,
                  on_step: Callable[[int, int, Tensor, float], None] | None = None,
                  sv4d: "SV4DNetwork | None" = None) -> tuple[Tensor | None, Tensor]:
    """``cfg.method``'s matrix: (latents [V, F, C, h, w] fp32, or None for a method without
    latents; images [V, F, 3, H, W] in [0, 1]), both on the CPU. ``replicas`` and ``on_step`` as
    for :func:`sample_matrix`; ``sv4d``: the network of the sv4d* methods
    (:func:`d2.stages.priors.sv4d.build_sv4d_network`)."""
    video_prior, multiview_prior = priors
    match cfg.method:
        case "diffusion2" | "video_only" | "multiview_only":  # one sampler; weights_at forces the extremes
            latents = sample_matrix(video_prior, multiview_prior, conditions, cfg, replicas=replicas, on_step=on_step)
            return latents, decode_matrix(video_prior, latents, cfg.decode_chunk, cfg.progress)
        case "static":
            return None, static_matrix(conditions, cfg.num_views, cfg.num_frames)
        case "sv4d" | "sv4d2" | "sv4d2_8views":  # Stability's loop and network; the multi-view prior's VAE and CLIP
            from d2.stages.sv4d_sampling import components_from_prior, sample_sv4d_matrix

            if sv4d is None:
                raise ValueError(f"sampling.method = {cfg.method} needs its network (build_sv4d_network)")
            comps = components_from_prior(multiview_prior, sv4d.network, sv4d.vector_widths)
            loop = sv4d_loop_config(cfg)
            orbit = conditions.orbit if loop.loop == "sv4d" else None  # SV4D 2.0 takes no reference views
            with torch.no_grad():
                latents, _ = sample_sv4d_matrix(conditions.video.float(), orbit, list(conditions.azimuths_deg),
                                                conditions.elevation_deg, comps, loop)
                images = torch.stack([torch.cat([comps.decode(row[f:f + 1]) for f in range(row.shape[0])])
                                      for row in latents])  # per image, as the scripts' first stage decodes
            return latents.float().cpu(), ((images + 1) / 2).clamp(0, 1).float().cpu()
    raise ValueError(f"unknown sampling.method {cfg.method!r}")


def decode_matrix(video_prior: Prior, latents: Tensor, chunk: int = 14, progress: bool = False) -> Tensor:
    """[V, F, C, h, w] latents -> [V, F, 3, H, W] images in [0, 1]; each row decoded as one video."""
    rows = []
    with torch.no_grad():
        for v in tqdm(range(latents.shape[0]), desc="decode", disable=not progress, leave=False):
            rows.append(video_prior.decode(latents[v], chunk=chunk).cpu())
    return torch.stack(rows)


def _thumbs(images: Tensor, size: int) -> Tensor:
    """[..., 3, H, W] -> [..., 3, s, s]: shrunk to ``size`` (antialiased), or enlarged by the whole
    factor ``size // H`` (nearest, pixels stay pixels) when the matrix is smaller."""
    h = images.shape[-1]
    if h <= size:
        k = size // h
        return images if k == 1 else images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
    flat = images.reshape(-1, *images.shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=(size, size), mode="bilinear", antialias=True,
                                          align_corners=False).clamp(0, 1)
    return out.reshape(*images.shape[:-2], size, size)


def run_sampling(conditions_dir: str | Path, out_dir: str | Path, cfg: SamplingConfig,
                 priors: tuple[Prior, Prior], replicas: list[tuple[Prior, Prior]] | None = None,
                 on_step: Callable[[int, int, dict[str, float]], None] | None = None,
                 sv4d: "SV4DNetwork | None" = None) -> Path:
    """Stage: conditions folder -> matrix folder (``sv4d``: the network of the sv4d* methods).

    Writes (atomically, the folder appears whole) ``latents.pt`` ({"latents": [V, F, C, h, w]}; by
    the methods that sample latents), ``view_XX/frame_YY.png``, ``grid.png`` (rows = views,
    columns = frames), ``grid.mp4`` (over frames, all views tiled), ``references/orbit_view_XX.png``
    + ``references/video_frame_YY.png`` (the conditions), ``matrix.json`` (V, F, resolution,
    azimuths_deg, elevation_deg, fov_deg, radius, times, input_view_index, seed, input_kind,
    method, ignored_knobs, sampling config, steps).
    """
    from d2.stages.cameras import frame_times
    from d2.stages.conditions import load_conditions
    from d2.utils.io import atomic_dir, image_grid, save_image, save_tensor, save_video, write_json

    video_prior, multiview_prior = priors
    conditions = load_conditions(conditions_dir)
    check_compatible(video_prior, multiview_prior, conditions, cfg)
    steps: list[dict] = []  # per step: the noise level reached and the latents' spread (matrix.json, MLflow curves)

    def step_done(i: int, n: int, x: Tensor, sigma: float) -> None:
        steps.append({"step": i, "sigma": float(sigma), "x_std": float(x.std())})
        if on_step is not None:
            on_step(i, n, steps[-1])

    latents, images = method_matrix(priors, conditions, cfg, replicas, step_done, sv4d)  # [V,F,C,h,w], [V,F,3,H,W]
    v, f = images.shape[:2]
    with atomic_dir(out_dir) as tmp:
        if latents is not None:
            save_tensor(tmp / "latents.pt", {"latents": latents})
        for vi in range(v):
            for fi in range(f):
                save_image(tmp / f"view_{vi:02d}" / f"frame_{fi:02d}.png", images[vi, fi])
        thumbs = _thumbs(images, cfg.grid_thumb)  # [V, F, 3, s, s]
        for vi in range(v):  # the references the matrix was conditioned on
            save_image(tmp / "references" / f"orbit_view_{vi:02d}.png", conditions.orbit[vi])
        for fi in range(f):
            save_image(tmp / "references" / f"video_frame_{fi:02d}.png", conditions.video[fi])
        save_image(tmp / "grid.png", image_grid(thumbs))
        cols = math.ceil(math.sqrt(v))
        rows = math.ceil(v / cols)
        frames = []
        for fi in range(f):
            tiles = torch.ones(rows * cols, *thumbs.shape[-3:])
            tiles[:v] = thumbs[:, fi]
            frames.append(image_grid(tiles.reshape(rows, cols, *thumbs.shape[-3:])))
        save_video(tmp / "grid.mp4", torch.stack(frames), fps=cfg.video_fps)
        write_json(tmp / "matrix.json", {
            "V": v, "F": f, "resolution": int(images.shape[-1]),
            "azimuths_deg": list(conditions.azimuths_deg), "elevation_deg": conditions.elevation_deg,
            "fov_deg": conditions.fov_deg, "radius": conditions.radius, "times": frame_times(f),
            "input_view_index": conditions.input_view_index, "seed": cfg.seed, "input_kind": conditions.kind,
            "method": cfg.method, "ignored_knobs": ignored_knobs(cfg), "sampling": cfg.model_dump(), "steps": steps,
        })
    return Path(out_dir)
