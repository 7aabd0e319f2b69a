"""One run folder (an asset, a benchmark, a sweep and its points) and what records into it.

:func:`run_scope` is the scaffold every flow runs in: it locks the folder for the run (a second
run into the same folder is refused at once), fails the records of a run that died there
(``kill -9``), opens the MLflow run, writes ``params.json`` and the manifest, ends them all as
completed, interrupted or failed however the run ends, and writes the run's HTML report.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from d2.config import flatten_params
from d2.lifecycle import Interrupts, interrupted
from d2.reports.html import track_report, write_run_report
from d2.execution.manifest import LISTENERS, Recorder
from d2.execution.stages import STAGES, StageSet
from d2.execution.tracking import Tracker, close_open_runs, make_tracker, prefect_flow_run_id
from d2.utils.io import write_json
from d2.utils.paths import RunFolderLocked, adopt_run_folder_lock, inside, lock_run_folder, safe_name

# The recorders of the runs in progress in this process: what a second Ctrl-C marks on its way out.
ACTIVE: dict[int, Recorder] = {}


class RunFolderBusy(RuntimeError):
    """Another live run is writing into the run folder."""


@dataclass
class Run:
    """One run folder and what records into it."""

    run_dir: Path  # absolute
    params: BaseModel  # validated
    stages: StageSet
    recorder: Recorder
    tracker: Tracker | None = None  # its MLflow run (children: one per object, or per sweep point)
    label: str = ""  # sweep point id ('' otherwise)
    points: list["Run"] = field(default_factory=list)  # a sweep's points
    report: str | None = None  # the HTML report, once written
    report_seconds: float = 0.0  # what writing it took

    @property
    def cache_dir(self) -> Path:
        # absolute, symlinks kept: the cache is used through the path this run was given
        return Path(os.path.abspath(self.params.run.cache_dir))

    def out_dir(self, obj: str, stage: str) -> Path:
        """Where the run keeps its copy of ``stage``'s outputs for ``obj``."""
        return self.run_dir / "objects" / safe_name(obj) / stage

    def progress_file(self, obj: str, stage: str) -> Path:
        """Where the task computing ``stage`` of ``obj`` reports its progress (hidden, in the run folder)."""
        folder = self.run_dir if obj.startswith("_") else self.run_dir / "objects" / safe_name(obj)
        return folder / f".{stage}.progress.json"

    def note_mlflow(self, run_id: str) -> None:
        """Remember an MLflow run id in the manifest (a dead run's runs are failed by the next one)."""
        for recorder in (self.recorder, self.recorder.forward_to):
            if recorder is not None:
                recorder.meta.setdefault("mlflow_runs", []).append(run_id)

    def object_run(self, obj: str, input_path: str) -> str | None:
        """Open the MLflow child run of object ``obj`` (None without MLflow, or for the run's own stages)."""
        if self.tracker is None or obj.startswith("_"):
            return None
        run_id = self.tracker.child(f"{self.label}/{obj}" if self.label else obj,
                                    params={**flatten_params(self.params), "object": obj, "input": input_path},
                                    tags={"d2.object": obj, "d2.kind": "object"})
        self.note_mlflow(run_id)
        return run_id

    def point(self, label: str, params: BaseModel, meta: dict[str, Any]) -> "Run":
        """A sweep point: ``points/<label>``, its manifest forwarding to this run's, its MLflow run a child."""
        tracker = make_tracker(params, "point", f"{self.run_dir.name}/{label}", parent=self.tracker,
                               tags={"d2.point": label}) if self.tracker else None
        run = new_run(self.run_dir / "points" / label, "benchmark", params, self.stages, meta, tracker, label, self)
        self.points.append(run)
        return run

    def result(self, **extra: Any) -> dict[str, Any]:
        """The flow's result: where the run is, its report and MLflow run, and ``extra``."""
        return {"run_dir": str(self.run_dir), "manifest": str(self.run_dir / "manifest.json"), "report": self.report,
                "report_seconds": self.report_seconds,
                "mlflow_run_id": self.tracker.run_id if self.tracker else None,
                "flow_wall_seconds": self.recorder.meta.get("flow_wall_seconds"), **extra}


def new_run(run_dir: Path, kind: str, params: BaseModel, stages: StageSet, meta: dict | None = None,
            tracker: Tracker | None = None, label: str = "", parent: Run | None = None) -> Run:
    """A :class:`Run` with its ``params.json`` written and its recorder started."""
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "params.json", params.model_dump(mode="json"))
    recorder = Recorder(run_dir, kind, meta, listeners=[] if parent is not None else list(LISTENERS),
                        forward_to=parent.recorder if parent else None, prefix=f"{label}/" if label else "")
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


def flow_params(params: dict[str, Any], stages: StageSet | None) -> tuple[BaseModel, StageSet]:
    """A flow's params validated against its stage set (default: the real stages), and torch's
    thread count set from them."""
    import torch

    stages = stages or STAGES
    p = stages.params_model.model_validate(params)
    torch.set_num_threads(p.run.threads_per_task)
    return p, stages


@contextlib.contextmanager
def run_scope(out_dir: str | Path, kind: str, params: BaseModel, stages: StageSet, meta: dict[str, Any],
              mlflow_name: str | None = None, mlflow_params: dict[str, Any] | None = None) -> Iterator[Run]:
    """The run of a flow in ``out_dir``: locked, recorded, tracked (MLflow run ``mlflow_name``, default
    ``<kind>/<folder name>``), finished however the block ends, then reported (``run.report``)."""
    with open_run_folder(Path(out_dir)) as run_dir:
        tracker = make_tracker(params, kind, mlflow_name or f"{kind}/{run_dir.name}", mlflow_params)
        run = new_run(run_dir, kind, params, stages, meta, tracker)
        t0 = time.perf_counter()
        try:
            yield run
        except BaseException as e:
            reason = interrupt_reason(e)
            status, error = ("interrupted", reason) if reason else ("failed", f"{type(e).__name__}: {e}")
            for point in run.points:
                if point.recorder.status == "running":
                    finish(point, status, error)
            finish(run, status, error, t0)
            raise
        finish(run, "completed", None, t0)
        t_report = time.perf_counter()
        run.report = write_run_report(run.run_dir)
        track_report(run.tracker, run.report)
        run.report_seconds = round(time.perf_counter() - t_report, 3)


def interrupt_reason(e: BaseException) -> str | None:
    """'interrupted by SIGINT' when ``e`` is how a signal stops a run (Ctrl-C, SIGTERM: a
    ``KeyboardInterrupt`` or Prefect's ``TerminationSignal``) or an error it caused (a library cut
    short), else None."""
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted by {str(e) or Interrupts.name or 'Ctrl-C'}"
    if type(e).__name__ == "TerminationSignal":  # Prefect's SIGTERM bridge inside a flow run
        return f"interrupted by {getattr(getattr(e, 'signal', None), 'name', None) or Interrupts.name or 'SIGTERM'}"
    return f"interrupted by {Interrupts.name}" if interrupted() else None


def finish(run: Run, status: str, error: str | None = None, t0: float | None = None) -> None:
    """Close a run: wall seconds, manifest status, then MLflow: its run, and every object run it
    opened that is still RUNNING (cut short), KILLED when interrupted, FAILED when failed."""
    if t0 is not None:
        run.recorder.meta["flow_wall_seconds"] = round(time.perf_counter() - t0, 4)
    run.recorder.finish(status, error)
    ACTIVE.pop(id(run.recorder), None)
    if run.tracker is not None:
        mlflow_status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        try:
            run.tracker.end(run.tracker.run_id, mlflow_status)
            if status != "completed":
                close_open_runs(run.recorder.meta.get("mlflow_runs", []), mlflow_status, error or status,
                                run.tracker.client)
        except Exception:  # noqa: BLE001  (the manifest already says how the run ended)
            pass


def abandon_runs(reason: str) -> list[str]:
    """Mark every run of this process still ``running`` as ``interrupted`` in its manifest file, at
    once and without the recorders' locks (a second Ctrl-C may land while one is held); returns
    their MLflow run ids (to end as KILLED with :func:`d2.execution.tracking.close_open_runs`)."""
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


@contextlib.contextmanager
def open_run_folder(run_dir: Path) -> Iterator[Path]:
    """Lock ``run_dir`` for one run (refused at once when another live run holds it). A manifest
    still 'running' in a folder whose lock we hold belongs to a dead process: it becomes 'failed'
    (a copy kept as ``manifest.dead.json``), and so do its MLflow runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = adopt_run_folder_lock(run_dir)  # taken by the command before Prefect started
    if fd is None:
        try:
            fd = lock_run_folder(run_dir)
        except RunFolderLocked as e:
            raise RunFolderBusy(str(e)) from None
    try:
        for path in [run_dir / "manifest.json", *sorted(run_dir.glob("points/*/manifest.json"))]:
            with contextlib.suppress(OSError, ValueError):
                m = json.loads(path.read_text())
                if m.get("status") == "running":
                    reason = (f"the process that ran it (pid {m.get('pid')} on {m.get('host')}) died before "
                              "finishing (killed, or the machine went down)")
                    m["status"] = "failed"
                    m.setdefault("errors", []).append({"object": "", "stage": "", "error": reason})
                    m["mlflow_marked_failed"] = close_open_runs(m.get("mlflow_runs", []), "FAILED", reason)
                    write_json(path.with_name("manifest.dead.json"), m)
                    write_json(path, m)
        yield run_dir
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def place(src: Path, dst: Path, run_dir: Path) -> None:
    """Make ``dst`` (inside ``run_dir``) a plain copy of the cache folder ``src``: edits in a run
    folder never reach the cache. What was at ``dst`` is replaced; nothing outside ``run_dir``
    is touched (a symlink at ``dst`` is removed, never followed)."""
    dst = inside(run_dir, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    remove(tmp)
    try:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*"))
    except BaseException:  # a full disk, Ctrl-C: no half copy is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove(dst)
    os.replace(tmp, dst)


def remove(path: Path) -> None:
    """Remove a file, a symlink (never followed) or a folder, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
