"""The orchestration core under adversarial use: self-contained tasks, exact and verified cache
keys, deterministic artifacts, confined names, locked run folders, interruption."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from d2.cli import main
from d2.config import load_params
from d2.flows import run_benchmark
from d2.flows.run import RunFolderBusy, open_run_folder
from d2.execution.cache import run_stage, store_dir, verify_entry
from d2.execution.stages import STAGES

from d2_toy import make_toy, prepare_tiny, toy_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def statuses(manifest: dict, stage: str) -> list[str]:
    return [s["status"] for s in manifest["stages"] if s["stage"] == stage]


def sub_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny real params (2 objects, MLflow off) and their prepared dataset."""
    root = tmp_path_factory.mktemp("orch")
    params, data = prepare_tiny(root)
    return {"root": root, "params": params, "data": data}


# ---------------------------------------------------------------------------------------
# Self-contained tasks, deterministic artifacts


def test_each_task_in_a_subprocess_from_pickled_arguments_equals_in_process(tiny, tmp_path):
    p = load_params(tiny["params"])
    obj = "bouncing_ball"
    data = tiny["data"]
    local = tmp_path / "cache-local"
    calls, results = [], {}
    upstream = {"conditions": "input", "sampling": "conditions", "fit": "sampling", "render_eval": "fit"}
    for stage, name in (("conditions", None), ("sampling", "conditions"), ("fit", "matrix"),
                        ("render_eval", "gaussians"), ("metrics", None)):
        if stage == "conditions":
            inputs = {"input": str(data / "input" / obj)}
        elif stage == "metrics":
            inputs = {"pred": results["render_eval"]["store_dir"], "gt": str(data / "gt" / obj)}
        else:
            inputs = {name: results[upstream[stage]]["store_dir"]}
        if stage == "render_eval":  # renders at the times of the frames the asset covers (conditions.json)
            inputs["conditions"] = results["conditions"]["store_dir"]
        res = run_stage(STAGES.specs[stage], obj, inputs, p, local)
        results[stage] = {**res, "store_dir": str(store_dir(local, res))}
        calls.append({"stages": STAGES, "stage": stage, "obj": obj, "inputs": inputs,
                      "params": p.model_dump(mode="json"), "cache_dir": str(tmp_path / "cache-remote")})
    (tmp_path / "calls.pkl").write_bytes(pickle.dumps(calls))
    script = textwrap.dedent("""
        import json, pickle, sys
        from d2.env import setup_env
        setup_env()
        from d2.execution.stage_task import _run_stage
        calls = pickle.loads(open(sys.argv[1], "rb").read())
        print(json.dumps([_run_stage(**c) for c in calls]))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "calls.pkl")], capture_output=True, text=True,
                       timeout=600, env=sub_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    remote = json.loads(r.stdout.strip().splitlines()[-1])
    for res in remote:
        mine = results[res["stage"]]
        assert res["status"] == "computed" and "store_dir" not in res  # a task's result names no path
        assert verify_entry(tmp_path / "cache-remote" / res["stage"] / res["key"])[0] is not None
        assert (res["key"], res["content_hash"], res["outputs"]) == (mine["key"], mine["content_hash"],
                                                                     mine["outputs"]), res["stage"]
        untimed = lambda info: {k: v for k, v in info.items() if "seconds" not in k}  # noqa: E731
        assert untimed(res["info"]) == untimed(mine["info"]), res["stage"]


@pytest.mark.slow
def test_two_clean_runs_give_byte_identical_artifacts_and_equal_keys(tiny, tmp_path):
    manifests = []
    for i in (1, 2):
        rc = main(["benchmark", "--params", str(tiny["params"]), "--out", str(tmp_path / f"run{i}"),
                   "--set", f"run.cache_dir={tmp_path / f'cache{i}'}"])
        assert rc == 0
        manifests.append(load(tmp_path / f"run{i}" / "manifest.json"))
    keys = [{(s["object"], s["stage"]): s["key"] for s in m["stages"]} for m in manifests]
    # the tables also read the measured generation time (an input, like the paper's table's column),
    # the one thing two clean runs do not share; everything else is equal
    tables = [load(Path(m["objects"]["_benchmark"]["tables"]["store_dir"]).parent / "done.json") for m in manifests]
    assert [{k: v for k, v in t["ingredients"]["inputs"].items() if k != "generation_time"} for t in tables] == \
        [{k: v for k, v in tables[0]["ingredients"]["inputs"].items() if k != "generation_time"}] * 2
    for k in keys:
        k.pop(("_benchmark", "tables"))
    assert keys[0] == keys[1] and len(keys[0]) == 10
    assert all(s["status"] == "computed" for m in manifests for s in m["stages"])
    files = sorted(p.relative_to(tmp_path / "run1") for p in (tmp_path / "run1" / "objects").rglob("*") if p.is_file())
    assert any(f.suffix == ".pt" for f in files) and any(f.suffix == ".mp4" for f in files)
    different = [str(f) for f in files if (tmp_path / "run1" / f).read_bytes() != (tmp_path / "run2" / f).read_bytes()]
    assert different == []
    for f in files:  # normal permissions under umask 022
        assert (tmp_path / "run1" / f).stat().st_mode & 0o777 == 0o644, f
    assert (tmp_path / "run1" / "objects").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------------------------------
# Exact code keys


def test_keys_follow_the_code_a_stage_runs(tmp_path):
    """Editing the mini backend changes the sampling key; editing CLIP code does not change the fit key."""
    shutil.copytree(REPO / "d2", tmp_path / "d2", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from d2.execution.cache import code_version
        from d2.execution.stages import SPECS
        root = Path(sys.argv[1])
        def versions():
            return {n: code_version(list(s.modules), [s.compute]) for n, s in SPECS.items()}
        out = [versions()]
        priors = root / "d2" / "stages" / "priors" / "mini.py"
        priors.write_text(priors.read_text().replace('    folder = mini_prior_dir(cfg, family)',
                                                     '    folder = mini_prior_dir(cfg, family)  # edited'))
        out.append(versions())
        metrics = root / "d2" / "eval" / "metrics.py"
        text = metrics.read_text()
        assert "open_clip" in text
        metrics.write_text(text.replace("import open_clip", "import open_clip  # edited", 1))
        out.append(versions())
        print(json.dumps(out))
    """)
    env = sub_env(PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    before, mini_edit, clip_edit = json.loads(r.stdout.strip().splitlines()[-1])
    assert mini_edit["sampling"] != before["sampling"] and mini_edit["conditions"] != before["conditions"]
    assert mini_edit["fit"] == before["fit"] and mini_edit["render_eval"] == before["render_eval"]
    assert clip_edit["metrics"] != mini_edit["metrics"]
    assert clip_edit["fit"] == mini_edit["fit"] and clip_edit["sampling"] == mini_edit["sampling"]


# ---------------------------------------------------------------------------------------
# Verified hits


@pytest.fixture
def toy(tmp_path):
    return make_toy(tmp_path)


def _entry(manifest: dict, obj: str, stage: str) -> Path:
    return Path(manifest["objects"][obj][stage]["store_dir"]).parent


def test_a_truncated_cached_file_is_a_miss_and_is_recomputed(toy, tmp_path, caplog):
    m1 = load(run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)["manifest"])
    grid = _entry(m1, "apple", "sampling") / "out" / "grid.png"
    good = grid.read_bytes()
    grid.write_bytes(good[:3])
    assert verify_entry(grid.parents[1])[0] is None
    m2 = load(run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert m2["objects"]["apple"]["sampling"]["status"] == "computed"
    assert m2["objects"]["bird"]["sampling"]["status"] == "cached"
    assert m2["objects"]["apple"]["fit"]["status"] == "cached"  # same content again: downstream keys unchanged
    assert grid.read_bytes() == good and (tmp_path / "b" / "objects" / "apple" / "sampling" / "grid.png").read_bytes() == good
    assert "grid.png" in caplog.text  # the reason is logged


def test_a_same_size_edit_in_the_cache_is_caught(toy, tmp_path):
    m1 = load(run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)["manifest"])
    grid = _entry(m1, "bird", "sampling") / "out" / "grid.png"
    grid.write_bytes(b"TOY GRID")  # same size, new content (and mtime)
    m2 = load(run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert m2["objects"]["bird"]["sampling"]["status"] == "computed" and grid.read_bytes() == b"toy grid"


def test_edits_in_a_run_folder_never_reach_the_cache(toy, tmp_path):
    m1 = load(run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)["manifest"])
    run_file = tmp_path / "a" / "objects" / "apple" / "sampling" / "grid.png"
    cached_file = _entry(m1, "apple", "sampling") / "out" / "grid.png"
    before = cached_file.read_bytes()
    with open(run_file, "ab") as f:
        f.write(b"x")
    assert cached_file.read_bytes() == before
    assert verify_entry(cached_file.parents[1], full=True)[0] is not None
    m2 = load(run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert m2["totals"]["computed"] == 0
    # the rerun into the same folder replaces the edited copy
    run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)
    assert run_file.read_bytes() == before


@pytest.mark.parametrize("garbage", [b"{not json", b'{"format": 2}', b"", b'{"format": 2, "files": {}, '
                                     b'"content_hash": "0"}'])
def test_garbage_done_json_is_a_miss(toy, tmp_path, garbage):
    m1 = load(run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)["manifest"])
    (_entry(m1, "apple", "fit") / "done.json").write_bytes(garbage)
    m2 = load(run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path), stages=toy.stages)["manifest"])
    assert m2["status"] == "completed"
    assert m2["objects"]["apple"]["fit"]["status"] == "computed" and m2["objects"]["bird"]["fit"]["status"] == "cached"


def test_a_hit_is_one_verified_lookup_and_a_cached_task_run_in_prefect(toy, tmp_path, monkeypatch):
    """Per task run the key is computed once and the entry verified once; a hit's task run is in
    Prefect's state ``Cached`` (as the UI shows it) and its result is the entry's; the cache holds
    entries and locks only (no second record of a result)."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from d2.execution import cache as cache_mod
    from d2.execution.stage_task import stage_call

    calls = []
    key_of, verify = cache_mod.stage_key, cache_mod.verify_entry
    monkeypatch.setattr(cache_mod, "stage_key", lambda *a: calls.append("key") or key_of(*a))
    monkeypatch.setattr(cache_mod, "verify_entry", lambda *a, **k: calls.append("verify") or verify(*a, **k))
    p = toy_params(tmp_path)
    t, args = stage_call(toy.stages, "conditions", "apple", {"input": toy.data / "input" / "apple"}, p,
                         tmp_path / "cache")

    @flow
    def twice() -> list:
        return [t(**args, return_state=True) for _ in range(2)]

    first, second = twice()
    assert calls == ["key", "verify"] * 2
    assert (first.name, second.name) == ("Completed", "Cached") and second.is_completed()
    computed, served = first.result(), second.result()
    assert (computed["status"], served["status"]) == ("computed", "cached")
    assert served["key"] == computed["key"] and served["content_hash"] == computed["content_hash"]
    with get_client(sync_client=True) as client:
        assert client.read_task_run(second.state_details.task_run_id).state.name == "Cached"
    assert sorted(f.name for f in (tmp_path / "cache").iterdir()) == [".locks", "conditions"]


def test_use_cache_false_recomputes_valid_entries_under_the_same_keys(toy, tmp_path):
    m1 = load(run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)["manifest"])
    m2 = load(run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path, "run.use_cache=false"),
                            stages=toy.stages)["manifest"])
    assert m2["status"] == "completed" and (m2["totals"]["computed"], m2["totals"]["cached"]) == (11, 0)
    # the tables read the measured generation time, which a recomputation measures anew
    keys = lambda m: {(s["object"], s["stage"]): s["key"] for s in m["stages"] if s["stage"] != "tables"}  # noqa: E731
    assert keys(m2) == keys(m1) and len(keys(m1)) == 10
    assert all(verify_entry(_entry(m2, s["object"], s["stage"]))[0] is not None for s in m2["stages"])


def test_a_garbage_checkpoint_is_a_fresh_start(tmp_path):
    import torch

    from d2.stages.cameras import OrbitSpec
    from d2.stages.fit import FitConfig, run_fit, write_matrix

    images = torch.rand(2, 2, 3, 16, 16)  # [V, F, 3, H, W]
    write_matrix(tmp_path / "matrix", images, azimuths_deg=[0.0, 180.0], times=[0.0, 1.0], spec=OrbitSpec())
    cfg = FitConfig(iterations=2, num_gaussians=50, lambda_lpips=0, turntable_frames=2, export_ply=False,
                    progress=False)
    out = tmp_path / "fit"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"garbage, not a torch archive")
    run_fit(tmp_path / "matrix", out, cfg)
    assert (out / "gaussians.safetensors").is_file()


def test_a_read_only_cache_serves_its_hits(toy, tmp_path, monkeypatch):
    """A cache the user may not write (root writes anyway, so writability is also patched)."""
    from d2.execution import cache as cache_mod

    run_benchmark(toy.data, tmp_path / "a", toy_params(tmp_path), stages=toy.stages)
    root = tmp_path / "cache"
    snapshot = lambda: {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}  # noqa: E731
    before = snapshot()
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    try:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        monkeypatch.setattr(cache_mod, "cache_writable", lambda folder: False)
        m = load(run_benchmark(toy.data, tmp_path / "b", toy_params(tmp_path), stages=toy.stages)["manifest"])
        assert m["status"] == "completed" and m["totals"]["computed"] == 0
        assert snapshot() == before
        with pytest.raises(Exception, match="read-only"):  # a miss names the cache
            run_benchmark(toy.data, tmp_path / "c", toy_params(tmp_path, "fit.iters=9"), stages=toy.stages)
        assert snapshot() == before
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


# ---------------------------------------------------------------------------------------
# Names, folders, concurrency


def test_a_name_that_leaves_the_run_folder_is_refused_before_any_work(tmp_path, capsys):
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    victim = tmp_path / "victim"
    (victim / "conditions").mkdir(parents=True)
    (victim / "conditions" / "important.txt").write_text("keep me")
    for name in ("../victim", "../../x", "..", "a/b", ".hidden", " x"):
        rc = main(["generate", "--input", str(img), "--out", str(tmp_path / "run"), "--name", name])
        assert rc == 2, name
        assert "would write outside the run folder" in capsys.readouterr().err
    assert (victim / "conditions" / "important.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "victim"]


def test_a_second_run_into_a_busy_folder_is_refused_at_once(toy, tmp_path):
    out = tmp_path / "run"
    with open_run_folder(out):
        t0 = time.perf_counter()
        with pytest.raises(RunFolderBusy, match="in use by another d2 run"):
            run_benchmark(toy.data, out, toy_params(tmp_path), stages=toy.stages)
        assert time.perf_counter() - t0 < 30
    assert not (out / "manifest.json").exists() and [p.name for p in out.iterdir()] == [".d2-run.lock"]
    m = load(run_benchmark(toy.data, out, toy_params(tmp_path), stages=toy.stages)["manifest"])  # free again
    assert m["status"] == "completed"


def test_the_cli_refuses_a_busy_folder_before_prefect_starts(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    with open_run_folder(out):
        t0 = time.perf_counter()
        rc = main(["benchmark", "--params", str(tiny["params"]), "--out", str(out)])
        assert rc == 2 and time.perf_counter() - t0 < 5
    assert "in use by another d2 run (pid" in capsys.readouterr().err


def test_a_dead_runs_manifest_is_failed_by_the_next_run(toy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"status": "running", "pid": 999999, "host": "h",
                                                   "mlflow_runs": [], "stages": []}))
    run_benchmark(toy.data, out, toy_params(tmp_path), stages=toy.stages)
    dead = load(out / "manifest.dead.json")
    assert dead["status"] == "failed" and "died before finishing" in dead["errors"][-1]["error"]
    assert load(out / "manifest.json")["status"] == "completed"


# ---------------------------------------------------------------------------------------
# Cold processes and kill -9 (real subprocesses; Ctrl-C and a lost server: test_faults_interrupts.py)


@pytest.mark.slow
def test_cold_processes_run_two_objects_in_parallel_without_import_errors(tiny, tmp_path):
    # one cold process here; test_rehearsal.py starts four more at once on seven objects each
    for i in range(1):
        r = subprocess.run([str(BIN / "d2"), "benchmark", "--params", str(tiny["params"]), "--out",
                            str(tmp_path / f"run{i}"), "--no-progress", "--set", "run.max_parallel=2",
                            "--set", f"run.cache_dir={tmp_path / f'cache{i}'}"],
                           capture_output=True, text=True, timeout=600, env=sub_env(), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "ImportError" not in r.stderr
        assert load(tmp_path / f"run{i}" / "manifest.json")["totals"]["computed"] == 11


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _start_slow_benchmark(tiny, tmp_path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(BIN / "d2"), "benchmark", "--params", str(tiny["params"]), "--out", str(out), "--no-progress",
           "--set", f"run.cache_dir={tmp_path / 'cache'}", "--set", "sampling.num_steps=400", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sub_env(),
                            cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            if any(s["stage"] == "conditions" for s in load(out / "manifest.json")["stages"]):
                return proc
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the benchmark never reached sampling")


@pytest.mark.slow
def test_kill_9_leaves_no_server_and_the_next_run_fails_the_dead_one(tiny, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("D2_MLFLOW_ARTIFACTS", str(tmp_path / "mlruns"))
    out = tmp_path / "run"
    proc = _start_slow_benchmark(tiny, tmp_path, out, "--set", "run.mlflow=true")
    servers = [pid for pid, cmd in _children(proc.pid) if "uvicorn" in cmd]
    assert len(servers) == 1
    dead = load(out / "manifest.json")
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while _alive(servers[0]) and time.time() < deadline:  # the watchdog stops the orphaned server
        time.sleep(0.2)
    assert not _alive(servers[0])
    client = MlflowClient(uri)
    assert client.get_run(dead["mlflow_run_id"]).info.status == "RUNNING"
    rc = main(["benchmark", "--params", str(tiny["params"]), "--out", str(out), "--set", "run.mlflow=true",
               "--set", f"run.cache_dir={tmp_path / 'cache'}"])
    assert rc == 0
    failed = load(out / "manifest.dead.json")
    assert failed["status"] == "failed" and dead["mlflow_run_id"] in failed["mlflow_marked_failed"]
    assert client.get_run(dead["mlflow_run_id"]).info.status == "FAILED"
    assert load(out / "manifest.json")["status"] == "completed"
