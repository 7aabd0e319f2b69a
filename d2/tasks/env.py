"""Process environment for Prefect and MLflow, set before either is imported.

Everything lives inside the project (or the working directory when d2 is not an editable
checkout): Prefect's home and result storage under ``.prefect/``, MLflow's SQLite store
``mlflow.db`` and artifacts under ``mlruns/``. Values already in the environment win.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The checkout d2 runs from (the folder holding pyproject.toml), else the working directory."""
    env = os.environ.get("D2_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").exists() and (here / "d2").is_dir():
        return here
    return Path.cwd().resolve()


def setup_env() -> Path:
    """Set Prefect / MLflow environment defaults (idempotent). Returns the project root."""
    root = project_root()
    prefect_home = Path(os.environ.setdefault("PREFECT_HOME", str(root / ".prefect")))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(prefect_home / "storage"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    os.environ.setdefault("D2_MLFLOW_ARTIFACTS", str(root / "mlruns"))
    return root


ROOT = setup_env()
