"""The ``benchmark`` flow: one asset per object of a dataset, in parallel, then the tables::

    objects ─▶ [asset ∥ asset ∥ …] ─▶ tables

Dataset layout (Consistent4D, as ``d2 prepare`` writes it): ``<data>/input/<object>/<i>.png``,
``<data>/gt/<object>/eval_{k}/<i>.png``, ``<data>/meta.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from prefect import flow
from pydantic import BaseModel

from d2.flows.asset import object_graph
from d2.flows.runners import task_runner
from d2.flows.engine import (Graph, Job, Run, Stage, closing, drive, failures, make_tracker, new_run,
                             open_run_folder, prefect_api_check, safe_name)
from d2.reports.html import track_report, write_run_report
from d2.tasks.stages import STAGES, StageSet
from d2.tasks.tracking import flat_numbers
from d2.utils.io import write_json

GENERATION_STAGES = ("conditions", "sampling", "fit")  # what "generation time" adds up


def list_objects(data_dir: str | Path, only: list[str] | None = None) -> list[str]:
    """Object names of a dataset (folders of ``<data>/input``, ``run.objects`` when given), each a
    plain folder name with a ground-truth folder (:class:`d2.validation.InputError` otherwise)."""
    from d2.validation import InputError, dataset_objects

    data = Path(data_dir)
    names = dataset_objects(data, only)
    for n in names:
        safe_name(n, f"object folder {data / 'input' / n}:")
        if not (data / "gt" / n).is_dir():
            raise InputError(f"object '{n}' has no ground truth folder {data / 'gt' / n}")
    return names


def object_jobs(run: Run, data_dir: Path, objects: list[str]) -> list[Job]:
    """One asset graph per object of the dataset."""
    return [Job(run, obj, object_graph(run.params, data_dir / "input" / obj, data_dir / "gt" / obj),
                input_path=str(data_dir / "input" / obj)) for obj in objects]


def tables_graph(run: Run, data_dir: Path, jobs: list[Job]) -> Graph:
    """Every object's scores and renders (and the mean generation time) -> the results tables."""
    times = [sum(j.results[s].compute_seconds for s in GENERATION_STAGES if s in j.results) for j in jobs]
    generation = run.run_dir / "generation_time.json"
    write_json(generation, {"seconds_per_object": round(sum(times) / max(len(times), 1), 3)})
    inputs: dict[str, Any] = {"generation_time": generation}
    for j in jobs:
        inputs[f"metrics:{j.obj}"] = j.results["metrics"].store_dir
        inputs[f"pred:{j.obj}"] = j.results["render_eval"].store_dir
        inputs[f"gt:{j.obj}"] = data_dir / "gt" / j.obj
    yield Stage("tables", inputs, dest="results")


def link_predictions(run_dir: Path, objects: list[str]) -> None:
    """``run_dir/pred/<object>`` -> ``../objects/<object>/render_eval``: the predictions in the
    Consistent4D layout, for ``d2 evaluate --pred run_dir/pred --gt <data>``."""
    pred = run_dir / "pred"
    pred.mkdir(parents=True, exist_ok=True)
    for stale in pred.iterdir():  # objects of an earlier run into the same folder
        if stale.is_symlink() and stale.name not in objects:
            stale.unlink()
    for obj in objects:
        link = pred / safe_name(obj)
        if link.is_symlink() or link.is_file():
            link.unlink()
        link.symlink_to(Path("..") / "objects" / obj / "render_eval", target_is_directory=True)


def summarize(run: Run, jobs: list[Job], tables: Job, dataset: str) -> dict[str, Any]:
    """Name ``dataset`` (the scored data as the user gave it) in the run's tables, write
    ``metrics.json``, log the tables to MLflow, return the flow's result."""
    res = tables.results["tables"]
    table = res.info.get("table", "")
    if run.stages.label_tables is not None:
        table = run.stages.label_tables(res.out_dir, dataset)
    link_predictions(run.run_dir, [j.obj for j in jobs])
    summary = res.info.get("summary", {})
    write_json(run.run_dir / "metrics.json", summary)
    if run.tracker is not None:
        run.tracker.log_metrics(run.tracker.run_id, {**flat_numbers(summary), **fit_headline(jobs)})
        run.tracker.log_artifacts(run.tracker.run_id, [(p, "results") for p in sorted(res.out_dir.glob("*"))
                                                       if p.is_file()])
    return {"run_dir": str(run.run_dir), "manifest": str(run.run_dir / "manifest.json"),
            "results_dir": str(res.out_dir), "summary": summary, "table": table,
            "objects": [j.obj for j in jobs],
            "per_object": {j.obj: flat_numbers(j.results["metrics"].info.get("metrics", {})) for j in jobs},
            "videos": {j.obj: str(j.results["fit"].out_dir / "turntable.mp4") for j in jobs},
            "mlflow_run_id": run.tracker.run_id if run.tracker else None}


def fit_headline(jobs: list[Job]) -> dict[str, float]:
    """Mean over objects of the fit's numbers (``fit.matrix_psnr``, ``fit.train_psnr``) for MLflow."""
    out: dict[str, float] = {}
    for key in ("matrix_psnr", "train_psnr"):
        vals = [float(j.results["fit"].info[key]) for j in jobs
                if "fit" in j.results and isinstance(j.results["fit"].info.get(key), (int, float))]
        if vals:
            out[f"fit.{key}"] = sum(vals) / len(vals)
    return out


def raise_failures(jobs: list[Job]) -> None:
    """Fail the run (after every object ended) when any object failed."""
    failed = failures(jobs)
    if failed:
        raise RuntimeError(f"{len(failed)} object(s) failed:\n  " + "\n  ".join(failed))


@flow(name="benchmark", log_prints=False)
def benchmark_flow(data_dir: str, out_dir: str, params: dict[str, Any], stages: Any = None) -> dict[str, Any]:
    """objects -> [asset ∥ asset ∥ ...] -> tables, tracked as an MLflow parent run with a child per object."""
    stages: StageSet = stages or STAGES
    p = stages.params_model.model_validate(params)
    torch.set_num_threads(p.run.threads_per_task)
    data = Path(data_dir)
    objects = list_objects(data, p.run.objects)
    if stages.check_dataset is not None:
        stages.check_dataset(data, p, objects)
    with open_run_folder(Path(out_dir)) as run_dir:
        tracker = make_tracker(p, "benchmark", f"benchmark/{run_dir.name}",
                               {"data_dir": str(data_dir), "out_dir": str(out_dir)})
        run = new_run(run_dir, "benchmark", p, stages, {"data": str(data), "objects_list": objects}, tracker)
        with closing(run):
            jobs = object_jobs(run, data, objects)
            drive(jobs, p.run.max_parallel, prefect_api_check())
            raise_failures(jobs)
            tables = Job(run, "_benchmark", tables_graph(run, data, jobs))
            drive([tables], 1, prefect_api_check())
            raise_failures([tables])
            result = summarize(run, jobs, tables, str(data_dir))
        t_report = time.perf_counter()
        result["report"] = write_run_report(run.run_dir)
        track_report(run.tracker, result["report"])
        result["report_seconds"] = round(time.perf_counter() - t_report, 3)
    result["flow_wall_seconds"] = run.recorder.meta["flow_wall_seconds"]
    return result


def run_benchmark(data_dir: str | Path, out_dir: str | Path, params: BaseModel,
                  stages: StageSet | None = None) -> dict[str, Any]:
    """Run the benchmark flow with ``run.max_parallel`` stage tasks at a time."""
    f = benchmark_flow.with_options(task_runner=task_runner(params))
    return f(str(data_dir), str(out_dir), params.model_dump(mode="json"), stages)
