"""The HTML run report: preview sizes, what the page holds, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from d2.reports.html import build_html_report, svg_plot
from d2.reports.media import MIN_PREVIEW, labelled_grid, text_strip, upscale
from d2.stages.cameras import OrbitSpec, frame_times
from d2.stages.export import GAUSSIANS_FILE, render_turntable, render_views, save_gaussians
from d2.stages.fit import write_matrix
from d2.stages.gaussians import procedural_gaussians
from d2.utils.io import save_image, write_json

AZ_EVAL = [-75.0, 15.0]
ARTIFACTS = Path(os.environ.get("D2_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))



def require_browser() -> None:
    """Browser tests need Chromium: under CI its absence fails the test (.ci/run installs it); on a
    developer machine without it the test is skipped."""
    from d2.reports.browser import find_browser

    if find_browser() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: install Debian's chromium (.ci/run does)")
        pytest.skip("no Chromium on PATH (CI installs Debian's chromium)")

def make_benchmark_run(root: Path, objects: tuple[str, ...] = ("ball",), v: int = 3, f: int = 4, res: int = 16,
                       psnr: float = 20.0) -> Path:
    """A finished benchmark folder in the real stages' layout, from a known 4D scene."""
    run, data = root / "run", root / "data"
    spec = OrbitSpec()
    times = frame_times(f)
    for i, obj in enumerate(objects):
        g = procedural_gaussians(24, seed=i)
        with torch.no_grad():  # faint, as fitted Gaussians are (the WebGL view must still show them)
            g.opacity_logits.fill_(-1.0)
        od = run / "objects" / obj
        az = [360.0 * k / v for k in range(v)]
        matrix = torch.stack([render_views(g, [a] * f, times, spec, res, backend="torch") for a in az])
        write_matrix(od / "sampling", matrix, az, times, spec)
        save_image(od / "conditions" / "input.png", matrix[0, 0])
        for j in range(f):
            save_image(od / "conditions" / "video" / f"frame_{j:02d}.png", matrix[0, j])
        state = g.export_state()
        state["orbit"] = {"radius": spec.radius, "fov_deg": spec.fov_deg, "elevation_deg": spec.elevation_deg,
                          "azimuths_deg": az, "times": times, "resolution": res}
        save_gaussians(od / "fit" / GAUSSIANS_FILE, state)
        render_turntable(g, od / "fit" / "turntable.mp4", spec, res, num_frames=4, fps=12, backend="torch")
        write_json(od / "fit" / "fit.json", {"V": v, "F": f, "resolution": res, "iterations": 0,
                                             "num_gaussians": 24, "train_psnr": 30.0, "matrix_psnr": 31.5})
        for k, a in enumerate(AZ_EVAL):
            pred = render_views(g, [a] * f, times, spec, res, backend="torch")
            for j in range(f):
                save_image(od / "render_eval" / f"eval_{k}" / f"{j}.png", pred[j])
                save_image(data / "gt" / obj / f"eval_{k}" / f"{j}.png", 1 - pred[j])
    scores = {o: {"psnr": psnr + n, "ssim": 0.5} for n, o in enumerate(objects)}
    write_json(run / "results" / "results.json", {
        "metrics": ["psnr", "ssim", "lpips"], "per_object": scores, "unavailable": {"lpips": "no VGG weights"},
        "mean": {"psnr": float(np.mean([s["psnr"] for s in scores.values()])), "ssim": 0.5},
        "generation_time_s": 1.5})
    write_json(run / "params.json", {"protocol": {"eval_azimuths_deg": AZ_EVAL}})
    write_json(run / "manifest.json", {
        "kind": "benchmark", "status": "completed", "data": str(data), "flow_wall_seconds": 3.0,
        "stages": [{"object": o, "stage": "fit", "status": "computed", "compute_seconds": 1.0} for o in objects],
        "mlflow_run_id": "0123abcd", "mlflow_tracking_uri": "sqlite:///mlflow.db", "mlflow_experiment_id": "7"})
    return run


def make_sweep_run(root: Path) -> Path:
    """A finished sweep folder of two points over ``sampling.s0`` (each a benchmark folder)."""
    sweep = root / "sweep"
    points = {"p00_s0=0.3": ["sampling.s0=0.3"], "p01_s0=0.5": ["sampling.s0=0.5"]}
    rows = []
    for n, (pid, ov) in enumerate(points.items()):
        pdir = make_benchmark_run(root / pid, psnr=18.0 + 3 * n)
        pdir.rename(sweep / "points" / pid) if (sweep / "points").is_dir() else (
            (sweep / "points").mkdir(parents=True), pdir.rename(sweep / "points" / pid))
        rows.append({"point": pid, "sampling.s0": ov[0].split("=")[1], "psnr": 18.0 + 3 * n, "ssim": 0.5 - 0.1 * n})
    write_json(sweep / "sweep.json", {"grid": {"sampling.s0": [0.3, 0.5]}, "rows": rows})
    fig = torch.rand(3, 20, 40)
    save_image(sweep / "results" / "figure.png", fig)
    write_json(sweep / "manifest.json", {"kind": "sweep", "status": "completed", "points": points,
                                         "grid": {"sampling.s0": [0.3, 0.5]}, "stages": [], "mlflow_run_id": None})
    return sweep


def media_sources(page: Path) -> list[str]:
    return re.findall(r'<(?:img|video|script)[^>]*\ssrc="([^"]+)"', page.read_text())


def test_preview_sizes_and_labels() -> None:
    for side, expect in ((16, 256), (50, 300), (300, 300)):
        img = np.zeros((side, side, 3), np.uint8)
        assert upscale(img).shape[:2] == (expect, expect)
    up = upscale(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    assert np.array_equal(up[::16, ::16], np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))  # nearest
    cells = [[np.full((16, 16, 3), 40 * r + 10 * c, np.uint8) for c in range(4)] for r in range(3)]
    grid = labelled_grid(cells, ["v0", "v1", "v2"], ["f0", "f1", "f2", "f3"], "views", "frames")
    assert grid.shape[1] >= MIN_PREVIEW and grid.shape[0] >= 3 * 48
    assert (grid[:20] < 128).any() and (grid[:, :20] < 128).any()  # the axis titles are drawn
    strip = text_strip("frames", 100)
    assert strip.shape == (22, 100, 3) and (strip < 128).any()
    assert text_strip("views", 100, vertical=True).shape == (100, 22, 3)


def test_benchmark_report_contents(tmp_path: Path) -> None:
    run = make_benchmark_run(tmp_path, objects=("ball", "cube"))
    page = build_html_report(run)
    assert page == run / "report" / "index.html"
    text = page.read_text()
    # everything it shows is a file next to the page; nothing is fetched from a network
    srcs = media_sources(page)
    assert srcs and all((page.parent / s).is_file() for s in srcs), srcs
    assert not re.search(r'(src|href)="(https?:)?//', text.replace('href="http://127.0.0.1:5000/', ""))
    assert text.count("<video") == 2 * (len(AZ_EVAL) + 1)  # per object: every eval view and the turntable
    assert "0123abcd" in text and "#/experiments/7/runs/0123abcd" in text and "sqlite:///mlflow.db" in text
    assert "ball" in text and "cube" in text and "21.0000" in text and "no VGG weights" in text
    assert "31.5" in text  # the fit's matrix PSNR
    grid = iio.imread(run / "report" / "media" / "ball" / "matrix.png")
    assert min(grid.shape[:2]) >= MIN_PREVIEW
    assert min(iio.imread(run / "report" / "media" / "ball" / "input.png").shape[:2]) >= MIN_PREVIEW
    video = iio.imread(run / "report" / "media" / "ball" / "eval_1.mp4")
    # input | prediction | ground truth, each 256 px under a caption
    assert video.shape[0] == 4 and video.shape[2] >= 3 * 256 and video.shape[1] >= 256
    compare = iio.imread(run / "report" / "media" / "ball" / "compare.mp4")
    assert compare.shape[1] >= len(AZ_EVAL) * 256 and compare.shape[2] == video.shape[2]
    meta = iio.immeta(run / "report" / "media" / "ball" / "eval_1.mp4", plugin="FFMPEG")
    assert meta["codec"] == "h264" and "yuv420p" in meta.get("pix_fmt", "yuv420p")
    splats = (run / "report" / "media" / "ball" / "splats.js").read_text()
    data = json.loads(splats.split("] = ", 1)[1].rstrip(";\n"))
    assert data["n"] == 24 and len(data["frames"]) == 4
    # the same folder gives the same page
    assert build_html_report(run).read_text() == text
    # a damaged Gaussians file costs its viewer, not the page
    (run / "objects" / "cube" / "fit" / GAUSSIANS_FILE).write_bytes(b"not safetensors")
    damaged = build_html_report(run).read_text()
    assert "4D Gaussians: not shown" in damaged and damaged.count("<canvas") == 1


def test_sweep_report_plots_each_metric_against_each_knob(tmp_path: Path) -> None:
    sweep = make_sweep_run(tmp_path)
    text = build_html_report(sweep).read_text()
    assert text.count("<svg") == 2  # psnr and ssim against sampling.s0
    assert 'aria-label="psnr against sampling.s0"' in text
    for pid in ("p00_s0=0.3", "p01_s0=0.5"):
        assert f"points/{pid}/report/index.html" in text
        assert (sweep / "points" / pid / "report" / "index.html").is_file()
    assert min(iio.imread(sweep / "report" / "media" / "figure.png").shape[:2]) >= MIN_PREVIEW
    # per object, every point's matrix and turntable side by side (a missing matrix said as such)
    assert text.count('src="../points/p00_s0=0.3/objects/ball/fit/turntable.mp4"') == 1
    assert text.count('src="../points/p01_s0=0.5/objects/ball/fit/turntable.mp4"') == 1
    assert text.count("no matrix") == 2  # these points' matrices have no grid.png
    save_image(sweep / "points" / "p01_s0=0.5" / "objects" / "ball" / "sampling" / "grid.png", torch.rand(3, 8, 8))
    text = build_html_report(sweep).read_text()
    assert 'src="../points/p01_s0=0.5/objects/ball/sampling/grid.png"' in text and text.count("no matrix") == 1
    svg = svg_plot([0.3, 0.5, 0.5], [1.0, 2.0, 4.0], "k", "m")
    assert svg.count("<circle") == 3 and "<polyline" in svg  # every point, the mean per value joined


def test_report_text_is_escaped_and_scripts_are_inlined_verbatim(tmp_path: Path) -> None:
    """Whatever the folder holds is text on the page, never markup; the page's own CSS and viewer
    script arrive byte for byte."""
    from d2.reports.html import TEMPLATES

    run = tmp_path / "r<b>1"
    write_json(run / "manifest.json", {
        "kind": "generate", "status": "<i>done</i>", "mlflow_run_id": "x\"><script>alert(1)</script>",
        "mlflow_tracking_uri": "file:///m&<u>", "errors": [{"object": "o'", "stage": "fit", "error": "<img src=x>"}]})
    text = build_html_report(run).read_text()
    assert "<b>1" not in text and "<i>done" not in text and "<img src=x>" not in text and "<u>" not in text
    assert "<script>alert" not in text and text.count("<script>") == 1  # the viewer's, nothing else
    assert "r&lt;b&gt;1" in text and "&lt;img src=x&gt;" in text and "file:///m&amp;&lt;u&gt;" in text
    assert 'href="http://127.0.0.1:5000/#/runs/x&#34;&gt;&lt;script&gt;' in text  # an attribute stays one
    for name in ("report.css", "viewer.js"):
        assert (TEMPLATES / name).read_text() in text


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    """The page as a person opens it: no console error, every image decoded, every video playing."""
    from d2.reports.browser import inspect_page

    require_browser()
    run = make_benchmark_run(tmp_path)
    page = build_html_report(run)
    res = inspect_page(page, ARTIFACTS / "report_screenshot.png")
    assert res["errors"] == [] and res["url"] == page.as_uri()
    assert len(res["imgs"]) == 2 and all(i["ok"] and i["width"] >= MIN_PREVIEW for i in res["imgs"]), res["imgs"]
    assert len(res["videos"]) == len(AZ_EVAL) + 1
    assert all(v["ok"] and v["width"] >= 256 for v in res["videos"]), res["videos"]
    assert res["canvases"] == 1 and res["canvas_ink"][0] > 500, res["canvas_ink"]  # the WebGL view draws
    shot = iio.imread(res["screenshot"])
    assert shot.shape[1] == 1280 and shot.shape[0] > 900 and (shot < 128).any()
    # a page with a missing video is caught
    (run / "report" / "media" / "ball" / "eval_0.mp4").unlink()
    bad = inspect_page(run / "report" / "index.html", wait_s=3.0)
    assert bad["errors"] or not all(v["ok"] for v in bad["videos"])
    with pytest.raises(FileNotFoundError):
        inspect_page(run / "report" / "missing.html")


def test_report_previews_go_to_the_mlflow_run(tmp_path: Path) -> None:
    from d2.reports.html import track_report

    run = make_benchmark_run(tmp_path)
    page = build_html_report(run)
    calls: list = []
    tracker = SimpleNamespace(run_id="r1", client=SimpleNamespace(set_tag=lambda *a: calls.append(("tag", a))),
                              log_artifacts=lambda rid, files: calls.append(("files", rid, list(files))))
    track_report(tracker, str(page))
    assert calls[0] == ("tag", ("r1", "d2.report", str(page)))
    files = {(p.name, folder) for p, folder in calls[1][2]}
    assert files == {("index.html", "report"), ("input.png", "report/ball"), ("matrix.png", "report/ball"),
                     ("compare.mp4", "report/ball")}
    track_report(None, str(page))  # MLflow off: nothing to do
    broken = SimpleNamespace(run_id="r1", client=None, log_artifacts=None)
    track_report(broken, str(page))  # an MLflow failure is printed, not raised
