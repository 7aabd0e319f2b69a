"""Scheduled benchmark runs (e.g. nightly) as a Prefect deployment.

``d2 schedule --cron "0 3 * * *" --out runs/nightly`` serves the ``scheduled-benchmark`` flow from
this process with the command line's validated params, or with ``--work-pool NAME`` registers it
for that pool's workers (``d2`` installed there). A scheduled run is
:func:`d2.flows.benchmark.run_benchmark` on ``run.runner`` into the same folder every time: with the
stage cache, a night without changes computes nothing; MLflow keeps one parent run per night.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import BaseModel

from d2.flows.benchmark import run_benchmark
from d2.flows.run import flow_params
from d2.validation import dataset_objects


@flow(name="scheduled-benchmark", log_prints=False)
def scheduled_benchmark(data_dir: str, out_dir: str, params: dict[str, Any], stages: Any = None) -> dict[str, Any]:
    """The benchmark flow on the task runner ``params`` name. A deployment runs this flow as it is
    defined here (``with_options`` does not travel with it), so the runner is chosen inside."""
    p, stages = flow_params(params, stages)
    return run_benchmark(data_dir, out_dir, p, stages)


def build_schedule(params: BaseModel, data_dir: str | Path, out_dir: str | Path, cron: str,
                   name: str = "nightly-benchmark", timezone: str | None = None,
                   work_pool: str | None = None) -> Any:
    """A Prefect deployment of the benchmark on ``cron`` (checked before anything is served), for
    ``work_pool`` when given."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    dataset_objects(data_dir, params.run.objects)  # the dataset must exist now, not at 3 a.m.
    return scheduled_benchmark.to_deployment(
        name=name, schedule=Cron(cron, timezone=timezone or "UTC"), work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"data_dir": str(Path(data_dir).resolve()), "out_dir": str(Path(out_dir).resolve()),
                    "params": params.model_dump(mode="json")},
        description=f"d2 benchmark of {data_dir} into {out_dir} on '{cron}'",
    )


def serve_schedule(deployment: Any) -> None:
    """Serve the deployment from this process (blocks; Ctrl-C stops), or, when it names a work
    pool, register it there (that pool's workers run it)."""
    from prefect import deploy, serve

    if deployment.work_pool_name:
        deploy(deployment, work_pool_name=deployment.work_pool_name, build=False, push=False,
               print_next_steps_message=False, ignore_warnings=True)
    else:
        serve(deployment)
