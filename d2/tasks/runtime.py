"""Prefect tasks around the stages.

A run has a :class:`RunContext` (validated params, run folder, cache, manifest recorder,
MLflow tracker, the set of stage specs). Tasks get the context's id (a string), never the
context itself, so Prefect has nothing heavy to inspect, and pass each other
:class:`~d2.tasks.cache.StageResult`s (paths and keys, never tensors).

The stage graph of one object (the paper's Figure 2, left to right)::

    input ─▶ conditions ─▶ sampling ─▶ fit ─▶ render_eval ─▶ metrics
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2.tasks import env as _env  # noqa: F401  (environment before prefect)

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from d2.config import flatten_params, params_hash
from d2.tasks.cache import StageResult, StageSpec, run_stage
from d2.tasks.manifest import Recorder
from d2.tasks.tracking import Tracker, flat_numbers

ASSET_STAGES = ("conditions", "sampling", "fit", "render_eval", "metrics")

@dataclass(frozen=True)
class StageSet:
    """The stages a flow runs and the params model they read."""

    specs: dict[str, StageSpec]  # stage name -> spec (conditions, sampling, fit, render_eval, metrics, tables)
    params_model: type[BaseModel]  # root params model (d2.config.Params for the real stages)


# name -> StageSet; "default" holds the real stages (d2.tasks.stages registers it)
STAGE_SETS: dict[str, StageSet] = {}


def register_stage_set(name: str, specs: dict[str, StageSpec], params_model: type[BaseModel] | None = None) -> None:
    """Make a set of stage specs available to flows under ``name``."""
    from d2.config import Params

    STAGE_SETS[name] = StageSet(dict(specs), params_model or Params)


def get_stage_set(name: str) -> StageSet:
    """The stage set registered under ``name`` (importing the real stages on demand)."""
    if name == "default" and name not in STAGE_SETS:
        import d2.tasks.stages  # noqa: F401  (registers "default")
    if name not in STAGE_SETS:
        raise KeyError(f"unknown stage set '{name}' (known: {', '.join(STAGE_SETS) or 'none'})")
    return STAGE_SETS[name]


@dataclass
class RunContext:
    """Everything the tasks of one run share."""

    params: BaseModel
    run_dir: Path
    recorder: Recorder
    specs: dict[str, StageSpec]
    tracker: Tracker | None = None
    label: str = ""  # sweep point id ('' for a plain benchmark)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    slots: threading.BoundedSemaphore | None = None  # bounds objects in flight (run.max_parallel)

    @property
    def cache_dir(self) -> Path:
        """The content-addressed stage cache."""
        return Path(self.params.run.cache_dir)


_CONTEXTS: dict[str, RunContext] = {}
_CTX_LOCK = threading.Lock()


def register_context(ctx: RunContext) -> str:
    """Make ``ctx`` reachable by tasks through its id."""
    with _CTX_LOCK:
        _CONTEXTS[ctx.id] = ctx
    return ctx.id


def release_context(ctx_id: str) -> None:
    """Forget a finished run's context."""
    with _CTX_LOCK:
        _CONTEXTS.pop(ctx_id, None)


def get_context(ctx_id: str) -> RunContext:
    """The context registered under ``ctx_id``."""
    with _CTX_LOCK:
        return _CONTEXTS[ctx_id]


def _run_stage_task(ctx_id: str, stage: str, obj: str, inputs: dict[str, str],
                    out_subdir: str | None = None) -> StageResult:
    """Run one stage of one object through the cache and record it in the manifest."""
    ctx = get_context(ctx_id)
    spec = ctx.specs[stage]
    ctx.recorder.started_stage(obj, stage)
    out = ctx.run_dir / (out_subdir if out_subdir is not None else f"objects/{obj}/{stage}")
    try:
        result = run_stage(spec, obj, inputs, ctx.params, ctx.cache_dir, out, use_cache=ctx.params.run.use_cache)
    except Exception as e:
        ctx.recorder.add_error(obj, stage, e)
        raise
    ctx.recorder.add(result)
    return result


stage_task = task(_run_stage_task, name="stage", cache_policy=NO_CACHE, log_prints=False)


def run_stage_task(ctx: RunContext, stage: str, obj: str, inputs: dict[str, Any],
                   out_subdir: str | None = None) -> StageResult:
    """Call the Prefect task of ``stage`` (named after it, with the run's retries)."""
    t = stage_task.with_options(name=stage, task_run_name=f"{stage}[{obj}]",
                                retries=ctx.params.run.retries,
                                retry_delay_seconds=ctx.params.run.retry_delay_s)
    return t(ctx.id, stage, obj, {k: str(v) for k, v in inputs.items()}, out_subdir)


# ---------------------------------------------------------------------------------------
# One object: the asset graph


def asset_graph(ctx: RunContext, obj: str, input_path: str | Path, gt_dir: str | Path | None) -> dict[str, StageResult]:
    """conditions -> sampling -> fit -> render_eval (-> metrics when ground truth is given)."""
    results: dict[str, StageResult] = {}
    results["conditions"] = run_stage_task(ctx, "conditions", obj, {"input": input_path})
    results["sampling"] = run_stage_task(ctx, "sampling", obj, {"conditions": results["conditions"].store_dir})
    results["fit"] = run_stage_task(ctx, "fit", obj, {"matrix": results["sampling"].store_dir})
    results["render_eval"] = run_stage_task(ctx, "render_eval", obj, {"gaussians": results["fit"].store_dir})
    if gt_dir is not None:
        inputs = {"pred": results["render_eval"].store_dir, "gt": gt_dir}
        if getattr(getattr(ctx.params, "protocol", None), "include_front_view", False):
            inputs["input"] = input_path  # the front view is scored against the input frames
        results["metrics"] = run_stage_task(ctx, "metrics", obj, inputs)
    return results


def _child_artifacts(results: dict[str, StageResult]) -> list[tuple[Path, str]]:
    files: list[tuple[Path, str]] = []
    if "sampling" in results:
        for name in ("grid.png", "grid.mp4"):
            files.append((results["sampling"].out_dir / name, "matrix"))
    if "fit" in results:
        files.append((results["fit"].out_dir / "turntable.mp4", "fit"))
    if "metrics" in results:
        files.append((results["metrics"].out_dir / "metrics.json", "metrics"))
    return files


def object_metrics(results: dict[str, StageResult]) -> dict[str, float]:
    """The numbers an object's metrics stage returned (its ``info['metrics']``)."""
    if "metrics" not in results:
        return {}
    return flat_numbers(results["metrics"].info.get("metrics", {}))


def _asset_task_fn(ctx_id: str, obj: str, input_path: str, gt_dir: str | None) -> dict[str, StageResult]:
    """One object's asset graph, tracked as an MLflow child run."""
    ctx = get_context(ctx_id)
    run_id = None
    if ctx.tracker is not None:
        name = f"{ctx.label}/{obj}" if ctx.label else obj
        run_id = ctx.tracker.child(name, params={**flatten_params(ctx.params), "object": obj, "input": str(input_path)},
                                   tags={"d2.object": obj, "d2.kind": "object"})
    ok = False
    results: dict[str, StageResult] = {}
    try:
        if ctx.slots is not None:
            with ctx.slots:  # run.max_parallel, whatever task runner runs this flow
                results = asset_graph(ctx, obj, input_path, gt_dir)
        else:
            results = asset_graph(ctx, obj, input_path, gt_dir)
        ok = True
        return results
    finally:
        if run_id is not None:
            done = {r.stage: r for r in ctx.recorder.results if r.object == obj}
            metrics = {f"seconds.{s}": r.seconds for s, r in done.items()}
            metrics.update({f"compute_seconds.{s}": r.compute_seconds for s, r in done.items()})
            metrics.update({f"cached.{s}": float(r.status == "cached") for s, r in done.items()})
            metrics.update(object_metrics(done))
            ctx.tracker.log_metrics(run_id, metrics)
            ctx.tracker.log_artifacts(run_id, _child_artifacts(done))
            ctx.tracker.end(run_id, ok)


asset_task = task(_asset_task_fn, name="asset", cache_policy=NO_CACHE, log_prints=False)


def tracking_tags(params: BaseModel, kind: str) -> dict[str, str]:
    """Tags of every run: git commit, params hash, Prefect flow-run id, kind."""
    from d2.tasks.tracking import git_commit

    try:
        from prefect.runtime import flow_run

        flow_run_id = str(flow_run.id or "")
    except Exception:  # noqa: BLE001  (outside a flow)
        flow_run_id = ""
    return {"git_commit": git_commit(), "params_hash": params_hash(params),
            "prefect_flow_run_id": flow_run_id, "d2.kind": kind}


def make_tracker(params: BaseModel, kind: str, run_name: str, extra_params: dict | None = None) -> Tracker | None:
    """A parent MLflow run (None when ``run.mlflow`` is off)."""
    if not params.run.mlflow:
        return None
    return Tracker(params.run.mlflow_experiment, run_name,
                   {**flatten_params(params), **(extra_params or {})}, tracking_tags(params, kind))


def tracking_meta(tracker: Tracker | None) -> dict[str, Any]:
    """Manifest fields naming the MLflow run and the Prefect flow run."""
    try:
        from prefect.runtime import flow_run

        flow_run_id = str(flow_run.id or "")
    except Exception:  # noqa: BLE001
        flow_run_id = ""
    return {"mlflow_run_id": tracker.run_id if tracker else None,
            "mlflow_tracking_uri": tracker.tracking_uri if tracker else None, "prefect_flow_run_id": flow_run_id}


def finish_run(recorder: Recorder, tracker: Tracker | None, ok: bool, t0: float | None = None) -> None:
    """Close a run: its wall seconds (when ``t0`` is given), the manifest status, and the MLflow run
    (FAILED when not ``ok``)."""
    if t0 is not None:
        recorder.meta["flow_wall_seconds"] = round(time.perf_counter() - t0, 4)
    recorder.finish("completed" if ok else "failed")
    if tracker is not None:
        tracker.finish(ok)


def now() -> float:
    """Monotonic seconds (for wall times in manifests)."""
    return time.perf_counter()


# Listeners every new Recorder gets (the CLI's progress display registers itself here).
LISTENERS: list[Any] = []


def new_recorder(run_dir: Path, kind: str, meta: dict | None = None, forward_to: Recorder | None = None,
                 prefix: str = "") -> Recorder:
    """A Recorder for ``run_dir`` with the global listeners (none when it forwards to a parent)."""
    listeners = [] if forward_to is not None else list(LISTENERS)
    return Recorder(run_dir, kind, meta, listeners=listeners, forward_to=forward_to, prefix=prefix)
