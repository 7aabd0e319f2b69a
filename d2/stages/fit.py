"""Stage 2: fit native 4D Gaussians to a sampled image matrix (paper Section 3.2, Fig. 2 (iii)).

Objective (paper, after V3D): ``L = lambda_lpips C_lpips L_lpips + lambda_ssim C_ssim L_ssim``
with ``L_ssim = 1 - SSIM`` and per-image confidences computed without gradient,
``C_ssim = SSIM(render, target)`` and ``C_lpips = 1 - LPIPS(render, target)``; an optional
L1 term (the paper uses none). The loss's SSIM uses zero-padded windows as 3DGS's does, so
border pixels get gradient. LPIPS loads its VGG backbone from local weights
(:func:`d2.eval.perceptual.build_lpips`) and is in the loss whenever they are found; without
them the run stops before any work when ``lpips_required`` is set, and otherwise fits without
LPIPS and records the objective it optimised in ``fit.json`` (``objective``,
``lpips_left_out_because``).

Training follows the 4DGS code (Yang et al., ICLR 2024): screen-space gradient statistics,
clone/split densification, periodic opacity resets, pruning, progressive SH bands, its
learning rates and initialisation (see :class:`FitConfig`; every rule is a knob).

Matrix layout read here (written by the sampling stage): ``view_XX/frame_YY.png`` (two
digits, from 00) and ``matrix.json`` with ``V, F, resolution, azimuths_deg, elevation_deg,
fov_deg, radius, times``. Cameras: :mod:`d2.stages.cameras` (``orbit_cameras``).

Writes ``gaussians.safetensors`` (:meth:`Gaussians4D.export_state` plus the orbit), ``fit.json``,
``ply/t_XX.ply`` (one standard 3DGS PLY per frame time) and ``turntable.mp4``; while
running, ``checkpoint.pt`` (resumed automatically when the config matches).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from d2.stages.cameras import OrbitSpec, orbit_cameras
from d2.stages.gaussians import (
    PARAM_NAMES,
    Gaussians4D,
    camera_centers,
    init_from_images,
    init_random,
    knn_scales,
    rotation_4d,
)
from d2.stages.render import resolve_backend
from d2.stages.schedules import SEED_MAX
from d2.utils.io import load_image, load_tensor, save_image, save_tensor, video_plugin, write_json


class FitConfig(BaseModel):
    """Knobs of the 4D Gaussian fit (stage 2); training rules as the 4DGS code, schedule scaled to this 500-iteration CPU demo."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(500, ge=0)  # optimisation steps; the paper uses 5000 (500 fits the demo's 16 px matrices to ~24-25 dB on a CPU)
    batch_size: int = Field(4, ge=1)  # (view, frame) pairs rendered per iteration (4DGS: 2 on D-NeRF, 4 on DyNeRF)
    resolution: int | None = Field(None, ge=11)  # fit at this square size (None: the matrix's own resolution)
    num_gaussians: int = Field(800, ge=1)  # Gaussians at initialisation (4DGS: 100k-300k points)
    max_gaussians: int = Field(3000, ge=1)  # no cloning or splitting once the set has this many (keeps the CPU demo short)
    init: Literal["carve", "random"] = "carve"  # carve: space carving of the matrix itself; random: uniform cube
    init_extent: float = Field(0.6, gt=0)  # half side of the cube initial Gaussians are drawn in (world units)
    init_scales: Literal["knn", "spacing"] = "knn"  # knn: 3DGS's 3-nearest-neighbour rule; spacing: carved spacing / 2
    init_time_scale: float = Field(0.4472135955, gt=0)  # initial temporal std (4DGS: sqrt(T / 5), T = 1)
    init_time_margin: float = Field(0.1, ge=0)  # start times uniform in [-margin, 1 + margin] (4DGS: 0.1)
    init_opacity: float = Field(0.1, gt=0, lt=1)  # initial opacity (4DGS: 0.1)
    sh_degree: int = Field(1, ge=0, le=3)  # spherical-harmonics degree of the colour (4DGS: 3; 1 keeps the demo small)
    time_basis: int = Field(2, ge=0)  # time terms cos(2 pi k (mu_t - t) / T), k = 1..this, on every SH band (4DGS: 2)
    time_period: float = Field(1.0, gt=0)  # T of the colour's time basis (4DGS: the time span, 1 here)
    sh_increase_every: int = Field(0, ge=0)  # one more SH band every this many iterations, then one more time term (0: all from the start; 4DGS: 1000)
    temporal_cutoff: float = Field(0.05, ge=0, lt=1)  # skip Gaussians whose temporal marginal is <= this (4DGS: 0.05)
    sh_direction: Literal["unsliced", "sliced"] = "unsliced"  # colour's view direction from the 4D mean's xyz (4DGS's CUDA rasterizer); sliced: from the mean at the rendered time (its Python path; exact for moving Gaussians)
    scene_extent: float | None = Field(None, gt=0)  # for rates/thresholds; None: 1.1 x max camera-centroid distance
    lr_means: float = Field(1.6e-3, ge=0)  # Adam rate of the spatial means, times scene_extent (4DGS: 1.6e-4; 10x for a CPU run of hundreds of iterations)
    lr_means_final: float = Field(0.01, gt=0, le=1)  # the spatial rate decays exponentially to lr_means x this (4DGS)
    lr_means_max_steps: int = Field(500, ge=1)  # iterations over which that decay runs, constant after (4DGS: 30000)
    lr_time: float | None = Field(None, ge=0)  # constant rate of the means' time, x scene_extent; None: lr_means (4DGS)
    lr_scales: float = Field(5e-3, ge=0)  # learning rate of the 4 log-scales (4DGS: 5e-3)
    lr_quats: float = Field(1e-3, ge=0)  # learning rate of the two rotation quaternions (4DGS: 1e-3)
    lr_opacity: float = Field(5e-2, ge=0)  # learning rate of the opacity logits (4DGS: 5e-2)
    lr_sh: float = Field(2.5e-3, ge=0)  # learning rate of the DC colour (4DGS: 2.5e-3)
    lr_sh_rest: float = Field(1.25e-4, ge=0)  # learning rate of the higher bands and every time term (4DGS: lr_sh / 20)
    lambda_lpips: float = Field(1.0, ge=0)  # weight of the confidence-weighted LPIPS term (needs VGG16 weights)
    lambda_ssim: float = Field(1.0, ge=0)  # weight of the confidence-weighted D-SSIM (1 - SSIM) term
    lambda_l1: float = Field(0.0, ge=0)  # weight of an optional L1 term (the paper uses none)
    lpips_required: bool = False  # true: missing LPIPS weights stop the run; false: fit without, say so in fit.json
    lpips_vgg_weights: Path | None = None  # torchvision vgg16-397923af.pth; None: search as d2.eval.perceptual does
    ssim_padding: Literal["same", "valid"] = "same"  # loss SSIM: same = zero-padded (3DGS), valid = interior windows
    densify_from: int = Field(20, ge=0)  # densify (clone/split) and prune at iterations after this (4DGS: 500)
    densify_until: int = Field(400, ge=0)  # gradient statistics, densification, pruning and opacity resets stop at this iteration (4DGS: 15000)
    densify_every: int = Field(10, ge=1)  # iterations between densification steps (4DGS: 100)
    densify_grad_threshold: float = Field(2e-4, ge=0)  # mean NDC gradient over seeing views to densify (4DGS: 2e-4)
    dense_fraction: float = Field(0.01, gt=0)  # clone if max spatial scale <= this x scene_extent, else split (4DGS)
    split_scale_divisor: float = Field(1.6, gt=1)  # split children divide all 4 scales by this (4DGS: 0.8 x 2)
    densify_before_step: bool = True  # 4DGS's order: densify/prune/reset before Adam's step, which skips the replaced tensors (no step at a densification, none of the opacities at a reset); false: step first, so no gradient is lost
    opacity_reset_every: int = Field(0, ge=0)  # clamp every opacity to opacity_reset_value every this many iterations (0: never; 4DGS: 3000)
    opacity_reset_value: float = Field(0.01, gt=0, lt=1)  # the clamp of an opacity reset (4DGS: 0.01)
    opacity_reset_at_densify_from: bool = False  # also reset at iteration densify_from (4DGS does on white backgrounds; too short a run to recover here)
    prune_opacity: float = Field(0.005, ge=0, lt=1)  # prune at densification when opacity is below this (4DGS: 0.005)
    prune_screen_size: float = Field(20.0, ge=0)  # after the first periodic reset, prune radii above this (px; 0: off)
    screen_size_prune_fires: bool = False  # false, as 4DGS: densifying zeroes the tracked radii before its prune, so prune_screen_size never acts; true: prune on the radii tracked since the last densification, as the rule reads
    prune_world_size: float = Field(0.1, ge=0)  # ... and max spatial scales above this x scene_extent (0: off)
    background: float = Field(1.0, ge=0, le=1)  # grey level behind the Gaussians (the matrices are on white)
    exclude_views: list[int] = Field(default_factory=list)  # matrix views (from 0) left out of the fit; []: none
    backend: Literal["auto", "torch", "gsplat"] = "auto"  # rasterizer: auto = gsplat on CUDA, torch otherwise
    device: str = "cpu"  # torch device; auto = cuda when available, else cpu
    progress: bool = Field(True, json_schema_extra={"no_effect": True})  # show a progress bar
    checkpoint_every: int = Field(500, ge=0, json_schema_extra={"no_effect": True})  # iterations between checkpoints (0: none); a matching one is resumed
    seed: int = Field(0, ge=0, le=SEED_MAX)  # seed of initialisation and of the (view, frame) sampling
    export_ply: bool = True  # write ply/t_XX.ply (one standard 3DGS PLY per frame time)
    turntable_frames: int = Field(16, ge=0)  # frames of turntable.mp4 (one orbit while time runs 0 -> 1); 0: none
    turntable_fps: int = Field(12, ge=1)  # frame rate of turntable.mp4

    @field_validator("exclude_views")
    @classmethod
    def _views_distinct(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v) or len(set(v)) != len(v):
            raise ValueError(f"exclude_views = {v}: give distinct view indices >= 0 (view 0 is the first of the matrix)")
        return sorted(v)

    @model_validator(mode="after")
    def _some_loss(self) -> "FitConfig":
        if self.lambda_ssim == 0 and self.lambda_lpips == 0 and self.lambda_l1 == 0:
            raise ValueError("fit.lambda_ssim, fit.lambda_lpips and fit.lambda_l1 are all 0: the fit has no loss to "
                             "minimise; set fit.lambda_ssim=1 (the default)")
        return self


def fitted_views(cfg: FitConfig, num_views: int) -> list[int]:
    """The matrix views the fit uses: every view but ``cfg.exclude_views``.

    Raises:
        ValueError: an excluded index is not a view of a ``num_views``-view matrix, or none is left.
    """
    bad = [i for i in cfg.exclude_views if i >= num_views]
    if bad:
        raise ValueError(f"fit.exclude_views = {cfg.exclude_views}: view(s) {bad} are not in the matrix of "
                         f"{num_views} views (indices 0..{num_views - 1}); drop them from fit.exclude_views")
    kept = [i for i in range(num_views) if i not in cfg.exclude_views]
    if not kept:
        raise ValueError(f"fit.exclude_views = {cfg.exclude_views} leaves none of the {num_views} views to fit; "
                         "keep at least one view")
    return kept


class MatrixData(BaseModel):
    """A loaded image matrix (meta from matrix.json)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    images: Tensor  # [V, F, 3, H, W] in [0, 1]
    azimuths_deg: list[float]
    elevation_deg: float
    fov_deg: float
    radius: float
    times: list[float]


def matrix_image_path(matrix_dir: str | Path, v: int, f: int) -> Path:
    """Path of view v, frame f in the matrix layout."""
    return Path(matrix_dir) / f"view_{v:02d}" / f"frame_{f:02d}.png"


def read_matrix_meta(matrix_dir: str | Path) -> dict:
    """The contents of ``matrix_dir/matrix.json`` (FileNotFoundError naming the layout when absent)."""
    meta_path = Path(matrix_dir) / "matrix.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no matrix.json in {matrix_dir} (expected the sampling stage's matrix layout)")
    return json.loads(meta_path.read_text())


def load_matrix(matrix_dir: str | Path, resolution: int | None = None) -> MatrixData:
    """Read ``matrix.json`` and every ``view_XX/frame_YY.png`` (checked before any image is decoded)."""
    matrix_dir = Path(matrix_dir)
    meta_path = matrix_dir / "matrix.json"
    meta = read_matrix_meta(matrix_dir)
    need = ["V", "F", "azimuths_deg", "elevation_deg", "fov_deg", "radius", "times"]
    missing = [k for k in need if k not in meta]
    if missing:
        raise ValueError(f"{meta_path}: missing keys {missing}")
    v, f = int(meta["V"]), int(meta["F"])
    if len(meta["azimuths_deg"]) != v or len(meta["times"]) != f:
        raise ValueError(f"{meta_path}: V={v}, F={f} but {len(meta['azimuths_deg'])} azimuths, "
                         f"{len(meta['times'])} times")
    absent = [str(matrix_image_path(matrix_dir, i, j)) for i in range(v) for j in range(f)
              if not matrix_image_path(matrix_dir, i, j).is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} matrix image(s) missing, e.g. {absent[:3]}")
    size = resolution if resolution is not None else meta.get("resolution")
    imgs = torch.stack([torch.stack([load_image(matrix_image_path(matrix_dir, i, j), size=size)
                                     for j in range(f)]) for i in range(v)])  # [V, F, 3, H, W]
    return MatrixData(images=imgs, azimuths_deg=[float(a) for a in meta["azimuths_deg"]],
                      elevation_deg=float(meta["elevation_deg"]), fov_deg=float(meta["fov_deg"]),
                      radius=float(meta["radius"]), times=[float(t) for t in meta["times"]])


def write_matrix(out_dir: str | Path, images: Tensor, azimuths_deg: list[float], times: list[float],
                 spec: OrbitSpec) -> None:
    """Write images [V, F, 3, H, W] in the matrix layout ``run_fit`` reads (tests, benchmarks)."""
    out_dir = Path(out_dir)
    v, f, _, h, w = images.shape
    for i in range(v):
        for j in range(f):
            save_image(matrix_image_path(out_dir, i, j), images[i, j])
    write_json(out_dir / "matrix.json", {"V": v, "F": f, "resolution": h, "azimuths_deg": list(azimuths_deg),
                                         "elevation_deg": spec.elevation_deg, "fov_deg": spec.fov_deg,
                                         "radius": spec.radius, "times": list(times)})


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_fit_lpips(cfg: FitConfig, device: torch.device) -> tuple[torch.nn.Module | None, str | None]:
    """The LPIPS network for the loss and, when it is left out, why: ``(net, None)`` or ``(None, reason)``.

    Raises:
        RuntimeError: LPIPS weights are missing, ``lambda_lpips > 0`` and ``lpips_required`` (names the fix).
    """
    if cfg.lambda_lpips == 0:
        return None, "lambda_lpips is 0"
    from d2.eval.perceptual import MetricUnavailable, build_lpips

    try:
        return build_lpips(cfg.lpips_vgg_weights, device=str(device)), None
    except MetricUnavailable as e:
        if cfg.lpips_required:
            raise RuntimeError(
                f"fit: the LPIPS loss is unavailable ({e}) and fit.lpips_required is set. Provide the VGG16 weights "
                "(fit.lpips_vgg_weights) or set fit.lambda_lpips=0 / fit.lpips_required=false to fit without it."
            ) from e
        return None, f"LPIPS weights unavailable: {e}"


def objective_description(cfg: FitConfig, lpips_on: bool) -> str:
    """The loss actually optimised, in words (written to fit.json)."""
    terms = []
    if lpips_on and cfg.lambda_lpips > 0:
        terms.append(f"{cfg.lambda_lpips:g} * C_lpips * LPIPS")
    if cfg.lambda_ssim > 0:
        terms.append(f"{cfg.lambda_ssim:g} * C_ssim * (1 - SSIM[{cfg.ssim_padding}])")
    if cfg.lambda_l1 > 0:
        terms.append(f"{cfg.lambda_l1:g} * L1")
    return " + ".join(terms) if terms else "0 (no loss term has a positive weight)"


def ssim_same(x: Tensor, y: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM per image pair ([N, C, H, W] x2 -> [N]) with zero-padded ('same') Gaussian
    windows, as the 3DGS / 4DGS training loss computes it: every pixel, the border ones too,
    has a window centred on it and so receives gradient."""
    c = x.shape[1]
    coords = torch.arange(window_size, dtype=x.dtype, device=x.device) - (window_size - 1) / 2
    g1 = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g1 = g1 / g1.sum()
    w = (g1[:, None] * g1[None, :]).expand(c, 1, window_size, window_size)
    pad = window_size // 2

    def filt(z: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(z, w, padding=pad, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(y * y) - mu_y ** 2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s_map.mean(dim=(1, 2, 3))


def fit_loss(render: Tensor, target: Tensor, cfg: FitConfig, lpips_net: torch.nn.Module | None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Confidence-weighted LPIPS + D-SSIM (+ optional L1): render, target [B, 3, H, W] -> scalar loss.

    The LPIPS term is present when ``lpips_net`` is given and ``lambda_lpips > 0``. The logs are
    detached 0-d tensors (no device sync here; call ``float`` when displaying).
    """
    from d2.eval.perceptual import lpips_distance, ssim

    total = render.new_zeros(())
    logs: dict[str, Tensor] = {}
    if cfg.lambda_ssim > 0:
        s = ssim_same(render, target) if cfg.ssim_padding == "same" else ssim(render, target)  # [B]
        c_ssim = s.detach().clamp(min=0.0)
        total = total + cfg.lambda_ssim * (c_ssim * (1.0 - s)).mean()
        logs["ssim"] = s.detach().mean()
    if cfg.lambda_lpips > 0 and lpips_net is not None:
        d = lpips_distance(lpips_net, render, target)  # [B]
        c_lpips = (1.0 - d.detach()).clamp(min=0.0)
        total = total + cfg.lambda_lpips * (c_lpips * d).mean()
        logs["lpips"] = d.detach().mean()
    if cfg.lambda_l1 > 0:
        total = total + cfg.lambda_l1 * (render - target).abs().mean()
    logs["l1"] = (render - target).detach().abs().mean()
    logs["psnr"] = -10 * torch.log10(((render.detach() - target) ** 2).mean().clamp(min=1e-10))
    logs["loss"] = total.detach()
    return total, logs


def scene_extent(viewmats: Tensor) -> float:
    """3DGS's scene size from cameras [V, 4, 4]: 1.1 x the largest distance of a camera centre
    from the centres' mean."""
    centers = camera_centers(viewmats.double())  # [V, 3]
    return 1.1 * float((centers - centers.mean(0)).norm(dim=-1).max())


def _lr_means(cfg: FitConfig, extent: float, step: int) -> float:
    """The spatial means' rate at ``step``: log-linear from lr_means to lr_means * lr_means_final
    over lr_means_max_steps, times the scene extent (3DGS's exponential schedule)."""
    frac = min(max(step / cfg.lr_means_max_steps, 0.0), 1.0)
    return cfg.lr_means * extent * cfg.lr_means_final ** frac


def make_optimizer(g: Gaussians4D, cfg: FitConfig, extent: float = 1.0) -> torch.optim.Adam:
    """Adam with one named group per parameter tensor (the means' time rate is applied by
    :func:`_rescale_time_step`)."""
    lrs = {"means": _lr_means(cfg, extent, 0), "log_scales": cfg.lr_scales, "quats_l": cfg.lr_quats,
           "quats_r": cfg.lr_quats, "opacity_logits": cfg.lr_opacity, "sh_dc": cfg.lr_sh, "sh_rest": cfg.lr_sh_rest,
           "time_coefs": cfg.lr_sh_rest}
    groups = [{"params": [getattr(g, k)], "lr": lrs[k], "name": k} for k in PARAM_NAMES]
    return torch.optim.Adam(groups, lr=lrs["means"], eps=1e-15)


@torch.no_grad()
def _rescale_time_step(g: Gaussians4D, t_before: Tensor, lr_spatial: float, lr_time: float) -> None:
    """Give the means' time column its own rate: Adam's step is linear in the rate, so the step
    taken with ``lr_spatial`` is rescaled to ``lr_time`` on that column."""
    if lr_spatial > 0:
        g.means[:, 3] = t_before + (g.means[:, 3] - t_before) * (lr_time / lr_spatial)
    else:
        g.means[:, 3] = t_before


def _replace_rows(g: Gaussians4D, opt: torch.optim.Adam, new_params: dict[str, Tensor], index: Tensor,
                  fresh: Tensor) -> None:
    """Swap in new parameter tensors (rows = old rows ``index``, possibly modified) and remap Adam's state.

    index [N'] long: the old row each new row comes from; fresh [N'] bool: rows whose moments restart at 0.
    """
    old = {k: getattr(g, k) for k in PARAM_NAMES}
    g.set_params(new_params)
    for group in opt.param_groups:
        name = group["name"]
        st = opt.state.pop(old[name], None)
        new_p = getattr(g, name)
        if st:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    m = st[key][index].clone()
                    m[fresh] = 0
                    st[key] = m
            opt.state[new_p] = st
        group["params"] = [new_p]


class DensifyStats:
    """Screen-space statistics between densification steps (3DGS): per Gaussian, the sum over
    iterations of the mean (over the batch's views that saw it) norm of its 2D mean's gradient
    in NDC units, the number of iterations that saw it, and its largest screen radius."""

    def __init__(self, n: int, device: torch.device):
        self.reset(n, device)

    def reset(self, n: int, device: torch.device) -> None:
        """Zero statistics for ``n`` Gaussians (after each densification step)."""
        self.grad_accum = torch.zeros(n, device=device)  # [N]
        self.count = torch.zeros(n, device=device)  # [N]
        self.max_radii = torch.zeros(n, device=device)  # [N] pixels

    @torch.no_grad()
    def add(self, means2d_grad: Tensor, visible: Tensor, radii: Tensor, width: int, height: int) -> None:
        """means2d_grad [V, N, 2] (pixels) of a loss averaged over the V views of the batch,
        visible [V, N] bool, radii [V, N] pixels."""
        v = means2d_grad.shape[0]
        # one view's own loss in NDC: the batch mean holds 1/V of it; d ndc = 2 d pixel / size
        g = means2d_grad * v * means2d_grad.new_tensor([width / 2.0, height / 2.0])
        norms = torch.where(visible, g.norm(dim=-1), torch.zeros_like(g[..., 0]))  # [V, N]
        seen = visible.sum(0)  # [N]
        hit = seen > 0
        self.grad_accum[hit] += norms.sum(0)[hit] / seen[hit]
        self.count[hit] += 1
        self.max_radii = torch.maximum(self.max_radii, torch.where(visible, radii, 0.0).amax(0))

    def mean_grad(self) -> Tensor:
        """Mean screen-space gradient per Gaussian [N] (0 where never seen)."""
        return torch.where(self.count > 0, self.grad_accum / self.count.clamp(min=1), torch.zeros_like(self.count))

    def state(self) -> dict[str, Tensor]:
        return {"grad_accum": self.grad_accum.cpu(), "count": self.count.cpu(), "max_radii": self.max_radii.cpu()}

    @classmethod
    def from_state(cls, st: dict[str, Tensor], device: torch.device) -> "DensifyStats":
        s = cls(0, device)
        s.grad_accum, s.count, s.max_radii = (st[k].to(device) for k in ("grad_accum", "count", "max_radii"))
        return s


@torch.no_grad()
def reset_opacity(g: Gaussians4D, opt: torch.optim.Adam, value: float) -> None:
    """Clamp every opacity to at most ``value``, zero the opacities' Adam moments and drop their
    gradient (3DGS / 4DGS swap in a fresh tensor: no step of the opacities on this iteration)."""
    g.opacity_logits.clamp_(max=math.log(value / (1 - value)))
    g.opacity_logits.grad = None
    st = opt.state.get(g.opacity_logits)
    if st:
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key].zero_()


@dataclass
class DensifyStrategy:
    """The adaptive density control of 3DGS / 4DGS: screen-space statistics, clone / split,
    pruning and opacity resets, as a strategy object in the shape of gsplat's ``DefaultStrategy``.

    The fit loop calls :meth:`step_pre_backward` before ``loss.backward()``,
    :meth:`step_post_backward` after it and :meth:`step_post_optimizer` after ``opt.step()``;
    their state is a :class:`DensifyStats` (from :meth:`initialize_state`, checkpointed by the
    fit). Each step returns the records of what it did (``fit.json``'s ``densification``).
    ``step`` is the 1-based number of the iteration. The rule settings are the
    :class:`FitConfig` fields of the same names (:meth:`from_config`).
    """

    extent: float  # scene extent (world units) the clone/split and world-size thresholds scale with
    generator: torch.Generator  # draws the split children's positions (the fit's generator)
    densify_from: int
    densify_until: int
    densify_every: int
    densify_grad_threshold: float
    dense_fraction: float
    split_scale_divisor: float
    max_gaussians: int
    densify_before_step: bool
    opacity_reset_every: int
    opacity_reset_value: float
    opacity_reset_at_densify_from: bool
    prune_opacity: float
    prune_screen_size: float
    screen_size_prune_fires: bool
    prune_world_size: float

    @classmethod
    def from_config(cls, cfg: FitConfig, extent: float, generator: torch.Generator) -> "DensifyStrategy":
        rules = {f.name for f in fields(cls)} - {"extent", "generator"}
        return cls(extent=extent, generator=generator, **{k: getattr(cfg, k) for k in sorted(rules)})

    def initialize_state(self, num: int, device: torch.device) -> DensifyStats:
        """Statistics for a set of ``num`` Gaussians."""
        return DensifyStats(num, device)

    def tracking(self, step: int) -> bool:
        """Statistics, densification, pruning and opacity resets run before ``densify_until``."""
        return step < self.densify_until

    def step_pre_backward(self, step: int, info: dict) -> None:
        """Keep the gradient of the screen-space means, ``info["means2d"]`` (the rasterizer keeps it
        too whenever it is given ``info``)."""
        means2d = info.get("means2d")
        if self.tracking(step) and means2d is not None and means2d.requires_grad:
            means2d.retain_grad()

    def step_post_backward(self, g: Gaussians4D, opt: torch.optim.Adam, state: DensifyStats, step: int,
                           info: dict) -> list[dict]:
        """Add this iteration's screen-space gradients to ``state`` (``info``: the rasterizer's
        ``means2d``, ``visible``, ``radii`` of one time per camera, and the image ``width`` and
        ``height``); with ``densify_before_step`` (4DGS's order) the density rules run here,
        so Adam's step skips every tensor they replace."""
        if not self.tracking(step):
            return []
        if info["means2d"].grad is not None:
            state.add(info["means2d"].grad[:, 0], info["visible"][:, 0], info["radii"][:, 0], info["width"],
                      info["height"])
        return self._refine(g, opt, state, step) if self.densify_before_step else []

    def step_post_optimizer(self, g: Gaussians4D, opt: torch.optim.Adam, state: DensifyStats, step: int
                            ) -> list[dict]:
        """Without ``densify_before_step`` the density rules run here, after Adam's step (no gradient lost)."""
        if not self.tracking(step) or self.densify_before_step:
            return []
        return self._refine(g, opt, state, step)

    def _refine(self, g: Gaussians4D, opt: torch.optim.Adam, state: DensifyStats, step: int) -> list[dict]:
        """Densification and pruning every ``densify_every`` iterations after ``densify_from`` (on
        fresh statistics afterwards), then the periodic opacity reset."""
        records: list[dict] = []
        if step > self.densify_from and step % self.densify_every == 0:
            size_prune = self.opacity_reset_every > 0 and step > self.opacity_reset_every
            records.append({"iteration": step, **self.densify_and_prune(g, opt, state, size_prune=size_prune)})
            state.reset(g.num, state.count.device)
        if ((self.opacity_reset_every > 0 and step % self.opacity_reset_every == 0)
                or (self.opacity_reset_at_densify_from and step == self.densify_from)):
            reset_opacity(g, opt, self.opacity_reset_value)
            records.append({"iteration": step, "opacity_reset": self.opacity_reset_value, "num": g.num})
        return records

    @torch.no_grad()
    def densify_and_prune(self, g: Gaussians4D, opt: torch.optim.Adam, stats: DensifyStats, densify: bool = True,
                          size_prune: bool = False) -> dict[str, int]:
        """One 3DGS/4DGS densification step: clone, split, then prune.

        Gaussians whose mean screen-space gradient reaches ``densify_grad_threshold`` are cloned
        (an exact copy is added) when their largest spatial scale is at most ``dense_fraction *
        extent``, and split otherwise: replaced by two samples ``mu + R diag(s) z`` (z ~ N(0, I_4))
        of their own 4D distribution whose four scales are divided by ``split_scale_divisor``.
        While the set holds ``max_gaussians`` or more nothing is added (the largest gradients go
        first when only some fit). Then Gaussians with opacity below ``prune_opacity`` are removed
        and, with ``size_prune``, those with a screen radius above ``prune_screen_size`` or a
        largest spatial scale above ``prune_world_size * extent``. As in 4DGS (whose
        ``densification_postfix`` zeroes ``max_radii2D`` before ``densify_and_prune`` prunes), the
        screen radii a densifying step prunes on are zero, so the screen-size rule never fires unless
        ``screen_size_prune_fires``. New rows start with zero Adam moments; the set never becomes empty.
        """
        n = g.num
        dev = g.means.device
        p = {k: getattr(g, k).detach() for k in PARAM_NAMES}
        grads = stats.mean_grad()
        big = torch.exp(p["log_scales"][:, :3]).amax(-1) > self.dense_fraction * self.extent
        chosen = grads >= self.densify_grad_threshold if densify else torch.zeros(n, dtype=torch.bool, device=dev)
        budget = max(0, self.max_gaussians - n)
        # a clone adds one Gaussian, a split one more than it removes
        if int(chosen.sum()) > budget:
            order = torch.argsort(torch.where(chosen, grads, torch.full_like(grads, -1.0)), descending=True)
            chosen = torch.zeros_like(chosen)
            chosen[order[:budget]] = True
        clone, split = chosen & ~big, chosen & big
        idx_all = torch.arange(n, device=dev)
        idx_split = idx_all[split]
        s = idx_split.shape[0]
        new = {k: [v[~split]] for k, v in p.items()}
        index = [idx_all[~split]]
        for k, v in p.items():
            new[k].append(v[clone])
        index.append(idx_all[clone])
        if s > 0:
            L = rotation_4d(p["quats_l"][idx_split], p["quats_r"][idx_split]) * torch.exp(
                p["log_scales"][idx_split]).unsqueeze(-2)  # [S, 4, 4] = R diag(s)
            for _ in range(2):
                z = torch.randn(s, 4, 1, generator=self.generator, dtype=torch.float64).to(device=dev, dtype=L.dtype)
                for k, v in p.items():
                    new[k].append(v[idx_split])
                new["means"][-1] = p["means"][idx_split] + (L @ z).squeeze(-1)
                new["log_scales"][-1] = p["log_scales"][idx_split] - math.log(self.split_scale_divisor)
                index.append(idx_split)
        cat = {k: torch.cat(v) for k, v in new.items()}
        index_t = torch.cat(index)
        n_old = n - s
        fresh = torch.arange(index_t.shape[0], device=dev) >= n_old  # clones and children restart Adam
        radii = torch.cat([stats.max_radii[~split], torch.zeros(index_t.shape[0] - n_old, device=dev)])
        if densify and not self.screen_size_prune_fires:
            radii = torch.zeros_like(radii)
        prune = torch.sigmoid(cat["opacity_logits"]) < self.prune_opacity
        if size_prune:
            if self.prune_screen_size > 0:
                prune |= radii > self.prune_screen_size
            if self.prune_world_size > 0:
                prune |= torch.exp(cat["log_scales"][:, :3]).amax(-1) > self.prune_world_size * self.extent
        if bool(prune.all()):  # never prune everything
            prune[torch.argmax(cat["opacity_logits"])] = False
        keep = ~prune
        _replace_rows(g, opt, {k: v[keep] for k, v in cat.items()}, index_t[keep], fresh[keep])
        return {"cloned": int(clone.sum()), "split": s, "pruned": int(prune.sum()), "num": g.num}


def densify_and_prune(g: Gaussians4D, opt: torch.optim.Adam, stats: DensifyStats, cfg: FitConfig, extent: float,
                      generator: torch.Generator, densify: bool = True, size_prune: bool = False) -> dict[str, int]:
    """:meth:`DensifyStrategy.densify_and_prune` with the rules of ``cfg``."""
    strategy = DensifyStrategy.from_config(cfg, extent, generator)
    return strategy.densify_and_prune(g, opt, stats, densify=densify, size_prune=size_prune)


def active_degrees(cfg: FitConfig, step: int) -> tuple[int, int]:
    """(SH degree, time terms) in use at iteration ``step``: one more band every
    ``sh_increase_every`` iterations up to ``sh_degree``, then one more time term (4DGS)."""
    if cfg.sh_increase_every == 0:
        return cfg.sh_degree, cfg.time_basis
    ups = step // cfg.sh_increase_every
    deg = min(cfg.sh_degree, ups)
    return deg, min(cfg.time_basis, max(0, ups - cfg.sh_degree))


def _config_hash(cfg: FitConfig) -> str:
    no_effect = {n for n, f in FitConfig.model_fields.items() if (f.json_schema_extra or {}).get("no_effect")}
    d = cfg.model_dump(mode="json", exclude=no_effect)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _input_hash(matrix_dir: Path) -> str:
    h = hashlib.sha256((matrix_dir / "matrix.json").read_bytes())
    for p in sorted(matrix_dir.glob("view_*/frame_*.png")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_fit(matrix_dir: str | Path, out_dir: str | Path, cfg: FitConfig,
            on_step: Callable[[int, int, dict[str, float]], None] | None = None) -> dict:
    """Fit 4D Gaussians to the matrix in ``matrix_dir``; write the stage outputs into ``out_dir``.

    ``on_step(iteration, iterations, {"loss", "psnr", "num"})`` (optional) hears about progress every
    10 iterations and at the end; ``fit.json``'s ``curve`` keeps loss / PSNR / count at about 100
    evenly spaced iterations (MLflow curves).

    Returns the summary also written to ``fit.json``.
    """
    matrix_dir, out_dir = Path(matrix_dir), Path(out_dir)
    meta = read_matrix_meta(matrix_dir)
    if cfg.exclude_views and "V" in meta:  # bad exclusions fail before any work
        fitted_views(cfg, int(meta["V"]))
    device = resolve_device(cfg.device)
    backend = resolve_backend(cfg.backend, device)
    # fails fast when LPIPS is required but unavailable
    lpips_net, lpips_off_reason = load_fit_lpips(cfg, device)
    if cfg.turntable_frames > 0:  # fails fast when turntable.mp4 could not be written at the end
        try:
            video_plugin()
        except RuntimeError as e:
            raise RuntimeError(f"fit: {e} (or set fit.turntable_frames=0)") from None
    data = load_matrix(matrix_dir, cfg.resolution)
    images = data.images.to(device)  # [V, F, 3, H, W]
    v, f, _, h, w = images.shape
    kept = fitted_views(cfg, v)  # the views the fit samples (every view but fit.exclude_views)
    if min(h, w) < 11 and cfg.lambda_ssim > 0:
        raise ValueError(f"fit: images {h}x{w} are smaller than SSIM's 11px window")
    spec = OrbitSpec(radius=data.radius, fov_deg=data.fov_deg, elevation_deg=data.elevation_deg)
    viewmats, Ks = orbit_cameras(data.azimuths_deg, spec, w, h)  # [V, 4, 4], [V, 3, 3]
    # the fit's cameras are the kept views (3DGS's extent is that of its training cameras)
    extent = cfg.scene_extent if cfg.scene_extent is not None else scene_extent(viewmats[kept])
    viewmats, Ks = viewmats.to(device), Ks.to(device)
    times = torch.tensor(data.times, dtype=torch.float32, device=device)  # [F]
    bg = torch.full((3,), cfg.background, device=device)

    kept_t = torch.tensor(kept)
    gen = torch.Generator().manual_seed(cfg.seed)
    strategy = DensifyStrategy.from_config(cfg, extent, gen)
    ckpt_path = out_dir / "checkpoint.pt"
    cfg_hash = _config_hash(cfg)
    in_hash = _input_hash(matrix_dir)
    start = 0
    g: Gaussians4D | None = None
    stats: DensifyStats | None = None
    history: list[dict] = []
    curve: list[dict] = []  # kept in the checkpoint: a resumed fit reports the whole run
    ck = _read_checkpoint(ckpt_path)
    if ck is not None:
        if ck.get("config_hash") == cfg_hash and ck.get("input_hash") == in_hash:
            g = Gaussians4D.from_state(ck["gaussians"]).to(device)
            opt = make_optimizer(g, cfg, extent)
            opt.load_state_dict(ck["optimizer"])
            start = int(ck["iteration"])
            gen.set_state(ck["generator"])
            stats = DensifyStats.from_state(ck["densify_stats"], device)
            history = list(ck["densify_history"])
            curve = list(ck.get("curve", []))
    if g is None:
        common = dict(sh_degree=cfg.sh_degree, time_basis=cfg.time_basis, time_scale=cfg.init_time_scale,
                      generator=gen, time_margin=cfg.init_time_margin, opacity=cfg.init_opacity)
        if cfg.init == "carve":
            g = init_from_images(data.images[kept], viewmats[kept].cpu(), Ks[kept].cpu(), times.cpu(),
                                 cfg.num_gaussians,
                                 extent=cfg.init_extent, background=cfg.background, scale_init=cfg.init_scales,
                                 **common)
        else:
            g = init_random(cfg.num_gaussians, cfg.init_extent, **common)
            if cfg.init_scales == "knn":
                with torch.no_grad():
                    g.log_scales[:, :3] = torch.log(knn_scales(g.means[:, :3]))[:, None]
        g.time_period, g.temporal_cutoff, g.sh_direction = cfg.time_period, cfg.temporal_cutoff, cfg.sh_direction
        g = g.to(device)
        opt = make_optimizer(g, cfg, extent)
        stats = strategy.initialize_state(g.num, device)

    lr_time = (cfg.lr_time if cfg.lr_time is not None else cfg.lr_means) * extent
    logs: dict[str, Tensor] = {}
    curve_every = max(1, cfg.iterations // 100)
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, disable=not cfg.progress,
               desc="fit", dynamic_ncols=True)
    for it in bar:
        lr_xyz = _lr_means(cfg, extent, it)
        for group in opt.param_groups:
            if group["name"] == "means":
                group["lr"] = lr_xyz
        g.active_sh_degree, g.active_time_basis = active_degrees(cfg, it)
        pairs = torch.randint(0, len(kept) * f, (cfg.batch_size,), generator=gen)
        vi, fi = kept_t[pairs // f].to(device), (pairs % f).to(device)
        target = images[vi, fi]  # [B, 3, H, W]
        info: dict = {"width": w, "height": h}
        out, _ = g.render(times[fi], viewmats[vi][:, None], Ks[vi][:, None], w, h, background=bg,
                          backend=backend, info=info)  # [B, 1, H, W, 3]
        render = out[:, 0].permute(0, 3, 1, 2)  # [B, 3, H, W]
        loss, logs = fit_loss(render, target, cfg, lpips_net)
        step = it + 1
        opt.zero_grad(set_to_none=True)
        strategy.step_pre_backward(step, info)
        loss.backward()
        history += strategy.step_post_backward(g, opt, stats, step, info)
        t_before = g.means[:, 3].detach().clone()
        opt.step()
        _rescale_time_step(g, t_before, lr_xyz, lr_time)
        history += strategy.step_post_optimizer(g, opt, stats, step)
        if step % curve_every == 0 or step == cfg.iterations:
            curve.append({"iteration": step, "loss": float(logs["loss"]), "psnr": float(logs["psnr"]), "num": g.num})
        if (cfg.progress or on_step is not None) and (step % 10 == 0 or step == cfg.iterations):
            now = {"loss": float(logs["loss"]), "psnr": float(logs["psnr"]), "num": g.num}
            if cfg.progress:
                bar.set_postfix(loss=f"{now['loss']:.4f}", psnr=f"{now['psnr']:.2f}", n=g.num)
            if on_step is not None:
                on_step(step, cfg.iterations, now)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.iterations:
            save_tensor(ckpt_path, {"gaussians": g.export_state(), "optimizer": opt.state_dict(),
                                    "iteration": step, "generator": gen.get_state(), "config_hash": cfg_hash,
                                    "input_hash": in_hash, "densify_stats": stats.state(),
                                    "densify_history": history, "curve": curve})
    bar.close()
    fit_seconds = time.perf_counter() - t0
    g.active_sh_degree, g.active_time_basis = g.sh_degree, g.time_basis  # inactive bands are still zero

    # PSNR over the fitted views (training set) and over the views left out, if any (no gradients)
    with torch.no_grad():
        se, count = torch.zeros(v, dtype=torch.float64), 0
        for fj in range(f):
            out, _ = g.render(times[fj:fj + 1], viewmats[None], Ks[None], w, h, background=bg, backend=backend)
            se += ((out[0].permute(0, 3, 1, 2) - images[:, fj]) ** 2).double().sum(dim=(1, 2, 3)).cpu()
            count += images[0, fj].numel()

        def psnr_of(views: list[int]) -> float:
            return -10 * math.log10(max(float(se[views].sum()) / (count * len(views)), 1e-10))

        train_psnr = psnr_of(kept)
        excluded_psnr = psnr_of(list(cfg.exclude_views)) if cfg.exclude_views else None

    state = g.export_state()
    state["orbit"] = {"radius": spec.radius, "fov_deg": spec.fov_deg, "elevation_deg": spec.elevation_deg,
                      "azimuths_deg": data.azimuths_deg, "times": data.times, "resolution": h}
    from d2.stages.export import GAUSSIANS_FILE, export_ply_sequence, render_turntable, save_gaussians

    save_gaussians(out_dir / GAUSSIANS_FILE, state)

    if cfg.export_ply:
        export_ply_sequence(g, out_dir / "ply", data.times)
    if cfg.turntable_frames > 0:
        render_turntable(g, out_dir / "turntable.mp4", spec, h, cfg.turntable_frames, cfg.turntable_fps,
                         background=cfg.background, backend=backend)
    # no paths, no timings: the same matrix and config give the same bytes (the input is input_hash)
    summary = {
        "V": v, "F": f, "resolution": h, "iterations": cfg.iterations,
        "resumed_from": start, "num_gaussians": g.num, "backend": backend, "device": str(device),
        "final": {k: float(v) for k, v in logs.items()}, "train_psnr": train_psnr,
        "fitted_views": kept, "excluded_views": list(cfg.exclude_views), "excluded_views_psnr": excluded_psnr,
        "objective": objective_description(cfg, lpips_net is not None),
        "lpips_in_loss": lpips_net is not None, "lpips_left_out_because": lpips_off_reason,
        "scene_extent": extent, "densification": history, "curve": curve,
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg_hash, "input_hash": in_hash,
    }
    write_json(out_dir / "fit.json", summary)
    if ckpt_path.exists():
        ckpt_path.unlink()
    return {**summary, "fit_seconds": fit_seconds}


def _read_checkpoint(path: Path) -> dict | None:
    """The checkpoint at ``path``, or None when there is none or it cannot be read (an unreadable
    checkpoint means starting over, never a failed fit)."""
    if not path.is_file():
        return None
    try:
        ck = load_tensor(path)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a damaged archive)
        print(f"fit: ignoring the unreadable checkpoint {path} ({type(e).__name__}); starting over")
        return None
    return ck if isinstance(ck, dict) else None
