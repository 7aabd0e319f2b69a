"""The composition experiment on the miniature world.

Video-to-4D setting of the benchmark: for every held-out benchmark object the input is the
monocular video at azimuth 0; the conditions are that video and a reference orbit sampled by
the multi-view prior from its first frame (input view replaced by the input, as the
conditions stage does). The V x F matrix is then sampled three ways with the same sampler,
noise and conditions:

    composed        the composed sampler with the default (authors') weights
    video_only      w_video = 1 everywhere: every row is an independent video-prior sample
    multiview_only  w_multiview = 1 everywhere: every column an independent multi-view sample

(the sampling stage's methods ``diffusion2``, ``video_only`` and ``multiview_only``,
:mod:`d2.stages.sampling`)
and scored against the exact renders of the world at the same cameras and times
(``scene.render(orbit_azimuths(V), frame_times(F))``):

    psnr, ssim     per image (mean over the matrix; ``novel_psnr``: without the input view's row)
    tde            temporal-difference error: RMSE between the matrix's frame-to-frame
                   differences M[v, f+1] - M[v, f] and the truth's; flicker and wrong motion
                   raise it, a constant appearance error does not
    vde            view-difference error: the same along the orbit (cyclic, M[v+1, f] - M[v, f]);
                   views that disagree about the object raise it
    flicker        mean |M[v, f+1] - M[v, f]| / mean |G[v, f+1] - G[v, f]| (1 = as much change
                   between frames as the truth; > 1 flicker, < 1 frozen)
    combined       (tde + vde) / 2, lower is better: the issue's "combined measure"

Reference rows: ``truth`` (all zeros / perfect) and ``static`` (the sampling stage's ``static``
method, the input frame copied into every entry: the error of a matrix with no motion and no
view change).

Also the Figure-5 ablation in miniature: the composed sampler with the logistic schedule at
s0 in {0.3, 0.5, 0.7} x k in {5, 20, 50}, as a table and an image grid.

Command::

    python -m d2.train.experiment --priors data/priors --out runs/composition [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from d2.stages.cameras import OrbitSpec, frame_times, orbit_azimuths
from d2.stages.priors import Prior, load_prior_folder

METHODS = ("composed", "video_only", "multiview_only")  # this experiment's labels
STAGE_METHOD = {"composed": "diffusion2", "video_only": "video_only", "multiview_only": "multiview_only"}  # sampling.method of each


class ExperimentConfig(BaseModel):
    """Knobs of the composition experiment."""

    model_config = ConfigDict(extra="forbid")
    priors_dir: str = "data/priors"  # folder with video/ and multiview/ prior folders
    objects: list[str] = Field(default_factory=list)  # benchmark objects; empty: all
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])  # sampler seeds (noise, reference orbit)
    num_views: int | None = None  # V; None: the priors' training length
    num_frames: int | None = None  # F; None: the priors' training length
    elevation_deg: float = 0.0  # orbit elevation of the truth and of the conditions
    num_steps: int = 25  # denoising steps (matrix and reference orbit)
    rollback_steps: int = 5  # the first steps taken twice (authors: 10 of 50)
    chunk_size: int = 8  # rows / columns per UNet call
    oracle_orbit: bool = False  # also run with the true orbit at frame 0 as the reference orbit
    sampled_orbit: bool = True  # run with the reference orbit sampled by the multi-view prior (the pipeline)
    ablation: bool = True  # run the s0 x k grid
    ablation_s0: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7])  # logistic midpoints
    ablation_k: list[float] = Field(default_factory=lambda: [5.0, 20.0, 50.0])  # logistic steepness
    ablation_seeds: list[int] = Field(default_factory=lambda: [0])  # seeds of the ablation
    ablation_objects: list[str] = Field(default_factory=list)  # objects of the ablation; empty: same as objects
    fit_iterations: int = 0  # > 0: fit 4D Gaussians to each matrix of the first seed and score the eval views
    fit_l1: float = 1.0  # L1 weight of that fit (LPIPS weights are absent offline: D-SSIM + L1 instead)
    eval_azimuths_deg: list[float] = Field(default_factory=lambda: [-75.0, 15.0, 105.0, 195.0])  # Consistent4D views
    ssim_window: int = 7  # SSIM Gaussian window (11 does not fit 16 px images well)
    ssim_sigma: float = 1.0  # SSIM Gaussian sigma
    device: str = "cpu"  # torch device
    threads: int = 1  # torch CPU threads
    progress: bool = True  # progress bars


# ---------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------


def matrix_metrics(m: Tensor, g: Tensor, input_view: int, ssim_window: int = 7, ssim_sigma: float = 1.0
                   ) -> dict[str, float]:
    """Scores of a matrix ``m`` against the truth ``g``, both [V, F, 3, H, W] in [0, 1] (see module doc)."""
    from d2.eval.metrics import psnr, ssim

    if m.shape != g.shape or m.ndim != 5:
        raise ValueError(f"matrix {tuple(m.shape)} and truth {tuple(g.shape)} must both be [V, F, 3, H, W]")
    v, f = m.shape[:2]
    flat_m, flat_g = m.reshape(-1, *m.shape[2:]).float(), g.reshape(-1, *g.shape[2:]).float()
    p = psnr(flat_m, flat_g).view(v, f)
    s = ssim(flat_m, flat_g, window_size=ssim_window, sigma=ssim_sigma).view(v, f)
    novel = [i for i in range(v) if i != input_view]
    dt_m, dt_g = m[:, 1:] - m[:, :-1], g[:, 1:] - g[:, :-1]  # [V, F-1, ...]
    dv_m, dv_g = m.roll(-1, 0) - m, g.roll(-1, 0) - g  # [V, F, ...] cyclic orbit
    tde = float(((dt_m - dt_g) ** 2).mean().sqrt())
    vde = float(((dv_m - dv_g) ** 2).mean().sqrt())
    flicker = float(dt_m.abs().mean() / dt_g.abs().mean().clamp_min(1e-8))
    view_change = float(dv_m.abs().mean() / dv_g.abs().mean().clamp_min(1e-8))
    return {
        "psnr": float(p.mean()), "ssim": float(s.mean()), "novel_psnr": float(p[novel].mean()),
        "novel_ssim": float(s[novel].mean()), "tde": tde, "vde": vde, "combined": (tde + vde) / 2,
        "flicker": flicker, "view_change": view_change,
    }


# ---------------------------------------------------------------------------------------
# one object
# ---------------------------------------------------------------------------------------


def truth_matrix(scene: Any, v: int, f: int, resolution: int, elevation_deg: float) -> Tensor:
    """[V, F, 3, R, R] renders of ``scene`` at the SV3D orbit (input view last) and the frame times."""
    spec = OrbitSpec(elevation_deg=elevation_deg)
    return scene.render(orbit_azimuths(v), frame_times(f), resolution, spec, elevations_deg=[elevation_deg] * v)


# the 4DGS code's training schedule and sizes, as this experiment was run
FOUR_DGS_SCHEDULE = dict(num_gaussians=2000, max_gaussians=1_000_000, sh_degree=3, sh_increase_every=1000, lr_means=1.6e-4,
                         lr_means_max_steps=30000, densify_from=500, densify_until=15000, densify_every=100,
                         opacity_reset_every=3000, opacity_reset_at_densify_from=True)


def make_video_conditions(video: Tensor, priors: tuple[Prior, Prior], v: int, seed: int, cfg: ExperimentConfig,
                          oracle_orbit: Tensor | None = None) -> Any:
    """Conditions of a monocular-video input (the conditions stage's path, on tensors)."""
    from d2.stages.conditions import Conditions, ConditionsConfig, sample_reference_orbit

    f = video.shape[0]
    ccfg = ConditionsConfig(num_views=v, num_frames=f, resolution=video.shape[-1], elevation_deg=cfg.elevation_deg,
                            num_steps=cfg.num_steps, seed=seed, chunk_size=cfg.chunk_size, orbit_decoder="image",
                            decode_chunk=10, progress=False)
    az = orbit_azimuths(v)
    if oracle_orbit is None:
        orbit = sample_reference_orbit(priors[1], video[0], az, cfg.elevation_deg, ccfg)
    else:
        orbit = oracle_orbit.clone()
    orbit[v - 1] = video[0]
    return Conditions(orbit=orbit.float(), video=video.float(), input=video[0].float(), azimuths_deg=az,
                      elevation_deg=cfg.elevation_deg, fov_deg=ccfg.fov_deg, radius=ccfg.radius,
                      input_view_index=v - 1, kind="video")


def sampling_config(method: str, v: int, f: int, resolution: int, seed: int, cfg: ExperimentConfig,
                    s0: float | None = None, k: float | None = None) -> Any:
    """The sampler's config of one method (composed: ``logistic`` when s0 and k are given, else the
    authors' constant 0.6; the extremes ignore the weight schedule)."""
    from d2.stages.sampling import SamplingConfig

    if method not in STAGE_METHOD:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    base = dict(method=STAGE_METHOD[method], num_views=v, num_frames=f, resolution=resolution,
                num_steps=cfg.num_steps, rollback_steps=cfg.rollback_steps, seed=seed, chunk_size=cfg.chunk_size,
                decode_chunk=14, progress=False)
    if s0 is not None and k is not None:
        return SamplingConfig(**base, weight_schedule="logistic", s0=s0, k=k)
    return SamplingConfig(**base, weight_schedule="constant")


def sample_images(priors: tuple[Prior, Prior], conditions: Any, scfg: Any) -> Tensor:
    """[V, F, 3, H, W] decoded matrix in [0, 1] (the sampling stage's method)."""
    from d2.stages.sampling import method_matrix

    return method_matrix(priors, conditions, scfg)[1].clamp(0, 1)


def fit_and_score(mat: Tensor, scene: Any, work: Path, cfg: ExperimentConfig) -> dict[str, float]:
    """Fit 4D Gaussians (the fitting stage) to a matrix [V, F, 3, R, R]; PSNR/SSIM at the eval views vs truth."""
    from d2.eval.metrics import psnr, ssim
    from d2.stages.export import render_eval_views
    from d2.stages.fit import FitConfig, run_fit, write_matrix
    from d2.utils.io import load_image

    v, f, _, res, _ = mat.shape
    spec = OrbitSpec(elevation_deg=cfg.elevation_deg)
    write_matrix(work / "matrix", mat, orbit_azimuths(v), frame_times(f), spec)
    fcfg = FitConfig(iterations=cfg.fit_iterations, lambda_lpips=0.0, lambda_l1=cfg.fit_l1, backend="torch",
                     device=cfg.device, progress=False, export_ply=False, turntable_frames=0, checkpoint_every=0,
                     **FOUR_DGS_SCHEDULE)
    run_fit(work / "matrix", work / "fit", fcfg)
    render_eval_views(work / "fit", work / "eval", cfg.eval_azimuths_deg, f, res,
                      backend="torch", device=cfg.device)
    pred = torch.stack([torch.stack([load_image(work / "eval" / f"eval_{k}" / f"{i}.png") for i in range(f)])
                        for k in range(len(cfg.eval_azimuths_deg))])  # [E, F, 3, R, R]
    gt = scene.render(cfg.eval_azimuths_deg, frame_times(f), res, spec,
                      elevations_deg=[cfg.elevation_deg] * len(cfg.eval_azimuths_deg))
    gt = (gt * 255 + 0.5).floor() / 255  # the same 8-bit quantisation as the PNGs
    a, b = pred.reshape(-1, 3, res, res), gt.reshape(-1, 3, res, res)
    return {"fit_psnr": float(psnr(a, b).mean()),
            "fit_ssim": float(ssim(a, b, window_size=cfg.ssim_window, sigma=cfg.ssim_sigma).mean())}


# ---------------------------------------------------------------------------------------
# aggregation and reporting
# ---------------------------------------------------------------------------------------

KEYS = ("psnr", "ssim", "novel_psnr", "tde", "vde", "combined", "flicker", "view_change")


def aggregate(rows: list[dict[str, Any]], group: tuple[str, ...], keys: tuple[str, ...] = KEYS
              ) -> list[dict[str, Any]]:
    """Mean and std over seeds of per-(group, seed) means over objects (objects first, then seeds)."""
    out: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault(tuple(r[g] for g in group), {}).setdefault(r["seed"], []).append(r)
    table = []
    for key, by_seed in out.items():
        entry: dict[str, Any] = dict(zip(group, key))
        entry["n_seeds"] = len(by_seed)
        entry["n_objects"] = len(next(iter(by_seed.values())))
        for m in keys:
            per_seed = torch.tensor([sum(r[m] for r in rs) / len(rs) for rs in by_seed.values()], dtype=torch.float64)
            entry[m] = float(per_seed.mean())
            entry[m + "_std"] = float(per_seed.std()) if len(per_seed) > 1 else 0.0
        table.append(entry)
    return table


def markdown_table(table: list[dict[str, Any]], group: tuple[str, ...]) -> str:
    """The aggregated table as markdown (mean +- std over seeds)."""
    head = "| " + " | ".join(group) + " | PSNR | SSIM | novel PSNR | TDE | VDE | combined | flicker | view change |"
    sep = "|" + "---|" * (len(group) + 8)
    lines = [head, sep]
    for e in table:
        cells = [str(e[g]) for g in group]
        for m, fmt in (("psnr", ".2f"), ("ssim", ".3f"), ("novel_psnr", ".2f"), ("tde", ".4f"), ("vde", ".4f"),
                       ("combined", ".4f"), ("flicker", ".2f"), ("view_change", ".2f")):
            cells.append(f"{e[m]:{fmt}} ± {e[m + '_std']:{fmt}}" if e["n_seeds"] > 1 else f"{e[m]:{fmt}}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fit_md(table: list[dict[str, Any]], cfg: ExperimentConfig) -> str:
    lines = [f"After the 4D fit ({cfg.fit_iterations} iterations, D-SSIM + {cfg.fit_l1} L1), first seed, eval "
             f"azimuths {cfg.eval_azimuths_deg}:", "", "| setting | method | PSNR | SSIM |", "|---|---|---|---|"]
    lines += [f"| {e['setting']} | {e['method']} | {e['fit_psnr']:.2f} | {e['fit_ssim']:.3f} |" for e in table]
    return "\n".join(lines) + "\n\n"


def _upscale(img: Tensor, factor: int) -> Tensor:
    return torch.nn.functional.interpolate(img[None], scale_factor=factor, mode="nearest")[0]


# ---------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------


def load_mini_priors(priors_dir: str | Path, device: str) -> tuple[Prior, Prior, dict[str, Any]]:
    """(video prior, multi-view prior, the video prior's d2_prior.json) from a priors folder."""
    from d2.stages.priors import read_prior_meta

    d = Path(priors_dir)
    video = load_prior_folder(d / "video", "video", device=device).eval().requires_grad_(False)
    mv = load_prior_folder(d / "multiview", "multiview", device=device).eval().requires_grad_(False)
    return video, mv, read_prior_meta(d / "video") or {}


def run_experiment(out_dir: str | Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """Run the composition experiment (and the ablation); write tables, images and ``results.json``."""
    from tqdm.auto import tqdm

    import d2.world as world
    from d2.stages.sampling import static_matrix
    from d2.utils.io import image_grid, save_image, write_json, write_text

    torch.set_num_threads(cfg.threads)
    objects = cfg.objects or list(world.benchmark_objects())
    unknown = [o for o in objects if o not in world.benchmark_objects()]
    if unknown:
        raise ValueError(f"unknown benchmark objects {unknown}; known: {world.benchmark_objects()}")
    video_prior, mv_prior, meta = load_mini_priors(cfg.priors_dir, cfg.device)
    priors = (video_prior, mv_prior)
    res = video_prior.resolution
    n_train = int(meta.get("num_frames", video_prior.default_num_frames))
    v = cfg.num_views or n_train
    f = cfg.num_frames or n_train
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    truths = {o: truth_matrix(world.make_scene(o), v, f, res, cfg.elevation_deg) for o in objects}

    rows: list[dict[str, Any]] = []
    examples: dict[str, Tensor] = {}
    settings = (["sampled"] if cfg.sampled_orbit else []) + (["oracle"] if cfg.oracle_orbit else [])
    if not settings:
        raise ValueError("nothing to run: sampled_orbit and oracle_orbit are both off")
    jobs = [(o, s, st) for o in objects for s in cfg.seeds for st in settings]
    for obj, seed, setting in tqdm(jobs, desc="composition", disable=not cfg.progress, dynamic_ncols=True):
        g = truths[obj]
        video = g[v - 1]  # [F, 3, R, R] the input video (azimuth 0 = the orbit's last view)
        cond = make_video_conditions(video, priors, v, seed, cfg, oracle_orbit=g[:, 0] if setting == "oracle" else None)
        static = static_matrix(cond, v, f)
        for name, mat in (("truth", g), ("static", static)):
            if seed == cfg.seeds[0]:
                rows.append({"object": obj, "seed": seed, "setting": setting, "method": name,
                             **matrix_metrics(mat, g, v - 1, cfg.ssim_window, cfg.ssim_sigma), "seconds": 0.0})
        ref_orbit_metrics = matrix_metrics(cond.orbit[:, None], g[:, :1], v - 1, cfg.ssim_window, cfg.ssim_sigma)
        for method in METHODS:
            ts = time.time()
            mat = sample_images(priors, cond, sampling_config(method, v, f, res, seed, cfg))
            row = {"object": obj, "seed": seed, "setting": setting, "method": method,
                   **matrix_metrics(mat, g, v - 1, cfg.ssim_window, cfg.ssim_sigma),
                   "seconds": round(time.time() - ts, 2), "ref_orbit_psnr": ref_orbit_metrics["psnr"]}
            if cfg.fit_iterations > 0 and seed == cfg.seeds[0]:
                row.update(fit_and_score(mat, world.make_scene(obj), out / "fits" / f"{setting}_{obj}_{method}", cfg))
            rows.append(row)
            if seed == cfg.seeds[0]:
                examples[f"{setting}/{obj}/{method}"] = mat
    # static/truth rows exist only for the first seed: replicate them so every seed has them
    extra = []
    for r in rows:
        if r["method"] in ("truth", "static"):
            extra += [{**r, "seed": s} for s in cfg.seeds[1:]]
    rows += extra
    main_table = aggregate(rows, ("setting", "method"))
    fit_rows = [r for r in rows if "fit_psnr" in r]
    fit_table = aggregate(fit_rows, ("setting", "method"), keys=("fit_psnr", "fit_ssim")) if fit_rows else []
    per_object = aggregate(rows, ("setting", "object", "method"))

    # images: per object, truth | composed | video-only | multi-view-only (rows = views, columns = frames)
    img_dir = out / "images"
    for obj in objects:
        for setting in settings:
            mats = [truths[obj]] + [examples[f"{setting}/{obj}/{m}"] for m in METHODS]
            tiles = torch.cat([torch.cat([mm, torch.ones(v, 1, *mm.shape[2:])], dim=1) for mm in mats], dim=1)
            save_image(img_dir / f"{setting}_{obj}.png", _upscale(image_grid(tiles[:, :-1]), 4))

    ablation_rows: list[dict[str, Any]] = []
    if cfg.ablation:
        ab_objects = cfg.ablation_objects or objects
        ab_jobs = [(o, s, s0, k) for o in ab_objects for s in cfg.ablation_seeds for s0 in cfg.ablation_s0
                   for k in cfg.ablation_k]
        grid_obj = ab_objects[0]
        cells: dict[tuple[float, float], Tensor] = {}
        conds: dict[tuple[str, int], Any] = {}
        for obj, seed, s0, k in tqdm(ab_jobs, desc="ablation s0 x k", disable=not cfg.progress, dynamic_ncols=True):
            g = truths[obj] if obj in truths else truth_matrix(world.make_scene(obj), v, f, res, cfg.elevation_deg)
            truths[obj] = g
            if (obj, seed) not in conds:
                conds[(obj, seed)] = make_video_conditions(g[v - 1], priors, v, seed, cfg)
            mat = sample_images(priors, conds[(obj, seed)], sampling_config("composed", v, f, res, seed, cfg, s0, k))
            ablation_rows.append({"object": obj, "seed": seed, "s0": s0, "k": k,
                                  **matrix_metrics(mat, g, v - 1, cfg.ssim_window, cfg.ssim_sigma)})
            if obj == grid_obj and seed == cfg.ablation_seeds[0]:
                cells[(s0, k)] = mat
        ab_table = aggregate(ablation_rows, ("s0", "k"))
        # Figure-5 grid: rows s0, columns k; each cell the whole V x F matrix of the first object
        pad = 2
        cell_imgs = [[image_grid(cells[(s0, k)]) for k in cfg.ablation_k] for s0 in cfg.ablation_s0]
        big = image_grid(torch.stack([torch.stack(r) for r in cell_imgs]), pad=pad * 2, pad_value=0.35)
        save_image(out / "ablation_grid.png", _upscale(big, 3))
        write_text(out / "ablation.md", f"Composed sampler, logistic schedule, object(s) {ab_objects}, seeds "
                   f"{cfg.ablation_seeds}; grid image: ablation_grid.png (rows s0 {cfg.ablation_s0}, columns k "
                   f"{cfg.ablation_k}, object {grid_obj})\n\n" + markdown_table(ab_table, ("s0", "k")) + "\n")
    else:
        ab_table = []

    md = ("Composition experiment (miniature priors), objects " + ", ".join(objects) + f"; seeds {cfg.seeds}; "
          f"V={v}, F={f}, {res}px, {cfg.num_steps} steps. Mean over objects, then mean ± std over seeds.\n\n"
          + markdown_table(main_table, ("setting", "method")) + "\n\n"
          + (_fit_md(fit_table, cfg) if fit_table else "") + "Per object:\n\n"
          + markdown_table(per_object, ("setting", "object", "method")) + "\n")
    write_text(out / "results.md", md)
    result = {"config": cfg.model_dump(mode="json"), "V": v, "F": f, "resolution": res,
              "priors_meta": {k: meta.get(k) for k in ("family", "resolution", "num_frames", "summary")},
              "table": main_table, "fit_table": fit_table, "per_object": per_object, "rows": rows, "ablation_table": ab_table,
              "ablation_rows": ablation_rows, "seconds": round(time.time() - t0, 1)}
    write_json(out / "results.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m d2.train.experiment``."""
    p = argparse.ArgumentParser(prog="python -m d2.train.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--priors", default="data/priors")
    p.add_argument("--out", default="runs/composition")
    p.add_argument("--objects", default="", help="comma-separated benchmark objects (default: all)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=ExperimentConfig().num_steps)
    p.add_argument("--rollback", type=int, default=ExperimentConfig().rollback_steps)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--oracle-orbit", action="store_true", help="also run with the true orbit as reference")
    p.add_argument("--oracle-only", action="store_true", help="only the true-orbit setting")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--fit-iterations", type=int, default=0, help="> 0: 4D fit of the first seed's matrices")
    p.add_argument("--ablation-objects", default="", help="objects of the s0 x k grid (default: all)")
    p.add_argument("--ablation-seeds", default="0")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    cfg = ExperimentConfig(priors_dir=a.priors, objects=split(a.objects), seeds=[int(s) for s in split(a.seeds)],
                           num_steps=a.steps, rollback_steps=a.rollback, device=a.device, threads=a.threads,
                           oracle_orbit=a.oracle_orbit or a.oracle_only, sampled_orbit=not a.oracle_only, ablation=not a.no_ablation, fit_iterations=a.fit_iterations,
                           ablation_objects=split(a.ablation_objects),
                           ablation_seeds=[int(s) for s in split(a.ablation_seeds)], progress=not a.no_progress)
    result = run_experiment(a.out, cfg)
    print((Path(a.out) / "results.md").read_text().split("\n\nPer object")[0])
    print(f"seconds: {result['seconds']}")


if __name__ == "__main__":
    main()
