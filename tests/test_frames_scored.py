"""Which ground-truth frames an asset is scored on, and at which time each render is drawn.

An asset made of input frames s_0 < ... < s_{F-1} is rendered at the time of every ground-truth
frame it covers (frame i at t = (i - s_0) / (s_{F-1} - s_0)) and render i is scored against
ground-truth frame i, as Consistent4D's script pairs them over the predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d2.config import load_params, preset_path
from d2.eval import metrics as M
from d2.eval.scoring import BenchmarkData, evaluate_dirs
from d2.eval.protocol import FramePairingError, Protocol, frames_to_score
from d2.stages.cameras import OrbitSpec
from d2.stages.conditions import ConditionsConfig, source_frames
from d2.stages.export import GAUSSIANS_FILE, render_views, save_gaussians
from d2.stages.gaussians import procedural_gaussians
from d2.execution.stages import compute_render_eval
from d2.utils.io import load_image, save_image
from d2.validation import InputError, scored_frames

AZIMUTHS = [-75.0, 15.0, 105.0, 195.0]
RES = 24


def test_frames_to_score_covers_the_span_of_the_source_frames():
    # the paper's shape: 25 input frames 0..24 of Consistent4D's 32
    f = frames_to_score(list(range(25)), None)
    assert list(f) == list(range(25)) and f[0] == 0.0 and f[24] == 1.0 and f[12] == pytest.approx(0.5)
    # a stride: the frames between two source frames are covered too, at their own times
    f = frames_to_score([3, 5, 7, 9], None)
    assert list(f) == [3, 4, 5, 6, 7, 8, 9] and f[4] == pytest.approx(1 / 6) and f[9] == 1.0
    # the protocol's first frames, when the asset covers them
    assert list(frames_to_score(list(range(25)), 8)) == list(range(8))
    assert frames_to_score([0], None) == {0: 0.0}
    # the mismatch that cost a whole GPU run: 32 frames asked, 25 covered
    with pytest.raises(FramePairingError, match=r"num_frames = 32 .* covers 25 frame\(s\) \(0-24"):
        frames_to_score(list(range(25)), 32)
    with pytest.raises(FramePairingError, match="covers 4 frame"):
        frames_to_score([2, 3, 4, 5], 4)  # frames 0 and 1 lie before the asset's first frame


def test_source_frames_follow_the_conditions_knobs():
    cfg = ConditionsConfig(num_frames=4, frame_start=2, frame_stride=3)
    assert source_frames(cfg, "video") == [2, 5, 8, 11]
    assert source_frames(cfg, "image") == [0, 1, 2, 3] == source_frames(cfg, "orbit")


def test_every_preset_pairs_with_consistent4d_frames_and_the_check_names_both_counts():
    for name in ("authors", "paper", "fast"):
        p = load_params(preset_path(name))
        assert scored_frames(p, "video") == list(range(25)), name  # 25 of the 32 ground-truth frames
    p = load_params(preset_path("paper"), ["protocol.num_frames=32"])
    with pytest.raises(InputError, match=r"num_frames = 32 scores ground-truth frames 0-31, but the asset covers "
                                         r"25 frame"):
        scored_frames(p, "video")


def _moving_asset(tmp_path: Path) -> Path:
    """Gaussians that move and change colour over t in [0, 1], saved as a fit folder."""
    g = procedural_gaussians(40, seed=4)
    with torch.no_grad():
        g.quats_l[:, 1] = 0.5  # every Gaussian moves along x over time
        g.quats_r[:, 1] = 0.5
    state = g.export_state()
    state["orbit"] = {"radius": 2.0, "fov_deg": 33.8, "elevation_deg": 0.0}
    save_gaussians(tmp_path / "fit" / GAUSSIANS_FILE, state)
    return tmp_path / "fit"


def test_render_i_is_drawn_at_the_time_of_ground_truth_frame_i_and_scored_against_it(tmp_path: Path):
    """An asset made of input frames 3, 5, 7, 9, 11 (a video read from frame 3 with stride 2): its
    renders are the ground-truth frames 3..11, each at its own time; scored against ground truth
    rendered from the same Gaussians at those times every pair is identical (PSNR at the cap),
    while pairing render i with any other frame would not be."""
    from d2.stages.gaussians import Gaussians4D
    from d2.stages.export import read_gaussians_state

    fit = _moving_asset(tmp_path)
    g = Gaussians4D.from_state(read_gaussians_state(fit / GAUSSIANS_FILE))
    cond = tmp_path / "conditions"
    cond.mkdir()
    (cond / "conditions.json").write_text(json.dumps({"num_frames": 5, "source_frames": [3, 5, 7, 9, 11]}))
    params = load_params(None, ["protocol.num_frames=null", f"render_eval.resolution={RES}", "render_eval.backend=torch",
                                "render_eval.device=cpu", "protocol.metric_definitions=d2", f"protocol.resolution={RES}"])
    info = compute_render_eval({"gaussians": fit, "conditions": cond}, tmp_path / "pred", params)
    assert info["frames"] == list(range(3, 12)) and info["images"] == 4 * 9
    for k, az in enumerate(AZIMUTHS):
        assert sorted(int(p.stem) for p in (tmp_path / "pred" / f"eval_{k}").iterdir()) == list(range(3, 12))
        # the ground truth: 32 frames, frame i at the asset time of input frame i (clamped outside 3..11)
        times = [min(max((i - 3) / 8, 0.0), 1.0) for i in range(32)]
        gt = render_views(g, [az] * 32, times, OrbitSpec(), RES, backend="torch")
        for i in range(32):
            save_image(tmp_path / "gt" / f"eval_{k}" / f"{i}.png", gt[i])
    for i in (3, 7, 11):  # the render file of frame i is the scene at frame i's time
        assert (load_image(tmp_path / "pred" / "eval_1" / f"{i}.png")
                - load_image(tmp_path / "gt" / "eval_1" / f"{i}.png")).abs().max() <= 1 / 255 + 1e-6
    assert (load_image(tmp_path / "pred" / "eval_1" / "7.png")
            - load_image(tmp_path / "gt" / "eval_1" / "3.png")).abs().max() > 0.05  # the scene moves

    data = BenchmarkData.of_object("obj", tmp_path / "gt")
    suite = M.build_metric_suite(M.MetricsConfig(metrics=["psnr"]), definitions="d2")
    res = evaluate_dirs({"obj": tmp_path / "pred"}, data, Protocol.d2_clean(num_frames=None, resolution=RES),
                        suite=suite, progress=False)
    assert sorted({s.frame for s in res.per_frame}) == list(range(3, 12))
    assert all(s.psnr_capped for s in res.per_frame), [(s.view, s.frame, s.values) for s in res.per_frame]
    assert res.frames == {"scored": "3-11", "per_view": 9, "ground_truth": 32}
