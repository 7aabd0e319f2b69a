"""Training data of the miniature priors, rendered from the procedural 4D world.

Two sets, rendered once and cached (``.d2cache/train/<key>.pt``, ignored by git):

    videos  uint8 [N, F, 3, R, R]  monocular videos of random training scenes: camera at a random
                                   azimuth and elevation, F frames at the benchmark's times
                                   t = f / (F - 1) (frame 0 is the video prior's condition)
    orbits  uint8 [M, V, 3, R, R]  static orbits of random scenes at a random time: view v at
                                   azimuth a0 + (v + 1) * 360 / V (SV3D_p, the last view is the
                                   input view a0 and the multi-view prior's condition), all at
                                   one random elevation (``orbit_elevations`` [M], degrees)

Random azimuths: in the matrix the video prior generates row v (the object seen from view v)
from orbit view v, so it must know videos from every side, not only from the front; and the
multi-view prior's azimuths are relative to its input view, so a random a0 costs nothing.

The training scenes come from ``d2.world.random_training_scene(seed)``; the benchmark's
objects (``d2.world.benchmark_objects()``) are never used, and :func:`check_disjoint` proves it
on renders (every training scene differs from every benchmark object at probe cameras).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from d2.stages.cameras import OrbitSpec, frame_times, orbit_azimuths
from d2.world import benchmark_objects, make_scene, random_training_scene, scene_signature


class DataConfig(BaseModel):
    """What training set to render."""

    model_config = ConfigDict(extra="forbid")
    resolution: int = 16  # image side in pixels
    num_frames: int = 8  # F (video frames) = V (orbit views)
    num_scenes: int = 600  # random training scenes
    videos_per_scene: int = 2  # videos rendered per scene (random cameras)
    orbits_per_scene: int = 2  # orbits rendered per scene (random times and start azimuths)
    elevation_min_deg: float = -10.0  # camera elevation range (uniform)
    elevation_max_deg: float = 25.0  # camera elevation range (uniform)
    radius: float = OrbitSpec().radius  # camera distance (the benchmark's OrbitSpec)
    fov_deg: float = OrbitSpec().fov_deg  # vertical field of view, degrees
    seed: int = 0  # seed of the scene seeds and of the cameras
    scene_seed_offset: int = 1_000_000  # training scene seeds are offset + seed * 100_000 + i
    cache_dir: str = ".d2cache/train"  # where the rendered tensors are cached (relative to the cwd)
    check_disjoint: bool = True  # verify on renders that no training scene is a benchmark object


@dataclass
class TrainingSet:
    """The rendered training tensors (uint8 images in [0, 255])."""

    videos: Tensor  # [N, F, 3, R, R] uint8
    video_cameras: Tensor  # [N, 2] (azimuth, elevation) degrees
    orbits: Tensor  # [M, V, 3, R, R] uint8
    orbit_elevations: Tensor  # [M] degrees
    orbit_cameras: Tensor  # [M, 2] (start azimuth a0, time t)
    scene_seeds: Tensor  # [S] the world seeds of the training scenes

    def summary(self) -> dict[str, Any]:
        return {"videos": list(self.videos.shape), "orbits": list(self.orbits.shape),
                "scenes": int(self.scene_seeds.numel())}

    def state(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in ("videos", "video_cameras", "orbits", "orbit_elevations",
                                              "orbit_cameras", "scene_seeds")}


def scene_seeds(cfg: DataConfig) -> list[int]:
    """World seeds of the training scenes."""
    return [cfg.scene_seed_offset + cfg.seed * 100_000 + i for i in range(cfg.num_scenes)]


def _to_u8(x: Tensor) -> Tensor:
    return (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


def world_source_hash() -> str:
    """Hash of the world's source files (a change to the world invalidates the cache)."""
    import d2.world as world

    h = hashlib.sha256()
    root = Path(world.__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def render_training_set(cfg: DataConfig, progress: bool = True,
                        scene_factory: Callable[[int], Any] | None = None) -> TrainingSet:
    """Render the training set of ``cfg`` (see the module docstring)."""
    from tqdm.auto import tqdm

    if cfg.num_scenes < 1 or cfg.num_frames < 2 or cfg.resolution < 4:
        raise ValueError(f"need num_scenes >= 1, num_frames >= 2, resolution >= 4: {cfg}")
    factory = scene_factory or random_training_scene
    spec = OrbitSpec(radius=cfg.radius, fov_deg=cfg.fov_deg)
    gen = torch.Generator().manual_seed(cfg.seed)
    f = cfg.num_frames
    times = frame_times(f)
    orbit_az = orbit_azimuths(f)
    videos, vcams, orbits, oelev, ocams = [], [], [], [], []
    seeds = scene_seeds(cfg)
    for s in tqdm(seeds, desc="render training scenes", disable=not progress, dynamic_ncols=True):
        scene = factory(s)
        for _ in range(cfg.videos_per_scene):
            az = float(torch.rand((), generator=gen)) * 360.0
            el = cfg.elevation_min_deg + float(torch.rand((), generator=gen)) * (cfg.elevation_max_deg -
                                                                                  cfg.elevation_min_deg)
            img = scene.render([az], times, cfg.resolution, spec, elevations_deg=[el])  # [1, F, 3, R, R]
            videos.append(_to_u8(img[0]))
            vcams.append((az, el))
        for _ in range(cfg.orbits_per_scene):
            a0 = float(torch.rand((), generator=gen)) * 360.0
            el = cfg.elevation_min_deg + float(torch.rand((), generator=gen)) * (cfg.elevation_max_deg -
                                                                                  cfg.elevation_min_deg)
            t = float(torch.rand((), generator=gen))
            azs = [(a0 + a) % 360.0 for a in orbit_az]
            img = scene.render(azs, [t], cfg.resolution, spec, elevations_deg=[el] * f)  # [V, 1, 3, R, R]
            orbits.append(_to_u8(img[:, 0]))
            oelev.append(el)
            ocams.append((a0, t))
    return TrainingSet(
        videos=torch.stack(videos), video_cameras=torch.tensor(vcams, dtype=torch.float32),
        orbits=torch.stack(orbits), orbit_elevations=torch.tensor(oelev, dtype=torch.float32),
        orbit_cameras=torch.tensor(ocams, dtype=torch.float32), scene_seeds=torch.tensor(seeds, dtype=torch.int64),
    )


PROBE_AZIMUTHS = [0.0, 90.0, 180.0, 270.0]
PROBE_TIMES = [0.0, 0.5, 1.0]


def probe_renders(scene: Any, resolution: int = 16, spec: OrbitSpec | None = None) -> Tensor:
    """[4, 3, 3, R, R] renders of a scene at fixed probe cameras and times (for the disjointness check)."""
    return scene.render(PROBE_AZIMUTHS, PROBE_TIMES, resolution, spec or OrbitSpec())


def check_disjoint(seeds: list[int], resolution: int = 16, min_rmse: float = 0.02,
                   scene_factory: Callable[[int], Any] | None = None) -> float:
    """Raise ValueError when a training scene renders like a benchmark object; return the smallest RMSE.

    Every training scene (by seed) and every benchmark object is rendered at the probe cameras;
    the RMSE between any pair must exceed ``min_rmse`` (images in [0, 1]). A training scene
    whose name or structural signature (the world's ``scene_signature``: shapes and motion
    kinds) is a benchmark object's is refused too.
    """
    factory = scene_factory or random_training_scene
    bench_scenes = benchmark_scenes()
    bench_names = [sc.name for sc in bench_scenes]
    bench_sigs = {scene_signature(sc): n for sc, n in zip(bench_scenes, bench_names)}
    bench = torch.stack([probe_renders(sc, resolution) for sc in bench_scenes])  # [O, 4, 3, 3, R, R]
    smallest = math.inf
    for s in seeds:
        scene = factory(s)
        if scene.name in bench_names:
            raise ValueError(f"training scene of seed {s} is the benchmark object {scene.name!r}")
        if scene_signature(scene) in bench_sigs:
            raise ValueError(f"training scene of seed {s} has the structure of benchmark object "
                             f"{bench_sigs[scene_signature(scene)]!r}")
        r = probe_renders(scene, resolution)
        rmse = ((bench - r[None]) ** 2).flatten(1).mean(1).sqrt()  # [O]
        i = int(rmse.argmin())
        if float(rmse[i]) <= min_rmse:
            raise ValueError(f"training scene of seed {s} renders like benchmark object {bench_names[i]!r} "
                             f"(RMSE {float(rmse[i]):.4f} <= {min_rmse})")
        smallest = min(smallest, float(rmse[i]))
    return smallest


def benchmark_scenes() -> list[Any]:
    """The benchmark's objects as scenes."""
    return [make_scene(name) for name in benchmark_objects()]


def cache_key(cfg: DataConfig) -> str:
    """Cache file stem: hash of the config and of the world's source."""
    payload = cfg.model_dump_json(exclude={"cache_dir", "check_disjoint"}) + world_source_hash()
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_build_dataset(cfg: DataConfig, progress: bool = True) -> TrainingSet:
    """The cached training set of ``cfg``, rendered (and checked disjoint) on a cache miss."""
    from d2.utils.io import load_tensor, save_tensor

    path = Path(cfg.cache_dir) / f"{cache_key(cfg)}.pt"
    if path.is_file():
        state = load_tensor(path)
        return TrainingSet(**state)
    if cfg.check_disjoint:
        check_disjoint(scene_seeds(cfg), resolution=min(cfg.resolution, 16))
    ds = render_training_set(cfg, progress=progress)
    save_tensor(path, ds.state())
    return ds
