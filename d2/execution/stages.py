"""The real stages as cache specs: a few lines around each stage function.

Each ``compute`` reads only the params named in its spec (they make its cache key, with its
inputs' content and the code of its module's import closure). Priors and metric networks are
built lazily, once per process and config, and only when a stage actually computes (a fully
cached run never builds a model).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from d2.config import Params
from d2.execution.cache import StageSpec
from d2.execution.progress import reporter
from d2.validation import check_dataset, check_input


@dataclass(frozen=True)
class StageSet:
    """The stages a flow runs (by name) and the params model they read. Pickles by reference."""

    specs: dict[str, StageSpec]  # conditions, sampling, fit, render_eval, metrics, tables
    params_model: type[BaseModel]  # root params model (d2.config.Params for the real stages)
    check_dataset: Any = None  # (data_dir, params, objects) -> objects, raising before any stage runs
    check_input: Any = None  # (input_path, params, gt_dir) -> None, raising before any stage runs
    label_tables: Any = None  # (run's tables folder, dataset as the user named it) -> its table (markdown)


_models: dict[str, Any] = {}
_models_lock = threading.Lock()


def warm_imports() -> None:
    """Import the model libraries the stages build from, once per process and under a lock, before
    stages build models in parallel threads: transformers and diffusers resolve their names lazily,
    and two threads resolving them at once can fail (``cannot import name ... from 'transformers'``)."""
    if "warm" in _models:
        return
    with _models_lock:
        if "warm" in _models:
            return
        import diffusers
        import transformers

        for lib, names in ((diffusers, ("AutoencoderKLTemporalDecoder", "UNetSpatioTemporalConditionModel")),
                           (transformers, ("PreTrainedModel", "CLIPImageProcessor", "CLIPVisionConfig",
                                           "CLIPVisionModelWithProjection", "CLIPModel"))):
            for name in names:
                getattr(lib, name)
        _models["warm"] = True


def _built_once(key: str, build: Callable[[], Any]) -> Any:
    """``build()``, once per process for ``key`` (a long-lived worker builds its models once, whatever
    number of objects it runs)."""
    if key in _models:  # built: no wait behind another model being built
        return _models[key]
    warm_imports()
    with _models_lock:
        if key not in _models:
            _models[key] = build()
        return _models[key]


def get_priors(params: BaseModel, device: str | None = None) -> tuple[Any, Any]:
    """``load_priors(params.priors, device)``, built once per process for each priors config and device."""
    from d2.stages.priors import load_priors

    return _built_once(f"priors|{params.priors.model_dump_json()}|{device}", lambda: load_priors(params.priors, device))


def prior_weights(params: BaseModel) -> dict[str, Path]:
    """The weight files / folders the configured priors load (content-hashed into the keys of the
    stages that use the priors, so retrained or replaced weights invalidate them). The tiny and
    gaussian backends have none (seeded / analytic); a Hugging Face cache lookup without an
    explicit path is not covered (set priors.video_path to cover it)."""
    cfg = params.priors
    out: dict[str, Path] = {}
    for family in ("video", "multiview"):
        backend = getattr(cfg, f"{family}_backend") or cfg.backend
        explicit = getattr(cfg, f"{family}_path")
        if backend == "mini":
            from d2.stages.priors import mini_prior_dir

            path = mini_prior_dir(cfg, family)
        elif explicit:
            path = Path(explicit).expanduser()
        else:
            continue
        if path.exists():
            out[f"{family}_weights"] = path
    if cfg.components_path and Path(cfg.components_path).expanduser().exists():
        out["components"] = Path(cfg.components_path).expanduser()
    if params.sampling.method.startswith("sv4d") and cfg.sv4d_path and Path(cfg.sv4d_path).expanduser().exists():
        out["sv4d_weights"] = Path(cfg.sv4d_path).expanduser()
    return out


def get_sv4d(params: BaseModel, device: str | None = None) -> Any:
    """The network of an sv4d* sampling method (None for the others), built once per process and config."""
    if not params.sampling.method.startswith("sv4d"):
        return None
    from d2.stages.priors.sv4d import build_sv4d_network

    key = f"sv4d|{params.sampling.method}|{params.priors.model_dump_json()}|{device}"
    return _built_once(key, lambda: build_sv4d_network(params.priors, params.sampling.method, device))


def _quiet(cfg: BaseModel) -> BaseModel:
    """The stage config with its own tqdm bars off (the run shows one progress display)."""
    return cfg.model_copy(update={"progress": False}) if "progress" in type(cfg).model_fields else cfg


def compute_conditions(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """input (image / video / frames / orbit) -> reference orbit + reference video."""
    from d2.stages.conditions import run_conditions
    from d2.utils.gpu import peak_gpu_memory

    with peak_gpu_memory([params.priors.device]) as peak:
        run_conditions(inputs["input"], out, _quiet(params.conditions), get_priors(params))
    return {**_read_json(out / "conditions.json", keep=("num_views", "num_frames", "resolution", "kind")), **peak}


def compute_sampling(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """conditions -> the V x F matrix (score composition of the two priors, or sampling.method's)."""
    from d2.stages.sampling import run_sampling
    from d2.utils.gpu import peak_gpu_memory

    replicas = [get_priors(params, d) for d in params.sampling.devices] or None  # one prior pair per device
    priors = replicas[0] if replicas else get_priors(params)
    with peak_gpu_memory(params.sampling.devices or [params.priors.device]) as peak:
        run_sampling(inputs["conditions"], out, _quiet(params.sampling), priors, replicas, on_step=reporter(),
                     sv4d=get_sv4d(params))
    return {**_read_json(out / "matrix.json", keep=("V", "F", "resolution", "method")), **peak}


def compute_fit(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """matrix -> 4D Gaussians, PLY sequence, turntable video; then how well they reproduce the
    matrix at its own views and times (``matrix_psnr`` in fit.json)."""
    from d2.stages.fit import run_fit
    from d2.stages.fit_check import record_matrix_fit
    from d2.utils.gpu import peak_gpu_memory

    warm_imports()
    with peak_gpu_memory([params.fit.device]) as peak:
        summary = run_fit(inputs["matrix"], out, _quiet(params.fit), on_step=reporter())
    return {**summary, **record_matrix_fit(out, inputs["matrix"]), **peak}


def asset_frames(conditions_dir: Path, params: BaseModel) -> dict[int, float]:
    """Ground-truth frame -> the asset time it is rendered at: the frames the asset covers (its
    source frames, recorded by the conditions stage), or the protocol's first ``num_frames``."""
    from d2.eval.protocol import frames_to_score

    meta = json.loads((Path(conditions_dir) / "conditions.json").read_text())
    source = meta.get("source_frames") or list(range(int(meta["num_frames"])))
    return frames_to_score(source, params.protocol.num_frames)


def compute_render_eval(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """4D Gaussians -> renders at the protocol's evaluation azimuths, ``eval_{k}/{i}.png``: ground-truth
    frame i rendered at its time (:func:`asset_frames`)."""
    from d2.stages.export import render_eval_views

    proto = params.protocol
    cfg = params.render_eval
    frames = asset_frames(inputs["conditions"], params)
    kw = dict(frames=frames, resolution=cfg.resolution or proto.resolution,
              elevation_deg=proto.elevation_deg, background=1.0 if proto.background == "white" else 0.0,
              backend=cfg.backend, device=cfg.device)
    gaussians = inputs["gaussians"]  # the fit's folder (its safetensors, or an older gaussians.pt)
    paths = render_eval_views(gaussians, out, list(proto.eval_azimuths_deg), **kw)
    if proto.include_front_view:  # the input view, scored against the input frames
        paths += render_eval_views(gaussians, out / ".front", [proto.input_azimuth_deg], **kw)
        (out / ".front" / "eval_0").rename(out / "front")
        (out / ".front").rmdir()
    return {"images": len(paths), "frames": sorted(frames)}


def get_metric_suite(cfg: BaseModel, definitions: str) -> Any:
    """``build_metric_suite(cfg, definitions=...)``, built once per process for each metrics config
    and set of metric definitions (the protocol's)."""
    from d2.eval.metrics import build_metric_suite

    return _built_once(f"metrics|{cfg.model_dump_json()}|{definitions}",
                       lambda: build_metric_suite(cfg, definitions=definitions))


def compute_metrics(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """eval renders vs ground truth of one object -> per-frame scores (``results.json``; FVD is pooled
    over the benchmark by the tables stage)."""
    from d2.eval.scoring import score_object
    from d2.utils.io import write_json

    proto = params.protocol
    cfg = params.metrics.model_copy(update={"metrics": [m for m in params.metrics.metrics if m != "fvd"],
                                            "resolution": proto.resolution})
    results = score_object(inputs["pred"], inputs["gt"], proto, cfg, get_metric_suite(cfg, proto.metric_definitions),
                           input_dir=inputs.get("input"))
    # without this evaluation's timing and date: the same renders give the same bytes
    write_json(out / "results.json", results.model_dump(mode="json", exclude={"seconds", "created_utc"}))
    return {"metrics": results.per_object.get("object", {}), "unavailable": results.unavailable}


def compute_tables(inputs: dict[str, Path], out: Path, params: BaseModel) -> dict:
    """Per-object scores of every object (and the mean generation time) -> the benchmark's results
    tables (frames -> views -> objects; FVD pooled over all objects and views)."""
    from d2.eval.scoring import pooled_fvd
    from d2.eval.results import Results, merge_results
    from d2.eval.tables import results_markdown, write_results

    objects = sorted(k.split(":", 1)[1] for k in inputs if k.startswith("metrics:"))
    parts = {o: Results.model_validate_json((inputs[f"metrics:{o}"] / "results.json").read_text()) for o in objects}
    generation = inputs.get("generation_time")
    generation_s = json.loads(generation.read_text())["seconds_per_object"] if generation is not None else None
    requested = list(params.metrics.metrics)
    fvd, unavailable = None, {}
    if "fvd" in requested:
        proto = params.protocol
        fvd_cfg = params.metrics.model_copy(update={"metrics": ["fvd"], "resolution": proto.resolution})
        fvd, reason = pooled_fvd({o: inputs[f"pred:{o}"] for o in objects}, {o: inputs[f"gt:{o}"] for o in objects},
                                 proto, get_metric_suite(fvd_cfg, proto.metric_definitions))  # reason: unavailable
        if reason:
            unavailable["fvd"] = reason
    # no dataset label here: the entry is keyed on the ground truth's content, not on where it lies;
    # the run labels its copy with the dataset as the user named it (label_dataset)
    results = merge_results(parts, params.protocol, requested, method=params.sampling.method, fvd=fvd,
                            unavailable=unavailable, generation_time_s=generation_s)
    write_results(results, out)
    return {"summary": {**results.mean, "frames": results.frames}, "unavailable": results.unavailable,
            "table": results_markdown(results)}


def _read_json(path: Path, keep: tuple[str, ...]) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: data[k] for k in keep if k in data}


SPECS: dict[str, StageSpec] = {
    "conditions": StageSpec("conditions", compute_conditions, ("d2.stages.conditions",), ("conditions", "priors"),
                            prior_weights, "priors.device"),
    "sampling": StageSpec("sampling", compute_sampling, ("d2.stages.sampling",), ("sampling", "priors"), prior_weights,
                          "priors.device"),
    "fit": StageSpec("fit", compute_fit, ("d2.stages.fit", "d2.stages.fit_check"), ("fit",), device_key="fit.device"),
    "render_eval": StageSpec("render_eval", compute_render_eval, ("d2.stages.export",),
                             ("protocol", "render_eval"), device_key="render_eval.device"),
    "metrics": StageSpec("metrics", compute_metrics, ("d2.eval.scoring",), ("protocol", "metrics"),
                         device_key="metrics.device"),
    "tables": StageSpec("tables", compute_tables, ("d2.eval.scoring", "d2.eval.tables"),
                        ("protocol", "metrics", "sampling.method"), device_key="metrics.device"),
}

def label_dataset(tables_dir: Path, dataset: str) -> str:
    """Name the scored dataset (``--data`` as given) in a run's copy of the results tables;
    returns their markdown table."""
    from d2.eval.tables import load_results, results_markdown, write_results

    results = load_results(tables_dir)
    if results.dataset != dataset:
        results = results.model_copy(update={"dataset": dataset})
        write_results(results, tables_dir)
    return results_markdown(results)


STAGES = StageSet(SPECS, Params, check_dataset, check_input, label_dataset)
"""The pipeline's stages (the default of every flow)."""
