"""The run's progress display: what it says while a run starts and runs; --no-progress is quiet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from d2.execution.progress import STARTING, ProgressDisplay

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


def test_step_counters_with_eta_and_loss() -> None:
    d = ProgressDisplay(6, "demo", enabled=False)
    with d:
        d.stage_started("ball", "fit")
        d.stage_progress("ball", "fit", {"step": 100, "steps": 500, "started": 0.0, "time": 20.0, "loss": 0.0512,
                                         "psnr": 24.1})
        text = d._summary()
        assert "fit ball 100/500 ETA 80 s loss 0.0512 psnr 24.1" in text
        d.stage_finished(SimpleNamespace(object="ball", stage="fit", status="computed"))
        assert "100/500" not in d._summary()


def test_a_computing_stage_reports_its_steps_to_its_progress_file(tmp_path) -> None:
    """The fit and the sampler report through the task's progress file; their curves go to fit.json
    and matrix.json (what MLflow plots)."""
    import json

    import torch

    from d2.stages.cameras import OrbitSpec
    from d2.stages.fit import FitConfig, write_matrix
    from d2.execution.cache import StageSpec, run_stage
    from d2.execution.progress import read_progress
    from d2.execution.stages import compute_fit

    from d2_toy import toy_params

    write_matrix(tmp_path / "matrix", torch.rand(2, 2, 3, 16, 16), azimuths_deg=[0.0, 180.0], times=[0.0, 1.0],
                 spec=OrbitSpec())
    cfg = FitConfig(iterations=30, num_gaussians=50, lambda_lpips=0, turntable_frames=0, export_ply=False,
                    progress=False, device="cpu")
    params = SimpleNamespace(fit=cfg, run=toy_params(tmp_path).run)
    spec = StageSpec("fit", lambda inputs, out, p: compute_fit(inputs, out, p), ("d2.stages.fit",), ())
    progress = tmp_path / "run" / ".fit.progress.json"
    from d2.execution import cache as cache_mod

    key_of = cache_mod.stage_key
    cache_mod.stage_key = lambda spec, inputs, p: ("k" * 64, {})  # params here are not a pydantic root model
    try:
        res = run_stage(spec, "obj", {"matrix": str(tmp_path / "matrix")}, params, tmp_path / "cache",
                        progress_path=progress)
    finally:
        cache_mod.stage_key = key_of
    info = read_progress(progress)
    assert info["step"] == info["steps"] == 30 and info["loss"] > 0 and "psnr" in info
    curve = json.loads((cache_mod.store_dir(tmp_path / "cache", res) / "fit.json").read_text())["curve"]
    assert [c["iteration"] for c in curve] == list(range(1, 31)) and all(c["loss"] > 0 for c in curve)
