"""The `d2` command end to end on the real stages at tiny sizes (tiny priors, a few iterations).

Executions are counted through the manifests. One module-scoped dataset and cache are
shared by the tests that build on each other (benchmark, rerun, s0 change, generate).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from d2.cli import build_parser, main

from d2_toy import write_tiny_params

BIN = Path(sys.executable).parent


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def statuses(manifest: dict, stage: str) -> list[str]:
    return [s["status"] for s in manifest["stages"] if s["stage"] == stage]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    params = write_tiny_params(root / "params.yaml", f"run.cache_dir={root / 'cache'}", "run.progress=false",
                               f"run.data_dir={root / 'data'}", "run.mlflow_experiment=cli-test")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("D2_MLFLOW_ARTIFACTS", str(root / "mlruns"))
    assert main(["prepare", "--params", str(params)]) == 0
    yield {"root": root, "params": str(params), "data": root / "data"}
    mp.undo()


def test_help_of_every_command():
    r = subprocess.run([str(BIN / "d2"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "benchmark" in r.stdout and "sweep" in r.stdout
    parser = build_parser()
    for cmd in ("prepare", "generate", "benchmark", "sweep", "report", "evaluate", "demo", "params"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0


def test_bad_params_fail_before_any_compute(tmp_path, capsys):
    rc = main(["benchmark", "--out", str(tmp_path / "run"), "--set", "sampling.num_stpes=3"])
    assert rc == 2
    assert "Did you mean 'sampling.num_steps'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    rc = main(["generate", "--input", str(tmp_path / "missing.png"), "--out", str(tmp_path / "run")])
    assert rc != 0 and not (tmp_path / "run").exists()


def test_benchmark_cached_rerun_s0_change_mlflow_report(env, capsys):
    from mlflow.tracking import MlflowClient

    root, params = env["root"], env["params"]
    assert main(["benchmark", "--params", params, "--out", str(root / "b1")]) == 0
    m = load(root / "b1" / "manifest.json")
    assert m["status"] == "completed" and m["totals"]["computed"] == 11 and m["totals"]["cached"] == 0
    for obj in ("bouncing_ball", "windmill"):
        o = m["objects"][obj]
        assert set(o) == {"conditions", "sampling", "fit", "render_eval", "metrics"}
        assert "grid.png" in o["sampling"]["outputs"] and "turntable.mp4" in o["fit"]["outputs"]
        assert (root / "b1" / "objects" / obj / "fit" / "turntable.mp4").stat().st_size > 0
        assert len(list((root / "b1" / "pred" / obj / "eval_0").glob("*.png"))) == 3
    results = load(root / "b1" / "results" / "results.json")
    assert set(results["mean"]) == {"psnr", "ssim"} and results["generation_time_s"] > 0
    out = capsys.readouterr().out
    assert "| bouncing_ball |" in out and "turntable.mp4" in out and "mlflow ui" in out

    # MLflow: a parent with the benchmark means, a child per object with metrics, seconds, grid, video
    client = MlflowClient()
    parent = client.get_run(m["mlflow_run_id"])
    assert parent.data.tags["prefect_flow_run_id"] == m["prefect_flow_run_id"] != ""
    assert parent.info.status == "FINISHED" and parent.data.metrics["psnr"] == pytest.approx(results["mean"]["psnr"])
    assert parent.data.params["sampling.s0"] == "0.5"
    exp = client.get_experiment_by_name("cli-test")
    assert exp.artifact_location == (root / "mlruns" / "cli-test").as_uri()
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(k.info.run_name for k in kids) == ["bouncing_ball", "windmill"]
    for k in kids:
        assert k.info.status == "FINISHED" and "ssim" in k.data.metrics and k.data.metrics["seconds.fit"] > 0
        assert k.data.params["object"] == k.info.run_name and k.data.params["fit.iterations"] == "4"
        assert k.data.tags["git_commit"] and k.data.tags["params_hash"] and k.data.tags["prefect_flow_run_id"]
        arts = {a.path for d in ("matrix", "fit") for a in client.list_artifacts(k.info.run_id, d)}
        assert {"matrix/grid.png", "fit/turntable.mp4"} <= arts
        # per-iteration curves: the fit's loss at each of its 4 iterations, the sampler's sigma at each of 2 steps
        assert [m.step for m in client.get_metric_history(k.info.run_id, "fit.curve.loss")] == [1, 2, 3, 4]
        sigmas = client.get_metric_history(k.info.run_id, "sampling.curve.sigma")
        assert [m.step for m in sigmas] == [1, 2] and sigmas[-1].value == 0.0

    # a second identical run computes nothing
    assert main(["benchmark", "--params", params, "--out", str(root / "b2")]) == 0
    m2 = load(root / "b2" / "manifest.json")
    assert m2["totals"]["computed"] == 0 and m2["totals"]["cached"] == 11
    assert load(root / "b2" / "results" / "results.json")["mean"] == results["mean"]

    # sampling.s0 changes sampling and everything after it, not the conditions
    assert main(["benchmark", "--params", params, "--out", str(root / "b3"), "--set", "sampling.s0=0.3"]) == 0
    m3 = load(root / "b3" / "manifest.json")
    assert statuses(m3, "conditions") == ["cached", "cached"]
    for stage in ("sampling", "fit", "render_eval", "metrics", "tables"):
        assert set(statuses(m3, stage)) == {"computed"}, stage

    # report (no compute) and evaluate on the run's predictions agree with the run's tables
    assert main(["report", "--run", str(root / "b1"), "--out", str(root / "rep")]) == 0
    assert load(root / "rep" / "metrics.json")["mean"] == pytest.approx(results["mean"])
    assert "fit" in (root / "rep" / "timing.md").read_text()
    assert main(["evaluate", "--params", params, "--pred", str(root / "b1" / "pred"), "--gt", str(env["data"]),
                 "--out", str(root / "ev")]) == 0
    assert load(root / "ev" / "results.json")["mean"] == pytest.approx(results["mean"])


def test_generate_reuses_the_benchmark_cache(env):
    root, params = env["root"], env["params"]
    src = env["data"] / "input" / "windmill"
    assert main(["generate", "--params", params, "--input", str(src), "--out", str(root / "g"),
                 "--gt", str(env["data"] / "gt" / "windmill")]) == 0
    m = load(root / "g" / "manifest.json")
    assert m["status"] == "completed"
    assert {s["stage"] for s in m["stages"]} == {"conditions", "sampling", "fit", "render_eval", "metrics"}
    assert statuses(m, "conditions") == ["cached"] and statuses(m, "fit") == ["cached"]


@pytest.mark.slow
def test_sweep_2x2_over_2_objects_shares_conditions(env, tmp_path):
    params = write_tiny_params(tmp_path / "params.yaml", f"run.cache_dir={tmp_path / 'cache'}", "run.progress=false",
                               "run.mlflow=false", "fit.iterations=2")
    assert main(["sweep", "--params", str(params), "--data", str(env["data"]), "--out", str(tmp_path / "sw"),
                 "--grid", "sampling.s0=0.3,0.6", "--grid", "fit.seed=0,1"]) == 0
    m = load(tmp_path / "sw" / "manifest.json")
    assert m["status"] == "completed" and len(m["points"]) == 4
    assert statuses(m, "conditions").count("computed") == 2  # not 8
    assert statuses(m, "sampling").count("computed") == 4  # 2 values of s0 x 2 objects
    assert statuses(m, "fit").count("computed") == 8
    assert (tmp_path / "sw" / "results" / "ablation.md").read_text().count("| p0") == 4
    assert (tmp_path / "sw" / "results" / "figure.png").is_file()
    assert main(["report", "--run", str(tmp_path / "sw")]) == 0
    assert (tmp_path / "sw" / "report" / "ablation.md").read_text().count("| p0") == 4


def test_real_stage_code_versions_cover_their_helpers():
    from d2.execution.cache import module_closure
    from d2.execution.stages import SPECS

    assert {"d2.stages.priors", "d2.stages.cameras", "d2.utils.io"} <= set(module_closure(list(SPECS["conditions"].modules)))
    assert {"d2.stages.gaussians", "d2.stages.render"} <= set(module_closure(list(SPECS["fit"].modules)))
    assert {"d2.eval.metrics", "d2.eval.protocol"} <= set(module_closure(list(SPECS["metrics"].modules)))


def test_prior_weights_are_part_of_the_keys(tmp_path):
    """Replacing the weights a backend loads (same params) changes the conditions/sampling keys."""
    from d2.config import load_params
    from d2.execution.cache import stage_key
    from d2.execution.stages import SPECS, prior_weights

    w = tmp_path / "video"
    w.mkdir()
    (w / "weights.safetensors").write_bytes(b"version 1")
    p = load_params(None, ["priors.backend=mini", f"priors.video_path={w}", f"priors.multiview_path={w}"])
    assert set(prior_weights(p)) == {"video_weights", "multiview_weights"}
    inputs = {"input": tmp_path / "video" / "weights.safetensors"}
    k1 = stage_key(SPECS["conditions"], {**inputs, **prior_weights(p)}, p)[0]
    (w / "weights.safetensors").write_bytes(b"version 2")
    k2 = stage_key(SPECS["conditions"], {**inputs, **prior_weights(p)}, p)[0]
    assert k1 != k2
    assert prior_weights(load_params(None, ["priors.backend=tiny"])) == {}  # tiny: seeded weights, nothing on disk
