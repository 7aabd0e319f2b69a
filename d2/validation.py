"""Checks of inputs, datasets and params, run before any compute (no Prefect, no model loads).

Every problem is raised as one :class:`InputError` whose message is one line (two at most)
naming the file or the key, the problem, and what to do. The functions are pure apart from
reading the files they check:

    check_input(path, params)            one ``d2 generate`` input (image, video, frames, orbit)
    check_gt(gt_dir, params)             one object's ground truth (``eval_k/<i>.png``)
    check_dataset(data_dir, params)      a benchmark: every object's input and ground truth
    check_priors(params)                 backend names, miniature weights present, resolutions
    check_runtime(params, ...)           torch devices, LPIPS weights of the fit, weight files
    check_grid(params, items)            every point of a sweep grid
    preflight(command, args, params)     what the ``d2`` command runs before anything else

Frame numbers (frames folders, ``input/<object>/<i>.png``): duplicates and irregular gaps
are refused; a uniform step (0, 2, 4, ...) is taken as consecutive frames with a warning.
Images with a side below :data:`d2.utils.io.MIN_IMAGE_SIDE` pixels are refused.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from d2.config import ParamsError, canonical_key, parse_override, with_overrides
from d2.utils.io import MIN_IMAGE_SIDE, SUPPORTED_MODES, ImageReadError, read_rgba

FRAME_NAME = re.compile(r"^(\d+)$")  # ground-truth and benchmark-input frames are named <i>.<ext>
GT_EXTS = (".png", ".jpg", ".jpeg")  # what d2.eval.benchmark.list_frames reads
MAX_GRID_POINTS = 4096  # a sweep grid larger than this is refused (each point is a whole benchmark)


class InputError(ValueError):
    """A bad input, dataset, params value or environment found before any compute (one-line message)."""


@dataclass(frozen=True)
class InputReport:
    """What :func:`check_input` found."""

    path: Path  # the input as given (user ~ expanded)
    kind: str  # "image" | "video" | "orbit"
    count: int  # images used: 1, the video frames, or the orbit views
    size: tuple[int, int]  # (H, W) of the first image
    warnings: tuple[str, ...] = field(default_factory=tuple)  # non-fatal remarks (one line each)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2]) if len(lines) <= 2 else f"{lines[0]} {lines[1]} ..."


# ---------------------------------------------------------------------------------------
# images and frame numbers


def check_image(path: str | os.PathLike, decode: bool = True) -> tuple[int, int]:
    """(H, W) of a readable image of a supported mode and size; :class:`InputError` otherwise.

    ``decode=False`` reads the header and verifies the file's structure (fast; catches
    truncation) without decoding pixels; the mode is still checked.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image not found")
    try:
        if decode:
            rgba, _ = read_rgba(p)
            h, w = rgba.shape[:2]
        else:
            from PIL import Image

            with Image.open(p) as img:
                w, h = img.size
                mode = img.mode
                img.verify()
            if mode not in SUPPORTED_MODES:
                raise ImageReadError(f"{p}: image mode {mode!r} is not supported; save it as an RGB or RGBA PNG")
    except ImageReadError as e:
        raise InputError(_one_line(e)) from None
    except Exception as e:  # noqa: BLE001  (Pillow raises many types for broken files)
        raise InputError(f"{p}: cannot read the image ({_one_line(e)}); re-export it as PNG") from None
    if min(h, w) < MIN_IMAGE_SIDE:
        raise InputError(f"{p}: image is {w}x{h} px, below the {MIN_IMAGE_SIDE} px minimum side; "
                         "give a real image of the object")
    return h, w


def _frame_number(p: Path) -> int | None:
    nums = re.findall(r"\d+", p.stem)
    return int(nums[-1]) if nums else None


def check_frame_numbers(files: list[Path], where: str) -> list[str]:
    """Warnings for ``files`` (in reading order); :class:`InputError` for duplicate numbers or
    irregular gaps (e.g. 0, 1, 5, 9). A uniform step > 1 is a warning."""
    nums = [_frame_number(p) for p in files]
    if len(files) < 2 or any(n is None for n in nums):
        return []
    seen: dict[int, Path] = {}
    for n, p in zip(nums, files):
        if n in seen:
            raise InputError(f"{where}: two files for frame {n} ({seen[n].name}, {p.name}); keep one")
        seen[n] = p
    steps = [b - a for a, b in zip(nums, nums[1:])]
    if len(set(steps)) > 1:
        step = min(steps)
        i = next(k for k, s in enumerate(steps) if s != step)
        a, b = nums[i], nums[i + 1]
        raise InputError(f"{where}: frame numbers jump from {a} to {b} (frames {a + step}..{b - step} missing); "
                         "renumber the frames consecutively or fill the gap")
    if steps[0] > 1:
        return [f"{where}: frames are numbered every {steps[0]} ({nums[0]}, {nums[1]}, ...); "
                "they are taken as consecutive frames"]
    return []


# ---------------------------------------------------------------------------------------
# one input


def check_input(path: str | os.PathLike, params: BaseModel, decode_all: bool = True) -> InputReport:
    """Read and check a ``d2 generate`` input the way the conditions stage will (no priors).

    Raises :class:`InputError` naming the file and the problem: missing, unsupported kind,
    unreadable or HDR-range image, too small, no object on the background, too few frames,
    gaps in frame numbers, mixed sizes, a bad ``orbit.json`` or the wrong number of views.
    ``decode_all=False`` (datasets: many objects) decodes only the first image of a folder for
    the object check; the others are checked from their headers and file structure.
    """
    from d2.stages import conditions as C

    cfg = params.conditions
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: input not found; give an image, a video, a folder of frames or an orbit folder")
    try:
        kind = C.detect_kind(p) if cfg.input_kind == "auto" else cfg.input_kind
    except (ValueError, OSError) as e:
        raise InputError(_one_line(e)) from None
    warnings: list[str] = []
    try:
        if kind == "image":
            if not p.is_file():
                raise InputError(f"{p}: conditions.input_kind is 'image' but this is a folder; give an image file")
            check_image(p, decode=False)
            frames = [C.read_image(p)]
            count = 1
        elif kind == "video":
            if p.is_dir():
                files = C._image_files(p)
                need = cfg.frame_start + (cfg.num_frames - 1) * cfg.frame_stride + 1
                if len(files) < need:
                    raise InputError(f"{p}: {len(files)} frames, need {need} (conditions.num_frames "
                                     f"{cfg.num_frames}, frame_stride {cfg.frame_stride}, frame_start "
                                     f"{cfg.frame_start}); add frames or lower conditions.num_frames and "
                                     "sampling.num_frames (or conditions.frame_start / frame_stride)")
                warnings += check_frame_numbers(files[:need], str(p))
                used = files[cfg.frame_start:need:cfg.frame_stride]
                _same_size(p, used)
                frames = (C.read_video_frames(p, cfg.num_frames, cfg.frame_stride, cfg.frame_start) if decode_all
                          else [C.read_image(used[0])])
            else:
                try:
                    frames = C.read_video_frames(p, cfg.num_frames, cfg.frame_stride, cfg.frame_start)
                except ValueError as e:
                    cause = str(e.__cause__ or e).strip().splitlines()
                    if e.__cause__ is None:
                        raise
                    raise InputError(f"{p}: cannot read the video ({cause[0] if cause else type(e.__cause__).__name__}); "
                                     "re-encode it as MP4 (H.264) or give a folder of frames") from None
            count = cfg.num_frames
        elif kind == "orbit":
            if not p.is_dir():
                raise InputError(f"{p}: conditions.input_kind is 'orbit' but this is not a folder with orbit.json")
            meta_path = p / "orbit.json"
            if meta_path.is_file():
                try:
                    meta = json.loads(meta_path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise InputError(f"{meta_path}: not valid JSON ({e}); write "
                                     '{"elevation_deg": 10} or remove the file') from None
                if not isinstance(meta, dict):
                    raise InputError(f"{meta_path}: must be a JSON object like {{\"elevation_deg\": 10}}")
                el = meta.get("elevation_deg", cfg.elevation_deg)
                if not isinstance(el, (int, float)) or isinstance(el, bool) or not -90 < el < 90:
                    raise InputError(f"{meta_path}: elevation_deg = {el!r} must be a number in (-90, 90)")
            files = C._image_files(p)
            if len(files) != cfg.num_views:
                raise InputError(f"{p}: {len(files)} orbit images, conditions.num_views is {cfg.num_views}; give one "
                                 "image per view or set conditions.num_views and sampling.num_views")
            _same_size(p, files)
            frames = [C.read_image(f) for f in (files if decode_all else files[:1])]
            count = len(files)
        else:
            raise InputError(f"conditions.input_kind = {kind!r} is not image, video, orbit or auto")
        sizes = {f[0].shape[:2] for f in frames}
        h, w = frames[0][0].shape[:2]
        if min(h, w) < MIN_IMAGE_SIDE:
            raise InputError(f"{p}: frames are {w}x{h} px, below the {MIN_IMAGE_SIDE} px minimum side")
        if len(sizes) > 1:
            raise InputError(f"{p}: frames differ in size {sorted(sizes)}; resize them to one size")
        for i, (rgba, alpha) in enumerate(frames):
            try:
                C.bbox(C.object_mask(rgba, alpha, cfg), f"{p}" + (f" frame {i}" if len(frames) > 1 else ""))
            except ValueError as e:
                raise InputError(_one_line(e)) from None
    except InputError:
        raise
    except (ValueError, OSError) as e:
        raise InputError(_one_line(e)) from None
    return InputReport(path=p, kind=kind, count=count, size=(h, w), warnings=tuple(warnings))


def _same_size(where: Path, files: list[Path]) -> None:
    """Header checks of ``files`` (readable, supported, not degenerate) and one size for all."""
    sizes: dict[tuple[int, int], Path] = {}
    for f in files:
        sizes.setdefault(check_image(f, decode=False), f)
    if len(sizes) > 1:
        shown = ", ".join(f"{f.name} {w}x{h}" for (h, w), f in list(sizes.items())[:3])
        raise InputError(f"{where}: frames differ in size ({shown}); resize them to one size")


# ---------------------------------------------------------------------------------------
# ground truth and datasets


def _numbered_frames(folder: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for f in folder.iterdir():
        m = FRAME_NAME.match(f.stem)
        if f.is_file() and f.suffix.lower() in GT_EXTS and m:
            i = int(m.group(1))
            if i in out:
                raise InputError(f"{folder}: two files for frame {i} ({out[i].name}, {f.name}); keep one")
            out[i] = f
    return out


def scored_frames(params: BaseModel, kind: str) -> list[int]:
    """The ground-truth frames scored for an input of ``kind``: the frames the asset will cover
    (its source frames, :func:`d2.stages.conditions.source_frames`), or the protocol's first
    ``num_frames``; refused when the two cannot be paired."""
    from d2.eval.protocol import FramePairingError, frames_to_score
    from d2.stages.conditions import source_frames

    try:
        return list(frames_to_score(source_frames(params.conditions, kind), params.protocol.num_frames))
    except FramePairingError as e:
        raise InputError(str(e)) from None


def check_gt(gt_dir: str | os.PathLike, params: BaseModel, input_dir: str | os.PathLike | None = None,
             kind: str = "video") -> None:
    """One object's ground truth holds every view (``eval_k``) and every frame scored
    (:func:`scored_frames` for an input of ``kind``).

    ``input_dir`` (the object's input frames) is checked too when the protocol scores the
    front view. Images are header-checked (readable, supported mode, not degenerate).
    """
    gt = Path(gt_dir).expanduser()
    prot = params.protocol
    frames = scored_frames(params, kind)
    views = len(prot.eval_azimuths_deg)
    if not gt.is_dir():
        raise InputError(f"{gt}: ground-truth folder not found (expected eval_0..eval_{views - 1}/<i>.png)")
    folders = [(gt / f"eval_{k}", f"protocol.eval_azimuths_deg has {views} views") for k in range(views)]
    if prot.include_front_view:
        if input_dir is None:
            raise InputError(f"{gt}: protocol.include_front_view scores the input frames, which this input lacks "
                             "(give a folder of frames); or set protocol.include_front_view=false")
        folders.append((Path(input_dir), "protocol.include_front_view is true"))
    for folder, why in folders:
        if not folder.is_dir():
            raise InputError(f"{folder}: missing ({why}); add it or change the protocol")
        have = _numbered_frames(folder)
        missing = [i for i in frames if i not in have]
        if missing:
            from d2.eval.protocol import span_label

            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            how = "the frames the asset covers" if prot.num_frames is None else "protocol.num_frames"
            raise InputError(f"{folder}: missing frame(s) {shown} of the {len(frames)} scored ({span_label(frames)}: "
                             f"{how}); it has {len(have)}; add them, or lower conditions.num_frames / "
                             f"protocol.num_frames")
        for i in frames:
            check_image(have[i], decode=False)


def dataset_objects(data_dir: str | os.PathLike, only: list[str] | None = None) -> list[str]:
    """The objects of a benchmark dataset (``input/<object>``), restricted to ``only`` (run.objects)."""
    data = Path(data_dir).expanduser()
    inputs = data / "input"
    if not data.is_dir():
        raise InputError(f"{data}: benchmark dataset not found; create one with `d2 prepare --out {data}`")
    if not inputs.is_dir():
        raise InputError(f"{data}: not a benchmark dataset (no input/ folder); create one with "
                         f"`d2 prepare --out {data}`")
    names = sorted(p.name for p in inputs.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise InputError(f"{inputs}: no object folders; a dataset holds input/<object>/<i>.png")
    if only:
        unknown = [o for o in only if o not in names]
        if unknown:
            raise InputError(f"run.objects names objects not in {inputs}: {', '.join(unknown)} "
                             f"(has: {', '.join(names)})")
        names = [o for o in names if o in only]
    return names


def check_dataset(data_dir: str | os.PathLike, params: BaseModel, objects: list[str] | None = None) -> list[str]:
    """Check a whole benchmark dataset before the first stage; return its objects.

    Every object's input video (``input/<o>``: frame count and numbers, every used frame's
    header and file structure, one size, an object in the first frame) and every ground-truth
    view and frame the protocol scores (``gt/<o>/eval_k/<i>.png``: present, readable, not
    degenerate). All problems are collected; the :class:`InputError` names the first and counts
    the rest. Pixels are decoded only for the first input frame, so a Consistent4D-sized set
    (7 objects, 4 x 32 ground-truth frames at 512 px) is checked in well under a second.
    """
    data = Path(data_dir).expanduser()
    names = dataset_objects(data, objects if objects is not None else list(params.run.objects))
    problems: list[str] = []
    for o in names:
        try:
            report = check_input(data / "input" / o, params, decode_all=False)
            check_gt(data / "gt" / o, params, data / "input" / o, report.kind)
        except InputError as e:
            problems.append(str(e))
    if problems:
        more = f"\n  and {len(problems) - 1} more: " + "; ".join(problems[1:4]) + \
            (" ..." if len(problems) > 4 else "") if len(problems) > 1 else ""
        raise InputError(f"dataset {data}: {problems[0]}{more}")
    return names


# ---------------------------------------------------------------------------------------
# params that need the environment: priors, devices, weight files


def check_priors(params: BaseModel) -> None:
    """Backend names exist, miniature weights are present, and the priors' resolution is the
    conditions' (found from configs and ``d2_prior.json`` only; nothing is loaded)."""
    from d2.stages.priors import BACKENDS, read_prior_meta

    cfg = params.priors
    want = params.conditions.resolution
    for family in ("video", "multiview"):
        key = f"priors.{family}_backend" if getattr(cfg, f"{family}_backend") else "priors.backend"
        name = getattr(cfg, f"{family}_backend") or cfg.backend
        if name not in BACKENDS:
            raise InputError(f"{key} = {name!r} is not a priors backend; known: {', '.join(sorted(BACKENDS))}")
        res, where = None, ""
        if name == "tiny":
            res, where = cfg.tiny.resolution, "priors.tiny.resolution"
        elif name == "gaussian":
            res, where = cfg.gaussian.resolution, "priors.gaussian.resolution"
        elif name == "mini":
            from d2.stages.priors import mini_prior_dir

            folder = mini_prior_dir(cfg, family)
            try:
                meta = read_prior_meta(folder)
            except (ValueError, OSError) as e:
                raise InputError(_one_line(e)) from None
            if meta is None:
                raise InputError(f"{folder / 'd2_prior.json'}: the miniature {family} prior is missing; train it with "
                                 "`python -m d2.train.priors --out data/priors` or set priors.backend")
            res, where = meta["resolution"], f"the mini {family} prior ({folder})"
        if res is not None and res != want:
            raise InputError(f"{where} is {res} px but conditions.resolution = {want}; set conditions.resolution "
                             f"and sampling.resolution to {res}")


def _check_device(key: str, value: str) -> None:
    import torch

    if value == "auto":
        return
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise InputError(f"{key} = {value!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{key} = {value!r} but CUDA is not available here; set {key}=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{key} = {value!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{key} = {value!r} but MPS is not available here; set {key}=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{key} = {value!r}: device type {dev.type!r} is not supported; use cpu or cuda")


TORCHSCRIPT_NOTE = ("is loaded with torch.jit.load: a TorchScript file is code that runs when loaded; "
                    "use only a file you trust (prefer .safetensors where the metric reads it)")


def check_runtime(params: BaseModel, devices: tuple[str, ...], fits: bool, scores: bool) -> list[str]:
    """Torch devices exist; the fit's LPIPS weights exist when ``fit.lambda_lpips > 0``; explicit
    metric weight files exist. Returns warnings (TorchScript files named by the user)."""
    from d2.config import _get

    warnings: list[str] = []
    for key in devices:
        value = _get(params, key)
        if isinstance(value, str):
            _check_device(key, value)
    if fits and params.fit.lambda_lpips > 0:
        from d2.eval.perceptual import _find_file, vgg16_search_paths

        paths = vgg16_search_paths(params.fit.lpips_vgg_weights)
        if _find_file(paths) is None:
            if getattr(params.fit, "lpips_required", True):
                raise InputError(f"fit.lambda_lpips = {params.fit.lambda_lpips:g} with fit.lpips_required needs the "
                                 f"VGG16 weights, not found at {', '.join(map(str, paths))}; set "
                                 "fit.lpips_vgg_weights=FILE, or fit.lpips_required=false to fit without LPIPS")
            # not required: the fit leaves LPIPS out and fit.json says what it optimised instead
    if scores:
        m = params.metrics
        for key, value in (("metrics.clip_weights", m.clip_weights), ("metrics.lpips_vgg_weights", m.lpips_vgg_weights),
                           ("metrics.i3d_weights", m.i3d_weights)):
            if value is None:
                continue
            if not Path(value).expanduser().is_file():
                raise InputError(f"{key} = {value}: file not found; fix the path or set {key}=null to search caches")
            if key == "metrics.i3d_weights" or (key == "metrics.clip_weights" and Path(value).suffix == ".pt"):
                warnings.append(f"{key} ({value}) {TORCHSCRIPT_NOTE}")
    return warnings


def parse_grid(items: list[str], root: type[BaseModel] | None = None) -> dict[str, list[Any]]:
    """``--grid`` axes, e.g. ``['sampling.s0=0.3,0.5', 'fit.iters=10,20']``, as
    ``{'sampling.s0': [0.3, 0.5], 'fit.iters': [10, 20]}`` (values parsed as YAML); one axis per
    knob of the params model ``root`` (see :func:`grid_points`)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"grid axis '{item}' must look like key=v1,v2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip() != ""]
        except ParamsError as e:
            raise InputError(f"grid axis '{item}': {_one_line(e)}") from None
        if not values:
            raise InputError(f"grid axis '{item}' has no values")
        _one_knob_per_axis([*grid, key], root)
        grid[key] = values
    return grid


def _one_knob_per_axis(keys: list[str], root: type[BaseModel] | None) -> None:
    """Two axes that set one knob (also an alias and its full name) are refused: the rows would be
    labelled with one value and run with the other."""
    knobs: dict[str, str] = {}  # the full key an axis sets -> the axis as written
    for key in keys:
        knob = canonical_key(key, root)
        if knob in knobs:
            same = f"'{key}' given twice" if knobs[knob] == key else f"'{knobs[knob]}' and '{key}' both set {knob}"
            raise InputError(f"sweep grid: {same}; give each knob one --grid axis with all its values")
        knobs[knob] = key


def grid_points(params: BaseModel, grid: dict[str, list[Any]]) -> list[tuple[str, list[str], BaseModel]]:
    """Every point of a sweep grid as (id, overrides, validated params), validated before any compute."""
    keys = list(grid)
    _one_knob_per_axis(keys, type(params))
    n = 1
    for values in grid.values():
        n *= len(values)
    if n > MAX_GRID_POINTS:
        raise InputError(f"the sweep grid has {n} points (max {MAX_GRID_POINTS}); use fewer values per axis")
    points = []
    for i, combo in enumerate(itertools.product(*grid.values())):
        overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in zip(keys, combo)]
        slug = "_".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
        try:
            point = with_overrides(params, overrides)
        except ParamsError as e:
            raise InputError(f"sweep point {' '.join(overrides)}: {_one_line(e)}") from None
        points.append((f"p{i:02d}_" + re.sub(r"[^A-Za-z0-9_.=-]", "-", slug)[:80], overrides, point))
    return points


def check_grid(params: BaseModel, items: list[str]) -> list[BaseModel]:
    """Every point of a sweep grid (``key=v1,v2,...`` axes, as ``d2 sweep --grid``), validated."""
    return [p for _, _, p in grid_points(params, parse_grid(items, type(params)))]


# ---------------------------------------------------------------------------------------
# the d2 command


_SCORING_DEVICES = ("metrics.device",)
_GENERATION_DEVICES = ("priors.device", "fit.device", "render_eval.device", "metrics.device")


def _out_is_not_a_file(args: Mapping[str, Any]) -> None:
    out = args.get("out")
    if out and Path(out).expanduser().is_file():
        raise InputError(f"--out {out} is a file; give a folder")


def _data_key(p: BaseModel) -> tuple:
    c, prot = p.conditions, p.protocol
    return (c.input_kind, c.num_frames, c.frame_stride, c.frame_start, c.num_views, c.alpha_threshold, c.white_threshold,
            len(prot.eval_azimuths_deg), prot.num_frames, prot.include_front_view, tuple(p.run.objects))


def preflight(command: str, args: Mapping[str, Any], params: BaseModel) -> list[str]:
    """The checks ``d2 <command>`` runs before anything else; returns warnings (one line each).

    ``args`` are the command's arguments (``vars(argparse.Namespace)``). Raises
    :class:`InputError` for the first problem found.
    """
    warnings: list[str] = []
    if command in ("generate", "benchmark", "sweep", "demo", "schedule"):
        _out_is_not_a_file(args)
        check_priors(params)
        warnings += check_runtime(params, _GENERATION_DEVICES, fits=True, scores=True)
    if command == "prepare":
        _out_is_not_a_file(args)
        warnings += check_runtime(params, ("prepare.device",), fits=False, scores=False)
    if command == "evaluate":
        for flag in ("pred", "gt"):
            folder = Path(args[flag]).expanduser()
            if not folder.is_dir():
                raise InputError(f"--{flag} {folder}: folder not found")
        warnings += check_runtime(params, _SCORING_DEVICES, fits=False, scores=True)
    if command == "generate":
        report = check_input(args["input"], params)
        warnings += list(report.warnings)
        if args.get("gt"):
            src = Path(args["input"]).expanduser()
            check_gt(args["gt"], params, src if src.is_dir() else None, report.kind)  # a frames folder is the front view
    if command in ("benchmark", "sweep", "demo", "schedule"):
        data = Path(args.get("data") or params.run.data_dir).expanduser()
        if command == "demo" and not (data / "meta.json").exists():
            return warnings  # the demo prepares the dataset first
        points = check_grid(params, list(args.get("grid") or [])) if command == "sweep" else [params]
        seen: set[tuple] = set()
        for p in points:
            if _data_key(p) not in seen:
                seen.add(_data_key(p))
                check_dataset(data, p)
            if p is not params:
                check_priors(p)
    return warnings
