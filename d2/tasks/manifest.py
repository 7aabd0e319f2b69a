"""The run manifest: for every object and stage, computed or cached, seconds, key, outputs.

A :class:`Recorder` collects :class:`~d2.tasks.cache.StageResult`s from any thread and
writes ``DIR/manifest.json`` atomically (after every stage, so a crashed run still tells
what it did). Listeners (the progress display) hear about every stage start and end.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from d2.tasks.cache import StageResult
from d2.utils.io import write_json


class Listener(Protocol):
    """Gets told about stage starts and ends (e.g. a progress display)."""

    def stage_started(self, obj: str, stage: str) -> None: ...

    def stage_finished(self, result: StageResult) -> None: ...


class Recorder:
    """Thread-safe collector of stage results for one run folder."""

    def __init__(self, run_dir: str | Path, kind: str, meta: dict[str, Any] | None = None,
                 listeners: list[Listener] | None = None, forward_to: "Recorder | None" = None,
                 prefix: str = "") -> None:
        self.forward_to = forward_to  # a parent recorder (a sweep's) that also gets every result
        self.prefix = prefix  # prepended to object names in the parent ('p00/')
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.meta: dict[str, Any] = dict(meta or {})
        self.listeners: list[Listener] = list(listeners or [])
        self.results: list[StageResult] = []
        self.errors: list[dict[str, str]] = []
        self.status = "running"
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self.started = time.time()

    def started_stage(self, obj: str, stage: str) -> None:
        """Tell the listeners a stage began."""
        for lst in self.listeners:
            lst.stage_started(obj, stage)
        if self.forward_to is not None:
            self.forward_to.started_stage(self.prefix + obj, stage)

    def add(self, result: StageResult) -> None:
        """Record one stage execution and rewrite the manifest."""
        with self._lock:
            self.results.append(result)
        for lst in self.listeners:
            lst.stage_finished(result)
        self.write()
        if self.forward_to is not None:
            self.forward_to.add(dataclasses.replace(result, object=self.prefix + result.object))

    def add_error(self, obj: str, stage: str, error: BaseException) -> None:
        """Record a failed stage."""
        with self._lock:
            self.errors.append({"object": obj, "stage": stage, "error": f"{type(error).__name__}: {error}"})
        self.write()
        if self.forward_to is not None:
            self.forward_to.add_error(self.prefix + obj, stage, error)

    def counts(self, stage: str | None = None) -> dict[str, int]:
        """{'computed': n, 'cached': m} over all results (of one stage when given)."""
        out = {"computed": 0, "cached": 0}
        with self._lock:
            for r in self.results:
                if stage is None or r.stage == stage:
                    out[r.status] += 1
        return out

    def compute_seconds(self) -> float:
        """Sum of the wall seconds the stages of this run spent in their executions."""
        with self._lock:
            return sum(r.seconds for r in self.results)

    def to_json(self) -> dict[str, Any]:
        """The manifest document."""
        with self._lock:
            results = list(self.results)
            errors = list(self.errors)
        objects: dict[str, dict[str, Any]] = {}
        for r in results:
            objects.setdefault(r.object, {})[r.stage] = r.to_json()
        totals = {"computed": sum(r.status == "computed" for r in results),
                  "cached": sum(r.status == "cached" for r in results),
                  "stage_seconds": round(sum(r.seconds for r in results), 4)}
        return {"kind": self.kind, "status": self.status, "started": self.started,
                "wall_seconds": round(time.perf_counter() - self._t0, 4), "totals": totals,
                **self.meta, "objects": objects, "stages": [r.to_json() for r in results], "errors": errors}

    def write(self) -> Path:
        """Write ``run_dir/manifest.json`` atomically."""
        path = self.run_dir / "manifest.json"
        write_json(path, self.to_json())
        return path

    def finish(self, status: str) -> Path:
        """Set the final status ('completed' / 'failed') and write the manifest."""
        self.status = status
        return self.write()

