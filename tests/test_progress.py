"""The run's progress display: what it says while a run starts and runs; --no-progress is quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from d2.cli import STARTING, ProgressDisplay

ROOT = Path(__file__).resolve().parents[1]


def test_display_names_prefect_start_and_running_objects() -> None:
    assert "Prefect" in STARTING
    d = ProgressDisplay(6, "demo", enabled=False)
    with d:
        d.stage_started("ball", "fit")
        d.stage_started("cube", "fit")
        d.stage_started("cube2", "sampling")
        text = d._summary()
        assert "fit ball, cube" in text and "sampling cube2" in text and "computed 0" in text
        d.stage_finished(SimpleNamespace(object="ball", stage="fit", status="cached"))
        text = d._summary()
        assert "fit cube;" in text and "ball" not in text and "cached 1" in text


def _bar_output(no_progress: bool) -> str:
    code = ("from d2.cli import quiet_library_bars; quiet_library_bars(%r)\n"
            "from tqdm.auto import tqdm\n"
            "for _ in tqdm(range(3), desc='somebar'): pass\n") % no_progress
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True)
    return r.stdout + r.stderr


def test_no_progress_silences_every_tqdm_bar() -> None:
    assert "somebar" in _bar_output(False)
    assert "somebar" not in _bar_output(True)
