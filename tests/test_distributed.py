"""Stage tasks on Dask and Ray: the same results as threads, a cached rerun computes nothing,
GPU pinning of local Dask workers, two processes racing on one key compute it once."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from d2.config import load_params, with_overrides
from d2.flows import run_benchmark
from d2.flows.runners import gpu_cluster_spec, wants_gpu

from d2_toy import make_toy, prepare_tiny, toy_params

REPO = Path(__file__).resolve().parents[1]


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    params, _ = prepare_tiny(root)
    threads = run_benchmark(root / "data", root / "threads", load_params(params, [f"run.cache_dir={root / 'c0'}"]))
    return {"root": root, "params": params, "data": root / "data", "threads": threads}


def same_results(a: dict, b: dict) -> None:
    assert load(Path(a["run_dir"]) / "metrics.json") == load(Path(b["run_dir"]) / "metrics.json")
    assert (Path(a["results_dir"]) / "results.md").read_text() == (Path(b["results_dir"]) / "results.md").read_text()
    keys = lambda r: {(s["object"], s["stage"]): s["key"] for s in load(r["manifest"])["stages"]  # noqa: E731
                      if s["stage"] != "tables"}
    assert keys(a) == keys(b)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_a_cluster_runner_gives_the_threads_results_and_reruns_from_the_cache(tiny, runner, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    root = tiny["root"]
    p = load_params(tiny["params"], [f"run.runner={runner}", "run.workers=2", "run.max_parallel=2",
                                     f"run.cache_dir={root / f'cache-{runner}'}"])
    first = run_benchmark(tiny["data"], root / f"{runner}-1", p)
    m = load(first["manifest"])
    assert m["status"] == "completed" and m["totals"]["computed"] == 11
    same_results(first, tiny["threads"])
    again = load(run_benchmark(tiny["data"], root / f"{runner}-2", p)["manifest"])
    assert again["totals"]["computed"] == 0 and again["totals"]["cached"] == 11


def test_local_gpu_workers_each_see_one_gpu():
    from distributed import Client, SpecCluster

    with SpecCluster(**gpu_cluster_spec([0, 1]), asynchronous=False) as cluster, Client(cluster) as client:
        futures = [client.submit(lambda i: os.environ.get("CUDA_VISIBLE_DEVICES"), i, resources={"GPU": 1}, pure=False)
                   for i in range(4)]
        seen = client.gather(futures)
        info = client.scheduler_info()["workers"]
    assert set(seen) == {"0", "1"}
    assert sorted(w["resources"]["GPU"] for w in info.values()) == [1, 1]


def test_gpu_requests_follow_the_stage_device():
    p = load_params(REPO / "params.yaml")
    assert not wants_gpu(p, "cuda")  # threads: the process's own devices
    d = with_overrides(p, ["run.runner=dask", "run.gpus=[0, 1]"])
    assert wants_gpu(d, "cuda") and wants_gpu(d, "cuda:0") and not wants_gpu(d, "cpu")
    assert not wants_gpu(with_overrides(p, ["run.runner=dask"]), "cuda")
    assert wants_gpu(with_overrides(p, ["run.runner=ray", "run.gpu_tasks=true"]), "cuda")


def _race(args):
    from d2.env import setup_env

    setup_env()
    import sys

    sys.path.insert(0, args[0])
    toy_stage, root = args[1], Path(args[2])
    import importlib

    from d2.execution.cache import StageSpec, run_stage

    mod = importlib.import_module(toy_stage)
    spec = StageSpec("conditions", mod.compute, (toy_stage,), ("conditions",))
    from d2_toy import toy_params as tp

    p = tp(root)
    return run_stage(spec, "apple", {"input": str(root / "data" / "input" / "apple")}, p, root / "cache")


def test_two_processes_racing_on_one_key_compute_it_once(tmp_path):
    toy = make_toy(tmp_path)
    counter = toy.pkg_dir / "conditions.py"
    counter.write_text(counter.read_text().replace(
        "ACTIVE.append(1)", "open(str(out.parents[3] / 'computations.txt'), 'a').write('x'); ACTIVE.append(1)"))
    (tmp_path / "computations.txt").write_text("")
    ctx = mp.get_context("spawn")
    args = (str(toy.pkg_dir.parent), f"{toy.pkg}.conditions", str(tmp_path))
    with ctx.Pool(2, initializer=os.chdir, initargs=(str(tmp_path),)) as pool:
        results = pool.map(_race, [args, args])
    assert (tmp_path / "computations.txt").read_text() == "x"  # one computation
    assert sorted(r["status"] for r in results) == ["cached", "computed"]
    assert results[0]["content_hash"] == results[1]["content_hash"]


def test_a_dead_workers_half_written_entry_is_never_a_result(tmp_path):
    toy = make_toy(tmp_path)
    p = toy_params(tmp_path)
    m = load(run_benchmark(toy.data, tmp_path / "a", p, stages=toy.stages)["manifest"])
    entry = Path(m["objects"]["apple"]["fit"]["store_dir"]).parent
    (entry / "done.json").unlink()  # as a worker killed between its files and its done.json leaves it
    m2 = load(run_benchmark(toy.data, tmp_path / "b", p, stages=toy.stages)["manifest"])
    assert m2["objects"]["apple"]["fit"]["status"] == "computed" and m2["objects"]["bird"]["fit"]["status"] == "cached"
