"""Root parameters: the stage configs composed into :class:`Params`, read from a params file, with ``--set`` overrides.

Every knob of the project lives in one pydantic model, :class:`Params`, whose sections are
the configs owned by the stage modules (``prepare``, ``priors``, ``conditions``, ``sampling``,
``fit``, ``protocol``, ``metrics``) plus :class:`RunConfig` (orchestration) and
:class:`RenderEvalConfig`. Each field's default and bounds sit on the field, with its one comment;
a params file lists any subset of the keys (the rest keep their defaults). ``params.yaml`` is
every knob at its default, written by ``d2 params``; the presets in ``params/`` list only the
keys where they differ. The CLI, DVC (``dvc exp run -S key=value``) and tests override keys;
unknown keys and out-of-range values are refused before any compute starts.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
import re
import reprlib
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import to_jsonable_python

from d2.eval.metrics import MetricsConfig
from d2.eval.protocol import Protocol
from d2.stages.conditions import ConditionsConfig
from d2.stages.fit import FitConfig, fitted_views
from d2.stages.priors import PriorsConfig
from d2.stages.priors.sv4d import SV4D_METHODS, sv4d_backend_problem
from d2.stages.sampling import SamplingConfig
from d2.utils.bounded_yaml import YAMLLimitError, load_bounded_yaml, yaml_problem
from d2.world.benchmark import PrepareConfig

DEFAULT_PARAMS = "params.yaml"
PRESETS_DIR = Path(__file__).resolve().parents[1] / "params"  # presets: overlays of the defaults (docs/presets.md)
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
    progress: bool = Field(True, json_schema_extra={"no_effect": True})  # show a progress display
    mlflow: bool = True  # log runs to MLflow (tracking URI: MLFLOW_TRACKING_URI or sqlite mlflow.db)
    mlflow_experiment: str = "diffusion2"  # MLflow experiment name
    data_dir: str = "data/mini"  # default benchmark dataset (written by `d2 prepare`)


class RenderEvalConfig(BaseModel):
    """Rendering the fitted asset at the protocol's evaluation cameras (azimuths, elevation, frames)."""

    model_config = ConfigDict(extra="forbid")

    resolution: int | None = Field(64, ge=16)  # render side in pixels; None: protocol.resolution
    backend: Literal["auto", "torch", "gsplat"] = "auto"  # rasterizer: auto = gsplat on CUDA, torch otherwise
    device: str = "cpu"  # torch device of the renders


class ProjectPriorsConfig(PriorsConfig):
    """Which priors to load and how (by default the miniature priors of data/priors, on the CPU)."""

    backend: str = "mini"  # registry name used for both families unless overridden below (mini: the miniature priors)
    clip_preprocess: Literal["sgm", "torch"] = "torch"  # CLIP input resize: torch (bicubic, align_corners False; the miniature priors need no resize) | sgm (antialiased bicubic, align_corners True: Stability's pipeline)


SSIM_WINDOW = 11  # side of the fit loss's SSIM window in pixels


class Params(BaseModel):
    """Every knob of the project: one section per stage config, plus ``run``."""

    model_config = ConfigDict(extra="forbid")

    run: RunConfig = RunConfig()  # how runs are executed, cached and tracked
    prepare: PrepareConfig = PrepareConfig()  # the generated mini-benchmark
    priors: ProjectPriorsConfig = ProjectPriorsConfig()  # which priors, on which device
    conditions: ConditionsConfig = ConditionsConfig()  # the reference orbit and video
    sampling: SamplingConfig = SamplingConfig()  # the composed sampler
    fit: FitConfig = FitConfig()  # the 4D Gaussian fit
    protocol: Protocol = Protocol()  # how a benchmark is scored
    metrics: MetricsConfig = MetricsConfig()  # which metrics, on which device
    render_eval: RenderEvalConfig = RenderEvalConfig()  # renders at the protocol's cameras

    @model_validator(mode="after")
    def _sections_agree(self) -> "Params":
        problems = [f"conditions.{k} = {getattr(self.conditions, k)} but sampling.{k} = {getattr(self.sampling, k)} "
                    "(they must match)" for k in ("num_views", "num_frames", "resolution")
                    if getattr(self.conditions, k) != getattr(self.sampling, k)]
        side = self.fit.resolution or self.sampling.resolution
        if side < SSIM_WINDOW and self.fit.lambda_ssim > 0:
            problems.append(f"the fit sees {side}x{side} px images (fit.resolution, else sampling.resolution), smaller "
                            f"than its SSIM's {SSIM_WINDOW} px window; set fit.resolution to {SSIM_WINDOW} or more, "
                            "or fit.lambda_ssim=0")
        if self.sampling.method in SV4D_METHODS and (why := sv4d_backend_problem(self.priors, self.sampling.method)):
            problems.append(why)
        try:  # the matrix has sampling.num_views views
            fitted_views(self.fit, self.sampling.num_views)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))
        return self


# ---------------------------------------------------------------------------------------
# Reading, overriding and validating; pydantic refuses unknown keys (extra="forbid")


def _field_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class of a field annotation (also through Optional[...])."""
    for t in (annotation, *(getattr(annotation, "__args__", ()) or ())):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def no_effect_keys(model: type[BaseModel] = Params, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of the fields marked ``json_schema_extra={"no_effect": True}``: knobs that cannot change
    any stage's result (how fast or how verbosely it runs), left out of cache keys and the fit's resume check."""
    out: list[str] = []
    for name, f in model.model_fields.items():
        sub = _field_model(f.annotation)
        if sub is not None:
            out += no_effect_keys(sub, f"{prefix}{name}.")
        elif (f.json_schema_extra or {}).get("no_effect"):
            out.append(f"{prefix}{name}")
    return tuple(out)


NO_EFFECT = no_effect_keys()  # left out of every cache key
MAX_PARAMS_BYTES = 1 << 20  # a params file larger than this is refused (params.yaml is ~20 KB)
MAX_ERRORS_SHOWN = 8  # validation problems listed in one message


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'sampling.s0=0.3'`` -> (['sampling', 's0'], 0.3); the value is parsed as YAML."""
    if "=" not in text:
        raise ParamsError(f"override '{text}' must look like key=value (e.g. sampling.s0=0.3)")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ParamsError(f"override '{text}': bad key '{key}'")
    try:
        return key.split("."), load_bounded_yaml(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ParamsError(f"override '{text}': value is not valid YAML ({yaml_problem(e)})") from None
    except YAMLLimitError as e:
        raise ParamsError(f"override '{key}=...': {e}") from None


def _validate(model: type[BaseModel], data: dict, overrides: list[str], source: str) -> Any:
    """``model`` from ``data`` with the ``key=value`` overrides set in it; one :class:`ParamsError` line otherwise."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")  # unknown keys first
        problems = list(dict.fromkeys(_problem(err, model) for err in errors))
        more = f" (+{len(problems) - 1} more: {'; '.join(problems[1:MAX_ERRORS_SHOWN])})" if len(problems) > 1 else ""
        raise ParamsError(f"{source}: {problems[0]}{more}") from None


def short_repr(value: Any, limit: int = 60) -> str:
    """A repr of at most about ``limit`` characters that never walks a whole large structure."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit + 5 else text[:limit] + "..."


def _range_text(field: Any) -> str:
    """``is outside [0, 1]``, ``must be > 0``, ... from the field's constraints."""
    b = {kind: getattr(c, kind) for c in field.metadata for kind in ("ge", "gt", "le", "lt")
         if getattr(c, kind, None) is not None}
    num = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
    lo, lo_open = (b["gt"], True) if "gt" in b else (b.get("ge"), False)
    hi, hi_open = (b["lt"], True) if "lt" in b else (b.get("le"), False)
    if lo is None:
        return f"must be {'<' if hi_open else '<='} {num(hi)}"
    if hi is None:
        return f"must be {'>' if lo_open else '>='} {num(lo)}"
    return f"is outside {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"


def _problem(err: Any, root: type[BaseModel]) -> str:
    """One validation error in one line naming the knob, the value, the allowed range and why."""
    loc, value = tuple(map(str, err["loc"])), err.get("input")
    key, msg = ".".join(loc), err["msg"].removeprefix("Value error, ")
    section: type[BaseModel] | None = root
    for part in loc[:-1]:  # the model holding the knob at loc
        f = section.model_fields.get(part) if section else None
        section = _field_model(f.annotation) if f else None
    field = section.model_fields.get(loc[-1]) if section and loc else None
    leaf = field is not None and _field_model(field.annotation) is None
    if err["type"] == "extra_forbidden" and section is not None:
        known, name, where = list(section.model_fields), loc[-1], ".".join(loc[:-1])
        near = [f for f in known if name.endswith("_" + f)] or difflib.get_close_matches(name, known, n=1)
        if near:
            return f"unknown parameter '{key}'. Did you mean '{where + '.' if where else ''}{near[0]}'?"
        return f"unknown parameter '{key}': {where or 'params'} has {', '.join(known)}"
    if err["type"] == "value_error" and (not leaf or msg.startswith(key)):
        return msg  # a check's own message names the knobs
    if leaf and isinstance(value, dict) and err["type"].endswith("_type"):
        return f"unknown parameter '{key}.{next(iter(value), '')}': '{key}' is not a section"
    if leaf and err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        if field.annotation is float and isinstance(value, (int, str)):
            value = float(value)  # as validated (YAML reads 1e200 as a string, 0 as an int)
        why = field_comments(section).get(loc[-1], "")
        return f"{key} = {value!r} {_range_text(field)}" + (f": {why}" if why else "")
    return f"{key}: {msg} (got {short_repr(value)})"


def _read_yaml_mapping(p: Path) -> dict:
    try:
        if p.stat().st_size > MAX_PARAMS_BYTES:
            raise ParamsError(f"{p}: {p.stat().st_size / 1e6:.1f} MB, over the {MAX_PARAMS_BYTES >> 20} MB limit of "
                              "a params file (params.yaml is ~20 KB); give the params file, not a data file")
        with open(p, "rb") as f:
            loaded = load_bounded_yaml(f.read(MAX_PARAMS_BYTES + 1).decode("utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{p}: not valid YAML ({yaml_problem(e)})") from None
    except UnicodeDecodeError:
        raise ParamsError(f"{p}: not a text file (a YAML params file is expected)") from None
    except YAMLLimitError as e:
        raise ParamsError(f"{p}: {e}") from None
    except OSError as e:
        raise ParamsError(f"{p}: cannot read the params file ({e.strerror or e})") from None
    if not isinstance(loaded, (dict, type(None))):
        raise ParamsError(f"{p}: the top level must be a mapping of sections")
    return loaded or {}


def load_params(path: str | os.PathLike | None = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> Params:
    """Read ``path`` (YAML: any subset of the keys; the others keep the models' defaults), apply
    ``key=value`` overrides, and validate. Raises :class:`ParamsError` naming the problem.

    ``path=None``, and a missing ``params.yaml`` at the default path (running outside the
    project folder), mean the defaults.
    """
    data: dict = {}
    source = "the defaults"
    if path is not None:
        p = Path(path)
        if p.is_file():
            data, source = _read_yaml_mapping(p), str(p)
        elif p.exists():
            raise ParamsError(f"params file {p} is not a file")
        elif str(path) != DEFAULT_PARAMS:
            raise ParamsError(f"params file not found: {p}")
    overrides = list(overrides)
    if overrides:
        source = ("" if source == "the defaults" else source + " + ") + "--set " + " ".join(overrides)
    data = {k: v for k, v in data.items() if v is not None}  # an empty section (`fit:` alone) keeps its defaults
    return _validate(Params, data, overrides, source)


def with_overrides(params: BaseModel, overrides: Iterable[str]) -> BaseModel:
    """A copy of validated ``params`` with ``key=value`` overrides applied and re-validated."""
    overrides = list(overrides)
    return _validate(type(params), params.model_dump(mode="json"), overrides, " ".join(overrides))


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


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{'sampling.s0': 0.5, ...}``: every leaf of nested dicts as a dotted key (an empty dict inside is a leaf)."""
    if not isinstance(node, dict) or (prefix and not node):
        return {prefix.rstrip("."): node}
    return {k: v for name, child in node.items() for k, v in _leaves(child, f"{prefix}{name}.").items()}


def overlay_overrides(path: str | os.PathLike = REHEARSAL_OVERLAY) -> list[str]:
    """A partial params file (an overlay such as ``params/overlays/rehearsal.yaml``) as ``key=value``
    overrides, applied after a params file like ``--set``."""
    return [f"{k}={json.dumps(v)}" for k, v in _leaves(_read_yaml_mapping(Path(path))).items()]


def flatten_params(params: BaseModel) -> dict[str, Any]:
    """``{'sampling.s0': 0.5, ...}``: every leaf as a dotted key (for MLflow params)."""
    return _leaves(params.model_dump(mode="json"))


def get_param(params: BaseModel, key: str) -> Any:
    """The value at dotted ``key`` (e.g. ``'sampling.s0'``) as JSON-compatible data."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise ParamsError(f"unknown parameter '{key}'")
        node = getattr(node, part)
    return to_jsonable_python(node)


def params_subset_hash(params: BaseModel, keys: Iterable[str], ignore: Iterable[str] = ()) -> str:
    """sha256 of the canonical JSON of the values at the dotted ``keys`` (order-independent).

    ``ignore`` names leaf keys to leave out: a bare name (``'progress'``) anywhere in the
    subset, or a dotted key (``'metrics.batch_size'``); for knobs that cannot change results.
    """
    ignore = set(ignore)

    def strip(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: strip(v, f"{prefix}{k}.") for k, v in node.items()
                    if k not in ignore and f"{prefix}{k}" not in ignore}
        return node

    subset = {k: strip(get_param(params, k), f"{k}.") for k in sorted(set(keys))}
    blob = json.dumps(subset, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def params_hash(params: BaseModel) -> str:
    """sha256 of every parameter except ``run`` (which has no effect on results)."""
    return params_subset_hash(params, [k for k in type(params).model_fields if k != "run"])


# ---------------------------------------------------------------------------------------
# A commented params.yaml from the models (the comment of each field is its source comment)


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of ``model``."""
    out: dict[str, str] = {}
    for cls in reversed(model.__mro__[:model.__mro__.index(BaseModel)]):  # a subclass's comments win
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        out.update(re.findall(r"^\s+(\w+)\s*:[^\n#]*#\s*(.+?)\s*$", src, flags=re.M))
    return out


def render_params_yaml(params: BaseModel | None = None, indent: int = 0) -> str:
    """YAML text of ``params`` (default: all defaults) with one comment per field; a top-level
    section is commented with its class's docstring."""
    params = Params() if params is None else params
    comments, dump, lines = field_comments(type(params)), params.model_dump(mode="json"), []
    for name in type(params).model_fields:
        value, pad = getattr(params, name), " " * indent
        if isinstance(value, BaseModel):
            note = (type(value).__doc__ or "").strip().split("\n")[0] if indent == 0 else comments.get(name, "")
            lines += [""] * (indent == 0) + [f"{pad}{name}:" + (f"  # {note}" if note else "")]
            lines.append(render_params_yaml(value, indent + 2))
        else:
            text = yaml.safe_dump(dump[name], default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
            lines.append(f"{pad}{name}: {text}" + (f"  # {comments[name]}" if name in comments else ""))
    if indent:
        return "\n".join(lines)
    return ("# Every knob of Diffusion² (validated by d2/config.py before any compute), written by `d2 params`.\n"
            "# Override any key with `--set key=value` or `dvc exp run -S key=value`; presets: params/ "
            "(docs/presets.md).\n" + "\n".join(lines) + "\n")
