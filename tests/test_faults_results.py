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


@pytest.mark.parametrize("axes", [["sampling.s0=0.3", "sampling.s0=0.5"],
                                  ["sampling.k=10", "sampling.k=20,30"],
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


def test_grid_parsing_and_checking_refuse_a_knob_named_twice():
    from d2.config import load_params
    from d2.validation import InputError, check_grid, grid_points, parse_grid

    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    with pytest.raises(InputError, match="'sampling.s0' given twice"):
        parse_grid(["sampling.s0=0.3", "sampling.s0=0.5"])
    with pytest.raises(InputError, match="'sampling.k' given twice"):
        check_grid(p, ["sampling.k=10", " sampling.k=20"])
    with pytest.raises(InputError, match="unknown parameter 'sampling.logistic_s0'"):  # one name per knob
        grid_points(p, parse_grid(["sampling.logistic_s0=0.5"]))
    # distinct knobs are one point per combination, each row labelled with the value it ran
    points = grid_points(p, parse_grid(["sampling.s0=0.3,0.5", "sampling.k=10"]))
    assert [(pid, q.sampling.s0, q.sampling.k) for pid, _, q in points] == [
        ("p00_s0=0.3_k=10", 0.3, 10.0), ("p01_s0=0.5_k=10", 0.5, 10.0)]


# ---------------------------------------------------------------------------------------
# Tables name the dataset they scored; strict JSON


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny real params (2 objects, MLflow off) and their prepared dataset."""
    from d2_toy import prepare_tiny

    root = tmp_path_factory.mktemp("tiny")
    params, data = prepare_tiny(root)
    return {"root": root, "params": params, "data": data}


def test_tables_name_the_dataset_scored_and_keep_their_key_wherever_it_lies(tiny, tmp_path, monkeypatch, capsys):
    from d2.cli import main

    other = tmp_path / "elsewhere" / "bench7"
    shutil.copytree(tiny["data"], other)  # not run.data_dir, which names tiny["data"]
    monkeypatch.chdir(tmp_path)
    runs = {}
    for label, given in (("abs", str(other)), ("rel", "elsewhere/bench7")):
        argv = ["benchmark", "--params", str(tiny["params"]), "--data", given, "--out", str(tmp_path / label)]
        assert main(argv) == 0
        md = (tmp_path / label / "results" / "results.md").read_text()
        assert f"ground truth: {given};" in md and f": diffusion2 on {given}**" in md
        assert str(tiny["data"]) not in md and "data/mini" not in md
        assert load(tmp_path / label / "results" / "results.json")["dataset"] == given
        assert f"dataset: {given}" in (tmp_path / label / "results" / "results.csv").read_text()
        assert f"on {given}" in capsys.readouterr().out  # the table the command prints
        runs[label] = load(tmp_path / label / "manifest.json")
    # the same ground truth given by another path: every stage, the tables too, is a cache hit
    assert runs["rel"]["objects"]["_benchmark"]["tables"]["status"] == "cached"
    assert runs["rel"]["totals"]["computed"] == 0
    keys = {label: m["objects"]["_benchmark"]["tables"]["key"] for label, m in runs.items()}
    assert keys["rel"] == keys["abs"]
    # d2 report rebuilds the same labelled tables from the run folder
    before = (tmp_path / "rel" / "results" / "results.md").read_text()
    assert main(["report", "--run", str(tmp_path / "rel")]) == 0
    assert (tmp_path / "rel" / "results" / "results.md").read_text() == before


def _black_copy(data: Path, gt: Path, pred: Path) -> None:
    """``gt``: ``data``'s ground truth with every image black (mode and size kept); ``pred``: black
    predictions in the evaluation layout (``<pred>/<object>/eval_k/<i>.png``)."""
    from PIL import Image

    shutil.copytree(data, gt)
    for f in sorted((gt / "gt").rglob("*.png")):
        with Image.open(f) as im:
            mode, size = im.mode, im.size
        Image.new(mode, size, (0,) * len(mode)).save(f)
        p = pred / f.relative_to(gt / "gt")
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (0, 0, 0)).save(p)


def test_black_prediction_vs_black_ground_truth_is_strict_json_and_marked_in_the_table(tiny, tmp_path):
    from d2.cli import main
    from d2.eval.tables import NOT_FINITE_MARK, load_results, results_markdown

    _black_copy(tiny["data"], tmp_path / "gt", tmp_path / "pred")
    assert main(["evaluate", "--params", str(tiny["params"]), "--pred", str(tmp_path / "pred"),
                 "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "ev"),
                 "--set", "protocol.metric_definitions=consistent4d"]) == 0
    text = (tmp_path / "ev" / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds {c}, which is not JSON"))
    assert data["mean"]["psnr"] is None and data["mean"]["ssim"] is None
    assert all(s["values"]["psnr"] is None for s in data["per_frame"]) and len(data["per_frame"]) == 24
    md = (tmp_path / "ev" / "results.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| bouncing_ball") or ln.startswith("| **mean")]
    assert len(rows) == 2 and all(ln.count(f"-{NOT_FINITE_MARK}") == 2 for ln in rows), rows
    assert (f"PSNR not a finite number in 24 of 24 images (cells marked {NOT_FINITE_MARK}, null in results.json): "
            "undefined (identical images give +inf; a constant, e.g. all black, ground truth") in md
    assert f"SSIM not a finite number in 24 of 24 images (cells marked {NOT_FINITE_MARK}" in md
    assert results_markdown(load_results(tmp_path / "ev")) == md  # the same table from results.json
    csv_rows = [ln for ln in (tmp_path / "ev" / "results.csv").read_text().splitlines() if not ln.startswith("#")]
    assert csv_rows[1:] == [f"{o},-{NOT_FINITE_MARK},-{NOT_FINITE_MARK}" for o in ("bouncing_ball", "windmill", "mean")]
    assert r"bouncing\_ball & -$^\ddagger$ & -$^\ddagger$ \\" in (tmp_path / "ev" / "results.tex").read_text()


def test_json_writer_never_lets_a_non_finite_number_out(tmp_path):
    from d2.utils.io import write_json

    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], "c": {"d": 2.5}})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [1.0, None, None],
                                                                         "c": {"d": 2.5}}


# ---------------------------------------------------------------------------------------
# Report URLs with hostile object names

HOSTILE = "a#b?c%41 d&e"  # a fragment, a query, an escape that decodes to another name, a space, an entity


def _links(page: Path) -> list[str]:
    import html
    import re

    return [html.unescape(u) for u in re.findall(r'<(?:img|video|script|a)\s[^>]*(?:src|href)="([^"]*)"',
                                                 page.read_text())]


def test_report_urls_are_percent_encoded_and_resolve_to_the_files(tmp_path):
    import html
    import re
    from urllib.parse import unquote, urlsplit

    from d2.reports.html import build_html_report

    from test_report_html import make_benchmark_run

    run = make_benchmark_run(tmp_path, objects=(HOSTILE, "plain"))
    page = build_html_report(run)
    links = _links(page)
    local = [u for u in links if not urlsplit(u).scheme and not u.startswith("#")]
    assert len(local) >= 2 * 6, links  # every object's images, videos, viewer script and compare link
    for u in local:
        parts = urlsplit(u)
        assert parts.query == "" and parts.fragment == "", u  # no character read as a query or a fragment
        target = page.parent / unquote(parts.path)
        assert target.is_file(), u
        assert target.resolve().is_relative_to(run.resolve())  # the report's media or the run's own files
    hostile = [u for u in local if "a%23b%3Fc%2541%20d%26e" in u]
    assert len(hostile) >= 6 and all(HOSTILE in Path(unquote(u)).parts for u in hostile)  # .../<name>/...
    ids = set(html.unescape(i) for i in re.findall(r'\sid="([^"]*)"', page.read_text()))
    anchors = [unquote(u[1:]) for u in links if u.startswith("#obj-")]
    assert sorted(anchors) == sorted(f"obj-{o}" for o in (HOSTILE, "plain")) and set(anchors) <= ids


def test_report_with_a_hostile_object_name_loads_every_medium_in_chromium(tmp_path):
    from d2.reports.browser import inspect_page
    from d2.reports.html import build_html_report
    from d2.reports.media import MIN_PREVIEW

    from test_report_html import AZ_EVAL, make_benchmark_run, require_browser

    require_browser()
    run = make_benchmark_run(tmp_path, objects=(HOSTILE,))
    page = build_html_report(run)
    res = inspect_page(page)
    assert res["errors"] == [], res["errors"]
    assert len(res["imgs"]) == 2 and all(i["ok"] and i["width"] >= MIN_PREVIEW for i in res["imgs"]), res["imgs"]
    assert len(res["videos"]) == len(AZ_EVAL) + 1 and all(v["ok"] for v in res["videos"]), res["videos"]
    assert res["canvases"] == 1 and res["canvas_ink"][0] > 500, res["canvas_ink"]  # the viewer script loaded


def test_a_score_that_is_no_number_is_marked_in_the_html_report_and_the_ablation_table(tmp_path):
    from d2.eval.tables import AblationPoint, ablation_rows
    from d2.reports.html import build_html_report
    from d2.utils.io import write_json

    from test_report_html import make_benchmark_run

    run = make_benchmark_run(tmp_path, objects=("ball",))
    res = load(run / "results" / "results.json")
    res["per_object"]["ball"]["psnr"], res["mean"]["psnr"] = None, None  # as results.json writes NaN
    write_json(run / "results" / "results.json", res)
    page = build_html_report(run).read_text()
    # the results table's object and mean rows, the object's own scores
    assert page.count("-\u2021") == 3 and "\u2021 not a finite number" in page and "None" not in page
    _, rows = ablation_rows([AblationPoint(label="p00", metrics={"psnr": None, "ssim": 0.5})], ["psnr", "ssim"])
    assert "None" not in str(rows) and "0.5000" in str(rows)
