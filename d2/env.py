"""The process environment for Prefect and MLflow, set by entry points (``d2`` commands,
``python -m d2.train.priors``, bench scripts), never as a side effect of an import.

Everything lives in the project the user runs in (:func:`project_root`): Prefect's home and
result storage under ``.prefect/``, MLflow's SQLite store ``mlflow.db`` and artifacts under
``mlruns/``. Values already in the environment win.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_MARKERS = ("params.yaml", "dvc.yaml", ".git")  # a folder holding one of these is a project


def project_root() -> Path:
    """Where the user runs: ``D2_PROJECT_ROOT``, else the nearest folder at or above the working
    directory holding ``params.yaml``, ``dvc.yaml`` or ``.git``, else the working directory.

    Never the installed package's location: a venv shared by two checkouts writes into
    the checkout it is run from.
    """
    env = os.environ.get("D2_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if any((folder / m).exists() for m in PROJECT_MARKERS):
            return folder
    return cwd


def setup_env() -> Path:
    """Set Prefect / MLflow environment defaults (idempotent; before Prefect is imported).
    Returns the project root."""
    root = project_root()
    prefect_home = Path(os.environ.setdefault("PREFECT_HOME", str(root / ".prefect")))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(prefect_home / "storage"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # a local API that stops answering is gone, not busy: fail in seconds, not after minutes of retries
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO lines (a new store's tables) in a run's output
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    os.environ.setdefault("D2_MLFLOW_ARTIFACTS", str(root / "mlruns"))
    return root
