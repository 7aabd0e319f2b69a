"""Scaling of distributed runs, measured as ratios in one run (this machine is noisy), plus the
model of a GPU node that the measured GPU figures give.

1. The demo benchmark (tiny priors unless --params says otherwise) on a local Dask cluster of 1
   and of 2 worker processes, each from a fresh cache: wall time and the 1/2 ratio. The Dask
   cluster start is timed apart (it is paid once per flow).
2. One composed sampler step on 1 and on 2 CPU "devices" (``sampling.devices=[cpu, cpu]``: a
   replica of the priors per device, the step's chunks spread over them by threads).
3. The model of one asset and of the 7-object Consistent4D benchmark on an 8-GPU node, from
   the figures measured on one H200 (bench/results): a composed step 9.94 s compiled, a
   5k-iteration fit 72 s, compilation 232 s once per worker process.

    .venv/bin/python bench/scale.py                 # both measurements and the model, ~5 min on 2 cores
    .venv/bin/python bench/scale.py --skip-dask     # only the sampler step and the model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["priors.backend=tiny", "prepare.objects=[bouncing_ball, windmill, jelly_cube, spinning_top]",
        "prepare.num_frames=4", "prepare.resolution=32", "prepare.num_gaussians=200",
        "conditions.num_views=4", "conditions.num_frames=3", "conditions.resolution=32", "conditions.num_steps=3",
        "sampling.num_views=4", "sampling.num_frames=3", "sampling.resolution=32", "sampling.num_steps=6",
        "sampling.rollback_steps=0", "sampling.grid_thumb=16", "fit.iterations=40", "fit.num_gaussians=200",
        "fit.lambda_lpips=0", "fit.turntable_frames=4", "fit.device=cpu", "fit.export_ply=false",
        "fit.densify_from=10", "fit.densify_until=30", "fit.densify_every=10",
        "protocol.num_frames=3", "protocol.resolution=32", "metrics.metrics=[psnr, ssim]", "metrics.resolution=32",
        "render_eval.resolution=32", "run.mlflow=false", "run.progress=false"]

# measured on one H200 (bench/results/README.md)
STEP_S = 9.94  # one composed step, 21 x 25 at 576 px, compiled, cuDNN attention
STEPS = 50
FIT_S = 72.0  # 5k-iteration gsplat fit of the 21 x 25 matrix
COMPILE_S = 232.0  # torch.compile of both UNets, once per worker process (cold Inductor cache)
CONDITIONS_S = 2 * 50 * STEP_S / (21 + 25)  # reference orbit (1 x 21) + video (1 x 25): ~2/46 of a step each


def dask_benchmark(workers: int, data: Path, out: Path, params) -> dict:
    from d2.config import with_overrides
    from d2.flows import run_benchmark

    p = with_overrides(params, ["run.runner=dask", f"run.workers={workers}", f"run.max_parallel={workers}",
                                f"run.cache_dir={out / 'cache'}"])
    t0 = time.perf_counter()
    r = run_benchmark(data, out / "run", p)
    wall = time.perf_counter() - t0
    m = json.loads(Path(r["manifest"]).read_text())
    return {"workers": workers, "wall_s": round(wall, 2), "flow_s": m["flow_wall_seconds"],
            "computed": m["totals"]["computed"], "compute_s": round(sum(s["compute_seconds"] for s in m["stages"]), 2)}


def sampler_steps(devices: int, repeats: int = 3) -> float:
    """Seconds of one composed step (median of ``repeats``) on ``devices`` CPU replicas of the tiny priors."""
    import torch

    from d2.stages.cameras import orbit_azimuths
    from d2.stages.conditions import Conditions
    from d2.stages.priors import PriorsConfig, load_priors
    from d2.stages.sampling import ComposedDenoiser, SamplingConfig, build_matrix_conditions

    video, mv = load_priors(PriorsConfig(backend="tiny"))
    v, f, res = 8, 8, 32
    g = torch.Generator().manual_seed(0)
    cond = Conditions(orbit=torch.rand(v, 3, res, res, generator=g), video=torch.rand(f, 3, res, res, generator=g),
                      input=torch.rand(3, res, res, generator=g), azimuths_deg=orbit_azimuths(v), elevation_deg=10.0,
                      fov_deg=33.8, radius=2.0, input_view_index=v - 1, kind="image")
    cfg = SamplingConfig(num_views=v, num_frames=f, resolution=res, num_steps=4, chunk_size=2, progress=False)
    vc, mc = build_matrix_conditions(video, mv, cond, cfg, torch.Generator().manual_seed(0))
    replicas = [(video, mv)] + [(copy.deepcopy(video), copy.deepcopy(mv)) for _ in range(devices - 1)]
    den = ComposedDenoiser(video, mv, vc, mc, cfg, v, f, replicas)
    x = torch.randn(v, f, video.latent_channels, video.latent_size, video.latent_size, generator=g)
    times = []
    with torch.no_grad():
        den(x, 10.0, 0)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            den(x, 10.0, 0)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def node_model(gpus: int = 8, objects: int = 7) -> dict:
    """Wall time of one asset and of the benchmark on a node of ``gpus`` GPUs (stated model)."""
    sample_1 = STEPS * STEP_S  # one matrix on one GPU
    asset_1 = CONDITIONS_S + sample_1 + FIT_S  # one GPU, after compilation
    # (a) one object per GPU (run.runner=dask, run.gpus=[0..7]): 7 objects in one wave
    waves = math.ceil(objects / gpus)
    per_object_gpus = COMPILE_S + waves * asset_1
    # (b) every object's matrix over all 8 GPUs (sampling.devices), objects one after another
    sample_8 = sample_1 / gpus  # chunks of 21 rows + 25 columns spread evenly (assumes no sharding cost)
    asset_8 = CONDITIONS_S + sample_8 + FIT_S
    all_gpus = COMPILE_S + objects * asset_8
    return {"gpus": gpus, "objects": objects, "asset_one_gpu_s": round(asset_1, 1),
            "asset_all_gpus_s": round(asset_8, 1),
            "benchmark_one_object_per_gpu_min": round(per_object_gpus / 60, 1),
            "benchmark_objects_in_turn_all_gpus_min": round(all_gpus / 60, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--skip-dask", action="store_true")
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args(argv)

    from d2.env import setup_env

    setup_env()
    import torch

    torch.set_num_threads(1)
    from d2.cli import prepare_dataset
    from d2.config import load_params

    report: dict = {}
    if not args.skip_dask:
        out = Path(args.out or tempfile.mkdtemp(prefix="d2-scale-"))
        p = load_params(args.params, TINY + args.set)
        data = out / "data"
        prepare_dataset(p, data)
        rows = [dask_benchmark(1, data, out / "w1", p), dask_benchmark(2, data, out / "w2", p)]
        report["dask"] = rows
        print(f"{'workers':>7} {'wall s':>8} {'flow s':>8} {'stages':>6} {'compute s':>9}")
        for r in rows:
            print(f"{r['workers']:>7} {r['wall_s']:>8.1f} {r['flow_s']:>8.1f} {r['computed']:>6} {r['compute_s']:>9.1f}")
        report["dask_speedup_2_vs_1"] = round(rows[0]["flow_s"] / rows[1]["flow_s"], 2)
        print(f"demo benchmark, 2 vs 1 Dask workers: {report['dask_speedup_2_vs_1']:.2f}x faster (flow wall time)")
    one, two = sampler_steps(1), sampler_steps(2)
    report["sampler_step_s"] = {"1_device": round(one, 4), "2_devices": round(two, 4),
                                "speedup": round(one / two, 2)}
    print(f"composed step, 8 x 8 tiny: 1 CPU device {one * 1000:.1f} ms, 2 CPU devices {two * 1000:.1f} ms "
          f"({one / two:.2f}x)")
    model = node_model()
    report["node_model"] = model
    print("model of an 8-GPU node from the H200 figures (step 9.94 s, fit 72 s, compile 232 s per worker):")
    print(f"  one asset: {model['asset_one_gpu_s'] / 60:.1f} min on one GPU, "
          f"{model['asset_all_gpus_s'] / 60:.1f} min with its matrix on 8 GPUs")
    print(f"  7-object benchmark: {model['benchmark_one_object_per_gpu_min']:.1f} min one object per GPU; "
          f"{model['benchmark_objects_in_turn_all_gpus_min']:.1f} min objects in turn over all 8 GPUs")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
