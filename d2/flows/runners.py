"""Where stage tasks run (``run.runner``): this process's threads, a Dask cluster or a Ray cluster.

Stage tasks are self-contained (:mod:`d2.execution.stage_task`), so any Prefect task runner runs them;
the flow's driver stays in the calling process and records everything. ``threads``: ``run.max_parallel``
threads. ``dask``: the scheduler at ``run.address`` (SLURM, Kubernetes, ``dask scheduler``), else a
local cluster of ``run.workers`` one-thread processes, or with ``run.gpus`` one worker per GPU, each
seeing only its GPU. ``ray``: the cluster at ``run.address``, else a local Ray instance. With
``run.gpu_tasks`` (on with ``run.gpus``) a ``cuda`` stage asks its runner for one GPU of its own.
The runner's package is checked by :func:`d2.preflight.check_runner`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel

RAY_TEMP_MAX = 44  # Ray puts unix sockets at <temp>/session_<date>_<pid>/sockets/plasma_store (107-byte limit)


class StageThreadRunner(ThreadPoolTaskRunner):
    """Prefect's thread-pool task runner that, when the flow ends with an error or Ctrl-C, does
    not wait for the stages still running in its threads (an unfinished stage leaves no
    ``done.json``, so nothing half-written is ever a result). Prefect offers no public way to
    leave a task runner without waiting: this uses its private ``_executor`` and ``_cancel_events``."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None or self._executor is None:
            return super().__exit__(exc_type, exc_value, traceback)
        for event in self._cancel_events.values():
            event.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        TaskRunner.__exit__(self, exc_type, exc_value, traceback)


def state_dir(name: str) -> Path:
    """``name`` in the project's state folder (Prefect's home, ``.prefect/``): local clusters and
    torch keep their scratch space there, not in the system temp folder."""
    from d2.env import project_root

    return Path(os.environ.get("PREFECT_HOME") or project_root() / ".prefect").resolve() / name


def ray_temp() -> Path | None:
    """A local Ray instance's temp folder: under the state folder, or None (Ray's default) when that
    path is too long for Ray's unix sockets."""
    folder = state_dir("ray")
    return folder if len(os.fsencode(str(folder))) <= RAY_TEMP_MAX else None


def quiet_dask() -> None:
    """Dask's INFO lines off, its warnings kept, its scratch space in the state folder (environment
    variables: worker processes read them when they start)."""
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(state_dir("dask")))
    for name in ("distributed", "dask"):
        if logging.getLogger(name).getEffectiveLevel() < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)


def with_runner(flow: Any, params: BaseModel) -> Any:
    """``flow`` on the task runner ``params.run`` asks for."""
    return flow.with_options(task_runner=task_runner(params))


def task_runner(params: BaseModel) -> Any:
    """The Prefect task runner ``params.run`` asks for."""
    run = params.run
    # torch's compile cache, created when torch._dynamo is imported; inherited by worker processes
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state_dir("torchinductor")))
    if run.runner == "threads":
        return StageThreadRunner(max_workers=run.max_parallel)
    if run.runner == "dask":
        from prefect_dask import DaskTaskRunner

        quiet_dask()
        if run.address:
            return DaskTaskRunner(address=run.address)
        if run.gpus:
            return DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=gpu_cluster_spec(run.gpus))
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs=local_cluster_kwargs(run.workers))
    from prefect_ray import RayTaskRunner

    if run.address:
        return RayTaskRunner(address=run.address)
    init = {"num_cpus": run.workers, "include_dashboard": False, "log_to_driver": False}
    if (temp := ray_temp()) is not None:
        temp.mkdir(parents=True, exist_ok=True)
        init["_temp_dir"] = str(temp)
    return RayTaskRunner(init_kwargs=init)


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``distributed.LocalCluster`` arguments: ``workers`` processes of one thread, no dashboard."""
    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
            "local_directory": str(state_dir("dask"))}


def gpu_cluster_spec(gpus: list[int]) -> dict[str, Any]:
    """``distributed.SpecCluster`` arguments: one worker process per GPU, pinned with
    ``CUDA_VISIBLE_DEVICES`` and offering the resource ``GPU=1``."""
    from distributed import Nanny, Scheduler

    options = {"nthreads": 1, "resources": {"GPU": 1}, "local_directory": str(state_dir("dask"))}
    workers = {f"gpu-{g}": {"cls": Nanny, "options": {**options, "env": {"CUDA_VISIBLE_DEVICES": str(g)}}}
               for g in gpus}
    return {"scheduler": {"cls": Scheduler, "options": {"dashboard_address": None}}, "workers": workers}


def wants_gpu(params: BaseModel, device: str | None) -> bool:
    """Whether a stage on ``device`` asks the runner for a GPU."""
    run = params.run
    return bool(device and device.startswith("cuda") and (run.gpu_tasks or run.gpus) and run.runner != "threads")


def gpu_request(params: BaseModel, device: str | None) -> Any:
    """A context in which tasks are submitted asking for one GPU (Dask resource ``GPU=1``, Ray
    ``num_gpus=1``) when a stage on ``device`` wants one (:func:`wants_gpu`)."""
    if not wants_gpu(params, device):
        return contextlib.nullcontext()
    if params.run.runner == "dask":
        import dask

        return dask.annotate(resources={"GPU": 1})
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=1)
