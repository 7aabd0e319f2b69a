"""The DVC pipeline (dvc.yaml) on the real stages at tiny sizes, in a scratch copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d2_toy import write_tiny_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_dvc_repro_then_nothing_to_do_then_exp_run(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "d2", repo / "d2", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # the committed miniature priors: the output of the frozen train_priors stage, which a
    # `dvc repro` refuses to pass over when it is missing
    shutil.copytree(ROOT / "data" / "priors", repo / "data" / "priors")
    write_tiny_params(repo / "params.yaml", "run.mlflow=false", f"run.cache_dir={tmp_path / 'd2cache'}",
                      "prepare.objects=[bouncing_ball]")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "PREFECT_HOME": str(tmp_path / "prefect"),  # its own ephemeral Prefect database
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "prefect" / "storage"),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "config", "user.name", "d2 test"], repo, env)  # commits (dvc exp) without a global git identity
    _run(["git", "config", "user.email", "d2-test@example.invalid"], repo, env)
    _run([str(BIN / "dvc"), "init", "-q"], repo, env)
    _run([str(BIN / "dvc"), "config", "core.site_cache_dir", str(tmp_path / "site_cache")], repo, env)

    r = _run([str(BIN / "dvc"), "repro"], repo, env)
    for stage in ("prepare", "benchmark", "report"):
        assert f"Running stage '{stage}'" in r.stdout, r.stdout
    metrics = json.loads((repo / "data" / "metrics.json").read_text())
    assert set(metrics["mean"]) == {"psnr", "ssim"} and list(metrics["per_object"]) == ["bouncing_ball"]
    manifest = json.loads((repo / "data" / "runs" / "benchmark" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["totals"]["computed"] == 6

    r = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert "Data and pipelines are up to date" in r.stdout, r.stdout
    assert "Running stage" not in r.stdout

    # an experiment: commit the baseline, change sampling.s0 through DVC
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "baseline"], repo, env)
    r = _run([str(BIN / "dvc"), "exp", "run", "-S", "sampling.s0=0.3"], repo, env)
    assert "Running stage 'benchmark'" in r.stdout and "Running stage 'prepare'" not in r.stdout
    manifest = json.loads((repo / "data" / "runs" / "benchmark" / "manifest.json").read_text())
    stages = {s["stage"]: s["status"] for s in manifest["stages"]}
    assert stages["conditions"] == "cached" and stages["sampling"] == "computed"
    r = _run([str(BIN / "dvc"), "exp", "show", "--csv"], repo, env)
    assert "sampling.s0" in r.stdout and "0.3" in r.stdout
