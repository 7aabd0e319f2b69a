"""Animated analytic 3D scenes made of 3D Gaussians: the procedural 4D world.

A :class:`Scene` is a few :class:`Part` s (a primitive shape with colours and a surface
pattern) and :class:`Motion` s (spin, swing, bounce, squash, bend, orbit) that are functions
of the normalised time ``t`` in [0, 1]. Each part's surface is covered with flat, disk-like
Gaussians (sampled once, deterministically from the scene's seed); at time ``t`` the motions
move the Gaussians' centres and map their covariances through the motions' Jacobians
(``Sigma' = J Sigma J^T``), and the colours are shaded with a fixed world-space light on the
moved normals. Rendering goes through the project's rasterizer
(:func:`d2.stages.render.rasterize`) with the cameras of :mod:`d2.stages.cameras`, on white.

Order of transforms for a part: rest shape (centred at the origin) -> the part's rotation
(Euler XYZ, degrees) and position -> the part's own motions -> the scene's motions -> the
scene's uniform ``scale`` (set by :meth:`Scene.normalized` so the object stays inside the
orbit cameras' view at every time).

Two families of scenes: the hand-made benchmark objects (:mod:`d2.world.benchmark`) and
:func:`d2.world.training.random_training_scene`, random compositions of the same primitives and motions for
training the miniature priors. The families are kept disjoint by a structural signature
(the multiset of shapes and the multiset of motion kinds): a random draw whose signature
equals a benchmark object's is rejected and redrawn (see :func:`scene_signature`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from d2.stages.cameras import OrbitSpec, orbit_cameras

Shape = Literal["sphere", "box", "cylinder", "cone", "torus"]
Pattern = Literal["solid", "stripes", "checker", "halves", "dots"]
MotionKind = Literal["spin", "swing", "bounce", "squash", "bend", "orbit"]

SHAPES: tuple[str, ...] = ("sphere", "box", "cylinder", "cone", "torus")
PATTERNS: tuple[str, ...] = ("solid", "stripes", "checker", "halves", "dots")
MOTION_KINDS: tuple[str, ...] = ("spin", "swing", "bounce", "squash", "bend", "orbit")

LIGHT_DIR = (0.5, 0.3, 0.8)  # key light direction (world, towards the light)
OPACITY = 0.97  # opacity of every surface Gaussian
MAX_VIEW_RADIUS = 0.55  # objects must stay within this distance of the origin (OrbitSpec() view)
Vec3 = tuple[float, float, float]


# --------------------------------------------------------------------------- small linear algebra


def _unit(v: Vec3) -> Tensor:
    t = torch.tensor(v, dtype=torch.float64)
    n = t.norm()
    if n < 1e-12:
        raise ValueError(f"zero-length axis {v}")
    return t / n


def rotation_matrix(axis: Vec3 | Tensor, angle_rad: float) -> Tensor:
    """Rodrigues: rotation by ``angle_rad`` about ``axis`` (right-hand rule) -> [3, 3] float64."""
    a = axis if isinstance(axis, Tensor) else _unit(axis)
    a = a.to(torch.float64) / a.norm()
    x, y, z = a.tolist()
    k = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * (k @ k)


def euler_xyz(deg: Vec3) -> Tensor:
    """Rotation [3, 3] of Euler angles (degrees) applied about x, then y, then z (world axes)."""
    rx = rotation_matrix((1.0, 0.0, 0.0), math.radians(deg[0]))
    ry = rotation_matrix((0.0, 1.0, 0.0), math.radians(deg[1]))
    rz = rotation_matrix((0.0, 0.0, 1.0), math.radians(deg[2]))
    return rz @ ry @ rx


# --------------------------------------------------------------------------- motions


@dataclass(frozen=True)
class Motion:
    """A time-dependent map of points, ``t`` in [0, 1] over the whole clip.

    kinds (``phase`` in cycles, ``freq`` in cycles per clip):
      * ``spin``: rotation about ``axis`` through ``pivot`` by ``amount`` turns * t.
      * ``swing``: rotation about ``axis`` through ``pivot`` by
        ``offset + amount * sin(2 pi (freq t + phase))`` degrees.
      * ``bounce``: lift along +z by ``amount * |sin(pi (freq t + phase))|`` (``freq`` bounces),
        squashed along z about ``pivot`` by up to ``squash`` near each contact.
      * ``squash``: volume-preserving scale along ``axis`` about ``pivot``, factor
        ``1 - amount * (1 - cos(2 pi (freq t + phase))) / 2`` (perpendicular: 1/sqrt of it).
      * ``bend``: shear along ``axis`` growing with the squared height above ``pivot``:
        ``amount * sin(2 pi (freq t + phase)) * max(z - pivot_z, 0)^2`` (a swaying stem).
      * ``orbit``: translation on a horizontal circle of radius ``amount`` (starting at 0).
    """

    kind: MotionKind
    amount: float  # turns (spin), degrees (swing), height (bounce), fraction (squash), shear (bend), radius (orbit)
    axis: Vec3 = (0.0, 0.0, 1.0)  # rotation / squash / bend direction
    pivot: Vec3 = (0.0, 0.0, 0.0)  # fixed point of the motion (world, before the scene scale)
    freq: float = 1.0  # cycles per clip (swing, bounce, squash, bend, orbit)
    phase: float = 0.0  # cycles
    offset: float = 0.0  # swing: constant angle added (degrees)
    squash: float = 0.0  # bounce: squash fraction at contact

    def __post_init__(self) -> None:
        if self.kind not in MOTION_KINDS:
            raise ValueError(f"unknown motion kind {self.kind!r}; known: {MOTION_KINDS}")
        _unit(self.axis)

    def apply(self, pts: Tensor, jac: Tensor, t: float) -> tuple[Tensor, Tensor]:
        """Move points [N, 3] and left-multiply their Jacobians [N, 3, 3] at time ``t``."""
        piv = torch.tensor(self.pivot, dtype=pts.dtype)
        w = 2 * math.pi * (self.freq * t + self.phase)
        if self.kind in ("spin", "swing"):
            ang = (2 * math.pi * (self.amount * t + self.phase) if self.kind == "spin"
                   else math.radians(self.offset + self.amount * math.sin(w)))
            r = rotation_matrix(self.axis, ang).to(pts.dtype)
            return (pts - piv) @ r.T + piv, r @ jac
        if self.kind == "squash":
            s = 1.0 - self.amount * 0.5 * (1.0 - math.cos(w))
            return self._axis_scale(pts, jac, piv, s)
        if self.kind == "bounce":
            phase = abs(math.sin(math.pi * (self.freq * t + self.phase)))
            s = 1.0 - self.squash * (1.0 - phase) ** 4
            pts, jac = self._axis_scale(pts, jac, piv, s)
            return pts + torch.tensor([0.0, 0.0, self.amount * phase], dtype=pts.dtype), jac
        if self.kind == "bend":
            a = _unit(self.axis).to(pts.dtype)
            c = self.amount * math.sin(w)
            h = (pts[:, 2] - piv[2]).clamp_min(0.0)  # [N]
            new = pts + c * (h**2)[:, None] * a
            d = torch.eye(3, dtype=pts.dtype).expand(pts.shape[0], 3, 3).clone()  # [N, 3, 3]
            d[:, :, 2] += (2 * c * h)[:, None] * a  # d(disp)/dz
            return new, d @ jac
        if self.kind == "orbit":
            off = torch.tensor([self.amount * (math.cos(w) - math.cos(2 * math.pi * self.phase)),
                                self.amount * (math.sin(w) - math.sin(2 * math.pi * self.phase)), 0.0],
                               dtype=pts.dtype)
            return pts + off, jac
        raise AssertionError(self.kind)

    def _axis_scale(self, pts: Tensor, jac: Tensor, piv: Tensor, s: float) -> tuple[Tensor, Tensor]:
        a = _unit(self.axis).to(pts.dtype)
        aa = torch.outer(a, a)
        m = s * aa + (1.0 / math.sqrt(s)) * (torch.eye(3, dtype=pts.dtype) - aa)  # [3, 3]
        return (pts - piv) @ m.T + piv, m @ jac


# --------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class Part:
    """One primitive of a scene.

    ``size`` per shape: sphere: radii (x, y, z) (an ellipsoid); box: half extents;
    cylinder: (radius, unused, half height); cone: (base radius, unused, height), base at
    z = -height/2, apex at +height/2; torus: (major radius, minor radius, unused), in the xy
    plane. Patterns are painted in the part's rest frame, so they move with it.
    """

    shape: Shape
    size: Vec3
    color: Vec3  # RGB in [0, 1]
    color2: Vec3 = (1.0, 1.0, 1.0)  # second colour of the pattern
    pattern: Pattern = "solid"
    pattern_freq: float = 4.0  # stripes / checks per unit of the pattern coordinate
    position: Vec3 = (0.0, 0.0, 0.0)  # centre in the scene (world, before the scene scale)
    rotation: Vec3 = (0.0, 0.0, 0.0)  # Euler XYZ degrees
    motions: tuple[Motion, ...] = ()  # the part's own motions (before the scene's)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {SHAPES}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; known: {PATTERNS}")
        if any(s < 0 for s in self.size):
            raise ValueError(f"negative size {self.size}")

    def area(self) -> float:
        """Surface area (ellipsoids: Knud Thomsen's approximation)."""
        a, b, c = self.size
        if self.shape == "sphere":
            p = 1.6075
            return 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)
        if self.shape == "box":
            return 8 * (a * b + a * c + b * c)
        if self.shape == "cylinder":
            return 2 * math.pi * a * (2 * c) + 2 * math.pi * a * a
        if self.shape == "cone":
            return math.pi * a * math.hypot(a, c) + math.pi * a * a
        return 4 * math.pi**2 * a * b  # torus

    def sample_surface(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` points on the rest surface and their outward unit normals: ([n, 3], [n, 3]) float64."""
        a, b, c = self.size
        f64 = torch.float64

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=gen, dtype=f64)

        if self.shape == "sphere":
            u = torch.randn(n, 3, generator=gen, dtype=f64)
            u = u / u.norm(dim=-1, keepdim=True)
            r = torch.tensor([a, b, c], dtype=f64)
            return u * r, _normalize(u / r.clamp_min(1e-9))
        if self.shape == "box":
            half = torch.tensor([a, b, c], dtype=f64)
            areas = torch.tensor([b * c, b * c, a * c, a * c, a * b, a * b], dtype=f64)
            face = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=gen)  # [n]
            axis, sign = face // 2, (face % 2) * 2 - 1
            p = (rand(n, 3) * 2 - 1) * half
            p[torch.arange(n), axis] = sign.to(f64) * half[axis]
            nrm = torch.zeros(n, 3, dtype=f64)
            nrm[torch.arange(n), axis] = sign.to(f64)
            return p, nrm
        if self.shape in ("cylinder", "cone"):
            h = 2 * c if self.shape == "cylinder" else c
            side = 2 * math.pi * a * h if self.shape == "cylinder" else math.pi * a * math.hypot(a, c)
            caps = (2 if self.shape == "cylinder" else 1) * math.pi * a * a
            on_side = rand(n) < side / (side + caps)
            phi = rand(n) * 2 * math.pi
            cos, sin = torch.cos(phi), torch.sin(phi)
            p = torch.zeros(n, 3, dtype=f64)
            nrm = torch.zeros(n, 3, dtype=f64)
            if self.shape == "cylinder":
                z = (rand(n) * 2 - 1) * c
                p_side = torch.stack([a * cos, a * sin, z], -1)
                n_side = torch.stack([cos, sin, torch.zeros_like(z)], -1)
                top = rand(n) < 0.5
                zc = torch.where(top, torch.full_like(z, c), torch.full_like(z, -c))
                n_cap = torch.stack([torch.zeros_like(z), torch.zeros_like(z), torch.where(top, 1.0, -1.0)], -1)
            else:  # cone: base at -c/2, apex at +c/2; uniform on the side: distance from apex ~ sqrt(u)
                rho = torch.sqrt(rand(n))
                z = c / 2 - rho * c
                p_side = torch.stack([a * rho * cos, a * rho * sin, z], -1)
                n_side = _normalize(torch.stack([c * cos, c * sin, torch.full_like(z, a)], -1))
                zc = torch.full_like(z, -c / 2)
                n_cap = torch.stack([torch.zeros_like(z), torch.zeros_like(z), -torch.ones_like(z)], -1)
            rr = a * torch.sqrt(rand(n))
            p_cap = torch.stack([rr * cos, rr * sin, zc], -1)
            p = torch.where(on_side[:, None], p_side, p_cap)
            nrm = torch.where(on_side[:, None], n_side, n_cap)
            return p, nrm
        # torus: area element ~ (R + r cos v); rejection sampling on v
        big, small = a, b
        vs: list[Tensor] = []
        got = 0
        while got < n:
            v = rand(2 * n) * 2 * math.pi
            keep = rand(2 * n) < (big + small * torch.cos(v)) / (big + small)
            vs.append(v[keep])
            got += int(keep.sum())
        v = torch.cat(vs)[:n]
        u = rand(n) * 2 * math.pi
        nrm = torch.stack([torch.cos(v) * torch.cos(u), torch.cos(v) * torch.sin(u), torch.sin(v)], -1)
        centre = torch.stack([big * torch.cos(u), big * torch.sin(u), torch.zeros_like(u)], -1)
        return centre + small * nrm, nrm

    def paint(self, pts: Tensor, gen: torch.Generator) -> Tensor:
        """Albedo [n, 3] of rest-frame points [n, 3] by the part's pattern."""
        c1 = torch.tensor(self.color, dtype=torch.float64)
        c2 = torch.tensor(self.color2, dtype=torch.float64)
        n = pts.shape[0]
        ext = max(self.size)
        if self.pattern == "solid":
            second = torch.zeros(n, dtype=torch.bool)
        elif self.pattern == "stripes":
            second = torch.sin(math.pi * self.pattern_freq * pts[:, 2] / ext) > 0  # f cycles over [-ext, ext]
        elif self.pattern == "checker":
            ang = torch.atan2(pts[:, 1], pts[:, 0])
            second = (torch.sin(self.pattern_freq * ang) > 0) ^ (torch.sin(math.pi * self.pattern_freq * pts[:, 2] / ext) > 0)
        elif self.pattern == "halves":
            second = pts[:, 0] < 0
        else:  # dots
            second = torch.rand(n, generator=gen, dtype=torch.float64) < 0.2
        return torch.where(second[:, None], c2, c1)


def _normalize(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _Rest:
    """Rest-state Gaussians of a scene (sampled once)."""

    points: Tensor  # [N, 3] world (after part placement, before motions)
    normals: Tensor  # [N, 3]
    cov: Tensor  # [N, 3, 3] rest covariance (placed)
    albedo: Tensor  # [N, 3]
    part_index: Tensor  # [N] which part each Gaussian belongs to


@dataclass(frozen=True)
class Scene:
    """An animated object made of Gaussians; see the module docstring."""

    name: str
    parts: tuple[Part, ...]
    motions: tuple[Motion, ...] = ()  # motions of the whole object (after each part's own)
    num_gaussians: int = 1500  # Gaussians over all parts (split by area, at least 24 per part)
    seed: int = 0  # seed of the surface sampling and patterns
    scale: float = 1.0  # uniform scale applied last (see normalized)
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # free-form description

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"scene {self.name!r} has no parts")
        if self.num_gaussians < 24 * len(self.parts):
            raise ValueError(f"scene {self.name!r}: num_gaussians={self.num_gaussians} < 24 per part")

    # ---- rest state
    @cached_property
    def _rest(self) -> _Rest:
        gen = torch.Generator().manual_seed(self.seed)
        areas = np.array([p.area() for p in self.parts])
        counts = np.maximum(24, np.floor(self.num_gaussians * areas / areas.sum())).astype(int)
        pts, nrm, cov, alb, idx = [], [], [], [], []
        for i, (part, n) in enumerate(zip(self.parts, counts)):
            p, nr = part.sample_surface(int(n), gen)
            albedo = part.paint(p, gen)
            spacing = math.sqrt(part.area() / n)
            st, sn = 0.75 * spacing, 0.12 * spacing  # disk radius (tangent) and thickness (normal) sigmas
            nn = nr[:, :, None] * nr[:, None, :]  # [n, 3, 3]
            c0 = st**2 * (torch.eye(3, dtype=torch.float64) - nn) + sn**2 * nn
            r = euler_xyz(part.rotation)
            pts.append(p @ r.T + torch.tensor(part.position, dtype=torch.float64))
            nrm.append(nr @ r.T)
            cov.append(r @ c0 @ r.T)
            alb.append(albedo)
            idx.append(torch.full((int(n),), i, dtype=torch.long))
        return _Rest(torch.cat(pts), torch.cat(nrm), torch.cat(cov), torch.cat(alb), torch.cat(idx))

    def with_(self, **kw) -> "Scene":
        """A copy with some fields replaced (e.g. ``num_gaussians``)."""
        return replace(self, **kw)

    def positions(self, t: float) -> tuple[Tensor, Tensor]:
        """Gaussian centres [N, 3] and accumulated motion Jacobians [N, 3, 3] at time ``t`` (float64)."""
        rest = self._rest
        pts = rest.points.clone()
        jac = torch.eye(3, dtype=torch.float64).expand(pts.shape[0], 3, 3).clone()
        for i, part in enumerate(self.parts):
            if not part.motions:
                continue
            sel = rest.part_index == i
            p, j = pts[sel], jac[sel]
            for m in part.motions:
                p, j = m.apply(p, j, t)
            pts[sel], jac[sel] = p, j
        for m in self.motions:
            pts, jac = m.apply(pts, jac, t)
        return pts * self.scale, jac * self.scale

    def gaussians(self, times: list[float]) -> dict[str, Tensor]:
        """The Gaussians at each time (float32).

        Returns:
            means [T, N, 3], covars [T, N, 3, 3], opacities [T, N], colors [T, N, 3] (shaded).
        """
        rest = self._rest
        light = _unit(LIGHT_DIR)
        means, covars, colors = [], [], []
        for t in times:
            if not (0.0 <= t <= 1.0):
                raise ValueError(f"time {t} outside [0, 1]")
            p, j = self.positions(t)
            covars.append(j @ rest.cov @ j.transpose(-1, -2))
            n = _normalize((torch.linalg.inv(j).transpose(-1, -2) @ rest.normals[:, :, None])[..., 0])
            shade = 0.55 + 0.2 * n[:, 2] + 0.3 * (n @ light).clamp_min(0.0)  # sky + key light
            colors.append((rest.albedo * shade[:, None]).clamp(0.0, 1.0))
            means.append(p)
        t_ = len(times)
        return {
            "means": torch.stack(means).float(),
            "covars": torch.stack(covars).float(),
            "opacities": torch.full((t_, rest.points.shape[0]), OPACITY, dtype=torch.float32),
            "colors": torch.stack(colors).float(),
        }

    def extent(self, times: list[float] | None = None) -> float:
        """Largest distance of a Gaussian centre from the origin over ``times`` (default: 33 times)."""
        ts = times if times is not None else [i / 32 for i in range(33)]
        return max(float(self.positions(t)[0].norm(dim=-1).max()) for t in ts)

    def normalized(self, max_radius: float = 0.5) -> "Scene":
        """A copy scaled down (never up) so that ``extent() <= max_radius`` at every time.

        The extent is measured at 65 times and given a 1% margin for the times in between.
        """
        ext = 1.01 * self.extent([i / 64 for i in range(65)]) / self.scale
        return replace(self, scale=min(1.0, max_radius / max(ext, 1e-9)))

    def render(
        self,
        azimuths_deg: list[float],
        times: list[float],
        resolution: int,
        spec: OrbitSpec | None = None,
        elevations_deg: list[float] | None = None,
        backend: str = "auto",
        time_chunk: int = 8,
        device: str | torch.device = "cpu",
        alpha: bool = False,
    ) -> Tensor:
        """Render every (azimuth, time) on white (on ``device``; ``backend="auto"`` uses gsplat on CUDA).

        Returns:
            [A, T, 3, H, W] float32 in [0, 1] (H = W = ``resolution``); with ``alpha``, [A, T, 4, H, W]:
            straight (not premultiplied) RGB and the accumulated opacity, RGBA frames as
            Consistent4D's data holds them (composited on white they equal the plain render).
        """
        from d2.stages.render import rasterize

        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if not azimuths_deg or not times:
            raise ValueError("render: need at least one azimuth and one time")
        spec = spec or OrbitSpec()
        viewmats, ks = orbit_cameras(list(azimuths_deg), spec, resolution, resolution, elevations_deg)
        a = len(azimuths_deg)
        out = []
        for i in range(0, len(times), time_chunk):
            ts = list(times[i:i + time_chunk])
            g = self.gaussians(ts)
            n_t = len(ts)
            g = {k: v.to(device) for k, v in g.items()}
            col, acc = rasterize(g["means"], g["covars"], g["opacities"], g["colors"],
                                 viewmats.to(device).expand(n_t, a, 4, 4), ks.to(device).expand(n_t, a, 3, 3),
                                 resolution, resolution, background=None if alpha else torch.ones(3, device=device),
                                 backend=backend)  # [t, A, H, W, 3] (premultiplied on black with alpha)
            if alpha:
                col = torch.cat([col / acc.clamp_min(1e-6), acc], dim=-1)  # straight RGB + alpha
            out.append(col.detach().float().cpu())
        imgs = torch.cat(out, dim=0)  # [T, A, H, W, 3]
        return imgs.permute(1, 0, 4, 2, 3).clamp(0, 1).contiguous()  # [A, T, 3, H, W]


# --------------------------------------------------------------------------- signatures and training family


def scene_signature(scene: Scene) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(sorted shapes, sorted motion kinds over parts and scene): the structural identity of a scene."""
    shapes = tuple(sorted(p.shape for p in scene.parts))
    kinds = tuple(sorted([m.kind for p in scene.parts for m in p.motions] + [m.kind for m in scene.motions]))
    return shapes, kinds
