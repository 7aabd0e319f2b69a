"""Faults that used to give wrong results: a cache used from another path, a knob named twice in
a sweep, tables naming a dataset they did not score, report URLs with hostile names, NaN in JSON."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from d2.flows import run_benchmark

from d2_toy import make_toy, toy_params


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture
def toy(tmp_path):
    return make_toy(tmp_path)


# ---------------------------------------------------------------------------------------
# A relocatable cache


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every stage output a run folder holds (its copies of the cache entries), by relative path."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes()
            for sub in ("objects", "results") for p in sorted((run_dir / sub).rglob("*")) if p.is_file()}


def rerun(toy, cache: Path, run_dir: Path) -> dict:
    """The toy benchmark with ``cache`` as its cache root; its manifest."""
    params = toy_params(cache.parent, f"run.cache_dir={cache}")
    return load(run_benchmark(toy.data, run_dir, params, stages=toy.stages)["manifest"])


def assert_all_hits(manifest: dict) -> None:
    assert manifest["status"] == "completed"
    assert (manifest["totals"]["computed"], manifest["totals"]["cached"]) == (0, 11), manifest["totals"]


def names_no_path(cache: Path, *paths: Path) -> list[str]:
    """Files in ``cache`` whose name or bytes hold one of ``paths`` (absolute or resolved)."""
    needles = {str(p).encode() for p in paths} | {str(p.resolve()).encode() for p in paths}
    return [str(f) for f in cache.rglob("*") if any(n in str(f.relative_to(cache)).encode() for n in needles)
            or (f.is_file() and any(n in f.read_bytes() for n in needles))]


def test_a_copied_cache_serves_verified_hits_from_the_copy_never_from_the_original(toy, tmp_path):
    original = tmp_path / "cache"
    first = rerun(toy, original, tmp_path / "a")
    assert first["totals"]["computed"] == 11
    assert names_no_path(original, tmp_path) == []  # no record, entry or lock names where it lives
    expected = run_files(tmp_path / "a")
    copy = tmp_path / "elsewhere" / "cache"
    shutil.copytree(original, copy, symlinks=True)
    truncated = {}
    for f in sorted(original.rglob("*")):  # the original is corrupted: every stored file cut short
        if f.is_file() and "/out/" in f.as_posix():
            f.write_bytes(f.read_bytes()[:2])
            truncated[f] = f.read_bytes()
    assert len(truncated) >= 11
    m = rerun(toy, copy, tmp_path / "b")
    assert_all_hits(m)
    assert run_files(tmp_path / "b") == expected  # byte-identical outputs, from the copy
    assert all(Path(s["store_dir"]).is_relative_to(copy) for s in m["stages"])
    assert {f: f.read_bytes() for f in truncated} == truncated  # the original was neither read nor repaired
    shutil.rmtree(original)  # and the copy does not need it at all
    assert_all_hits(rerun(toy, copy, tmp_path / "c"))
    assert run_files(tmp_path / "c") == expected


def test_a_moved_cache_serves_verified_hits(toy, tmp_path):
    built = tmp_path / "cache"
    rerun(toy, built, tmp_path / "a")
    expected = run_files(tmp_path / "a")
    moved = tmp_path / "moved" / "d2cache"
    moved.parent.mkdir()
    os.rename(built, moved)
    m = rerun(toy, moved, tmp_path / "b")
    assert_all_hits(m)
    assert run_files(tmp_path / "b") == expected
    assert names_no_path(moved, tmp_path) == []


def test_a_cache_mounted_at_another_path_on_another_node_serves_verified_hits(toy, tmp_path):
    """One shared store, node A mounts it at nodeA/mnt/cache, node B at nodeB/shared/cache (where
    nodeA's path does not exist); mount points are symlinks here, used as given (not resolved)."""
    store = tmp_path / "store"
    store.mkdir()
    mount_a = tmp_path / "nodeA" / "mnt" / "cache"
    mount_a.parent.mkdir(parents=True)
    mount_a.symlink_to(store, target_is_directory=True)
    built = rerun(toy, mount_a, tmp_path / "a")
    assert built["totals"]["computed"] == 11
    assert all(Path(s["store_dir"]).is_relative_to(mount_a) for s in built["stages"])  # used through its mount
    expected = run_files(tmp_path / "a")
    shutil.rmtree(tmp_path / "nodeA")  # node B has no such path
    mount_b = tmp_path / "nodeB" / "shared" / "cache"
    mount_b.parent.mkdir(parents=True)
    mount_b.symlink_to(store, target_is_directory=True)
    m = rerun(toy, mount_b, tmp_path / "b")
    assert_all_hits(m)
    assert all(Path(s["store_dir"]).is_relative_to(mount_b) for s in m["stages"])
    assert run_files(tmp_path / "b") == expected
    assert names_no_path(store, mount_a, store) == []


# ---------------------------------------------------------------------------------------
# A knob named twice in a sweep


@pytest.mark.parametrize("axes", [["sampling.s0=0.3", "sampling.logistic_s0=0.5"],
                                  ["sampling.logistic_k=10", "sampling.k=20,30"],
                                  ["sampling.s0=0.3", " sampling.s0 =0.5"]])
def test_a_sweep_naming_one_knob_twice_is_refused_in_one_line_before_any_work(axes, tmp_path, capsys):
    import time

    from d2.cli import main

    argv = ["sweep", "--out", str(tmp_path / "sweep"), "--data", str(tmp_path / "no-data-needed")]
    for a in axes:
        argv += ["--grid", a]
    t = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t < 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "sweep grid:" in err and "give each knob one --grid axis" in err
    first, second = (a.split("=")[0].strip() for a in axes)
    assert f"'{first}'" in err and (first == second or f"'{second}'" in err), err
    assert not (tmp_path / "sweep").exists()


def test_grid_parsing_and_expansion_refuse_an_alias_beside_its_full_name():
    from d2.config import ParamsError, load_params
    from d2.flows.sweep import expand_grid, parse_grid
    from d2.validation import InputError, check_grid

    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    with pytest.raises(ParamsError, match="both set sampling.logistic_s0"):
        parse_grid(["sampling.s0=0.3", "sampling.logistic_s0=0.5"])
    with pytest.raises(InputError, match="both set sampling.logistic_k"):
        check_grid(p, ["sampling.k=10", "sampling.logistic_k=10"])
    with pytest.raises(ParamsError, match="both set sampling.logistic_s0"):
        expand_grid(p, {"sampling.logistic_s0": [0.5], "sampling.s0": [0.3]})
    # distinct knobs are one point per combination, each row labelled with the value it ran
    points = expand_grid(p, parse_grid(["sampling.s0=0.3,0.5", "sampling.k=10"]))
    assert [(pid, q.sampling.logistic_s0, q.sampling.logistic_k) for pid, _, q in points] == [
        ("p00_s0=0.3_k=10", 0.3, 10.0), ("p01_s0=0.5_k=10", 0.5, 10.0)]
