"""The ``benchmark`` flow: one asset per object of a dataset, in parallel, then the tables.

Dataset layout (Consistent4D, as ``d2 prepare`` writes it): ``<data>/input/<object>/<i>.png``,
``<data>/gt/<object>/eval_{k}/<i>.png``, ``<data>/meta.json``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from d2.tasks import env as _env  # noqa: F401  (environment before prefect)

import torch
from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel


from d2.tasks.manifest import Recorder
from d2.tasks.runtime import (RunContext, StageResult, Tracker, asset_task, finish_run, get_stage_set,
                              make_tracker, new_recorder, object_metrics, register_context, release_context, run_stage_task,
                              tracking_meta)
from d2.tasks.tracking import flat_numbers
from d2.utils.io import write_json


def list_objects(data_dir: str | Path, only: list[str] | None = None) -> list[str]:
    """Object names of a dataset (folders of ``<data>/input``), checked against ``only``."""
    data = Path(data_dir)
    inputs = data / "input"
    if not inputs.is_dir():
        raise FileNotFoundError(f"not a benchmark dataset (no {inputs}); create one with `d2 prepare --out {data}`")
    names = sorted(p.name for p in inputs.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"no objects in {inputs}")
    if only:
        missing = [o for o in only if o not in names]
        if missing:
            raise ValueError(f"run.objects names objects not in {inputs}: {', '.join(missing)} (has: {', '.join(names)})")
        names = [n for n in names if n in only]
    for n in names:
        if not (data / "gt" / n).is_dir():
            raise FileNotFoundError(f"object '{n}' has no ground truth folder {data / 'gt' / n}")
    return names


def submit_objects(ctx: RunContext, data_dir: Path, objects: list[str]) -> list[Any]:
    """Submit one asset task per object (the flow's task runner bounds the parallelism)."""
    futures = []
    for obj in objects:
        t = asset_task.with_options(name="asset", task_run_name=f"asset[{ctx.label + '/' if ctx.label else ''}{obj}]")
        futures.append(t.submit(ctx.id, obj, str(data_dir / "input" / obj), str(data_dir / "gt" / obj)))
    return futures


def finish_benchmark(ctx: RunContext, data_dir: Path, objects: list[str], futures: list[Any]) -> dict[str, Any]:
    """Wait for the objects, build the tables, write metrics.json; raise if any object failed."""
    per_object: dict[str, dict[str, StageResult]] = {}
    failures: list[str] = []
    for obj, fut in zip(objects, futures):
        try:
            per_object[obj] = fut.result()
        except Exception as e:  # noqa: BLE001  (recorded; the run fails below)
            failures.append(f"{obj}: {type(e).__name__}: {e}")
    if failures:
        raise RuntimeError(f"{len(failures)} object(s) failed:\n  " + "\n  ".join(failures))
    inputs: dict[str, Any] = {}
    for obj in objects:
        inputs[f"metrics:{obj}"] = per_object[obj]["metrics"].store_dir
        inputs[f"pred:{obj}"] = per_object[obj]["render_eval"].store_dir
        inputs[f"gt:{obj}"] = data_dir / "gt" / obj
    tables = run_stage_task(ctx, "tables", "_benchmark", inputs, out_subdir="results")
    _add_generation_time(tables.out_dir, per_object)
    _link_predictions(ctx.run_dir, objects)
    summary = tables.info.get("summary", {})
    write_json(ctx.run_dir / "metrics.json", summary)
    if ctx.tracker is not None:
        ctx.tracker.log_metrics(ctx.tracker.run_id, flat_numbers(summary))
        ctx.tracker.log_artifacts(ctx.tracker.run_id, [(p, "results") for p in sorted(tables.out_dir.glob("*"))
                                                       if p.is_file()])
    return {"run_dir": str(ctx.run_dir), "manifest": str(ctx.run_dir / "manifest.json"),
            "results_dir": str(tables.out_dir), "summary": summary,
            "table": tables.info.get("table", ""), "objects": objects,
            "per_object": {o: object_metrics(r) for o, r in per_object.items()},
            "videos": {o: str(r["fit"].out_dir / "turntable.mp4") for o, r in per_object.items()},
            "mlflow_run_id": ctx.tracker.run_id if ctx.tracker else None}


GENERATION_STAGES = ("conditions", "sampling", "fit")


def _add_generation_time(results_dir: Path, per_object: dict[str, dict[str, StageResult]]) -> None:
    """Put the mean generation time per object (conditions + sampling + fit, as computed) into the
    run's copy of the results tables (the cached copy stays as the tables stage wrote it)."""
    if not (results_dir / "results.json").is_file():
        return
    try:
        from d2.eval.tables import load_results, write_results
    except ImportError:
        return
    times = [sum(r[s].compute_seconds for s in GENERATION_STAGES if s in r) for r in per_object.values()]
    results = load_results(results_dir)
    results.generation_time_s = round(sum(times) / max(len(times), 1), 3)
    write_results(results, results_dir)


def _link_predictions(run_dir: Path, objects: list[str]) -> None:
    """``run_dir/pred/<object>`` -> ``../objects/<object>/render_eval``: the predictions in the
    Consistent4D layout, for ``d2 evaluate --pred run_dir/pred --gt <data>``."""
    pred = run_dir / "pred"
    pred.mkdir(parents=True, exist_ok=True)
    for stale in pred.iterdir():  # objects of an earlier run into the same folder
        if stale.is_symlink() and stale.name not in objects:
            stale.unlink()
    for obj in objects:
        link = pred / obj
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / "objects" / obj / "render_eval", target_is_directory=True)


def open_benchmark(p: BaseModel, data_dir: Path, run_dir: Path, stage_set: str, kind: str, label: str = "",
                   tracker: Tracker | None = None, forward_to: Recorder | None = None,
                   meta: dict | None = None, slots: threading.BoundedSemaphore | None = None
                   ) -> tuple[RunContext, list[str]]:
    """Check the dataset, create the run folder, params.json, the recorder and the context."""
    objects = list_objects(data_dir, p.run.objects)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "params.json", p.model_dump(mode="json"))
    recorder = new_recorder(run_dir, kind, {"data": str(data_dir), "objects_list": objects, **(meta or {})},
                            forward_to=forward_to, prefix=f"{label}/" if label else "")
    ctx = RunContext(params=p, run_dir=run_dir, recorder=recorder, specs=get_stage_set(stage_set).specs,
                     tracker=tracker, label=label, slots=slots or threading.BoundedSemaphore(p.run.max_parallel))
    register_context(ctx)
    return ctx, objects


@flow(name="benchmark", log_prints=False)
def benchmark_flow(data_dir: str, out_dir: str, params: dict[str, Any], stage_set: str = "default") -> dict[str, Any]:
    """objects -> [asset ∥ asset ∥ ...] -> tables, tracked as an MLflow parent run with a child per object."""
    p = get_stage_set(stage_set).params_model.model_validate(params)
    torch.set_num_threads(p.run.threads_per_task)
    t0 = time.perf_counter()
    ctx, objects = open_benchmark(p, Path(data_dir), Path(out_dir), stage_set, "benchmark")
    ctx.tracker = make_tracker(p, "benchmark", f"benchmark/{Path(out_dir).name}",
                               {"data_dir": str(data_dir), "out_dir": str(out_dir)})
    ctx.recorder.meta.update(tracking_meta(ctx.tracker))
    ok = False
    try:
        result = finish_benchmark(ctx, Path(data_dir), objects, submit_objects(ctx, Path(data_dir), objects))
        ok = True
    finally:
        finish_run(ctx.recorder, ctx.tracker, ok, t0)
        release_context(ctx.id)
    result["flow_wall_seconds"] = ctx.recorder.meta["flow_wall_seconds"]
    return result


def run_benchmark(data_dir: str | Path, out_dir: str | Path, params: BaseModel,
                  stage_set: str = "default") -> dict[str, Any]:
    """Run the benchmark flow with ``run.max_parallel`` objects at a time."""
    f = benchmark_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=params.run.max_parallel))
    return f(str(data_dir), str(out_dir), params.model_dump(mode="json"), stage_set)
