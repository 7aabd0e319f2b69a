"""Benchmark data in the Consistent4D layout, and scoring of any method's renders.

Ground truth (the Consistent4D test set, or the generated mini-benchmark of
:mod:`d2.world.benchmark`)::

    <root>/input/<object>/<i>.png            the input video (azimuth 0)
    <root>/gt/<object>/eval_{k}/<i>.png      ground truth at the protocol's azimuths
    <root>/meta.json                          optional (written by the generator)

Frames are the images named ``<i>.png|jpg|jpeg`` (:func:`d2.stages.conditions.list_frames`).
``gt_dir`` may be ``<root>`` or ``<root>/gt``. Predictions of any method are laid out like
the ground truth: ``<pred>/<object>/eval_{k}/<i>.png`` (and ``<pred>/<object>/front/<i>.png``
when the protocol includes the front view, scored against the input frames).

The official Consistent4D test set loads as distributed: ground truth as RGBA PNGs (put on
white before scoring: under the ``consistent4d`` metric definitions as the script's README
requires, :func:`d2.eval.consistent4d.on_white`; under ``d2`` alpha-composited on the
protocol's background), input videos as folders of ``<i>.png``.

:func:`evaluate` scores them per frame, then averages frames -> views -> objects
(:func:`aggregate`); FVD is pooled over all (object, view) videos. Everything that was
computed, and the protocol, go into :class:`Results`; :mod:`d2.eval.tables` writes them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor
from tqdm import tqdm

from d2.eval.metrics import (ALL_METRICS, MetricsConfig, MetricSuite, build_metric_suite, fvd_pooled,
                             parse_metric_list)
from d2.eval.protocol import FRONT_VIEW, Protocol, span_label
from d2.eval.results import FrameScore, Results, aggregate, frames_record  # noqa: F401  (part of this module's API)
from d2.stages.conditions import list_frames
from d2.utils.io import load_image

FVD_SIZE = 224  # frames kept for FVD are stored at this size


class BenchmarkError(ValueError):
    """The data on disk does not match the layout or the protocol (the message says what is missing)."""


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class BenchmarkData:
    """A ground-truth set in the Consistent4D layout (see the module docstring)."""

    root: Path  # folder holding gt/ (and input/, meta.json)
    gt_root: Path  # <root>/gt
    input_root: Path  # <root>/input (may be missing: no front view, no input frames)
    objects: list[str]
    meta: dict | None
    gt_dirs: dict[str, Path] | None = None  # object -> its ground-truth folder, where not <gt_root>/<object>
    input_dirs: dict[str, Path] | None = None  # object -> its input frames, where not <input_root>/<object>

    @classmethod
    def of_object(cls, name: str, gt_dir: Path, input_dir: Path | None = None) -> "BenchmarkData":
        """One object's ground truth (``gt_dir/eval_k/<i>.png``, and its input frames) wherever it lies."""
        gt_dir = Path(gt_dir)
        inputs = {name: Path(input_dir)} if input_dir is not None else {}
        return cls(root=gt_dir.parent, gt_root=gt_dir.parent, input_root=gt_dir.parent / ".no-input",
                   objects=[name], meta=None, gt_dirs={name: gt_dir}, input_dirs=inputs)

    def gt_dir(self, obj: str) -> Path:
        """The ground-truth folder of ``obj``."""
        return (self.gt_dirs or {}).get(obj, self.gt_root / obj)

    def input_dir(self, obj: str) -> Path:
        """The input frames of ``obj``."""
        return (self.input_dirs or {}).get(obj, self.input_root / obj)

    def views(self, obj: str) -> list[str]:
        """The ``eval_k`` folders present for ``obj``, in k order."""
        d = self.gt_dir(obj)
        names = [p.name for p in d.iterdir() if p.is_dir() and re.fullmatch(r"eval_\d+", p.name)]
        return sorted(names, key=lambda n: int(n.split("_")[1]))

    def frame_paths(self, obj: str, view: str) -> dict[int, Path]:
        """Frame index -> ground-truth file of ``view`` (``eval_k``, or ``front`` = the input frames)."""
        if view == FRONT_VIEW:
            return list_frames(self.input_dir(obj))
        return list_frames(self.gt_dir(obj) / view)

    def input_paths(self, obj: str) -> dict[int, Path]:
        """Frame index -> input video frame of ``obj``."""
        return list_frames(self.input_dir(obj))

    def load_input(self, obj: str, size: int | None = None, background: float = 1.0) -> Tensor:
        """The input video: [F, 3, H, W] in [0, 1]."""
        return torch.stack([load_image(p, size, background) for p in self.input_paths(obj).values()])

    def load_view(self, obj: str, view: str, frames: Iterable[int] | None = None, size: int | None = None,
                  background: float = 1.0) -> Tensor:
        """Ground-truth frames of one view: [F, 3, H, W] in [0, 1]."""
        paths = self.frame_paths(obj, view)
        idx = list(paths) if frames is None else list(frames)
        missing = [i for i in idx if i not in paths]
        if missing:
            raise BenchmarkError(f"{obj}/{view}: missing frame(s) {missing[:5]}")
        return torch.stack([load_image(paths[i], size, background) for i in idx])


def load_benchmark(gt_dir: str | Path) -> BenchmarkData:
    """Open a ground-truth set; ``gt_dir`` is the root (with ``gt/``) or the ``gt`` folder itself."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise BenchmarkError(f"ground-truth folder {gt_dir} does not exist")
    if (gt_dir / "gt").is_dir():
        root, gt_root = gt_dir, gt_dir / "gt"
    else:
        root, gt_root = gt_dir.parent, gt_dir
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    found = sorted(p.name for p in gt_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if meta and meta.get("objects"):
        objects = list(meta["objects"])
        missing = [o for o in objects if o not in found]
        if missing:
            raise BenchmarkError(f"{gt_root}: objects listed in meta.json are missing: {missing}")
    else:
        objects = found
    if not objects:
        raise BenchmarkError(f"{gt_root} holds no object folders (<object>/eval_k/<i>.png)")
    return BenchmarkData(root=root, gt_root=gt_root, input_root=root / "input", objects=objects, meta=meta)


# --------------------------------------------------------------------------- evaluation


def _check_prediction(pred_dirs: dict[str, Path], data: BenchmarkData, objects: list[str], views: list[str],
                      frames_of: dict[tuple[str, str], list[int]]) -> dict[tuple[str, str], dict[int, Path]]:
    problems: list[str] = []
    out: dict[tuple[str, str], dict[int, Path]] = {}
    for o in objects:
        for v in views:
            folder = pred_dirs[o] / v
            if not folder.is_dir():
                problems.append(f"missing folder {folder}")
                continue
            have = list_frames(folder)
            missing = [f for f in frames_of[(o, v)] if f not in have]
            if missing:
                problems.append(f"{folder}: missing frame(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            out[(o, v)] = have
    if problems:
        raise BenchmarkError("prediction does not match the ground truth:\n  " + "\n  ".join(problems[:20]))
    return out


def evaluate(
    pred_dir: str | Path,
    gt_dir: str | Path,
    protocol: Protocol | None = None,
    metrics_cfg: MetricsConfig | None = None,
    require_metrics: Iterable[str] | str = (),
    objects: list[str] | None = None,
    method: str = "ours",
    out_dir: str | Path | None = None,
    suite: MetricSuite | None = None,
    generation_time_s: float | None = None,
    progress: bool = True,
) -> Results:
    """Score a method's renders against the ground truth under ``protocol``.

    Args:
        pred_dir: ``<object>/eval_{k}/<i>.png`` (+ ``front/``) of the scored method.
        gt_dir: the ground-truth set (root or its ``gt`` folder).
        protocol: views, frames, resolution, background (default: Consistent4D's).
        metrics_cfg: which metrics and their weights (default: all, searched in the caches).
        require_metrics: metrics that must be available (else :class:`MetricUnavailable`,
            raised before any scoring).
        objects: subset of objects (default: every object of the ground truth).
        out_dir: when given, the results files are written there (:func:`d2.eval.tables.write_results`).
        suite: ready metric networks (tests inject tiny random ones); overrides ``metrics_cfg``'s weights.
            Its ``definitions`` must be the protocol's ``metric_definitions`` (else ``ValueError``
            before any scoring).
        generation_time_s: mean generation time per object, reported in the Table-2 view.

    Returns:
        :class:`Results` with per-frame scores and the frames -> views -> objects means. Under the
        ``consistent4d`` definitions the image files are scored as Consistent4D's script scores
        them (:mod:`d2.eval.consistent4d`); under ``d2`` they are loaded in [0, 1] at the
        protocol's resolution.
    """
    pred_dir, data = Path(pred_dir), load_benchmark(gt_dir)
    if not pred_dir.is_dir():
        raise BenchmarkError(f"prediction folder {pred_dir} does not exist")
    objs = objects or data.objects
    unknown = [o for o in objs if o not in data.objects]
    if unknown:
        raise BenchmarkError(f"objects not in the ground truth: {unknown}; known: {data.objects}")
    if (protocol or Protocol()).include_front_view and not data.input_root.is_dir():
        raise BenchmarkError(f"protocol includes the front view but {data.input_root} does not exist")
    results = evaluate_dirs({o: pred_dir / o for o in objs}, data, protocol, metrics_cfg, require_metrics, method,
                            suite, generation_time_s, progress)
    results.pred_dir, results.gt_dir = str(pred_dir), str(gt_dir)
    if out_dir is not None:
        from d2.eval.tables import write_results

        write_results(results, out_dir)
    return results


def score_object(pred_dir: str | Path, gt_dir: str | Path, protocol: Protocol, metrics_cfg: MetricsConfig,
                 suite: MetricSuite | None = None, input_dir: str | Path | None = None,
                 name: str = "object") -> Results:
    """Score one object's renders (``pred_dir/eval_k/<i>.png``, ``front/``) against its ground truth
    (``gt_dir/eval_k/<i>.png``; the front view against ``input_dir``): per-frame scores and their
    frames -> views means, FVD left to :func:`pooled_fvd` over the whole benchmark."""
    data = BenchmarkData.of_object(name, Path(gt_dir), None if input_dir is None else Path(input_dir))
    cfg = metrics_cfg.model_copy(update={"metrics": [m for m in metrics_cfg.metrics if m != "fvd"]})
    return evaluate_dirs({name: Path(pred_dir)}, data, protocol, cfg, suite=suite, progress=False)


def pooled_fvd(pred_dirs: dict[str, Path], gt_dirs: dict[str, Path], protocol: Protocol, suite: MetricSuite
               ) -> tuple[float | None, str | None]:
    """FVD pooled over every (object, view) video of a benchmark: ``(value, None)`` or ``(None, reason)``."""
    data = BenchmarkData(root=Path("."), gt_root=Path("."), input_root=Path(".no-input"), objects=list(pred_dirs),
                         meta=None, gt_dirs={o: Path(p) for o, p in gt_dirs.items()})
    r = evaluate_dirs({o: Path(p) for o, p in pred_dirs.items()}, data, protocol.model_copy(
        update={"include_front_view": False}), suite=suite, progress=False)
    if "fvd" in r.mean:
        return r.mean["fvd"], None
    return None, r.unavailable.get("fvd", "fvd: not computed")


def evaluate_dirs(pred_dirs: dict[str, Path], data: BenchmarkData, protocol: Protocol | None = None,
                  metrics_cfg: MetricsConfig | None = None, require_metrics: Iterable[str] | str = (),
                  method: str = "ours", suite: MetricSuite | None = None, generation_time_s: float | None = None,
                  progress: bool = True) -> Results:
    """:func:`evaluate` on ``pred_dirs`` (object -> its renders folder) against ``data``."""
    t0 = time.perf_counter()
    protocol = protocol or Protocol()
    metrics_cfg = metrics_cfg or MetricsConfig()
    required = parse_metric_list(require_metrics if isinstance(require_metrics, str) else list(require_metrics))
    objs = list(pred_dirs)
    views = protocol.view_names()

    # which frames: render i against ground-truth frame i over the prediction's frames (as
    # Consistent4D's script pairs them), or the protocol's frames 0..num_frames-1
    frames_of: dict[tuple[str, str], list[int]] = {}
    gt_counts: dict[tuple[str, str], int] = {}
    for o in objs:
        for v in views:
            gt_frames = data.frame_paths(o, v)
            gt_counts[(o, v)] = len(gt_frames)
            folder = pred_dirs[o] / v
            if protocol.num_frames is None:
                want = sorted(list_frames(folder)) if folder.is_dir() else []
                if not want and folder.is_dir():
                    raise BenchmarkError(f"prediction {folder} holds no frames (<i>.png)")
            else:
                want = list(range(protocol.num_frames))
            missing = [f for f in want if f not in gt_frames]
            if missing:
                raise BenchmarkError(
                    f"ground truth {o}/{v} has {len(gt_frames)} frame(s) but {len(want)} are scored "
                    f"({span_label(want)}: {'protocol.num_frames' if protocol.num_frames else f'the frames of {folder}'}"
                    f"); it lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            frames_of[(o, v)] = want
    pred_paths = _check_prediction(pred_dirs, data, objs, views, frames_of)

    cfg = metrics_cfg.model_copy(update={"resolution": protocol.resolution})
    if suite is None:
        suite = build_metric_suite(cfg, definitions=protocol.metric_definitions)
    else:
        if suite.definitions != protocol.metric_definitions:
            raise ValueError(f"the metric suite computes the {suite.definitions!r} definitions but protocol "
                             f"{protocol.name!r} uses {protocol.metric_definitions!r}; build it with "
                             f"build_metric_suite(cfg, definitions={protocol.metric_definitions!r})")
        suite.resolution = protocol.resolution
    suite.require(required)  # before any scoring

    background = 1.0 if protocol.background == "white" else 0.0
    per_frame: list[FrameScore] = []
    fvd_pred: list[Tensor] = []
    fvd_gt: list[Tensor] = []
    want_fvd = "fvd" in suite.available and suite.video_extractor is not None
    pairs = [(o, v) for o in objs for v in views]
    for o, v in tqdm(pairs, desc="evaluate", disable=not progress):
        frames = frames_of[(o, v)]
        gt_paths = data.frame_paths(o, v)
        gt_files = [gt_paths[f] for f in frames]
        pr_files = [pred_paths[(o, v)][f] for f in frames]
        scores = suite.score_files(pr_files, gt_files, background) if suite.image_metrics else {}
        for i, f in enumerate(frames):
            vals = {m: float(scores[m][i]) for m in suite.image_metrics}
            capped = bool(scores["psnr_capped"][i]) if "psnr_capped" in scores else False
            per_frame.append(FrameScore(object=o, view=v, frame=f, values=vals, psnr_capped=capped))
        if want_fvd:
            fvd_pred.append(torch.stack([load_image(p, FVD_SIZE, background) for p in pr_files]))  # [F, 3, 224, 224]
            fvd_gt.append(torch.stack([load_image(p, FVD_SIZE, background) for p in gt_files]))

    image_metrics = [m for m in suite.requested if m != "fvd"]
    per_view, per_object, mean = aggregate(per_frame, image_metrics)
    unavailable = dict(suite.unavailable)
    if want_fvd:
        if len(fvd_pred) >= 2:
            mean["fvd"] = fvd_pooled(fvd_pred, fvd_gt, suite.video_extractor)
        else:
            unavailable["fvd"] = "fvd: pooled FVD needs at least 2 (object, view) videos"
    return Results(
        method=method,
        dataset=data.root.name + (" (generated mini-benchmark)" if (data.meta or {}).get("generator") else ""),
        protocol=protocol, metrics=[m for m in ALL_METRICS if m in suite.requested], unavailable=unavailable,
        per_frame=per_frame, per_view=per_view, per_object=per_object, mean=mean,
        psnr_capped_frames=sum(s.psnr_capped for s in per_frame), num_scored_frames=len(per_frame),
        frames=frames_record(frames_of, gt_counts), generation_time_s=generation_time_s, seconds=round(time.perf_counter() - t0, 3),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def evaluate_command(
    pred: str | Path,
    gt: str | Path,
    out: str | Path | None = None,
    require_metrics: str | Iterable[str] = (),
    protocol: Protocol | str | None = None,
    metrics_cfg: MetricsConfig | None = None,
    method: str | None = None,
    progress: bool = True,
    print_fn: Callable[[str], None] = print,
) -> Results:
    """``d2 evaluate --pred DIR --gt DIR [--require-metrics clip,lpips] [--out DIR]``.

    ``protocol`` may be a :class:`Protocol` or a preset name (``consistent4d`` | ``paper`` | ``d2-clean``).
    Prints the per-object table and writes the results files to ``out`` (default:
    ``<pred>/eval``). Raises :class:`MetricUnavailable` for an unavailable required metric
    and :class:`BenchmarkError` for a layout mismatch.
    """
    if isinstance(protocol, str):
        presets = {"consistent4d": Protocol.consistent4d, "paper": Protocol.paper, "d2-clean": Protocol.d2_clean}
        if protocol not in presets:
            raise ValueError(f"unknown protocol preset {protocol!r}; known: {list(presets)}")
        protocol = presets[protocol]()
    out_dir = Path(out) if out is not None else Path(pred) / "eval"
    results = evaluate(pred, gt, protocol=protocol, metrics_cfg=metrics_cfg, require_metrics=require_metrics,
                       method=method or Path(pred).name, out_dir=out_dir, progress=progress)
    from d2.eval.tables import results_markdown

    print_fn(results_markdown(results))
    print_fn(f"results written to {out_dir}")
    return results
