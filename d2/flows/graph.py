"""Stage graphs and their driver.

A per-object graph is a generator (see :func:`d2.flows.asset.object_graph`): it yields a
:class:`Stage` (a stage name and its inputs) and receives that stage's cache folder once it
is done. :func:`drive` advances many graphs at once: it submits each stage task to the
flow's task runner only when its inputs are ready (no worker ever waits on another), at most
``run.max_parallel`` at a time, and in the flow's own process records every result: the
manifest, the progress listeners, the run folder's copy of the outputs, MLflow.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

from d2.config import get_param
from d2.flows.run import Run, place
from d2.flows.runners import gpu_request
from d2.lifecycle import Interrupts, interrupted, server_problem
from d2.execution.cache import store_dir
from d2.execution.manifest import StageResult
from d2.execution.progress import read_progress
from d2.execution.stage_task import stage_call
from d2.execution.tracking import log_object


@dataclass(frozen=True)
class Stage:
    """What a graph yields: run stage ``name`` on ``inputs`` (name -> artifact path)."""

    name: str
    inputs: dict[str, str | Path]
    dest: str | None = None  # the run folder's copy goes here (relative), default objects/<object>/<stage>


Graph = Generator[Stage, str, None]  # yields stages, receives each one's store folder (a path string)


@dataclass
class Job:
    """One object's graph in one run (objects named ``_...`` are the run's own stages, e.g. the tables)."""

    run: Run
    obj: str
    graph: Graph
    input_path: str = ""
    results: dict[str, StageResult] = field(default_factory=dict)
    error: str | None = None
    mlflow_run_id: str | None = None


def drive(jobs: list[Job], max_parallel: int) -> None:
    """Advance every job's graph to its end, at most ``max_parallel`` stage tasks in flight.

    A failed stage ends its job (recorded; the other jobs go on). An interrupt (a signal, see
    :mod:`d2.lifecycle`) stops waiting at once, and so does the loss of the Prefect server this
    process started; the runs are then finished by their :func:`d2.flows.run.run_scope`.
    """
    done: queue.Queue = queue.Queue()
    ready: list[tuple[Job, Stage]] = []
    in_flight: dict[Any, tuple[Job, Stage, float]] = {}

    def advance(job: Job, store: str | None) -> None:
        try:
            ready.append((job, job.graph.send(store) if store is not None else next(job.graph)))
        except StopIteration:
            if job.mlflow_run_id is not None:
                log_object(job.run.tracker, job.mlflow_run_id, job.results, job.error is None)

    for job in jobs:
        job.mlflow_run_id = job.run.object_run(job.obj, job.input_path)
        advance(job, None)
    while ready or in_flight:
        while ready and len(in_flight) < max_parallel:
            job, stage = ready.pop(0)
            fut = submit(job, stage)
            in_flight[fut] = (job, stage, time.perf_counter())
            fut.add_done_callback(done.put)
        if interrupted():
            raise KeyboardInterrupt(Interrupts.name)
        try:
            fut = done.get(timeout=1.0)
        except queue.Empty:
            problem = server_problem()
            if problem:
                raise RuntimeError(problem) from None
            for job, stage, _ in list(in_flight.values()):  # live step counters of the computing stages
                info = read_progress(job.run.progress_file(job.obj, stage.name))
                if info is not None:
                    job.run.recorder.stage_progress(job.obj, stage.name, info)
            continue
        job, stage, t_submit = in_flight.pop(fut)
        with contextlib.suppress(OSError):  # progress files live while their stage runs
            job.run.progress_file(job.obj, stage.name).unlink()
        try:
            result = fut.result()
        except Exception as e:  # noqa: BLE001  (recorded; the run fails after the other jobs end)
            job.error = f"{stage.name}: {type(e).__name__}: {e}"
            job.run.recorder.add_error(job.obj, stage.name, e)
            job.graph.close()
            advance(job, None)  # a closed graph stops at once: the job ends
            continue
        for attempt in result["failed_attempts"]:  # the failed attempts before a computed result
            job.run.recorder.add_error(job.obj, stage.name, attempt)
        out_dir = job.run.run_dir / stage.dest if stage.dest else job.run.out_dir(job.obj, stage.name)
        store = store_dir(job.run.cache_dir, result)  # under this run's cache root (results name no path)
        place(store, out_dir, job.run.run_dir)
        rec = StageResult.from_task(result, job.obj, out_dir, time.perf_counter() - t_submit, store)
        job.results[stage.name] = rec
        job.run.recorder.add(rec)
        advance(job, str(store))


def submit(job: Job, stage: Stage) -> Any:
    """Submit ``stage`` of ``job`` to the flow's task runner (asking for a GPU when it runs on one)."""
    run, p = job.run, job.run.params
    run.recorder.started_stage(job.obj, stage.name)
    spec = run.stages.specs[stage.name]
    device = str(get_param(p, spec.device_key)) if spec.device_key else None
    progress = run.progress_file(job.obj, stage.name)
    with contextlib.suppress(OSError):
        progress.unlink()
    task, arguments = stage_call(run.stages, stage.name, job.obj, stage.inputs, p, run.cache_dir, progress, run.label)
    with gpu_request(p, device):
        return task.submit(**arguments)


def raise_failures(jobs: list[Job]) -> None:
    """Fail the run (after every object ended) when any object failed."""
    failed = [f"{j.obj}: {j.error}" for j in jobs if j.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} object(s) failed:\n  " + "\n  ".join(failed))
