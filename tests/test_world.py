"""The procedural 4D world: motions, scenes in view, rendering, training family, generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from d2.stages.cameras import OrbitSpec
from d2.utils.io import load_image
from d2.world import (Motion, Part, PrepareConfig, Scene, benchmark_objects, generate_benchmark, make_scene,
                      random_training_scene, scene_signature)
from d2.world.benchmark import benchmark_signatures
from d2.world.scenes import MAX_VIEW_RADIUS

MOTIONS = [
    Motion("spin", amount=0.7, axis=(0.2, 0.5, 1.0), pivot=(0.1, 0.0, -0.1)),
    Motion("swing", amount=40, offset=10, axis=(1, 0, 0), pivot=(0, 0.2, 0.1), freq=1.5, phase=0.2),
    Motion("bounce", amount=0.3, freq=2, squash=0.3, pivot=(0, 0, -0.4)),
    Motion("squash", amount=0.4, axis=(0.3, 0.0, 1.0), pivot=(0, 0, -0.3), freq=2),
    Motion("bend", amount=0.8, axis=(0, 1, 0), pivot=(0, 0, -0.5), freq=1.5),
    Motion("orbit", amount=0.1, freq=1.0, phase=0.3),
]


@pytest.mark.parametrize("motion", MOTIONS, ids=lambda m: m.kind)
def test_motion_jacobian_matches_autograd(motion: Motion):
    pts = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.1, -0.2], [-0.3, 0.2, 0.05]], dtype=torch.float64)
    t = 0.37
    new, jac = motion.apply(pts, torch.eye(3, dtype=torch.float64).expand(3, 3, 3).clone(), t)
    for i in range(3):
        ref = torch.autograd.functional.jacobian(lambda p: motion.apply(p[None], torch.eye(3, dtype=torch.float64)[None], t)[0][0],
                                                 pts[i])
        assert torch.allclose(jac[i], ref, atol=1e-9), motion.kind
    if motion.kind in ("spin", "swing"):
        assert torch.allclose(jac[0] @ jac[0].T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    if motion.kind == "squash":  # volume preserving
        assert abs(torch.det(jac[0]).item() - 1.0) < 1e-12


def test_motion_values():
    spin = Motion("spin", amount=0.25, axis=(0, 0, 1))
    p, _ = spin.apply(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), torch.eye(3, dtype=torch.float64)[None], 1.0)
    assert torch.allclose(p, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), atol=1e-12)  # quarter turn, CCW
    bounce = Motion("bounce", amount=0.3, freq=1)
    top, _ = bounce.apply(torch.zeros(1, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)[None], 0.5)
    assert abs(top[0, 2].item() - 0.3) < 1e-12
    with pytest.raises(ValueError, match="unknown motion"):
        Motion("wiggle", amount=1.0)  # type: ignore[arg-type]


def test_benchmark_objects_differ_and_cover_the_motions():
    names = benchmark_objects()
    assert len(names) >= 5 and len(set(names)) == len(names)
    scenes = [make_scene(n, num_gaussians=300) for n in names]
    sigs = [scene_signature(s) for s in scenes]
    assert len(set(sigs)) == len(sigs)
    kinds = {k for _, ks in sigs for k in ks}
    assert {"spin", "swing", "bounce"} <= kinds and kinds & {"squash", "bend"}
    # the swing of a part: some object swings one part only
    assert any(any(m.kind == "swing" for p in s.parts for m in p.motions) for s in scenes)
    colours = {p.color for s in scenes for p in s.parts}
    assert len(colours) >= 5
    with pytest.raises(ValueError, match="unknown benchmark object"):
        make_scene("teapot")


@pytest.mark.parametrize("name", benchmark_objects())
def test_objects_stay_in_view_and_move(name: str):
    scene = make_scene(name, num_gaussians=300)
    times = [i / 31 for i in range(32)]
    assert scene.extent(times) <= MAX_VIEW_RADIUS
    g = scene.gaussians([0.0, 0.3])
    assert g["means"].shape[0] == 2 and g["covars"].shape[-2:] == (3, 3)
    eig = torch.linalg.eigvalsh(g["covars"].double())
    assert (eig > 0).all()  # positive definite covariances after the motions
    assert (g["means"][0] - g["means"][1]).norm(dim=-1).max() > 0.02  # something moves
    assert ((g["colors"] >= 0) & (g["colors"] <= 1)).all()


def test_render_shapes_background_and_views():
    scene = make_scene("waving_robot", num_gaussians=400)
    img = scene.render([0.0, 105.0], [0.0, 0.3], 32, OrbitSpec(), backend="torch")
    assert img.shape == (2, 2, 3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    assert torch.allclose(img[..., :2, :2], torch.ones_like(img[..., :2, :2]))  # white corners
    assert (img[..., 12:20, 12:20] < 0.9).any()  # the object is in the middle
    assert (img[0, 0] - img[1, 0]).abs().mean() > 0.01  # two views differ
    assert (img[0, 0] - img[0, 1]).abs().mean() > 0.003  # the arm moved
    # elevation changes the picture
    up = scene.render([0.0], [0.0], 32, OrbitSpec(), elevations_deg=[40.0], backend="torch")
    assert (up[0, 0] - img[0, 0]).abs().mean() > 0.01
    with pytest.raises(ValueError, match="outside"):
        scene.gaussians([1.5])


def test_training_family_is_seeded_disjoint_and_in_view():
    bench = benchmark_signatures()
    a, b = random_training_scene(3, num_gaussians=200), random_training_scene(3, num_gaussians=200)
    assert a == b
    assert random_training_scene(4, num_gaussians=200) != a
    rng = np.random.default_rng(0)
    for _ in range(40):
        s = random_training_scene(rng, num_gaussians=200)
        assert scene_signature(s) not in bench
        assert s.extent([0.0, 0.3, 0.6, 1.0]) <= 0.5 + 1e-6
    # rejection works: excluding the signature of a draw gives another draw
    first = random_training_scene(7, num_gaussians=200, excluded=set())
    other = random_training_scene(7, num_gaussians=200, excluded={scene_signature(first)})
    assert scene_signature(other) != scene_signature(first)


def test_single_part_benchmark_signatures_are_rejected():
    ball_like = Scene("x", (Part("torus", (0.2, 0.05, 0.0), (1, 0, 0)),), motions=(Motion("spin", 1.0),),
                      num_gaussians=100)
    assert scene_signature(ball_like) in benchmark_signatures()  # tumbling_donut's signature


def test_generate_benchmark_layout_and_atomicity(tmp_path: Path, monkeypatch):
    out = tmp_path / "mini"
    cfg = PrepareConfig(objects=["bouncing_ball", "jelly_cube"], num_frames=3, resolution=24, num_gaussians=300,
                        progress=False, backend="torch")
    generate_benchmark(out, cfg)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["objects"] == ["bouncing_ball", "jelly_cube"] and meta["num_frames"] == 3
    assert meta["camera"]["eval_azimuths_deg"] == [-75.0, 15.0, 105.0, 195.0]
    for obj in meta["objects"]:
        assert sorted(p.name for p in (out / "input" / obj).iterdir()) == ["0.png", "1.png", "2.png"]
        for k in range(4):
            frames = sorted((out / "gt" / obj / f"eval_{k}").iterdir())
            assert len(frames) == 3
            assert load_image(frames[0]).shape == (3, 24, 24)
    # deterministic
    again = generate_benchmark(tmp_path / "again", cfg)
    for p in (out / "gt").rglob("*.png"):
        assert torch.equal(load_image(p), load_image(again / p.relative_to(out)))
    # a failure mid-way leaves the previous output untouched and no partial folder
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))

    def boom(*a, **k):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(Scene, "render", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        generate_benchmark(out, cfg.model_copy(update={"num_frames": 5}))
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError, match="unknown benchmark object"):
        generate_benchmark(out, PrepareConfig(objects=["teapot"]))
