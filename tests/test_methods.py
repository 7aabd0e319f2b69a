"""The sampling methods as benchmark rows: one sweep over ``sampling.method`` on the real stages at
tiny sizes gives one comparison table (a row per method, time per asset, peak GPU memory, the
protocol in its caption) and a report with every method's matrix and turntable per object."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from d2.cli import main

from d2_toy import write_tiny_params

METHODS = ("diffusion2", "video_only", "multiview_only", "static")


@pytest.mark.slow  # ~25 s of CPU: prepare, 4 points through every stage, the report
def test_a_sweep_over_the_methods_is_one_comparison_table_and_one_report(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "compare"
    params = write_tiny_params(tmp_path / "params.yaml", f"run.cache_dir={tmp_path / 'cache'}", "run.progress=false",
                               f"run.data_dir={data}", "run.mlflow=false", "prepare.objects=[windmill]",
                               "fit.iterations=2")
    assert main(["prepare", "--params", str(params)]) == 0
    assert main(["sweep", "--params", str(params), "--data", str(data), "--out", str(out), "--grid",
                 "sampling.method=" + ",".join(METHODS)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    sampling = [s for s in manifest["stages"] if s["stage"] == "sampling"]
    assert sorted(s["info"]["method"] for s in sampling) == sorted(METHODS)
    assert {s["info"]["peak_gpu_memory"] for s in manifest["stages"] if s["stage"] in ("sampling", "fit")} == {"cpu"}

    text = (out / "results" / "ablation.csv").read_text()
    caption = text.splitlines()[0]
    assert caption.startswith("# One row per sweep point. Protocol 'consistent4d'")  # the one protocol, named
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    assert [r["sampling.method"] for r in rows] == list(METHODS)
    times = [float(r["time per asset ↓"].removesuffix(" s")) for r in rows]
    assert all(t > 0 for t in times)
    assert times[3] < times[0]  # static samples nothing: its generation is the cheaper one
    assert [r["peak GPU memory ↓"] for r in rows] == ["cpu"] * 4  # on the CPU: said, not a number
    assert all(re.fullmatch(r"\d+\.\d{2}", r["PSNR ↑"]) for r in rows)
    md = (out / "results" / "ablation.md").read_text()
    assert md.count("| p0") == 4 and "time per asset: the conditions + sampling + fit compute seconds" in md

    page = (out / "report" / "index.html").read_text()
    assert "One row per sweep point. Protocol &#39;consistent4d&#39;" in page
    for i, method in enumerate(METHODS):
        pid = f"p{i:02d}_method={method}"
        assert method in page
        for name in ("sampling/grid.png", "sampling/grid.mp4", "fit/turntable.mp4"):
            src = f"../points/{pid}/objects/windmill/{name}"
            assert f'src="{src}"' in page, src
            assert (out / "points" / pid / "objects" / "windmill" / name).is_file()


def test_peak_gpu_memory_is_the_largest_over_the_cuda_devices_named_and_cpu_elsewhere(monkeypatch) -> None:
    import torch

    from d2.utils.gpu import peak_gpu_memory

    with peak_gpu_memory(["cpu"]) as peak:
        pass
    assert peak == {"peak_gpu_memory": "cpu"}
    reset: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", {"cuda": 5 * 2**20, "cuda:1": 7 * 2**20}.__getitem__)
    with peak_gpu_memory(["auto", "cuda:1", "cpu", "cuda"]) as peak:
        assert reset == ["cuda", "cuda:1"]  # each CUDA device once, before the block
        assert peak == {}
    assert peak == {"peak_gpu_memory": 7 * 2**20}


def test_a_points_peak_gpu_memory_is_the_largest_any_stage_recorded() -> None:
    from d2.reports.run_report import peak_gpu_memory

    stage = lambda peak: {"info": {} if peak is None else {"peak_gpu_memory": peak}}  # noqa: E731
    assert peak_gpu_memory({"stages": [stage("cpu"), stage(3 * 2**30), stage(2**30), stage(None)]}) == 3 * 2**30
    assert peak_gpu_memory({"stages": [stage("cpu"), stage(None)]}) == "cpu"
    assert peak_gpu_memory({"stages": [stage(None)]}) is None  # not recorded: the table says '-', not 0


def test_a_swept_knob_the_points_method_ignores_is_named(tmp_path: Path) -> None:
    from d2.reports.run_report import ignored_knobs
    from d2.utils.io import write_json

    write_json(tmp_path / "objects" / "ball" / "sampling" / "matrix.json", {"ignored_knobs": ["s0", "k"]})
    params = {"sampling.s0": "0.3", "sampling.method": "static", "fit.seed": "1"}
    assert ignored_knobs(tmp_path, params) == ["sampling.s0"]
    assert ignored_knobs(tmp_path / "none", params) == []


@pytest.mark.slow  # ~1 min of CPU: 4 points at SV4D's layout (9 views x 21 frames) through every stage
def test_the_comparison_sweep_holds_both_sv4d_rows_with_the_tiny_backends(tmp_path: Path) -> None:
    """The baselines in the same sweep: SV4D and SV4D 2.0 (its 8-view checkpoint, which shares
    SV4D's 9 x 21 layout) beside Diffusion² and the static reference, one table, one protocol."""
    methods = ("diffusion2", "static", "sv4d", "sv4d2_8views")
    data, out = tmp_path / "data", tmp_path / "compare"
    layout = [f"{s}.{k}={n}" for s in ("conditions", "sampling") for k, n in (("num_views", 9), ("num_frames", 21))]
    params = write_tiny_params(tmp_path / "params.yaml", f"run.cache_dir={tmp_path / 'cache'}", "run.progress=false",
                               f"run.data_dir={data}", "run.mlflow=false", "prepare.objects=[windmill]",
                               "prepare.num_frames=21", "protocol.num_frames=null", "fit.iterations=2", *layout)
    assert main(["prepare", "--params", str(params)]) == 0
    assert main(["sweep", "--params", str(params), "--data", str(data), "--out", str(out), "--grid",
                 "sampling.method=" + ",".join(methods)]) == 0
    text = (out / "results" / "ablation.csv").read_text()
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    assert [r["sampling.method"] for r in rows] == list(methods)
    assert all(re.fullmatch(r"\d+\.\d{2}", r["PSNR ↑"]) for r in rows)
    for i, method in enumerate(methods):
        point = out / "points" / f"p{i:02d}_method={method}"
        matrix = json.loads((point / "objects" / "windmill" / "sampling" / "matrix.json").read_text())
        assert (matrix["method"], matrix["V"], matrix["F"]) == (method, 9, 21)
        assert json.loads((point / "results" / "results.json").read_text())["method"] == method
