"""A small WebGL viewer of fitted 4D Gaussians for the HTML report.

:func:`write_viewer_data` slices the Gaussians at the matrix's frame times and writes a script
(``splats.js``, loaded with a ``<script src>`` so the page works from ``file://``) that registers
per time the centres, colours, opacities and sizes of at most :data:`MAX_POINTS` Gaussians (the
most opaque). ``templates/viewer.js`` (inline in the page) draws them as round sprites with an
orbit camera and a time slider. What it approximates: each Gaussian is an isotropic Gaussian disc
(drawn out to 3 standard deviations) of its largest standard deviation, coloured by its
view-independent (DC) colour at that time, alpha-blended without depth sorting; the real splat
render is anisotropic, view-dependent and sorted.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch

MAX_POINTS = 4000  # Gaussians shown per object (the most opaque on average)
SH_C0 = 0.28209479177387814  # degree-0 SH constant


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


@torch.no_grad()
def viewer_frames(g, times: list[float], max_points: int = MAX_POINTS) -> dict:
    """Per time: centres [N, 3] (world, z up), RGB [N, 3] in [0, 1], opacity [N], size [N] (largest std)."""
    t = torch.tensor(times, dtype=g.means.dtype)
    means, covs, opac = g.slice(t)  # [T, N, 3], [T, N, 3, 3], [T, N]
    keep = torch.argsort(opac.mean(0), descending=True, stable=True)[:max_points]
    means, covs, opac = means[:, keep], covs[:, keep], opac[:, keep]
    dc = g.sh_at(t)[:, keep, 0]  # [T, n, 3]
    rgb = (dc * SH_C0 + 0.5).clamp(0, 1)
    size = torch.linalg.eigvalsh(covs.double()).clamp(min=0)[..., -1].sqrt().float()  # [T, n]
    return {"means": means.float().numpy(), "rgb": rgb.float().numpy(), "opacity": opac.float().numpy(),
            "size": size.numpy()}


def write_viewer_data(fit_dir: Path, path: Path, obj: str) -> dict | None:
    """``path`` (a JS file) with the object's sliced Gaussians; None when the fit has none."""
    from d2.stages.export import find_gaussians, load_gaussians

    src = find_gaussians(fit_dir)
    if src is None:
        return None
    g, orbit = load_gaussians(src)
    times = [float(x) for x in (orbit.get("times") or np.linspace(0, 1, 8).tolist())]
    fr = viewer_frames(g, times)
    data = {"object": obj, "times": times, "n": int(fr["means"].shape[1]),
            "radius": float(orbit.get("radius", 2.0)), "fov": float(orbit.get("fov_deg", 40.0)),
            "elevation": float(orbit.get("elevation_deg", 0.0)),
            "frames": [{"pos": _b64(fr["means"][i]), "rgb": _b64(fr["rgb"][i]), "a": _b64(fr["opacity"][i]),
                        "s": _b64(fr["size"][i])} for i in range(len(times))]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("(window.D2_SPLATS = window.D2_SPLATS || {})[" + json.dumps(obj) + "] = "
                    + json.dumps(data, separators=(",", ":")) + ";\n")
    return {"times": len(times), "n": data["n"]}
