"""Toy stages for testing the orchestration mechanism (cache keys, manifests, flows, MLflow).

``make_toy(tmp_path)`` writes a small package of toy stage modules (one module per stage,
``sampling`` importing a helper module, so tests can edit code on disk), builds its
:class:`~d2.execution.stages.StageSet` (``toy.stages``, what the flows take) and writes a 2-object
dataset in the benchmark layout. The toy stages
do real (tiny) file work: each output depends on its inputs and its params, so the cache
can be checked by what it recomputes.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from d2.config import RunConfig
from d2.execution.cache import StageSpec
from d2.execution.stages import StageSet


class ToyConditions(BaseModel):
    """Toy conditions knobs."""

    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0  # multiplies the input checksum


class ToySampling(BaseModel):
    """Toy sampling knobs."""

    model_config = ConfigDict(extra="forbid")
    s0: float = 0.5  # schedule midpoint
    k: float = 20.0  # schedule steepness


class ToyFit(BaseModel):
    """Toy fitting knobs."""

    model_config = ConfigDict(extra="forbid")
    iters: int = 3  # iterations


class ToyParams(BaseModel):
    """Root params of the toy stage set."""

    model_config = ConfigDict(extra="forbid")
    run: RunConfig = Field(default_factory=RunConfig)  # orchestration
    conditions: ToyConditions = Field(default_factory=ToyConditions)  # stage 1
    sampling: ToySampling = Field(default_factory=ToySampling)  # stage 2
    fit: ToyFit = Field(default_factory=ToyFit)  # stage 3


MODULES = {
    "__init__": "",
    "helper": """
        def transform(x: float) -> float:
            return x * 2.0
    """,
    "conditions": """
        import json, time
        from pathlib import Path

        ACTIVE = []
        PEAK = [0]
        FAIL_ONCE = set()

        def compute(inputs, out, params):
            src = Path(inputs["input"])
            if (src / "FAIL").exists():
                raise RuntimeError(f"toy failure requested by {src / 'FAIL'}")
            if src.name in FAIL_ONCE:  # objects whose first attempt fails (set by a test)
                FAIL_ONCE.discard(src.name)
                (out / "checkpoint.txt").write_text("half done")
                raise RuntimeError("transient toy failure")
            ACTIVE.append(1)
            PEAK[0] = max(PEAK[0], len(ACTIVE))
            time.sleep(0.15)
            ACTIVE.pop()
            total = sum(sum(f.read_bytes()) for f in sorted(src.glob("*.txt")))
            value = total * params.conditions.scale
            resumed = (out / "checkpoint.txt").exists()
            if resumed:
                (out / "checkpoint.txt").unlink()
            (out / "conditions.json").write_text(json.dumps({"value": value}))
            return {"value": value, "resumed": resumed}
    """,
    "sampling": """
        import json
        from pathlib import Path
        from {pkg}.helper import transform

        def compute(inputs, out, params):
            v = json.loads((Path(inputs["conditions"]) / "conditions.json").read_text())["value"]
            m = transform(v) * params.sampling.s0 + params.sampling.k
            (out / "matrix.json").write_text(json.dumps({"value": m}))
            (out / "grid.png").write_bytes(b"toy grid")
            return {"value": m}
    """,
    "fit": """
        import json
        from pathlib import Path

        def compute(inputs, out, params):
            m = json.loads((Path(inputs["matrix"]) / "matrix.json").read_text())["value"]
            g = m + params.fit.iters
            (out / "fit.json").write_text(json.dumps({"value": g}))
            (out / "turntable.mp4").write_bytes(b"toy video")
            return {"value": g}
    """,
    "render": """
        import json
        from pathlib import Path

        def compute(inputs, out, params):
            g = json.loads((Path(inputs["gaussians"]) / "fit.json").read_text())["value"]
            (out / "eval_0").mkdir()
            (out / "eval_0" / "0.txt").write_text(str(g))
            return {"value": g}
    """,
    "metrics": """
        import json
        from pathlib import Path

        def compute(inputs, out, params):
            pred = float((Path(inputs["pred"]) / "eval_0" / "0.txt").read_text())
            gt = float((Path(inputs["gt"]) / "eval_0" / "0.txt").read_text())
            metrics = {"abs_error": abs(pred - gt), "pred": pred}
            (out / "metrics.json").write_text(json.dumps(metrics))
            return {"metrics": metrics}
    """,
    "tables": """
        import json
        from pathlib import Path

        def compute(inputs, out, params):
            rows = {name.split(":", 1)[1]: json.loads((Path(p) / "metrics.json").read_text())
                    for name, p in inputs.items() if name.startswith("metrics:")}
            mean = sum(r["abs_error"] for r in rows.values()) / len(rows)
            table = "| object | abs_error |\\n|---|---|\\n" + "".join(
                f"| {n} | {r['abs_error']:.3f} |\\n" for n, r in sorted(rows.items()))
            (out / "results.md").write_text(table)
            (out / "results.json").write_text(json.dumps(rows))
            return {"summary": {"abs_error": mean}, "table": table}
    """,
}

STAGE_KEYS = {
    "conditions": ("conditions",),
    "sampling": ("sampling",),
    "fit": ("fit",),
    "render_eval": (),
    "metrics": (),
    "tables": (),
}
STAGE_MODULE = {"conditions": "conditions", "sampling": "sampling", "fit": "fit", "render_eval": "render",
                "metrics": "metrics", "tables": "tables"}


@dataclass
class Toy:
    """A toy stage set and its dataset."""

    pkg: str  # name of the toy package
    pkg_dir: Path  # its folder (edit files here to change stage code)
    data: Path  # dataset in the benchmark layout (2 objects)
    stages: StageSet | None = None  # the toy stages (rebuilt by register())

    def register(self) -> None:
        """(Re)import the toy modules from disk and rebuild ``self.stages``."""
        importlib.invalidate_caches()
        for name in sorted(sys.modules):
            if name == self.pkg or name.startswith(self.pkg + "."):
                del sys.modules[name]
        specs = {}
        for stage, mod in STAGE_MODULE.items():
            module = importlib.import_module(f"{self.pkg}.{mod}")
            specs[stage] = StageSpec(name=stage, compute=module.compute, modules=(f"{self.pkg}.{mod}",),
                                     params_keys=STAGE_KEYS[stage])
        self.stages = StageSet(specs, ToyParams)

    def module(self, mod: str):
        """The imported toy module ``mod`` (e.g. 'conditions')."""
        return importlib.import_module(f"{self.pkg}.{mod}")


def make_toy(root: Path, objects: tuple[str, ...] = ("apple", "bird")) -> Toy:
    """Write the toy package and a dataset under ``root`` and register the stage set."""
    pkg = f"d2toy_{uuid.uuid4().hex[:8]}"
    code_root = root / "code"
    pkg_dir = code_root / pkg
    pkg_dir.mkdir(parents=True)
    for mod, src in MODULES.items():
        (pkg_dir / f"{mod}.py").write_text(textwrap.dedent(src).replace("{pkg}", pkg))
    if str(code_root) not in sys.path:
        sys.path.insert(0, str(code_root))
    data = root / "data"
    for i, obj in enumerate(objects):
        (data / "input" / obj).mkdir(parents=True)
        (data / "input" / obj / "0.txt").write_text(f"{obj} frame {i}")
        (data / "gt" / obj / "eval_0").mkdir(parents=True)
        (data / "gt" / obj / "eval_0" / "0.txt").write_text(str(100.0 * (i + 1)))
    toy = Toy(pkg=pkg, pkg_dir=pkg_dir, data=data)
    toy.register()
    return toy


def toy_params(root: Path, *overrides: str, mlflow: bool = False) -> ToyParams:
    """ToyParams with the cache under ``root`` and MLflow off unless asked."""
    from d2.config import with_overrides

    p = ToyParams(run=RunConfig(cache_dir=str(root / "cache"), mlflow=mlflow, progress=False, max_parallel=2))
    return with_overrides(p, list(overrides))


# The real stages at the smallest sizes that still exercise every stage (seconds on a CPU).
TINY_REAL_OVERRIDES = [
    "priors.backend=tiny",  # seeded random tiny priors at 32 px, whatever params.yaml's backend is
    "prepare.objects=[bouncing_ball, windmill]", "prepare.num_frames=4", "prepare.resolution=32",
    "prepare.num_gaussians=200",
    "conditions.num_views=4", "conditions.num_frames=3", "conditions.resolution=32", "conditions.num_steps=2",
    "sampling.num_views=4", "sampling.num_frames=3", "sampling.resolution=32", "sampling.num_steps=2",
    "sampling.rollback_steps=0", "sampling.grid_thumb=16",
    "fit.iterations=4", "fit.num_gaussians=200", "fit.lambda_lpips=0", "fit.turntable_frames=4", "fit.device=cpu",
    "fit.export_ply=false",
    "protocol.num_frames=3", "protocol.resolution=32", "metrics.metrics=[psnr, ssim]", "metrics.resolution=32",
    "render_eval.resolution=32",
]


def write_tiny_params(path: Path, *extra: str) -> Path:
    """A commented params file: params.yaml of the repo with TINY_REAL_OVERRIDES and ``extra``."""
    from d2.config import load_params, render_params_yaml

    repo = Path(__file__).resolve().parents[1]
    p = load_params(repo / "params.yaml", TINY_REAL_OVERRIDES + list(extra))
    path.write_text(render_params_yaml(p))
    return path


def prepare_tiny(root: Path) -> tuple[Path, Path]:
    """Tiny real params (2 objects, MLflow off, cache and data under ``root``) and their prepared
    dataset: ``(params file, data folder)``."""
    from d2.cli import main

    params = write_tiny_params(root / "params.yaml", f"run.cache_dir={root / 'cache'}", "run.progress=false",
                               f"run.data_dir={root / 'data'}", "run.mlflow=false")
    assert main(["prepare", "--params", str(params)]) == 0
    return params, root / "data"
