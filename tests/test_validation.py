"""Bad inputs and bad params, refused before any compute in one or two lines (d2.validation).

The corpus (``CORPUS``) is generated at test time: each case builds its files under a
temporary folder, runs the checks the ``d2`` command runs first (params loading, then
:func:`d2.preflight.preflight`) and expects either one short error naming the file or key,
or a documented repair (read correctly, completed from the shipped defaults, a warning).
Every case is timed from the start of the params loading; a few run through the real ``d2``
console script to show that nothing (no Prefect import, no model) starts before the error.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from d2.config import ParamsError, load_params
from d2.utils.io import ImageReadError, load_image, pil_to_rgba
from d2.preflight import preflight
from d2.stages.conditions import check_frame_numbers
from d2.validation import InputError, check_dataset, check_input

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BOUND_S = 5.0  # in-process: the error must come this soon after the command's params loading starts
CLI_BOUND_S = 10.0  # a whole `d2` process (interpreter and torch import included) on a shared 2-core machine
V, F = 8, 8  # params.yaml: conditions/sampling num_views, num_frames (protocol.num_frames = 8, 4 eval views)


# --------------------------------------------------------------------------- generated files


def obj_array(h: int = 24, w: int = 24) -> np.ndarray:
    """[h, w, 3] uint8: a dark square on white."""
    a = np.full((h, w, 3), 255, np.uint8)
    a[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = (30, 60, 90)
    return a


def png(path: Path, arr: np.ndarray | None = None, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(obj_array() if arr is None else arr).save(path, **kw)
    return path


def frames(folder: Path, numbers: list[int], fmt: str = "{}.png", size: int = 24) -> Path:
    for i in numbers:
        png(folder / fmt.format(i), obj_array(size, size))
    return folder


def dataset(root: Path, objects: tuple[str, ...] = ("ball", "cube"), views: int = 4, n: int = F) -> Path:
    """A benchmark in the Consistent4D layout: input/<o>/<i>.png, gt/<o>/eval_k/<i>.png."""
    for o in objects:
        frames(root / "input" / o, list(range(n)))
        for k in range(views):
            frames(root / "gt" / o / f"eval_{k}", list(range(n)))
    return root


def params_file(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def loop(path: Path) -> Path:
    os.symlink(path.name, path)  # points at itself
    return path


def binary(path: Path) -> Path:
    path.write_bytes(b"\xff\xfe\x00bad")
    return path


def truncated(path: Path) -> Path:
    png(path, obj_array(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    """One bad input or params: ``build(tmp) -> (command, args, params_path, overrides)``."""

    name: str
    build: Callable[[Path], tuple[str, dict[str, Any], str | Path | None, list[str]]]
    expect: str | None  # substring of the one-line error; None: accepted (a documented repair)
    check: Callable[[Path, Any, list[str]], None] | None = None  # for repairs: what must hold


def run_case(case: Case, tmp: Path) -> tuple[str, float, Any, list[str]]:
    """(message or 'ok', seconds from params loading to the verdict, params, warnings)."""
    command, args, ppath, overrides = case.build(tmp)
    t0 = time.perf_counter()
    try:
        p = load_params(ppath, overrides)
        warnings = preflight(command, args, p)
    except (ParamsError, InputError) as e:
        return str(e), time.perf_counter() - t0, None, []
    return "ok", time.perf_counter() - t0, p, warnings


P = ROOT / "params.yaml"


def gen(input_path: Callable[[Path], Path], *overrides: str, gt: Callable[[Path], Path] | None = None):
    def build(tmp: Path):
        args = {"input": str(input_path(tmp)), "out": str(tmp / "run"), "gt": str(gt(tmp)) if gt else None}
        return "generate", args, P, list(overrides)
    return build


def bench(make: Callable[[Path], Path], *overrides: str, command: str = "benchmark", **extra: Any):
    def build(tmp: Path):
        return command, {"data": str(make(tmp)), "out": str(tmp / "run"), **extra}, P, list(overrides)
    return build


def par(*overrides: str, text: str | None = None, command: str = "params"):
    def build(tmp: Path):
        path = P if text is None else params_file(tmp / "p.yaml", text)
        return command, {"out": str(tmp / "run"), "pred": str(tmp), "gt": str(tmp)}, path, list(overrides)
    return build


def rm(path: Path) -> Path:
    import shutil

    shutil.rmtree(path)
    return path


def gt_without_eval3(tmp: Path) -> Path:
    d = dataset(tmp / "ds")
    rm(d / "gt" / "cube" / "eval_3")
    return d


def gt_without_frame7(tmp: Path) -> Path:
    d = dataset(tmp / "ds")
    (d / "gt" / "ball" / "eval_2" / "7.png").unlink()
    return d


def renamed_input(tmp: Path) -> Path:
    d = dataset(tmp / "ds", objects=("ball",))
    for f in (d / "input" / "ball").iterdir():
        f.rename(f.with_name(f"frame_{int(f.stem):03d}.png"))  # fine for the input, not for front-view scoring
    return d


def two_broken(tmp: Path) -> Path:
    d = dataset(tmp / "ds")
    (d / "gt" / "ball" / "eval_0" / "3.png").unlink()
    (d / "input" / "cube" / "5.png").unlink()
    return d


def gt_truncated(tmp: Path) -> Path:
    d = dataset(tmp / "ds")
    truncated(d / "gt" / "cube" / "eval_1" / "4.png")
    return d


def no_gt_folder(tmp: Path) -> Path:
    d = dataset(tmp / "ds")
    rm(d / "gt" / "ball")
    return d


def sixteen_bit(tmp: Path) -> Path:
    a = np.full((32, 32), 65535, np.uint16)
    a[8:24, 8:24] = 3000  # a dark object: Pillow's own RGB conversion makes it white (clips at 255)
    path = tmp / "g16.png"
    Image.fromarray(a).save(path)
    return path


def palette_transparent(tmp: Path) -> Path:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 255, 255, 200, 30, 30] + [0] * 762)
    img.paste(1, (8, 8, 24, 24))
    img.info["transparency"] = 0
    img.save(tmp / "pal.png", transparency=0)
    return tmp / "pal.png"


def la_image(tmp: Path) -> Path:
    a = np.zeros((32, 32, 2), np.uint8)
    a[..., 0] = 40
    a[8:24, 8:24, 1] = 255  # opaque object, transparent elsewhere
    Image.fromarray(a, "LA").save(tmp / "la.png")
    return tmp / "la.png"


def cmyk_jpeg(tmp: Path) -> Path:
    img = Image.new("CMYK", (32, 32), (0, 0, 0, 0))  # white
    img.paste((0, 255, 255, 0), (8, 8, 24, 24))  # red
    img.save(tmp / "cmyk.jpg", quality=95)
    return tmp / "cmyk.jpg"


def exif_rotated(tmp: Path) -> Path:
    a = np.full((20, 40, 3), 255, np.uint8)
    a[2:8, 2:8] = 0  # object in the top-left corner of the stored 40 x 20 pixels
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": displayed 20 wide, 40 high
    img.save(tmp / "rot.jpg", exif=exif, quality=95)
    return tmp / "rot.jpg"


def float_hdr(tmp: Path) -> Path:
    a = np.full((16, 16), 0.5, np.float32)
    a[4:8, 4:8] = 4.0
    Image.fromarray(a, "F").save(tmp / "hdr.tif")
    return tmp / "hdr.tif"


def orbit(tmp: Path, count: int = V, meta: str | None = '{"elevation_deg": 10}') -> Path:
    d = frames(tmp / "orbit", list(range(count)), "view_{:02d}.png")
    if meta is not None:
        (d / "orbit.json").write_text(meta)
    return d


def junk_mp4(tmp: Path) -> Path:
    (tmp / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(200))
    return tmp / "clip.mp4"


def mixed_sizes(tmp: Path) -> Path:
    d = frames(tmp / "vid", list(range(F)))
    png(d / "3.png", obj_array(30, 30))
    return d


def _assert(ok: bool) -> None:
    assert ok


def expect_repair_16bit(tmp: Path, p: Any, warnings: list[str]) -> None:
    img = load_image(tmp / "g16.png")  # what d2 evaluate and the conditions stage read
    assert abs(float(img[0, 16, 16]) - 3000 / 65535) < 1e-4 and float(img[0, 0, 0]) == pytest.approx(1.0)


def expect_shipped_defaults(tmp: Path, p: Any, warnings: list[str]) -> None:
    assert p == load_params(P) == load_params(None)  # every knob at its default (= params.yaml)


def expect_partial(tmp: Path, p: Any, warnings: list[str]) -> None:
    assert p.run.max_parallel == 1 and p.sampling.resolution == 16 and p.sampling.num_views == V


def expect_step_warning(tmp: Path, p: Any, warnings: list[str]) -> None:
    assert len(warnings) == 1 and "numbered every 2" in warnings[0]


def expect_cmyk(tmp: Path, p: Any, warnings: list[str]) -> None:
    img = load_image(tmp / "cmyk.jpg")
    assert img[0, 16, 16] > 0.8 and img[1, 16, 16] < 0.2 and img[:, 2, 2].min() > 0.9  # red on white


def expect_exif(tmp: Path, p: Any, warnings: list[str]) -> None:
    img = load_image(tmp / "rot.jpg")
    assert tuple(img.shape[1:]) == (40, 20)  # displayed orientation: 20 wide, 40 high
    assert img[:, 2:8, 12:18].mean() < 0.2  # the corner object is now top-right


def expect_la(tmp: Path, p: Any, warnings: list[str]) -> None:
    img = load_image(tmp / "la.png")
    assert float(img[0, 16, 16]) == pytest.approx(40 / 255, abs=1e-6) and float(img[0, 0, 0]) == 1.0


CORPUS: list[Case] = [
    # params: bounds and products that overflow
    Case("s0 above 1", par("sampling.s0=7.5"), "sampling.s0 = 7.5 is outside [0, 1]"),
    Case("s0 negative", par("sampling.s0=-1"), "sampling.s0 = -1"),
    Case("k overflows exp", par("sampling.k=2000"), "sampling.k * (1 - sampling.s0) = 1000 > 709.78"),
    Case("k negative", par("sampling.k=-5"), "sampling.k = -5.0 must be >= 0"),
    Case("rho overflows sigma^(1/rho)", par("sampling.rho=0.001"), "sampling.rho = 0.001: sigma ** (1/rho)"),
    Case("sigma_min >= sigma_max", par("sampling.sigma_min=800"), "sampling.sigma_min = 800 >= sampling.sigma_max"),
    Case("sigma_max overflows fp32", par("conditions.sigma_max=1e200"), "conditions.sigma_max = 1e+200 is outside (0, 1e+30]"),
    Case("elevation at the pole", par("conditions.elevation_deg=90"), "conditions.elevation_deg = 90.0 is outside (-90, 90)"),
    Case("protocol elevation past the pole", par("protocol.elevation_deg=-95"), "protocol.elevation_deg = -95.0"),
    Case("zero field of view", par("prepare.fov_deg=0"), "prepare.fov_deg = 0.0 is outside (0, 180)"),
    Case("camera at the origin", par("conditions.radius=0"), "conditions.radius = 0.0 must be > 0"),
    Case("fit without a loss", par("fit.lambda_ssim=0", "fit.lambda_lpips=0"), "the fit has no loss to minimise"),
    Case("negative seed", par("sampling.seed=-1"), "sampling.seed = -1 is outside"),
    Case("attention batch over the CUDA grid", par("priors.attention_max_batch=70000"), "priors.attention_max_batch = 70000"),
    Case("GroupNorm widths", par("priors.backend=tiny", "priors.tiny.block_out_channels=[30, 64]"), "multiple of 32"),
    Case("tiny resolution not divisible", par("priors.backend=tiny", "priors.tiny.resolution=30"),
         "priors.tiny.resolution = 30 must be a positive multiple of 4"),
    Case("nothing to score", par("protocol.eval_azimuths_deg=[]"), "eval_azimuths_deg must not be empty"),
    Case("sweep point out of bounds", lambda t: ("sweep", {"data": str(dataset(t / "ds")), "out": str(t / "r"),
                                                            "grid": ["sampling.s0=0.3,2"]}, P, []),
         "sweep point sampling.s0=2: sampling.s0 = 2.0 is outside [0, 1]"),
    # params files
    Case("typo in a key", par(text="sampling:\n  num_stpes: 3\n"), "Did you mean 'sampling.num_steps'"),
    Case("YAML syntax error", par(text="sampling: [unclosed\n"), "not valid YAML"),
    Case("binary params file", lambda t: ("params", {}, binary(t / "p.yaml"), []), "not a text file"),
    Case("params path is a folder", lambda t: ("params", {}, t, []), "is not a file"),
    Case("params file missing", lambda t: ("params", {}, t / "absent.yaml", []), "params file not found"),
    Case("empty params file: shipped defaults", par(text=""), None, expect_shipped_defaults),
    Case("params file missing keys: completed", par(text="run:\n  max_parallel: 1\nfit:\n"), None, expect_partial),
    # params that need the environment
    Case("unknown priors backend", par("priors.backend=nope", command="generate"),
         "priors.backend = 'nope' is not a priors backend"),
    Case("tiny prior resolution mismatch", par("priors.backend=tiny", command="benchmark"),
         "priors.tiny.resolution is 32 px but conditions.resolution = 16"),
    Case("missing miniature weights", lambda t: ("generate", {"input": "x", "out": str(t / "r")}, P,
                                                 [f"priors.video_path={(t / 'empty').mkdir() or t / 'empty'}"]),
         "the miniature video prior is missing"),
    Case("not a torch device", par("metrics.device=gpu", command="evaluate"), "metrics.device = 'gpu' is not a torch device"),
    Case("CUDA device that is not here", par("fit.device=cuda:99", command="demo"), "fit.device = 'cuda:99' but"),
    Case("LPIPS loss required without VGG weights", par("fit.lambda_lpips=1", "fit.lpips_required=true",
                                                        "fit.lpips_vgg_weights=/nonexistent/vgg.pth",
                                                        command="generate"),
         "fit.lambda_lpips = 1 with fit.lpips_required needs the VGG16 weights"),
    Case("metric weights file missing", par("metrics.i3d_weights=/nonexistent/i3d.pt", command="evaluate"),
         "metrics.i3d_weights = /nonexistent/i3d.pt: file not found"),
    Case("TorchScript weights named: warned", lambda t: ("evaluate", {"pred": str(t), "gt": str(t)}, P,
                                                          [f"metrics.i3d_weights={binary(t / 'i3d.pt')}"]),
         None, lambda t, p, w: _assert(len(w) == 1 and "TorchScript file is code that runs when loaded" in w[0])),
    # one input (d2 generate)
    Case("input missing", gen(lambda t: t / "missing.png"), "missing.png: input not found"),
    Case("symlink loop", gen(lambda t: loop(t / "loop.png")), "loop.png: input not found"),
    Case("unicode and spaces in the path: accepted", gen(lambda t: png(t / "mes images" / "été 1.png")), None),
    Case("unsupported extension", gen(lambda t: params_file(t / "notes.txt", "hi")), "unsupported input extension '.txt'"),
    Case("HDR file extension", gen(lambda t: params_file(t / "sky.hdr", "#?RADIANCE")), "unsupported input extension '.hdr'"),
    Case("not an image", gen(lambda t: params_file(t / "fake.png", "not a png")), "fake.png: cannot read the image"),
    Case("truncated PNG", gen(lambda t: truncated(t / "cut.png")), "cut.png: cannot read the image"),
    Case("1x1 image", gen(lambda t: png(t / "dot.png", obj_array(1, 1))), "dot.png: image is 1x1 px, below the 8 px minimum"),
    Case("all white: no object", gen(lambda t: png(t / "white.png", np.full((24, 24, 3), 255, np.uint8))),
         "no object found"),
    Case("16-bit grayscale read correctly", gen(sixteen_bit), None, expect_repair_16bit),
    Case("palette with transparency", gen(palette_transparent), None),
    Case("LA read with its alpha", gen(la_image), None, expect_la),
    Case("CMYK JPEG", gen(cmyk_jpeg), None, expect_cmyk),
    Case("EXIF-rotated JPEG", gen(exif_rotated), None, expect_exif),
    Case("float TIFF in HDR range", gen(float_hdr, "conditions.input_kind=image"), "HDR range"),
    Case("frame numbers with gaps", gen(lambda t: frames(t / "vid", [0, 1, 5, 9]), "conditions.num_frames=4",
                                        "sampling.num_frames=4"), "frame numbers jump from 1 to 5 (frames 2..4 missing)"),
    Case("frames every 2nd: warned", gen(lambda t: frames(t / "vid", list(range(0, 2 * F, 2)))), None,
         expect_step_warning),
    Case("duplicate frame numbers", gen(lambda t: frames(frames(t / "vid", list(range(F))), [1], "{:02d}.png")),
         "two files for frame 1 ("),
    Case("too few frames", gen(lambda t: frames(t / "vid", list(range(5)))), "5 frames, need 8"),
    Case("frames of mixed sizes", gen(mixed_sizes), "frames differ in size"),
    Case("orbit with the wrong view count", gen(lambda t: orbit(t, 5)), "5 orbit images, conditions.num_views is 8"),
    Case("orbit.json not JSON", gen(lambda t: orbit(t, meta="{elevation: ")), "orbit.json: not valid JSON"),
    Case("corrupt video", gen(junk_mp4), "clip.mp4: cannot read the video ("),
    Case("generate --gt lacks a view", gen(lambda t: png(t / "in.png"), gt=lambda t: rm(dataset(t / "ds") / "gt" / "ball" / "eval_2")
                                           .parent), "eval_2: missing (protocol.eval_azimuths_deg has 4 views)"),
    Case("front view scored from an image input", gen(lambda t: png(t / "in.png"), "protocol.include_front_view=true",
                                                       gt=lambda t: dataset(t / "ds") / "gt" / "ball"),
         "protocol.include_front_view scores the input frames"),
    Case("front view: input frames not named <i>.png", bench(renamed_input, "protocol.include_front_view=true"),
         "input/ball: missing frame(s) 0, 1, 2, 3, 4 ..."),
    # datasets (d2 benchmark / sweep / demo / schedule)
    Case("dataset missing", bench(lambda t: t / "nowhere"), "benchmark dataset not found; create one with `d2 prepare"),
    Case("dataset without input/", bench(lambda t: rm(dataset(t / "ds") / "input").parent), "no input/ folder"),
    Case("ground truth lacks eval_3", bench(gt_without_eval3), "gt/cube/eval_3: missing (protocol.eval_azimuths_deg has 4 views)"),
    Case("ground truth lacks frame 7", bench(gt_without_frame7), "gt/ball/eval_2: missing frame(s) 7 of the 8"),
    Case("object without ground truth", bench(no_gt_folder), "gt/ball: ground-truth folder not found"),
    Case("truncated ground-truth frame", bench(gt_truncated), "eval_1/4.png: cannot read the image"),
    Case("every broken object named", bench(two_broken), "and 1 more"),
    Case("run.objects not in the dataset", bench(lambda t: dataset(t / "ds"), "run.objects=[ball, teapot]"),
         "run.objects names objects not in"),
    Case("schedule checks the dataset", bench(gt_without_eval3, command="schedule"), "eval_3: missing"),
    Case("evaluate: prediction folder missing", lambda t: ("evaluate", {"pred": str(t / "pred"), "gt": str(t)}, P, []),
         "--pred "),
    Case("output is a file", lambda t: ("generate", {"input": str(png(t / "in.png")),
                                                     "out": str(params_file(t / "o", ""))}, P, []),
         "is a file; give a folder"),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus(case: Case, tmp_path: Path) -> None:
    message, seconds, p, warnings = run_case(case, tmp_path)
    assert seconds < BOUND_S, f"{case.name}: {seconds:.2f} s to the verdict"
    if case.expect is None:
        assert message == "ok", f"{case.name}: expected a repair, got: {message}"
        if case.check is not None:
            case.check(tmp_path, p, warnings)
    else:
        assert case.expect in message, f"{case.name}: {message!r}"
        assert len(message.splitlines()) <= 2, f"{case.name}: more than two lines: {message!r}"


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 40 and len({c.name for c in CORPUS}) == len(CORPUS)


# --------------------------------------------------------------------------- readers and helpers


def test_sixteen_bit_png_is_not_white_in_pillow_but_is_here(tmp_path: Path) -> None:
    path = sixteen_bit(tmp_path)
    naive = np.asarray(Image.open(path).convert("RGB"))
    assert naive.min() == 255  # what the old reader saw: all white
    rgba, alpha = pil_to_rgba(Image.open(path))
    assert not alpha and rgba[16, 16, 0] == pytest.approx(3000 / 65535, abs=1e-6)


def test_evaluate_scores_sixteen_bit_ground_truth(tmp_path: Path) -> None:
    """d2 evaluate reads 16-bit ground truth at its values: the 8-bit copy of it scores ~ 8-bit PSNR."""
    from d2.eval.scoring import evaluate
    from d2.eval.metrics import MetricsConfig
    from d2.eval.protocol import Protocol

    a16 = np.full((16, 16), 65535, np.uint16)
    a16[4:12, 4:12] = 13107  # grey 0.2: all white through Pillow's own conversion
    for i in range(2):
        Image.fromarray(a16).save(png(tmp_path / "gt" / "gt" / "o" / "eval_0" / f"{i}.png"))
        png(tmp_path / "pred" / "o" / "eval_0" / f"{i}.png", np.repeat((a16 // 257).astype(np.uint8)[..., None], 3, -1))
    r = evaluate(tmp_path / "pred", tmp_path / "gt", Protocol(eval_azimuths_deg=[0.0], num_frames=2, resolution=16),
                 MetricsConfig(metrics=["psnr"], resolution=16), progress=False)
    assert r.mean["psnr"] > 60  # identical up to 16 -> 8 bit rounding (the old all-white reading gave 8 dB)


def test_hdr_float_and_exr_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"hdr.tif: float image with values in \[0.5, 4\] \(HDR range\)"):
        load_image(float_hdr(tmp_path))
    with pytest.raises(ImageReadError, match=r"x.exr: .exr images"):
        load_image(params_file(tmp_path / "x.exr", "v/1"))
    ok = Image.fromarray(np.full((8, 8), 0.25, np.float32), "F")
    assert pil_to_rgba(ok)[0][0, 0, 0] == pytest.approx(0.25)


def test_frame_number_rules() -> None:
    p = [Path(f"f_{i:03d}.png") for i in (0, 1, 2, 3)]
    assert check_frame_numbers(p, "x") == []
    assert check_frame_numbers([Path("a.png"), Path("b.png")], "x") == []  # unnumbered: name order, no check
    with pytest.raises(InputError, match=r"jump from 3 to 7 \(frames 4..6 missing\)"):
        check_frame_numbers([Path(f"{i}.png") for i in (2, 3, 7)], "x")


def test_one_frame_naming_rule(tmp_path: Path) -> None:
    """A folder of frames is read in the order of the last number in the names; the benchmark layout
    (ground truth, predictions, input frames scored as the front view) takes the ``<i>.png|jpg|jpeg`` of them."""
    from d2.eval import scoring
    from d2.stages.conditions import frame_files, list_frames

    d = frames(tmp_path / "f", [10, 2], "frame_{}.png")
    frames(d, [3], "{}.jpg")
    (d / "notes.txt").write_text("not a frame")
    assert [p.name for p in frame_files(d)] == ["frame_2.png", "3.jpg", "frame_10.png"]
    assert list_frames(d) == {3: d / "3.jpg"} and scoring.list_frames is list_frames
    png(d / "03.png")
    with pytest.raises(InputError, match=r"f: two files for frame 3 \(03.png, 3.jpg\); keep one"):
        list_frames(d)


def test_good_inputs_pass(tmp_path: Path) -> None:
    p = load_params(P)
    assert check_dataset(dataset(tmp_path / "ds"), p) == ["ball", "cube"]
    r = check_input(frames(tmp_path / "vid", list(range(F))), p)
    assert (r.kind, len(r.files), r.warnings) == ("video", F, [])
    assert len(check_input(orbit(tmp_path), p).files) == V


# --------------------------------------------------------------------------- the real d2 command


def d2(args: list[str], cwd: Path, tmp: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp / "prefect-home"),
         "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", **env}
    e.pop("D2_DEBUG", None) if "D2_DEBUG" not in env else None
    t0 = time.perf_counter()
    r = subprocess.run([str(BIN / "d2"), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=120)
    return r, time.perf_counter() - t0


CLI_CASES = [
    ("generate 1x1 image", lambda t: ["generate", "--input", str(png(t / "dot.png", obj_array(1, 1))), "--out",
                                      str(t / "run"), "--params", str(P)], "image is 1x1 px"),
    ("benchmark without eval_3", lambda t: ["benchmark", "--data", str(gt_without_eval3(t)), "--out", str(t / "run"),
                                            "--params", str(P)], "eval_3: missing"),
    ("missing input outside the project", lambda t: ["generate", "--input", str(t / "nothere.png"), "--out",
                                                    str(t / "run")], "nothere.png: input not found"),
]


@pytest.mark.parametrize("name, argv, expect", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_real_cli_refuses_before_prefect(name: str, argv: Callable, expect: str, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"  # outside the project: no params.yaml, shipped defaults
    work.mkdir()
    r, seconds = d2(argv(tmp_path), work, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2 and expect in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (work / ".d2cache").exists()
    assert not (tmp_path / "prefect-home").exists(), "Prefect was imported before the error"
    assert seconds < CLI_BOUND_S, f"{name}: {seconds:.1f} s"


def test_real_cli_outside_the_project_uses_shipped_defaults(tmp_path: Path) -> None:
    from d2.config import render_params_yaml

    r, _ = d2(["params"], tmp_path, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == render_params_yaml(load_params(P))
    assert not (tmp_path / ".d2cache").exists()


def test_real_cli_traceback_only_with_d2_debug(tmp_path: Path) -> None:
    r, _ = d2(["params", "--set", "sampling.s0=7.5"], tmp_path, tmp_path, D2_DEBUG="1")
    assert r.returncode != 0 and "Traceback" in r.stderr and "sampling.s0 = 7.5" in r.stderr


def corpus_table(tmp: Path) -> str:
    """The corpus as a markdown table: case, message (or repair), seconds (for the report)."""
    rows = ["| case | message / repair | s |", "|---|---|---|"]
    for i, case in enumerate(CORPUS):
        d = tmp / f"c{i}"
        d.mkdir(parents=True)
        message, seconds, _, warnings = run_case(case, d)
        text = message if case.expect else ("repair: " + ("; ".join(warnings) or "read / completed correctly"))
        rows.append(f"| {case.name} | {text.replace('|', '/').replace(chr(10), ' ')} | {seconds:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(corpus_table(Path(d)))
