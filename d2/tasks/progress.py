"""Live progress of a running stage, through a small JSON file the flow's driver reads.

The task that computes a stage is given a file (``progress_path``, in the run folder, not part
of any cache key); the stage's loop reports ``(step, steps, numbers)`` through
:func:`reporter`, which rewrites that file at most twice a second. A file works the same
whether the task runs in a thread, another process or another machine that sees the folder.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

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
