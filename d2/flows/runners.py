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
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel


class StageThreadRunner(ThreadPoolTaskRunner):
    """Prefect's thread-pool task runner that, when the flow ends with an error or Ctrl-C, does
    not wait for the stages still running in its threads (their results would be dropped anyway;
    an unfinished stage leaves no ``done.json``, so nothing half-written is ever a result).

    Prefect offers no public way to leave a task runner without waiting, so this uses its private
    ``_executor`` and ``_cancel_events``; it is the only place that does."""

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


RAY_TEMP_MAX = 44  # Ray puts unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store (107-byte limit)


def state_dir() -> Path:
    """The project's state folder (Prefect's home, ``.prefect/`` in the project): local clusters
    keep their scratch space there, not in the system temp folder."""
    from d2.env import project_root

    return Path(os.environ.get("PREFECT_HOME") or project_root() / ".prefect").resolve()


def dask_scratch() -> Path:
    """Scratch space of local Dask workers (spilled data, worker files)."""
    return state_dir() / "dask"


def ray_temp() -> Path | None:
    """Ray's temp folder (sessions, logs, spilled objects) for a local Ray instance: under the state
    folder, or None (Ray's default) when that path is too long for Ray's unix sockets."""
    folder = state_dir() / "ray"
    return folder if len(os.fsencode(str(folder))) <= RAY_TEMP_MAX else None


def quiet_dask() -> None:
    """Dask's INFO lines (scheduler and worker start and stop) off, its warnings kept; the
    environment variables reach worker processes, which configure logging when they start."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(dask_scratch()))
    for name in ("distributed", "dask"):
        if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)


def keep_scratch_in_project() -> None:
    """torch's compile cache (``torchinductor_<user>``, created when torch._dynamo is imported) in
    the project's state folder, not the system temp folder; inherited by worker processes."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state_dir() / "torchinductor"))


def with_runner(flow: Any, params: BaseModel) -> Any:
    """``flow`` on the task runner ``params.run`` asks for."""
    return flow.with_options(task_runner=task_runner(params))


def task_runner(params: BaseModel) -> Any:
    """The Prefect task runner ``params.run`` asks for."""
    run = params.run
    keep_scratch_in_project()
    if run.runner == "threads":
        return StageThreadRunner(max_workers=run.max_parallel)
    if run.runner == "dask":
        quiet_dask()
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:  # pragma: no cover  (a project dependency)
            raise RunnerUnavailable("run.runner=dask needs prefect-dask (pip install prefect-dask)") from e
        if run.address:
            return DaskTaskRunner(address=run.address)
        if run.gpus:
            return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=gpu_cluster_spec(run.gpus))
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs=local_cluster_kwargs(run.workers))
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:
        raise RunnerUnavailable("run.runner=ray needs Ray: pip install -e '.[ray]' (ray, prefect-ray)") from e
    if run.address:
        return RayTaskRunner(address=run.address)
    init = {"num_cpus": run.workers, "include_dashboard": False, "log_to_driver": False}
    temp = ray_temp()
    if temp is not None:
        temp.mkdir(parents=True, exist_ok=True)
        init["_temp_dir"] = str(temp)
    return RayTaskRunner(init_kwargs=init)


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``distributed.LocalCluster`` arguments: ``workers`` processes of one thread, no dashboard,
    scratch space in the project's state folder."""
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "local_directory": str(dask_scratch())}


def gpu_cluster_spec(gpus: list[int]) -> dict[str, Any]:
    """``distributed.SpecCluster`` arguments: one worker process per GPU, pinned with
    ``CUDA_VISIBLE_DEVICES`` and offering ``GPU=1``."""
    from distributed import Nanny, Scheduler

    workers = {f"gpu-{g}": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                                     "env": {"CUDA_VISIBLE_DEVICES": str(g)},
                                                     "local_directory": str(dask_scratch())}}
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
