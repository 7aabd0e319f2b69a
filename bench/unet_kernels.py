"""Where a full-size SVD-XT UNet forward spends its GPU time, and which attention kernel is fastest.

One chunk forward of the composed sampler (``--chunk`` rows x 2 for CFG, 25 frames at 72 x 72
latents, bf16, random weights): for each attention backend, the seconds per forward (median of
``--repeats``, CUDA events) and TFLOP/s against FlopCounterMode's count of diffusers'
formulation (the defaults run, so the cross-attention shortcut is on); then a torch.profiler
trace of one forward, its kernels grouped into categories (GEMM, convolution, attention, norm,
elementwise, layout copies) and the top kernels. Also the card's bf16 GEMM ceiling (8192^3).

    python bench/unet_kernels.py --json runs/kernels.json      # one H100/H200, ~1-2 min
    python bench/unet_kernels.py --tiny                         # same code path on the CPU
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampler import _fake_condition, _random_unet, count_flops, time_calls  # noqa: E402

from d2.stages.priors import PixelSpaceVAE, Prior, TinyPriorConfig, tiny_unet_config  # noqa: E402
from d2.stages.unet_runtime import ATTENTION_BACKENDS  # noqa: E402

CATEGORIES = [  # first match wins (kernel names, lower-cased)
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("convolution", r"conv|fprop|dgrad|implicit|winograd|cudnn"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_"),
    ("norm", r"norm|welford|moments"),
    ("layout copy", r"copy|transpose|permute|nchw|nhwc|cat_|catarray"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce|gelu|silu|mul|add|where|index"),
]


def category(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):  # Inductor's fused kernels: named after every op fused in, convolutions included
        return "norm" if re.search(r"group_norm|layer_norm|native_norm", low) else "elementwise"
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"


def gemm_ceiling(device: torch.device) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t0) / 1e12


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=5, help="sequences per forward before CFG doubling")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per attention backend")
    ap.add_argument("--backends", default="auto,flash,cudnn,efficient", help="attention backends to time")
    ap.add_argument("--top", type=int, default=25, help="kernels listed")
    ap.add_argument("--tiny", action="store_true", help="tiny architecture (CPU ok)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet first (timed separately)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.utils import logging as dlogging

    from d2.stages.sv3d import SVD_XT_UNET_CONFIG

    dlogging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.tiny:
        t, latent, dtype, ctx = 4, 8, torch.float32, TinyPriorConfig().cross_attention_dim
        conf = tiny_unet_config(TinyPriorConfig(), "video", 4, t)
    else:
        t, latent, dtype, ctx, conf = 25, 72, torch.bfloat16, 1024, SVD_XT_UNET_CONFIG
    unet = _random_unet(UNetSpatioTemporalConditionModel, conf, device, dtype, 0)
    prior = Prior("video", unet, PixelSpaceVAE(), None, None, latent * 8, name="svd-xt-random").to(device)
    prior.configure_runtime(cross_attention_shortcut=False)  # FLOPs of diffusers' formulation (what a forward costs)
    flop_seq = count_flops(unet, prior, t, latent, ctx, device)
    prior.configure_runtime()  # the defaults (d2/stages/unet_runtime.py) from here on
    b = 2 * args.chunk
    gen = torch.Generator().manual_seed(0)
    cond = _fake_condition(prior, b, t, latent, ctx, device, gen)
    sigma = torch.ones(b, device=device)
    res: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                 "batch_sequences": b, "frames": t, "latent": latent,
                 "tflop_per_forward": round(flop_seq * b / 1e12, 3), "backends": {}}
    if cuda:
        res["gemm_8192_tflops"] = round(gemm_ceiling(device), 1)
        print(f"bf16 GEMM 8192^3: {res['gemm_8192_tflops']} TFLOP/s", flush=True)

    def forward() -> None:
        x = torch.randn(b, t, 4, latent, latent, device=device)  # fresh data every call
        prior.denoise_raw(x, sigma, cond)

    if args.compile:
        prior.configure_runtime(attention_backend=args.backends.split(",")[0], compile=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            prior.denoise_raw(torch.randn(b, t, 4, latent, latent, device=device), sigma, cond)
        if cuda:
            torch.cuda.synchronize()
        res["compile_s"] = round(time.perf_counter() - t0, 1)
        print(f"compiled in {res['compile_s']} s", flush=True)
    with torch.no_grad():
        for backend in args.backends.split(","):
            if backend not in ATTENTION_BACKENDS:
                raise SystemExit(f"unknown backend {backend!r}; choose from {ATTENTION_BACKENDS}")
            prior.configure_runtime(attention_backend=backend)
            try:
                forward()  # warm-up (cudnn autotuning)
                times = time_calls(forward, args.repeats, cuda)
                sec = statistics.median(times)
                res["backends"][backend] = {"s_per_forward": round(sec, 4), "spread": round(max(times) - min(times), 4),
                                            "tflops": round(flop_seq * b / sec / 1e12, 1)}
            except Exception as e:  # noqa: BLE001 - a backend that cannot run is a result too
                res["backends"][backend] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"attention {backend:>9}: {res['backends'][backend]}", flush=True)
        ok = {k: v for k, v in res["backends"].items() if "s_per_forward" in v}
        best = min(ok, key=lambda k: ok[k]["s_per_forward"]) if ok else "auto"
        res["best_attention"] = best
        prior.configure_runtime(attention_backend=best)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        forward()
        with profile(activities=acts) as prof:
            forward()
            if cuda:
                torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        is_kernel = (ev.device_type == torch.autograd.DeviceType.CUDA) if cuda else (ev.name.startswith("aten::")
                                                                                    and not ev.cpu_children)
        if is_kernel:
            dur = ev.device_time if cuda else ev.cpu_time
            per_kernel[ev.name][0] += dur / 1e3  # ms
            per_kernel[ev.name][1] += 1
    total = sum(v[0] for v in per_kernel.values()) or 1.0
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        cats[category(name)] += ms
    res["profile_total_ms"] = round(total, 1)
    res["categories_ms"] = {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]
    res["top_kernels"] = [{"name": n[:160], "ms": round(ms, 2), "calls": c, "share": round(ms / total, 4),
                           "category": category(n)} for n, (ms, c) in top]
    print(f"\nprofile of one forward ({best} attention): {total:.1f} ms of kernels")
    for k, v in res["categories_ms"].items():
        print(f"  {k:>12}: {v:9.1f} ms  {100 * v / total:5.1f}%")
    print("top kernels:")
    for row in res["top_kernels"]:
        print(f"  {row['ms']:9.2f} ms {row['calls']:5d} x {100 * row['share']:5.1f}% [{row['category']}] {row['name'][:110]}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
