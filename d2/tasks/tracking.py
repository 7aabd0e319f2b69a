"""MLflow tracking with explicit run ids (the fluent API is thread-local; tasks run in threads).

A parent run per benchmark or sweep, a child run per object (per point for sweeps) with
params, metrics, per-stage seconds, the matrix grid image, the turntable video and tags
(git commit, params hash, Prefect flow-run id). The store is ``MLFLOW_TRACKING_URI``
(default: ``sqlite:///<project>/mlflow.db``, set by :func:`d2.env.setup_env`); artifacts of the
experiment go to ``D2_MLFLOW_ARTIFACTS`` (default ``<project>/mlruns``), set explicitly
when the experiment is created.
"""

from __future__ import annotations

import math
import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterable

from d2.env import project_root

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
    if isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    elif isinstance(obj, (int, float)):
        if math.isfinite(float(obj)):
            out[prefix.rstrip(".")] = float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_numbers(v, f"{prefix}{i}."))
    return out


def _clean_key(key: str) -> str:
    return "".join(c if (c.isalnum() or c in "_-./ ") else "_" for c in key)[:250]


class Tracker:
    """A parent MLflow run and its children, all addressed by explicit run ids."""

    def __init__(self, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
                 parent: "Tracker | None" = None) -> None:
        from mlflow.tracking import MlflowClient

        self.client = parent.client if parent is not None else MlflowClient()
        self.tracking_uri = self.client.tracking_uri
        self._lock = threading.Lock()
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = Path(os.environ.get("D2_MLFLOW_ARTIFACTS", project_root() / "mlruns")) / experiment
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location.as_uri())
            except Exception:  # noqa: BLE001  (created meanwhile by another process)
                exp = self.client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        if parent is not None:
            tags = {**tags, "mlflow.parentRunId": parent.run_id}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.log_params(self.run_id, params)
        self.tags = tags

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params (stringified, long values cut) in one batch."""
        from mlflow.entities import Param

        items = [Param(_clean_key(k), str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i: i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        """Log finite metrics in batches."""
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        items = [Metric(_clean_key(k), float(v), ts, 0) for k, v in metrics.items() if math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i: i + 500])

    def log_curves(self, run_id: str, curves: dict[str, list[tuple[int, float]]]) -> None:
        """Log metric histories: ``name -> [(step, value), ...]`` (MLflow plots them against the step)."""
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        items = [Metric(_clean_key(k), float(v), ts, int(step)) for k, pts in curves.items() for step, v in pts
                 if math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i: i + 500])

    def child(self, name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str:
        """Start a child run of the parent; returns its run id."""
        all_tags = {**self.tags, **(tags or {}), "mlflow.parentRunId": self.run_id}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_artifacts(self, run_id: str, files: Iterable[tuple[Path, str]]) -> None:
        """Upload ``(file, artifact folder)`` pairs that exist."""
        for path, folder in files:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path), artifact_path=folder)

    def nested(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> "Tracker":
        """A child run of this one, as a Tracker whose own children nest under it."""
        exp = self.client.get_experiment(self.experiment_id)
        return Tracker(exp.name, run_name, params, {**self.tags, **tags}, parent=self)

    def end(self, run_id: str, ok: bool | str) -> None:
        """End a run FINISHED (``True``), FAILED (``False``) or with an MLflow status (``'KILLED'``)."""
        status = ok if isinstance(ok, str) else ("FINISHED" if ok else "FAILED")
        self.client.set_terminated(run_id, status=status)

    def finish(self, ok: bool | str) -> None:
        """End the parent run."""
        self.end(self.run_id, ok)


def close_open_runs(run_ids: Iterable[str], status: str, reason: str, client: Any = None) -> list[str]:
    """End the MLflow runs among ``run_ids`` that are still RUNNING with ``status`` (``KILLED``: the
    run was interrupted; ``FAILED``: it failed, or its process died), tagged ``d2.failure`` with
    ``reason``. Returns the ids it ended; no-op when MLflow cannot be reached."""
    ended = []
    try:
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
        for rid in dict.fromkeys(run_ids):
            try:
                if client.get_run(rid).info.status == "RUNNING":
                    client.set_tag(rid, "d2.failure", str(reason)[:5000])
                    client.set_terminated(rid, status=status)
                    ended.append(rid)
            except Exception:  # noqa: BLE001  (a run deleted meanwhile)
                continue
    except Exception:  # noqa: BLE001  (tracking must never block a run from ending or starting)
        pass
    return ended


def fail_stale_runs(run_ids: Iterable[str], reason: str) -> list[str]:
    """Mark the MLflow runs among ``run_ids`` that are still RUNNING as FAILED (their process died).
    Returns the ids it marked; no-op when MLflow cannot be reached."""
    return close_open_runs(run_ids, "FAILED", reason)
