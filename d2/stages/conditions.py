"""Stage: the conditions of the matrix sampler (a reference orbit and a reference video).

Three input kinds (``ConditionsConfig.input_kind``, "auto" guesses from the path):

    image   one image file (.png/.jpg/.jpeg/.webp/.bmp): the reference orbit is sampled from the
            multi-view prior on the image (its input-view entry then replaced by the image), the
            reference video from the video prior on the image.
    video   a video file (.mp4/.gif/.mov/.avi/.webm/.mkv) or a folder of frames (in the order of
            the last number in their names; gaps and two files of one number are refused, a
            uniform step is read as consecutive frames): ``num_frames`` frames from frame
            ``frame_start`` on (every ``frame_stride``-th) are the reference video; the orbit is
            sampled from the first of them or, with ``video_orbit_frame: last`` (the paper and the
            authors' code), the last.
    orbit   a folder holding ``orbit.json`` ({"elevation_deg": e, optional "azimuths_deg"}) and
            ``num_views`` images in SV3D_p order (view v at (v+1)*360/V degrees from the front, the
            last = the front view): the orbit is given; the video is sampled from its front view.

:func:`open_input` classifies and lists an input (no pixels read); :func:`check_input` checks
it as this stage reads it, before any compute (``d2`` runs it first); :func:`list_frames` is the
benchmark layout's frame naming (``<i>.png``), which the ground truth and the predictions share.

Preprocessing of every image: alpha composited on white; the object (alpha > threshold, or
non-white pixels when there is no alpha) found by its bounding box, then framed (``framing``
for images and orbits, ``video_framing`` for videos):

    fraction   recentred on a white square so its longer side is ``object_fraction`` of the side
               (the authors' ``--image_frame_ratio``; their published run: 0.9)
    own_scale  recentred at its own scale on a white square of the input's longer side (the
               authors' main.py without a ratio, images)
    keep       the input as it is, padded to a square (the authors' main.py without a ratio, videos)

and resized to ``resolution``. The frames of a video share one box (the union of theirs, so
the object keeps its motion and size changes in the frame) or, with ``video_box: per_frame``,
each frame is recentred and scaled on its own box (what the authors' main.py does to every
frame when a ratio is given: the object sits centred at one size in every frame). An orbit
input always shares one box over its views.

Outputs (one folder, written atomically): ``conditions.pt`` (see :class:`Conditions`),
``input.png``, ``orbit/view_XX.png``, ``video/frame_YY.png``, ``conditions.json``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from d2.stages.cameras import OrbitSpec, orbit_azimuths
from d2.stages.edm import sample_sequences
from d2.stages.priors import Prior
from d2.stages.schedules import FP32_MAX_SIGMA, SEED_MAX, karras_problem, multiview_cfg_scales, video_cfg_scales
from d2.utils.io import MIN_IMAGE_SIDE, SUPPORTED_MODES, InputError, pil_to_rgba, read_rgba

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}  # images, frames and views of an input
VIDEO_EXTS = {".mp4", ".gif", ".mov", ".avi", ".webm", ".mkv"}
FRAME_EXTS = (".png", ".jpg", ".jpeg")  # frames of the benchmark layout, named <i>.<ext> (list_frames)
_ORBIT_DEFAULTS = OrbitSpec()


class ConditionsConfig(BaseModel):
    """Knobs of the conditions stage."""

    model_config = ConfigDict(extra="forbid")
    input_kind: Literal["auto", "image", "video", "orbit"] = "auto"  # how to read the input path
    num_views: int = Field(8, ge=1)  # V: views of the reference orbit
    num_frames: int = Field(8, ge=1)  # F: frames of the reference video
    resolution: int = Field(16, ge=8)  # image side in pixels (the priors' resolution)
    elevation_deg: float = Field(10.0, gt=-90, lt=90)  # orbit elevation (authors' main.py default 10; their published run 0; an orbit input's orbit.json overrides it)
    fov_deg: float = Field(_ORBIT_DEFAULTS.fov_deg, gt=0, lt=180)  # camera field of view recorded for the fitting stage
    radius: float = Field(_ORBIT_DEFAULTS.radius, gt=0)  # camera distance recorded for the fitting stage (away from the object at the origin)
    framing: Literal["fraction", "own_scale", "keep"] = "fraction"  # image / orbit inputs (authors' published run: fraction 0.9; main.py without a ratio: own_scale); fraction puts every object at one size, which the miniature priors were trained on
    video_framing: Literal["fraction", "own_scale", "keep"] = "fraction"  # video inputs (authors' published run: fraction 0.9, per frame; main.py without a ratio: keep); fraction as for images
    video_box: Literal["union", "per_frame"] = "union"  # video inputs framed by fraction / own_scale: one box (the union) for all frames, or each frame recentred on its own box (authors' published run)
    object_fraction: float | None = Field(0.85, gt=0, le=1)  # object's longer side / image side with framing fraction (authors' --image_frame_ratio, 0.9 in their published run); None: keep framing
    alpha_threshold: float = Field(0.5, gt=0, lt=1)  # alpha above this is object
    white_threshold: float = Field(0.08, gt=0, lt=1)  # without alpha: a pixel this far from white is object
    frame_stride: int = Field(1, ge=1)  # take every k-th frame of a video input
    video_orbit_frame: Literal["first", "last"] = "first"  # video input: the frame the reference orbit is sampled from (paper, authors: last); first matches the front-view row, whose video prior starts at its conditioning image
    orbit_decoder: Literal["image", "temporal"] = "temporal"  # reference orbit decoded by the multi-view prior's own per-frame decoder (authors: SV3D_p's image decoder) or the temporal video decoder across the views
    store_dtype: Literal["uint8", "float32"] = "uint8"  # images in conditions.pt (authors keep floats: float32); uint8 is 4x smaller and equals the PNG previews
    frame_start: int = Field(0, ge=0)  # first frame of a video input that is used (0: its first frame)
    replace_input_view: bool = True  # put the input image into the sampled orbit's input view
    num_steps: int = Field(6, ge=1)  # denoising steps of the reference samples
    sigma_min: float = Field(0.002, gt=0)  # Karras sigma_min
    sigma_max: float = Field(700.0, gt=0, le=FP32_MAX_SIGMA)  # Karras sigma_max (initial noise std sqrt(1 + sigma_max^2) in fp32)
    rho: float = Field(7.0, gt=0)  # Karras rho
    seed: int = Field(23, ge=0, le=SEED_MAX)  # seed of the reference samples (cond_aug noise and initial noise)
    fps_id: int = 24  # SVD micro-conditioning fps id
    motion_bucket_id: int = 127  # SVD micro-conditioning motion bucket
    video_cond_aug: float = Field(0.02, ge=0)  # SVD conditioning-image noise
    multiview_cond_aug: float = Field(1e-5, ge=0)  # SV3D conditioning-image noise
    video_cfg_min: float = 1.5  # video CFG at frame 0 (linear over frames)
    video_cfg_max: float = 3.0  # video CFG at the last frame
    multiview_cfg: Literal["constant", "triangle"] = "constant"  # multi-view CFG profile (authors: constant)
    multiview_cfg_scale: float = 2.5  # constant value / triangle peak
    multiview_cfg_min: float = 1.0  # triangle ends
    chunk_size: int = Field(4, ge=1, json_schema_extra={"no_effect": True})  # sequences per UNet call
    decode_chunk: int = Field(14, ge=1)  # frames per decoder call (authors: 10)
    progress: bool = Field(True, json_schema_extra={"no_effect": True})  # tqdm bars

    @model_validator(mode="after")
    def _finite_ramp(self) -> "ConditionsConfig":
        problem = karras_problem("conditions", self.sigma_min, self.sigma_max, self.rho)
        if problem:
            raise ValueError(problem)
        return self


@dataclass
class Conditions:
    """What the matrix sampler is conditioned on (images float32 [.., 3, H, W] in [0, 1])."""

    orbit: Tensor  # [V, 3, H, W] reference orbit; view v at azimuths_deg[v]
    video: Tensor  # [F, 3, H, W] reference video; frame 0 = the reference time
    input: Tensor  # [3, H, W] the preprocessed input image (front view at frame input_frame_index)
    azimuths_deg: list[float]  # [V] azimuth of each orbit view from the input view
    elevation_deg: float  # orbit elevation
    fov_deg: float  # field of view (for fitting)
    radius: float  # camera distance (for fitting)
    input_view_index: int  # orbit index of the input (front) view: V - 1 in SV3D_p order
    kind: str  # "image" | "video" | "orbit"
    input_frame_index: int = 0  # video frame the orbit was sampled from (0 for image and orbit inputs)

    def state(self, store_dtype: Literal["uint8", "float32"] = "uint8") -> dict:
        """What ``conditions.pt`` holds: images [.., 3, H, W] as uint8 (4x smaller; PNG precision) or float32."""
        q = _quantize if store_dtype == "uint8" else (lambda t: t.float().contiguous())
        return {"orbit": q(self.orbit), "video": q(self.video), "input": q(self.input),
                "azimuths_deg": [float(a) for a in self.azimuths_deg], "elevation_deg": float(self.elevation_deg),
                "fov_deg": float(self.fov_deg), "radius": float(self.radius),
                "input_view_index": int(self.input_view_index), "kind": self.kind,
                "input_frame_index": int(self.input_frame_index)}


def load_conditions(conditions_dir: str | Path) -> Conditions:
    """Read ``conditions.pt`` of a conditions folder."""
    from d2.utils.io import load_tensor

    path = Path(conditions_dir) / "conditions.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the conditions stage first")
    s = load_tensor(path)
    for k in ("orbit", "video", "input"):
        s[k] = s[k].float() / 255.0 if s[k].dtype == torch.uint8 else s[k].float()
    return Conditions(**s)


def _quantize(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------


def object_mask(rgba: np.ndarray, has_alpha: bool, cfg: ConditionsConfig) -> np.ndarray:
    """[H, W] bool: alpha > threshold, or (no alpha) farther than white_threshold from white."""
    if has_alpha:
        return rgba[..., 3] > cfg.alpha_threshold
    return (1.0 - rgba[..., :3]).max(-1) > cfg.white_threshold


def composite_white(rgba: np.ndarray) -> np.ndarray:
    """[H, W, 4] -> [H, W, 3] with alpha composited on white."""
    a = rgba[..., 3:4]
    return rgba[..., :3] * a + (1.0 - a)


def bbox(mask: np.ndarray, name: str) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the True pixels; :class:`InputError` when there are none."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise InputError(f"{name}: no object found (the image is empty / all background); give an RGBA image with "
                         "an alpha mask or an object on a white background")
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def recentre(rgb: np.ndarray, box: tuple[int, int, int, int] | None, cfg: ConditionsConfig,
             framing: Literal["fraction", "own_scale", "keep"] = "fraction") -> Tensor:
    """[H, W, 3] on white -> [3, R, R] tensor framed as ``framing`` says (module docstring)."""
    r = cfg.resolution
    img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()  # [3, H, W]
    if box is not None and framing == "own_scale":  # the box at its own scale, centred on the input's square
        y0, y1, x0, x1 = box
        side = max(img.shape[1:])
        ch, cw = y1 - y0, x1 - x0
        canvas = torch.ones(3, side, side)
        top, left = side // 2 - ch // 2, side // 2 - cw // 2
        canvas[:, top:top + ch, left:left + cw] = img[:, y0:y1, x0:x1]
        return F.interpolate(canvas[None], size=(r, r), mode="bilinear", antialias=True,
                             align_corners=False)[0].clamp(0, 1)
    if box is None or framing == "keep" or cfg.object_fraction is None:  # keep framing: pad to a square, resize
        h, w = img.shape[1:]
        side = max(h, w)
        canvas = torch.ones(3, side, side)
        canvas[:, (side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = img
        return F.interpolate(canvas[None], size=(r, r), mode="bilinear", antialias=True,
                             align_corners=False)[0].clamp(0, 1)
    y0, y1, x0, x1 = box
    crop = img[:, y0:y1, x0:x1]
    ch, cw = crop.shape[1:]
    scale = cfg.object_fraction * r / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    crop = F.interpolate(crop[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    canvas = torch.ones(3, r, r)
    top, left = (r - nh) // 2, (r - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = crop.clamp(0, 1)
    return canvas


def preprocess_frames(frames: list[tuple[np.ndarray, bool]], cfg: ConditionsConfig, name: str,
                      info: dict | None = None, framing: Literal["fraction", "own_scale", "keep"] | None = None,
                      per_frame: bool = False) -> Tensor:
    """RGBA frames -> [N, 3, R, R]; one bounding box (the union) for all frames, or each frame's own
    box with ``per_frame``; ``framing`` default cfg.framing. ``info`` (optional) gets ``source_size``
    [w, h], ``object_box`` (y0, y1, x0, x1 of the union; None when the framing is kept),
    ``object_boxes`` (one per frame, with ``per_frame``), ``object_fraction`` and ``resolution``."""
    if not frames:
        raise ValueError(f"{name}: no frames")
    shapes = {f[0].shape[:2] for f in frames}
    if len(shapes) != 1:
        raise ValueError(f"{name}: frames differ in size: {sorted(shapes)}")
    boxes = [bbox(object_mask(a, al, cfg), f"{name} frame {i}") for i, (a, al) in enumerate(frames)]
    union = (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))
    framing = cfg.framing if framing is None else framing
    kept = framing == "keep" or cfg.object_fraction is None
    if info is not None:
        h, w = frames[0][0].shape[:2]
        info.update({"source_size": [int(w), int(h)], "resolution": cfg.resolution, "framing": framing,
                     "object_box": None if kept else list(union),
                     "object_fraction": cfg.object_fraction if framing == "fraction" else None})
        if per_frame and not kept:
            info["object_boxes"] = [list(b) for b in boxes]
    used = boxes if per_frame else [union] * len(frames)
    return torch.stack([recentre(composite_white(a), box, cfg, framing) for (a, _), box in zip(frames, used)])


def source_frames(cfg: "ConditionsConfig", kind: str) -> list[int]:
    """The input frames the asset is made of, one per reference-video frame: a video input's
    ``frame_start + j * frame_stride`` (j < ``num_frames``); an image or an orbit: 0..num_frames-1,
    the frames of the reference video generated from it. Ground-truth frame i is the time of input
    frame i (:func:`d2.eval.protocol.frames_to_score`)."""
    if kind == "video":
        return [cfg.frame_start + j * cfg.frame_stride for j in range(cfg.num_frames)]
    return list(range(cfg.num_frames))


def describe_reading(info: dict) -> str:
    """One sentence on how an input was read (``conditions.json``'s ``input_reading``)."""
    parts = [f"{info.get('kind', '?')} input"]
    if info.get("kind") == "video":
        total = info.get("frames_total")
        kept = info.get("frames_kept", [])
        of = f" of {total}" if total is not None else ""
        parts.append(f"kept {len(kept)}{of} frames ({', '.join(map(str, kept[:12]))}{', ...' if len(kept) > 12 else ''}; "
                     f"conditions.frame_start {info.get('frame_start')}, frame_stride {info.get('frame_stride')}, "
                     f"num_frames {len(kept)})")
        if info.get("fps"):
            dur = (kept[-1] - kept[0] + 1) / info["fps"] if kept else 0.0
            parts.append(f"source {info['fps']:g} fps, so {dur:.2f} s of the video")
        if total is not None and kept and kept[-1] + 1 < total:
            parts.append(f"frames {kept[-1] + 1}..{total - 1} unused")
        if "orbit_from_frame" in info:
            parts.append(f"reference orbit from frame {info['orbit_from_frame']}")
    if info.get("source_size"):
        w, h = info["source_size"]
        parts.append(f"frames {w}x{h} px")
    box = info.get("object_box")
    boxes = info.get("object_boxes")
    if boxes:
        sides = [max(b[1] - b[0], b[3] - b[2]) for b in boxes]
        scale = (f"so its longer side is {info['object_fraction'] * 100:.0f}% of the image"
                 if info.get("object_fraction") else "at its own scale")
        parts.append(f"each frame recentred on its own object box (longer side {min(sides)}..{max(sides)} px) {scale}")
    elif box:
        y0, y1, x0, x1 = box
        where = f"object box {x1 - x0}x{y1 - y0} px at x {x0}, y {y0} (one box for all frames), recentred"
        if info.get("object_fraction"):
            parts.append(f"{where} so its longer side is {info['object_fraction'] * 100:.0f}% of the image")
        else:
            parts.append(f"{where} at its own scale")
    else:
        parts.append("framing kept (padded to a square)")
    parts.append(f"resized to {info.get('resolution')}x{info.get('resolution')} px")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------
# reading the input
# ---------------------------------------------------------------------------------------


def frame_number(path: Path) -> int | None:
    """The number of a frame file: the last number in its name (``7.png``, ``frame_007.png``: 7)."""
    nums = re.findall(r"\d+", path.stem)
    return int(nums[-1]) if nums else None


def frame_files(folder: Path) -> list[Path]:
    """The images of a folder of frames or views in frame-number order (files without a number last, by name)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    return sorted(files, key=lambda p: (math.inf if frame_number(p) is None else frame_number(p), p.name))


def _by_number(files: list[Path], where: str | Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for p in files:
        n = frame_number(p)
        if n in out:
            raise InputError(f"{where}: two files for frame {n} ({out[n].name}, {p.name}); keep one")
        out[n] = p
    return out


def list_frames(folder: Path) -> dict[int, Path]:
    """Frame number -> file of the images named ``<i>.png|jpg|jpeg`` in ``folder``, in number order
    (the benchmark layout: input frames, ground truth, predictions); other files are ignored."""
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    return _by_number([p for p in frame_files(folder) if p.stem.isdecimal() and p.suffix.lower() in FRAME_EXTS], folder)


def check_frame_numbers(files: list[Path], where: str | Path) -> list[str]:
    """Warnings for the frames ``files`` (in reading order); :class:`InputError` for two files of one
    number or irregular gaps (0, 1, 5, 9). A uniform step > 1 (0, 2, 4, ...) is a warning: the
    frames are taken as consecutive. Frames without numbers are read in name order, unchecked."""
    nums = [frame_number(p) for p in files]
    if len(files) < 2 or None in nums:
        return []
    _by_number(files, where)
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


def detect_kind(path: Path) -> Literal["image", "video", "orbit"]:
    """Guess the input kind of an existing path (see the module docstring)."""
    if path.is_dir():
        if (path / "orbit.json").is_file():
            return "orbit"
        if frame_files(path):
            return "video"
        raise InputError(f"{path}: a folder without images (nor orbit.json); give a folder of frames or an "
                         "orbit folder")
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    raise InputError(f"{path}: unsupported input extension {ext!r} (images: {sorted(IMAGE_EXTS)}, "
                     f"videos: {sorted(VIDEO_EXTS)})")


def check_image(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header and file structure (no pixels decoded; truncation is
    caught): readable, of a mode :func:`d2.utils.io.pil_to_rgba` reads, not below the minimum side."""
    try:
        with Image.open(path) as img:
            (w, h), mode = img.size, img.mode
            img.verify()
    except Exception as e:  # noqa: BLE001  (Pillow raises many types for broken files)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: cannot read the image ({why}); re-export it as PNG") from None
    if mode not in SUPPORTED_MODES:
        raise InputError(f"{path}: image mode {mode!r} is not supported; save it as an RGB or RGBA PNG")
    if min(h, w) < MIN_IMAGE_SIDE:
        raise InputError(f"{path}: image is {w}x{h} px, below the {MIN_IMAGE_SIDE} px minimum side; "
                         "give a real image of the object")
    return h, w


@dataclass(frozen=True)
class InputFiles:
    """An input classified and listed by :func:`open_input` (no pixels read)."""

    path: Path  # the input (~ expanded)
    kind: Literal["image", "video", "orbit"]
    files: list[Path]  # the images read in order: the image, a folder's kept frames, the views; [] for a video file
    elevation_deg: float  # the orbit's elevation: an orbit folder's orbit.json, else conditions.elevation_deg
    warnings: list[str]  # remarks on the frame numbers (one line each)


def open_input(path: str | Path, cfg: ConditionsConfig) -> InputFiles:
    """Classify an input (``cfg.input_kind``, or guessed from the path) and list the images it is
    read from. :class:`InputError` names the file and the fix: not found, unsupported, too few
    frames, gaps or duplicates in frame numbers, a bad ``orbit.json``, the wrong number of views."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{p}: input not found; give an image, a video, a folder of frames or an orbit folder")
    kind = detect_kind(p) if cfg.input_kind == "auto" else cfg.input_kind
    if kind == "image":
        if not p.is_file():
            raise InputError(f"{p}: conditions.input_kind is 'image' but this is a folder; give an image file")
        return InputFiles(p, kind, [p], cfg.elevation_deg, [])
    if kind == "video":
        if p.is_file():
            return InputFiles(p, kind, [], cfg.elevation_deg, [])
        files = frame_files(p)
        need = cfg.frame_start + (cfg.num_frames - 1) * cfg.frame_stride + 1
        if len(files) < need:
            raise InputError(f"{p}: {len(files)} frames, need {need} (conditions.num_frames {cfg.num_frames}, "
                             f"frame_stride {cfg.frame_stride}, frame_start {cfg.frame_start}); add frames or lower "
                             "conditions.num_frames and sampling.num_frames (or conditions.frame_start / frame_stride)")
        warnings = check_frame_numbers(files[:need], p)
        return InputFiles(p, kind, files[cfg.frame_start:need:cfg.frame_stride], cfg.elevation_deg, warnings)
    if not p.is_dir():
        raise InputError(f"{p}: conditions.input_kind is 'orbit' but this is not a folder with orbit.json")
    elevation = _orbit_elevation(p / "orbit.json", cfg)
    files = frame_files(p)
    if len(files) != cfg.num_views:
        raise InputError(f"{p}: {len(files)} orbit images, conditions.num_views is {cfg.num_views}; give one "
                         "image per view or set conditions.num_views and sampling.num_views")
    return InputFiles(p, kind, files, elevation, [])


def _orbit_elevation(meta_path: Path, cfg: ConditionsConfig) -> float:
    """The elevation ``orbit.json`` gives (else ``cfg.elevation_deg``); its azimuths, when given, must be SV3D_p's."""
    if not meta_path.is_file():
        return cfg.elevation_deg
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f'{meta_path}: not valid JSON ({e}); write {{"elevation_deg": 10}} or remove the '
                         'file') from None
    if not isinstance(meta, dict):
        raise InputError(f'{meta_path}: must be a JSON object like {{"elevation_deg": 10}}')
    el = meta.get("elevation_deg", cfg.elevation_deg)
    if not isinstance(el, (int, float)) or isinstance(el, bool) or not -90 < el < 90:
        raise InputError(f"{meta_path}: elevation_deg = {el!r} must be a number in (-90, 90)")
    if "azimuths_deg" in meta:
        want = orbit_azimuths(cfg.num_views)
        given = meta["azimuths_deg"]
        if (not isinstance(given, list) or len(given) != len(want)
                or any(not isinstance(g, (int, float)) or min(abs(g - w) % 360, 360 - abs(g - w) % 360) > 1e-3
                       for g, w in zip(given, want))):
            raise InputError(f"{meta_path}: azimuths_deg {given} are not the SV3D_p orbit of {cfg.num_views} views "
                             f"{want}; remove them or order the views as SV3D_p does")
    return float(el)


def read_image(path: Path) -> tuple[np.ndarray, bool]:
    """An image file -> ([H, W, 4] float32 in [0, 1], has_alpha) (16-bit, palette, CMYK, EXIF: d2.utils.io)."""
    return read_rgba(path)


def read_input(inp: InputFiles, cfg: ConditionsConfig, first_only: bool = False) -> list[tuple[np.ndarray, bool]]:
    """The images of an input as ([H, W, 4] float32, has_alpha): its files (``first_only``: the
    first), or the ``num_frames`` frames from ``frame_start`` on (every ``frame_stride``-th) of a video file."""
    if inp.files:
        return [read_image(f) for f in inp.files[:1 if first_only else None]]
    import imageio.v3 as iio

    need = cfg.frame_start + (cfg.num_frames - 1) * cfg.frame_stride + 1
    frames = []
    try:
        for i, fr in enumerate(iio.imiter(inp.path)):
            if i >= need:
                break
            if i >= cfg.frame_start and (i - cfg.frame_start) % cfg.frame_stride == 0:
                frames.append(pil_to_rgba(Image.fromarray(np.asarray(fr)), str(inp.path)))
    except Exception as e:  # noqa: BLE001  (imageio raises many types for unreadable files)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{inp.path}: cannot read the video ({why}); re-encode it as MP4 (H.264) or give a folder "
                         "of frames") from None
    if len(frames) < cfg.num_frames:
        raise InputError(f"{inp.path}: only {len(frames)} usable frames from frame {cfg.frame_start}, need "
                         f"{cfg.num_frames} (frame_stride {cfg.frame_stride}); lower conditions.num_frames and "
                         "sampling.num_frames (or conditions.frame_start / frame_stride)")
    return frames


def check_input(path: str | Path, cfg: ConditionsConfig, decode_all: bool = True) -> InputFiles:
    """Check an input the way :func:`make_conditions` reads it, without the priors: :func:`open_input`,
    every image's header and size (:func:`check_image`, one size for all), and an object on the
    background of every decoded image (``decode_all=False``: the first only)."""
    inp = open_input(path, cfg)
    sizes: dict[tuple[int, int], Path] = {}
    for f in inp.files:
        sizes.setdefault(check_image(f), f)
    if len(sizes) > 1:
        shown = ", ".join(f"{f.name} {w}x{h}" for (h, w), f in list(sizes.items())[:3])
        raise InputError(f"{inp.path}: frames differ in size ({shown}); resize them to one size")
    frames = read_input(inp, cfg, first_only=not decode_all)
    h, w = frames[0][0].shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise InputError(f"{inp.path}: frames are {w}x{h} px, below the {MIN_IMAGE_SIDE} px minimum side")
    if len({rgba.shape[:2] for rgba, _ in frames}) > 1:  # after EXIF rotation
        raise InputError(f"{inp.path}: frames differ in size once rotated by their EXIF; resize them to one size")
    for i, (rgba, alpha) in enumerate(frames):
        bbox(object_mask(rgba, alpha, cfg), f"{inp.path}" + (f" frame {i}" if len(frames) > 1 else ""))
    return inp


def count_video_frames(path: Path) -> tuple[int | None, float | None]:
    """(frames, fps) of a video file or a folder of frames (fps None for a folder; frames None
    when the container does not say). Reads the header only."""
    if path.is_dir():
        return len(frame_files(path)), None
    import imageio.v3 as iio

    try:
        meta = iio.immeta(path, plugin="FFMPEG")
    except Exception:  # noqa: BLE001  (a container without the fields: unknown)
        return None, None
    fps = float(meta["fps"]) if isinstance(meta.get("fps"), (int, float)) and meta["fps"] > 0 else None
    n = meta.get("nframes")
    if not isinstance(n, (int, float)) or not math.isfinite(n):
        n = round(meta["duration"] * fps) if fps and isinstance(meta.get("duration"), (int, float)) else None
    return (int(n) if n is not None else None), fps


# ---------------------------------------------------------------------------------------
# reference samples
# ---------------------------------------------------------------------------------------


def sample_reference_orbit(multiview_prior: Prior, image: Tensor, azimuths_deg: list[float], elevation_deg: float,
                           cfg: ConditionsConfig) -> Tensor:
    """Orbit [V, 3, H, W] from the multi-view prior conditioned on ``image`` [3, H, W]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        cond = multiview_prior.condition(image[None], cond_aug=cfg.multiview_cond_aug, azimuths_deg=azimuths_deg,
                                         elevations_deg=elevation_deg, generator=gen)
    scale = multiview_cfg_scales(len(azimuths_deg), cfg.multiview_cfg, cfg.multiview_cfg_scale, cfg.multiview_cfg_min)
    lat = sample_sequences(multiview_prior, cond, len(azimuths_deg), scale, cfg.num_steps, cfg.seed, cfg.sigma_min,
                           cfg.sigma_max, cfg.rho, chunk_size=cfg.chunk_size, progress=cfg.progress)
    with torch.no_grad():
        return multiview_prior.decode(lat[0], chunk=cfg.decode_chunk, decoder=cfg.orbit_decoder).cpu()


def sample_reference_video(video_prior: Prior, image: Tensor, cfg: ConditionsConfig) -> Tensor:
    """Video [F, 3, H, W] from the video prior conditioned on ``image`` [3, H, W]."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        cond = video_prior.condition(image[None], cond_aug=cfg.video_cond_aug, fps_id=cfg.fps_id,
                                     motion_bucket_id=cfg.motion_bucket_id, generator=gen)
    scale = video_cfg_scales(cfg.num_frames, cfg.video_cfg_min, cfg.video_cfg_max)
    lat = sample_sequences(video_prior, cond, cfg.num_frames, scale, cfg.num_steps, cfg.seed + 1, cfg.sigma_min,
                           cfg.sigma_max, cfg.rho, chunk_size=cfg.chunk_size, progress=cfg.progress)
    with torch.no_grad():
        return video_prior.decode(lat[0], chunk=cfg.decode_chunk).cpu()


def make_conditions(input_path: str | Path, cfg: ConditionsConfig, priors: tuple[Prior, Prior],
                    info: dict | None = None) -> Conditions:
    """Read, preprocess and complete the conditions of one input (no files written). ``info``
    (optional) gets how the input was read (see :func:`describe_reading`)."""
    info = {} if info is None else info
    video_prior, multiview_prior = priors
    inp = open_input(input_path, cfg)
    for p in (video_prior, multiview_prior):
        if p.resolution != cfg.resolution:
            raise ValueError(f"conditions.resolution {cfg.resolution} != the {p.family} prior's {p.resolution}")
    if inp.kind != "orbit":  # the orbit will be sampled and decoded: fail before any sampling
        multiview_prior.check_decoder(cfg.orbit_decoder)
    azimuths = orbit_azimuths(cfg.num_views)
    v_in = cfg.num_views - 1
    ref_frame = 0
    info["kind"] = inp.kind
    name = str(inp.path)
    if inp.kind == "image":
        image = preprocess_frames(read_input(inp, cfg), cfg, name, info)[0]
        orbit = sample_reference_orbit(multiview_prior, image, azimuths, inp.elevation_deg, cfg)
        if cfg.replace_input_view:
            orbit[v_in] = image
        video = sample_reference_video(video_prior, image, cfg)
    elif inp.kind == "video":
        frames = read_input(inp, cfg)
        total, fps = count_video_frames(inp.path)
        info.update({"frames_total": total, "fps": fps, "frame_start": cfg.frame_start,
                     "frame_stride": cfg.frame_stride, "frames_kept": source_frames(cfg, "video")})
        video = preprocess_frames(frames, cfg, name, info, cfg.video_framing, cfg.video_box == "per_frame")
        ref_frame = video.shape[0] - 1 if cfg.video_orbit_frame == "last" else 0
        info["orbit_from_frame"] = info["frames_kept"][ref_frame]
        image = video[ref_frame]
        orbit = sample_reference_orbit(multiview_prior, image, azimuths, inp.elevation_deg, cfg)
        if cfg.replace_input_view:
            orbit[v_in] = image
    else:
        orbit = preprocess_frames(read_input(inp, cfg), cfg, name, info)
        image = orbit[v_in]
        video = sample_reference_video(video_prior, image, cfg)
    return Conditions(orbit=orbit.float(), video=video.float(), input=image.float(), azimuths_deg=azimuths,
                      elevation_deg=inp.elevation_deg, fov_deg=cfg.fov_deg, radius=cfg.radius, input_view_index=v_in,
                      kind=inp.kind, input_frame_index=ref_frame)


def write_conditions(conditions: Conditions, out_dir: str | Path, extra: dict | None = None,
                     store_dtype: Literal["uint8", "float32"] = "uint8") -> Path:
    """Write a conditions folder atomically (layout of the module docstring); images stored as ``store_dtype``."""
    from d2.utils.io import atomic_dir, save_image, save_tensor, write_json

    with atomic_dir(out_dir) as tmp:
        save_tensor(tmp / "conditions.pt", conditions.state(store_dtype))
        save_image(tmp / "input.png", conditions.input)
        for v in range(conditions.orbit.shape[0]):
            save_image(tmp / "orbit" / f"view_{v:02d}.png", conditions.orbit[v])
        for f in range(conditions.video.shape[0]):
            save_image(tmp / "video" / f"frame_{f:02d}.png", conditions.video[f])
        meta = {k: v for k, v in conditions.state().items() if not isinstance(v, Tensor)}
        meta.update({"V": conditions.orbit.shape[0], "F": conditions.video.shape[0],
                     "num_views": conditions.orbit.shape[0], "num_frames": conditions.video.shape[0],
                     "resolution": int(conditions.orbit.shape[-1]), **(extra or {})})
        write_json(tmp / "conditions.json", meta)
    return Path(out_dir)


def run_conditions(input_path: str | Path, out_dir: str | Path, cfg: ConditionsConfig,
                   priors: tuple[Prior, Prior]) -> Path:
    """Stage: input (image / video / orbit) -> conditions folder (``conditions.pt`` and previews)."""
    info: dict = {}
    conditions = make_conditions(input_path, cfg, priors, info)
    info["summary"] = describe_reading(info)
    # the input's name, not its path: the same input elsewhere gives the same bytes (and keys downstream)
    return write_conditions(conditions, out_dir, {"input_name": Path(input_path).name, "config": cfg.model_dump(),
                                                  "source_frames": source_frames(cfg, conditions.kind),
                                                  "input_reading": info}, cfg.store_dtype)
