"""A self-contained HTML report of a run folder: ``DIR/report/index.html``.

No server and no internet: CSS and JavaScript are inline; pictures and videos are files next to
the page (``report/media/...``) or relative links to the run folder's own outputs. What it shows:

* generate / benchmark run: the results table (when scored), the link to the MLflow run, and per
  object the input, the sampled matrix as a labelled grid (views down, frames across), one video
  per evaluation view with input | prediction | ground truth side by side (and ``compare.mp4``,
  all views stacked), the turntable, the fit's numbers and a WebGL viewer of the 4D Gaussians;
* sweep: the ablation table, the figure grid, one plot (inline SVG) of each metric against each
  swept knob, and a link to every point's own report.

Every builder is a function over the folder; nothing here computes a stage.
"""

from __future__ import annotations

import html
import json
import math
import os
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from d2.reports.viewer import VIEWER_JS, write_viewer_data
from d2.reports.media import (LABEL_H, MIN_PREVIEW, hstack, labelled_grid, labelled_tile, save_mp4, save_png, to_rgb8,
                              upscale, vstack)

REPORT_DIR = "report"
VIDEO_FPS = 8  # frame rate of the comparison videos


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


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
    if v is None:  # a score that is no finite number (null in results.json; results.md says why)
        return "-\u2021"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def table_html(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ---------------------------------------------------------------------------------------
# MLflow


def mlflow_html(manifest: dict[str, Any]) -> str:
    """The MLflow run of this folder: its id, tracking URI and a link into the UI."""
    run_id = manifest.get("mlflow_run_id")
    if not run_id:
        return '<p class="muted">MLflow: off for this run (run.mlflow=false).</p>'
    uri = manifest.get("mlflow_tracking_uri") or ""
    exp = manifest.get("mlflow_experiment_id")
    route = f"#/experiments/{exp}/runs/{run_id}" if exp else f"#/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        link = uri.rstrip("/") + "/" + route
        how = ""
    else:
        link = "http://127.0.0.1:5000/" + route
        how = (f' (start the UI first: <code>mlflow ui --backend-store-uri {esc(uri)}</code>)' if uri else "")
    return (f'<p>MLflow run <code>{esc(run_id)}</code> in <code>{esc(uri or "default store")}</code>: '
            f'<a href="{esc(link)}">open in the MLflow UI</a>{how}</p>')


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
    Returns ``[{"view", "azimuth", "path"}]``."""
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
                   scores: dict[str, float] | None) -> str:
    """The HTML of one object (its media written under ``out/media/<obj>``)."""
    obj_dir = run_dir / "objects" / obj
    media = out / "media" / obj
    parts = [f'<section class="object" id="obj-{esc(obj)}"><h2>{esc(obj)}</h2>']
    if scores:
        parts.append(table_html(list(scores), [list(scores.values())], "scores"))
    reading = ((read_json(obj_dir / "conditions" / "conditions.json") or {}).get("input_reading") or {})
    if reading.get("summary"):
        parts.append(f'<p class="muted">input read as: {esc(reading["summary"])}</p>')
    figs = []
    inp = obj_dir / "conditions" / "input.png"
    if inp.is_file():
        img = read_rgb8(inp)
        p = save_png(media / "input.png", upscale(img))
        figs.append(_figure(f'<img src="{esc(rel(p, out))}" class="px" alt="input">',
                            f"input as conditioned ({img.shape[1]}x{img.shape[0]} px, shown x"
                            f"{upscale(img).shape[0] // img.shape[0]})"))
    grid = matrix_grid(obj_dir / "sampling", media / "matrix.png")
    if grid is not None:
        figs.append(_figure(f'<img src="{esc(rel(grid, out))}" class="px" alt="matrix">',
                            "sampled matrix: rows = views (azimuth), columns = frames (time)"))
    tt = obj_dir / "fit" / "turntable.mp4"
    if tt.is_file():
        figs.append(_figure(_video(rel(tt, out), "turntable", MIN_PREVIEW),
                            "turntable rendered from the fitted 4D Gaussians (one orbit while time runs 0 \u2192 1)"))
    parts.append('<div class="row">' + "".join(figs) + "</div>")
    azimuths = list(((params.get("protocol") or {}).get("eval_azimuths_deg")) or [])
    memo = Path(params.get("run", {}).get("cache_dir", ".d2cache")) / ".media"  # the stage cache's folder
    vids = comparison_videos(obj_dir, ground_truth_dir(run_dir, manifest, obj), azimuths, media, memo)
    if vids:
        parts.append("<h3>Evaluation views: input | prediction | ground truth</h3><div class=\"row\">")
        for v in vids:
            az = f", azimuth {v['azimuth']:.0f}\u00b0" if v["azimuth"] is not None else ""
            gt = "" if v["has_gt"] else " (no ground truth)"
            parts.append(_figure(_video(rel(v["path"], out), f"view {v['view']}"), f"view {v['view']}{az}{gt}"))
        parts.append("</div>")
        parts.append(f'<p><a href="{esc(rel(media / "compare.mp4", out))}">compare.mp4</a> '
                     "(every evaluation view, input | prediction | ground truth)</p>")
    fit = read_json(obj_dir / "fit" / "fit.json")
    if isinstance(fit, dict):
        fit = {**fit, **{k: v for k, v in (fit.get("matrix_fit") or {}).items() if k.startswith("motion_")}}
        keys = [k for k in ("V", "F", "resolution", "iterations", "num_gaussians", "train_psnr", "matrix_psnr",
                            "motion_matrix", "motion_fit") if k in fit]
        parts.append("<h3>Fit</h3>" + table_html(keys, [[fit[k] for k in keys]], "fit"))
        if "motion_fit" in fit:
            parts.append('<p class="muted">matrix_psnr: the fitted Gaussians rendered at the matrix\'s own views and '
                         "times against the matrix. motion_*: mean absolute change between consecutive frames "
                         "(per view) of the matrix and of those renders; a fit that lost the motion has motion_fit "
                         "far below motion_matrix (the matrix's value also counts its frame-to-frame sampling "
                         "noise).</p>")
    viewer = viewer_html(obj_dir / "fit", media, out, obj)
    if viewer:
        parts.append(viewer)
    parts.append("</section>")
    return "".join(parts)


def _figure(inner: str, caption: str) -> str:
    return f"<figure>{inner}<figcaption>{esc(caption)}</figcaption></figure>"


def _video(src: str, label: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return (f'<video src="{esc(src)}" autoplay muted loop playsinline controls preload="auto"{w} '
            f'aria-label="{esc(label)}"></video>')


def viewer_html(fit_dir: Path, media: Path, out: Path, obj: str) -> str:
    """The WebGL viewer block of one object ('' when its Gaussians cannot be read)."""
    try:
        data = write_viewer_data(fit_dir, media / "splats.js", obj)
    except Exception as e:  # noqa: BLE001  (an unreadable file, whatever raised: said, not fatal)
        return f'<p class="muted">4D Gaussians: not shown ({esc(type(e).__name__)}: {esc(e)})</p>'
    if data is None:
        return ""
    return (f'<h3>4D Gaussians (WebGL)</h3><div class="viewer" data-object="{esc(obj)}">'
            f'<canvas width="384" height="384"></canvas><div>time <input type="range" min="0" '
            f'max="{data["times"] - 1}" value="0" step="1" class="time"> <span class="tlabel"></span> '
            '<label><input type="checkbox" class="play" checked> play</label></div>'
            '<p class="muted">Drag to orbit. Each Gaussian is drawn as one round Gaussian sprite (its centre, colour, '
            'opacity and largest axis at that time, out to 3 standard deviations; no anisotropy, no view-dependent colour, no depth-sorted '
            'blending): an approximation of the splat render.</p></div>'
            f'<script src="{esc(rel(media / "splats.js", out))}"></script>')


# ---------------------------------------------------------------------------------------
# Tables


def results_html(run_dir: Path) -> tuple[str, dict[str, dict[str, float]]]:
    """The benchmark's results table (objects and mean) and each object's scores."""
    res = read_json(run_dir / "results" / "results.json")
    if not isinstance(res, dict):
        return "", {}
    per_object: dict[str, dict[str, float]] = res.get("per_object") or {}
    metrics = [m for m in (res.get("metrics") or []) if any(m in v for v in per_object.values())
               or m in (res.get("mean") or {})]
    rows = [[o] + [per_object[o].get(m, float("nan")) for m in metrics] for o in sorted(per_object)]
    rows.append(["mean"] + [(res.get("mean") or {}).get(m, float("nan")) for m in metrics])
    note = ""
    if res.get("unavailable"):
        note = "<p class=\"muted\">unavailable: " + esc("; ".join(str(v) for v in res["unavailable"].values())) + "</p>"
    if any(v is None for r in rows for v in r):
        note += ("<p class=\"muted\">\u2021 not a finite number (null in results.json; results.md gives the "
                 "reason)</p>")
    gen = res.get("generation_time_s")
    gen_note = f"<p>generation time {gen:.1f} s per object</p>" if isinstance(gen, (int, float)) else ""
    return ("<h2>Results</h2>" + table_html(["object"] + metrics, rows, "results") + note + gen_note,
            {o: {m: per_object[o][m] for m in metrics if m in per_object[o]} for o in per_object})


def timing_html(manifest: dict[str, Any]) -> str:
    stages: dict[str, dict[str, float]] = {}
    for rec in manifest.get("stages", []):
        s = stages.setdefault(rec.get("stage", "?"), {"computed": 0, "cached": 0, "seconds": 0.0})
        s[rec.get("status", "computed")] = s.get(rec.get("status", "computed"), 0) + 1
        s["seconds"] += float(rec.get("compute_seconds") or 0.0)
    rows = [[k, int(v["computed"]), int(v["cached"]), round(v["seconds"], 2)] for k, v in stages.items()]
    return "<h3>Stages</h3>" + table_html(["stage", "computed", "cached", "compute s (sum)"], rows, "timing") if rows else ""


# ---------------------------------------------------------------------------------------
# Sweeps


def _as_number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def svg_plot(xs: list[Any], ys: list[float], xlabel: str, ylabel: str, w: int = 300, h: int = 200) -> str:
    """An inline SVG scatter of ``ys`` against ``xs`` (numbers, or categories in first-seen order)
    with the mean at each x joined by a line."""
    pts = [(x, y) for x, y in zip(xs, ys) if isinstance(y, (int, float)) and not math.isnan(y)]
    if not pts:
        return ""
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
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" class="plot" role="img" '
           f'aria-label="{esc(ylabel)} against {esc(xlabel)}">',
           f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="#444"/>',
           f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="#444"/>']
    ticks = sorted(set(xv))
    for t in ticks[:12]:
        label = f"{t:g}" if numeric else cats[int(t)]
        out.append(f'<text x="{sx(t):.1f}" y="{h - mb + 14}" font-size="10" text-anchor="middle">{esc(label)}</text>')
    for t in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text x="{ml - 4}" y="{sy(t) + 3:.1f}" font-size="10" text-anchor="end">{esc(f"{t:.4g}")}</text>')
    means = [(t, sum(y for x, y in zip(xv, yv) if x == t) / sum(1 for x in xv if x == t)) for t in ticks]
    if len(means) > 1:
        out.append('<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="'
                   + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in means) + '"/>')
    out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="#d73a49"><title>{esc(fmt(y))}</title></circle>'
            for x, y in zip(xv, yv)]
    out.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 6}" font-size="11" text-anchor="middle">{esc(xlabel)}</text>')
    out.append(f'<text x="12" y="{(mt + h - mb) / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {(mt + h - mb) / 2})">{esc(ylabel)}</text></svg>')
    return "".join(out)


def sweep_body(run_dir: Path, manifest: dict[str, Any], out: Path) -> str:
    """The sweep's ablation table, figure grid, metric-vs-knob plots and links to the points."""
    sweep = read_json(run_dir / "sweep.json") or {}
    grid: dict[str, list[Any]] = sweep.get("grid") or manifest.get("grid") or {}
    rows: list[dict[str, Any]] = sweep.get("rows") or []
    knobs = list(grid)
    metrics = [k for k in dict.fromkeys(k for r in rows for k in r)
               if k not in knobs and k != "point" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    parts = ["<h2>Ablation</h2>"]
    if rows:
        parts.append(table_html(["point"] + knobs + metrics,
                                [[r.get("point")] + [r.get(k) for k in knobs] + [r.get(m) for m in metrics]
                                 for r in rows], "ablation"))
    fig = run_dir / "results" / "figure.png"
    if fig.is_file():
        img = read_rgb8(fig)
        p = save_png(out / "media" / "figure.png", upscale(img, 2 * MIN_PREVIEW))
        parts.append(_figure(f'<img src="{esc(rel(p, out))}" class="px wide" alt="figure grid">',
                             "figure grid: one row per point (the first object's evaluation views at the middle frame)"))
    if rows and knobs and metrics:
        parts.append("<h2>Metrics against each knob</h2><div class=\"row\">")
        for m in metrics:
            for k in knobs:
                parts.append(_figure(svg_plot([r.get(k) for r in rows], [r.get(m) for r in rows], k, m),
                                     f"{m} vs {k}"))
        parts.append("</div>")
    links = []
    for pid in (manifest.get("points") or {}):
        idx = run_dir / "points" / pid / REPORT_DIR / "index.html"
        if idx.is_file():
            links.append(f'<li><a href="{esc(rel(idx, out))}">{esc(pid)}</a></li>')
    if links:
        parts.append("<h2>Points</h2><ul>" + "".join(links) + "</ul>")
    return "".join(parts)


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
    title = f"{kind}: {run_dir.name}"
    status = manifest.get("status", "?")
    body = [f"<h1>{esc(title)}</h1>",
            f'<p>status <b>{esc(status)}</b>; wall time {float(manifest.get("flow_wall_seconds") or 0.0):.1f} s</p>',
            mlflow_html(manifest)]
    if manifest.get("errors"):
        body.append("<h3>Errors</h3><ul>" + "".join(
            f"<li>{esc(e.get('object', ''))} {esc(e.get('stage', ''))}: {esc(e.get('error', ''))}</li>"
            for e in manifest["errors"]) + "</ul>")
    if kind == "sweep":
        for pid in (manifest.get("points") or {}):
            pdir = run_dir / "points" / pid
            if (pdir / "manifest.json").is_file():
                build_html_report(pdir)
        body.append(sweep_body(run_dir, manifest, out))
    else:
        table, scores = results_html(run_dir)
        body.append(table)
        objs = list_objects(run_dir)
        if objs:
            body.append("<nav>" + " \u00b7 ".join(f'<a href="{esc(anchor(o))}">{esc(o)}</a>' for o in objs) + "</nav>")
        for o in objs:
            body.append(object_section(run_dir, manifest, params, o, out, scores.get(o)))
    body.append(timing_html(manifest))
    page = PAGE.format(title=esc(title), css=CSS, body="\n".join(body), script=f"<script>{VIEWER_JS}</script>")
    index = out / "index.html"
    index.write_text(page)
    return index


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1500px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0}figcaption{font-size:.85em;color:#555;max-width:520px}
img.px{image-rendering:pixelated;max-width:100%}img.wide{max-width:100%}
video{background:#eee;max-width:100%}.muted{color:#777;font-size:.9em}
canvas{border:1px solid #ccc;background:#fff;cursor:grab}code{background:#f4f4f4;padding:0 .2em}
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" href="data:,">
<style>{css}</style></head>
<body>
{body}
{script}
</body></html>
"""


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
    """Give the run's MLflow run (a :class:`d2.tasks.tracking.Tracker`, or None) the report's
    path as tag ``d2.report`` and its previews as artifacts; a failure here is printed, never raised."""
    if tracker is None or not page:
        return
    try:
        tracker.client.set_tag(tracker.run_id, "d2.report", str(page))
        tracker.log_artifacts(tracker.run_id, report_artifacts(page))
    except Exception as e:  # noqa: BLE001  (the run and its report are complete without MLflow's copy)
        print(f"d2: the report could not be logged to MLflow: {type(e).__name__}: {e}", flush=True)
