"""Orbit cameras: the one camera convention of the whole project.

World frame: right-handed, +z up. The object sits at the origin. A camera on the orbit
at azimuth ``a`` and elevation ``e`` (degrees) and distance ``r`` is at

    position = r * (cos e * cos a, cos e * sin a, sin e)

looking at the origin. Azimuth 0 is the *input view* (the front, where the input image or
video was taken); azimuth grows counter-clockwise seen from above (+z), towards the input
view's right (docs/method.md, "Which way the orbit turns"). Elevation 0 is
the equator; polar angle = 90 - elevation (SV3D_p's convention).

Camera frame: OpenCV (x right, y down, z forward), as gsplat's ``viewmats``
(world-to-camera, [..., 4, 4]) and pinhole intrinsics ``Ks`` ([..., 3, 3]) expect.

Time: frame ``f`` of ``F`` frames is at ``t = f / (F - 1)`` in [0, 1] (``t = 0`` when F = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class OrbitSpec:
    """Where the orbit's cameras are.

    Defaults follow SV3D_p's training renders (Objaverse objects normalised into the unit
    cube, camera distance 2.0, vertical field of view 33.8 degrees) as used by
    Stability's `generative-models` sv3d sampling script; check before relying on them
    for the real model.
    """

    radius: float = 2.0  # distance of every camera from the origin
    fov_deg: float = 33.8  # vertical (= horizontal, square images) field of view, degrees
    elevation_deg: float = 0.0  # elevation of the whole orbit, degrees


def orbit_azimuths(num_views: int) -> list[float]:
    """Azimuths (degrees) of an SV3D_p orbit of ``num_views`` views.

    View ``v`` is at ``(v + 1) * 360 / V``, so the last view (360 = 0) is the input view.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    return [(v + 1) * 360.0 / num_views for v in range(num_views)]


def frame_times(num_frames: int) -> list[float]:
    """Normalised times in [0, 1] of ``num_frames`` frames."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames == 1:
        return [0.0]
    return [f / (num_frames - 1) for f in range(num_frames)]


def camera_position(azimuth_deg: float, elevation_deg: float, radius: float) -> Tensor:
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    return torch.tensor(
        [radius * math.cos(e) * math.cos(a), radius * math.cos(e) * math.sin(a), radius * math.sin(e)],
        dtype=torch.float64,
    )


def look_at_viewmat(position: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """World-to-camera matrix [4, 4] (OpenCV axes) of a camera at ``position`` looking at ``target``."""
    position = position.to(torch.float64)
    target = torch.zeros(3, dtype=torch.float64) if target is None else target.to(torch.float64)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) if up is None else up.to(torch.float64)
    forward = target - position
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    if right.norm() < 1e-9:  # looking straight up or down: pick any right vector
        right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward], dim=0)  # rows: camera axes in world coordinates
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = rot
    viewmat[:3, 3] = -rot @ position
    return viewmat


def intrinsics(fov_deg: float, width: int, height: int) -> Tensor:
    """Pinhole intrinsics [3, 3] with the vertical field of view ``fov_deg``, principal point at the centre."""
    focal = 0.5 * height / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor(
        [[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )


def orbit_cameras(
    azimuths_deg: list[float],
    spec: OrbitSpec,
    width: int,
    height: int,
    elevations_deg: list[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Cameras for the given azimuths.

    Returns:
        viewmats: [N, 4, 4] float32 world-to-camera (OpenCV axes).
        Ks: [N, 3, 3] float32 intrinsics.
    """
    elevations = elevations_deg if elevations_deg is not None else [spec.elevation_deg] * len(azimuths_deg)
    if len(elevations) != len(azimuths_deg):
        raise ValueError("azimuths_deg and elevations_deg differ in length")
    viewmats = torch.stack(
        [look_at_viewmat(camera_position(a, e, spec.radius)) for a, e in zip(azimuths_deg, elevations)]
    )
    K = intrinsics(spec.fov_deg, width, height)
    return viewmats.float(), K.expand(len(azimuths_deg), 3, 3).clone().float()
