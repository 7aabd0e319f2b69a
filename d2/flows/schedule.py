"""Scheduled benchmark runs (e.g. nightly) as a Prefect deployment served by this process.

``d2 schedule --cron "0 3 * * *" --out runs/nightly`` serves the ``benchmark`` flow with the
validated params of the command line; every scheduled run writes into the same folder, so
with the stage cache a night without code or params changes computes nothing, and MLflow
keeps one parent run per night. Point ``PREFECT_API_URL`` at a running ``prefect server
start`` to see the schedule and its runs in the Prefect UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from d2.flows.benchmark import benchmark_flow, list_objects


def build_schedule(params: BaseModel, data_dir: str | Path, out_dir: str | Path, cron: str,
                   name: str = "nightly-benchmark", timezone: str | None = None) -> Any:
    """A Prefect deployment of the benchmark flow on ``cron`` (checked before anything is served)."""
    list_objects(data_dir, params.run.objects)  # the dataset must exist now, not at 3 a.m.
    from prefect.schedules import Cron

    return benchmark_flow.to_deployment(
        name=name, schedule=Cron(cron, timezone=timezone or "UTC"),
        parameters={"data_dir": str(Path(data_dir).resolve()), "out_dir": str(Path(out_dir).resolve()),
                    "params": params.model_dump(mode="json")},
        description=f"d2 benchmark of {data_dir} into {out_dir} on '{cron}'",
    )


def serve_schedule(deployment: Any) -> None:
    """Serve the deployment (blocks; Ctrl-C stops)."""
    from prefect import serve

    serve(deployment)
