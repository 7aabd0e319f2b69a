"""Benchmark loader (round trip of the generator's output), evaluate() and the aggregation order."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from d2.eval import metrics as M
from d2.eval.scoring import (BenchmarkError, FrameScore, aggregate, evaluate, evaluate_command, load_benchmark)
from d2.eval.protocol import Protocol
from d2.stages.cameras import OrbitSpec, frame_times
from d2.utils.io import load_image, save_image
from d2.world import PrepareConfig, generate_benchmark, make_scene

OBJECTS = ["bouncing_ball", "waving_robot"]
FRAMES = 3
RES = 24


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "mini"
    cfg = PrepareConfig(objects=OBJECTS, num_frames=FRAMES, resolution=RES, num_gaussians=300, progress=False,
                        backend="torch")
    return generate_benchmark(root, cfg)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return M.tiny_clip_model(), M.build_lpips(random_backbone=True)


def _protocol(**kw) -> Protocol:
    base = dict(num_frames=FRAMES, resolution=32, metric_definitions="d2")
    base.update(kw)
    return Protocol(**base)


def _copy_as_prediction(bench: Path, pred: Path, front: bool = False) -> Path:
    for obj in OBJECTS:
        for k in range(4):
            shutil.copytree(bench / "gt" / obj / f"eval_{k}", pred / obj / f"eval_{k}")
        if front:
            shutil.copytree(bench / "input" / obj, pred / obj / "front")
    return pred


def test_aggregation_order_hand_computed():
    def fs(o, v, f, x):
        return FrameScore(object=o, view=v, frame=f, values={"ssim": x})

    frames = [fs("A", "eval_0", 0, 1.0), fs("A", "eval_0", 1, 2.0), fs("A", "eval_0", 2, 3.0), fs("A", "eval_1", 0, 10.0),
              fs("B", "eval_0", 0, 0.0), fs("B", "eval_0", 1, 0.0), fs("B", "eval_1", 0, 4.0)]
    per_view, per_object, mean = aggregate(frames, ["ssim"])
    assert per_view["A"]["eval_0"]["ssim"] == pytest.approx(2.0)
    assert per_view["A"]["eval_1"]["ssim"] == pytest.approx(10.0)
    assert per_object["A"]["ssim"] == pytest.approx(6.0)  # (2 + 10) / 2
    assert per_object["B"]["ssim"] == pytest.approx(2.0)  # (0 + 4) / 2
    assert mean["ssim"] == pytest.approx(4.0)  # (6 + 2) / 2, not the pooled 20 / 7
    assert list(per_object) == ["A", "B"]


def test_loader_round_trips_generator_output(bench: Path):
    data = load_benchmark(bench)
    assert data.objects == OBJECTS
    assert data.meta is not None and data.meta["num_frames"] == FRAMES
    assert load_benchmark(bench / "gt").objects == OBJECTS  # the gt folder itself works too
    for obj in OBJECTS:
        assert data.views(obj) == ["eval_0", "eval_1", "eval_2", "eval_3"]
        assert list(data.input_paths(obj)) == list(range(FRAMES))
    # the loaded ground truth equals a fresh render up to 8-bit quantisation
    scene = make_scene("waving_robot", num_gaussians=300)
    cam = data.meta["camera"]
    spec = OrbitSpec(radius=cam["radius"], fov_deg=cam["fov_deg"], elevation_deg=cam["elevation_deg"])
    imgs = scene.render([cam["input_azimuth_deg"]] + cam["eval_azimuths_deg"], frame_times(FRAMES), RES, spec,
                        backend="torch")  # [5, F, 3, H, W]
    assert (data.load_input("waving_robot") - imgs[0]).abs().max() <= 0.5 / 255 + 1e-6
    for k in range(4):
        got = data.load_view("waving_robot", f"eval_{k}")
        assert got.shape == (FRAMES, 3, RES, RES)
        assert (got - imgs[k + 1]).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(BenchmarkError, match="missing frame"):
        data.load_view("waving_robot", "eval_0", frames=[0, 7])


def test_identical_prediction_scores_perfectly(bench: Path, tmp_path: Path, nets):
    clip, lp = nets
    pred = _copy_as_prediction(bench, tmp_path / "pred", front=True)
    suite = M.build_metric_suite(M.MetricsConfig(metrics=["clip", "lpips", "psnr", "ssim"]), clip_model=clip,
                                 lpips_net=lp, definitions="d2")
    res = evaluate(pred, bench, _protocol(include_front_view=True), suite=suite, progress=False,
                   out_dir=tmp_path / "out")
    assert res.num_scored_frames == len(OBJECTS) * 5 * FRAMES
    assert res.mean["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert res.mean["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert res.mean["clip"] == pytest.approx(1.0, abs=1e-5)
    assert res.mean["psnr"] == pytest.approx(M.PSNR_CAP_DB) and res.psnr_capped_frames == res.num_scored_frames
    assert set(res.per_view["bouncing_ball"]) == {"eval_0", "eval_1", "eval_2", "eval_3", "front"}
    assert (tmp_path / "out" / "results.csv").is_file()


def test_wrong_prediction_scores_worse_and_views_differ(bench: Path, tmp_path: Path, nets):
    clip, lp = nets
    pred = _copy_as_prediction(bench, tmp_path / "pred")
    # view eval_1 of the robot gets the ball's frames instead
    shutil.rmtree(pred / "waving_robot" / "eval_1")
    shutil.copytree(bench / "gt" / "bouncing_ball" / "eval_1", pred / "waving_robot" / "eval_1")
    suite = M.build_metric_suite(M.MetricsConfig(metrics=["lpips", "psnr", "ssim"]), lpips_net=lp, definitions="d2")
    res = evaluate(pred, bench, _protocol(), suite=suite, progress=False)
    robot = res.per_view["waving_robot"]
    assert robot["eval_1"]["ssim"] < 0.99 and robot["eval_0"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert robot["eval_1"]["lpips"] > 0.0
    assert res.per_object["bouncing_ball"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert res.mean["ssim"] == pytest.approx((1.0 + (3 + robot["eval_1"]["ssim"]) / 4) / 2, abs=1e-9)
    assert res.psnr_capped_frames == res.num_scored_frames - FRAMES


def test_missing_weights_unavailable_and_required_metrics_error(bench: Path, tmp_path: Path):
    pred = _copy_as_prediction(bench, tmp_path / "pred")
    cfg = M.MetricsConfig(clip_weights=tmp_path / "no_clip.bin", lpips_vgg_weights=tmp_path / "no_vgg.pth",
                          i3d_weights=tmp_path / "no_i3d.pt")
    res = evaluate(pred, bench, _protocol(), metrics_cfg=cfg, progress=False, out_dir=tmp_path / "out")
    assert set(res.unavailable) == {"clip", "lpips", "fvd"}
    assert "clip" not in res.mean and "ssim" in res.mean
    md = (tmp_path / "out" / "results.md").read_text()
    assert "unavailable" in md and "no_vgg.pth" in md
    with pytest.raises(M.MetricUnavailable, match="clip"):
        evaluate(pred, bench, _protocol(), metrics_cfg=cfg, require_metrics="clip,lpips", progress=False)
    # the CLI entry point: same error, and the table when nothing is required
    with pytest.raises(M.MetricUnavailable, match="no_vgg.pth"):
        evaluate_command(pred, bench, tmp_path / "cli", require_metrics="lpips", protocol=_protocol(),
                         metrics_cfg=cfg, progress=False, print_fn=lambda s: None)
    printed: list[str] = []
    evaluate_command(pred, bench, tmp_path / "cli", protocol=_protocol(), metrics_cfg=cfg, progress=False,
                     print_fn=printed.append)
    assert "unavailable" in printed[0] and (tmp_path / "cli" / "table2.md").is_file()


def test_fvd_with_pluggable_extractor(bench: Path, tmp_path: Path):
    pred = _copy_as_prediction(bench, tmp_path / "pred")

    def extractor(videos: torch.Tensor) -> torch.Tensor:  # [B, T, 3, H, W] -> [B, 3]
        return videos.mean(dim=(1, 3, 4))

    suite = M.build_metric_suite(M.MetricsConfig(metrics=["ssim", "fvd"]), video_extractor=extractor,
                                 definitions="d2")
    res = evaluate(pred, bench, _protocol(), suite=suite, progress=False)
    assert res.mean["fvd"] == pytest.approx(0.0, abs=1e-6)
    assert "fvd" not in res.per_object["waving_robot"]


def test_frames_scored_are_the_predictions_frames_paired_by_number(bench: Path, tmp_path: Path):
    """protocol.num_frames None scores render i against ground-truth frame i over the rendered
    frames (Consistent4D's script pairs over the predictions), and the results say which."""
    pred = _copy_as_prediction(bench, tmp_path / "pred")
    for view in (pred / "bouncing_ball").iterdir():  # this object was rendered for frames 0-1 only
        (view / f"{FRAMES - 1}.png").unlink()
    cfg = M.MetricsConfig(metrics=["psnr"])
    res = evaluate(pred, bench, _protocol(num_frames=None), metrics_cfg=cfg, progress=False,
                   out_dir=tmp_path / "out")
    scored = {(s.object, s.view): [] for s in res.per_frame}
    for s in res.per_frame:
        scored[(s.object, s.view)].append(s.frame)
    assert scored[("bouncing_ball", "eval_0")] == list(range(FRAMES - 1))
    assert scored[("waving_robot", "eval_0")] == list(range(FRAMES))
    assert res.frames == {"scored": f"0-{FRAMES - 2}; 0-{FRAMES - 1}", "per_view": [FRAMES - 1, FRAMES],
                          "ground_truth": FRAMES}
    assert "Frames scored: 0-1; 0-2" in (tmp_path / "out" / "results.md").read_text()
    # a rendered frame the ground truth lacks cannot be paired
    shutil.copy(pred / "waving_robot" / "eval_1" / "0.png", pred / "waving_robot" / "eval_1" / f"{FRAMES + 4}.png")
    with pytest.raises(BenchmarkError, match=rf"waving_robot/eval_1 has {FRAMES} frame\(s\) but {FRAMES + 1} are "
                                             rf"scored .*lacks \[{FRAMES + 4}\]"):
        evaluate(pred, bench, _protocol(num_frames=None), metrics_cfg=cfg, progress=False)


def test_layout_errors_name_the_problem(bench: Path, tmp_path: Path):
    pred = _copy_as_prediction(bench, tmp_path / "pred")
    (pred / "bouncing_ball" / "eval_2" / "1.png").unlink()
    cfg = M.MetricsConfig(metrics=["ssim"])
    with pytest.raises(BenchmarkError, match=r"eval_2: missing frame\(s\) \[1\]"):
        evaluate(pred, bench, _protocol(), metrics_cfg=cfg, progress=False)
    with pytest.raises(BenchmarkError, match=rf"has {FRAMES} frame\(s\) but {FRAMES + 2} are scored .*lacks \[3, 4\]"):
        evaluate(pred, bench, _protocol(num_frames=FRAMES + 2), metrics_cfg=cfg, progress=False)
    with pytest.raises(BenchmarkError, match="front"):
        evaluate(pred, bench, _protocol(include_front_view=True), metrics_cfg=cfg, progress=False)
    with pytest.raises(BenchmarkError, match="not in the ground truth"):
        evaluate(pred, bench, _protocol(), metrics_cfg=cfg, objects=["teapot"], progress=False)
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark(tmp_path / "nowhere")


def test_rgba_predictions_are_composited_on_the_protocol_background(bench: Path, tmp_path: Path):
    pred = _copy_as_prediction(bench, tmp_path / "pred")
    from PIL import Image
    import numpy as np

    # replace one prediction frame by a fully transparent RGBA image: on white it equals a white image
    p = pred / "bouncing_ball" / "eval_0" / "0.png"
    Image.fromarray(np.zeros((RES, RES, 4), dtype=np.uint8)).save(p)
    save_image(tmp_path / "white.png", torch.ones(3, RES, RES))
    assert torch.equal(load_image(p), load_image(tmp_path / "white.png"))
    res = evaluate(pred, bench, _protocol(), metrics_cfg=M.MetricsConfig(metrics=["psnr"]), progress=False)
    frame0 = [s for s in res.per_frame if s.object == "bouncing_ball" and s.view == "eval_0" and s.frame == 0][0]
    assert not frame0.psnr_capped and frame0.values["psnr"] < 40


def test_consistent4d_protocol_equals_the_script_per_frame_and_aggregated(tmp_path: Path):
    """evaluate() under the consistent4d protocol against the script's main loop (RGBA ground truth
    put on white, images of different sizes, 2 objects x 4 views x 2 frames): every per-image value
    and the per-object and overall means to 1e-6 (PSNR: to 2e-5 dB, see c4d_reference.close;
    the script averages float32 tensors in float32, we average in float64)."""
    from c4d_reference import close, script_main, tiny_hf_clip, write_tree

    model, processor = tiny_hf_clip()
    gt_dir, pred_dir = write_tree(tmp_path, ["obj_a", "obj_b"], frames=2)
    ref, ref_frames = script_main(gt_dir / "gt", pred_dir, model, processor, gt_rgba=True)
    suite = M.build_metric_suite(M.MetricsConfig(metrics=["clip", "psnr", "ssim"]), clip_model=model,
                                 clip_processor=processor, definitions="consistent4d")
    res = evaluate(pred_dir, gt_dir, Protocol.consistent4d(num_frames=2), suite=suite, progress=False,
                   out_dir=tmp_path / "out")
    assert res.num_scored_frames == len(ref_frames) == 16
    for s in res.per_frame:
        for m in ("clip", "psnr", "ssim"):
            assert close(m, s.values[m], ref_frames[(s.object, s.view, s.frame)][m]), (s, ref_frames[
                (s.object, s.view, s.frame)])
    for m in ("clip", "psnr", "ssim"):
        for o in ("obj_a", "obj_b"):
            assert close(m, res.per_object[o][m], float(ref[m][o])), (m, o, res.per_object[o][m], ref[m][o])
        assert close(m, res.mean[m], float(ref[m]["average"])), (m, res.mean[m], ref[m]["average"])
    # the mid-range images make the data-range choices matter: with a fixed range of 255 PSNR would differ
    assert min(s.values["psnr"] for s in res.per_frame) < 40 and res.psnr_capped_frames == 0
    back = (tmp_path / "out" / "results.md").read_text()
    assert "metric definitions 'consistent4d'" in back
    # a suite of the other definitions is refused before scoring
    with pytest.raises(ValueError, match="definitions"):
        evaluate(pred_dir, gt_dir, Protocol.d2_clean(num_frames=2), suite=suite, progress=False)


def test_identical_prediction_under_consistent4d_gives_infinite_psnr(bench: Path, tmp_path: Path):
    """The script's PSNR of identical images is +inf (no cap); it is kept in memory and flagged, and
    results.json (strict JSON) holds null for it with the flag, not a bare Infinity."""
    import json
    from d2.eval.tables import load_results

    pred = _copy_as_prediction(bench, tmp_path / "pred")
    cfg = M.MetricsConfig(metrics=["psnr"])
    res = evaluate(pred, bench, Protocol.consistent4d(num_frames=1), metrics_cfg=cfg, progress=False,
                   objects=["bouncing_ball"], out_dir=tmp_path / "out")
    assert res.mean["psnr"] == float("inf") and res.psnr_capped_frames == res.num_scored_frames == 4
    text = (tmp_path / "out" / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"results.json holds a bare {c}"))
    back = load_results(tmp_path / "out")
    assert back.mean["psnr"] is None and back.per_frame[0].values["psnr"] is None
    assert back.psnr_capped_frames == back.num_scored_frames == 4
