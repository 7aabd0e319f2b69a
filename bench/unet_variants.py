"""Exact reformulations of the UNet forward, timed against the reference formulation in one run.

Variants (``priors.*`` knobs, d2/stages/unet_runtime.py):

- ``reference``: every cross-attention through SDPA, temporal convolutions as ``Conv3d``
  and GroupNorm (what diffusers' UNetSpatioTemporalConditionModel does);
- ``shortcut``: ``cross_attention_shortcut`` (single-key cross-attention in closed form);
- ``gemm``: ``temporal_conv: gemm`` (the (3,1,1) temporal convolution as one GEMM);
- ``framewise``: ``temporal_norm: framewise`` (temporal GroupNorm statistics per frame);
- ``all``: the three together.

For each: seconds per forward of one sampler chunk (``--chunk`` sequences x 2 for CFG, median
of ``--repeats``; CUDA events on a GPU), the output's largest deviation from the reference
(relative to the reference's standard deviation), FLOPs counted by FlopCounterMode for the
reference (*nominal*) and for the variant (*executed*), and TFLOP/s against both. Eager
forwards are timed round-robin over the variants (one forward of each per round), so drift of
a noisy machine hits them alike. ``--compile`` compiles each variant in turn (torch.compile;
minutes each at full size, the compilation timed) and times it then.

    python bench/unet_variants.py --json runs/variants.json          # one H100/H200, ~1 min eager
    python bench/unet_variants.py --family multiview                 # the SV3D_p UNet
    python bench/unet_variants.py --tiny                             # tiny UNet on the CPU
    python bench/unet_variants.py --mini --chunk 4                   # the demo's trained miniature priors, CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampler import _fake_condition, _random_unet, count_flops, time_calls  # noqa: E402

from d2.stages.priors import (  # noqa: E402
    PixelSpaceVAE,
    Prior,
    PriorsConfig,
    TinyPriorConfig,
    load_priors,
    tiny_unet_config,
)
from d2.stages.unet_runtime import COMPILE_MODES  # noqa: E402

_REF = {"cross_attention_shortcut": False, "temporal_conv": "conv3d", "temporal_norm": "groupnorm"}
VARIANTS = {  # name -> configure_runtime knobs
    "reference": _REF,
    "shortcut": {**_REF, "cross_attention_shortcut": True},
    "gemm": {**_REF, "temporal_conv": "gemm"},
    "framewise": {**_REF, "temporal_norm": "framewise"},
    "all": {"cross_attention_shortcut": True, "temporal_conv": "gemm", "temporal_norm": "framewise"},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["video", "multiview"], default="video",
                    help="SVD-XT (25 frames) or SV3D_p (21 views) UNet")
    ap.add_argument("--chunk", type=int, default=3, help="sequences per forward before CFG doubling "
                    "(the sampler's equal chunk: 3 rows of 21, 5 columns of 25)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per variant")
    ap.add_argument("--variants", default="reference,shortcut,gemm,framewise,all",
                    help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--attention", default="auto", help="priors.attention_backend for every variant")
    ap.add_argument("--compile", action="store_true", help="torch.compile each variant (minutes each at full size)")
    ap.add_argument("--compile-mode", default="default", choices=list(COMPILE_MODES), help="with --compile")
    ap.add_argument("--freezing", action="store_true", help="with --compile: Inductor freezing")
    ap.add_argument("--tiny", action="store_true", help="tiny architecture on the CPU")
    ap.add_argument("--mini", action="store_true", help="the trained miniature priors (data/priors/) on the CPU")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    if bad := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    from diffusers import UNetSpatioTemporalConditionModel
    from diffusers.utils import logging as dlogging

    from d2.stages.sv3d import SV3D_P_UNET_CONFIG, SVD_XT_UNET_CONFIG, SV3DUNet

    dlogging.set_verbosity_error()
    cuda = torch.cuda.is_available() and not (args.tiny or args.mini)
    device = torch.device("cuda" if cuda else "cpu")
    cls = UNetSpatioTemporalConditionModel if args.family == "video" else SV3DUNet
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.mini:  # the trained miniature priors the demo uses (pixel space)
        video, mv = load_priors(PriorsConfig(backend="mini"))
        prior = video if args.family == "video" else mv
        unet = prior.unet
        t, latent, dtype = prior.default_num_frames, prior.latent_size, torch.float32
        ctx = int(unet.config.cross_attention_dim)
        torch.set_num_threads(1)
    else:
        if args.tiny:
            tc = TinyPriorConfig()
            t, latent, dtype, ctx = (4 if args.family == "video" else 3), 8, torch.float32, tc.cross_attention_dim
            conf = tiny_unet_config(tc, args.family, 4, t)
            torch.set_num_threads(1)
        else:
            t = 25 if args.family == "video" else 21
            latent, dtype, ctx = 72, torch.bfloat16, 1024
            conf = SVD_XT_UNET_CONFIG if args.family == "video" else SV3D_P_UNET_CONFIG
        unet = _random_unet(cls, conf, device, dtype, 0)
        prior = Prior(args.family, unet, PixelSpaceVAE(), None, None, latent * 8, name=f"{args.family}-random")
        prior = prior.to(device)
    b, c = 2 * args.chunk, int(unet.config.in_channels) // 2  # noisy latents + concatenated condition
    gen = torch.Generator().manual_seed(0)
    cond = _fake_condition(prior, b, t, latent, ctx, device, gen, c)
    sigma = torch.ones(b, device=device)
    x = torch.randn(b, t, c, latent, latent, generator=gen).to(device)
    res: dict = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
                 "family": args.family, "batch_sequences": b, "frames": t, "latent": latent, "dtype": str(dtype),
                 "attention": args.attention, "compile": args.compile, "compile_mode": args.compile_mode,
                 "freezing": args.freezing, "variants": []}

    def timed(n: int) -> list[float]:
        return time_calls(lambda: prior.denoise_raw(x, sigma, cond), n, cuda)

    def configure(name: str, compile: bool = False) -> None:
        prior.configure_runtime(attention_backend=args.attention, compile=compile, compile_mode=args.compile_mode,
                                compile_freezing=args.freezing, **VARIANTS[name])

    rows: dict[str, dict] = {}
    with torch.no_grad():
        eager: dict[str, tuple[float, torch.Tensor]] = {}
        for name in dict.fromkeys(["reference", *names]):  # FLOPs and output of each, eagerly, reference first
            configure(name)
            eager[name] = (count_flops(unet, prior, t, latent, ctx, device) * b,
                           prior.denoise_raw(x, sigma, cond).float())
        nominal, ref_out = eager["reference"]
        for name in names:
            flops, out = eager[name]
            rows[name] = {"variant": name, **VARIANTS[name], "executed_tflop": round(flops / 1e12, 4),
                          "nominal_tflop": round(nominal / 1e12, 4), "flop_fraction": round(flops / nominal, 4),
                          "max_dev_vs_reference_rel_std": float(f"{((out - ref_out).abs().max() / ref_out.std()).item():.3g}"),
                          "finite": bool(torch.isfinite(out).all()), "times": []}
        if args.compile:  # one compilation per variant, then its timings in a row
            for name in names:
                torch._dynamo.reset()
                configure(name, compile=True)
                t0 = time.perf_counter()
                prior.denoise_raw(x, sigma, cond)
                if cuda:
                    torch.cuda.synchronize()
                rows[name]["compile_s"] = round(time.perf_counter() - t0, 1)
                timed(1)
                rows[name]["times"] = timed(args.repeats)
                print(f"{name}: compiled in {rows[name]['compile_s']} s, {rows[name]['times']}", flush=True)
        else:  # eager: round-robin over the variants, so machine drift hits them alike
            for name in names:
                configure(name)
                timed(1)  # warm-up (cuDNN autotuning)
            for r in range(args.repeats):
                for name in names:
                    configure(name)
                    rows[name]["times"] += timed(1)
                print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {rows[n]['times'][-1]:.4f} s" for n in names),
                      flush=True)
    for row in rows.values():
        times = row.pop("times")
        sec = statistics.median(times)
        row.update({"s_per_forward": round(sec, 5), "spread": round(max(times) - min(times), 5),
                    "nominal_tflops": round(nominal / sec / 1e12, 2),
                    "executed_tflops": round(row["flop_fraction"] * nominal / sec / 1e12, 2)})
        res["variants"].append(row)
    if "reference" in rows:
        ref_s = rows["reference"]["s_per_forward"]
        print(f"\nmedian of {args.repeats} forwards ({b} sequences x {t} frames at {latent}^2), "
              f"speed-up against the reference ({ref_s:.4f} s):")
        for r in res["variants"]:
            r["speedup_vs_reference"] = round(ref_s / r["s_per_forward"], 3)
            print(f"  {r['variant']:>14}: {r['s_per_forward']:.4f} s (spread {r['spread']:.4f})  "
                  f"x{r['speedup_vs_reference']:.3f}  {r['flop_fraction']:.3f} of the FLOPs,  "
                  f"nominal {r['nominal_tflops']} / executed {r['executed_tflops']} TFLOP/s, "
                  f"max deviation {r['max_dev_vs_reference_rel_std']} std"
                  + (f", compiled in {r['compile_s']} s" if "compile_s" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
