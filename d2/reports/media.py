"""Preview media at a viewable size: integer nearest-neighbour upscaling, labelled grids, side-by-side videos.

Every function is pure over arrays (uint8 ``[H, W, 3]`` images, lists of them for videos) except
the two writers. Matrices can be 16 px; previews are upscaled by a whole factor (nearest, so
pixels stay pixels) until their short side is at least :data:`MIN_PREVIEW`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

MIN_PREVIEW = 256  # short side of every preview image / video (px)
LABEL_H = 22  # height of a text strip (px)
PAD = 4  # gap between tiles (px)


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Float [3, H, W] / [H, W, 3] in [0, 1] or uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.transpose(a, (1, 2, 0))
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def upscale_factor(h: int, w: int, min_side: int = MIN_PREVIEW) -> int:
    """The smallest whole factor that brings the short side of an ``h x w`` image to ``min_side``."""
    if h < 1 or w < 1:
        raise ValueError(f"empty image {h}x{w}")
    return max(1, math.ceil(min_side / min(h, w)))


def upscale(image: np.ndarray, min_side: int = MIN_PREVIEW) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 [H, W, 3] by a whole factor to a short side >= ``min_side``."""
    k = upscale_factor(image.shape[0], image.shape[1], min_side)
    return image if k == 1 else np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def fit_to(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 [H, W, 3] resized (nearest) to exactly ``side x side`` (tiles of one row share a size)."""
    h, w = image.shape[:2]
    if (h, w) == (side, side):
        return image
    rows = (np.arange(side) * h // side).clip(0, h - 1)
    cols = (np.arange(side) * w // side).clip(0, w - 1)
    return image[rows][:, cols]


def text_strip(text: str, width: int, height: int = LABEL_H, vertical: bool = False) -> np.ndarray:
    """A white strip with ``text`` in black: uint8 [height, width, 3], or, when ``vertical``, the
    strip of length ``width`` turned to read bottom-up (uint8 [width, height, 3])."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.new("RGB", (width, height), "white")
    font = ImageFont.load_default(size=max(8, min(14, height - 8)))
    draw = ImageDraw.Draw(canvas)
    tw = draw.textlength(text, font=font)
    draw.text((max(2.0, (width - tw) / 2), 3), text, fill="black", font=font)
    out = canvas.rotate(90, expand=True) if vertical else canvas
    return np.asarray(out, dtype=np.uint8).copy()


def hstack(tiles: list[np.ndarray], pad: int = PAD) -> np.ndarray:
    """Tiles of one height side by side with white gaps."""
    h = max(t.shape[0] for t in tiles)
    parts = []
    for i, t in enumerate(tiles):
        if t.shape[0] != h:
            t = np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0)), constant_values=255)
        parts.append(t)
        if i < len(tiles) - 1 and pad:
            parts.append(np.full((h, pad, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def vstack(tiles: list[np.ndarray], pad: int = PAD) -> np.ndarray:
    """Tiles stacked top to bottom (narrower ones padded white on the right)."""
    w = max(t.shape[1] for t in tiles)
    parts = []
    for i, t in enumerate(tiles):
        if t.shape[1] != w:
            t = np.pad(t, ((0, 0), (0, w - t.shape[1]), (0, 0)), constant_values=255)
        parts.append(t)
        if i < len(tiles) - 1 and pad:
            parts.append(np.full((pad, w, 3), 255, np.uint8))
    return np.concatenate(parts, axis=0)


def labelled_tile(image: np.ndarray, label: str, side: int) -> np.ndarray:
    """``image`` at ``side x side`` under a caption strip."""
    return vstack([text_strip(label, side), fit_to(image, side)], pad=0)


def labelled_grid(cells: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str],
                  row_title: str, col_title: str, min_width: int = MIN_PREVIEW, min_cell: int = 48) -> np.ndarray:
    """A grid of equal-size cells (rows x columns of uint8 [h, w, 3]) upscaled by a whole factor
    (cells at least ``min_cell`` px, the cells together at least ``min_width`` px each way),
    with a caption per row and column and the two axis titles (e.g. 'views' down, 'frames' across)."""
    r, c = len(cells), len(cells[0])
    h, w = cells[0][0].shape[:2]
    k = max(upscale_factor(h, w, min_cell), math.ceil(min_width / (c * w)), math.ceil(min_width / (r * h)))
    ch, cw = h * k, w * k
    label_w = 84
    body = []
    header = hstack([np.full((LABEL_H, label_w, 3), 255, np.uint8)]
                    + [text_strip(col_labels[j], cw) for j in range(c)], pad=2)
    body.append(header)
    for i in range(r):
        row = [fit_to(cells[i][j], ch) if ch == cw else np.repeat(np.repeat(cells[i][j], k, 0), k, 1) for j in range(c)]
        lab = np.full((ch, label_w, 3), 255, np.uint8)
        strip = text_strip(row_labels[i], label_w)
        top = max(0, (ch - LABEL_H) // 2)
        lab[top:top + min(LABEL_H, ch)] = strip[: min(LABEL_H, ch)]
        body.append(hstack([lab] + row, pad=2))
    grid = vstack(body, pad=2)
    top = text_strip(f"{col_title} ->", grid.shape[1])
    grid = vstack([top, grid], pad=0)
    left = text_strip(f"<- {row_title}", grid.shape[0], vertical=True)
    return hstack([left, grid], pad=0)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write uint8 [H, W, 3] as PNG (parents created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, optimize=False)
    return path


def save_mp4(path: str | Path, frames: list[np.ndarray], fps: int, memo: Path | None = None) -> Path:
    """Write uint8 frames as an H.264 MP4 in yuv420p (what browsers play), sizes padded to even.

    Encoding is the report's main cost, so videos are content-addressed: one whose frames and fps
    equal those it was last written from (a digest kept beside it, ``.<name>.sha256``) is not
    written again, and with ``memo`` (a folder, e.g. in the stage cache) a video encoded for any
    earlier report is copied from ``memo/<digest>.mp4``.
    """
    import hashlib
    import shutil

    from d2.utils.io import atomic_path, save_video, write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256(f"{fps}|{len(frames)}".encode())
    for f in frames:
        h.update(str(f.shape).encode() + np.ascontiguousarray(f).tobytes())
    digest = h.hexdigest()
    stamp = path.with_name(f".{path.name}.sha256")
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return path
    known = memo / f"{digest}.mp4" if memo is not None else None
    if known is not None and known.is_file():
        with atomic_path(path) as tmp:
            shutil.copyfile(known, tmp)
    else:
        save_video(path, [f.astype(np.float32) / 255.0 for f in frames], fps=fps)
        if known is not None:
            try:
                known.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(known) as tmp:
                    shutil.copyfile(path, tmp)
            except OSError:  # a read-only cache: nothing remembered
                pass
    write_text(stamp, digest + "\n")
    return path
