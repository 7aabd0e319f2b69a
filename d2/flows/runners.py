"""Where stage tasks run (``run.runner``): this process's threads, a Dask cluster or a Ray cluster.

Stage tasks are self-contained (:mod:`d2.tasks.stage_task`), so any Prefect task runner can run
them; the flow's driver stays in the calling process and records everything.

* ``threads`` (default): :class:`StageThreadRunner`, ``run.max_parallel`` threads.
* ``dask``: prefect-dask's ``DaskTaskRunner`` on ``run.address`` (any scheduler: a
  ``dask-jobqueue`` SLURM cluster, a ``dask-kubernetes`` one, ``dask scheduler`` + ``dask worker``),
  or, without an address, a local cluster of ``run.workers`` worker processes (one thread each)
  started and closed with the flow. With ``run.gpus`` the local cluster has one worker per listed
  GPU, each seeing only its GPU (``CUDA_VISIBLE_DEVICES``) and offering the resource ``GPU=1``.
* ``ray``: prefect-ray's ``RayTaskRunner`` on ``run.address``, or a local Ray instance.

With ``run.gpu_tasks`` (on with ``run.gpus``), a stage whose device is ``cuda`` asks its runner
for one GPU (Dask resource ``GPU=1``, Ray ``num_gpus=1``), so each runs on a GPU of its own and
``cuda`` means the one it was given. Long-lived workers keep loaded priors between tasks
(:func:`d2.tasks.stages.get_priors` memoizes per process).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel


class StageThreadRunner(ThreadPoolTaskRunner):
    """Prefect's thread-pool task runner that, when the flow ends with an error or Ctrl-C, does
    not wait for the stages still running in its threads (their results would be dropped anyway;
    an unfinished stage leaves no ``done.json``, so nothing half-written is ever a result)."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None or self._executor is None:
            return super().__exit__(exc_type, exc_value, traceback)
        for event in self._cancel_events.values():
            event.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        TaskRunner.__exit__(self, exc_type, exc_value, traceback)


class RunnerUnavailable(RuntimeError):
    """The configured runner's package is not installed."""


def task_runner(params: BaseModel) -> Any:
    """The Prefect task runner ``params.run`` asks for."""
    run = params.run
    if run.runner == "threads":
        return StageThreadRunner(max_workers=run.max_parallel)
    if run.runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:  # pragma: no cover  (a project dependency)
            raise RunnerUnavailable("run.runner=dask needs prefect-dask (pip install prefect-dask)") from e
        if run.address:
            return DaskTaskRunner(address=run.address)
        if run.gpus:
            return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=gpu_cluster_spec(run.gpus))
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": run.workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:
        raise RunnerUnavailable("run.runner=ray needs Ray: pip install -e '.[ray]' (ray, prefect-ray)") from e
    if run.address:
        return RayTaskRunner(address=run.address)
    return RayTaskRunner(init_kwargs={"num_cpus": run.workers, "include_dashboard": False,
                                      "log_to_driver": False})


def gpu_cluster_spec(gpus: list[int]) -> dict[str, Any]:
    """``distributed.SpecCluster`` arguments: one worker process per GPU, pinned with
    ``CUDA_VISIBLE_DEVICES`` and offering ``GPU=1``."""
    from distributed import Nanny, Scheduler

    workers = {f"gpu-{g}": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                                     "env": {"CUDA_VISIBLE_DEVICES": str(g)}}}
               for g in gpus}
    return {"scheduler": {"cls": Scheduler, "options": {"dashboard_address": None}}, "workers": workers}


def wants_gpu(params: BaseModel, device: str | None) -> bool:
    """Whether a stage on ``device`` asks the runner for a GPU."""
    run = params.run
    return bool(device and device.startswith("cuda") and (run.gpu_tasks or run.gpus) and run.runner != "threads")


@contextlib.contextmanager
def gpu_request(params: BaseModel) -> Iterator[None]:
    """Submit the tasks inside with a request for one GPU on the configured runner."""
    if params.run.runner == "dask":
        import dask

        with dask.annotate(resources={"GPU": 1}):
            yield
    elif params.run.runner == "ray":
        from prefect_ray.context import remote_options

        with remote_options(num_gpus=1):
            yield
    else:
        yield
