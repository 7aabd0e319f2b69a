"""The Prefect task that runs one stage of one object, cached by Prefect.

The task is a pure function of serializable arguments: the stage set (pickled by reference),
the stage's name, the object's name, input paths, the validated params as a dict and the
cache root. It returns a small JSON dict (stage, key, status, file list, timings, the stage's
info; no path: the caller finds the files at ``<its cache root>/<stage>/<key>/out``) and
touches nothing outside the cache; the flow that called it records the manifest, MLflow and
the run folder's copy. So it runs the same in a thread, in another process or on another
machine that sees the cache, wherever that machine mounts it.

Caching is Prefect's (:class:`StageCachePolicy`); the stage cache of :mod:`d2.tasks.cache`
holds the files and verifies them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.filesystems import WritableFileSystem

from d2.tasks import cache
from d2.tasks.cache import FlockLockManager, execute_stage, stage_inputs, stage_key, verify_entry
from d2.tasks.stages import StageSet

log = logging.getLogger("d2.cache")

RECORDS = ".records"  # Prefect result records (the tasks' JSON results) under the cache root
LOCKS = ".locks"  # one flock file per key under the cache root


def _resolve(stages: StageSet, stage: str, inputs: dict[str, str], params: dict[str, Any]) -> tuple[Any, Any, str]:
    p = stages.params_model.model_validate(params)
    spec = stages.specs[stage]
    key, _ = stage_key(spec, stage_inputs(spec, inputs, p), p)
    return spec, p, key


class CacheRecords(WritableFileSystem):
    """Prefect's result storage for the stage tasks' records: ``<cache>/.records/<Prefect key>``.

    The records name no path: Prefect stores a record under the storage key its storage
    resolves, and this storage resolves none (``_resolve_path`` returns ``None``, which Prefect
    takes as "keep the bare key"), so a record's metadata holds ``<stage>-<key>`` and its
    result (:func:`d2.tasks.cache.result_from_record`) holds no path either. The cache can be
    copied, moved or mounted anywhere: records are read from the root the run uses.
    """

    _block_type_name = "d2 cache records"
    basepath: str  # the records folder of the cache root this run uses

    def _resolve_path(self, path: str) -> None:
        return None  # Prefect keeps the bare key (no absolute path goes into a record)

    def _file(self, path: str) -> Path:
        rel = Path(path)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"record key {path!r} is not a plain name under {self.basepath}")
        return Path(self.basepath) / rel

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        """The record stored under key ``path`` (``ValueError`` when there is none: a miss)."""
        f = self._file(path)
        if not f.is_file():
            raise ValueError(f"no record {f}")
        return f.read_bytes()

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        """Store a record under key ``path`` (atomically: a reader never sees half a record)."""
        from d2.utils.io import atomic_path

        f = self._file(path)
        with atomic_path(f) as tmp:
            tmp.write_bytes(content)
        return path

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self.write_path(path, content)


@dataclass
class StageCachePolicy(CachePolicy):
    """Prefect cache key of a stage task: ``<stage>-<content key>`` (:func:`d2.tasks.cache.stage_key`).

    Before Prefect looks the key up, the entry on disk is verified; when it is not a valid
    result, Prefect's record of it is dropped, so Prefect runs the task again (which
    recomputes) instead of serving a result whose files are gone or changed.
    """

    cache_dir: str = ""  # absolute cache root of this run (never stored in the cache)

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        spec, p, key = _resolve(inputs["stages"], inputs["stage"], inputs["inputs"], inputs["params"])
        prefect_key = f"{spec.name}-{key}"
        entry = Path(self.cache_dir) / spec.name / key
        record, reason = verify_entry(entry, full=p.run.verify_cache == "full")
        if record is None:
            stale = Path(self.cache_dir) / RECORDS / prefect_key
            if stale.exists():
                log.warning("cache miss for %s[%s]: %s; recomputing", spec.name, inputs["obj"], reason)
                try:
                    stale.unlink()
                except OSError:
                    pass  # a read-only cache: the task body reports it
        return prefect_key


def _run_stage(stages: StageSet, stage: str, obj: str, inputs: dict[str, str], params: dict[str, Any],
               cache_dir: str, progress_path: str | None = None) -> dict[str, Any]:
    """Serve or compute one stage of one object in the cache (the key's lock is held by Prefect);
    a computing stage writes its progress to ``progress_path`` (not part of the key)."""
    spec, p, _ = _resolve(stages, stage, inputs, params)
    return execute_stage(spec, obj, inputs, p, Path(cache_dir), use_cache=p.run.use_cache,
                         verify_full=p.run.verify_cache == "full",
                         progress_path=Path(progress_path) if progress_path else None)


stage_task = task(_run_stage, name="stage", persist_result=True, result_serializer="json", log_prints=False)


def configured_task(stage: str, obj: str, cache_dir: Path, params: Any, label: str = "") -> Any:
    """The stage task with its cache (records, locks, SERIALIZABLE isolation), retries and run name.

    A read-only cache has no Prefect records or locks written: the task itself serves verified
    hits and names the cache when a result is missing.
    """
    cache_dir = Path(cache_dir)
    name = f"{stage}[{label + '/' if label else ''}{obj}]"
    if not cache.cache_writable(cache_dir):
        return stage_task.with_options(name=stage, task_run_name=name, cache_policy=NO_CACHE, persist_result=False)
    policy = StageCachePolicy(cache_dir=str(cache_dir), isolation_level="SERIALIZABLE",
                              lock_manager=FlockLockManager(cache_dir / LOCKS))
    t = stage_task.with_options(
        name=stage, task_run_name=name, cache_policy=policy, result_storage=cache_dir / RECORDS,
        refresh_cache=not params.run.use_cache, retries=params.run.retries,
        retry_delay_seconds=params.run.retry_delay_s)
    # Prefect asks for a server-side saved block here (a path becomes a LocalFileSystem, whose
    # records name their absolute path). The records storage travels with the task instead (it
    # pickles with it to other processes and machines), so no Prefect server has to know it.
    t.result_storage = CacheRecords(basepath=str(cache_dir / RECORDS))
    return t


def task_arguments(stages: StageSet, stage: str, obj: str, inputs: dict[str, str | os.PathLike], params: Any,
                   cache_dir: Path, progress_path: Path | None = None) -> dict[str, Any]:
    """The task's keyword arguments: everything serializable (paths as strings, params as a dict)."""
    return {"stages": stages, "stage": stage, "obj": obj, "inputs": {k: str(v) for k, v in inputs.items()},
            "params": params.model_dump(mode="json"), "cache_dir": str(cache_dir),
            "progress_path": str(progress_path) if progress_path else None}
