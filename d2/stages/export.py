"""Exports of fitted 4D Gaussians: per-time 3DGS PLY files, a turntable video, evaluation views.

PLY: the standard 3DGS layout (``x, y, z, nx, ny, nz, f_dc_0..2, f_rest_0..44, opacity,
scale_0..2, rot_0..3``; scales are logs, opacity a logit, ``rot`` a unit quaternion
w, x, y, z; ``f_rest_i`` = channel ``i // 15``, SH coefficient ``1 + i % 15``), so common
splat viewers open it. Each file is the 4D set sliced at one time: means ``mu(t)``,
covariances ``S3(t)`` factored as ``R diag(s^2) R^T``, opacity ``alpha(t)`` and the DC colour
at ``t``; higher SH bands are padded with zeros up to degree 3.

Axes: the files written by :func:`export_ply_sequence` (and so the fit's ``ply/t_XX.ply``) use
the convention of the original 3D Gaussian Splatting code and of the splat viewers built
around its PLY files (SuperSplat, antimatter15/splat, gsplat.js): COLMAP / OpenCV axes,
+x right, +y down, +z away from the default camera, so "up" is -y. The project's world
(:mod:`d2.stages.cameras`) is z up with the input view's camera on +x; the change of axes is the
rotation :data:`VIEWER_FROM_WORLD`: viewer (x, y, z) = world (y, -z, -x). Our up (+z) becomes
the viewers' up (-y), our front (+x, towards the input camera) faces the viewers' default camera
(-z), and the input view's right (+y) is the viewers' right (+x). Centres, rotations and the
view-dependent SH bands are rotated; ``convention="world"`` keeps the project's axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from d2.stages.cameras import OrbitSpec, frame_times, orbit_cameras
from d2.stages.gaussians import Gaussians4D
from d2.stages.render import Backend
from d2.utils.io import atomic_path, load_tensor, save_image, save_video

PLY_SH_REST = 15  # SH coefficients past the DC term at degree 3 (per channel)
VIEWER_FROM_WORLD = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])  # viewer = A @ world


def ply_property_names(sh_rest: int = PLY_SH_REST) -> list[str]:
    """The standard 3DGS vertex property names, in order."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(3 * sh_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def rotmat_to_quat(R: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] (det +1) -> unit quaternions [..., 4] (w, x, y, z), w >= 0."""
    m = R
    t = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([
        torch.stack([1 + t, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], -2)  # [..., 4, 4]: each row proportional to the quaternion, pick the best-conditioned
    diag = torch.stack([1 + t, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                        1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2],
                        1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)
    best = torch.argmax(diag, -1)
    q = torch.gather(cands, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_to_rotmat(q: Tensor) -> Tensor:
    """Unit quaternions [..., 4] (w, x, y, z) -> rotation matrices [..., 3, 3]."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


@torch.no_grad()
def splat_arrays_at(g: Gaussians4D, t: float, min_opacity: float = 1e-4) -> dict[str, np.ndarray]:
    """The 3DGS parameters of the slice at time t (Gaussians below ``min_opacity`` dropped).

    Returns arrays: means [M, 3], log_scales [M, 3], quats [M, 4] (w, x, y, z), opacity_logits [M],
    sh_dc [M, 3], sh_rest [M, 15, 3].
    """
    tt = torch.tensor([t], dtype=g.means.dtype, device=g.means.device)
    means, covs, opac = g.slice(tt)
    # on the CPU in float64: batched eigh of many 3x3 matrices is quick there, and cusolver's
    # batched syevd failed (CUSOLVER_STATUS_INTERNAL_ERROR) on ~10^5 matrices on an H200
    means, covs, opac = means[0].double().cpu(), covs[0].double().cpu(), opac[0].double().cpu()
    keep = opac >= min_opacity
    evals, evecs = torch.linalg.eigh(covs[keep])  # ascending eigenvalues, columns = axes
    det = torch.linalg.det(evecs)
    evecs = torch.cat([evecs[..., :2], evecs[..., 2:] * det[:, None, None].sign()], -1)  # proper rotation
    scales = evals.clamp(min=1e-20).sqrt()
    sh = g.sh_at(tt)[0].double().cpu()[keep]  # [M, K, 3]
    rest = torch.zeros(sh.shape[0], PLY_SH_REST, 3, dtype=torch.float64, device=sh.device)
    rest[:, : sh.shape[1] - 1] = sh[:, 1:]
    o = opac[keep].clamp(1e-7, 1 - 1e-7)
    return {
        "means": means[keep].cpu().numpy(),
        "log_scales": torch.log(scales).cpu().numpy(),
        "quats": rotmat_to_quat(evecs).cpu().numpy(),
        "opacity_logits": torch.log(o / (1 - o)).cpu().numpy(),
        "sh_dc": sh[:, 0].cpu().numpy(),
        "sh_rest": rest.cpu().numpy(),
    }


def sh_basis(dirs: np.ndarray, degree: int = 3) -> np.ndarray:
    """Real SH basis values (the renderer's :func:`eval_sh` convention) at unit dirs [N, 3] -> [N, K]."""
    from d2.stages.gaussians import eval_sh

    k = (degree + 1) ** 2
    d = torch.from_numpy(np.asarray(dirs, dtype=np.float64))[:, None, :]  # [N, 1, 3]
    coeffs = torch.eye(k, dtype=torch.float64)[None, :, :, None]  # [1, K (which basis), K, 1]
    return eval_sh(degree, coeffs, d)[..., 0].numpy()  # [N, K]


def sh_rotation(A: np.ndarray, degree: int = 3) -> np.ndarray:
    """[K, K] matrix M with ``f_new(d) = f(A^T d)`` for ``coeffs_new = M @ coeffs``: the SH colour
    seen along a direction is the same after the axes change by the rotation ``A``."""
    gen = np.random.default_rng(0)
    d = gen.normal(size=(256, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    B, BA = sh_basis(d, degree), sh_basis(d @ A, degree)  # rows of d @ A are A^T d
    M, *_ = np.linalg.lstsq(B, BA, rcond=None)
    return M


def to_viewer_axes(arrays: dict[str, np.ndarray], A: np.ndarray = VIEWER_FROM_WORLD) -> dict[str, np.ndarray]:
    """Splat arrays (as :func:`splat_arrays_at`) in axes rotated by ``A`` (viewer = A @ world)."""
    R = quat_to_rotmat(torch.from_numpy(np.asarray(arrays["quats"], dtype=np.float64)))
    R = torch.from_numpy(A) @ R
    M = sh_rotation(A)[1:, 1:]  # the rest bands (DC is invariant)
    return {**arrays, "means": arrays["means"] @ A.T, "quats": rotmat_to_quat(R).numpy(),
            "sh_rest": np.einsum("ij,njc->nic", M, arrays["sh_rest"])}


def write_ply(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write one standard 3DGS PLY (binary little-endian) atomically."""
    from plyfile import PlyData, PlyElement

    m = arrays["means"].shape[0]
    names = ply_property_names()
    rec = np.zeros(m, dtype=[(n, "f4") for n in names])
    for i, ax in enumerate("xyz"):
        rec[ax] = arrays["means"][:, i]
    for c in range(3):
        rec[f"f_dc_{c}"] = arrays["sh_dc"][:, c]
    rest = np.transpose(arrays["sh_rest"], (0, 2, 1)).reshape(m, 3 * PLY_SH_REST)  # [M, 45], channel-major
    for i in range(rest.shape[1]):
        rec[f"f_rest_{i}"] = rest[:, i]
    rec["opacity"] = arrays["opacity_logits"]
    for i in range(3):
        rec[f"scale_{i}"] = arrays["log_scales"][:, i]
    for i in range(4):
        rec[f"rot_{i}"] = arrays["quats"][:, i]
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(rec, "vertex")]).write(str(tmp))


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a 3DGS PLY written by :func:`write_ply` (or any with the standard names)."""
    from plyfile import PlyData

    v = PlyData.read(str(path))["vertex"].data
    m = len(v)
    n_rest = sum(1 for n in v.dtype.names if n.startswith("f_rest_"))
    rest = np.stack([v[f"f_rest_{i}"] for i in range(n_rest)], -1).reshape(m, 3, n_rest // 3)
    return {
        "means": np.stack([v["x"], v["y"], v["z"]], -1),
        "log_scales": np.stack([v[f"scale_{i}"] for i in range(3)], -1),
        "quats": np.stack([v[f"rot_{i}"] for i in range(4)], -1),
        "opacity_logits": np.asarray(v["opacity"]),
        "sh_dc": np.stack([v[f"f_dc_{i}"] for i in range(3)], -1),
        "sh_rest": np.transpose(rest, (0, 2, 1)),
    }


def export_ply_sequence(g: Gaussians4D, out_dir: str | Path, times: list[float],
                        convention: str = "viewer") -> list[Path]:
    """One PLY per time: ``out_dir/t_XX.ply`` (XX = index into ``times``), in the splat viewers'
    axes (``convention="viewer"``, see the module docstring) or the project's (``"world"``)."""
    if convention not in ("viewer", "world"):
        raise ValueError(f"PLY convention must be 'viewer' or 'world', got {convention!r}")
    out_dir = Path(out_dir)
    paths = []
    for i, t in enumerate(times):
        p = out_dir / f"t_{i:02d}.ply"
        arrays = splat_arrays_at(g, float(t))
        write_ply(p, to_viewer_axes(arrays) if convention == "viewer" else arrays)
        paths.append(p)
    return paths


@torch.no_grad()
def render_views(g: Gaussians4D, azimuths_deg: list[float], times: list[float], spec: OrbitSpec, resolution: int,
                 elevations_deg: list[float] | None = None, background: float = 1.0, backend: Backend = "auto",
                 batch: int = 8) -> Tensor:
    """Render pairs (azimuth[i], time[i]) -> images [N, 3, H, W] in [0, 1]."""
    if len(azimuths_deg) != len(times):
        raise ValueError(f"{len(azimuths_deg)} azimuths vs {len(times)} times")
    dev = g.means.device
    vm, K = orbit_cameras(list(azimuths_deg), spec, resolution, resolution, elevations_deg)
    vm, K = vm.to(dev), K.to(dev)
    t = torch.tensor(times, dtype=g.means.dtype, device=dev)
    bg = torch.full((3,), float(background), device=dev)
    out = []
    for s in range(0, len(times), batch):
        img, _ = g.render(t[s:s + batch], vm[s:s + batch, None], K[s:s + batch, None], resolution, resolution,
                          background=bg, backend=backend)  # [b, 1, H, W, 3]
        out.append(img[:, 0].permute(0, 3, 1, 2).clamp(0, 1).cpu())
    return torch.cat(out)


TURNTABLE_MIN_SIZE = 256  # turntables are rendered at least this large (px), whatever the matrix size
TURNTABLE_MIN_SECONDS = 2.0  # the frame rate drops (never the frame count) so a turntable lasts this long


def render_turntable(g: Gaussians4D, path: str | Path, spec: OrbitSpec, resolution: int, num_frames: int = 48,
                     fps: int = 12, background: float = 1.0, backend: Backend = "auto") -> dict:
    """One orbit from azimuth 0 (the input view) while time runs 0 -> 1, as an H.264 MP4 rendered
    from the Gaussians at ``max(resolution, TURNTABLE_MIN_SIZE)`` px, at ``fps`` or less so that it
    lasts at least :data:`TURNTABLE_MIN_SECONDS`. Returns ``{"size", "frames", "fps"}``."""
    size = max(int(resolution), TURNTABLE_MIN_SIZE)
    fps = max(1, min(int(fps), int(num_frames / TURNTABLE_MIN_SECONDS)))
    az = [360.0 * i / num_frames for i in range(num_frames)]
    tt = frame_times(num_frames)
    frames = render_views(g, az, tt, spec, size, background=background, backend=backend)
    save_video(path, frames, fps=fps)
    return {"size": size, "frames": num_frames, "fps": fps}


GAUSSIANS_FILE = "gaussians.safetensors"  # what the fit writes
LEGACY_GAUSSIANS_FILE = "gaussians.pt"  # what earlier fits wrote (a torch pickle), still read


def save_gaussians(path: str | Path, state: dict) -> None:
    """Write :meth:`Gaussians4D.export_state` (plus an ``orbit`` dict) as safetensors, atomically.

    Tensors: the parameters by name; metadata: one key, ``d2``, whose value is JSON (sorted keys)
    with ``format``, the state's scalars (``version``, ``sh_degree``, ``time_basis``, ``time_period``,
    ``temporal_cutoff``) and ``orbit`` (one key: safetensors
    writes several in an order that varies between processes, and the same Gaussians must give the
    same bytes).
    """
    import json

    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state["params"].items()}
    scalars = {k: v for k, v in state.items() if k not in ("params", "orbit")}  # version, sh_degree, time_basis, ...
    meta = {"d2": json.dumps({"format": "d2.gaussians4d", **scalars, "orbit": state.get("orbit", {})},
                             sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_gaussians_state(path: str | Path) -> dict:
    """The state dict of a ``gaussians.safetensors`` (or a legacy ``gaussians.pt``)."""
    import json

    path = Path(path)
    if path.suffix != ".safetensors":
        return load_tensor(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        try:
            meta = json.loads((f.metadata() or {}).get("d2", "{}"))
        except ValueError:
            meta = {}
        if meta.get("format") != "d2.gaussians4d":
            raise ValueError(f"{path}: not a d2 4D Gaussians file (no d2.gaussians4d metadata)")
        params = {k: f.get_tensor(k) for k in f.keys()}
    scalars = {k: v for k, v in meta.items() if k not in ("format", "orbit")}
    return {**scalars, "params": params, "orbit": dict(meta.get("orbit", {}))}


def find_gaussians(folder: str | Path) -> Path | None:
    """The fit's Gaussians in ``folder``: ``gaussians.safetensors``, else a legacy ``gaussians.pt``."""
    for name in (GAUSSIANS_FILE, LEGACY_GAUSSIANS_FILE):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_gaussians(path: str | Path, device: str | torch.device = "cpu") -> tuple[Gaussians4D, dict]:
    """Load the fit's Gaussians (safetensors, or a legacy ``gaussians.pt``; a folder: the one in it):
    (Gaussians4D, orbit dict or {})."""
    path = Path(path)
    if path.is_dir():
        found = find_gaussians(path)
        if found is None:
            raise FileNotFoundError(f"no {GAUSSIANS_FILE} (or {LEGACY_GAUSSIANS_FILE}) in {path}")
        path = found
    state = read_gaussians_state(path)
    return Gaussians4D.from_state(state).to(device), dict(state.get("orbit", {}))


def render_eval_views(
    gaussians_path: str | Path,
    out_dir: str | Path,
    azimuths_deg: list[float],
    frames: int | Mapping[int, float],
    resolution: int,
    elevation_deg: float | None = None,
    radius: float | None = None,
    fov_deg: float | None = None,
    background: float = 1.0,
    backend: Backend = "auto",
    device: str = "cpu",
) -> list[Path]:
    """Render every frame at each azimuth: ``out_dir/eval_{k}/{i}.png`` (k: azimuth index).

    ``frames``: frame index i -> the time t in [0, 1] it is rendered at (the protocol's ground-truth
    frames, :func:`d2.eval.protocol.frames_to_score`); an int n means frames 0..n-1 at
    t = i / (n - 1). The orbit (radius, field of view, elevation)
    defaults to the one the Gaussians were fitted on (stored with the Gaussians), else the
    project default :class:`OrbitSpec`.
    """
    if isinstance(frames, int):
        frames = dict(enumerate(frame_times(frames))) if frames >= 1 else {}
    if not frames or resolution < 1 or not azimuths_deg:
        raise ValueError("render_eval_views: need at least one frame, resolution >= 1 and at least one azimuth")
    g, orbit = load_gaussians(gaussians_path, device)
    base = OrbitSpec()
    spec = OrbitSpec(
        radius=radius if radius is not None else float(orbit.get("radius", base.radius)),
        fov_deg=fov_deg if fov_deg is not None else float(orbit.get("fov_deg", base.fov_deg)),
        elevation_deg=elevation_deg if elevation_deg is not None else float(orbit.get("elevation_deg",
                                                                                      base.elevation_deg)),
    )
    index = list(frames)
    times = [float(frames[i]) for i in index]
    out_dir = Path(out_dir)
    written = []
    for k, az in enumerate(azimuths_deg):
        imgs = render_views(g, [float(az)] * len(index), times, spec, resolution, background=background,
                            backend=backend)
        for j, i in enumerate(index):
            p = out_dir / f"eval_{k}" / f"{i}.png"
            save_image(p, imgs[j])
            written.append(p)
    return written


def covariance_from_ply(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """3D covariances [M, 3, 3] from PLY scales and rotations (R diag(s^2) R^T)."""
    R = quat_to_rotmat(torch.from_numpy(arrays["quats"]).double())
    s = torch.exp(torch.from_numpy(arrays["log_scales"]).double())
    M = R * s[:, None, :]
    return (M @ M.transpose(-1, -2)).numpy()


__all__ = [
    "ply_property_names", "splat_arrays_at", "to_viewer_axes", "sh_rotation", "VIEWER_FROM_WORLD", "write_ply", "read_ply", "export_ply_sequence", "render_views",
    "render_turntable", "render_eval_views",  "load_gaussians", "save_gaussians", "read_gaussians_state",
    "find_gaussians", "covariance_from_ply", "rotmat_to_quat",
    "quat_to_rotmat",
]
