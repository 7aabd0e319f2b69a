"""Root parameters: ``params.yaml`` composed from the stage configs, with ``--set`` overrides.

Every knob of the project lives in one pydantic model, :class:`Params`, whose sections are
the configs owned by the stage modules (``priors``, ``conditions``, ``sampling``, ``fit``,
``protocol``, ``metrics``, ``prepare``) plus :class:`RunConfig` (orchestration). The CLI,
DVC (``dvc exp run -S key=value``) and tests only override it; it is validated, and unknown
keys are rejected, before any compute starts.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

DEFAULT_PARAMS = "params.yaml"
SHIPPED_PARAMS = Path(__file__).with_name("params_default.yaml")
"""The project's params.yaml as shipped inside the package (a test keeps the two identical):
missing keys of any params file, and a missing ./params.yaml, are completed from it."""

PRESETS_DIR = Path(__file__).resolve().parents[1] / "params"  # named, complete params files (docs/presets.md)
REHEARSAL_OVERLAY = PRESETS_DIR / "overlays" / "rehearsal.yaml"  # the size-only shrink of `--rehearse`


class ParamsError(ValueError):
    """A params file or an override is invalid (unknown key, bad value, bad syntax)."""


class RunConfig(BaseModel):
    """How runs are executed, cached and tracked (no effect on any result)."""

    model_config = ConfigDict(extra="forbid")

    max_parallel: int = Field(2, ge=1)  # stage tasks in flight at once (objects, or sweep points x objects, in parallel)
    runner: Literal["threads", "dask", "ray"] = "threads"  # where stage tasks run: this process's threads, a Dask or a Ray cluster
    address: str | None = None  # dask: scheduler address (tcp://host:8786); ray: cluster address (ray://host:10001, auto); None: start a local cluster
    workers: int = Field(2, ge=1)  # worker processes of a local Dask / Ray cluster (one task each at a time)
    gpus: list[int] = []  # local Dask cluster: one worker per GPU index with CUDA_VISIBLE_DEVICES=index (e.g. [0, 1]); replaces run.workers
    gpu_tasks: bool = False  # stages on cuda request one GPU of the runner (Dask resource GPU=1, Ray num_gpus=1); on with run.gpus
    threads_per_task: int = Field(1, ge=1)  # torch threads each running stage may use
    cache_dir: str = ".d2cache"  # content-addressed stage cache (relative to the working directory)
    use_cache: bool = True  # False: recompute every stage (results are still stored in the cache)
    verify_cache: Literal["sizes", "full"] = "sizes"  # check of a cache hit: sizes + digest (+ rehash of touched files), or rehash every file
    retries: int = Field(0, ge=0)  # Prefect retries of a failed stage task
    retry_delay_s: float = Field(2.0, ge=0)  # seconds between retries
    objects: list[str] = []  # benchmark objects to run; empty = every object of the dataset
    progress: bool = True  # show a progress display
    mlflow: bool = True  # log runs to MLflow (tracking URI: MLFLOW_TRACKING_URI or sqlite mlflow.db)
    mlflow_experiment: str = "diffusion2"  # MLflow experiment name
    data_dir: str = "data/mini"  # default benchmark dataset (written by `d2 prepare`)


class RenderEvalConfig(BaseModel):
    """Rendering the fitted asset at the protocol's evaluation cameras (azimuths, elevation, frames)."""

    model_config = ConfigDict(extra="forbid")

    resolution: int | None = Field(None, ge=16)  # render side in pixels; None: protocol.resolution
    backend: Literal["auto", "torch", "gsplat"] = "auto"  # rasterizer: auto = gsplat on CUDA, torch otherwise
    device: str = "cpu"  # torch device of the renders


# Knobs that cannot change any stage's result (how fast or how verbosely it runs): left out of
# every cache key. A bare name matches that field in any section, a dotted key one field.
# (sampling.decode_chunk is not one: the temporal decoder attends within a chunk.)
NO_EFFECT: tuple[str, ...] = ("progress", "sampling.chunk_size", "conditions.chunk_size", "metrics.batch_size",
                              "metrics.device", "fit.checkpoint_every")


# Sections composed from the stage modules: name -> (module, class). A section exists only
# when its module can be imported; a missing module is never replaced by a fake config.
SECTIONS: dict[str, tuple[str, str]] = {
    "prepare": ("d2.world.benchmark", "PrepareConfig"),
    "priors": ("d2.stages.priors", "PriorsConfig"),
    "conditions": ("d2.stages.conditions", "ConditionsConfig"),
    "sampling": ("d2.stages.sampling", "SamplingConfig"),
    "fit": ("d2.stages.fit", "FitConfig"),
    "protocol": ("d2.eval.protocol", "Protocol"),
    "metrics": ("d2.eval.metrics", "MetricsConfig"),
}


# Short names the issue and the paper use, for the stage configs' full names. params.yaml
# spells these knobs by their short name (so `dvc exp run -S sampling.s0=0.3` finds the key);
# an alias in a params file or in --set sets the full key (and wins over it in the same file).
ALIASES: dict[str, str] = {
    "sampling.s0": "sampling.logistic_s0",
    "sampling.k": "sampling.logistic_k",
}


def resolve_alias(path: list[str]) -> list[str]:
    """``['sampling', 's0']`` -> ``['sampling', 'logistic_s0']`` (other keys unchanged)."""
    full = ALIASES.get(".".join(path))
    return full.split(".") if full else path


def canonical_key(key: str, root: type[BaseModel] | None = None) -> str:
    """The dotted key an override of ``key`` sets: an alias gives its full name
    (``sampling.s0`` -> ``sampling.logistic_s0``), any other key itself."""
    path = [part.strip() for part in key.strip().split(".")]
    return ".".join(path if _has_key(Params if root is None else root, path) else resolve_alias(path))


def _has_key(model: type[BaseModel] | None, path: list[str]) -> bool:
    for part in path:
        if model is None or part not in model.model_fields:
            return False
        model = _field_model(model.model_fields[part].annotation)
    return True


def _apply_file_aliases(data: dict) -> None:
    for alias, full in ALIASES.items():
        section, key = alias.split(".", 1)
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            value = node.pop(key)
            fsec, fkey = full.split(".", 1)
            data.setdefault(fsec, {})[fkey] = value


def _import_section(module: str, cls: str) -> type[BaseModel] | None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            return None  # the stage module itself has not landed yet
        raise
    model = getattr(mod, cls, None)
    if model is None:
        raise ImportError(f"{module} has no config class {cls} (d2.config.SECTIONS composes it into Params)")
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{module}.{cls} is not a pydantic model")
    return model


def _build_params_model() -> type[BaseModel]:
    fields: dict[str, Any] = {"run": (RunConfig, Field(default_factory=RunConfig))}
    for name, (module, cls) in SECTIONS.items():
        model = _import_section(module, cls)
        if model is not None:
            fields[name] = (model, Field(default_factory=model))
    if "protocol" in fields:
        fields["render_eval"] = (RenderEvalConfig, Field(default_factory=RenderEvalConfig))
    return create_model(
        "Params",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Every knob of the project: one section per stage config, plus `run`.",
        **fields,
    )


Params = _build_params_model()


def available_sections() -> list[str]:
    """Names of the sections ``Params`` has (the stage modules that exist)."""
    return list(Params.model_fields)


# ---------------------------------------------------------------------------------------
# Key checking and overrides


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class of a field annotation (also through Optional[...])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _unknown_key_error(key: str, model: type[BaseModel], prefix: str) -> ParamsError:
    known = list(model.model_fields)
    where = prefix.rstrip(".") or "params"
    near = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    if near:
        return ParamsError(f"unknown parameter '{prefix}{key}'. Did you mean '{prefix}{near[0]}'?")
    return ParamsError(f"unknown parameter '{prefix}{key}': {where} has {', '.join(known)}")


def check_keys(data: dict, model: type[BaseModel] | None = None, prefix: str = "") -> None:
    """Raise :class:`ParamsError` for any key of ``data`` that ``model`` (default Params) lacks."""
    model = Params if model is None else model
    if not isinstance(data, dict):
        raise ParamsError(f"'{prefix.rstrip('.') or 'params'}' must be a mapping, got {type(data).__name__}")
    for key, value in data.items():
        if key not in model.model_fields:
            raise _unknown_key_error(str(key), model, prefix)
        sub = _field_model(model.model_fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            check_keys(value, sub, f"{prefix}{key}.")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'sampling.s0=0.3'`` -> (['sampling', 's0'], 0.3); the value is parsed as YAML."""
    if "=" not in text:
        raise ParamsError(f"override '{text}' must look like key=value (e.g. sampling.s0=0.3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ParamsError(f"override '{text}': bad key '{key}'")
    try:
        value = safe_yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ParamsError(f"override '{text}': value is not valid YAML ({_yaml_problem(e)})") from None
    except ParamsError as e:
        raise ParamsError(f"override '{key}=...': {e}") from None
    return key.split("."), value


def apply_override(data: dict, path: list[str], value: Any, root: type[BaseModel] | None = None) -> None:
    """Set ``data[path[0]][path[1]]... = value`` after checking every key exists in ``root`` (Params)."""
    model: type[BaseModel] | None = Params if root is None else root
    if not _has_key(model, path):
        path = resolve_alias(path)
    node = data
    for i, part in enumerate(path):
        prefix = ".".join(path[:i]) + ("." if i else "")
        if model is None:
            raise ParamsError(f"unknown parameter '{'.'.join(path)}': '{prefix.rstrip('.')}' is not a section")
        if part not in model.model_fields:
            raise _unknown_key_error(part, model, prefix)
        if i == len(path) - 1:
            node[part] = value
            return
        model = _field_model(model.model_fields[part].annotation)
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


MAX_PARAMS_BYTES = 1 << 20  # a params file larger than this is refused (the shipped one is ~20 KB)
MAX_YAML_DEPTH = 32  # nesting of mappings and lists in a params file or a --set value
MAX_YAML_EXPANDED = 1 << 21  # characters of a params document once its aliases are expanded (billion laughs)
MAX_ERRORS_SHOWN = 8  # validation problems listed in one message


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses, while composing and before anything is built, a
    document nested deeper than :data:`MAX_YAML_DEPTH` or whose aliases expand to more than
    :data:`MAX_YAML_EXPANDED` characters."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its expanded size (aliases reuse the node)

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise ParamsError(f"nested deeper than {MAX_YAML_DEPTH} levels; params hold sections "
                                  "and keys, not deep structures")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:
            if isinstance(node, yaml.ScalarNode):
                size = 1 + len(node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes.get(id(c), 1) for c in node.value)
            else:
                size = 1 + sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            self._sizes[id(node)] = size
            if size > MAX_YAML_EXPANDED:
                raise ParamsError(f"aliases (*name) expand to more than {MAX_YAML_EXPANDED:,} characters; "
                                  "write the values out instead of repeating aliases")
        return node


_DEEP_FLOW = re.compile(r"[\[{](?:\s*[\[{]){%d}" % MAX_YAML_DEPTH)  # more than MAX_YAML_DEPTH brackets opened in a row


def safe_yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with depth and alias-expansion limits (:class:`ParamsError` beyond them)."""
    if _DEEP_FLOW.search(text):  # refused before PyYAML's scanner looks ahead over the brackets
        raise ParamsError(f"nested deeper than {MAX_YAML_DEPTH} levels; params hold sections and keys, not deep "
                          "structures")
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def short_repr(value: Any, limit: int = 60) -> str:
    """A repr of at most about ``limit`` characters that never walks a whole large structure."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit + 5 else text[:limit] + "..."


def _format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid parameters ({source}):"]
    errors = e.errors()
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(x) for x in err["loc"])
        lines.append(f"  {loc}: {err['msg']} (got {short_repr(err.get('input'))})")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def _read_yaml_mapping(p: Path) -> dict:
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ParamsError(f"{p}: cannot read the params file ({e.strerror or e})") from None
    if size > MAX_PARAMS_BYTES:
        raise ParamsError(f"{p}: {size / 1e6:.1f} MB, over the {MAX_PARAMS_BYTES >> 20} MB limit of a params file "
                          "(params.yaml is ~20 KB); give the params file, not a data file")
    try:
        with open(p, "rb") as f:
            loaded = safe_yaml_load(f.read(MAX_PARAMS_BYTES + 1).decode("utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{p}: not a text file (a YAML params file is expected)") from None
    except ParamsError as e:
        raise ParamsError(f"{p}: {e}") from None
    except OSError as e:
        raise ParamsError(f"{p}: cannot read the params file ({e.strerror or e})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ParamsError(f"{p}: the top level must be a mapping of sections")
    return loaded


def shipped_defaults() -> dict:
    """The shipped params (``d2/params_default.yaml`` = the project's params.yaml) as raw data."""
    data = _read_yaml_mapping(SHIPPED_PARAMS)
    if "sampling" in Params.model_fields:
        _apply_file_aliases(data)
    return data


def _complete(defaults: dict, data: dict) -> dict:
    """``data`` with every key it lacks taken from ``defaults`` (nested mappings merged; an empty
    section such as ``fit:`` with nothing under it counts as missing)."""
    out = dict(defaults)
    for key, value in data.items():
        base = defaults.get(key)
        if isinstance(base, dict) and value is None:
            value = {}
        if isinstance(base, dict) and isinstance(value, dict):
            out[key] = _complete(base, value)
        else:
            out[key] = value
    return out


def load_params(path: str | os.PathLike | None = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> BaseModel:
    """Read ``path`` (YAML), complete it from the shipped defaults, apply ``key=value`` overrides,
    and validate. Raises :class:`ParamsError` naming the problem.

    An empty file, or one that lacks keys, is completed from ``d2/params_default.yaml`` (the
    shipped params.yaml); so is a missing ``params.yaml`` (the default path: running outside
    the project folder). ``path=None`` means the pydantic models' own defaults (library use).
    """
    data: dict = {}
    source = "model defaults"
    if path is not None:
        p = Path(path)
        if p.is_file():
            data = _read_yaml_mapping(p)
            source = str(p)
        elif p.exists():
            raise ParamsError(f"params file {p} is not a file")
        elif str(path) != DEFAULT_PARAMS:
            raise ParamsError(f"params file not found: {p}")
        else:
            source = f"shipped defaults ({SHIPPED_PARAMS.name}; no {DEFAULT_PARAMS} here)"
    if "sampling" in Params.model_fields:
        _apply_file_aliases(data)
    try:
        check_keys(data)
    except ParamsError as e:
        raise ParamsError(f"{source}: {e}") from None
    if path is not None:
        data = _complete(shipped_defaults(), data)
    overrides = list(overrides)
    for text in overrides:
        path_keys, value = parse_override(text)
        apply_override(data, path_keys, value)
    if overrides:
        source += " + --set " + " ".join(overrides)
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_validation_error(e, source)) from None
    check_consistency(params)
    return params


EXP_MAX = 709.78  # math.exp overflows above this (log of the largest float64)
FP32_MAX_SIGMA = 1e30  # the sampler keeps x in fp32 (max 3.4e38); initial noise std = sqrt(1 + sigma_max^2)
SEED_MAX = 2**63 - 2  # torch.Generator.manual_seed takes 64-bit seeds; seed + 1 is used too
CUDA_GRID_MAX = 65535  # CUDA's grid limit on attention sequences per kernel call


def _name(key: str) -> str:
    """The spelling params.yaml uses for a full key (``sampling.logistic_s0`` -> ``sampling.s0``)."""
    short = {full: alias for alias, full in ALIASES.items()}
    return short.get(key, key)


def _get(params: BaseModel, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if node is None or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


def knob_problems(params: BaseModel) -> list[str]:
    """Values inside each field's own type and bounds that still cannot work (one line each).

    Intervals of single knobs (the logistic midpoint, camera angles, distances, seeds, the
    CUDA grid limit) and the products that overflow: the logistic schedule's
    ``exp(k (x - s0))`` for x in [0, 1], the Karras ramp ``sigma ** (1 / rho)``, the fp32 noise
    scale, and a fit with no loss term.
    """
    problems: list[str] = []

    def interval(key: str, lo: float | None, hi: float | None, why: str, lo_open: bool = False,
                 hi_open: bool = False) -> None:
        v = _get(params, key)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        bad = ((lo is not None and (v < lo or (lo_open and v == lo)))
               or (hi is not None and (v > hi or (hi_open and v == hi))) or v != v)
        if bad:
            def num(x: float) -> str:
                return str(x) if isinstance(x, int) else f"{x:g}"

            if lo is None:
                rng = f"must be {'<' if hi_open else '<='} {num(hi)}"
            elif hi is None:
                rng = f"must be {'>' if lo_open else '>='} {num(lo)}"
            else:
                rng = f"is outside {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
            problems.append(f"{_name(key)} = {v!r} {rng}: {why}")

    interval("sampling.logistic_s0", 0.0, 1.0, "the logistic midpoint is a fraction of the denoising steps "
             "(paper 0.5)")
    interval("sampling.logistic_k", 0.0, None, "a negative steepness makes the multi-view weight rise instead of "
             "drop from logistic_max to logistic_min (paper 20)")
    samp = getattr(params, "sampling", None)
    if samp is not None and samp.weight_schedule == "logistic" and 0 <= samp.logistic_s0 <= 1 and samp.logistic_k >= 0:
        top = samp.logistic_k * (1.0 - samp.logistic_s0)
        if top > EXP_MAX:
            problems.append(f"sampling.k * (1 - sampling.s0) = {top:g} > {EXP_MAX}: exp() in the logistic weight "
                            f"schedule overflows; lower sampling.k (paper 20) or raise sampling.s0")
    for sec in ("conditions", "sampling"):
        cfg = getattr(params, sec, None)
        if cfg is None:
            continue
        interval(f"{sec}.sigma_max", None, FP32_MAX_SIGMA, "the initial noise (std sqrt(1 + sigma_max^2)) "
                 "overflows fp32; the authors use 700")
        if cfg.sigma_min >= cfg.sigma_max:
            problems.append(f"{sec}.sigma_min = {cfg.sigma_min:g} >= {sec}.sigma_max = {cfg.sigma_max:g}: "
                            "the Karras noise levels must descend; make sigma_min < sigma_max")
        else:
            try:
                hi, lo = cfg.sigma_max ** (1.0 / cfg.rho), cfg.sigma_min ** (1.0 / cfg.rho)
                ok = lo > 0 and math.isfinite(hi) and lo ** cfg.rho > 0 and math.isfinite(hi ** cfg.rho)
            except OverflowError:
                ok = False
            if not ok:
                problems.append(f"{sec}.rho = {cfg.rho:g}: sigma ** (1/rho) over- or underflows for sigma in "
                                f"[{cfg.sigma_min:g}, {cfg.sigma_max:g}]; use rho >= 0.1 (Karras 7)")
    for sec in ("conditions", "prepare"):
        interval(f"{sec}.fov_deg", 0.0, 180.0, "a field of view must be between 0 and 180 degrees",
                 lo_open=True, hi_open=True)
        interval(f"{sec}.radius", 0.0, None, "cameras must be away from the object at the origin", lo_open=True)
    for sec in ("conditions", "prepare", "protocol"):
        interval(f"{sec}.elevation_deg", -90.0, 90.0, "at or past the pole every azimuth gives the same or a "
                 "flipped view", lo_open=True, hi_open=True)
    for key in ("conditions.seed", "sampling.seed", "fit.seed", "prepare.seed", "priors.tiny.seed"):
        interval(key, 0, SEED_MAX, "seeds are non-negative 64-bit integers (seed + 1 is used too)")
    interval("priors.attention_max_batch", 1, CUDA_GRID_MAX, "CUDA launches at most 65535 blocks per grid "
             "dimension")
    pri = getattr(params, "priors", None)
    if pri is not None and "tiny" in (pri.backend, pri.video_backend, pri.multiview_backend):
        t = pri.tiny
        for key, widths in (("block_out_channels", t.block_out_channels), ("vae_block_out_channels",
                                                                           t.vae_block_out_channels)):
            if not widths or any(c <= 0 or c % 32 for c in widths):
                problems.append(f"priors.tiny.{key} = {list(widths)}: every width must be a positive multiple of 32 "
                                "(GroupNorm with 32 groups)")
        factor = 2 ** (len(t.block_out_channels) - 1) * (2 ** (len(t.vae_block_out_channels) - 1) if t.vae else 1)
        if t.resolution <= 0 or t.resolution % factor:
            problems.append(f"priors.tiny.resolution = {t.resolution} must be a positive multiple of {factor} "
                            "(the VAE and UNet downsampling)")
        if t.layers_per_block < 1 or t.num_attention_heads < 1 or t.clip_layers < 1:
            problems.append("priors.tiny.layers_per_block, num_attention_heads and clip_layers must be >= 1")
        if t.clip_image_size < 8 or t.clip_image_size % 8 or t.clip_hidden_size < 2 or t.clip_hidden_size % 2:
            problems.append(f"priors.tiny.clip_image_size = {t.clip_image_size} must be a multiple of the 8 px patch "
                            f"and clip_hidden_size = {t.clip_hidden_size} a multiple of its 2 heads")
    fit = getattr(params, "fit", None)
    if fit is not None and fit.lambda_ssim == 0 and fit.lambda_lpips == 0 and fit.lambda_l1 == 0:
        problems.append("fit.lambda_ssim, fit.lambda_lpips and fit.lambda_l1 are all 0: the fit has no loss to "
                        "minimise; set fit.lambda_ssim=1 (the default)")
    samp = getattr(params, "sampling", None)
    side = (fit.resolution or getattr(samp, "resolution", None)) if fit is not None else None
    if fit is not None and side is not None and side < 11 and fit.lambda_ssim > 0:
        problems.append(f"the fit sees {side}x{side} px images (fit.resolution, else sampling.resolution), smaller "
                        "than its SSIM's 11 px window; set fit.resolution to 11 or more, or fit.lambda_ssim=0")
    views = getattr(samp, "num_views", None) if samp is not None else None
    if fit is not None and getattr(fit, "exclude_views", None) and views is not None:
        from d2.stages.fit import fitted_views

        try:  # the matrix has sampling.num_views views
            fitted_views(fit, views)
        except ValueError as e:
            problems.append(str(e))
    return problems


def available_presets() -> list[str]:
    """Names of the presets in ``params/`` (``authors``, ``demo``, ``fast``, ``paper``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []


def preset_path(name: str) -> Path:
    """The params file of preset ``name`` (``params/<name>.yaml``); ParamsError naming the known ones."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ParamsError(f"bad preset name {name!r}: give a bare name such as 'paper'")
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_presets()) or "none"
        raise ParamsError(f"unknown preset {name!r}; known presets: {known} (files in {PRESETS_DIR.name}/)")
    return path


def overlay_overrides(path: str | os.PathLike = REHEARSAL_OVERLAY) -> list[str]:
    """A partial params file (an overlay such as ``params/overlays/rehearsal.yaml``) as ``key=value``
    overrides, applied after a params file like ``--set``."""
    import json

    data = _read_yaml_mapping(Path(path))

    def flat(d: dict, prefix: str = "") -> list[str]:
        out: list[str] = []
        for k, v in d.items():
            if isinstance(v, dict):
                out += flat(v, f"{prefix}{k}.")
            else:
                out.append(f"{prefix}{k}={json.dumps(v)}")
        return out

    return flat(data)


def check_consistency(params: BaseModel) -> None:
    """Cross-section checks and knob bounds that would otherwise fail mid-run (after earlier stages computed)."""
    problems: list[str] = []
    cond, samp = getattr(params, "conditions", None), getattr(params, "sampling", None)
    if cond is not None and samp is not None:
        for knob in ("num_views", "num_frames", "resolution"):
            a, b = getattr(cond, knob, None), getattr(samp, knob, None)
            if a is not None and b is not None and a != b:
                problems.append(f"conditions.{knob} = {a} but sampling.{knob} = {b} (they must match)")
    if problems:
        raise ParamsError("inconsistent parameters:\n  " + "\n  ".join(dict.fromkeys(problems)))
    problems = knob_problems(params) if isinstance(params, Params) else []  # other models (tests) have own knobs
    if problems:
        more = f" (+{len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ParamsError(f"invalid parameter: {problems[0]}{more}")


def with_overrides(params: BaseModel, overrides: Iterable[str]) -> BaseModel:
    """A copy of validated ``params`` with ``key=value`` overrides applied and re-validated."""
    data = params.model_dump(mode="json")
    overrides = list(overrides)
    for text in overrides:
        path_keys, value = parse_override(text)
        apply_override(data, path_keys, value, type(params))
    try:
        out = type(params).model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_validation_error(e, "--set " + " ".join(overrides))) from None
    check_consistency(out)
    return out


def get_param(params: BaseModel, key: str) -> Any:
    """The value at dotted ``key`` (e.g. ``'sampling.s0'``) as JSON-compatible data."""
    node: Any = params.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"unknown parameter '{key}'")
        node = node[part]
    return node


def params_subset_hash(params: BaseModel, keys: Iterable[str], ignore: Iterable[str] = ()) -> str:
    """sha256 of the canonical JSON of the values at the dotted ``keys`` (order-independent).

    ``ignore`` names leaf keys to leave out: a bare name (``'progress'``) anywhere in the
    subset, or a dotted key (``'metrics.batch_size'``); for knobs that cannot change results.
    """
    subset = {k: get_param(params, k) for k in sorted(set(keys))}
    ignore = set(ignore)

    def strip(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: strip(v, f"{prefix}{k}.") for k, v in node.items()
                    if k not in ignore and f"{prefix}{k}" not in ignore}
        return node

    subset = {k: strip(v, f"{k}.") for k, v in subset.items()}
    blob = json.dumps(subset, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def params_hash(params: BaseModel) -> str:
    """sha256 of every parameter except ``run`` (which has no effect on results)."""
    return params_subset_hash(params, [k for k in type(params).model_fields if k != "run"])


def flatten_params(params: BaseModel) -> dict[str, Any]:
    """``{'sampling.s0': 0.5, ...}``: every leaf as a dotted key (for MLflow params)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(params.model_dump(mode="json"), "")
    return out


# ---------------------------------------------------------------------------------------
# A commented params.yaml from the models (the comment of each field is its source comment)


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of ``model``."""
    import inspect
    import re

    out: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^\n#]*#\s*(.+)$", src, flags=re.M):
            out[m.group(1)] = m.group(2).strip()
    for name, f in model.model_fields.items():
        if name not in out and f.description:
            out[name] = f.description
    return out


def render_params_yaml(params: BaseModel | None = None, sections: Iterable[str] | None = None) -> str:
    """YAML text of ``params`` (default: all defaults) with one comment per field."""
    params = Params() if params is None else params
    only = None if sections is None else set(sections)
    lines: list[str] = []

    def emit(model_obj: BaseModel, indent: int) -> None:
        comments = field_comments(type(model_obj))
        short = {full.split(".")[-1]: alias.split(".")[-1] for alias, full in ALIASES.items()
                 if alias.split(".")[0] == section_name[0]}
        for field_name in type(model_obj).model_fields:
            value = getattr(model_obj, field_name)
            pad = " " * indent
            comment = comments.get(field_name, "")
            name = field_name
            if indent == 2 and field_name in short:
                name = short[field_name]
                comment = f"{comment} (= {section_name[0]}.{field_name})"
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:" + (f"  # {comment}" if comment else ""))
                emit(value, indent + 2)
                continue
            dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            if hasattr(dumped, "value") and not isinstance(dumped, (int, float, str)):
                dumped = dumped.value  # enums
            text = yaml.safe_dump(json.loads(json.dumps(dumped, default=str)), default_flow_style=True,
                                  width=10_000).strip()
            if text.endswith("\n..."):
                text = text[: -len("\n...")]
            text = text.removesuffix("...").strip()
            lines.append(f"{pad}{name}: {text}" + (f"  # {comment}" if comment else ""))

    section_name = [""]
    for section in type(params).model_fields:
        if only is not None and section not in only:
            continue
        section_name[0] = section
        sub = getattr(params, section)
        doc = (type(sub).__doc__ or "").strip().splitlines()
        lines.append("")
        lines.append(f"{section}:" + (f"  # {doc[0]}" if doc else ""))
        emit(sub, 2)
    return "# Every knob of Diffusion² (validated by d2/config.py before any compute).\n" \
           "# Override any key with `--set key=value` or `dvc exp run -S key=value`.\n" + "\n".join(lines) + "\n"
