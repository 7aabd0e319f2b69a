"""MLflow tracking with explicit run ids (the fluent API is thread-local; tasks run in threads).

A parent run per benchmark or sweep, a child run per object (per point for sweeps) with
params, metrics, per-stage seconds, the matrix grid image, the turntable video and tags
(git commit, params hash, Prefect flow-run id). The store is ``MLFLOW_TRACKING_URI``
(default: ``sqlite:///<project>/mlflow.db``, set by :func:`d2.env.setup_env`); artifacts of the
experiment go to ``D2_MLFLOW_ARTIFACTS`` (default ``<project>/mlruns``), set explicitly
when the experiment is created.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel

from d2.config import flatten_params, params_hash
from d2.env import project_root
from d2.execution.manifest import StageResult

_MAX_PARAM_LEN = 6000


def git_commit() -> str:
    """HEAD of the project the user runs in (:func:`d2.env.project_root`), with '+dirty' when
    tracked files changed, or 'unknown'."""
    root = project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def flat_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested dict/list as ``{'a.b.0': x}``."""
    out: dict[str, float] = {}
    if isinstance(obj, (int, float)):  # bools too
        if math.isfinite(float(obj)):
            out[prefix.rstrip(".")] = float(obj)
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            out.update(flat_numbers(v, f"{prefix}{k}."))
    return out


def _clean_key(key: str) -> str:
    return "".join(c if (c.isalnum() or c in "_-./ ") else "_" for c in key)[:250]


def experiment_id(client: Any, name: str) -> str:
    """The id of MLflow experiment ``name``, created (artifacts under ``D2_MLFLOW_ARTIFACTS``) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(os.environ.get("D2_MLFLOW_ARTIFACTS", project_root() / "mlruns")) / name
    try:
        return client.create_experiment(name, artifact_location=location.as_uri())
    except Exception:  # noqa: BLE001  (created meanwhile by another process)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _start_run(client: Any, experiment: str, name: str, params: dict[str, Any] | None, tags: dict[str, str]) -> str:
    """Create a run with ``tags`` and log ``params`` (stringified, long values cut) in batches; its id."""
    from mlflow.entities import Param

    run_id = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    items = [Param(_clean_key(k), str(v)[:_MAX_PARAM_LEN]) for k, v in (params or {}).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i: i + 100])
    return run_id


@dataclass
class Tracker:
    """One MLflow run (a benchmark's, a sweep's or a sweep point's), addressed by its explicit id."""

    client: Any  # an MlflowClient
    experiment_id: str
    run_id: str
    tags: dict[str, str]  # its tags, which its children inherit

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def child(self, name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str:
        """Start a child run of this one; returns its run id."""
        return _start_run(self.client, self.experiment_id, name, params,
                          {**self.tags, **(tags or {}), "mlflow.parentRunId": self.run_id})

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Log the finite ones of ``metrics``."""
        self.log_curves(run_id, {k: [(0, v)] for k, v in metrics.items()})

    def log_curves(self, run_id: str, curves: dict[str, list[tuple[int, float]]]) -> None:
        """Log metric histories: ``name -> [(step, value), ...]`` (finite values, in batches)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(_clean_key(k), float(v), ts, int(step)) for k, pts in curves.items() for step, v in pts
                 if math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i: i + 500])

    def log_artifacts(self, run_id: str, files: Iterable[tuple[Path, str]]) -> None:
        """Upload ``(file, artifact folder)`` pairs that exist."""
        for path, folder in files:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path), artifact_path=folder)

    def end(self, run_id: str, ok: bool | str) -> None:
        """End a run FINISHED (``True``), FAILED (``False``) or with an MLflow status (``'KILLED'``)."""
        status = ok if isinstance(ok, str) else ("FINISHED" if ok else "FAILED")
        self.client.set_terminated(run_id, status=status)


def close_open_runs(run_ids: Iterable[str], status: str, reason: str, client: Any = None) -> list[str]:
    """End the MLflow runs among ``run_ids`` that are still RUNNING with ``status`` (``KILLED``: the
    run was interrupted; ``FAILED``: it failed, or its process died), tagged ``d2.failure`` with
    ``reason``. Returns the ids it ended; no-op when MLflow cannot be reached."""
    ended = []
    try:
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
    except Exception:  # noqa: BLE001  (tracking must never block a run from ending or starting)
        return ended
    for rid in dict.fromkeys(run_ids):
        with contextlib.suppress(Exception):  # a run deleted meanwhile, or MLflow out of reach
            if client.get_run(rid).info.status == "RUNNING":
                client.set_tag(rid, "d2.failure", str(reason)[:5000])
                client.set_terminated(rid, status=status)
                ended.append(rid)
    return ended


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
    tags = {"d2.kind": kind, **(tags or {})}
    if parent is not None:
        return Tracker(parent.client, parent.experiment_id, parent.child(run_name, all_params, tags),
                       {**parent.tags, **tags})
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = {"git_commit": git_commit(), "params_hash": params_hash(params), "prefect_flow_run_id": prefect_flow_run_id(),
            **tags}
    experiment = experiment_id(client, params.run.mlflow_experiment)
    return Tracker(client, experiment, _start_run(client, experiment, run_name, all_params, tags), tags)


FIT_NUMBERS = ("matrix_psnr", "train_psnr", "motion_matrix", "motion_fit", "num_gaussians")


def log_object(tracker: Tracker, run_id: str, done: dict[str, StageResult], ok: bool) -> None:
    """An object's MLflow run: per-stage seconds, its scores, the fit's numbers, the curves of the fit
    and the sampler, the matrix grid, the turntable video and the scores file; then ended."""
    metrics = {f"seconds.{s}": r.seconds for s, r in done.items()}
    metrics.update({f"compute_seconds.{s}": r.compute_seconds for s, r in done.items()})
    metrics.update({f"cached.{s}": float(r.status == "cached") for s, r in done.items()})
    files = []
    if "sampling" in done:
        files += [(done["sampling"].out_dir / n, "matrix") for n in ("grid.png", "grid.mp4")]
    if "fit" in done:  # how well the fit reproduces its own matrix, and how much motion it kept
        metrics.update(flat_numbers({k: done["fit"].info.get(k) for k in FIT_NUMBERS}, "fit."))
        files.append((done["fit"].out_dir / "turntable.mp4", "fit"))
    if "metrics" in done:
        metrics.update(flat_numbers(done["metrics"].info.get("metrics", {})))
        files += [(done["metrics"].out_dir / n, "metrics") for n in done["metrics"].outputs]  # its scores file
    tracker.log_metrics(run_id, metrics)
    tracker.log_curves(run_id, stage_curves(done))
    tracker.log_artifacts(run_id, files)
    tracker.end(run_id, ok)


def stage_curves(done: dict[str, StageResult]) -> dict[str, list[tuple[int, float]]]:
    """Per-iteration curves of an object: the fit's loss, PSNR and Gaussian count (``fit.json``
    ``curve``), the sampler's noise level and latent spread per step (``matrix.json`` ``steps``)."""
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
