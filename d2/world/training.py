"""The training family of the miniature priors: random scenes of the world's primitives and
motions, drawn disjoint from the benchmark objects."""

from __future__ import annotations

import colorsys
from dataclasses import replace

import numpy as np

from d2.world.benchmark import benchmark_signatures
from d2.world.scenes import MOTION_KINDS, PATTERNS, SHAPES, Motion, Part, Scene, Vec3, scene_signature


def _random_color(rng: np.random.Generator) -> Vec3:
    h, s, v = rng.random(), rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.95)
    return tuple(float(x) for x in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _random_size(shape: str, rng: np.random.Generator) -> Vec3:
    if shape == "sphere":
        r = rng.uniform(0.12, 0.3)
        return (r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3))
    if shape == "box":
        return tuple(float(x) for x in rng.uniform(0.06, 0.25, size=3))  # type: ignore[return-value]
    if shape in ("cylinder", "cone"):
        return (float(rng.uniform(0.06, 0.22)), 0.0, float(rng.uniform(0.12, 0.35)))
    big = float(rng.uniform(0.12, 0.28))
    return (big, float(rng.uniform(0.03, 0.45 * big)), 0.0)


def _random_axis(rng: np.random.Generator) -> Vec3:
    v = rng.normal(size=3)
    v = v / np.linalg.norm(v)
    return (float(v[0]), float(v[1]), float(v[2]))


def _random_motion(kind: str, rng: np.random.Generator, pivot: Vec3) -> Motion:
    if kind == "spin":
        return Motion("spin", amount=float(rng.choice([-1, 1]) * rng.uniform(0.3, 1.5)), axis=_random_axis(rng),
                      pivot=pivot)
    if kind == "swing":
        return Motion("swing", amount=float(rng.uniform(15, 60)), axis=_random_axis(rng), pivot=pivot,
                      freq=float(rng.uniform(0.5, 2.5)), phase=float(rng.random()))
    if kind == "bounce":
        return Motion("bounce", amount=float(rng.uniform(0.1, 0.3)), freq=float(rng.integers(1, 4)),
                      squash=float(rng.uniform(0.0, 0.35)), pivot=pivot)
    if kind == "squash":
        return Motion("squash", amount=float(rng.uniform(0.15, 0.45)), axis=_random_axis(rng), pivot=pivot,
                      freq=float(rng.uniform(0.5, 2.5)), phase=float(rng.random()))
    if kind == "bend":
        return Motion("bend", amount=float(rng.uniform(0.4, 1.5)), axis=_random_axis(rng)[:2] + (0.0,),
                      pivot=pivot, freq=float(rng.uniform(0.5, 2.0)), phase=float(rng.random()))
    return Motion("orbit", amount=float(rng.uniform(0.05, 0.2)), freq=float(rng.uniform(0.5, 1.5)),
                  phase=float(rng.random()))


def random_training_scene(rng: np.random.Generator | int, num_gaussians: int = 1200,
                          excluded: set | None = None, max_tries: int = 100) -> Scene:
    """A random animated scene from the training family (1-3 parts, 1-2 motions), normalised into view.

    Disjoint from the benchmark: a draw whose :func:`scene_signature` equals a benchmark
    object's (``excluded``, default: all of :func:`d2.world.benchmark.benchmark_objects`) is
    rejected and redrawn. Same seed, same scene.
    """
    if excluded is None:
        excluded = benchmark_signatures()
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(int(rng))
    for _ in range(max_tries):
        scene = _draw_scene(gen, num_gaussians)
        if scene_signature(scene) not in excluded:
            return scene.normalized(0.5)
    raise RuntimeError(f"random_training_scene: {max_tries} draws all matched a benchmark signature")


def _draw_scene(rng: np.random.Generator, num_gaussians: int) -> Scene:
    n_parts = int(rng.integers(1, 4))
    parts: list[Part] = []
    for i in range(n_parts):
        shape = str(rng.choice(SHAPES))
        c1 = _random_color(rng)
        pos = (0.0, 0.0, 0.0) if i == 0 else tuple(float(x) for x in rng.uniform(-0.25, 0.25, size=3))
        parts.append(Part(shape=shape, size=_random_size(shape, rng), color=c1, color2=_random_color(rng),  # type: ignore[arg-type]
                          pattern=str(rng.choice(PATTERNS)), pattern_freq=float(rng.uniform(2, 6)),  # type: ignore[arg-type]
                          position=pos, rotation=tuple(float(x) for x in rng.uniform(-180, 180, size=3))))  # type: ignore[arg-type]
    n_motions = int(rng.integers(1, 3))
    kinds = [str(k) for k in rng.choice(MOTION_KINDS, size=n_motions, replace=False)]
    scene_motions: list[Motion] = []
    for k in kinds:
        if k == "swing" and n_parts > 1:  # swing one attached part about its attachment point
            j = int(rng.integers(1, n_parts))
            p = parts[j]
            parts[j] = replace(p, motions=p.motions + (_random_motion("swing", rng, p.position),))
        else:
            scene_motions.append(_random_motion(k, rng, (0.0, 0.0, float(rng.uniform(-0.3, 0.0)))))
    seed = int(rng.integers(0, 2**31 - 1))
    return Scene(name=f"train_{seed:010d}", parts=tuple(parts), motions=tuple(scene_motions),
                 num_gaussians=max(num_gaussians, 24 * n_parts), seed=seed)
