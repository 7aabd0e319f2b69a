"""The Prefect task that runs one stage of one object in the stage cache.

A pure function of serializable arguments (the stage set, pickled by reference; names, input
paths, params as a dict, the cache root) that touches nothing outside the cache and returns
:func:`d2.execution.cache.run_stage`'s small JSON dict, so it runs the same in a thread, another
process or another machine that sees the cache. Prefect keeps no cache or result of its own: a
hit ends the task run in a ``Completed`` state named ``Cached``, as a Prefect cache hit shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from d2.execution.cache import run_stage
from d2.execution.stages import StageSet


def _run_stage(stages: StageSet, stage: str, obj: str, inputs: dict[str, str], params: dict[str, Any],
               cache_dir: str, progress_path: str | None = None) -> Any:
    """Serve or compute one stage of one object in the cache; a computing stage writes its
    progress to ``progress_path`` (not part of the key)."""
    p = stages.params_model.model_validate(params)
    result = run_stage(stages.specs[stage], obj, inputs, p, Path(cache_dir),
                       Path(progress_path) if progress_path else None)
    return Completed(name="Cached", data=result) if result["status"] == "cached" else result


stage_task = task(_run_stage, name="stage", cache_policy=NO_CACHE, persist_result=False, log_prints=False)


def stage_call(stages: StageSet, stage: str, obj: str, inputs: dict[str, str | os.PathLike], params: Any,
               cache_dir: Path, progress_path: Path | None = None, label: str = "") -> tuple[Any, dict[str, Any]]:
    """The stage task with its retries and run name (``stage[label/obj]``), and its keyword
    arguments: everything serializable (paths as strings, params as a dict)."""
    task = stage_task.with_options(name=stage, task_run_name=f"{stage}[{label + '/' if label else ''}{obj}]",
                                   retries=params.run.retries, retry_delay_seconds=params.run.retry_delay_s)
    return task, {"stages": stages, "stage": stage, "obj": obj, "inputs": {k: str(v) for k, v in inputs.items()},
                  "params": params.model_dump(mode="json"), "cache_dir": str(cache_dir),
                  "progress_path": str(progress_path) if progress_path else None}
