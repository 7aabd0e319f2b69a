"""The orchestration mechanism on toy stages: cache keys, manifests, sharing, code versions.

Executions are counted through the manifest (computed vs cached), never by timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2.flows import run_benchmark, run_sweep
from d2.validation import parse_grid

from d2_toy import make_toy, toy_params


def computed(manifest: dict, stage: str) -> int:
    return sum(1 for s in manifest["stages"] if s["stage"] == stage and s["status"] == "computed")


def cached(manifest: dict, stage: str) -> int:
    return sum(1 for s in manifest["stages"] if s["stage"] == stage and s["status"] == "cached")


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture
def toy(tmp_path):
    return make_toy(tmp_path)


def test_second_identical_run_computes_nothing(toy, tmp_path):
    p = toy_params(tmp_path)
    r1 = run_benchmark(toy.data, tmp_path / "run", p, stages=toy.stages)
    m1 = load(r1["manifest"])
    assert m1["status"] == "completed"
    assert m1["totals"] == {"computed": 11, "cached": 0, "stage_seconds": m1["totals"]["stage_seconds"]}
    for obj in ("apple", "bird"):
        entry = m1["objects"][obj]
        assert set(entry) == {"conditions", "sampling", "fit", "render_eval", "metrics"}
        for rec in entry.values():
            assert rec["status"] == "computed" and len(rec["key"]) == 64 and rec["seconds"] >= 0
            assert rec["outputs"] and all((Path(rec["out_dir"]) / f).is_file() for f in rec["outputs"])
    # results tables and metrics.json are written into the run folder
    assert (tmp_path / "run" / "results" / "results.md").is_file()
    assert load(tmp_path / "run" / "metrics.json")["abs_error"] == pytest.approx(r1["summary"]["abs_error"])

    r2 = run_benchmark(toy.data, tmp_path / "run", p, stages=toy.stages)
    m2 = load(r2["manifest"])
    assert m2["totals"]["computed"] == 0 and m2["totals"]["cached"] == 11
    keys1 = {(s["object"], s["stage"]): s["key"] for s in m1["stages"]}
    keys2 = {(s["object"], s["stage"]): s["key"] for s in m2["stages"]}
    assert keys1 == keys2
    assert r2["summary"] == r1["summary"]


def test_changing_s0_recomputes_downstream_only(toy, tmp_path):
    run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)
    r = run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path, "sampling.s0=0.3"), stages=toy.stages)
    m = load(r["manifest"])
    assert cached(m, "conditions") == 2 and computed(m, "conditions") == 0
    for stage in ("sampling", "fit", "render_eval", "metrics"):
        assert computed(m, stage) == 2, stage
    assert computed(m, "tables") == 1


def test_input_content_not_path_keys_the_cache(toy, tmp_path):
    """A copy of the dataset elsewhere hits the cache; an edited input frame does not."""
    import shutil

    run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)
    copy = tmp_path / "copy"
    shutil.copytree(toy.data, copy)
    m = load(run_benchmark(copy, tmp_path / "b", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert m["totals"]["computed"] == 0
    (copy / "input" / "bird" / "0.txt").write_text("a different bird")
    m = load(run_benchmark(copy, tmp_path / "c", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert m["objects"]["apple"]["conditions"]["status"] == "cached"
    assert m["objects"]["bird"]["conditions"]["status"] == "computed"


def test_sweep_shares_stages_a_point_does_not_change(toy, tmp_path):
    grid = parse_grid(["sampling.s0=0.3,0.6", "fit.iters=1,2"])
    r = run_sweep(toy.data, tmp_path / "sweep", toy_params(tmp_path), grid, stages=toy.stages)
    m = load(r["manifest"])
    assert m["status"] == "completed" and len(m["points"]) == 4
    assert computed(m, "conditions") == 2  # once per object, not once per point x object (8)
    assert cached(m, "conditions") == 6
    assert computed(m, "sampling") == 4  # 2 values of s0 x 2 objects
    assert computed(m, "fit") == 8  # every point changes fit's inputs or params
    assert computed(m, "tables") == 4
    assert len(r["rows"]) == 4 and {row["fit.iters"] for row in r["rows"]} == {"1", "2"}
    for pid in m["points"]:
        pm = load(tmp_path / "sweep" / "points" / pid / "manifest.json")
        assert pm["status"] == "completed" and set(pm["objects"]) == {"apple", "bird", "_benchmark"}
    assert (tmp_path / "sweep" / "sweep.md").is_file()


def test_editing_a_stage_helper_invalidates_that_stage(toy, tmp_path):
    run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)
    helper = toy.pkg_dir / "helper.py"
    helper.write_text(helper.read_text().replace("x * 2.0", "x * 3.0  # edited"))
    toy.register()  # the running code is the edited code
    m = load(run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert cached(m, "conditions") == 2  # conditions does not import the helper
    assert computed(m, "sampling") == 2  # sampling imports it
    assert computed(m, "fit") == 2  # its input changed

    # an edit that changes a stage's code but not its output: downstream stays cached
    fit = toy.pkg_dir / "fit.py"
    fit.write_text(fit.read_text() + "\n# a comment is still an edit of the stage's code\n")
    toy.register()
    m = load(run_benchmark(toy.data, tmp_path / "c", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert computed(m, "fit") == 2 and cached(m, "sampling") == 2
    assert cached(m, "render_eval") == 2 and cached(m, "metrics") == 2


def test_parallel_limit_is_respected(toy, tmp_path):
    cond = toy.module("conditions")
    cond.PEAK[0] = 0
    run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path, "run.max_parallel=1"), stages=toy.stages)
    assert cond.PEAK[0] == 1
    cond.PEAK[0] = 0
    run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path, "run.max_parallel=2", "conditions.scale=2"),
                  stages=toy.stages)
    assert cond.PEAK[0] == 2


def test_parallel_limit_holds_under_any_task_runner(toy, tmp_path):
    """The flow called as a deployment would call it (its default runner) still runs one object at a time."""
    from d2.flows.benchmark import benchmark_flow

    cond = toy.module("conditions")
    cond.PEAK[0] = 0
    p = toy_params(tmp_path, "run.max_parallel=1")
    benchmark_flow(str(toy.data), str(tmp_path / "a"), p.model_dump(mode="json"), toy.stages)
    assert cond.PEAK[0] == 1


def test_schedule_builds_a_cron_deployment(toy, tmp_path):
    from d2.flows.schedule import build_schedule

    dep = build_schedule(toy_params(tmp_path), toy.data, tmp_path / "nightly", "0 3 * * *")
    assert dep.schedules[0].schedule.cron == "0 3 * * *" and dep.work_pool_name is None
    assert dep.parameters["out_dir"] == str((tmp_path / "nightly").resolve())
    assert dep.parameters["params"]["sampling"]["s0"] == 0.5
    with pytest.raises(Exception):
        build_schedule(toy_params(tmp_path), toy.data, tmp_path / "nightly", "not a cron")
    with pytest.raises(ValueError, match="benchmark dataset not found"):
        build_schedule(toy_params(tmp_path), tmp_path / "no-data", tmp_path / "nightly", "0 3 * * *")


def scheduled_run(dep, stages) -> dict:
    """The deployment's flow run once as its runner would run it: the flow imported by the
    deployment's entry point (a module path), called with the deployment's parameters."""
    import importlib

    module, _, name = dep.entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), name)(**dep.parameters, stages=stages)


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_a_scheduled_run_uses_the_configured_runner(toy, tmp_path, runner):
    """``d2 schedule`` honours run.runner and run.address: with ``dask`` every stage of a scheduled
    run is a task on the Dask cluster at run.address; with ``threads`` none is."""
    from distributed import LocalCluster

    from d2.flows.schedule import build_schedule

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        p = toy_params(tmp_path, f"run.runner={runner}", f"run.address={cluster.scheduler_address}")
        dep = build_schedule(p, toy.data, tmp_path / "nightly", "0 3 * * *")
        r = scheduled_run(dep, toy.stages)
        # stage tasks the cluster finished (each prefix's count of transitions into memory)
        on_dask = sum(prefix.state_counts["memory"] for prefix in cluster.scheduler.task_prefixes.values())
    assert load(r["manifest"])["totals"]["computed"] == 11
    assert on_dask == (11 if runner == "dask" else 0)


def test_schedule_registers_the_deployment_for_a_work_pool(toy, tmp_path):
    """``d2 schedule --work-pool NAME``: the deployment is registered for that pool, its flow named
    by module path (what the pool's workers import), on the cron schedule."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from d2.flows.schedule import build_schedule, serve_schedule

    import uuid

    pool = f"pool-{uuid.uuid4().hex[:12]}"  # Prefect's database outlives the test session
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        dep = build_schedule(toy_params(tmp_path), toy.data, tmp_path / "nightly", "0 3 * * *", name="n",
                             work_pool=pool)
        serve_schedule(dep)
        stored = client.read_deployment_by_name("scheduled-benchmark/n")
    assert stored.work_pool_name == pool and stored.entrypoint == "d2.flows.schedule.scheduled_benchmark"
    assert stored.schedules[0].schedule.cron == "0 3 * * *"
    assert stored.parameters["out_dir"] == str((tmp_path / "nightly").resolve())


def test_failed_stage_fails_the_run_and_is_recorded(toy, tmp_path):
    (toy.data / "input" / "bird" / "FAIL").write_text("")
    with pytest.raises(Exception, match="bird"):
        run_benchmark(toy.data, tmp_path / "run", toy_params(tmp_path), stages=toy.stages)
    m = load(tmp_path / "run" / "manifest.json")
    assert m["status"] == "failed"
    assert [e["object"] for e in m["errors"]] == ["bird"] and "toy failure" in m["errors"][0]["error"]
    assert m["objects"]["apple"]["metrics"]["status"] == "computed"  # the other object went on
    # nothing half-written was cached: after removing the cause it computes
    (toy.data / "input" / "bird" / "FAIL").unlink()
    m = load(run_benchmark(toy.data, tmp_path / "run", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert m["objects"]["bird"]["conditions"]["status"] == "computed"
    assert m["objects"]["apple"]["conditions"]["status"] == "cached"


def test_retries_recover_a_transient_failure(toy, tmp_path):
    toy.module("conditions").FAIL_ONCE.add("bird")
    r = run_benchmark(toy.data, tmp_path / "run", toy_params(tmp_path, "run.retries=1", "run.retry_delay_s=0"),
                      stages=toy.stages)
    m = load(r["manifest"])
    assert m["status"] == "completed" and m["objects"]["bird"]["conditions"]["status"] == "computed"
    assert [e["error"] for e in m["errors"]] == ["RuntimeError: transient toy failure"]  # the manifest tells
    assert m["objects"]["bird"]["conditions"]["info"]["resumed"] is True  # the retry saw the failed try's files
    assert m["objects"]["apple"]["conditions"]["info"]["resumed"] is False


def test_bad_dataset_and_unknown_objects_fail_before_compute(toy, tmp_path):
    with pytest.raises(ValueError, match="d2 prepare"):
        run_benchmark(tmp_path / "nothing", tmp_path / "run", toy_params(tmp_path), stages=toy.stages)
    with pytest.raises(ValueError, match="zebra"):
        run_benchmark(toy.data, tmp_path / "run", toy_params(tmp_path, "run.objects=[zebra]"),
                      stages=toy.stages)
    assert not (tmp_path / "cache").exists()


def test_mlflow_parent_and_child_runs(toy, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("D2_MLFLOW_ARTIFACTS", str(tmp_path / "mlruns"))
    p = toy_params(tmp_path, "run.mlflow_experiment=toy", mlflow=True)
    r = run_benchmark(toy.data, tmp_path / "run", p, stages=toy.stages)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toy")
    assert exp.artifact_location.startswith((tmp_path / "mlruns").as_uri())
    parent = client.get_run(r["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["abs_error"] == pytest.approx(r["summary"]["abs_error"])
    assert parent.data.params["sampling.s0"] == "0.5"
    for tag in ("git_commit", "params_hash", "prefect_flow_run_id"):
        assert parent.data.tags[tag], tag
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["apple", "bird"]
    for c in children:
        assert c.info.status == "FINISHED"
        assert c.data.metrics["abs_error"] >= 0
        assert {"seconds.conditions", "seconds.fit", "cached.sampling"} <= set(c.data.metrics)
        arts = {a.path for a in client.list_artifacts(c.info.run_id, "matrix")}
        arts |= {a.path for a in client.list_artifacts(c.info.run_id, "fit")}
        assert {"matrix/grid.png", "fit/turntable.mp4"} <= arts

    # a failing object: its child and the parent end FAILED
    (toy.data / "input" / "bird" / "FAIL").write_text("")
    with pytest.raises(Exception):
        run_benchmark(toy.data, tmp_path / "run2", p, stages=toy.stages)
    failed = client.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    names = sorted(f.info.run_name for f in failed)
    assert "bird" in names and any(n.startswith("benchmark/") for n in names)
    assert "apple" not in names


def test_mlflow_sweep_has_a_child_per_point(toy, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("D2_MLFLOW_ARTIFACTS", str(tmp_path / "mlruns"))
    p = toy_params(tmp_path, "run.mlflow_experiment=toysweep", mlflow=True)
    r = run_sweep(toy.data, tmp_path / "sweep", p, parse_grid(["sampling.s0=0.3,0.6"]), stages=toy.stages)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("toysweep")
    points = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{r['mlflow_run_id']}'")
    assert len(points) == 2
    assert sorted(pt.data.params["sampling.s0"] for pt in points) == ["0.3", "0.6"]
    for pt in points:
        assert pt.info.status == "FINISHED" and "abs_error" in pt.data.metrics
        objs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{pt.info.run_id}'")
        assert sorted(o.info.run_name.split("/")[-1] for o in objs) == ["apple", "bird"]
