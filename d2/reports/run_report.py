"""``d2 report``: the tables of a finished benchmark or sweep folder, rebuilt without compute.

Benchmark folder -> ``results.{md,csv,tex,json}``, ``table2.*`` (the evaluation's
tables), ``timing.md`` (per-stage seconds, computed vs cached) and ``metrics.json``.
Sweep folder -> ``ablation.{md,csv,tex}`` (one row per point), ``figure.png`` (one row per
point: the first object's evaluation views at the middle frame), ``timing.md``, ``metrics.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from d2.utils.io import write_json, write_text


def _timing_markdown(manifest: dict[str, Any]) -> str:
    stages: dict[str, dict[str, float]] = {}
    for rec in manifest.get("stages", []):
        s = stages.setdefault(rec["stage"], {"computed": 0, "cached": 0, "compute_seconds": 0.0, "n": 0})
        s[rec["status"]] += 1
        s["compute_seconds"] += rec["compute_seconds"]
        s["n"] += 1
    lines = ["| stage | computed | cached | mean compute s |", "|---|---:|---:|---:|"]
    for name, s in stages.items():
        lines.append(f"| {name} | {s['computed']} | {s['cached']} | {s['compute_seconds'] / max(s['n'], 1):.2f} |")
    wall = manifest.get("flow_wall_seconds", manifest.get("wall_seconds", 0.0))
    lines.append("")
    lines.append(f"flow wall time {wall:.1f} s; status {manifest.get('status')}")
    return "\n".join(lines) + "\n"


def _load_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no manifest.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("status") != "completed":
        raise ValueError(f"{run_dir}: the run did not complete (status {manifest.get('status')}); "
                         f"see the errors in {path}")
    return manifest


def build_report(run_dir: Path, out_dir: Path | None = None, metrics_path: Path | None = None) -> dict[str, Any]:
    """Write the report of ``run_dir`` into ``out_dir`` (default ``run_dir/report``).

    ``metrics_path`` (default ``out_dir/metrics.json``) gets the headline numbers (for DVC).
    Returns ``{"out_dir", "table_path", "metrics"}``.
    """
    from d2.eval.tables import write_results

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    manifest = _load_manifest(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "timing.md", _timing_markdown(manifest))
    if manifest["kind"] == "sweep":
        metrics, table = sweep_report(run_dir, out_dir, manifest["points"])
    else:
        from d2.eval.tables import load_results

        results = load_results(run_dir / "results")
        files = write_results(results, out_dir)
        metrics = {"mean": results.mean, "per_object": results.per_object, "frames": results.frames,
                   "generation_time_s": results.generation_time_s}
        table = files["md"]
    write_json(metrics_path or out_dir / "metrics.json", metrics)
    return {"out_dir": str(out_dir), "table_path": str(table), "metrics": metrics}


def peak_gpu_memory(manifest: dict[str, Any]) -> int | str | None:
    """The largest ``peak_gpu_memory`` any stage of a run recorded (bytes), ``"cpu"`` when every
    stage that recorded one ran on the CPU, None when none did."""
    peaks = [rec.get("info", {}).get("peak_gpu_memory") for rec in manifest.get("stages", [])]
    numbers = [p for p in peaks if isinstance(p, int) and not isinstance(p, bool)]
    if numbers:
        return max(numbers)
    return "cpu" if "cpu" in peaks else None


def ignored_knobs(point_dir: Path, params: dict[str, Any]) -> list[str]:
    """The varied ``sampling.*`` knobs (of ``params``) that the point's sampling method does not read,
    as its first object's ``matrix.json`` records them."""
    metas = sorted((point_dir / "objects").glob("*/sampling/matrix.json"))
    ignored = json.loads(metas[0].read_text()).get("ignored_knobs", []) if metas else []
    return [k for k in params if k.startswith("sampling.") and k.split(".", 1)[1] in ignored]


def sweep_report(run_dir: Path, out_dir: Path, points: dict[str, list[str]]) -> tuple[dict[str, Any], Path]:
    """The comparison table of a sweep's ``points`` (id -> overrides; one row each, with its
    generation time per asset and peak GPU memory, captioned with the protocol) and its figure grid
    (one row per point: the first object's evaluation views at the middle frame) in ``out_dir``."""
    import torch

    from d2.eval.tables import AblationPoint, load_results, protocol_line, write_ablation_table, write_figure_grid
    from d2.utils.io import load_image

    table_rows: list[AblationPoint] = []
    metrics: dict[str, Any] = {}
    images: list[torch.Tensor] = []
    labels: list[str] = []
    requested: list[str] = []
    described: list[str] = []
    for pid, overrides in points.items():
        pdir = run_dir / "points" / pid
        results = load_results(pdir / "results")
        requested = requested or list(results.metrics)
        described = described if results.protocol.describe() in described else described + [results.protocol.describe()]
        params = dict(o.split("=", 1) for o in overrides)
        manifest = json.loads((pdir / "manifest.json").read_text()) if (pdir / "manifest.json").is_file() else {}
        memory = peak_gpu_memory(manifest)
        table_rows.append(AblationPoint(label=pid, params=params, metrics=results.mean, unavailable=results.unavailable,
                                        time_s=results.generation_time_s, peak_gpu_memory=memory,
                                        protocol=protocol_line(results, "each point"),
                                        ignored=ignored_knobs(pdir, params)))
        metrics[pid] = {"params": params, "mean": results.mean, "time_per_asset_s": results.generation_time_s,
                        "peak_gpu_memory": memory}
        obj = results.objects[0] if results.objects else None
        if obj is not None:
            render = pdir / "objects" / obj / "render_eval"
            views = sorted((p for p in render.glob("eval_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
            imgs = []
            for v in views:
                frames = sorted(v.glob("*.png"), key=lambda p: int(p.stem))
                if frames:
                    imgs.append(load_image(frames[len(frames) // 2]))
            if imgs and (not images or images[0].shape[0] == len(imgs)):
                images.append(torch.stack(imgs))  # [K, 3, H, W]
                labels.append(pid)
    files = write_ablation_table(table_rows, out_dir, requested, " ".join(described))
    if images and len({tuple(r.shape) for r in images}) == 1:
        write_figure_grid(torch.stack(images), out_dir / "figure.png", row_labels=labels)
    return metrics, files["md"]
