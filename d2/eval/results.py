"""What an evaluation computed: per-frame scores, their means (frames -> views -> objects), the
protocol and the metric definitions; and the merge of several objects' results into one table.

:mod:`d2.eval.scoring` scores renders into these; :mod:`d2.eval.tables` writes them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from d2.eval.metrics import ALL_METRICS, metric_definitions
from d2.eval.protocol import Protocol


class FrameScore(BaseModel):
    """Metric values of one (object, view, frame)."""

    # the script's PSNR may be +-inf / NaN, SSIM of constant images NaN: JSON has no such number,
    # they are written as null (read back as None: no finite score)
    model_config = ConfigDict(ser_json_inf_nan="null")

    object: str
    view: str
    frame: int
    values: dict[str, float | None]  # metric -> value (None: not a finite number)
    psnr_capped: bool = False  # d2: PSNR hit the cap (images identical up to ~1e-5 RMS); consistent4d: PSNR not finite


class Results(BaseModel):
    """Everything an evaluation computed, with its protocol (non-finite scores written as null)."""

    model_config = ConfigDict(ser_json_inf_nan="null")

    method: str = "ours"  # label of the scored method
    dataset: str = ""  # label of the ground-truth set
    pred_dir: str = ""
    gt_dir: str = ""
    protocol: Protocol = Field(default_factory=Protocol)
    metrics: list[str] = Field(default_factory=list)  # requested metrics, in table order
    unavailable: dict[str, str] = Field(default_factory=dict)  # metric -> reason it was not computed
    definitions: dict[str, str] = Field(default_factory=dict)  # metric -> definition (default: the protocol's set)
    per_frame: list[FrameScore] = Field(default_factory=list)
    # (None in these: not a finite number)
    per_view: dict[str, dict[str, dict[str, float | None]]] = Field(default_factory=dict)  # object -> view -> metric
    per_object: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # object -> metric
    mean: dict[str, float | None] = Field(default_factory=dict)  # metric -> mean over objects (fvd: pooled)
    psnr_capped_frames: int = 0  # frames whose PSNR was capped
    num_scored_frames: int = 0  # (object, view, frame) triples scored
    frames: dict[str, Any] = Field(default_factory=dict)  # which frames were scored (:func:`frames_record`)
    generation_time_s: float | None = None  # mean generation time per object, when the caller knows it
    seconds: float = 0.0  # time the evaluation took
    created_utc: str = ""

    @model_validator(mode="after")
    def _protocol_definitions(self) -> "Results":
        if not self.definitions:
            self.definitions = metric_definitions(self.protocol.metric_definitions)
        return self

    @property
    def objects(self) -> list[str]:
        """Objects in result order."""
        return list(self.per_object)

def frames_record(scored: dict[tuple[str, str], list[int]], gt_counts: dict[tuple[str, str], int]) -> dict[str, Any]:
    """Which frames were scored, for tables and ``metrics.json``: ``{"scored": "0-24", "per_view": 25,
    "ground_truth": 32}`` (frame indices, frames scored per view, ground-truth frames per view);
    where views differ, each field lists the distinct values."""
    from d2.eval.protocol import span_label

    spans = sorted({span_label(f) for f in scored.values()})
    counts = sorted({len(f) for f in scored.values()})
    gts = sorted(set(gt_counts.values()))
    one = lambda xs: xs[0] if len(xs) == 1 else xs  # noqa: E731
    return {"scored": "; ".join(spans), "per_view": one(counts), "ground_truth": one(gts)}


def merge_frames(records: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`frames_record` of several evaluations as one."""
    records = [r for r in records if r]
    if not records or all(r == records[0] for r in records):
        return records[0] if records else {}
    flat = lambda key: sorted({x for r in records for x in (r[key] if isinstance(r[key], list) else [r[key]])})  # noqa: E731
    spans = sorted({s for r in records for s in r["scored"].split("; ")})
    counts, gts = flat("per_view"), flat("ground_truth")
    return {"scored": "; ".join(spans), "per_view": counts[0] if len(counts) == 1 else counts,
            "ground_truth": gts[0] if len(gts) == 1 else gts}


def frames_line(frames: dict[str, Any]) -> str:
    """The frames sentence of a table footer."""
    if not frames:
        return ""
    per, gt = frames["per_view"], frames["ground_truth"]
    return (f"Frames scored: {frames['scored']} ({per} per view, of {gt} ground-truth frames per view), "
            f"each render drawn at the time of the ground-truth frame it is scored against.")


def aggregate(per_frame: list[FrameScore], metrics: list[str]) -> tuple[
        dict[str, dict[str, dict[str, float]]], dict[str, dict[str, float]], dict[str, float]]:
    """Mean over frames, then views, then objects.

    Returns:
        per_view[object][view][metric], per_object[object][metric], mean[metric]; objects
        and views in first-seen order. A metric missing from a frame is skipped there.
    """
    sums: dict[str, dict[str, dict[str, list[float]]]] = {}
    for s in per_frame:
        view = sums.setdefault(s.object, {}).setdefault(s.view, {})
        for m in metrics:
            if m in s.values:  # None (read back from JSON): not a finite number, NaN in the means
                view.setdefault(m, []).append(float("nan") if s.values[m] is None else float(s.values[m]))

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    per_view = {o: {v: {m: mean(x) for m, x in ms.items()} for v, ms in vs.items()} for o, vs in sums.items()}
    per_object: dict[str, dict[str, float]] = {}
    for o, vs in per_view.items():
        per_object[o] = {}
        for m in metrics:
            vals = [vm[m] for vm in vs.values() if m in vm]
            if vals:
                per_object[o][m] = mean(vals)
    overall = {}
    for m in metrics:
        vals = [om[m] for om in per_object.values() if m in om]
        if vals:
            overall[m] = mean(vals)
    return per_view, per_object, overall


def merge_results(parts: dict[str, Results], protocol: Protocol, requested: list[str], method: str = "diffusion2",
                  dataset: str = "", fvd: float | None = None, unavailable: dict[str, str] | None = None,
                  generation_time_s: float | None = None) -> Results:
    """Several objects' :class:`Results` (object name -> its results, scored under the name it had
    then) as one benchmark: per-frame scores renamed, frames -> views -> objects means, the pooled
    ``fvd`` when given, and the mean generation time per object."""
    per_frame: list[FrameScore] = []
    missing: dict[str, str] = {}
    for obj, r in parts.items():
        per_frame += [s.model_copy(update={"object": obj}) for s in r.per_frame]
        missing.update(r.unavailable)
    missing.update(unavailable or {})
    frames = merge_frames([r.frames for r in parts.values()])
    per_view, per_object, mean = aggregate(per_frame, [m for m in requested if m != "fvd"])
    if fvd is not None:
        mean["fvd"] = fvd
        missing.pop("fvd", None)
    metrics = [m for m in ALL_METRICS if m in requested]
    return Results(method=method, dataset=dataset, protocol=protocol, metrics=metrics, unavailable=missing,
                   per_frame=per_frame, per_view=per_view, per_object=per_object, mean=mean,
                   psnr_capped_frames=sum(s.psnr_capped for s in per_frame), num_scored_frames=len(per_frame),
                   frames=frames, generation_time_s=generation_time_s)
