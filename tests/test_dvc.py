"""The DVC pipeline (dvc.yaml) on the real stages at tiny sizes, in a scratch copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import yaml

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


# What each DVC stage's command imports: the CLI, what its command function imports, and for the
# benchmark the code of every stage it runs (the stage specs' modules, imported in the tasks).
STAGE_IMPORTS = {
    "prepare": "import d2.cli, d2.preflight, d2.validation, d2.world.benchmark",
    "benchmark": ("import importlib, d2.cli, d2.preflight, d2.validation, d2.flows, d2.reports.html\n"
                  "from d2.execution.stages import STAGES\n"
                  "for spec in STAGES.specs.values():\n    [importlib.import_module(m) for m in spec.modules]"),
    "report": "import d2.cli, d2.reports.run_report, d2.reports.html",
}


def imported_files(code: str) -> set[str]:
    """The d2 source files (relative to the repo) a fresh interpreter has loaded after ``code``."""
    script = code + ("\nimport sys\nprint('\\n'.join(sorted({m.__file__ for n, m in sys.modules.items()"
                     " if n.split('.')[0] == 'd2'})))")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return {str(Path(f).relative_to(ROOT)) for f in r.stdout.split()}


def test_each_stage_depends_on_every_module_its_command_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, code in STAGE_IMPORTS.items():
        deps = [d for d in stages[stage]["deps"] if d.startswith("d2")]
        files = imported_files(code)
        assert "d2/flows/run.py" in files or stage != "benchmark"  # the import list is the real one
        uncovered = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps))
        assert uncovered == [], f"dvc.yaml stage {stage} misses deps on {uncovered}"
    # and no more than that: the procedural data does not depend on the flows, nor the benchmark on training
    assert not any(d.startswith(("d2/flows", "d2/execution", "d2/reports")) for d in stages["prepare"]["deps"])
    assert not any(d.startswith("d2/train") for s in ("prepare", "benchmark", "report") for d in stages[s]["deps"])


def test_dvc_status_sees_an_edit_of_the_code_a_stage_runs(tmp_path):
    """Outputs recorded as they are (``dvc commit``, nothing run); then edits one at a time, each undone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    shutil.copytree(ROOT / "d2", repo / "d2", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for out in ("mini", "priors", "runs/benchmark", "report"):
        (repo / "data" / out).mkdir(parents=True)
        (repo / "data" / out / "f").write_text(out)
    (repo / "data" / "metrics.json").write_text("{}")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    _run([str(BIN / "dvc"), "init", "-q", "--no-scm"], repo, env)
    _run([str(BIN / "dvc"), "config", "core.site_cache_dir", str(tmp_path / "site_cache")], repo, env)
    _run([str(BIN / "dvc"), "commit", "-f", "-q", "prepare", "benchmark", "report"], repo, env)

    def changed_after_editing(module: str) -> set[str]:
        path = repo / module
        text = path.read_text()
        path.write_text(text + "\n# an edit\n")
        try:
            status = json.loads(_run([str(BIN / "dvc"), "status", "--json"], repo, env).stdout)
        finally:
            path.write_text(text)
        return set(status) - {"train_priors"}

    for module in ("d2/config.py", "d2/utils/io.py", "d2/validation.py"):
        assert changed_after_editing(module) == {"prepare", "benchmark", "report"}, module
    assert changed_after_editing("d2/reports/html.py") == {"benchmark", "report"}
    assert changed_after_editing("d2/flows/graph.py") == {"benchmark"}
    assert changed_after_editing("d2/train/data.py") == set()
