"""Benchmark of the 4D Gaussian fit (stage 2).

Targets are rendered from known 4D Gaussians (:func:`d2.stages.gaussians.procedural_gaussians`),
written in the sampler's matrix layout and fitted with :func:`d2.stages.fit.run_fit`.

CPU (default): iterations per second of the fit at 64x64, 8 views x 8 frames, 2000 Gaussians
(densification off so N stays 2000), batch of 4 (view, frame) pairs, torch rasterizer,
D-SSIM + L1 (no LPIPS weights on this machine; ``--lpips-random`` adds LPIPS with a random
VGG backbone: the same compute, meaningless values).

    .venv/bin/python bench/fit.py                     # CPU it/s
    .venv/bin/python bench/fit.py --iters 50          # longer timing

GPU (``--gpu``): gsplat backend, 21 x 25 matrix at 576x576, 5000 iterations (paper setting),
wall time of the fit (target < 2 min on one H100) and the agreement of the torch rasterizer
with gsplat on the same scene (max abs per-pixel difference, target <= 1e-3). gsplat
JIT-compiles its CUDA code on first use (minutes): that first call is timed and printed on
its own, before anything else is measured.

    python bench/fit.py --gpu --compile-only          # first: gsplat's JIT build alone (~6-7 min)
    python bench/fit.py --gpu --json $OUT/fit_gpu.json   # then, on the same warm machine (~3 min)
    python bench/fit.py --gpu --views 3 --frames 2 --resolution 64 --iters 20 --device cpu --backend torch
        # the same code path, tiny, on CPU (gsplat parts reported as skipped)

Held-out quality against the previous fitter (unseen azimuths and times, equal iterations and
equal wall time): ``bench/fit_compare.py``, or ``bench/fit.py --compare-previous REV``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2.stages.cameras import OrbitSpec, frame_times, orbit_azimuths, orbit_cameras  # noqa: E402
from d2.stages.gaussians import procedural_gaussians  # noqa: E402
from d2.stages.render import gsplat_available, rasterize  # noqa: E402
from d2.utils.io import save_image, write_json  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare_cuda_build_env() -> None:
    """gsplat's JIT build needs CUDA_HOME (the toolkit itself) and TORCH_CUDA_ARCH_LIST."""
    if torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    if "CUDA_HOME" not in os.environ:
        nvcc = shutil.which("nvcc")
        if nvcc:
            os.environ["CUDA_HOME"] = str(Path(nvcc).resolve().parents[1])
        elif Path("/usr/local/cuda/bin/nvcc").exists():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def write_target_matrix(out: Path, n_gauss: int, views: int, frames: int, res: int, device: torch.device,
                        backend: str) -> tuple[float, OrbitSpec]:
    """Render the known scene into ``out`` (matrix layout); returns seconds taken."""
    from d2.stages.fit import matrix_image_path

    t0 = time.perf_counter()
    g = procedural_gaussians(n_gauss, seed=0).to(device)
    spec = OrbitSpec()
    az, tt = orbit_azimuths(views), frame_times(frames)
    vm, K = orbit_cameras(az, spec, res, res)
    vm, K = vm.to(device), K.to(device)
    bg = torch.ones(3, device=device)
    imgs = []
    with torch.no_grad():
        for fi, t in enumerate(tt):
            out_img, _ = g.render(torch.tensor([t], device=device), vm[None], K[None], res, res, background=bg,
                                  backend=backend)  # [1, V, H, W, 3]
            imgs.append(out_img[0].clamp(0, 1).cpu())
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda vf: save_image(matrix_image_path(out, vf[0], vf[1]), imgs[vf[1]][vf[0]]),
                      [(v, f) for v in range(views) for f in range(frames)]))
    write_json(out / "matrix.json", {"V": views, "F": frames, "resolution": res, "azimuths_deg": az,
                                     "elevation_deg": spec.elevation_deg, "fov_deg": spec.fov_deg,
                                     "radius": spec.radius, "times": tt})
    return time.perf_counter() - t0, spec


def agreement(n_gauss: int, res: int, device: torch.device) -> dict:
    """torch rasterizer vs gsplat on the same scene and cameras (float32)."""
    g = procedural_gaussians(n_gauss, seed=0).to(device)
    spec = OrbitSpec()
    az = [-75.0, 15.0, 105.0, 195.0]
    vm, K = orbit_cameras(az, spec, res, res)
    vm, K = vm.to(device), K.to(device)
    t = torch.tensor([0.0, 0.5, 1.0], device=device)
    bg = torch.ones(3, device=device)
    with torch.no_grad():
        means, covars, opac = g.slice(t)
        from d2.stages.gaussians import camera_centers

        vmb, Kb = vm[None].expand(3, -1, -1, -1), K[None].expand(3, -1, -1, -1)
        cols = g.colors(t, means, camera_centers(vmb))
        a, aa = rasterize(means, covars, opac, cols, vmb, Kb, res, res, background=bg, backend="gsplat")
        _sync(device)
        t0 = time.perf_counter()
        b, ba = rasterize(means, covars, opac, cols, vmb, Kb, res, res, background=bg, backend="torch")
        _sync(device)
        torch_s = time.perf_counter() - t0
    d = (a - b).abs()
    da = (aa - ba).abs()
    return {"images": int(a.shape[0] * a.shape[1]), "resolution": res, "gaussians": n_gauss,
            "max_abs_diff_rgb": float(d.max()), "mean_abs_diff_rgb": float(d.mean()),
            "p99_99_abs_diff_rgb": float(torch.quantile(d.flatten()[:: max(1, d.numel() // 10_000_000)], 0.9999)),
            "pixels_over_1e-3": int((d.amax(-1) > 1e-3).sum()), "max_abs_diff_alpha": float(da.max()),
            "torch_render_seconds": torch_s, "target_max_abs_diff": 1e-3,
            "meets_target": bool(float(d.max()) <= 1e-3)}


def _can_write_mp4() -> bool:
    from d2.utils.io import video_plugin

    try:
        video_plugin()
        return True
    except RuntimeError as e:
        print(f"no turntable.mp4: {e}", flush=True)
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="GPU setting: gsplat, 21 x 25 at 576, 5000 iterations")
    ap.add_argument("--views", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="fit iterations (CPU default 20, GPU 5000)")
    ap.add_argument("--gaussians", type=int, default=None, help="initial Gaussians (CPU 2000, GPU 20000)")
    ap.add_argument("--scene-gaussians", type=int, default=None, help="Gaussians of the known target scene")
    ap.add_argument("--batch", type=int, default=4, help="(view, frame) pairs per iteration")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda with --gpu)")
    ap.add_argument("--backend", default=None, choices=["auto", "torch", "gsplat"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--lpips-random", action="store_true", help="add LPIPS with a random VGG (cost only)")
    ap.add_argument("--no-agreement", action="store_true", help="skip the torch-vs-gsplat comparison")
    ap.add_argument("--keep", type=Path, default=None, help="keep the matrix and fit outputs here")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--progress", action="store_true", help="show the fit's progress bar")
    ap.add_argument("--compile-only", action="store_true", help="only time gsplat's first call (JIT build), exit")
    ap.add_argument("--compare-previous", default=None, metavar="REV",
                    help="run bench/fit_compare.py against the fitter of git revision REV instead")
    argv = sys.argv[1:]
    args, _ = ap.parse_known_args(argv)
    if args.compare_previous:  # every other argument goes to bench/fit_compare.py as given
        import runpy

        i = argv.index("--compare-previous")
        sys.argv = [str(Path(__file__).with_name("fit_compare.py")), "--previous", args.compare_previous,
                    *argv[:i], *argv[i + 2:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    gpu = args.gpu
    views = args.views or (21 if gpu else 8)
    frames = args.frames or (25 if gpu else 8)
    res = args.resolution or (576 if gpu else 64)
    iters = args.iters if args.iters is not None else (5000 if gpu else 20)
    n_init = args.gaussians or (20000 if gpu else 2000)
    n_scene = args.scene_gaussians or (4000 if gpu else 300)
    device = torch.device(args.device or ("cuda" if gpu else "cpu"))
    backend = args.backend or ("gsplat" if gpu else "torch")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/fit.py: --gpu / --device cuda needs a CUDA GPU; use --device cpu --backend torch")
    results: dict = {"mode": "gpu" if gpu else "cpu", "device": str(device), "backend": backend, "views": views,
                     "frames": frames, "resolution": res, "iterations": iters, "initial_gaussians": n_init,
                     "scene_gaussians": n_scene, "batch": args.batch, "torch": torch.__version__}
    if device.type == "cuda":
        results["gpu_name"] = torch.cuda.get_device_name(device)

    use_gsplat = backend == "gsplat" or (backend == "auto" and device.type == "cuda")
    if device.type == "cuda":
        _prepare_cuda_build_env()
    if use_gsplat or (device.type == "cuda" and not args.no_agreement):
        if gsplat_available():
            import gsplat

            results["gsplat"] = gsplat.__version__
            g = procedural_gaussians(8, seed=0).to(device)
            vm, K = orbit_cameras([0.0], OrbitSpec(), 32, 32)
            t0 = time.perf_counter()
            try:
                g.render(torch.zeros(1, device=device), vm[None].to(device), K[None].to(device), 32, 32,
                         backend="gsplat")
                _sync(device)
            except Exception as e:  # a failed JIT build: report it, go on with the torch rasterizer on the GPU
                results["gsplat_error"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"gsplat FAILED on first call after {time.perf_counter() - t0:.1f} s: {results['gsplat_error']}"
                      f"\nfalling back to the torch rasterizer on {device} with at most 300 iterations", flush=True)
                backend, use_gsplat, iters = "torch", False, min(iters, 300)
                results.update(backend=backend, iterations=iters)
            else:
                results["gsplat_first_call_seconds"] = time.perf_counter() - t0
                print(f"gsplat first call (JIT build when not cached): "
                      f"{results['gsplat_first_call_seconds']:.1f} s", flush=True)
        elif use_gsplat:
            sys.exit("bench/fit.py: backend gsplat requested but gsplat does not import (pip install -e '.[gpu]')")

    if args.compile_only:
        print(json.dumps(results, indent=2))
        if args.json:
            write_json(args.json, results)
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="d2_bench_fit_"))
    try:
        secs, _spec = write_target_matrix(work / "matrix", n_scene, views, frames, res, device,
                                          backend if backend != "auto" else "auto")
        results["write_matrix_seconds"] = secs
        print(f"targets: {views} x {frames} at {res}px from {n_scene} known Gaussians, written in {secs:.1f} s",
              flush=True)

        import d2.stages.fit as fit_mod
        from d2.stages.fit import FitConfig, run_fit

        lam_lpips = 0.0
        if args.lpips_random:
            from d2.eval.metrics import build_lpips

            fit_mod.load_fit_lpips = lambda cfg, dev: build_lpips(random_backbone=True, device=str(dev))
            lam_lpips = 1.0
        # warm-up render (the first call in a process pays one-off start-up costs)
        wg = procedural_gaussians(n_init, seed=1).to(device)
        wv, wk = orbit_cameras([0.0] * args.batch, OrbitSpec(), res, res)
        wv, wk = wv.to(device), wk.to(device)
        wo, _ = wg.render(torch.zeros(args.batch, device=device), wv[:, None], wk[:, None], res, res,
                          backend=backend)
        wo.sum().backward()
        _sync(device)
        densify = gpu  # CPU timing keeps N fixed at n_init
        turntable = gpu and _can_write_mp4()  # the device image has no MP4 writer (bench/gpu_checks.sh)
        results["turntable"] = turntable
        # GPU: the 4DGS training rules at their own schedule (FitConfig's defaults); CPU: degree 1, no densification
        cfg = FitConfig(iterations=iters, batch_size=args.batch, num_gaussians=n_init,
                        max_gaussians=max(n_init, 1_000_000 if gpu else n_init), lambda_lpips=lam_lpips,
                        lambda_ssim=1.0, lambda_l1=0.0 if args.lpips_random else 1.0,
                        sh_degree=3 if gpu else 1, sh_increase_every=1000 if gpu else 0,
                        densify_from=500 if densify else iters + 1, backend=backend, device=str(device),
                        progress=args.progress, checkpoint_every=0, export_ply=gpu, turntable_frames=48 if turntable else 0)
        _sync(device)
        t0 = time.perf_counter()
        summary = run_fit(work / "matrix", work / "fit", cfg)
        _sync(device)
        total = time.perf_counter() - t0
        results.update({
            "fit_loop_seconds": summary["fit_seconds"], "run_fit_seconds": total,
            "iterations_per_second": iters / summary["fit_seconds"] if summary["fit_seconds"] > 0 else math.nan,
            "final_gaussians": summary["num_gaussians"], "train_psnr_db": summary["train_psnr"],
            "losses": "lpips(random VGG)+ssim" if args.lpips_random else "ssim+l1",
        })
        if device.type == "cuda":
            results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"fit: {iters} iterations in {summary['fit_seconds']:.2f} s "
              f"({results['iterations_per_second']:.2f} it/s), run_fit total {total:.1f} s, "
              f"{summary['num_gaussians']} Gaussians, train PSNR {summary['train_psnr']:.2f} dB", flush=True)
        if gpu:
            results["target_fit_seconds"] = 120.0
            results["meets_target_fit"] = bool(summary["fit_seconds"] < 120.0)

        if device.type == "cuda" and not args.no_agreement and gsplat_available() and "gsplat_error" not in results:
            agr = agreement(n_scene, res, device)
            results["agreement"] = agr
            print(f"torch vs gsplat ({agr['images']} images at {res}px): max |diff| {agr['max_abs_diff_rgb']:.2e}, "
                  f"mean {agr['mean_abs_diff_rgb']:.2e}, pixels over 1e-3: {agr['pixels_over_1e-3']}", flush=True)
        else:
            results["agreement"] = "skipped (needs CUDA and gsplat)"
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
