"""How well fitted 4D Gaussians reproduce the matrix they were fitted to (measured after the fit,
separately from it): PSNR at the matrix's own views, times and resolution, and the motion kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from d2.stages.cameras import OrbitSpec, orbit_cameras
from d2.stages.export import find_gaussians, load_gaussians
from d2.stages.fit import load_matrix
from d2.stages.render import Backend


def psnr_db(mse: float) -> float:
    """PSNR in dB of images in [0, 1] from their mean squared error (capped at 100 dB)."""
    return float(min(100.0, -10.0 * np.log10(max(mse, 1e-10))))


@torch.no_grad()
def measure_matrix_fit(gaussians_path: str | Path, matrix_dir: str | Path, background: float = 1.0,
                       backend: Backend = "auto", device: str = "cpu") -> dict:
    """How well fitted Gaussians reproduce the matrix they were fitted to, at the matrix's own
    views, times and resolution: PSNR over the whole matrix, per view and per frame, and the
    motion each has (mean absolute change between consecutive frames, per view, averaged:
    ``motion_matrix`` vs ``motion_fit``; a fit that lost the motion has ``motion_fit`` near 0).
    """
    g, _ = load_gaussians(gaussians_path, device)
    data = load_matrix(matrix_dir)
    images = data.images.to(device)  # [V, F, 3, H, W]
    v, f, _, h, w = images.shape
    spec = OrbitSpec(radius=data.radius, fov_deg=data.fov_deg, elevation_deg=data.elevation_deg)
    vm, K = orbit_cameras(data.azimuths_deg, spec, w, h)
    vm, K = vm.to(device), K.to(device)
    bg = torch.full((3,), float(background), device=device)
    renders = torch.empty_like(images)
    for fj in range(f):
        t = torch.tensor([data.times[fj]], dtype=g.means.dtype)
        out, _ = g.render(t, vm[None], K[None], w, h, background=bg, backend=backend)  # [1, V, H, W, 3]
        renders[:, fj] = out[0].permute(0, 3, 1, 2).clamp(0, 1)
    se = (renders - images) ** 2  # [V, F, 3, H, W]
    motion = lambda x: float((x[:, 1:] - x[:, :-1]).abs().mean()) if f > 1 else 0.0  # noqa: E731
    return {
        "matrix_psnr": psnr_db(float(se.mean())),
        "matrix_psnr_per_view": [psnr_db(float(se[i].mean())) for i in range(v)],
        "matrix_psnr_per_frame": [psnr_db(float(se[:, j].mean())) for j in range(f)],
        "motion_matrix": motion(images),
        "motion_fit": motion(renders),
        "matrix_resolution": h,
    }


def record_matrix_fit(fit_dir: str | Path, matrix_dir: str | Path) -> dict:
    """:func:`measure_matrix_fit` of the fit in ``fit_dir`` (with the background, backend and device
    its ``fit.json`` names), added to that ``fit.json`` as ``matrix_fit`` (and ``matrix_psnr``).
    Returns the headline numbers: ``matrix_psnr``, ``motion_matrix``, ``motion_fit``."""
    import json

    from d2.utils.io import write_json

    fit_dir = Path(fit_dir)
    summary = json.loads((fit_dir / "fit.json").read_text())
    cfg = summary.get("config", {})
    found = find_gaussians(fit_dir)
    if found is None:
        raise FileNotFoundError(f"no fitted Gaussians in {fit_dir}")
    m = measure_matrix_fit(found, matrix_dir, background=float(cfg.get("background", 1.0)),
                           backend=summary.get("backend", "auto"), device=summary.get("device", "cpu"))
    summary["matrix_psnr"] = m["matrix_psnr"]
    summary["matrix_fit"] = m
    write_json(fit_dir / "fit.json", summary)
    return {k: m[k] for k in ("matrix_psnr", "motion_matrix", "motion_fit")}
