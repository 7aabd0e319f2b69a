"""Live progress of a run: the stages' step counters, and the terminal display that shows them.

The task that computes a stage is given a file (``progress_path``, in the run folder, not part
of any cache key); the stage's loop reports ``(step, steps, numbers)`` through
:func:`reporter`, which rewrites that file at most twice a second. A file works the same
whether the task runs in a thread, another process or another machine that sees the folder.
The flow's driver reads it (:func:`read_progress`) and tells the run's recorder, whose listeners
include the :class:`ProgressDisplay` of a ``d2`` command.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

from d2.execution.manifest import LISTENERS
from d2.utils.io import write_json

_current = threading.local()  # .path: the progress file of the stage this thread computes
MIN_INTERVAL_S = 0.5


def set_progress_file(path: Path | None) -> None:
    """The progress file of the stage the calling thread is about to compute (None: none)."""
    _current.path = path


def reporter() -> Callable[[int, int, dict[str, Any]], None] | None:
    """A callback ``(step, steps, numbers)`` writing the calling thread's progress file, or None."""
    path: Path | None = getattr(_current, "path", None)
    if path is None:
        return None
    t0 = time.time()
    last = [0.0]

    def report(step: int, steps: int, numbers: dict[str, Any]) -> None:
        now = time.time()
        if now - last[0] < MIN_INTERVAL_S and step < steps:
            return
        last[0] = now
        try:
            write_json(path, {"step": step, "steps": steps, "started": t0, "time": now,
                              **{k: v for k, v in numbers.items() if isinstance(v, (int, float))}})
        except OSError:  # progress is best effort; it never fails a stage
            pass

    return report


def read_progress(path: Path) -> dict[str, Any] | None:
    """The last progress written to ``path`` (None when there is none or it is being replaced)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


STARTING = "starting Prefect (API server and flow run) ..."  # shown until the first stage starts


class ProgressDisplay:
    """A rich progress bar over stage executions, fed by the run's recorder (thread-safe)."""

    def __init__(self, total: int, title: str, enabled: bool = True) -> None:
        self.enabled = enabled and total > 0
        self.total = total
        self.title = title
        self.running: dict[tuple[str, str], float] = {}  # (object, stage) -> when it started
        self.steps: dict[tuple[str, str], dict] = {}  # (object, stage) -> its last progress report
        self.counts = {"computed": 0, "cached": 0}
        self._lock = threading.Lock()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "ProgressDisplay":
        LISTENERS.append(self)
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.description}"), refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task(STARTING, total=self.total, title=self.title)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self in LISTENERS:
            LISTENERS.remove(self)
        self._show()
        if self._progress is not None:
            self._progress.stop()

    def _show(self, advance: int = 0) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, description=self._summary())

    def _summary(self) -> str:
        by_stage: dict[str, list[str]] = {}
        for o, s in list(self.running):
            by_stage.setdefault(s, []).append(o.lstrip("_") or s)
        running = "; ".join(f"{s} {', '.join(objs[:3])}{f' +{len(objs) - 3}' if len(objs) > 3 else ''}"
                            for s, objs in by_stage.items())
        oldest = min(self.running.values(), default=None)
        since = f" ({time.perf_counter() - oldest:.0f} s)" if oldest is not None else ""
        steps = "; ".join(self._step_text(o, s, info) for (o, s), info in list(self.steps.items())[:2])
        return (f"computed {self.counts['computed']} · cached {self.counts['cached']}"
                + (f" · running {running}{since}" if running else "") + (f" · {steps}" if steps else ""))

    @staticmethod
    def _step_text(obj: str, stage: str, info: dict) -> str:
        """``fit ball 120/500 ETA 40 s loss 0.0512 psnr 24.10`` from a stage's progress report."""
        step, steps = int(info.get("step", 0)), int(info.get("steps", 0))
        elapsed = float(info.get("time", 0.0)) - float(info.get("started", 0.0))
        eta = f" ETA {elapsed / step * (steps - step):.0f} s" if step > 0 and steps > step else ""
        nums = " ".join(f"{k} {info[k]:.4g}" for k in ("loss", "psnr", "sigma") if isinstance(info.get(k), (int, float)))
        return f"{stage} {obj.lstrip('_') or stage} {step}/{steps}{eta}" + (f" {nums}" if nums else "")

    def stage_started(self, obj: str, stage: str) -> None:
        with self._lock:
            self.running[(obj, stage)] = time.perf_counter()
        self._show()

    def stage_progress(self, obj: str, stage: str, info: dict) -> None:
        with self._lock:
            if (obj, stage) in self.running:
                self.steps[(obj, stage)] = info
        self._show()

    def stage_finished(self, result: Any) -> None:
        with self._lock:
            self.running.pop((result.object, result.stage), None)
            self.steps.pop((result.object, result.stage), None)
            self.counts[result.status] += 1
        self._show(advance=1)
