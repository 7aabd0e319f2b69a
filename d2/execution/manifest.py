"""The run manifest: for every object and stage, computed or cached, seconds, key, outputs.

A :class:`Recorder` collects :class:`StageResult`s from any thread and rewrites
``DIR/manifest.json`` after every stage (a crashed run still tells what it did). Its listeners
(the progress display) hear about every stage start, progress report and end.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2.utils.io import write_json


@dataclass
class StageResult:
    """One stage execution of one object, as recorded in the manifest."""

    stage: str
    object: str
    status: str  # "computed" or "cached"
    key: str
    seconds: float  # wall time from submission to result in this run (queueing included)
    compute_seconds: float  # seconds the computation took when it was computed
    store_dir: Path  # <cache>/<stage>/<key>/out (immutable input of downstream stages)
    out_dir: Path  # the run's copy
    outputs: list[str] = field(default_factory=list)  # files, relative to out_dir
    info: dict[str, Any] = field(default_factory=dict)  # what the stage returned

    @classmethod
    def from_task(cls, result: dict[str, Any], obj: str, out_dir: Path, seconds: float,
                  store_dir: Path) -> "StageResult":
        """From a stage task's JSON result and its entry's ``out/`` under the run's cache root (the
        result itself names no path)."""
        return cls(stage=result["stage"], object=obj, status=result["status"], key=result["key"], seconds=seconds,
                   compute_seconds=float(result["compute_seconds"]), store_dir=Path(store_dir), out_dir=out_dir,
                   outputs=list(result["outputs"]), info=dict(result.get("info", {})))

    def to_json(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 4),
                "compute_seconds": round(self.compute_seconds, 4),
                "out_dir": str(self.out_dir), "store_dir": str(self.store_dir)}


class Recorder:
    """Thread-safe collector of stage results for one run folder."""

    def __init__(self, run_dir: str | Path, kind: str, meta: dict[str, Any] | None = None,
                 listeners: list[Any] | None = None, forward_to: "Recorder | None" = None,
                 prefix: str = "") -> None:
        self.forward_to = forward_to  # a parent recorder (a sweep's) that also gets every result
        self.prefix = prefix  # prepended to object names in the parent ('p00/')
        self.run_dir = Path(run_dir)
        self.kind = kind
        self.meta: dict[str, Any] = dict(meta or {})
        self.listeners: list[Any] = list(listeners or [])
        self.results: list[StageResult] = []
        self.errors: list[dict[str, str]] = []
        self.status = "running"
        self.meta.setdefault("pid", os.getpid())
        self.meta.setdefault("host", socket.gethostname())
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self.started = time.time()

    def _tell(self, event: str, *args: Any) -> None:
        for lst in self.listeners:
            if hasattr(lst, event):  # a listener may skip progress reports
                getattr(lst, event)(*args)

    def started_stage(self, obj: str, stage: str) -> None:
        """Tell the listeners a stage began."""
        self._tell("stage_started", obj, stage)
        if self.forward_to is not None:
            self.forward_to.started_stage(self.prefix + obj, stage)

    def stage_progress(self, obj: str, stage: str, info: dict[str, Any]) -> None:
        """Tell the listeners how far a computing stage is (``step``, ``steps``, ``started``, numbers)."""
        self._tell("stage_progress", obj, stage, info)
        if self.forward_to is not None:
            self.forward_to.stage_progress(self.prefix + obj, stage, info)

    def add(self, result: StageResult) -> None:
        """Record one stage execution and rewrite the manifest."""
        with self._lock:
            self.results.append(result)
        self._tell("stage_finished", result)
        self.write()
        if self.forward_to is not None:
            self.forward_to.add(dataclasses.replace(result, object=self.prefix + result.object))

    def add_error(self, obj: str, stage: str, error: BaseException | str) -> None:
        """Record a failed stage (or a failed attempt of it, as a message)."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        with self._lock:
            self.errors.append({"object": obj, "stage": stage, "error": text})
        self.write()
        if self.forward_to is not None:
            self.forward_to.add_error(self.prefix + obj, stage, error)

    def to_json(self) -> dict[str, Any]:
        """The manifest document."""
        with self._lock:
            results = list(self.results)
            errors = list(self.errors)
        objects: dict[str, dict[str, Any]] = {}
        for r in results:
            objects.setdefault(r.object, {})[r.stage] = r.to_json()
        totals = {s: sum(r.status == s for r in results) for s in ("computed", "cached")}
        totals["stage_seconds"] = round(sum(r.seconds for r in results), 4)
        return {"kind": self.kind, "status": self.status, "started": self.started,
                "wall_seconds": round(time.perf_counter() - self._t0, 4), "totals": totals,
                **self.meta, "objects": objects, "stages": [r.to_json() for r in results], "errors": errors}

    def write(self) -> Path:
        """Write ``run_dir/manifest.json`` atomically."""
        path = self.run_dir / "manifest.json"
        write_json(path, self.to_json())
        return path

    def finish(self, status: str, error: str | None = None) -> Path:
        """Set the final status ('completed' / 'failed' / 'interrupted') and write the manifest."""
        self.status = status
        if error:
            self.meta["error"] = error
            with self._lock:
                if status == "failed" and not self.errors:  # a run-level cause (no stage failed): say why
                    self.errors.append({"object": "", "stage": "", "error": error})
        return self.write()


# Listeners every new top-level Recorder gets, in the process running the flow (the CLI's
# progress display registers itself here while a command runs).
LISTENERS: list[Any] = []

