"""A self-contained HTML report of a run folder: ``DIR/report/index.html``.

No server and no internet: CSS and JavaScript are inline; pictures and videos are files next to
the page (``report/media/...``) or relative links to the run folder's own outputs. What it shows:

* generate / benchmark run: the results table (when scored), the link to the MLflow run, and per
  object the input, the sampled matrix as a labelled grid (views down, frames across), one video
  per evaluation view with input | prediction | ground truth side by side (and ``compare.mp4``,
  all views stacked), the turntable, the fit's numbers and a WebGL viewer of the 4D Gaussians;
* sweep: the comparison table (one row per point, captioned with its protocol, with the time per
  asset and the peak GPU memory), per object every point's matrix (``grid.png``, ``grid.mp4``) and
  turntable side by side, the figure grid, one plot (inline SVG) of each metric against each
  swept knob, and a link to every point's own report.

The markup is in ``templates/`` (jinja2, autoescaped): this module reads the folder, writes the
media and hands the page plain data (table rows, captions, percent-encoded URLs). Every builder is
a function over the folder; nothing here computes a stage.
"""

from __future__ import annotations

import functools
import json
import math
import os
import urllib.parse
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from d2.reports.viewer import write_viewer_data
from d2.reports.media import (MIN_PREVIEW, hstack, labelled_grid, labelled_tile, save_mp4, save_png, to_rgb8,
                              upscale, vstack)

REPORT_DIR = "report"
VIDEO_FPS = 8  # frame rate of the comparison videos
TEMPLATES = Path(__file__).with_name("templates")


@functools.cache
def templates() -> jinja2.Environment:
    """The report's templates: every ``{{ value }}`` HTML-escaped, an unknown name an error."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    return env


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_rgb8(path: Path) -> np.ndarray:
    """An image file as uint8 [H, W, 3] (alpha composited on white)."""
    from d2.utils.io import load_image

    return to_rgb8(load_image(path).numpy())


def numbered_pngs(folder: Path) -> list[Path]:
    """``folder/<i>.png`` in numeric order (``frame_YY.png`` names sort by their number too)."""
    def key(p: Path) -> tuple[int, str]:
        digits = "".join(ch for ch in p.stem if ch.isdigit())
        return (int(digits) if digits else -1, p.name)

    return sorted((p for p in folder.glob("*.png") if p.is_file()), key=key) if folder.is_dir() else []


def rel(target: Path, start: Path) -> str:
    """A relative URL from folder ``start`` to ``target``: forward slashes, every other character
    that is not plain in a URL path percent-encoded (an object named ``a#b?c%d`` is a folder
    name, not a fragment, a query and an escape)."""
    return urllib.parse.quote(Path(os.path.relpath(target, start)).as_posix(), safe="/=,")


def anchor(obj: str) -> str:
    """The page-internal link to an object's section (its id percent-encoded in the fragment)."""
    return "#obj-" + urllib.parse.quote(obj, safe="")


def fmt(v: Any) -> str:
    """A table cell's text (the templates' ``fmt`` filter)."""
    if v is None:  # a score that is no finite number (null in results.json; results.md says why)
        return "-\u2021"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


# ---------------------------------------------------------------------------------------
# MLflow


def mlflow_link(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The MLflow run of this folder (id, tracking URI, link into the UI); None when MLflow was off."""
    run_id = manifest.get("mlflow_run_id")
    if not run_id:
        return None
    uri = manifest.get("mlflow_tracking_uri") or ""
    exp = manifest.get("mlflow_experiment_id")
    route = f"#/experiments/{exp}/runs/{run_id}" if exp else f"#/runs/{run_id}"
    remote = uri.startswith(("http://", "https://"))
    ui = uri.rstrip("/") if remote else "http://127.0.0.1:5000"
    return {"run_id": run_id, "uri": uri, "link": f"{ui}/{route}",
            "start_ui": bool(uri) and not remote}  # a local store: the page says how to start its UI


# ---------------------------------------------------------------------------------------
# One object


def ground_truth_dir(run_dir: Path, manifest: dict[str, Any], obj: str) -> Path | None:
    """Where the object's ground truth views are (benchmark: ``<data>/gt/<obj>``; generate: ``--gt``)."""
    if manifest.get("data"):
        d = Path(manifest["data"]) / "gt" / obj
    elif manifest.get("gt"):
        d = Path(manifest["gt"])
    else:
        return None
    return d if d.is_dir() else None


def matrix_grid(sampling: Path, out: Path) -> Path | None:
    """The matrix as one labelled PNG: a row per view (azimuth), a column per frame (time)."""
    meta = read_json(sampling / "matrix.json") or {}
    views = sorted(p for p in sampling.glob("view_*") if p.is_dir())
    if not views:
        return None
    cells = [[read_rgb8(p) for p in numbered_pngs(v)] for v in views]
    if not cells[0] or any(len(r) != len(cells[0]) for r in cells):
        return None
    az = meta.get("azimuths_deg") or []
    times = meta.get("times") or []
    rows = [f"v{i} {az[i]:.0f}\u00b0" if i < len(az) else f"v{i}" for i in range(len(cells))]
    cols = [f"f{j}" for j in range(len(cells[0]))]
    span = f", t = {times[0]:.2f} .. {times[-1]:.2f}" if times else ""
    res = meta.get("resolution", cells[0][0].shape[0])
    grid = labelled_grid(cells, rows, cols, f"views (azimuth), {len(cells)} x {res} px",
                         f"frames (time), {len(cells[0])}{span}")
    return save_png(out, grid)


def _frames_at(frames: list[np.ndarray], n: int) -> list[np.ndarray]:
    """``frames`` resampled (nearest in time) to ``n`` frames."""
    if not frames:
        return []
    return [frames[min(len(frames) - 1, (i * len(frames)) // n)] for i in range(n)]


def comparison_videos(obj_dir: Path, gt_dir: Path | None, azimuths: list[float], media: Path,
                      memo: Path | None = None) -> list[dict[str, Any]]:
    """One MP4 per evaluation view (input | prediction | ground truth, each >= 256 px) and
    ``compare.mp4`` with every view stacked (encoded videos reused from ``memo``, by content).
    Returns ``[{"view", "azimuth", "path", "has_gt"}]``."""
    render = obj_dir / "render_eval"
    views = sorted((p for p in render.glob("eval_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    inputs = [read_rgb8(p) for p in numbered_pngs(obj_dir / "conditions" / "video")]
    side = MIN_PREVIEW
    out: list[dict[str, Any]] = []
    stacked: list[list[np.ndarray]] = []
    for v in views:
        k = int(v.name.split("_")[1])
        pred = [read_rgb8(p) for p in numbered_pngs(v)]
        if not pred:
            continue
        n = len(pred)
        gt = [read_rgb8(p) for p in numbered_pngs(gt_dir / v.name)][:n] if gt_dir is not None else []
        ins = _frames_at(inputs, n)
        az = f" {azimuths[k]:.0f}\u00b0" if k < len(azimuths) else ""
        frames = []
        for i in range(n):
            tiles = []
            if ins:
                tiles.append(labelled_tile(ins[i], "input", side))
            tiles.append(labelled_tile(pred[i], f"prediction, view {k}{az}", side))
            if i < len(gt):
                tiles.append(labelled_tile(gt[i], "ground truth", side))
            frames.append(hstack(tiles))
        path = save_mp4(media / f"eval_{k}.mp4", frames, VIDEO_FPS, memo)
        out.append({"view": k, "azimuth": azimuths[k] if k < len(azimuths) else None, "path": path,
                    "has_gt": bool(gt)})
        stacked.append(frames)
    if stacked:
        n = min(len(s) for s in stacked)
        save_mp4(media / "compare.mp4", [vstack([s[i] for s in stacked]) for i in range(n)], VIDEO_FPS, memo)
    return out


def object_section(run_dir: Path, manifest: dict[str, Any], params: dict[str, Any], obj: str, out: Path,
                   scores: dict[str, float] | None) -> dict[str, Any]:
    """What the page shows of one object (its media written under ``out/media/<obj>``)."""
    obj_dir = run_dir / "objects" / obj
    media = out / "media" / obj
    reading = ((read_json(obj_dir / "conditions" / "conditions.json") or {}).get("input_reading") or {})
    inp, shown = obj_dir / "conditions" / "input.png", None
    if inp.is_file():
        img = read_rgb8(inp)
        big = upscale(img)
        shown = {"src": rel(save_png(media / "input.png", big), out),
                 "caption": f"input as conditioned ({img.shape[1]}x{img.shape[0]} px, shown x"
                            f"{big.shape[0] // img.shape[0]})"}
    grid = matrix_grid(obj_dir / "sampling", media / "matrix.png")
    turntable = obj_dir / "fit" / "turntable.mp4"
    azimuths = list(((params.get("protocol") or {}).get("eval_azimuths_deg")) or [])
    memo = Path(params.get("run", {}).get("cache_dir", ".d2cache")) / ".media"  # the stage cache's folder
    views = []
    for v in comparison_videos(obj_dir, ground_truth_dir(run_dir, manifest, obj), azimuths, media, memo):
        az = f", azimuth {v['azimuth']:.0f}\u00b0" if v["azimuth"] is not None else ""
        gt = "" if v["has_gt"] else " (no ground truth)"
        views.append({"src": rel(v["path"], out), "label": f"view {v['view']}", "caption": f"view {v['view']}{az}{gt}"})
    fit, fit_table = read_json(obj_dir / "fit" / "fit.json"), None
    if isinstance(fit, dict):
        fit = {**fit, **{k: v for k, v in (fit.get("matrix_fit") or {}).items() if k.startswith("motion_")}}
        keys = [k for k in ("V", "F", "resolution", "iterations", "num_gaussians", "train_psnr", "matrix_psnr",
                            "motion_matrix", "motion_fit") if k in fit]
        fit_table = {"header": keys, "rows": [[fit[k] for k in keys]], "motion": "motion_fit" in fit}
    return {"name": obj, "anchor": anchor(obj), "reading": reading.get("summary") or "",
            "scores": {"header": list(scores), "rows": [list(scores.values())]} if scores else None,
            "input": shown, "matrix": rel(grid, out) if grid is not None else None,
            "turntable": rel(turntable, out) if turntable.is_file() else None,
            "views": views, "compare": rel(media / "compare.mp4", out) if views else None,
            "fit": fit_table, "viewer": viewer(obj_dir / "fit", media, out, obj)}


def viewer(fit_dir: Path, media: Path, out: Path, obj: str) -> dict[str, Any] | None:
    """The WebGL viewer of one object: its data script and last time index, or why it is not shown
    (an unreadable Gaussians file); None when the fit has no Gaussians."""
    try:
        data = write_viewer_data(fit_dir, media / "splats.js", obj)
    except Exception as e:  # noqa: BLE001  (an unreadable file, whatever raised: said, not fatal)
        return {"error": f"{type(e).__name__}: {e}"}
    if data is None:
        return None
    return {"error": "", "script": rel(media / "splats.js", out), "last_time": data["times"] - 1}


# ---------------------------------------------------------------------------------------
# Tables


def results_table(run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, dict[str, float]]]:
    """The benchmark's results table (objects and mean, with its notes) and each object's scores."""
    res = read_json(run_dir / "results" / "results.json")
    if not isinstance(res, dict):
        return None, {}
    per_object: dict[str, dict[str, float]] = res.get("per_object") or {}
    metrics = [m for m in (res.get("metrics") or []) if any(m in v for v in per_object.values())
               or m in (res.get("mean") or {})]
    rows = [[o] + [per_object[o].get(m, float("nan")) for m in metrics] for o in sorted(per_object)]
    rows.append(["mean"] + [(res.get("mean") or {}).get(m, float("nan")) for m in metrics])
    gen = res.get("generation_time_s")
    results = {"header": ["object"] + metrics, "rows": rows,
               "unavailable": "; ".join(str(v) for v in (res.get("unavailable") or {}).values()),
               "has_null": any(v is None for r in rows for v in r),
               "generation_s": f"{gen:.1f}" if isinstance(gen, (int, float)) else ""}
    return results, {o: {m: per_object[o][m] for m in metrics if m in per_object[o]} for o in per_object}


def timing_rows(manifest: dict[str, Any]) -> list[list[Any]]:
    """Per stage: how often it was computed and taken from the cache, and its compute seconds."""
    stages: dict[str, dict[str, float]] = {}
    for rec in manifest.get("stages", []):
        s = stages.setdefault(rec.get("stage", "?"), {"computed": 0, "cached": 0, "seconds": 0.0})
        s[rec.get("status", "computed")] = s.get(rec.get("status", "computed"), 0) + 1
        s["seconds"] += float(rec.get("compute_seconds") or 0.0)
    return [[k, int(v["computed"]), int(v["cached"]), round(v["seconds"], 2)] for k, v in stages.items()]


# ---------------------------------------------------------------------------------------
# Sweeps


def _as_number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot(xs: list[Any], ys: list[float], xlabel: str, ylabel: str, w: int = 300, h: int = 200
         ) -> dict[str, Any] | None:
    """The geometry of a scatter of ``ys`` against ``xs`` (numbers, or categories in first-seen
    order) with the mean at each x joined by a line, for ``plot.svg.j2``; None with no finite y."""
    pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and not math.isnan(y)]
    if not pts:
        return None
    numeric = all(_as_number(x) is not None for x, _ in pts)
    cats = list(dict.fromkeys(str(x) for x, _ in pts))
    xv = [(_as_number(x) if numeric else float(cats.index(str(x)))) for x, _ in pts]
    yv = [float(y) for _, y in pts]
    x0, x1 = min(xv), max(xv)
    y0, y1 = min(yv), max(yv)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.05 - 1e-3, y1 + abs(y1) * 0.05 + 1e-3
    ml, mr, mt, mb = 52, 12, 10, 36
    sx = lambda x: ml + (x - x0) / (x1 - x0) * (w - ml - mr)  # noqa: E731
    sy = lambda y: h - mb - (y - y0) / (y1 - y0) * (h - mt - mb)  # noqa: E731
    ticks = sorted(set(xv))
    means = [(t, sum(y for x, y in zip(xv, yv) if x == t) / sum(1 for x in xv if x == t)) for t in ticks]
    return {"w": w, "h": h, "left": ml, "right": w - mr, "top": mt, "bottom": h - mb, "xlabel": xlabel,
            "ylabel": ylabel, "xmid": (ml + w - mr) / 2, "ymid": (mt + h - mb) / 2,
            "xticks": [{"x": f"{sx(t):.1f}", "label": f"{t:g}" if numeric else cats[int(t)]} for t in ticks[:12]],
            "yticks": [{"y": f"{sy(t) + 3:.1f}", "label": f"{t:.4g}"} for t in (y0, (y0 + y1) / 2, y1)],
            "means": " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in means) if len(means) > 1 else "",
            "points": [{"x": f"{sx(x):.1f}", "y": f"{sy(y):.1f}", "value": y} for x, y in zip(xv, yv)]}


def svg_plot(xs: list[Any], ys: list[float], xlabel: str, ylabel: str) -> str:
    """:func:`plot` drawn as inline SVG ('' with no finite y)."""
    p = plot(xs, ys, xlabel, ylabel)
    return templates().get_template("plot.svg.j2").render(p=p) if p else ""


def comparison_table(run_dir: Path) -> dict[str, Any] | None:
    """The sweep's comparison table as the run wrote it (``results/ablation.csv``: its ``#`` caption,
    header and rows; the notes of ``ablation.md``); None when the run has none (stages without
    results tables)."""
    path = run_dir / "results" / "ablation.csv"
    if not path.is_file():
        return None
    import csv

    lines = path.read_text().splitlines()
    caption = " ".join(line[1:].strip() for line in lines if line.startswith("#"))
    rows = list(csv.reader(line for line in lines if not line.startswith("#")))
    md = run_dir / "results" / "ablation.md"
    notes = [line[2:] for line in md.read_text().splitlines() if line.startswith("- ")] if md.is_file() else []
    return {"caption": caption, "header": rows[0], "rows": rows[1:], "notes": notes} if rows else None


def side_by_side(run_dir: Path, points: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Per object (of any point), every point's matrix (grid.png, grid.mp4) and turntable, in the
    points' order: ``[{"name", "cells": [{"point", "grid", "grid_video", "turntable"}]}]`` (links
    into the points' folders; None where a point has no such file)."""
    pdirs = {pid: run_dir / "points" / pid for pid in points}
    objects = list(dict.fromkeys(o for d in pdirs.values() for o in list_objects(d)))

    def link(path: Path) -> str | None:
        return rel(path, out) if path.is_file() else None

    return [{"name": obj, "cells": [
        {"point": pid, "grid": link(d / "objects" / obj / "sampling" / "grid.png"),
         "grid_video": link(d / "objects" / obj / "sampling" / "grid.mp4"),
         "turntable": link(d / "objects" / obj / "fit" / "turntable.mp4")} for pid, d in pdirs.items()]}
        for obj in objects]


def sweep_body(run_dir: Path, manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """The sweep's comparison table, each object's matrices and turntables side by side, figure
    grid, metric-vs-knob plots and links to the points."""
    sweep = read_json(run_dir / "sweep.json") or {}
    grid: dict[str, list[Any]] = sweep.get("grid") or manifest.get("grid") or {}
    rows: list[dict[str, Any]] = sweep.get("rows") or []
    knobs = list(grid)
    metrics = [k for k in dict.fromkeys(k for r in rows for k in r)
               if k not in knobs and k != "point" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    body: dict[str, Any] = {"ablation": comparison_table(run_dir), "figure": None, "points": [],
                            "side_by_side": side_by_side(run_dir, manifest.get("points") or {}, out)}
    if rows and body["ablation"] is None:
        body["ablation"] = {"caption": "", "notes": [], "header": ["point"] + knobs + metrics,
                            "rows": [[r.get("point")] + [r.get(k) for k in knobs] + [r.get(m) for m in metrics]
                                     for r in rows]}
    fig = run_dir / "results" / "figure.png"
    if fig.is_file():
        body["figure"] = rel(save_png(out / "media" / "figure.png", upscale(read_rgb8(fig), 2 * MIN_PREVIEW)), out)
    body["plots"] = [{"p": plot([r.get(k) for r in rows], [r.get(m) for r in rows], k, m), "caption": f"{m} vs {k}"}
                     for m in metrics for k in knobs]
    for pid in (manifest.get("points") or {}):
        idx = run_dir / "points" / pid / REPORT_DIR / "index.html"
        if idx.is_file():
            body["points"].append({"name": pid, "href": rel(idx, out)})
    return body


# ---------------------------------------------------------------------------------------
# The page


def list_objects(run_dir: Path) -> list[str]:
    """The objects with outputs in the run folder (not the benchmark's internal '_' jobs)."""
    d = run_dir / "objects"
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))) if d.is_dir() else []


def build_html_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``run_dir/report/index.html`` (or into ``out_dir``) and its media; returns the page's path.

    A sweep folder's points get their own reports first (linked from the sweep's page).
    """
    run_dir = Path(run_dir).resolve()
    manifest = read_json(run_dir / "manifest.json")
    if not isinstance(manifest, dict):
        raise FileNotFoundError(f"{run_dir} is not a run folder (no readable manifest.json)")
    params = read_json(run_dir / "params.json") or {}
    out = Path(out_dir).resolve() if out_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    kind = manifest.get("kind", "run")
    page: dict[str, Any] = {
        "title": f"{kind}: {run_dir.name}", "status": manifest.get("status", "?"),
        "wall_s": f"{float(manifest.get('flow_wall_seconds') or 0.0):.1f}", "mlflow": mlflow_link(manifest),
        "errors": [{k: e.get(k, "") for k in ("object", "stage", "error")} for e in manifest.get("errors") or []],
        "sweep": None, "results": None, "objects": [], "timing": timing_rows(manifest)}
    if kind == "sweep":
        for pid in (manifest.get("points") or {}):
            pdir = run_dir / "points" / pid
            if (pdir / "manifest.json").is_file():
                build_html_report(pdir)
        page["sweep"] = sweep_body(run_dir, manifest, out)
    else:
        page["results"], scores = results_table(run_dir)
        page["objects"] = [object_section(run_dir, manifest, params, o, out, scores.get(o))
                           for o in list_objects(run_dir)]
    index = out / "index.html"
    index.write_text(templates().get_template("report.html.j2").render(page))
    return index


def write_run_report(run_dir: str | Path) -> str | None:
    """:func:`build_html_report` for the end of a flow: the page's path, or None (with the reason
    printed) when it could not be built; a report never fails the run it reports on."""
    try:
        return str(build_html_report(run_dir))
    except Exception as e:  # noqa: BLE001  (the run's results are already written and recorded)
        print(f"d2: the HTML report of {run_dir} could not be built: {type(e).__name__}: {e}", flush=True)
        return None


REPORT_ARTIFACTS = ("input.png", "matrix.png", "compare.mp4")  # per object, what MLflow gets of the report


def report_artifacts(page: str | Path) -> list[tuple[Path, str]]:
    """``(file, MLflow artifact folder)`` pairs of a report: each object's input, labelled matrix grid
    and comparison video (``report/<object>/``), the sweep's figure grid, and the page itself."""
    page = Path(page)
    media = page.parent / "media"
    files = [(page, "report")]
    if (media / "figure.png").is_file():
        files.append((media / "figure.png", "report"))
    for obj in sorted(p for p in media.iterdir() if p.is_dir()) if media.is_dir() else []:
        files += [(obj / n, f"report/{obj.name}") for n in REPORT_ARTIFACTS if (obj / n).is_file()]
    return files


def track_report(tracker: Any, page: str | None) -> None:
    """Give the run's MLflow run (a :class:`d2.execution.tracking.Tracker`, or None) the report's
    path as tag ``d2.report`` and its previews as artifacts; a failure here is printed, never raised."""
    if tracker is None or not page:
        return
    try:
        tracker.client.set_tag(tracker.run_id, "d2.report", str(page))
        tracker.log_artifacts(tracker.run_id, report_artifacts(page))
    except Exception as e:  # noqa: BLE001  (the run and its report are complete without MLflow's copy)
        print(f"d2: the report could not be logged to MLflow: {type(e).__name__}: {e}", flush=True)
