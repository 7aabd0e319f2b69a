"""Conditions stage: preprocessing, the three input kinds, outputs and errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from d2.stages.cameras import orbit_azimuths
from d2.stages.conditions import ConditionsConfig, load_conditions, make_conditions, run_conditions
from d2.stages.priors import PriorsConfig, load_priors
from d2.utils.io import InputError, save_image, save_video

R = 32


@pytest.fixture(scope="module")
def tiny():
    return load_priors(PriorsConfig(backend="tiny"))


def _cfg(**kw) -> ConditionsConfig:
    base = dict(num_views=3, num_frames=4, resolution=R, num_steps=2, progress=False)
    base.update(kw)
    return ConditionsConfig(**base)


def _rgba(path, box=(10, 30, 40, 50), size=64, colour=(200, 40, 40), shift=0):
    arr = np.zeros((size, size, 4), np.uint8)
    y0, y1, x0, x1 = box
    arr[y0 + shift:y1 + shift, x0:x1] = (*colour, 255)
    Image.fromarray(arr).save(path)


def _object_box(img: torch.Tensor) -> tuple[int, int, int, int]:
    mask = (1 - img).amax(0) > 0.2
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def test_image_input_preprocessing_and_outputs(tiny, tmp_path):
    _rgba(tmp_path / "obj.png")  # 20 x 10 object in the top right of a transparent 64 x 64 image
    out = run_conditions(tmp_path / "obj.png", tmp_path / "cond", _cfg(object_fraction=0.75), tiny)
    c = load_conditions(out)
    assert c.kind == "image" and c.orbit.shape == (3, 3, R, R) and c.video.shape == (4, 3, R, R)
    # alpha on white, recentred, longer side = 0.75 R = 24 px, centred
    y0, y1, x0, x1 = _object_box(c.input)
    assert (y1 - y0, x1 - x0) == (24, 12)
    assert abs((y0 + y1) / 2 - R / 2) <= 1 and abs((x0 + x1) / 2 - R / 2) <= 1
    assert torch.allclose(c.input[:, 0, 0], torch.ones(3))
    assert torch.allclose(c.input[:, R // 2, R // 2], torch.tensor([200, 40, 40]) / 255, atol=0.02)
    # the sampled orbit's input view is the input; the rest comes from the prior
    assert c.input_view_index == 2 and torch.equal(c.orbit[2], c.input)
    assert (c.orbit[0] - c.input).abs().max() > 0.05
    assert c.azimuths_deg == orbit_azimuths(3) and c.elevation_deg == 10.0
    for name in ["input.png", "orbit/view_00.png", "orbit/view_02.png", "video/frame_03.png", "conditions.json"]:
        assert (out / name).is_file(), name
    meta = json.loads((out / "conditions.json").read_text())
    assert (meta["V"], meta["F"], meta["resolution"], meta["kind"]) == (3, 4, R, "image")
    assert (meta["num_views"], meta["num_frames"]) == (3, 4)
    assert torch.load(out / "conditions.pt", weights_only=True)["orbit"].dtype == torch.uint8


def test_rgb_image_on_white_and_empty_image(tiny, tmp_path):
    arr = np.full((40, 40, 3), 255, np.uint8)
    arr[5:15, 5:25] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "rgb.png")
    c = make_conditions(tmp_path / "rgb.png", _cfg(), tiny)
    y0, y1, x0, x1 = _object_box(c.input)
    assert x1 - x0 == round(0.85 * R) and abs((y0 + y1) / 2 - R / 2) <= 1
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(ValueError, match="no object"):
        make_conditions(tmp_path / "white.png", _cfg(), tiny)


def test_video_folder_first_frame_is_the_reference(tiny, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):  # numeric order: 10, 11 come after 9
        _rgba(folder / f"{i}.png", colour=(20 * i, 100, 100), shift=i)
    c = make_conditions(folder, _cfg(frame_stride=3), tiny)
    assert c.kind == "video" and c.video.shape == (4, 3, R, R)
    # frames 0, 3, 6, 9 with one common box: the object moves down by 3 px per kept frame (scaled)
    reds = [c.video[k][0][_object_box(c.video[k])[0] + 1, R // 2].item() for k in range(4)]
    torch.testing.assert_close(torch.tensor(reds), torch.tensor([0, 60, 120, 180]) / 255, atol=0.02, rtol=0)
    tops = [_object_box(c.video[k])[0] for k in range(4)]
    assert tops[0] < tops[1] < tops[2] < tops[3]
    assert torch.equal(c.input, c.video[0]) and torch.equal(c.orbit[2], c.video[0])
    with pytest.raises(ValueError, match="need 13"):
        make_conditions(folder, _cfg(frame_stride=4), tiny)


def test_video_file_input(tiny, tmp_path):
    frames = torch.ones(5, 3, 48, 48)
    for i in range(5):
        frames[i, :, 10 + i:30 + i, 15:35] = torch.tensor([0.1, 0.2, 0.9])[:, None, None]
    save_video(tmp_path / "clip.mp4", frames, fps=8)
    c = make_conditions(tmp_path / "clip.mp4", _cfg(), tiny)
    assert c.kind == "video" and c.video.shape == (4, 3, R, R)
    assert torch.allclose(c.video[0][:, R // 2, R // 2], torch.tensor([0.1, 0.2, 0.9]), atol=0.08)
    with pytest.raises(ValueError, match="only 5 usable frames"):
        make_conditions(tmp_path / "clip.mp4", _cfg(num_frames=6), tiny)


def test_static_orbit_folder(tiny, tmp_path):
    folder = tmp_path / "orbit"
    folder.mkdir()
    for v in range(3):
        img = torch.ones(3, 40, 40)
        img[:, 10:30, 12 + 2 * v:28] = torch.tensor([0.2 * v, 0.5, 0.5])[:, None, None]
        save_image(folder / f"view_{v:02d}.png", img)
    (folder / "orbit.json").write_text(json.dumps({"elevation_deg": 5.0, "azimuths_deg": [120, 240, 360]}))
    c = make_conditions(folder, _cfg(), tiny)
    assert c.kind == "orbit" and c.elevation_deg == 5.0
    assert torch.equal(c.input, c.orbit[2]) and c.video.shape == (4, 3, R, R)
    assert torch.allclose(c.orbit[1][:, R // 2, R // 2], torch.tensor([0.2, 0.5, 0.5]), atol=0.02)
    (folder / "orbit.json").write_text(json.dumps({"azimuths_deg": [0, 120, 240]}))
    with pytest.raises(ValueError, match="not the SV3D_p orbit"):
        make_conditions(folder, _cfg(), tiny)
    (folder / "orbit.json").write_text("{}")
    with pytest.raises(ValueError, match="3 orbit images, conditions.num_views is 4"):
        make_conditions(folder, _cfg(num_views=4), tiny)


def test_bad_inputs_fail_early_with_clear_errors(tiny, tmp_path):
    with pytest.raises(InputError, match="nope.png: input not found"):
        make_conditions(tmp_path / "nope.png", _cfg(), tiny)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported input extension"):
        make_conditions(tmp_path / "notes.txt", _cfg(), tiny)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        make_conditions(tmp_path / "broken.png", _cfg(), tiny)
    _rgba(tmp_path / "ok.png")
    with pytest.raises(ValueError, match="resolution 64"):
        make_conditions(tmp_path / "ok.png", _cfg(resolution=64), tiny)
    assert not (tmp_path / "cond").exists()


def test_frames_kept_from_a_24_frame_video(tiny, tmp_path):
    """Which frames of a 24-frame MP4 become the reference video (start, stride), and what the stage
    says about it in conditions.json."""
    from d2.stages.conditions import count_video_frames, describe_reading

    frames = torch.ones(24, 3, 48, 48)
    for i in range(24):
        frames[i, :, 6:42, 6:42] = 0.9 - 0.035 * i  # frame i is grey level 0.9 - 0.035 i
    save_video(tmp_path / "clip.mp4", frames, fps=12)
    assert count_video_frames(tmp_path / "clip.mp4") == (24, 12.0)

    def kept(**kw) -> list[int]:
        info: dict = {}
        c = make_conditions(tmp_path / "clip.mp4", _cfg(**kw), tiny, info)
        grey = c.video[:, :, R // 2, R // 2].mean(1)  # [F]
        found = [int(round((0.9 - float(g)) / 0.035)) for g in grey]
        assert found == info["frames_kept"], (found, info)
        assert info["frames_total"] == 24 and info["fps"] == 12.0 and info["source_size"] == [48, 48]
        return found

    assert kept() == [0, 1, 2, 3]
    assert kept(frame_stride=3) == [0, 3, 6, 9]
    assert kept(frame_start=5, frame_stride=2) == [5, 7, 9, 11]
    info: dict = {}
    make_conditions(tmp_path / "clip.mp4", _cfg(frame_stride=3), tiny, info)
    text = describe_reading(info)
    assert "kept 4 of 24 frames (0, 3, 6, 9" in text and "12 fps, so 0.83 s" in text and "frames 10..23 unused" in text
    assert "object box 36x36 px" in text and f"resized to {R}x{R} px" in text
    with pytest.raises(ValueError, match="only 3 usable frames from frame 21"):
        make_conditions(tmp_path / "clip.mp4", _cfg(frame_start=21), tiny)
    out = run_conditions(tmp_path / "clip.mp4", tmp_path / "cond", _cfg(frame_start=2), tiny)
    meta = json.loads((out / "conditions.json").read_text())
    assert meta["input_reading"]["frames_kept"] == [2, 3, 4, 5] and "kept 4 of 24" in meta["input_reading"]["summary"]


# A video whose object moves and grows: frame i holds a (24 + 12i) x (40 + 8i) px box (h x w) at
# y 10 + 14i, x 120 - 20i of a transparent 160 x 192 frame.
_MOVING = [(10 + 14 * i, 34 + 26 * i, 120 - 20 * i, 160 - 12 * i) for i in range(4)]  # (y0, y1, x0, x1)


def _moving_video(folder):
    folder.mkdir()
    for i, (y0, y1, x0, x1) in enumerate(_MOVING):
        arr = np.zeros((160, 192, 4), np.uint8)
        arr[y0:y1, x0:x1] = (200, 40 + 40 * i, 40, 255)
        Image.fromarray(arr).save(folder / f"{i}.png")


def _authors_recentre(path, ratio: float, res: int) -> torch.Tensor:
    """What the authors' main.py does to one RGBA frame with ``--image_frame_ratio``, written out from
    its description: the box of alpha > 0, pasted centred (top-left at side // 2 - h // 2) on a
    transparent square of side int(longer side / ratio), the square resized with Lanczos, composited
    on white."""
    rgba = np.asarray(Image.open(path))
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    y, x, h, w = ys.min(), xs.min(), ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()
    side = int(max(h, w) / ratio)
    square = np.zeros((side, side, 4), np.uint8)
    top, left = side // 2 - h // 2, side // 2 - w // 2
    square[top:top + h, left:left + w] = rgba[y:y + h, x:x + w]
    out = np.asarray(Image.fromarray(square).resize((res, res), Image.LANCZOS)) / 255.0
    rgb = out[..., :3] * out[..., 3:] + (1 - out[..., 3:])
    return torch.from_numpy(rgb).permute(2, 0, 1).float()


def test_per_frame_recentring_of_a_moving_growing_object(tiny, tmp_path):
    """``video_box: per_frame`` with ``fraction`` (the authors' published run, frame ratio 0.9): every
    frame recentred and scaled on its own box, as the authors' main.py does; ``union`` keeps one box."""
    from d2.stages.conditions import describe_reading, preprocess_frames, read_image

    _moving_video(tmp_path / "frames")
    frames = [read_image(tmp_path / "frames" / f"{i}.png") for i in range(4)]
    res = 64
    cfg = ConditionsConfig(resolution=res, video_framing="fraction", video_box="per_frame", object_fraction=0.9,
                           alpha_threshold=0.002)
    video = preprocess_frames(frames, cfg, "frames", framing="fraction", per_frame=True)
    for i, (y0, y1, x0, x1) in enumerate(_MOVING):
        oy0, oy1, ox0, ox1 = _object_box(video[i])
        h, w = oy1 - oy0, ox1 - ox0
        assert max(h, w) == round(0.9 * res) == 58, (i, h, w)  # the longer side at the ratio
        assert abs(min(h, w) - 58 * min(y1 - y0, x1 - x0) / max(y1 - y0, x1 - x0)) <= 1  # aspect kept
        assert abs((oy0 + oy1) / 2 - res / 2) <= 0.5 and abs((ox0 + ox1) / 2 - res / 2) <= 0.5, (i, oy0, oy1, ox0, ox1)
        ref = _authors_recentre(tmp_path / "frames" / f"{i}.png", 0.9, res)
        assert all(abs(a - b) <= 1 for a, b in zip(_object_box(ref), (oy0, oy1, ox0, ox1))), (i, _object_box(ref))
        torch.testing.assert_close(video[i][:, res // 2, res // 2], ref[:, res // 2, res // 2], atol=0.01, rtol=0)
    # one box for all frames: the object keeps its motion and growth in the frame
    union = preprocess_frames(frames, cfg, "frames", framing="fraction", per_frame=False)
    boxes = [_object_box(union[i]) for i in range(4)]
    assert boxes[0][1] - boxes[0][0] < boxes[3][1] - boxes[3][0] and boxes[0][0] < boxes[3][0]
    # own_scale per frame: centred, at the input's scale (the 192 px side -> 64 px)
    own = preprocess_frames(frames, cfg, "frames", framing="own_scale", per_frame=True)
    for i, (y0, y1, x0, x1) in enumerate(_MOVING):
        oy0, oy1, ox0, ox1 = _object_box(own[i])
        # (a 3x downscale: the antialias filter blurs each edge by up to a pixel)
        assert abs((oy1 - oy0) - (y1 - y0) * res / 192) <= 1.5 and abs((ox1 - ox0) - (x1 - x0) * res / 192) <= 1.5
        assert abs((oy0 + oy1) / 2 - res / 2) <= 1 and abs((ox0 + ox1) / 2 - res / 2) <= 1
    # through the stage: every frame of the reference video, and the orbit's input view (the last frame)
    info: dict = {}
    c = make_conditions(tmp_path / "frames", _cfg(video_framing="fraction", video_box="per_frame",
                                                  object_fraction=0.9, video_orbit_frame="last"), tiny, info)
    for i in range(4):
        oy0, oy1, ox0, ox1 = _object_box(c.video[i])
        assert max(oy1 - oy0, ox1 - ox0) == round(0.9 * R)
        assert abs((oy0 + oy1) / 2 - R / 2) <= 0.5 and abs((ox0 + ox1) / 2 - R / 2) <= 0.5
    assert torch.equal(c.orbit[2], c.video[3]) and torch.equal(c.input, c.video[3])
    assert info["object_boxes"] == [list(b) for b in _MOVING]
    assert "each frame recentred on its own object box (longer side 40..64 px) so its longer side is 90%" in \
        describe_reading(info)
    # the default keeps one box: the last frame's object sits off-centre
    c1 = make_conditions(tmp_path / "frames", _cfg(video_framing="fraction", object_fraction=0.9), tiny)
    oy0, oy1, ox0, ox1 = _object_box(c1.video[3])
    assert abs((oy0 + oy1) / 2 - R / 2) > 2 or abs((ox0 + ox1) / 2 - R / 2) > 2
