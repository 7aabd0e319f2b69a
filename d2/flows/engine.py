"""Running stage graphs inside a flow: run folders, the driver, interruption.

A per-object graph is a generator (see :func:`d2.flows.asset.asset_graph`): it yields a
:class:`Stage` (a stage name and its inputs) and receives that stage's cache folder once it
is done. :func:`drive` advances many graphs at once: it submits each stage task to the
flow's task runner only when its inputs are ready (no worker ever waits on another), at most
``run.max_parallel`` at a time, and in the flow's own process records every result: the
manifest, the progress listeners, the run folder's copy of the outputs, MLflow.

A :class:`Run` is one run folder (an asset, a benchmark, a sweep point). :func:`open_run_folder`
locks it for the run (a second run into the same folder is refused at once), marks a run
that died there (``kill -9``) as failed, and confines every path the run writes to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Iterator

from pydantic import BaseModel

from d2.config import flatten_params, get_param, params_hash
from d2.flows.runners import gpu_request, wants_gpu
from d2.tasks.manifest import LISTENERS, Recorder, StageResult
from d2.tasks.progress import read_progress
from d2.tasks.cache import store_dir
from d2.tasks.stage_task import configured_task, task_arguments
from d2.tasks.stages import StageSet
from d2.tasks.tracking import Tracker, close_open_runs, fail_stale_runs, flat_numbers, git_commit
from d2.utils.io import write_json
from d2.utils.paths import LOCK_FILE, RunFolderLocked, adopt_run_folder_lock, inside, lock_run_folder, safe_name

# Names of the signals that asked this process to stop (set by d2.lifecycle's handler); the
# driver checks it between waits, so an interrupt that some library swallowed still stops the run.
INTERRUPTED: list[str] = []

# The recorders of the runs in progress in this process: what a second Ctrl-C marks on its way out.
ACTIVE: dict[int, Recorder] = {}


class RunFolderBusy(RuntimeError):
    """Another live run is writing into the run folder."""


@dataclass(frozen=True)
class Stage:
    """What a graph yields: run stage ``name`` on ``inputs`` (name -> artifact path)."""

    name: str
    inputs: dict[str, str | Path]
    dest: str | None = None  # the run folder's copy goes here (relative), default objects/<object>/<stage>


Graph = Generator[Stage, str, None]  # yields stages, receives each one's store folder (a path string)


def place(src: Path, dst: Path, run_dir: Path) -> None:
    """Make ``dst`` (inside ``run_dir``) a plain copy of the cache folder ``src``: edits in a run
    folder never reach the cache. What was at ``dst`` is replaced; nothing outside ``run_dir``
    is touched (a symlink at ``dst`` is removed, never followed)."""
    dst = inside(run_dir, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*"))
    except BaseException:  # a full disk, Ctrl-C: no half copy is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        old = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.old")
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------
# Run folders


@contextlib.contextmanager
def open_run_folder(run_dir: Path) -> Iterator[Path]:
    """Lock ``run_dir`` for one run (refused at once when another live run holds it) and fail
    the manifest and MLflow runs of a run that died there without finishing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = adopt_run_folder_lock(run_dir)  # taken by the command before Prefect started
    if fd is None:
        try:
            fd = lock_run_folder(run_dir)
        except RunFolderLocked as e:
            raise RunFolderBusy(str(e)) from None
    try:
        fail_dead_run(run_dir)
        yield run_dir
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def fail_dead_run(run_dir: Path) -> None:
    """A manifest still 'running' in a folder whose lock we hold belongs to a dead process:
    keep it as ``manifest.dead.json`` with status 'failed', and fail its MLflow runs."""
    for path in [run_dir / "manifest.json", *sorted(run_dir.glob("points/*/manifest.json"))]:
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if m.get("status") != "running":
            continue
        reason = (f"the process that ran it (pid {m.get('pid')} on {m.get('host')}) died before finishing "
                  "(killed, or the machine went down)")
        m["status"] = "failed"
        m.setdefault("errors", []).append({"object": "", "stage": "", "error": reason})
        m["mlflow_marked_failed"] = fail_stale_runs(m.get("mlflow_runs", []), reason)
        write_json(path.with_name("manifest.dead.json"), m)
        write_json(path, m)


@dataclass
class Run:
    """One run folder and what records into it."""

    run_dir: Path  # absolute
    params: BaseModel  # validated
    stages: StageSet
    recorder: Recorder
    tracker: Tracker | None = None  # its MLflow run (children: one per object)
    label: str = ""  # sweep point id ('' otherwise)

    @property
    def cache_dir(self) -> Path:
        # absolute, symlinks kept: the cache is used through the path this run was given
        return Path(os.path.abspath(self.params.run.cache_dir))

    def out_dir(self, obj: str, stage: str) -> Path:
        """Where the run keeps its copy of ``stage``'s outputs for ``obj``."""
        return self.run_dir / "objects" / safe_name(obj) / stage

    def progress_file(self, obj: str, stage: str) -> Path:
        """Where the task computing ``stage`` of ``obj`` reports its progress (hidden, in the run folder)."""
        return self.run_dir / "objects" / safe_name(obj) / f".{stage}.progress.json" if not obj.startswith("_") \
            else self.run_dir / f".{stage}.progress.json"

    def note_mlflow(self, run_id: str) -> None:
        """Remember an MLflow run id in the manifest (a dead run's runs are failed by the next one)."""
        self.recorder.meta.setdefault("mlflow_runs", []).append(run_id)
        if self.recorder.forward_to is not None:
            self.recorder.forward_to.meta.setdefault("mlflow_runs", []).append(run_id)


def new_run(run_dir: Path, kind: str, params: BaseModel, stages: StageSet, meta: dict | None = None,
            tracker: Tracker | None = None, label: str = "", parent: Recorder | None = None) -> Run:
    """A :class:`Run` with its ``params.json`` written and its recorder started."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "params.json", params.model_dump(mode="json"))
    recorder = Recorder(run_dir, kind, meta, listeners=[] if parent is not None else list(LISTENERS),
                        forward_to=parent, prefix=f"{label}/" if label else "")
    run = Run(run_dir, params, stages, recorder, tracker, label)
    recorder.meta.update({"mlflow_run_id": tracker.run_id if tracker else None,
                          "mlflow_tracking_uri": tracker.tracking_uri if tracker else None,
                          "mlflow_experiment_id": tracker.experiment_id if tracker else None,
                          "prefect_flow_run_id": prefect_flow_run_id()})
    if tracker is not None:
        run.note_mlflow(tracker.run_id)
    recorder.write()
    ACTIVE[id(recorder)] = recorder
    return run


def prefect_flow_run_id() -> str:
    """The id of the Prefect flow run this code runs in ('' outside a flow)."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # noqa: BLE001  (outside a flow)
        return ""


def make_tracker(params: BaseModel, kind: str, run_name: str, extra_params: dict | None = None,
                 parent: Tracker | None = None, tags: dict[str, str] | None = None) -> Tracker | None:
    """An MLflow run (None when ``run.mlflow`` is off): a parent run, or a child of ``parent``."""
    if not params.run.mlflow:
        return None
    all_params = {**flatten_params(params), **(extra_params or {})}
    if parent is not None:
        return parent.nested(run_name, all_params, {"d2.kind": kind, **(tags or {})})
    base_tags = {"git_commit": git_commit(), "params_hash": params_hash(params),
                 "prefect_flow_run_id": prefect_flow_run_id(),
                 "d2.kind": kind, **(tags or {})}
    return Tracker(params.run.mlflow_experiment, run_name, all_params, base_tags)


MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}  # any other end: FAILED


def finish(run: Run, status: str, error: str | None = None, t0: float | None = None) -> None:
    """Close a run: wall seconds, manifest status, then MLflow: its run, and every object run it
    opened that is still RUNNING (cut short), KILLED when interrupted, FAILED when failed."""
    if t0 is not None:
        run.recorder.meta["flow_wall_seconds"] = round(time.perf_counter() - t0, 4)
    run.recorder.finish(status, error)
    ACTIVE.pop(id(run.recorder), None)
    if run.tracker is not None:
        mlflow_status = MLFLOW_STATUS.get(status, "FAILED")
        try:
            run.tracker.finish(mlflow_status)
            if status != "completed":
                close_open_runs(run.recorder.meta.get("mlflow_runs", []), mlflow_status, error or status,
                                run.tracker.client)
        except Exception:  # noqa: BLE001  (the manifest already says how the run ended)
            pass


def abandon_runs(reason: str) -> list[str]:
    """Mark every run of this process still ``running`` as ``interrupted`` in its manifest file, at
    once and without the recorders' locks (a second Ctrl-C may land while one is held); returns
    their MLflow run ids (for :func:`kill_mlflow_runs`)."""
    ids: list[str] = []
    for recorder in list(ACTIVE.values()):
        path = recorder.run_dir / "manifest.json"
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        ids += [i for i in m.get("mlflow_runs", []) + list(recorder.meta.get("mlflow_runs", [])) if i not in ids]
        if m.get("status") == "running":
            m.update(status="interrupted", error=reason)
            write_json(path, m)
    ACTIVE.clear()
    return ids


def kill_mlflow_runs(run_ids: list[str], reason: str) -> None:
    """End the MLflow runs among ``run_ids`` still RUNNING as KILLED."""
    close_open_runs(run_ids, "KILLED", reason)


def interrupt_reason(e: BaseException) -> str | None:
    """'interrupted by SIGINT' when ``e`` is how a signal stops a run (Ctrl-C, SIGTERM: a
    ``KeyboardInterrupt`` or Prefect's ``TerminationSignal``), else None."""
    signal_name = INTERRUPTED[0] if INTERRUPTED else ""
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted by {str(e) or signal_name or 'Ctrl-C'}"
    if type(e).__name__ == "TerminationSignal":  # Prefect's SIGTERM bridge inside a flow run
        sig = getattr(e, "signal", None)
        return f"interrupted by {getattr(sig, 'name', None) or signal_name or 'SIGTERM'}"
    return None


@contextlib.contextmanager
def closing(run: Run, children: dict[str, Run] | None = None) -> Iterator[None]:
    """Finish ``run`` as completed, interrupted (Ctrl-C, SIGTERM) or failed (with the error) however the
    block ends; ``children`` (a sweep's points, filled in the block) that are still running end
    the same way when the block does not complete."""
    t0 = time.perf_counter()

    def end(status: str, error: str) -> None:
        for child in (children or {}).values():
            if child.recorder.status == "running":
                finish(child, status, error)
        finish(run, status, error, t0)

    try:
        yield
    except BaseException as e:
        reason = interrupt_reason(e)
        if reason is None and INTERRUPTED:  # an error the interrupt caused (a library cut short)
            reason = f"interrupted by {INTERRUPTED[0]}"
        if reason is not None:
            end("interrupted", reason)
        else:
            end("failed", f"{type(e).__name__}: {e}")
        raise
    finish(run, "completed", None, t0)


# ---------------------------------------------------------------------------------------
# The driver


@dataclass
class Job:
    """One object's graph in one run."""

    run: Run
    obj: str
    graph: Graph
    input_path: str = ""
    results: dict[str, StageResult] = field(default_factory=dict)
    error: str | None = None
    mlflow_run_id: str | None = None


def drive(jobs: list[Job], max_parallel: int, api_alive: Any = None) -> None:
    """Advance every job's graph to its end, at most ``max_parallel`` stage tasks in flight.

    A failed stage ends its job (recorded; the other jobs go on). Ctrl-C stops waiting at
    once (the jobs' runs are finished by their :func:`closing`). ``api_alive()`` (optional)
    is polled; when it returns an error message the run stops with it.
    """
    done: queue.Queue = queue.Queue()
    ready: list[tuple[Job, Stage]] = []
    in_flight: dict[Any, tuple[Job, Stage, float]] = {}

    def advance(job: Job, value: str | None) -> None:
        try:
            stage = job.graph.send(value) if value is not None else next(job.graph)
        except StopIteration:
            end_job(job)
            return
        ready.append((job, stage))

    for job in jobs:
        start_job(job)
        advance(job, None)
    while ready or in_flight:
        while ready and len(in_flight) < max_parallel:
            job, stage = ready.pop(0)
            p = job.run.params
            job.run.recorder.started_stage(job.obj, stage.name)
            t = configured_task(stage.name, job.obj, p, job.run.label)
            spec = job.run.stages.specs[stage.name]
            device = str(get_param(p, spec.device_key)) if spec.device_key else None
            progress = job.run.progress_file(job.obj, stage.name)
            with contextlib.suppress(OSError):
                progress.unlink()
            with gpu_request(p) if wants_gpu(p, device) else contextlib.nullcontext():
                fut = t.submit(**task_arguments(job.run.stages, stage.name, job.obj, stage.inputs, p,
                                                job.run.cache_dir, progress))
            in_flight[fut] = (job, stage, time.perf_counter())
            fut.add_done_callback(done.put)
        if INTERRUPTED:
            raise KeyboardInterrupt(INTERRUPTED[0])
        try:
            fut = done.get(timeout=1.0)
        except queue.Empty:
            problem = api_alive() if api_alive is not None else None
            if problem:
                raise RuntimeError(problem)
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
            end_job(job)
            continue
        status = "cached" if fut.state.name == "Cached" else None
        for attempt in result.get("failed_attempts", []) if status is None else []:
            job.run.recorder.add_error(job.obj, stage.name, attempt)
        out_dir = job.run.run_dir / stage.dest if stage.dest else job.run.out_dir(job.obj, stage.name)
        store = store_dir(job.run.cache_dir, result)  # under this run's cache root (results name no path)
        place(store, out_dir, job.run.run_dir)
        rec = StageResult.from_task(result, job.obj, out_dir, time.perf_counter() - t_submit, status, store)
        job.results[stage.name] = rec
        job.run.recorder.add(rec)
        advance(job, str(store))


def start_job(job: Job) -> None:
    """Open the job's MLflow child run (an object of a benchmark / sweep point)."""
    run = job.run
    if run.tracker is None or job.obj.startswith("_"):
        return
    name = f"{run.label}/{job.obj}" if run.label else job.obj
    job.mlflow_run_id = run.tracker.child(name, params={**flatten_params(run.params), "object": job.obj,
                                                        "input": job.input_path},
                                          tags={"d2.object": job.obj, "d2.kind": "object"})
    run.note_mlflow(job.mlflow_run_id)


def end_job(job: Job) -> None:
    """Log the job's timings, metrics and artifacts to its MLflow child run and end it."""
    if job.mlflow_run_id is None:
        return
    tracker = job.run.tracker
    done = job.results
    metrics = {f"seconds.{s}": r.seconds for s, r in done.items()}
    metrics.update({f"compute_seconds.{s}": r.compute_seconds for s, r in done.items()})
    metrics.update({f"cached.{s}": float(r.status == "cached") for s, r in done.items()})
    if "metrics" in done:
        metrics.update(flat_numbers(done["metrics"].info.get("metrics", {})))
    if "fit" in done:  # how well the fit reproduces its own matrix, and how much motion it kept
        metrics.update(flat_numbers({k: done["fit"].info.get(k) for k in ("matrix_psnr", "train_psnr", "motion_matrix",
                                                                         "motion_fit", "num_gaussians")}, "fit."))
    files = []
    if "sampling" in done:
        files += [(done["sampling"].out_dir / n, "matrix") for n in ("grid.png", "grid.mp4")]
    if "fit" in done:
        files.append((done["fit"].out_dir / "turntable.mp4", "fit"))
    if "metrics" in done:
        files.append((done["metrics"].out_dir / "metrics.json", "metrics"))
    tracker.log_metrics(job.mlflow_run_id, metrics)
    tracker.log_curves(job.mlflow_run_id, stage_curves(done))
    tracker.log_artifacts(job.mlflow_run_id, files)
    tracker.end(job.mlflow_run_id, job.error is None)


def stage_curves(done: dict[str, StageResult]) -> dict[str, list[tuple[int, float]]]:
    """Per-iteration curves of a job: the fit's loss, PSNR and Gaussian count (``fit.json`` ``curve``),
    the sampler's noise level and latent spread per step (``matrix.json`` ``steps``)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for stage, file, rows, x, names in (("fit", "fit.json", "curve", "iteration", ("loss", "psnr", "num")),
                                        ("sampling", "matrix.json", "steps", "step", ("sigma", "x_std"))):
        if stage not in done:
            continue
        try:
            data = json.loads((done[stage].out_dir / file).read_text()).get(rows, [])
        except (OSError, ValueError):
            continue
        for name in names:
            curves[f"{stage}.curve.{name}"] = [(int(r[x]), float(r[name])) for r in data if name in r]
    return curves


def failures(jobs: list[Job]) -> list[str]:
    """``object: error`` of every failed job."""
    return [f"{j.obj}: {j.error}" for j in jobs if j.error is not None]


def prefect_api_check() -> Any:
    """A probe for :func:`drive`: an error message once the ephemeral Prefect server this process
    started has exited (None while it runs, or when an external ``PREFECT_API_URL`` is used)."""
    from d2.lifecycle import server_problem

    return server_problem
