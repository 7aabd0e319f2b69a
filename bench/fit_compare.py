"""Held-out quality of the 4D fit against the previous fitter, in one run (CPU).

The known procedural 4D scene (:func:`d2.stages.gaussians.procedural_gaussians`) is rendered
at ``--train-views`` azimuths x ``--train-frames`` times and fitted by

* ``current``: :func:`d2.stages.fit.run_fit` of this checkout (4DGS training rules, the
  schedule scaled to ``--iters``), and
* ``previous``: the fitter of git revision ``--previous`` (its ``d2/stages/fit.py`` and
  ``gaussians.py`` read with ``git show`` into a temporary package; the rasterizer is shared),

both from the same number of initial Gaussians, with the same D-SSIM loss (no LPIPS weights
on CPU machines), batch and seed. Scored on views and times never trained on: azimuths
halfway between the training ones x times halfway between the frames (PSNR against the
known scene's renders). Two comparisons: equal iterations, and equal wall time (the previous
fitter runs as many iterations as fit in the current fitter's time, from its measured rate).

    PYTHONPATH=. .venv/bin/python bench/fit_compare.py --previous 331680a
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2.stages.cameras import OrbitSpec, frame_times, orbit_azimuths, orbit_cameras  # noqa: E402
from d2.stages.fit import FitConfig, run_fit, write_matrix  # noqa: E402
from d2.stages.gaussians import Gaussians4D, procedural_gaussians  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_previous(rev: str, where: Path) -> types.ModuleType:
    """The previous fitter as a package ``d2prev`` (its fit and gaussians modules from ``rev``)."""
    pkg = where / "d2prev"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in ("gaussians", "fit"):
        src = subprocess.run(["git", "show", f"{rev}:d2/stages/{name}.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        (pkg / f"{name}.py").write_text(src.replace("from d2.stages.gaussians import", "from d2prev.gaussians import"))
    sys.path.insert(0, str(where))
    spec = importlib.util.find_spec("d2prev.fit")
    assert spec is not None
    import d2prev.fit as prev_fit  # noqa: E402

    return prev_fit


def render(g, az: list[float], tt: list[float], res: int, spec: OrbitSpec) -> torch.Tensor:
    """[len(az), len(tt), 3, H, W] on white."""
    vm, K = orbit_cameras(az, spec, res, res)
    out = []
    with torch.no_grad():
        for t in tt:
            img, _ = g.render(torch.tensor([t]), vm[None], K[None], res, res, background=torch.ones(3),
                              backend="torch")
            out.append(img[0].permute(0, 3, 1, 2).clamp(0, 1))
    return torch.stack(out, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return -10 * math.log10(max(float(((a - b) ** 2).mean()), 1e-10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--previous", default="331680a", help="git revision of the previous fitter")
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--train-views", type=int, default=8)
    ap.add_argument("--train-frames", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--gaussians", type=int, default=150, help="initial Gaussians (both fitters)")
    ap.add_argument("--max-gaussians", type=int, default=1200, help="densification cap (both fitters)")
    ap.add_argument("--scene-gaussians", type=int, default=300, help="Gaussians of the known scene")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    it, res = args.iters, args.resolution
    work = Path(tempfile.mkdtemp(prefix="d2_fit_compare_"))
    prev_fit = load_previous(args.previous, work / "pkg")

    gt = procedural_gaussians(args.scene_gaussians, seed=0)
    spec = OrbitSpec()
    az, tt = orbit_azimuths(args.train_views), frame_times(args.train_frames)
    write_matrix(work / "matrix", render(gt, az, tt, res, spec), az, tt, spec)
    step = 360.0 / args.train_views
    held_az = [a + step / 2 for a in az]
    held_t = [(a + b) / 2 for a, b in zip(tt[:-1], tt[1:])]
    truth = render(gt, held_az, held_t, res, spec)

    common = dict(iterations=it, batch_size=args.batch, num_gaussians=args.gaussians, lambda_lpips=0.0,
                  lambda_ssim=1.0, lambda_l1=0.0, backend="torch", device="cpu", progress=False,
                  checkpoint_every=0, export_ply=False, turntable_frames=0, seed=0)
    # the current fitter: 4DGS rules, its 30k-iteration schedule scaled to `it` iterations
    cur_cfg = FitConfig(**common, sh_degree=1, sh_increase_every=0, densify_from=max(1, it // 10),
                        densify_every=max(1, it // 15), densify_until=int(0.75 * it), max_gaussians=args.max_gaussians,
                        opacity_reset_every=0, opacity_reset_at_densify_from=False, lr_means=1.6e-3,
                        lr_means_max_steps=it)
    # the previous fitter: its own defaults with the demo's densification window scaled the same way
    prev_common = dict(common, densify_from=max(1, it // 10), densify_every=max(1, it // 15),
                       densify_until_frac=0.75, max_gaussians=args.max_gaussians)

    results: dict = {"previous_rev": args.previous, "iterations": it, "resolution": res,
                     "train": f"{args.train_views} views x {args.train_frames} frames",
                     "held_out": f"{len(held_az)} azimuths (halfway) x {len(held_t)} times (halfway)",
                     "initial_gaussians": args.gaussians, "scene_gaussians": args.scene_gaussians}

    def score(g) -> float:
        return psnr(render(g, held_az, held_t, res, spec), truth)

    t0 = time.perf_counter()
    s = run_fit(work / "matrix", work / "cur", cur_cfg)
    g_cur = Gaussians4D.from_state(torch.load(work / "cur" / "gaussians.pt", weights_only=True))
    results["current"] = {"iterations": it, "fit_seconds": s["fit_seconds"], "gaussians": g_cur.num,
                          "held_out_psnr_db": score(g_cur), "train_psnr_db": s["train_psnr"]}

    def run_prev(iters: int, name: str) -> dict:
        cfg = prev_fit.FitConfig(**dict(prev_common, iterations=iters))
        sp = prev_fit.run_fit(work / "matrix", work / name, cfg)
        gp = sys.modules["d2prev.gaussians"].Gaussians4D.from_state(
            torch.load(work / name / "gaussians.pt", weights_only=True))
        return {"iterations": iters, "fit_seconds": sp["fit_seconds"], "gaussians": gp.num,
                "held_out_psnr_db": score(gp), "train_psnr_db": sp["train_psnr"]}

    results["previous_equal_iterations"] = run_prev(it, "prev_it")
    rate = it / results["previous_equal_iterations"]["fit_seconds"]
    results["previous_equal_time"] = run_prev(max(1, round(results["current"]["fit_seconds"] * rate)), "prev_time")
    c = results["current"]
    for key in ("previous_equal_iterations", "previous_equal_time"):
        p = results[key]
        results[f"delta_psnr_db_vs_{key}"] = c["held_out_psnr_db"] - p["held_out_psnr_db"]
    results["wall_seconds"] = time.perf_counter() - t0
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
