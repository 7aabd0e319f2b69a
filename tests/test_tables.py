"""Tables: per-object files with protocol and definitions, 'unavailable' cells, Table 2 with
published rows marked, ablation table and Figure-5 grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from d2.eval.scoring import FrameScore, Results, aggregate
from d2.eval.protocol import Protocol
from d2.eval.tables import (PUBLISHED_TABLE2, UNAVAILABLE, AblationPoint, load_results, results_csv,
                            results_markdown, table2_markdown, write_ablation_table, write_figure_grid,
                            write_results)
from d2.utils.io import load_image


def _results(unavailable: dict[str, str] | None = None, protocol: Protocol | None = None) -> Results:
    frames = []
    for o, base in (("ball", 0.9), ("robot", 0.7)):
        for v in ("eval_0", "eval_1"):
            for f in range(2):
                vals = {"clip": base + 0.01 * f, "ssim": base - 0.1, "psnr": 20.0 + f, "lpips": 1 - base}
                frames.append(FrameScore(object=o, view=v, frame=f, values=vals, psnr_capped=(o == "ball" and f == 0)))
    unavailable = unavailable or {}
    metrics = [m for m in ("clip", "lpips", "psnr", "ssim", "fvd")]
    frames = [FrameScore(object=s.object, view=s.view, frame=s.frame, psnr_capped=s.psnr_capped,
                         values={k: v for k, v in s.values.items() if k not in unavailable}) for s in frames]
    per_view, per_object, mean = aggregate(frames, [m for m in metrics if m != "fvd"])
    if "fvd" not in unavailable:
        mean["fvd"] = 123.4
    protocol = protocol or Protocol.paper(resolution=64, metric_definitions="d2")
    return Results(method="d2-test", dataset="toy", protocol=protocol, metrics=metrics,
                   unavailable=unavailable, per_frame=frames, per_view=per_view, per_object=per_object, mean=mean,
                   psnr_capped_frames=sum(s.psnr_capped for s in frames), num_scored_frames=len(frames),
                   generation_time_s=620.0)


def _csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader([line for line in text.splitlines() if not line.startswith("#")]))


def test_results_files_carry_protocol_and_values(tmp_path: Path):
    res = _results()
    files = write_results(res, tmp_path)
    assert set(files) == {"json", "csv", "md", "tex", "table2_md", "table2_tex"}
    text = files["csv"].read_text()
    first = text.splitlines()[0]
    assert first.startswith("# protocol: ")
    assert Protocol.model_validate_json(first[len("# protocol: "):]) == res.protocol
    rows = _csv_rows(text)
    assert rows[0] == ["object", "clip", "lpips", "psnr", "ssim", "fvd"]
    assert [r[0] for r in rows[1:]] == ["ball", "robot", "mean"]
    assert float(rows[1][1]) == pytest.approx(0.905, abs=1e-4) and float(rows[3][1]) == pytest.approx(0.805, abs=1e-4)
    assert rows[1][5] == "-" and float(rows[3][5]) == pytest.approx(123.4)  # FVD is pooled: mean row only
    md = files["md"].read_text()
    for needle in ("front-and-25-frames", "ground-truth frames 0-24", "front = 0 deg", "Gaussian window 11x11", "Frechet"):
        assert needle in md
    assert "100.00" not in md and "20.50†" in md  # the capped object's PSNR is marked
    tex = files["tex"].read_text()
    assert r"\begin{tabular}" in tex and r"\toprule" in tex and "front-and-25-frames" in tex
    back = load_results(tmp_path)
    assert back.mean == res.mean and back.protocol == res.protocol and len(back.per_frame) == len(res.per_frame)
    assert json.loads(files["json"].read_text())["protocol"]["num_frames"] == 25


def test_unavailable_metric_shows_as_unavailable_with_reason(tmp_path: Path):
    res = _results({"lpips": "lpips: VGG16 ImageNet weights not found; looked for /x/vgg16-397923af.pth",
                    "fvd": "fvd: no I3D"})
    rows = _csv_rows(results_csv(res))
    col = rows[0].index("lpips")
    assert all(r[col] == UNAVAILABLE for r in rows[1:])
    assert all(r[rows[0].index("fvd")] == UNAVAILABLE for r in rows[1:])
    md = results_markdown(res)
    assert "LPIPS unavailable: VGG16 ImageNet weights not found; looked for /x/vgg16-397923af.pth" in md
    assert md.count(UNAVAILABLE) >= 6


def test_table2_marks_published_rows_and_adds_ours():
    res = _results(protocol=Protocol.paper())
    md = table2_markdown(res)
    lines = [line for line in md.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(lines) == len(PUBLISHED_TABLE2) + 1
    assert all("(published)" in line for line in lines[:-1])
    assert "| Diffusion² (published) | Photogrammetry-based | 0.94 | 10 min |" in md
    assert "| Consistent4D (published) | Optimization-based | 0.87 | 2 h |" in md
    assert lines[-1].startswith("| d2-test (measured) |") and f"{res.mean['clip']:.4f}" in lines[-1]
    assert "10.3 min" in lines[-1]
    no_clip = table2_markdown(_results({"clip": "clip: weights missing"}, protocol=Protocol.consistent4d()))
    assert "(measured) | Photogrammetry-based | unavailable" in no_clip
    assert md.splitlines()[0].startswith("**Protocol 'front-and-25-frames', metric definitions 'consistent4d'")


@pytest.mark.parametrize("protocol, why", [(Protocol.d2_clean(), "metric definitions 'd2' are ours"),
                                           (Protocol.consistent4d(resolution=64), "not the script's 512x512")])
def test_table2_compares_published_rows_only_under_the_script_definitions(protocol: Protocol, why: str):
    md = table2_markdown(_results(protocol=protocol))
    rows = [line for line in md.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(rows) == 1 and rows[0].startswith("| d2-test (measured) |")
    assert "(published)" not in md and "Published rows omitted" in md and why in md
    assert f"Protocol '{protocol.name}'" in md.splitlines()[0]


def test_tables_label_protocol_definitions_and_pooled_fvd():
    c4d = results_markdown(_results(protocol=Protocol.consistent4d()))
    assert c4d.startswith("**Protocol 'consistent4d', metric definitions 'consistent4d' "
                          "(Consistent4D's evaluation script)")
    assert "FVD (pooled) ↓" in c4d and "np.cov of one vector is NaN" in c4d
    assert "FVD (pooled): pooled over the benchmark, not Consistent4D's per-view FVD" in c4d
    assert "torchmetrics structural_similarity_index_measure" in c4d and "PSNR not finite" in c4d
    ours = results_markdown(_results(protocol=Protocol.d2_clean()))
    assert "metric definitions 'd2' (ours)" in ours and "scikit-image" in ours and "PSNR capped" in ours


def test_ablation_table_and_figure_grid(tmp_path: Path):
    pts = [AblationPoint(label="video only", params={"s0": 1.0, "k": 0}, metrics={"ssim": 0.5}, time_s=30.0,
                         peak_gpu_memory=3 * 2**30 // 2, protocol="Protocol 'c4d'"),
           AblationPoint(label="s0=0.5,k=10", params={"s0": 0.5, "k": 10}, metrics={"ssim": 0.61},
                         unavailable={"clip": "no weights"}, peak_gpu_memory="cpu", protocol="Protocol 'c4d'",
                         ignored=["sampling.s0"])]
    files = write_ablation_table(pts, tmp_path, ["clip", "ssim"], protocol_text="Protocol X")
    text = files["csv"].read_text()
    assert text.startswith("# One row per sweep point. Protocol 'c4d'\n")  # the caption names the one protocol
    rows = list(csv.reader(line for line in text.splitlines() if not line.startswith("#")))
    assert rows[0][:3] == ["point", "s0", "k"] and rows[0][-2:] == ["time per asset ↓", "peak GPU memory ↓"]
    assert rows[1][3] == "-" and rows[2][3] == UNAVAILABLE and rows[2][4] == "0.6100"
    assert rows[1][-2:] == ["30.0 s", "1.50 GiB"] and rows[2][-2:] == ["-", "cpu"]
    md = files["md"].read_text()
    assert md.startswith("**One row per sweep point. Protocol 'c4d'**") and "Protocol X" in md and "no weights" in md
    assert "s0=0.5,k=10: its sampling method does not read sampling.s0" in md
    assert "CLIP unavailable at s0=0.5,k=10: no weights" in md
    both = write_ablation_table([p.model_copy(update={"unavailable": {"clip": "no weights"}}) for p in pts],
                                tmp_path / "both", ["clip"])["md"].read_text()
    assert both.count("no weights") == 1 and "CLIP unavailable at every point: no weights" in both
    assert "\\caption{One row per sweep point. Protocol 'c4d'}" in files["tex"].read_text()
    # points scored under different protocols: a protocol column, and the caption says they do not compare
    mixed = write_ablation_table([pts[0], pts[1].model_copy(update={"protocol": "Protocol 'd2'"})], tmp_path / "m",
                                 ["ssim"])
    md = mixed["md"].read_text()
    assert "| point | s0 | k | protocol |" in md and "do not compare" in md.splitlines()[0]
    with pytest.raises(ValueError, match="at least one"):
        write_ablation_table([], tmp_path, ["ssim"])
    imgs = torch.rand(2, 3, 3, 16, 16)
    p = write_figure_grid(imgs, tmp_path / "fig5.png", row_labels=["a", "b"], col_labels=["v0", "v1", "v2"])
    img = load_image(p)
    assert img.shape[1] > 2 * 16 and img.shape[2] > 3 * 16
    with pytest.raises(ValueError, match="row labels"):
        write_figure_grid(imgs, tmp_path / "bad.png", row_labels=["a"])
