"""Results tables: per-object CSV / Markdown / LaTeX with the protocol and metric definitions,
the paper's Table 2 with our measured row beside the published ones, ablation tables and a
Figure-5-style image grid.

Files written by :func:`write_results` into ``out_dir``:

* ``results.json``: the whole :class:`~d2.eval.results.Results` (per frame, per view, protocol);
* ``results.csv``: one row per object and a ``mean`` row; ``#`` comment lines first carry the
  protocol and the unavailable metrics (read with ``pandas.read_csv(..., comment="#")``);
* ``results.md`` / ``results.tex``: the same table with a footer (protocol, metric definitions,
  unavailable metrics and why, PSNR caps);
* ``table2.md`` / ``table2.tex``: the paper's Table 2 (CLIP similarity, generation time): the
  published rows, marked as published, beside our measured row only when the run used the
  ``consistent4d`` metric definitions at the script's 512 px (the published numbers come from
  Consistent4D's evaluation script); otherwise our row alone, with the reason.

Every table names the protocol (and its metric definitions) that made it. FVD is labelled
"FVD (pooled)": one number per benchmark, not Consistent4D's per-view FVD (see
``d2.eval.metrics.FVD_DEFINITION``).

A metric that could not be computed appears as ``unavailable``, never as a number.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from d2.eval.metrics import HIGHER_IS_BETTER
from d2.eval.results import frames_line
from d2.utils.io import image_grid, save_image, write_json, write_text

if TYPE_CHECKING:
    from d2.eval.results import Results

UNAVAILABLE = "unavailable"
NOT_APPLICABLE = "-"  # e.g. FVD per object (pooled over the benchmark only)
CAP_MARK = "†"  # marks PSNR cells that include capped (identical-image) values
NOT_FINITE_MARK = "‡"  # marks cells whose score is not a finite number (null in results.json)
METRIC_LABELS = {"clip": "CLIP", "lpips": "LPIPS", "psnr": "PSNR", "ssim": "SSIM", "fvd": "FVD (pooled)"}
DIGITS = {"clip": 4, "lpips": 4, "psnr": 2, "ssim": 4, "fvd": 1}


class PublishedRow(BaseModel):
    """A published figure for the Consistent4D video-to-4D benchmark (each paper's own protocol)."""

    method: str
    kind: str  # the paper's "Type" column
    clip: float | None = None  # CLIP similarity
    lpips: float | None = None
    fvd: float | None = None
    time: str | None = None  # generation time as published
    source: str  # where the figure was published


PUBLISHED_TABLE2: list[PublishedRow] = [
    PublishedRow(method="Consistent4D", kind="Optimization-based", clip=0.87, time="2 h", source="Diffusion² Table 2"),
    PublishedRow(method="4DGen", kind="Optimization-based", clip=0.89, time="2 h 10 min", source="Diffusion² Table 2"),
    PublishedRow(method="Efficient4D", kind="Photogrammetry-based", clip=0.92, time="14 min",
                 source="Diffusion² Table 2"),
    PublishedRow(method="Diffusion²", kind="Photogrammetry-based", clip=0.94, time="10 min",
                 source="Diffusion² Table 2"),
    PublishedRow(method="SV4D", kind="Feed-forward + optimization", clip=0.92, lpips=0.118, fvd=732.0,
                 source="SV4D paper"),
    PublishedRow(method="L4GM", kind="Feed-forward", clip=0.94, time="~3 s", source="L4GM paper"),
]


# --------------------------------------------------------------------------- formatting


def format_value(metric: str, value: float | None, unavailable: bool = False) -> str:
    """A cell: the number with the metric's digits, ``unavailable``, or ``-``."""
    if unavailable:
        return UNAVAILABLE
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_APPLICABLE
    return f"{value:.{DIGITS.get(metric, 4)}f}"


def format_time(seconds: float | None) -> str:
    """``3 s``, ``14 min``, ``2 h 10 min``."""
    if seconds is None:
        return NOT_APPLICABLE
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{minutes:.1f} min"
    h, m = divmod(round(minutes), 60)
    return f"{h} h {m} min" if m else f"{h} h"


def _header(results: "Results") -> list[str]:
    return [f"{METRIC_LABELS[m]} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in results.metrics]


def capped_objects(results: "Results") -> set[str]:
    """Objects with at least one image whose PSNR was capped."""
    return {s.object for s in results.per_frame if s.psnr_capped}


def results_rows(results: "Results", mark_capped: bool = False) -> list[list[str]]:
    """Formatted rows: one per object, then ``mean`` (FVD only in the mean row: it is pooled).

    ``mark_capped``: append ``†`` to PSNR cells that include capped (identical-image) values.
    """
    capped = capped_objects(results) if mark_capped else set()

    def cell(m: str, value: float | None, star: bool, pooled: bool = False) -> str:
        text = format_value(m, value, m in results.unavailable)
        if text == NOT_APPLICABLE and not pooled and m in results.metrics:  # a score that is no number
            return text + NOT_FINITE_MARK
        return text + CAP_MARK if (m == "psnr" and star and text not in (UNAVAILABLE, NOT_APPLICABLE)) else text

    rows = []
    for obj, vals in results.per_object.items():
        rows.append([obj] + [cell(m, None if m == "fvd" else vals.get(m), obj in capped, m == "fvd")
                             for m in results.metrics])
    rows.append(["mean"] + [cell(m, results.mean.get(m), bool(capped)) for m in results.metrics])
    return rows


def footer_lines(results: "Results") -> list[str]:
    """Protocol, metric definitions, unavailable metrics and PSNR caps, one item per line."""
    lines = [results.protocol.describe()]
    lines.append(f"Method: {results.method}; ground truth: {results.dataset or results.gt_dir}; "
                 f"{results.num_scored_frames} (object, view, frame) images scored.")
    if results.frames:
        lines.append(frames_line(results.frames))
    for m in results.metrics:
        lines.append(f"{METRIC_LABELS[m]}: {results.definitions.get(m, '')}")
    for m, why in results.unavailable.items():
        lines.append(f"{METRIC_LABELS.get(m, m)} unavailable: {_reason(m, why)}")
    lines += not_finite_lines(results)
    if "psnr" in results.metrics and "psnr" not in results.unavailable:
        if results.protocol.metric_definitions == "consistent4d":
            if any(line.startswith("PSNR not a finite number") for line in lines):
                return lines  # said above, cells marked NOT_FINITE_MARK
            lines.append(f"PSNR not finite (identical images: +inf; constant ground truth: -inf or NaN; kept as the "
                         f"script computes it) in {results.psnr_capped_frames} of {results.num_scored_frames} images "
                         f"(cells marked {CAP_MARK}).")
        else:
            lines.append(f"PSNR capped (identical images) in {results.psnr_capped_frames} of "
                         f"{results.num_scored_frames} images (cells marked {CAP_MARK}).")
    return lines


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def not_finite_lines(results: "Results") -> list[str]:
    """Why cells are marked ``‡``: a metric whose score is not a finite number (null in
    ``results.json``) in some images, e.g. a constant (all black) ground truth, whose data range
    is 0, or identical images under the script's PSNR (+inf)."""
    lines = []
    for m in results.metrics:
        if m in results.unavailable or not results.per_object:
            continue
        if m == "fvd":  # pooled: the mean row only
            cells, where, why = [results.mean.get(m)], "", "the pooled Frechet distance is undefined for these videos"
        else:
            cells = [v.get(m) for v in results.per_object.values()] + [results.mean.get(m)]
            images = sum(1 for s in results.per_frame if m in s.values and not _finite(s.values[m]))
            where = f" in {images} of {results.num_scored_frames} images"
            why = ("identical images give +inf; a constant, e.g. all black, ground truth has data range 0: -inf or "
                   "NaN" if m == "psnr" else "constant, e.g. all black, images have data range 0")
        if all(_finite(v) for v in cells):
            continue
        lines.append(f"{METRIC_LABELS.get(m, m)} not a finite number{where} (cells marked {NOT_FINITE_MARK}, "
                     f"null in results.json): undefined ({why}); a mean over them is none either.")
    return lines


def protocol_line(results: "Results", subject: str | None = None) -> str:
    """The protocol that made a table, in one line (its first line in Markdown): what was scored
    (``subject``, default the results' method) on which data."""
    p = results.protocol
    return (f"Protocol '{p.name}', metric definitions '{p.metric_definitions}'"
            + (" (Consistent4D's evaluation script)" if p.metric_definitions == "consistent4d" else " (ours)")
            + f": {results.method if subject is None else subject} on "
            + f"{results.dataset or results.gt_dir or 'the benchmark'}")


def results_markdown(results: "Results") -> str:
    """The per-object table in Markdown, with its footer."""
    head = ["object"] + _header(results)
    out = [f"**{protocol_line(results)}**", "", "| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * len(results.metrics)) + "|"]
    rows = results_rows(results, mark_capped=True)
    for i, r in enumerate(rows):
        cells = [f"**{c}**" if i == len(rows) - 1 else c for c in r]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out += [f"- {line}" for line in footer_lines(results)]
    return "\n".join(out) + "\n"


def _tex_escape(s: str) -> str:
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "↑": r"$\uparrow$",
           "↓": r"$\downarrow$", "²": r"$^2$", "†": r"$^\dagger$", "‡": r"$^\ddagger$",
           "<": r"\textless{}", ">": r"\textgreater{}"}
    return "".join(rep.get(c, c) for c in s)


def _tex_table(head: list[str], rows: list[list[str]], caption: str, notes: list[str], mean_last: bool) -> str:
    cols = "l" + "r" * (len(head) - 1)
    out = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
           " & ".join(_tex_escape(h) for h in head) + r" \\", r"\midrule"]
    for i, r in enumerate(rows):
        if mean_last and i == len(rows) - 1:
            out.append(r"\midrule")
        out.append(" & ".join(_tex_escape(c) for c in r) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex_escape(caption)}}}"]
    if notes:
        out.append(r"\par\footnotesize")
        out += [_tex_escape(n) + r"\par" for n in notes]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def results_latex(results: "Results") -> str:
    """The per-object table as a LaTeX ``table`` (booktabs) with the footer as notes."""
    return _tex_table(["object"] + _header(results), results_rows(results, mark_capped=True),
                      protocol_line(results), footer_lines(results), True)


def results_csv(results: "Results") -> str:
    """CSV text: ``#`` comment lines (protocol, unavailable metrics), then object rows and ``mean``."""
    buf = io.StringIO()
    buf.write(f"# protocol: {results.protocol.model_dump_json()}\n")
    buf.write(f"# method: {results.method}; dataset: {results.dataset}\n")
    for m, why in results.unavailable.items():
        buf.write(f"# {m} unavailable: {why.replace(chr(10), ' ')}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["object"] + results.metrics)
    for r in results_rows(results):
        w.writerow(r)
    return buf.getvalue()


def _reason(metric: str, why: str) -> str:
    prefix = f"{metric}: "
    return why[len(prefix):] if why.startswith(prefix) else why


# --------------------------------------------------------------------------- Table 2


def table2_rows(results: "Results") -> list[list[str]]:
    """Method, type, CLIP, time, source rows: the published ones (only when the protocol computes the
    script's metrics, :meth:`~d2.eval.protocol.Protocol.compares_with_published`), then ours (measured)."""
    rows = []
    if results.protocol.compares_with_published():
        rows = [[f"{p.method} (published)", p.kind, f"{p.clip:.2f}" if p.clip is not None else NOT_APPLICABLE,
                 p.time or NOT_APPLICABLE, p.source] for p in PUBLISHED_TABLE2]
    clip = format_value("clip", results.mean.get("clip"), "clip" in results.unavailable or "clip" not in results.metrics)
    rows.append([f"{results.method} (measured)", "Photogrammetry-based", clip, format_time(results.generation_time_s),
                 f"this run: {results.dataset or results.gt_dir}, protocol '{results.protocol.name}'"])
    return rows


TABLE2_NOTE = ("Published rows are the figures as printed in each paper on the Consistent4D test set; the papers do "
               "not all say which script, frames or views they scored, and published numbers for the "
               "same method disagree across papers, so only re-scored numbers compare. SV4D also reports LPIPS "
               "0.118 and FVD 732 on the same set. The measured row is this run, under the protocol below.")


def table2_notes(results: "Results") -> list[str]:
    """The notes under Table 2: why published rows are (or are not) shown, and the protocol."""
    p = results.protocol
    if p.compares_with_published():
        first = TABLE2_NOTE
    else:
        why = (f"metric definitions '{p.metric_definitions}' are ours" if p.metric_definitions != "consistent4d"
               else f"images were resized to {p.resolution}x{p.resolution}, not the script's 512x512")
        first = (f"Published rows omitted: they were scored with Consistent4D's evaluation script; this run's "
                 f"{why}, so its numbers do not compare with them (protocol 'consistent4d' does).")
    return [first, p.describe()] + ([frames_line(results.frames)] if results.frames else [])


def table2_markdown(results: "Results") -> str:
    """Table 2 of the paper (video-to-4D: CLIP similarity, generation time) with our measured row."""
    out = [f"**{protocol_line(results)}**", "", "| method | type | CLIP ↑ | time ↓ | source |",
           "|---|---|---:|---:|---|"]
    for r in table2_rows(results):
        out.append("| " + " | ".join(r) + " |")
    out += [""] + [f"- {n}" for n in table2_notes(results)]
    if "clip" in results.unavailable:
        out.append(f"- CLIP unavailable: {_reason('clip', results.unavailable['clip'])}")
    return "\n".join(out) + "\n"


def table2_latex(results: "Results") -> str:
    """Table 2 as LaTeX."""
    return _tex_table(["method", "type", "CLIP ↑", "time ↓", "source"], table2_rows(results),
                      f"Video-to-4D on Consistent4D-style data. {protocol_line(results)}", table2_notes(results), False)


def write_results(results: "Results", out_dir: str | Path) -> dict[str, Path]:
    """Write results.{json,csv,md,tex} and table2.{md,tex} into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every table from what results.json holds (non-finite scores are null there), so a table
    # rebuilt from results.json (``d2 report``) is the table written now
    results = type(results).model_validate_json(results.model_dump_json())
    files = {
        "json": out / "results.json", "csv": out / "results.csv", "md": out / "results.md",
        "tex": out / "results.tex", "table2_md": out / "table2.md", "table2_tex": out / "table2.tex",
    }
    write_json(files["json"], json.loads(results.model_dump_json()))
    write_text(files["csv"], results_csv(results))
    write_text(files["md"], results_markdown(results))
    write_text(files["tex"], results_latex(results))
    write_text(files["table2_md"], table2_markdown(results))
    write_text(files["table2_tex"], table2_latex(results))
    return files


def load_results(path: str | Path) -> "Results":
    """Read ``results.json`` (or the folder holding it) back into :class:`Results`."""
    from d2.eval.results import Results

    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    return Results.model_validate_json(p.read_text())


# --------------------------------------------------------------------------- sweeps


class AblationPoint(BaseModel):
    """One point of a sweep: its label, the parameters that vary, its mean metrics and its cost."""

    label: str  # row label, e.g. "s0=0.5, k=10"
    params: dict[str, Any] = Field(default_factory=dict)  # varied parameters -> value
    metrics: dict[str, float | None] = Field(default_factory=dict)  # metric -> mean over the benchmark (None: none)
    unavailable: dict[str, str] = Field(default_factory=dict)  # metric -> reason
    time_s: float | None = None  # generation time per asset: conditions + sampling + fit seconds, mean per object
    peak_gpu_memory: int | str | None = None  # peak GPU bytes of its generation; "cpu": not on a GPU; None: unrecorded
    protocol: str = ""  # the protocol that scored it (protocol_line); a column only when the points' differ
    ignored: list[str] = Field(default_factory=list)  # its varied knobs its sampling method does not read


def format_memory(value: int | str | None) -> str:
    """``2.31 GiB`` / ``512 MiB``, ``cpu`` (computed on the CPU: nothing measured) or ``-`` (not recorded)."""
    if isinstance(value, bool) or value is None:
        return NOT_APPLICABLE
    if isinstance(value, str):
        return value
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


COST_NOTES = [
    "time per asset: the conditions + sampling + fit compute seconds, mean over the objects (a stage served "
    "from the cache counts the seconds it took when it was computed, so points that share a stage share its cost).",
    "peak GPU memory: the most memory torch held allocated on the GPU during the point's conditions, sampling and "
    "fit stages (torch.cuda.max_memory_allocated; the models included; the largest over the objects; one count "
    "per device and process, so stages run at once on one device disturb each other's: compare runs made with "
    "run.max_parallel=1); cpu: the stages ran on the CPU and nothing was measured; -: not recorded.",
    "Published figures are not rows of this table: each point's own table2.md lists them apart, marked "
    "published, under the protocol that allows the comparison.",
]


def ablation_rows(points: list[AblationPoint], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of an ablation table (params columns, the protocol when the points'
    differ, metric columns, time per asset, peak GPU memory)."""
    if not points:
        raise ValueError("ablation table needs at least one point")
    params = list(dict.fromkeys(k for p in points for k in p.params))
    mixed = len({p.protocol for p in points}) > 1
    head = (["point"] + params + (["protocol"] if mixed else [])
            + [f"{METRIC_LABELS.get(m, m)} {'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}" for m in metrics]
            + ["time per asset ↓", "peak GPU memory ↓"])
    rows = []
    for p in points:
        rows.append([p.label] + [str(p.params.get(k, NOT_APPLICABLE)) for k in params] + ([p.protocol] if mixed else [])
                    + [format_value(m, p.metrics.get(m), m in p.unavailable) for m in metrics]
                    + [format_time(p.time_s), format_memory(p.peak_gpu_memory)])
    return head, rows


def ablation_caption(points: list[AblationPoint]) -> str:
    """The table's caption: the one protocol every point was scored under, or a warning that they differ."""
    protocols = list(dict.fromkeys(p.protocol for p in points))
    if len(protocols) > 1:
        return "One row per sweep point; the points were scored under different protocols (column protocol): " \
               "rows under different protocols do not compare"
    return f"One row per sweep point. {protocols[0]}" if protocols[0] else "One row per sweep point"


def write_ablation_table(points: list[AblationPoint], out_dir: str | Path, metrics: list[str],
                         protocol_text: str = "") -> dict[str, Path]:
    """ablation.csv / ablation.md / ablation.tex: one row per sweep point, captioned with the
    protocol (:func:`ablation_caption`); ``protocol_text`` (its description) leads the notes."""
    head, rows = ablation_rows(points, metrics)
    caption = ablation_caption(points)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unavailable: dict[tuple[str, str], list[str]] = {}  # (metric, reason) -> the points it holds for
    for p in points:
        for m, why in p.unavailable.items():
            unavailable.setdefault((m, why), []).append(p.label)
    notes = ([protocol_text] if protocol_text else []) + COST_NOTES + [
        f"{p.label}: its sampling method does not read {', '.join(p.ignored)} (the same matrix whatever the value; "
        "the value still enters the cache key)" for p in points if p.ignored] + [
        f"{METRIC_LABELS.get(m, m)} unavailable at "
        f"{'every point' if len(labels) == len(points) > 1 else ', '.join(labels)}: {why}"
        for (m, why), labels in unavailable.items()]
    buf = io.StringIO()
    buf.write(f"# {caption}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    w.writerows(rows)
    md = [f"**{caption}**", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += [""] + [f"- {n}" for n in notes]
    files = {"csv": out / "ablation.csv", "md": out / "ablation.md", "tex": out / "ablation.tex"}
    write_text(files["csv"], buf.getvalue())
    write_text(files["md"], "\n".join(md) + "\n")
    write_text(files["tex"], _tex_table(head, rows, caption, notes, False))
    return files


def write_figure_grid(images: torch.Tensor, path: str | Path, row_labels: list[str] | None = None,
                      col_labels: list[str] | None = None, pad: int = 2, label_px: int = 12) -> Path:
    """A Figure-5-style grid: ``images`` [R, C, 3, H, W] in [0, 1] (rows: sweep points, columns:
    views or frames), with row labels on the left and column labels on top; saved as PNG."""
    from PIL import Image, ImageDraw

    if images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"expected images [R, C, 3, H, W], got {tuple(images.shape)}")
    r, c = images.shape[:2]
    if row_labels is not None and len(row_labels) != r:
        raise ValueError(f"{len(row_labels)} row labels for {r} rows")
    if col_labels is not None and len(col_labels) != c:
        raise ValueError(f"{len(col_labels)} column labels for {c} columns")
    grid = image_grid(images.detach().float().cpu().clamp(0, 1), pad=pad)  # [3, GH, GW]
    left = (max((len(s) for s in row_labels), default=0) * 6 + 6) if row_labels else 0
    top = label_px + 4 if col_labels else 0
    canvas = torch.ones(3, grid.shape[1] + top, grid.shape[2] + left)
    canvas[:, top:, left:] = grid
    img = Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8"))
    draw = ImageDraw.Draw(img)
    h, w = images.shape[-2:]
    for i, s in enumerate(row_labels or []):
        draw.text((2, top + i * (h + pad) + h // 2 - 5), s, fill=(0, 0, 0))
    for j, s in enumerate(col_labels or []):
        draw.text((left + j * (w + pad) + 2, 2), s, fill=(0, 0, 0))
    arr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    save_image(path, arr)
    return Path(path)
