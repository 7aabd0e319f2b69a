"""The procedural mini-benchmark: hand-made animated objects in the Consistent4D layout.

Seven objects (as many as Consistent4D's test set), differing in shape, colour and motion:

==================  ==========================================  =========================
object              shapes                                      motion
==================  ==========================================  =========================
bouncing_ball       striped sphere                              bounce (+ squash, roll)
spinning_top        cone, disk, handle                          spin about z (+ wobble)
waving_robot        box body and legs, sphere head, arms        swing of one arm
windmill            tower, hub, four blades                     spin of a part (blades)
jelly_cube          checkered box                               squash-and-stretch
swaying_flower      stem, torus petals, sphere centre           bend (deformation)
tumbling_donut      torus with sprinkles                        spin about a tilted axis
==================  ==========================================  =========================

:func:`generate_benchmark` renders them into ``<out>/input/<object>/<i>.png`` (the input
video at the protocol's input azimuth), ``<out>/gt/<object>/eval_{k}/<i>.png`` (the
evaluation azimuths) and ``<out>/meta.json``, atomically (a temporary folder renamed into
place).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from d2.eval.protocol import DEFAULT_EVAL_AZIMUTHS
from d2.stages.cameras import OrbitSpec, frame_times
from d2.stages.schedules import SEED_MAX
from d2.utils.io import atomic_dir, save_image, write_json
from d2.world.scenes import MAX_VIEW_RADIUS, Motion, Part, Scene, scene_signature

GENERATOR_VERSION = "1"  # bump when the objects, the sampling or the shading change

RED, WHITE, YELLOW, BLUE = (0.86, 0.16, 0.14), (0.97, 0.97, 0.95), (0.97, 0.8, 0.12), (0.16, 0.34, 0.85)
GREEN, DARK_GREEN, PINK, ORANGE = (0.25, 0.75, 0.3), (0.15, 0.5, 0.2), (0.95, 0.45, 0.7), (0.98, 0.55, 0.1)
GREY, BROWN, STEEL, CHOC = (0.6, 0.62, 0.66), (0.55, 0.35, 0.2), (0.35, 0.45, 0.6), (0.45, 0.25, 0.12)


def _bouncing_ball() -> Scene:
    ball = Part("sphere", (0.2, 0.2, 0.2), RED, WHITE, pattern="stripes", pattern_freq=2.0, position=(0, 0, -0.3),
                rotation=(90, 0, 0))
    return Scene("bouncing_ball", (ball,), motions=(
        Motion("spin", amount=0.5, axis=(0, 1, 0), pivot=(0, 0, -0.3)),
        Motion("bounce", amount=0.38, freq=2, squash=0.3, pivot=(0, 0, -0.5)),
    ), meta={"motion": "bounce"})


def _spinning_top() -> Scene:
    body = Part("cone", (0.3, 0.0, 0.42), YELLOW, BLUE, pattern="halves", position=(0, 0, -0.1), rotation=(180, 0, 0))
    disk = Part("cylinder", (0.3, 0.0, 0.03), RED, WHITE, pattern="checker", pattern_freq=6, position=(0, 0, 0.14))
    handle = Part("cylinder", (0.04, 0.0, 0.1), BLUE, position=(0, 0, 0.27))
    return Scene("spinning_top", (body, disk, handle), motions=(
        Motion("spin", amount=1.5, axis=(0, 0, 1)),
        Motion("swing", amount=8, axis=(1, 0, 0), pivot=(0, 0, -0.31), freq=1),
    ), meta={"motion": "spin"})


def _waving_robot() -> Scene:
    body = Part("box", (0.1, 0.15, 0.17), STEEL, position=(0, 0, -0.05))
    head = Part("sphere", (0.1, 0.1, 0.1), WHITE, RED, pattern="halves", position=(0, 0, 0.22), rotation=(0, 0, 180))
    legs = Part("box", (0.06, 0.12, 0.13), GREY, position=(0, 0, -0.36))
    left_arm = Part("cylinder", (0.035, 0.0, 0.14), ORANGE, position=(0, 0.2, -0.02))
    right_arm = Part("cylinder", (0.035, 0.0, 0.14), ORANGE, WHITE, pattern="stripes", pattern_freq=3,
                     position=(0, -0.2, -0.02), motions=(
                         Motion("swing", amount=55, offset=-85, axis=(1, 0, 0), pivot=(0, -0.19, 0.1), freq=2),))
    return Scene("waving_robot", (body, head, legs, left_arm, right_arm), meta={"motion": "swing of a part"})


def _windmill() -> Scene:
    tower = Part("box", (0.07, 0.07, 0.28), BROWN, position=(0, 0, -0.2))
    hub = Part("sphere", (0.045, 0.045, 0.045), GREY, position=(0.1, 0, 0.12))
    blades = tuple(
        Part("box", (0.015, 0.045, 0.17), WHITE if k % 2 == 0 else RED, position=(0.12, 0.0, 0.12 + 0.2),
             motions=(Motion("spin", amount=0.0, axis=(1, 0, 0), pivot=(0.12, 0, 0.12), phase=k / 4.0),
                      Motion("spin", amount=1.0, axis=(1, 0, 0), pivot=(0.12, 0, 0.12))))
        for k in range(4)
    )
    return Scene("windmill", (tower, hub) + blades, meta={"motion": "spin of a part"})


def _jelly_cube() -> Scene:
    cube = Part("box", (0.2, 0.2, 0.2), GREEN, DARK_GREEN, pattern="checker", pattern_freq=2, position=(0, 0, -0.12))
    return Scene("jelly_cube", (cube,), motions=(
        Motion("squash", amount=0.4, axis=(0, 0, 1), pivot=(0, 0, -0.32), freq=2),), meta={"motion": "deformation"})


def _swaying_flower() -> Scene:
    stem = Part("cylinder", (0.025, 0.0, 0.3), DARK_GREEN, position=(0, 0, -0.2))
    petals = Part("torus", (0.11, 0.045, 0.0), PINK, WHITE, pattern="stripes", pattern_freq=3, position=(0.0, 0, 0.2),
                  rotation=(0, 90, 0))
    centre = Part("sphere", (0.07, 0.07, 0.07), YELLOW, ORANGE, pattern="dots", position=(0.0, 0, 0.2))
    return Scene("swaying_flower", (stem, petals, centre), motions=(
        Motion("bend", amount=0.5, axis=(0, 1, 0), pivot=(0, 0, -0.5), freq=1.5),), meta={"motion": "deformation"})


def _tumbling_donut() -> Scene:
    donut = Part("torus", (0.27, 0.11, 0.0), CHOC, PINK, pattern="dots")
    return Scene("tumbling_donut", (donut,), motions=(
        Motion("spin", amount=1.0, axis=(0.0, 0.6, 0.8)),), meta={"motion": "spin (tumble)"})


_OBJECTS = {
    "bouncing_ball": _bouncing_ball,
    "spinning_top": _spinning_top,
    "waving_robot": _waving_robot,
    "windmill": _windmill,
    "jelly_cube": _jelly_cube,
    "swaying_flower": _swaying_flower,
    "tumbling_donut": _tumbling_donut,
}


def benchmark_objects() -> list[str]:
    """Names of the benchmark objects, in benchmark order."""
    return list(_OBJECTS)


def make_scene(name: str, num_gaussians: int = 1500, seed: int = 0) -> Scene:
    """The benchmark object ``name`` (``seed`` varies only the surface sampling)."""
    if name not in _OBJECTS:
        raise ValueError(f"unknown benchmark object {name!r}; known: {', '.join(_OBJECTS)}")
    scene = _OBJECTS[name]()
    scene = scene.with_(num_gaussians=num_gaussians, seed=seed * 1000 + list(_OBJECTS).index(name))
    return scene.normalized(0.5)


def benchmark_signatures() -> set:
    """Structural signatures of the benchmark objects (excluded from the training family)."""
    return {scene_signature(_OBJECTS[n]()) for n in _OBJECTS}


class PrepareConfig(BaseModel):
    """The generated mini-benchmark (the `prepare` stage)."""

    model_config = ConfigDict(extra="forbid")

    objects: list[str] = Field(default_factory=list)  # benchmark objects to generate; empty = all
    num_frames: int = Field(8, ge=1)  # frames per video (Consistent4D: 32)
    resolution: int = Field(64, ge=16)  # square image size in pixels
    num_gaussians: int = Field(600, ge=200)  # Gaussians per object (more = smoother surfaces, slower)
    input_azimuth_deg: float = 0.0  # azimuth of the input video
    eval_azimuths_deg: list[float] = Field(default_factory=lambda: list(DEFAULT_EVAL_AZIMUTHS))  # ground-truth views
    elevation_deg: float = Field(0.0, gt=-90, lt=90)  # elevation of every camera
    radius: float = Field(2.0, gt=0)  # camera distance (OrbitSpec)
    fov_deg: float = Field(33.8, gt=0, lt=180)  # vertical field of view (OrbitSpec)
    seed: int = Field(0, ge=0, le=SEED_MAX)  # varies the surface sampling of every object
    backend: str = "auto"  # rasterizer backend: auto | torch | gsplat
    device: str = "cpu"  # torch device of the rendering ("cuda" + backend auto: gsplat)
    progress: bool = Field(True, json_schema_extra={"no_effect": True})  # show a progress bar


def _scene_digest(scenes: list[Scene]) -> str:
    h = hashlib.sha256()
    for s in scenes:
        h.update(repr((s.name, s.parts, s.motions, s.num_gaussians, s.seed, round(s.scale, 9))).encode())
    return h.hexdigest()[:16]


def generate_benchmark(out_dir: str | Path, cfg: PrepareConfig | None = None) -> Path:
    """Render the mini-benchmark into ``out_dir`` (replaced atomically); returns ``out_dir``.

    Layout: ``input/<object>/<i>.png``, ``gt/<object>/eval_{k}/<i>.png``, ``meta.json``.
    """
    cfg = cfg or PrepareConfig()
    names = cfg.objects or benchmark_objects()
    unknown = [n for n in names if n not in _OBJECTS]
    if unknown:
        raise ValueError(f"unknown benchmark object(s) {unknown}; known: {', '.join(_OBJECTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate objects in {names}")
    spec = OrbitSpec(radius=cfg.radius, fov_deg=cfg.fov_deg, elevation_deg=cfg.elevation_deg)
    times = frame_times(cfg.num_frames)
    azimuths = [cfg.input_azimuth_deg] + list(cfg.eval_azimuths_deg)
    scenes = [make_scene(n, cfg.num_gaussians, cfg.seed) for n in names]
    for s in scenes:
        ext = s.extent(times)
        if ext > MAX_VIEW_RADIUS:
            raise ValueError(f"object {s.name} reaches {ext:.3f} > {MAX_VIEW_RADIUS} from the origin")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        for scene in tqdm(scenes, desc="prepare", disable=not cfg.progress):
            imgs = scene.render(azimuths, times, cfg.resolution, spec, backend=cfg.backend,
                                device=cfg.device)  # [1+K, F, 3, H, W]
            for f in range(cfg.num_frames):
                save_image(tmp / "input" / scene.name / f"{f}.png", imgs[0, f])
                for k in range(len(cfg.eval_azimuths_deg)):
                    save_image(tmp / "gt" / scene.name / f"eval_{k}" / f"{f}.png", imgs[k + 1, f])
        write_json(tmp / "meta.json", {
            "objects": names,
            "num_frames": cfg.num_frames,
            "frames": list(range(cfg.num_frames)),
            "times": times,
            "resolution": cfg.resolution,
            "camera": {"radius": spec.radius, "fov_deg": spec.fov_deg, "elevation_deg": spec.elevation_deg,
                       "input_azimuth_deg": cfg.input_azimuth_deg,
                       "eval_azimuths_deg": list(cfg.eval_azimuths_deg)},
            "background": "white",
            "seed": cfg.seed,
            "num_gaussians": cfg.num_gaussians,
            "generator": "d2.world.benchmark",
            "generator_version": GENERATOR_VERSION,
            "scene_digest": _scene_digest(scenes),
            "descriptions": {s.name: s.meta.get("motion", "") for s in scenes},
            "seconds": round(time.perf_counter() - t0, 3),
        })
    return out_dir


# --------------------------------------------------------------------------- Consistent4D's shape

CONSISTENT4D_OBJECTS = ("aurorus", "crocodile", "guppie", "monster", "pistol", "skull", "trump")
"""The object folders of Consistent4D's released test set (7 objects)."""
CONSISTENT4D_FRAMES = 32  # frames of every input video and ground-truth view
CONSISTENT4D_RESOLUTION = 512  # side of every image file


def generate_consistent4d_shape(out_dir: str | Path, render_resolution: int = 32, num_gaussians: int = 300,
                                progress: bool = True) -> Path:
    """A stand-in with the exact file layout of Consistent4D's released test set, for rehearsing a run
    at the benchmark's real shape before spending GPU hours (README, "Rehearse a preset").

    ``input/<object>/<i>.png`` (RGBA, the object on transparency) and ``gt/<object>/eval_{0..3}/<i>.png``
    (RGBA, azimuths -75, 15, 105, 195 at elevation 0), i = 0..31, every file 512 x 512, for the seven
    object names of the released set; ``meta.json`` says what it is. The content is the procedural
    world's seven objects (one per name, in order), rendered at ``render_resolution`` and enlarged
    (bilinear) to 512 px: only the pixels are small, not the layout.
    """
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    from d2.utils.io import atomic_path

    names = benchmark_objects()
    spec = OrbitSpec()
    times = frame_times(CONSISTENT4D_FRAMES)
    azimuths = [0.0] + list(DEFAULT_EVAL_AZIMUTHS)
    size = CONSISTENT4D_RESOLUTION

    def save_rgba(path: Path, rgba) -> None:  # [4, h, w] in [0, 1] -> 512 px PNG
        big = F.interpolate(rgba[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(0, 1)
        arr = (big.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
        with atomic_path(path) as tmp:
            Image.fromarray(arr, "RGBA").save(tmp, format="PNG", compress_level=1)

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for src, name in tqdm(list(zip(names, CONSISTENT4D_OBJECTS)), desc="prepare", disable=not progress):
            imgs = make_scene(src, num_gaussians).render(azimuths, times, render_resolution, spec, backend="torch",
                                                         alpha=True)  # [5, 32, 4, h, w]
            for f in range(CONSISTENT4D_FRAMES):
                save_rgba(tmp / "input" / name / f"{f}.png", imgs[0, f])
                for k in range(len(DEFAULT_EVAL_AZIMUTHS)):
                    save_rgba(tmp / "gt" / name / f"eval_{k}" / f"{f}.png", imgs[k + 1, f])
        write_json(tmp / "meta.json", {
            "objects": list(CONSISTENT4D_OBJECTS), "num_frames": CONSISTENT4D_FRAMES, "resolution": size,
            "layout": "consistent4d", "content": dict(zip(CONSISTENT4D_OBJECTS, names)),
            "render_resolution": render_resolution, "generator": "d2.world.benchmark",
            "generator_version": GENERATOR_VERSION,
            "camera": {"radius": spec.radius, "fov_deg": spec.fov_deg, "elevation_deg": spec.elevation_deg,
                       "input_azimuth_deg": 0.0, "eval_azimuths_deg": list(DEFAULT_EVAL_AZIMUTHS)},
            "background": "transparent (RGBA)"})
    return out_dir
