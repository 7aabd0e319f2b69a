"""The procedural 4D world: animated analytic scenes of 3D Gaussians, the mini-benchmark, training scenes."""

from d2.world.benchmark import PrepareConfig, benchmark_objects, generate_benchmark, make_scene
from d2.world.scenes import Motion, Part, Scene, scene_signature
from d2.world.training import random_training_scene

__all__ = ["Motion", "Part", "PrepareConfig", "Scene", "benchmark_objects", "generate_benchmark", "make_scene",
           "random_training_scene", "scene_signature"]
