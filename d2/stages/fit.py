"""Stage 2: fit native 4D Gaussians to a sampled image matrix (paper Section 3.2, Fig. 2 (iii)).

Objective (paper, after V3D): ``L = lambda_lpips C_lpips L_lpips + lambda_ssim C_ssim L_ssim``
with ``L_ssim = 1 - SSIM`` and per-image confidences computed without gradient,
``C_ssim = SSIM(render, target)`` and ``C_lpips = 1 - LPIPS(render, target)``; an optional
L1 term (the paper uses none). LPIPS loads its VGG backbone from local weights
(:func:`d2.eval.metrics.build_lpips`): without them the run stops before any work unless
``lambda_lpips`` is set to 0.

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
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm

from d2.stages.cameras import OrbitSpec, orbit_cameras
from d2.stages.gaussians import PARAM_NAMES, Gaussians4D, init_from_images, init_random, rotation_4d
from d2.stages.render import resolve_backend
from d2.utils.io import load_image, load_tensor, save_image, save_tensor, video_plugin, write_json


class FitConfig(BaseModel):
    """Knobs of the 4D Gaussian fit (stage 2)."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(300, ge=0)  # optimisation steps; the paper uses 5000 (the small default suits CPU runs)
    batch_size: int = Field(4, ge=1)  # (view, frame) pairs rendered per iteration
    resolution: int | None = Field(None, ge=11)  # fit at this square size (None: the matrix's own resolution)
    num_gaussians: int = Field(2000, ge=1)  # Gaussians at initialisation
    max_gaussians: int = Field(50000, ge=1)  # densification never grows the set past this
    init: Literal["carve", "random"] = "carve"  # carve: space carving of the matrix itself; random: uniform cube
    init_extent: float = Field(0.6, gt=0)  # half side of the cube initial Gaussians are drawn in (world units)
    init_time_scale: float = Field(0.25, gt=0)  # initial temporal standard deviation (time runs over [0, 1])
    sh_degree: int = Field(1, ge=0, le=3)  # spherical-harmonics degree of the colour
    time_basis: int = Field(2, ge=0)  # cosine terms cos(pi k t), k = 1..time_basis, on the colour's DC
    lr_means: float = Field(1.6e-3, ge=0)  # Adam learning rate of the 4D means (world units / time)
    lr_means_final: float = Field(0.05, gt=0, le=1)  # the means' rate decays exponentially to lr_means * this
    lr_scales: float = Field(5e-3, ge=0)  # learning rate of the 4 log-scales
    lr_quats: float = Field(1e-3, ge=0)  # learning rate of the two rotation quaternions
    lr_opacity: float = Field(5e-2, ge=0)  # learning rate of the opacity logits
    lr_sh: float = Field(2.5e-3, ge=0)  # learning rate of the DC colour and its time coefficients
    lr_sh_rest: float = Field(1.25e-4, ge=0)  # learning rate of the higher SH bands
    lambda_lpips: float = Field(1.0, ge=0)  # weight of the confidence-weighted LPIPS term (needs VGG16 weights)
    lambda_ssim: float = Field(1.0, ge=0)  # weight of the confidence-weighted D-SSIM (1 - SSIM) term
    lambda_l1: float = Field(0.0, ge=0)  # weight of an optional L1 term (the paper uses none)
    lpips_vgg_weights: Path | None = None  # torchvision vgg16-397923af.pth; None: search as d2.eval.metrics does
    densify_from: int = Field(100, ge=0)  # first iteration that may densify or prune
    densify_until_frac: float = Field(0.6, ge=0, le=1)  # densify and prune only before this fraction of iterations
    densify_every: int = Field(100, ge=1)  # iterations between densification/pruning steps
    densify_fraction: float = Field(0.05, ge=0, le=1)  # share of Gaussians (largest mean gradient) split per step
    split_scale: float = Field(0.02, gt=0)  # Gaussians wider than this (world units) shrink by 1.6 when split
    prune_opacity: float = Field(0.005, ge=0, lt=1)  # prune when the peak opacity over t in [0, 1] is below this
    background: float = Field(1.0, ge=0, le=1)  # grey level behind the Gaussians (the matrices are on white)
    backend: Literal["auto", "torch", "gsplat"] = "auto"  # rasterizer: auto = gsplat on CUDA, torch otherwise
    device: str = "auto"  # torch device; auto = cuda when available, else cpu
    progress: bool = True  # show a progress bar
    checkpoint_every: int = Field(500, ge=0)  # iterations between checkpoints (0: none); a matching one is resumed
    seed: int = 0  # seed of initialisation and of the (view, frame) sampling
    export_ply: bool = True  # write ply/t_XX.ply (one standard 3DGS PLY per frame time)
    turntable_frames: int = Field(48, ge=0)  # frames of turntable.mp4 (one orbit while time runs 0 -> 1); 0: none
    turntable_fps: int = Field(12, ge=1)  # frame rate of turntable.mp4


# fields that do not change the result: excluded from the resume check
_RUN_ONLY = {"progress", "checkpoint_every", "device", "export_ply", "turntable_frames", "turntable_fps"}


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


def load_matrix(matrix_dir: str | Path, resolution: int | None = None) -> MatrixData:
    """Read ``matrix.json`` and every ``view_XX/frame_YY.png`` (checked before any image is decoded)."""
    matrix_dir = Path(matrix_dir)
    meta_path = matrix_dir / "matrix.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no matrix.json in {matrix_dir} (expected the sampling stage's matrix layout)")
    meta = json.loads(meta_path.read_text())
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


def load_fit_lpips(cfg: FitConfig, device: torch.device) -> torch.nn.Module | None:
    """The LPIPS network for the loss, or None when ``lambda_lpips == 0``.

    Raises:
        RuntimeError: LPIPS weights are missing and ``lambda_lpips > 0`` (names the fix).
    """
    if cfg.lambda_lpips == 0:
        return None
    from d2.eval.metrics import MetricUnavailable, build_lpips

    try:
        return build_lpips(cfg.lpips_vgg_weights, device=str(device))
    except MetricUnavailable as e:
        raise RuntimeError(
            f"fit: the LPIPS loss is unavailable ({e}). Provide the VGG16 weights (fit.lpips_vgg_weights) "
            "or set fit.lambda_lpips=0 explicitly to fit without the perceptual term."
        ) from e


def fit_loss(render: Tensor, target: Tensor, cfg: FitConfig, lpips_net: torch.nn.Module | None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Confidence-weighted LPIPS + D-SSIM (+ optional L1): render, target [B, 3, H, W] -> scalar loss.

    The logs are detached 0-d tensors (no device sync here; call ``float`` when displaying).
    """
    from d2.eval.metrics import lpips_distance, ssim

    total = render.new_zeros(())
    logs: dict[str, Tensor] = {}
    if cfg.lambda_ssim > 0:
        s = ssim(render, target)  # [B]
        c_ssim = s.detach().clamp(min=0.0)
        total = total + cfg.lambda_ssim * (c_ssim * (1.0 - s)).mean()
        logs["ssim"] = s.detach().mean()
    if cfg.lambda_lpips > 0:
        if lpips_net is None:
            raise RuntimeError("fit_loss: lambda_lpips > 0 but no LPIPS network was given")
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


def make_optimizer(g: Gaussians4D, cfg: FitConfig) -> torch.optim.Adam:
    """Adam with one named group per parameter tensor."""
    lrs = {"means": cfg.lr_means, "log_scales": cfg.lr_scales, "quats_l": cfg.lr_quats, "quats_r": cfg.lr_quats,
           "opacity_logits": cfg.lr_opacity, "sh_dc": cfg.lr_sh, "sh_rest": cfg.lr_sh_rest,
           "time_coefs": cfg.lr_sh}
    groups = [{"params": [getattr(g, k)], "lr": lrs[k], "name": k} for k in PARAM_NAMES]
    return torch.optim.Adam(groups, lr=cfg.lr_means, eps=1e-15)


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


@torch.no_grad()
def densify_and_prune(g: Gaussians4D, opt: torch.optim.Adam, grad_accum: Tensor, grad_count: Tensor,
                      cfg: FitConfig, generator: torch.Generator) -> dict[str, int]:
    """Split the Gaussians with the largest mean positional gradient, prune invisible ones.

    Split: the chosen Gaussian is replaced by two samples of its own 4D distribution; those
    wider than ``split_scale`` shrink by 1.6 (3DGS's rule). Pruned: peak opacity over
    t in [0, 1] below ``prune_opacity``. The set never grows past ``max_gaussians``.
    """
    n = g.num
    dev = g.means.device
    p = {k: getattr(g, k).detach() for k in PARAM_NAMES}
    # peak opacity over t in [0, 1]
    cov = g.covariance()
    s_tt = cov[:, 3, 3].clamp(min=1e-12)
    gap = (p["means"][:, 3] - p["means"][:, 3].clamp(0, 1)).abs()
    peak = torch.sigmoid(p["opacity_logits"]) * torch.exp(-0.5 * gap * gap / s_tt)
    keep = peak >= cfg.prune_opacity
    if keep.sum() == 0:  # never prune everything
        keep[torch.argmax(peak)] = True
    score = torch.where(grad_count > 0, grad_accum / grad_count.clamp(min=1), torch.zeros_like(grad_accum))
    score = torch.where(keep, score, torch.zeros_like(score))
    n_keep = int(keep.sum())
    budget = max(0, cfg.max_gaussians - n_keep)
    n_split = min(int(cfg.densify_fraction * n_keep), budget, int((score > 0).sum()))
    split = torch.zeros(n, dtype=torch.bool, device=dev)
    if n_split > 0:
        split[torch.topk(score, n_split).indices] = True
    base = keep & ~split
    idx_keep = torch.nonzero(base).squeeze(-1)
    idx_split = torch.nonzero(split).squeeze(-1)
    new = {k: [v[idx_keep]] for k, v in p.items()}
    if n_split > 0:
        # samples mu + R diag(s) z of each chosen 4D Gaussian (no factorisation of Sigma needed)
        L = rotation_4d(p["quats_l"][idx_split], p["quats_r"][idx_split]) * torch.exp(
            p["log_scales"][idx_split]).unsqueeze(-2)  # [S, 4, 4]
        for _ in range(2):
            z = torch.randn(n_split, 4, 1, generator=generator, dtype=cov.dtype).to(dev)
            for k, v in p.items():
                new[k].append(v[idx_split])
            new["means"][-1] = p["means"][idx_split] + (L @ z).squeeze(-1)
            ls = p["log_scales"][idx_split].clone()
            wide = ls[:, :3].amax(-1) > math.log(cfg.split_scale)
            ls[wide, :3] -= math.log(1.6)
            new["log_scales"][-1] = ls
    cat = {k: torch.cat(v) for k, v in new.items()}
    index = torch.cat([idx_keep, idx_split, idx_split])
    fresh = torch.cat([torch.zeros_like(idx_keep, dtype=torch.bool), torch.ones(2 * n_split, dtype=torch.bool,
                                                                                device=dev)])
    _replace_rows(g, opt, cat, index, fresh)
    return {"pruned": int((~keep).sum()), "split": n_split, "num": g.num}


def _config_hash(cfg: FitConfig) -> str:
    d = cfg.model_dump(mode="json", exclude=_RUN_ONLY)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _input_hash(matrix_dir: Path) -> str:
    h = hashlib.sha256((matrix_dir / "matrix.json").read_bytes())
    for p in sorted(matrix_dir.glob("view_*/frame_*.png")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def run_fit(matrix_dir: str | Path, out_dir: str | Path, cfg: FitConfig) -> dict:
    """Fit 4D Gaussians to the matrix in ``matrix_dir``; write the stage outputs into ``out_dir``.

    Returns the summary also written to ``fit.json``.
    """
    matrix_dir, out_dir = Path(matrix_dir), Path(out_dir)
    device = resolve_device(cfg.device)
    backend = resolve_backend(cfg.backend, device)
    lpips_net = load_fit_lpips(cfg, device)  # fails fast when LPIPS is wanted but unavailable
    if cfg.turntable_frames > 0:  # fails fast when turntable.mp4 could not be written at the end
        try:
            video_plugin()
        except RuntimeError as e:
            raise RuntimeError(f"fit: {e} (or set fit.turntable_frames=0)") from None
    data = load_matrix(matrix_dir, cfg.resolution)
    images = data.images.to(device)  # [V, F, 3, H, W]
    v, f, _, h, w = images.shape
    if min(h, w) < 11 and cfg.lambda_ssim > 0:
        raise ValueError(f"fit: images {h}x{w} are smaller than SSIM's 11px window")
    spec = OrbitSpec(radius=data.radius, fov_deg=data.fov_deg, elevation_deg=data.elevation_deg)
    viewmats, Ks = orbit_cameras(data.azimuths_deg, spec, w, h)  # [V, 4, 4], [V, 3, 3]
    viewmats, Ks = viewmats.to(device), Ks.to(device)
    times = torch.tensor(data.times, dtype=torch.float32, device=device)  # [F]
    bg = torch.full((3,), cfg.background, device=device)

    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_path = out_dir / "checkpoint.pt"
    cfg_hash = _config_hash(cfg)
    in_hash = _input_hash(matrix_dir)
    start = 0
    g: Gaussians4D | None = None
    grad_accum = grad_count = None
    ck = _read_checkpoint(ckpt_path)
    if ck is not None:
        if ck.get("config_hash") == cfg_hash and ck.get("input_hash") == in_hash:
            g = Gaussians4D.from_state(ck["gaussians"]).to(device)
            opt = make_optimizer(g, cfg)
            opt.load_state_dict(ck["optimizer"])
            start = int(ck["iteration"])
            gen.set_state(ck["generator"])
            grad_accum, grad_count = ck["grad_accum"].to(device), ck["grad_count"].to(device)
    if g is None:
        if cfg.init == "carve":
            g = init_from_images(data.images, viewmats.cpu(), Ks.cpu(), times.cpu(), cfg.num_gaussians,
                                 extent=cfg.init_extent, background=cfg.background, sh_degree=cfg.sh_degree,
                                 time_basis=cfg.time_basis, time_scale=cfg.init_time_scale, generator=gen)
        else:
            g = init_random(cfg.num_gaussians, cfg.init_extent, cfg.sh_degree, cfg.time_basis,
                            cfg.init_time_scale, generator=gen)
        g = g.to(device)
        opt = make_optimizer(g, cfg)
        grad_accum = torch.zeros(g.num, device=device)
        grad_count = torch.zeros(g.num, device=device)

    decay = cfg.lr_means_final ** (1.0 / max(1, cfg.iterations))
    densify_until = int(cfg.densify_until_frac * cfg.iterations)
    logs: dict[str, Tensor] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, disable=not cfg.progress,
               desc="fit", dynamic_ncols=True)
    for it in bar:
        for group in opt.param_groups:
            if group["name"] == "means":
                group["lr"] = cfg.lr_means * decay ** it
        pairs = torch.randint(0, v * f, (cfg.batch_size,), generator=gen)
        vi, fi = (pairs // f).to(device), (pairs % f).to(device)
        target = images[vi, fi]  # [B, 3, H, W]
        out, _ = g.render(times[fi], viewmats[vi][:, None], Ks[vi][:, None], w, h, background=bg,
                          backend=backend)  # [B, 1, H, W, 3]
        render = out[:, 0].permute(0, 3, 1, 2)  # [B, 3, H, W]
        loss, logs = fit_loss(render, target, cfg, lpips_net)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            gn = g.means.grad[:, :3].norm(dim=-1)
            grad_accum += gn
            grad_count += (gn > 0).float()
        opt.step()
        step = it + 1
        if cfg.densify_from <= step < densify_until and step % cfg.densify_every == 0:
            densify_and_prune(g, opt, grad_accum, grad_count, cfg, gen)
            grad_accum = torch.zeros(g.num, device=device)
            grad_count = torch.zeros(g.num, device=device)
        if cfg.progress and (step % 10 == 0 or step == cfg.iterations):
            bar.set_postfix(loss=f"{logs['loss']:.4f}", psnr=f"{logs['psnr']:.2f}", n=g.num)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.iterations:
            save_tensor(ckpt_path, {"gaussians": g.export_state(), "optimizer": opt.state_dict(),
                                    "iteration": step, "generator": gen.get_state(), "config_hash": cfg_hash,
                                    "input_hash": in_hash, "grad_accum": grad_accum.cpu(),
                                    "grad_count": grad_count.cpu()})
    bar.close()
    fit_seconds = time.perf_counter() - t0

    # training-set PSNR over the whole matrix (no gradients)
    with torch.no_grad():
        se, count = 0.0, 0
        for fj in range(f):
            out, _ = g.render(times[fj:fj + 1], viewmats[None], Ks[None], w, h, background=bg, backend=backend)
            se += float(((out[0].permute(0, 3, 1, 2) - images[:, fj]) ** 2).sum())
            count += images[:, fj].numel()
        train_psnr = -10 * math.log10(max(se / count, 1e-10))

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
