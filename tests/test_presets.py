"""Presets in params/ and the options that make the `authors` preset reproduce the authors' code.

The table of docs/presets.md ("authors and paper") is the list of fields where the two
presets differ; the tests read it from the docs, so the docs and the files cannot drift.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from d2.config import (PRESETS_DIR, ParamsError, available_presets, flatten_params, load_params, overlay_overrides,
                       preset_path, with_overrides)
from d2.stages.conditions import load_conditions, make_conditions, run_conditions
from d2.stages.priors import (PriorsConfig, build_tiny_prior, load_priors, set_resnet_norm_eps, sgm_clip_resize)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["authors", "demo", "fast", "paper", "sv4d", "sv4d2"]
# the authors preset at test size: tiny random priors on the CPU, 3 views x 4 frames at 32 px
TINY = ["priors.backend=tiny", "priors.device=cpu", "conditions.num_views=3", "conditions.num_frames=4",
        "conditions.resolution=32", "conditions.num_steps=2", "conditions.progress=false", "sampling.num_views=3",
        "sampling.num_frames=4", "sampling.resolution=32"]


def _docs_table(title: str) -> dict[str, tuple[str, str]]:
    """``{dotted key: (authors value, paper value)}`` from the table under ``## title`` in docs/presets.md."""
    text = (ROOT / "docs" / "presets.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([\w.]+)`\s*\|\s*`([^`]*)`\s*\|\s*`([^`]*)`\s*\|", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def test_every_preset_validates_and_preset_path_finds_it():
    assert available_presets() == PRESETS
    defaults = flatten_params(load_params(None))
    for name in PRESETS:
        path = preset_path(name)
        assert path == PRESETS_DIR / f"{name}.yaml" and path.is_file()
        preset = flatten_params(load_params(path))  # validated, cross-section checks included
        text = path.read_text()
        assert text.startswith(f"# Preset `{name}`: "), f"{name}: the header says what the preset is"
        listed = {o.split("=", 1)[0] for o in overlay_overrides(path)}
        differ = {k for k in preset if preset[k] != defaults[k]}
        assert listed == differ, f"{name}: an overlay lists exactly the keys where it differs from the defaults"
        for line in text.splitlines():  # one comment per knob
            if re.match(r"^\s+\w+: ", line):
                assert "  # " in line, f"{name}: uncommented line {line!r}"
    with pytest.raises(ParamsError, match="unknown preset 'papr'; known presets: authors, demo, fast, paper, sv4d, sv4d2"):
        preset_path("papr")
    with pytest.raises(ParamsError, match="bare name"):
        preset_path("../params")


def test_demo_preset_is_the_defaults_and_params_yaml():
    assert load_params(preset_path("demo")) == load_params(None) == load_params(ROOT / "params.yaml")
    assert yaml.safe_load(preset_path("demo").read_text()) is None  # an overlay with nothing to change


def test_authors_and_paper_differ_exactly_in_the_documented_fields():
    table = _docs_table("authors and paper")
    assert table, "docs/presets.md has no 'authors and paper' table"
    a = flatten_params(load_params(preset_path("authors")))
    p = flatten_params(load_params(preset_path("paper")))
    differ = {k for k in a if a[k] != p[k]}
    assert differ == set(table), f"undocumented: {differ - set(table)}; documented but equal: {set(table) - differ}"
    for key, (av, pv) in table.items():
        assert (yaml.safe_load(av), yaml.safe_load(pv)) == (a[key], p[key]), key


def test_authors_preset_values_of_the_ten_points():
    a = load_params(preset_path("authors"))
    c, s, pr = a.conditions, a.sampling, a.priors
    assert (c.video_orbit_frame, c.orbit_decoder) == ("last", "image")
    # the published run: --elevations_deg 0.0 --image_frame_ratio 0.9, every frame on its own box
    assert (c.elevation_deg, c.framing, c.video_framing, c.video_box, c.object_fraction, c.alpha_threshold) == (
        0.0, "fraction", "fraction", "per_frame", 0.9, 0.002)
    assert (s.weight_schedule, s.w_multiview_constant, s.rollback_steps, s.num_steps, c.num_steps) == (
        "constant", 0.6, 10, 50, 50)
    assert (s.num_views, s.num_frames, s.resolution) == (21, 25, 576)
    assert (c.decode_chunk, s.decode_chunk) == (10, 10)
    assert (pr.clip_preprocess, pr.resnet_norm_eps, pr.autocast, pr.dtype) == ("sgm", 1e-5, "float16", "float32")
    assert c.store_dtype == "float32" and pr.backend == "stability"
    fast, paper = flatten_params(load_params(preset_path("fast"))), flatten_params(load_params(preset_path("paper")))
    framing = ["elevation_deg", "framing", "video_framing", "video_box", "object_fraction"]
    assert [paper[f"conditions.{k}"] for k in framing] == [fast[f"conditions.{k}"] for k in framing] == [
        getattr(c, k) for k in framing]  # the paper only says "fixed elevation": it follows the published run
    assert {k for k in fast if fast[k] != paper[k]} == {
        "conditions.num_steps", "sampling.num_steps", "sampling.rollback_steps", "sampling.chunk_size",
        "conditions.chunk_size", "priors.cudnn_benchmark", "fit.iterations"}


# main.py without options: elevation 10, no frame ratio (images at their own scale, video frames as they are)
BARE_DEFAULTS = {"conditions.elevation_deg": 10.0, "conditions.framing": "own_scale",
                 "conditions.video_framing": "keep"}


def _set_options(text: str) -> list[str]:
    """The ``--set KEY=VALUE`` options in ``text`` (comment marks and line continuations dropped)."""
    flat = re.sub(r"\\\n|\n#", " ", text)
    return re.findall(r"--set (\S+)", flat)


def test_main_py_bare_defaults_are_overrides_of_the_authors_preset():
    """The overrides that the authors preset's header and docs/presets.md give for main.py without
    options validate and change exactly elevation and framing, to main.py's values."""
    header = preset_path("authors").read_text().split("\n\n", 1)[0]  # the preset's own comment block
    docs = (ROOT / "docs" / "presets.md").read_text()
    block = docs.split("with three overrides:", 1)[1].split("```", 2)[1]
    assert "--elevations_deg 0.0 --image_frame_ratio 0.9" in header
    overrides = _set_options(header)
    assert overrides == _set_options(block) == [f"{k}={v}" for k, v in BARE_DEFAULTS.items()]
    authors = load_params(preset_path("authors"))
    bare = load_params(preset_path("authors"), overrides)
    a, b = flatten_params(authors), flatten_params(bare)
    assert {k: b[k] for k in a if a[k] != b[k]} == BARE_DEFAULTS
    assert bare.conditions.elevation_deg == type(bare.conditions)().elevation_deg  # main.py's default, ours too
    assert not hasattr(bare.conditions, "image_frame_ratio") and bare.conditions.video_box == "per_frame"


def test_elevation_reaches_the_sv3d_polar_and_the_orbit_cameras(tmp_path):
    """conditions.elevation_deg (authors: 0) is SV3D_p's polar angle 90 - e in the reference orbit and
    in every column of the matrix, and the elevation of the cameras the fit reads from matrix.json."""
    import json
    import math

    from d2.stages.cameras import OrbitSpec, orbit_cameras
    from d2.stages.fit import load_matrix
    from d2.stages.sampling import run_sampling

    fast = ["conditions.num_steps=1", "sampling.num_steps=1", "sampling.rollback_steps=0", "sampling.progress=false",
            "priors.autocast=none"]  # fp16 autocast is slow on CPU and has no bearing on the cameras
    _frames(tmp_path / "frames")
    priors = load_priors(load_params(preset_path("authors"), TINY + fast).priors)
    polars: list[torch.Tensor] = []
    priors[1].unet.register_forward_pre_hook(
        lambda m, args, kw: polars.append(kw["added_time_ids"][..., 1].detach().cpu()), with_kwargs=True)
    for elevation, extra in [(0.0, []), (10.0, ["conditions.elevation_deg=10.0"])]:
        params = load_params(preset_path("authors"), TINY + fast + extra)
        assert params.conditions.elevation_deg == elevation
        polars.clear()
        cond = run_conditions(tmp_path / "frames", tmp_path / f"cond{elevation}", params.conditions, priors)
        assert len(polars) >= 1  # the reference orbit
        n_orbit = len(polars)
        matrix = run_sampling(cond, tmp_path / f"matrix{elevation}", params.sampling, priors)
        assert len(polars) > n_orbit  # the matrix's columns
        want = math.radians(90.0 - elevation)
        for p in polars:
            torch.testing.assert_close(p, torch.full_like(p, want), atol=1e-6, rtol=0)
        assert json.loads((matrix / "matrix.json").read_text())["elevation_deg"] == elevation
        data = load_matrix(matrix)
        viewmats, _ = orbit_cameras(data.azimuths_deg, OrbitSpec(radius=data.radius, fov_deg=data.fov_deg,
                                                                 elevation_deg=data.elevation_deg), 32, 32)
        centres = -viewmats[:, :3, :3].transpose(1, 2) @ viewmats[:, :3, 3:]  # [V, 3, 1] camera positions
        torch.testing.assert_close(centres[:, 2, 0], torch.full((3,), 2.0 * math.sin(math.radians(elevation))),
                                   atol=1e-5, rtol=0)  # height above the object's centre (z up)


def _frames(folder: Path, n: int = 5) -> None:
    folder.mkdir()
    for i in range(n):  # frame i: a box of red level 50 i, moving down by i px
        arr = np.zeros((64, 64, 4), np.uint8)
        arr[10 + i:30 + i, 20:40] = (50 * i, 100, 100, 255)
        Image.fromarray(arr).save(folder / f"{i}.png")


def test_authors_preset_video_orbit_from_last_frame_decoded_by_image_decoder(tmp_path):
    params = load_params(preset_path("authors"), TINY)
    video_prior, mv_prior = priors = load_priors(params.priors)
    assert mv_prior.image_decoder is not None and mv_prior.autocast_dtype == torch.float16
    ran: list[str] = []
    mv_prior.image_decoder.register_forward_hook(lambda *a: ran.append("multiview.image_decoder"))
    mv_prior.vae.decoder.register_forward_hook(lambda *a: ran.append("multiview.vae.decoder"))
    video_prior.vae.decoder.register_forward_hook(lambda *a: ran.append("video.vae.decoder"))
    seen: list[torch.Tensor] = []
    condition = mv_prior.condition
    mv_prior.condition = lambda images, **kw: (seen.append(images.clone()), condition(images, **kw))[1]
    unet_dtypes: list[torch.dtype] = []
    mv_prior.unet.conv_in.register_forward_hook(lambda m, i, o: unet_dtypes.append(o.dtype))
    _frames(tmp_path / "frames")
    out = run_conditions(tmp_path / "frames", tmp_path / "cond", params.conditions, priors)
    c = load_conditions(out)
    assert ran == ["multiview.image_decoder"]  # the orbit: SV3D's own per-frame decoder, nothing else decoded
    assert len(seen) == 1 and torch.equal(seen[0][0], c.video[-1])  # the orbit is conditioned on the last frame
    assert c.input_frame_index == 3 and torch.equal(c.input, c.video[-1]) and torch.equal(c.orbit[2], c.video[-1])
    assert unet_dtypes and set(unet_dtypes) == {torch.float16}  # fp16 autocast around the UNet
    assert torch.load(out / "conditions.pt", weights_only=True)["orbit"].dtype == torch.float32  # floats kept
    # the demo's choices on the same input: first frame, temporal decoder, uint8
    demo = with_overrides(params, ["conditions.video_orbit_frame=first", "conditions.orbit_decoder=temporal",
                                   "conditions.store_dtype=uint8"])
    ran.clear()
    seen.clear()
    c0 = make_conditions(tmp_path / "frames", demo.conditions, priors)
    assert ran == ["multiview.vae.decoder"] and torch.equal(seen[0][0], c0.video[0]) and c0.input_frame_index == 0


def test_image_decoder_is_per_frame_and_refused_where_missing():
    prior = build_tiny_prior(PriorsConfig(backend="tiny").tiny, "multiview")
    z = torch.randn(5, 4, 16, 16)
    with torch.no_grad():
        whole = prior.decode(z, chunk=5, decoder="image")
        parts = torch.cat([prior.decode(z[i:i + 1], chunk=1, decoder="image") for i in range(5)])
        temporal = prior.decode(z, chunk=5, decoder="temporal")
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=0)  # no frame sees another
    assert (whole - temporal).abs().max() > 1e-3  # a different module
    video = build_tiny_prior(PriorsConfig(backend="tiny").tiny, "video")
    with pytest.raises(ValueError, match="no per-frame image decoder"):
        video.decode(z, decoder="image")


def test_missing_image_decoder_fails_before_sampling(tmp_path):
    from d2.stages.conditions import ConditionsConfig

    video, mv = load_priors(PriorsConfig(backend="tiny"))
    mv.image_decoder = None  # e.g. a checkpoint without its first stage
    mv.denoise = lambda *a, **k: pytest.fail("sampled before the decoder check")
    _rgba(tmp_path / "obj.png")
    cfg = ConditionsConfig(num_views=3, num_frames=4, resolution=32, num_steps=2, orbit_decoder="image", progress=False)
    with pytest.raises(ValueError, match="orbit_decoder=temporal"):
        make_conditions(tmp_path / "obj.png", cfg, (video, mv))


def _rgba(path: Path, box=(10, 30, 40, 52)) -> None:
    arr = np.zeros((64, 64, 4), np.uint8)
    y0, y1, x0, x1 = box
    arr[y0:y1, x0:x1] = (200, 40, 40, 255)
    Image.fromarray(arr).save(path)


def _box(img: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero((1 - img).amax(0) > 0.2, as_tuple=True)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


@pytest.mark.parametrize("framing,size,centred", [("fraction", (24, 14), True), ("own_scale", (10, 6), True),
                                                  ("keep", (10, 6), False)])
def test_framing(tmp_path, framing, size, centred):
    from d2.stages.conditions import ConditionsConfig, preprocess_frames, read_image

    _rgba(tmp_path / "obj.png")  # a 20 x 12 object off-centre in a 64 x 64 image; resolution 32 halves it
    cfg = ConditionsConfig(resolution=32, framing=framing, object_fraction=0.75)
    img = preprocess_frames([read_image(tmp_path / "obj.png")], cfg, "obj")[0]
    y0, y1, x0, x1 = _box(img)
    assert (y1 - y0, x1 - x0) == size
    assert (abs((y0 + y1) / 2 - 16) <= 1 and abs((x0 + x1) / 2 - 16) <= 1) == centred
    if framing == "keep":
        assert (y0, x0) == (5, 20)


def test_sgm_clip_resize_matches_diffusers_svd_pipeline():
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    x = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = sgm_clip_resize(x, 32)
    ref = _resize_with_antialiasing(x, (32, 32))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch_way = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    assert (torch_way - ref).abs().max() > 1e-2  # the two preprocessings differ visibly


def test_clip_preprocess_option_reaches_the_embedding():
    t = PriorsConfig(backend="tiny").tiny.model_copy(update={"resolution": 64})
    prior = build_tiny_prior(t, "video").eval()
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e_torch = prior.configure_numerics(clip_preprocess="torch").clip_embed(images)
        e_sgm = prior.configure_numerics(clip_preprocess="sgm").clip_embed(images)
    assert (e_torch - e_sgm).abs().max() > 1e-4


def test_resnet_norm_eps_option():
    from diffusers.models.resnet import SpatioTemporalResBlock

    def norms(unet):
        return {n: m.eps for n, m in unet.named_modules() if isinstance(m, torch.nn.GroupNorm)}

    video, mv = load_priors(PriorsConfig(backend="tiny", resnet_norm_eps=1e-5))
    default = load_priors(PriorsConfig(backend="tiny"))[1]
    built = norms(build_tiny_prior(PriorsConfig().tiny, "multiview").unet)
    assert norms(default.unet) == built  # None: as diffusers builds them, a mix of 1e-6 and 1e-5
    assert {e for n, e in built.items() if n.endswith((".norm1", ".norm2"))} == {1e-6, 1e-5}
    for prior in (video, mv, default):
        eps = norms(prior.unet)
        resnet = {n: e for n, e in eps.items() if n.endswith((".norm1", ".norm2"))}
        assert resnet and set(resnet.values()) == ({1e-6, 1e-5} if prior is default else {1e-5})
        assert {e for n, e in eps.items() if "attentions" in n} == {1e-6}  # transformer norms untouched
        assert eps["conv_norm_out"] == 1e-5
    unet = build_tiny_prior(PriorsConfig().tiny, "video").unet
    blocks = sum(isinstance(m, SpatioTemporalResBlock) for m in unet.modules())
    assert blocks > 0 and set_resnet_norm_eps(unet, 1e-5) == 4 * blocks  # spatial + temporal, two norms each


def test_prior_folder_keeps_the_image_decoder(tmp_path):
    from d2.stages.priors import load_prior_folder, save_prior_folder

    prior = build_tiny_prior(PriorsConfig().tiny, "multiview").eval()
    save_prior_folder(prior, tmp_path / "mv")
    loaded = load_prior_folder(tmp_path / "mv").eval()
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z, decoder="image"), prior.decode(z, decoder="image"), atol=0, rtol=0)


def test_decode_chunk_sets_the_temporal_decoder_calls():
    prior = build_tiny_prior(PriorsConfig().tiny, "video").eval()
    calls: list[int] = []
    prior.vae.decoder.register_forward_hook(lambda m, args, kw, out: calls.append(kw.get("num_frames", 0)),
                                            with_kwargs=True)
    z = torch.randn(25, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        by10 = prior.decode(z, chunk=10)
        assert calls == [10, 10, 5]  # the authors' decoding_t
        by14 = prior.decode(z, chunk=14)
    assert (by10 - by14).abs().max() > 1e-4  # frames mix within a call: the chunk changes the images


def test_the_cli_selects_a_preset_by_name(capsys):
    from d2.cli import main

    assert main(["params", "--preset", "paper"]) == 0
    out = capsys.readouterr().out
    assert "s0: 0.5" in out and "iterations: 5000" in out
    assert main(["params", "--preset", "../params"]) == 2
    assert "bare name" in capsys.readouterr().err
