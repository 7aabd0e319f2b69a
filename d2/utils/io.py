"""File helpers: atomic writes, images, videos, grids.

Every writer goes to a temporary path beside the target and renames it into place, so a
crash or a bad input never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor


_umask: int | None = None


def umask() -> int:
    """The process umask (read once, without changing it where /proc tells it)."""
    global _umask
    if _umask is None:
        try:
            line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
            _umask = int(line.split()[1], 8)
        except (OSError, StopIteration, ValueError):
            old = os.umask(0o022)
            os.umask(old)
            _umask = old
    return _umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (with the
    permissions a plain ``open`` would give it under the umask, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success replace ``path`` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def strict_json(obj: Any) -> Any:
    """``obj`` with every float that JSON cannot hold (NaN, +-inf) as ``None`` (null)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (a non-finite float is null: no bare NaN or Infinity ever gets out), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(strict_json(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensor(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` through an open file: torch names the archive after a path it is given, so
    saving to the random temporary path would put that name into the bytes."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def load_tensor(path: str | os.PathLike) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """[3, H, W] or [H, W, 3] float in [0, 1] (or uint8) -> [H, W, 3] uint8."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.transpose(image, (1, 2, 0))
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def save_image(path: str | os.PathLike, image: Tensor | np.ndarray) -> None:
    """Save one image ([3, H, W] / [H, W, 3], float in [0, 1] or uint8) as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")


MIN_IMAGE_SIDE = 8  # images with a side below this are refused (no object survives the resize)
HDR_EXTS = (".hdr", ".exr", ".pfm")  # float / high-range formats the pipeline does not read

# Pillow modes read exactly (8-bit per channel after conversion) and the high-bit-depth ones
# scaled by hand: Pillow's own conversion of "I;16" / "I" / "F" to RGB clips at 255.
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "RGBX", "CMYK", "YCbCr", "La", "RGBa")
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
SUPPORTED_MODES = _EIGHT_BIT_MODES + _HIGH_BIT_MODES  # every Pillow mode :func:`pil_to_rgba` reads


class InputError(ValueError):
    """A bad input, dataset, params value or environment found before any compute (one-line message)."""


class ImageReadError(InputError):
    """An image file cannot be read as an RGB(A) picture in [0, 1] (the message names the file and the fix)."""


def pil_to_rgba(img: Image.Image, name: str = "image") -> tuple[np.ndarray, bool]:
    """A PIL image -> ([H, W, 4] float32 in [0, 1], has_alpha).

    EXIF orientation is applied; 16-bit and 32-bit grayscale are scaled from their own range
    (not clipped at 255); palette, LA, PA and CMYK go through Pillow's conversions; float images
    outside [0, 1] (HDR range) and modes without an RGB meaning are refused by name.
    """
    from PIL import ImageOps

    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _HIGH_BIT_MODES:
        raw = np.asarray(img)
        arr = raw.astype(np.float64)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if not np.isfinite(arr).all() or lo < 0.0 or hi > 1.0:
                raise ImageReadError(f"{name}: float image with values in [{lo:.3g}, {hi:.3g}] (HDR range); "
                                     "tone-map it to an 8- or 16-bit PNG with values in [0, 1]")
        elif mode == "I":
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0 or hi > 65535:
                raise ImageReadError(f"{name}: 32-bit integer image with values in [{lo:.0f}, {hi:.0f}]; "
                                     "save it as an 8- or 16-bit PNG")
            arr = arr / 65535.0
        else:
            arr = arr / 65535.0
        gray = arr.astype(np.float32)
        rgba = np.stack([gray, gray, gray, np.ones_like(gray)], axis=-1)
        return rgba, False
    if mode not in _EIGHT_BIT_MODES:
        raise ImageReadError(f"{name}: image mode {mode!r} is not supported; save it as an RGB or RGBA PNG")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    arr = np.asarray(img.convert("RGBA")).astype(np.float32) / 255.0
    return arr, has_alpha


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and decode an image file; :class:`ImageReadError` names the file when it cannot be read."""
    from PIL import UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() in HDR_EXTS:
        raise ImageReadError(f"{path}: {path.suffix} images (float / HDR) are not read; "
                             "tone-map to an 8- or 16-bit PNG")
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read {path} as an image: {e}") from e
    return img


def read_rgba(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """An image file -> ([H, W, 4] float32 in [0, 1], has_alpha) (see :func:`pil_to_rgba`)."""
    return pil_to_rgba(open_image(path), str(path))


def load_image(path: str | os.PathLike, size: int | None = None, background: float = 1.0) -> Tensor:
    """Load an image as [3, H, W] float in [0, 1]; alpha is composited on ``background``.

    Reads 16-bit grayscale, palette, LA, CMYK and EXIF-rotated files correctly
    (:func:`pil_to_rgba`); HDR-range files are refused with :class:`ImageReadError`.
    """
    rgba, _ = read_rgba(path)
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    arr = rgb * alpha + background * (1.0 - alpha)
    out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)
    if size is not None and (out.shape[1] != size or out.shape[2] != size):
        out = torch.nn.functional.interpolate(out[None], size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)[0].clamp(0, 1)
    return out


def save_video(path: str | os.PathLike, frames: Tensor | np.ndarray | list, fps: int = 8) -> None:
    """Save frames ([T, 3, H, W] float in [0, 1], or a list of images) as an H.264 MP4, atomically.

    Frames are padded to even sizes (H.264 needs them).
    """
    import imageio.v3 as iio

    arrs = [to_uint8(f) for f in frames]
    h, w = arrs[0].shape[:2]
    ph, pw = h + (h % 2), w + (w % 2)
    if (ph, pw) != (h, w):
        arrs = [np.pad(a, ((0, ph - h), (0, pw - w), (0, 0)), constant_values=255) for a in arrs]
    plugin = video_plugin()
    with atomic_path(path) as tmp:
        if plugin == "pyav":
            iio.imwrite(tmp, np.stack(arrs), extension=".mp4", plugin="pyav", fps=fps, codec="libx264")
        else:
            iio.imwrite(tmp, np.stack(arrs), extension=".mp4", plugin="FFMPEG", fps=fps, codec="libx264",
                        macro_block_size=1)


def video_plugin() -> str:
    """The imageio plugin that writes MP4 here; a clear error when there is none (check before long work).

    Without one, imageio silently falls back to an image plugin (tifffile) and fails later
    with an unrelated message.
    """
    try:
        import av  # noqa: F401

        return "pyav"
    except ImportError:
        pass
    try:
        import imageio_ffmpeg  # noqa: F401

        return "FFMPEG"
    except ImportError as e:
        raise RuntimeError("writing MP4 needs imageio-ffmpeg (a project dependency) or PyAV; "
                           "neither imports in this environment") from e


def image_grid(images: Tensor, pad: int = 1, pad_value: float = 1.0) -> Tensor:
    """[R, C, 3, H, W] -> one [3, R*(H+pad)-pad, C*(W+pad)-pad] image."""
    r, c, ch, h, w = images.shape
    out = torch.full((ch, r * (h + pad) - pad, c * (w + pad) - pad), pad_value, dtype=images.dtype)
    for i in range(r):
        for j in range(c):
            out[:, i * (h + pad): i * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = images[i, j]
    return out

