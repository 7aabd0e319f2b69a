"""Benchmark of the composed sampler.

CPU (default): tiny priors. For a few V x F sizes, the seconds per composed step and the
share of the sampling loop's wall time spent outside the UNet forwards (target < 5 %), and
whether the time per step grows linearly with V x F.

    .venv/bin/python bench/sampler.py                 # CPU table, tiny priors

GPU (``--gpu-full``): the full-size SVD-XT and SV3D_p UNet architectures with random weights
built directly on the GPU in bf16 (no download), V x F = 21 x 25 at 576 x 576 (latents
4 x 72 x 72), CFG on both models, the authors' weights (both models on every entry): seconds
per composed step (after a warm-up step), achieved TFLOP/s against the ~3.45 PFLOP a step
costs (docs/method.md, "Cost") and against FLOPs counted by torch's FlopCounterMode on one forward
of each UNet, and peak GPU memory. ``--attention``, ``--no-shortcut``, ``--temporal-conv``,
``--temporal-norm``, ``--channels-last``, ``--compile`` (``--compile-mode``, ``--freezing``) set
the priors' runtime knobs (d2/stages/unet_runtime.py); ``bench/gpu_sampler.sh`` runs the
variants. FLOPs are counted twice: for diffusers' formulation (``counted_*``, what a step
costs; the TFLOP/s quoted against the target) and for the formulation run (``executed_*``,
smaller where the cross-attention shortcut skips work). ``--tiny`` runs the same code path
with tiny architectures (CPU-friendly).

    .venv/bin/python bench/sampler.py --gpu-full                  # one H100/H200, ~1 min
    .venv/bin/python bench/sampler.py --gpu-full --attention cudnn --compile   # + ~4 min compiling
    .venv/bin/python bench/sampler.py --gpu-full --tiny           # same path, tiny, CPU ok
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2.stages.cameras import orbit_azimuths  # noqa: E402
from d2.stages.priors import (  # noqa: E402
    PixelSpaceVAE,
    Prior,
    PriorCondition,
    PriorsConfig,
    TinyPriorConfig,
    load_priors,
)
from d2.stages.sampling import (  # noqa: E402
    ComposedDenoiser,
    SamplingConfig,
    build_matrix_conditions,
    edm_sample,
)
from d2.stages.schedules import karras_sigmas  # noqa: E402
from d2.stages.unet_runtime import COMPILE_MODES, TEMPORAL_CONVS, TEMPORAL_NORMS  # noqa: E402

DESIGN_PFLOP_PER_STEP = 3.45  # 21*2*41 + 25*2*35 TFLOP (docs/method.md, "Cost"; an estimate)


class UNetTimer:
    """Accumulates wall time inside the priors' network calls (the UNet forward; CUDA synchronised).

    It wraps ``Prior.network`` rather than hooking the UNet, so it stays outside a compiled UNet.
    """

    def __init__(self, priors: list[Prior], cuda: bool) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.cuda = cuda
        self._t0 = 0.0
        for prior in priors:
            prior.network = self._wrap(prior.network)  # type: ignore[method-assign]

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            self._pre()
            out = fn(*args, **kwargs)
            self._post()
            return out
        return timed

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def cpu_table(sizes: list[tuple[int, int]], steps: int, chunk: int, threads: int) -> list[dict]:
    """Tiny priors on the CPU: per-step time and share outside the UNet forwards for each V x F."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    video, mv = load_priors(PriorsConfig(backend="tiny", tiny=TinyPriorConfig(resolution=16)))
    timer = UNetTimer([video, mv], cuda=False)
    rows = []
    for v, f in sizes:
        cfg = SamplingConfig(num_views=v, num_frames=f, resolution=video.resolution, num_steps=steps,
                             rollback_steps=0, chunk_size=chunk, progress=False)
        gen = torch.Generator().manual_seed(0)
        orbit = torch.rand(v, 3, video.resolution, video.resolution, generator=gen)
        frames = torch.rand(f, 3, video.resolution, video.resolution, generator=gen)
        from d2.stages.conditions import Conditions

        cond = Conditions(orbit, frames, orbit[-1], orbit_azimuths(v), 0.0, 33.8, 2.0, v - 1, "image")
        vcond, mcond = build_matrix_conditions(video, mv, cond, cfg, gen)
        den = ComposedDenoiser(video, mv, vcond, mcond, cfg, v, f)
        noise = torch.randn(v, f, video.latent_channels, video.latent_size, video.latent_size, generator=gen)
        sig = karras_sigmas(steps)
        with torch.no_grad():  # warm-up (allocator, first-call paths)
            edm_sample(den, noise, sig[-2:], generator=gen)
        timer.reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            edm_sample(den, noise, sig, generator=gen)
        wall = time.perf_counter() - t0
        rows.append({"V": v, "F": f, "VxF": v * f, "s_per_step": wall / steps,
                     "ms_per_step_per_entry": 1e3 * wall / steps / (v * f),
                     "outside_unet_share": 1 - timer.seconds / wall, "unet_calls_per_step": timer.calls / steps})
    return rows


def print_cpu_table(rows: list[dict]) -> None:
    print(f"{'V':>3} {'F':>3} {'VxF':>5} {'s/step':>8} {'ms/step/entry':>14} {'outside UNet':>13} {'UNet calls':>10}")
    for r in rows:
        print(f"{r['V']:>3} {r['F']:>3} {r['VxF']:>5} {r['s_per_step']:>8.3f} {r['ms_per_step_per_entry']:>14.2f} "
              f"{100 * r['outside_unet_share']:>12.1f}% {r['unet_calls_per_step']:>10.0f}")
    # linearity: least-squares fit s/step = a * VxF + b, report the relative residual and b
    xs = torch.tensor([r["VxF"] for r in rows], dtype=torch.float64)
    ys = torch.tensor([r["s_per_step"] for r in rows], dtype=torch.float64)
    a_mat = torch.stack([xs, torch.ones_like(xs)], 1)
    sol = torch.linalg.lstsq(a_mat, ys[:, None]).solution[:, 0]
    pred = a_mat @ sol
    rel = ((ys - pred).abs() / ys).max().item()
    print(f"linear fit: s/step = {sol[0].item() * 1e3:.2f} ms x (V*F) + {sol[1].item() * 1e3:.1f} ms; "
          f"max relative residual {100 * rel:.1f}%")


# ---------------------------------------------------------------------------------------
# full-size GPU mode
# ---------------------------------------------------------------------------------------


def _random_unet(cls, config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Build on the meta device (no init cost), materialise on ``device``, fill with small random weights."""
    with torch.device("meta"):
        unet = cls(**config).to(dtype)
    unet = unet.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.ndim == 1 and ("norm" in name or name.endswith("mix_factor")):
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.ndim == 1:
                p.zero_()
            else:  # fan-in scaled, keeps activations O(1) through the 1.5 B-parameter stack
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        for b in unet.buffers():
            if b.is_floating_point():
                b.zero_()
    return unet.eval().requires_grad_(False)


def time_calls(fn, n: int, cuda: bool) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn()`` (CUDA events on a GPU, wall clock on the CPU)."""
    times = []
    for _ in range(n):
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _fake_condition(prior: Prior, n: int, t: int, latent: int, ctx_dim: int, device: torch.device,
                    gen: torch.Generator, channels: int = 4) -> PriorCondition:
    context = torch.randn(n, 1, ctx_dim, generator=gen).to(device)
    concat = torch.randn(n, channels, latent, latent, generator=gen).to(device)
    if prior.family == "video":
        ids = torch.tensor([[24.0, 127.0, 0.02]] * n, device=device)
    else:
        az = torch.tensor([math.radians(a) for a in orbit_azimuths(t)])
        per = torch.stack([torch.full((t,), 1e-5), torch.full((t,), math.radians(80.0)), az], -1)
        ids = per[None].expand(n, t, 3).clone().to(device)
    return PriorCondition(context, concat, ids)


def count_flops(unet: torch.nn.Module, prior: Prior, t: int, latent: int, ctx_dim: int, device: torch.device
                ) -> float:
    """FLOPs of one guided-branch UNet forward (batch 1, T frames) counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)
    c = int(unet.config.in_channels) // 2  # noisy latents + the concatenated condition
    cond = _fake_condition(prior, 1, t, latent, ctx_dim, device, gen, c)
    x = torch.randn(1, t, c, latent, latent, generator=gen).to(device)
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        prior.denoise_raw(x, torch.ones(1, device=device), cond)
    return float(fc.get_total_flops())


def _compile_both(den: ComposedDenoiser, x: torch.Tensor, sigma: float, out: dict) -> None:
    """First call of each compiled UNet at the sampler's chunk shapes (rows, then columns), timed."""
    from d2.stages.sampling import _chunks

    rows, cols = _chunks(den.v, den.cfg.chunk_size)[0], _chunks(den.f, den.cfg.chunk_size)[0]
    for key, prior, xs, cond, scale in (
            ("compile_video_s", den.video, x[rows], den.vcond.select(rows), den.video_cfg),
            ("compile_multiview_s", den.mv, x[:, cols].transpose(0, 1), den.mcond.select(cols), den.mv_cfg)):
        t0 = time.perf_counter()
        den._call(prior, xs, sigma, cond, scale)
        if x.is_cuda:
            torch.cuda.synchronize()
        out[key] = round(time.perf_counter() - t0, 1)
        print(f"{key}: {out[key]} s", flush=True)


def gpu_full(tiny: bool, chunk: int, steps: int, warmup: int, device_name: str | None,
             views: int | None = None, frames: int | None = None, latent_size: int | None = None,
             runtime: dict | None = None) -> dict:
    """Seconds per composed step of the full 21 x 25 matrix at 576 px (or a tiny stand-in with ``tiny``).

    ``runtime``: :meth:`Prior.configure_runtime` keywords for both priors (attention kernel,
    cross-attention shortcut, temporal convolution, channels-last, compilation).
    """
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.utils import logging as dlogging

    from d2.stages.priors import tiny_unet_config
    from d2.stages.sv3d import SV3D_P_UNET_CONFIG, SVD_XT_UNET_CONFIG, SV3DUNet

    dlogging.set_verbosity_error()
    t_start = time.perf_counter()
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    runtime = dict(runtime or {})
    compile = bool(runtime.get("compile", False))
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if tiny:
        v, f, latent, dtype = 3, 4, 8, torch.float32 if not cuda else torch.bfloat16
        tc = TinyPriorConfig()
        vconf, mconf = tiny_unet_config(tc, "video", 4, f), tiny_unet_config(tc, "multiview", 4, v)
        ctx_dim = tc.cross_attention_dim
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
    else:
        v, f, latent, dtype = 21, 25, 72, torch.bfloat16
        vconf, mconf = SVD_XT_UNET_CONFIG, SV3D_P_UNET_CONFIG
        ctx_dim = 1024
    v, f, latent = views or v, frames or f, latent_size or latent  # smaller stand-ins (CPU checks)
    vunet = _random_unet(UNetSpatioTemporalConditionModel, vconf, device, dtype, 0)
    munet = _random_unet(SV3DUNet, mconf, device, dtype, 1)
    video = Prior("video", vunet, PixelSpaceVAE(), None, None, latent * 8, name="svd-xt-random").to(device)
    mv = Prior("multiview", munet, PixelSpaceVAE(), None, None, latent * 8, name="sv3d_p-random").to(device)
    t_built = time.perf_counter() - t_start
    t_flops = time.perf_counter()  # counted eagerly, before any compilation
    reference = {"cross_attention_shortcut": False, "temporal_conv": "conv3d",  # diffusers' formulation
                 "temporal_norm": "groupnorm"}
    executed = {k: runtime[k] for k in reference if k in runtime}
    flops: dict = {}
    try:
        for label, knobs in (("counted", reference), ("executed", {**reference, **executed})):
            for prior in (video, mv):
                prior.configure_runtime(**knobs)
            fl_video = count_flops(vunet, video, f, latent, ctx_dim, device)
            fl_mv = count_flops(munet, mv, v, latent, ctx_dim, device)
            flops.update({f"{label}_tflop_per_forward_video": round(fl_video / 1e12, 4),
                          f"{label}_tflop_per_forward_multiview": round(fl_mv / 1e12, 4),
                          f"{label}_tflop_per_step": round((2 * v * fl_video + 2 * f * fl_mv) / 1e12, 3)})
        flops["flop_count_s"] = round(time.perf_counter() - t_flops, 2)
    except Exception as e:  # noqa: BLE001 - the timing below stands without the count
        flops = {"flop_count_error": f"{type(e).__name__}: {e}"}
    for prior in (video, mv):
        prior.configure_runtime(**runtime)

    gen = torch.Generator().manual_seed(0)
    vcond = _fake_condition(video, v, f, latent, ctx_dim, device, gen)  # row v <- orbit view v
    mcond = _fake_condition(mv, f, v, latent, ctx_dim, device, gen)  # column f <- video frame f
    timer = UNetTimer([video, mv], cuda=cuda)
    noise = torch.randn(v, f, 4, latent, latent, generator=gen).to(device)
    sig = karras_sigmas(50)
    out = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "tiny": tiny, "runtime": runtime, "V": v, "F": f, "latent": f"4x{latent}x{latent}",
        "dtype": str(dtype), "build_s": round(t_built, 2),
    }
    while True:  # on CUDA OOM halve the chunk and retry
        cfg = SamplingConfig(num_views=v, num_frames=f, resolution=latent * 8, num_steps=50, chunk_size=chunk,
                             rollback_steps=0, progress=False)  # defaults: w_mv 0.6 const, per-view on, CFG both
        den = ComposedDenoiser(video, mv, vcond, mcond, cfg, v, f)
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                if compile:  # compile each UNet at its chunk shape first, reporting the time of each
                    _compile_both(den, noise, float(sig[0]), out)
                t0 = time.perf_counter()
                edm_sample(den, noise, sig[: warmup + 1], generator=gen)
                if cuda:
                    torch.cuda.synchronize()
                t_warm = time.perf_counter() - t0
                print(f"warm-up ({warmup} step{'s' if warmup > 1 else ''}{', with compilation' if compile else ''}): "
                      f"{t_warm:.1f} s", flush=True)
                timer.reset()
                t0 = time.perf_counter()
                x = edm_sample(den, noise, sig[: steps + 1], generator=gen)
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            break
        except torch.cuda.OutOfMemoryError:
            if chunk == 1:
                raise
            print(f"out of memory with chunk_size {chunk}; retrying with {chunk // 2}", flush=True)
            chunk //= 2
    sec_step = wall / steps
    out.update({
        "chunk_size": chunk, "warmup_s": round(t_warm, 2), "timed_steps": steps,
        "s_per_composed_step": round(sec_step, 4),
        "outside_unet_share": round(1 - timer.seconds / wall, 4),
        "finite_output": bool(torch.isfinite(x).all()),
        "projected_50_step_minutes": round(50 * sec_step / 60, 2),
    })
    if not tiny and (v, f, latent) == (21, 25, 72):
        out["achieved_tflops_vs_design_3.45PF"] = round(DESIGN_PFLOP_PER_STEP * 1e3 / sec_step, 1)
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if "counted_tflop_per_step" in flops:  # the reference formulation's FLOPs (what a step costs) per second
        flops["achieved_tflops_counted"] = round(flops["counted_tflop_per_step"] / sec_step, 2)
        flops["executed_tflops"] = round(flops["executed_tflop_per_step"] / sec_step, 2)  # FLOPs really run
    out.update(flops)
    out["total_s"] = round(time.perf_counter() - t_start, 2)
    for k, val in out.items():
        print(f"{k:>36}: {val}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI entry (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-full", action="store_true", help="full-size SVD-XT + SV3D_p, 21 x 25 @ 576, bf16")
    ap.add_argument("--tiny", action="store_true", help="with --gpu-full: tiny architectures (CPU ok)")
    ap.add_argument("--chunk", type=int, default=None, help="rows/columns per UNet call (default 5 full, 2 tiny)")
    ap.add_argument("--steps", type=int, default=3, help="timed composed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    ap.add_argument("--device", default=None, help="torch device (default cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for the CPU table")
    ap.add_argument("--sizes", default="2x3,3x4,4x6,6x8,8x12", help="CPU table V x F sizes")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--views", type=int, default=None, help="with --gpu-full: override V (default 21)")
    ap.add_argument("--frames", type=int, default=None, help="with --gpu-full: override F (default 25)")
    ap.add_argument("--latent", type=int, default=None, help="with --gpu-full: override the latent side (72)")
    ap.add_argument("--channels-last", action="store_true", help="with --gpu-full: channels_last UNet weights")
    ap.add_argument("--attention", default="auto", choices=["auto", "cudnn", "flash", "efficient", "math"],
                    help="with --gpu-full: preferred attention kernel (priors.attention_backend)")
    ap.add_argument("--compile", action="store_true", help="with --gpu-full: torch.compile both UNets "
                    "(the warm-up step then includes the compilation)")
    ap.add_argument("--compile-mode", default="default", choices=list(COMPILE_MODES), help="with --compile")
    ap.add_argument("--freezing", action="store_true", help="with --compile: Inductor freezing")
    ap.add_argument("--no-shortcut", action="store_true",
                    help="with --gpu-full: cross-attention through SDPA (priors.cross_attention_shortcut false)")
    ap.add_argument("--temporal-conv", default="conv3d", choices=list(TEMPORAL_CONVS),
                    help="with --gpu-full: priors.temporal_conv")
    ap.add_argument("--temporal-norm", default="groupnorm", choices=list(TEMPORAL_NORMS),
                    help="with --gpu-full: priors.temporal_norm")
    args = ap.parse_args(argv)
    if args.gpu_full:
        runtime = {"attention_backend": args.attention, "cross_attention_shortcut": not args.no_shortcut,
                   "channels_last": args.channels_last, "temporal_conv": args.temporal_conv,
                   "temporal_norm": args.temporal_norm, "compile": args.compile,
                   "compile_mode": args.compile_mode, "compile_freezing": args.freezing}
        res = gpu_full(args.tiny, args.chunk or (2 if args.tiny else 5), args.steps, args.warmup, args.device,
                       args.views, args.frames, args.latent, runtime)
    else:
        sizes = [tuple(int(n) for n in s.split("x")) for s in args.sizes.split(",")]
        res = cpu_table(sizes, args.steps, args.chunk or 2, args.threads)  # type: ignore[arg-type]
        print_cpu_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
