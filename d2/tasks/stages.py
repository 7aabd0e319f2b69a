"""The real stages as cacheable specs (registered as stage set ``"default"``).

Each ``compute`` is a few lines around a stage function of ``docs/ARCHITECTURE.md``; it
reads only the params named in its spec (they make its cache key, with its inputs' content
and its code). Priors are loaded lazily, once per process and priors config, and only when
a stage actually computes (a fully cached run never builds a model).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from d2.tasks.cache import StageSpec
from d2.tasks.runtime import register_stage_set

# knobs that cannot change a stage's result: left out of cache keys
NO_EFFECT = ("progress", "chunk_size", "decode_chunk", "batch_size", "checkpoint_every", "metrics.device")

_priors_memo: dict[str, Any] = {}
_priors_lock = threading.Lock()


def get_priors(params: BaseModel) -> tuple[Any, Any]:
    """``load_priors(params.priors)``, built once per process for each priors config."""
    from d2.stages.priors import load_priors

    key = params.priors.model_dump_json()
    with _priors_lock:
        if key not in _priors_memo:
            _priors_memo[key] = load_priors(params.priors)
        return _priors_memo[key]


def _quiet(cfg: BaseModel) -> BaseModel:
    """The stage config with its own tqdm bars off (the run shows one progress display)."""
    return cfg.model_copy(update={"progress": False}) if "progress" in type(cfg).model_fields else cfg


def compute_conditions(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """input (image / video / frames / orbit) -> reference orbit + reference video."""
    from d2.stages.conditions import run_conditions

    run_conditions(inputs["input"], out, _quiet(params.conditions), get_priors(params))
    return _read_json(out / "conditions.json", keep=("num_views", "num_frames", "resolution", "kind"))


def compute_sampling(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """conditions -> the V x F matrix (score composition of the two priors)."""
    from d2.stages.sampling import run_sampling

    run_sampling(inputs["conditions"], out, _quiet(params.sampling), get_priors(params))
    return _read_json(out / "matrix.json", keep=("V", "F", "resolution"))


def compute_fit(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """matrix -> 4D Gaussians, PLY sequence, turntable video."""
    from d2.stages.fit import run_fit

    summary = run_fit(inputs["matrix"], out, _quiet(params.fit))
    return json.loads(json.dumps(summary, default=str)) if isinstance(summary, dict) else {}


def eval_num_frames(params: BaseModel) -> int:
    """Frames rendered and scored: the protocol's count, else the frames the asset was made of."""
    return params.protocol.num_frames or params.conditions.num_frames


def compute_render_eval(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """4D Gaussians -> renders at the protocol's evaluation azimuths, ``eval_{k}/{i}.png``."""
    from d2.stages.export import render_eval_views

    proto = params.protocol
    cfg = params.render_eval
    paths = render_eval_views(inputs["gaussians"] / "gaussians.pt", out, list(proto.eval_azimuths_deg),
                              eval_num_frames(params), cfg.resolution or proto.resolution,
                              elevation_deg=proto.elevation_deg,
                              background=1.0 if proto.background == "white" else 0.0,
                              backend=cfg.backend, device=cfg.device)
    return {"images": len(paths)}


def _read_json(path: Path, keep: tuple[str, ...]) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: data[k] for k in keep if k in data}


SPECS: dict[str, StageSpec] = {
    "conditions": StageSpec("conditions", compute_conditions, ("d2.stages.conditions", "d2.stages.priors"),
                            ("conditions", "priors"), NO_EFFECT),
    "sampling": StageSpec("sampling", compute_sampling, ("d2.stages.sampling", "d2.stages.priors"),
                          ("sampling", "priors"), NO_EFFECT),
    "fit": StageSpec("fit", compute_fit, ("d2.stages.fit",), ("fit",), NO_EFFECT),
    "render_eval": StageSpec("render_eval", compute_render_eval, ("d2.stages.export",),
                             ("protocol", "render_eval", "conditions.num_frames"), NO_EFFECT),
}

register_stage_set("default", SPECS)
