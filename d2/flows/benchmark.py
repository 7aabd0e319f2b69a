"""The ``benchmark`` flow: one asset per object of a dataset, in parallel, then the tables::

    objects ─▶ [asset ∥ asset ∥ …] ─▶ tables

Dataset layout (Consistent4D, as ``d2 prepare`` writes it): ``<data>/input/<object>/<i>.png``,
``<data>/gt/<object>/eval_{k}/<i>.png``, ``<data>/meta.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import BaseModel

from d2.flows.asset import object_graph
from d2.flows.graph import Graph, Job, Stage, drive, raise_failures
from d2.flows.run import Run, flow_params, run_scope
from d2.flows.runners import with_runner
from d2.execution.stages import StageSet
from d2.execution.tracking import flat_numbers
from d2.utils.io import write_json
from d2.utils.paths import safe_name
from d2.validation import dataset_objects

GENERATION_STAGES = ("conditions", "sampling", "fit")  # what "generation time" adds up


def checked_objects(data: Path, params: BaseModel, stages: StageSet) -> list[str]:
    """The dataset's objects (``run.objects`` of them), checked by the stage set under ``params``."""
    objects = dataset_objects(data, params.run.objects)
    return stages.check_dataset(data, params, objects) if stages.check_dataset is not None else objects


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
    for old in pred.iterdir():  # links of this run into the same folder, or of an earlier one
        if old.is_symlink() or old.is_file():
            old.unlink()
    for obj in objects:
        (pred / safe_name(obj)).symlink_to(Path("..") / "objects" / obj / "render_eval", target_is_directory=True)


def summarize(run: Run, jobs: list[Job], tables: Job, dataset: str) -> dict[str, Any]:
    """Name ``dataset`` (the scored data as the user gave it) in the run's tables, write
    ``metrics.json``, log the tables to MLflow, return what the flow adds to its result."""
    res = tables.results["tables"]
    table = res.info.get("table", "")
    if run.stages.label_tables is not None:
        table = run.stages.label_tables(res.out_dir, dataset)
    link_predictions(run.run_dir, [j.obj for j in jobs])
    summary = res.info.get("summary", {})
    write_json(run.run_dir / "metrics.json", summary)
    if run.tracker is not None:
        fit = {f"fit.{k}": sum(v) / len(v) for k in ("matrix_psnr", "train_psnr")  # mean over objects
               if (v := [float(j.results["fit"].info[k]) for j in jobs
                         if isinstance(j.results["fit"].info.get(k), (int, float))])}
        run.tracker.log_metrics(run.tracker.run_id, {**flat_numbers(summary), **fit})
        run.tracker.log_artifacts(run.tracker.run_id, [(p, "results") for p in sorted(res.out_dir.glob("*"))
                                                       if p.is_file()])
    return {"results_dir": str(res.out_dir), "summary": summary, "table": table, "objects": [j.obj for j in jobs],
            "per_object": {j.obj: flat_numbers(j.results["metrics"].info.get("metrics", {})) for j in jobs},
            "videos": {j.obj: str(j.results["fit"].out_dir / "turntable.mp4") for j in jobs}}


@flow(name="benchmark", log_prints=False)
def benchmark_flow(data_dir: str, out_dir: str, params: dict[str, Any], stages: Any = None) -> dict[str, Any]:
    """objects -> [asset ∥ asset ∥ ...] -> tables, tracked as an MLflow parent run with a child per object."""
    p, stages = flow_params(params, stages)
    data = Path(data_dir)
    objects = checked_objects(data, p, stages)
    with run_scope(out_dir, "benchmark", p, stages, {"data": str(data), "objects_list": objects},
                   mlflow_params={"data_dir": str(data_dir), "out_dir": str(out_dir)}) as run:
        jobs = object_jobs(run, data, objects)
        drive(jobs, p.run.max_parallel)
        raise_failures(jobs)
        tables = Job(run, "_benchmark", tables_graph(run, data, jobs))
        drive([tables], 1)
        raise_failures([tables])
        summary = summarize(run, jobs, tables, str(data_dir))
    return run.result(**summary)


def run_benchmark(data_dir: str | Path, out_dir: str | Path, params: BaseModel,
                  stages: StageSet | None = None) -> dict[str, Any]:
    """Run the benchmark flow with ``run.max_parallel`` stage tasks at a time on ``run.runner``."""
    return with_runner(benchmark_flow, params)(str(data_dir), str(out_dir), params.model_dump(mode="json"), stages)
