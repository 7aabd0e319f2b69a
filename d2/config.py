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
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from d2.eval.metrics import MetricsConfig
from d2.eval.protocol import Protocol
from d2.stages.conditions import ConditionsConfig
from d2.stages.fit import FitConfig, fitted_views
from d2.stages.priors import PriorsConfig
from d2.stages.sampling import SamplingConfig
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
        try:  # the matrix has sampling.num_views views
            fitted_views(self.fit, self.sampling.num_views)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
    last = key.split(".")[-1]
    near = [f for f in known if last.endswith("_" + f)] or difflib.get_close_matches(last, known, n=1)
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
        if sub is not None and value is None:  # an empty section (`fit:` with nothing under it)
            data[key] = {}
        elif sub is not None and isinstance(value, dict):
            check_keys(value, sub, f"{prefix}{key}.")


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


MAX_PARAMS_BYTES = 1 << 20  # a params file larger than this is refused (params.yaml is ~20 KB)
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


def _field_at(root: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], str] | None:
    """(model, field name) of the field at error location ``loc`` of ``root``, if ``loc`` names one."""
    model: type[BaseModel] | None = root
    for i, part in enumerate(loc):
        if model is None or part not in model.model_fields:
            return None
        if i == len(loc) - 1:
            return model, str(part)
        model = _field_model(model.model_fields[part].annotation)
    return None


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range_text(model: type[BaseModel], name: str) -> str:
    """``is outside [0, 1]``, ``must be > 0``, ... from the field's constraints."""
    bounds = {kind: getattr(c, kind) for c in model.model_fields[name].metadata for kind in ("ge", "gt", "le", "lt")
              if getattr(c, kind, None) is not None}
    lo, lo_open = (bounds["gt"], True) if "gt" in bounds else (bounds.get("ge"), False)
    hi, hi_open = (bounds["lt"], True) if "lt" in bounds else (bounds.get("le"), False)
    if lo is None:
        return f"must be {'<' if hi_open else '<='} {_num(hi)}"
    if hi is None:
        return f"must be {'>' if lo_open else '>='} {_num(lo)}"
    return f"is outside {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"


BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _problem(err: Any, root: type[BaseModel]) -> str:
    """One validation error in one line naming the knob, the value, the allowed range and why."""
    key = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    at = _field_at(root, err["loc"])
    if err["type"] in BOUND_ERRORS and at is not None:
        model, name = at
        value = err.get("input")
        if model.model_fields[name].annotation is float and isinstance(value, (int, str)):
            value = float(value)  # as validated (YAML reads 1e200 as a string, 0 as an int)
        why = field_comments(model).get(name, "")
        return f"{key} = {value!r} {_range_text(model, name)}" + (f": {why}" if why else "")
    if err["type"] == "value_error" and (at is None or _field_model(at[0].model_fields[at[1]].annotation)):
        return msg  # a section's own check: its message names the knobs
    return f"{key}: {msg} (got {short_repr(err.get('input'))})"


def _format_validation_error(e: ValidationError, source: str, root: type[BaseModel] = Params) -> str:
    problems = list(dict.fromkeys(_problem(err, root) for err in e.errors()))
    shown = problems[1:MAX_ERRORS_SHOWN]
    more = f" (+{len(problems) - 1} more: {'; '.join(shown)})" if len(problems) > 1 else ""
    return f"invalid parameter: {problems[0]}{more} (in {source})"


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
            data = _read_yaml_mapping(p)
            source = str(p)
        elif p.exists():
            raise ParamsError(f"params file {p} is not a file")
        elif str(path) != DEFAULT_PARAMS:
            raise ParamsError(f"params file not found: {p}")
        else:
            source = f"the defaults (no {DEFAULT_PARAMS} here)"
    try:
        check_keys(data)
    except ParamsError as e:
        raise ParamsError(f"{source}: {e}") from None
    overrides = list(overrides)
    for text in overrides:
        path_keys, value = parse_override(text)
        apply_override(data, path_keys, value)
    if overrides:
        source += " + --set " + " ".join(overrides)
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_validation_error(e, source)) from None


def _get(params: BaseModel, key: str) -> Any:
    """The attribute at dotted ``key`` of ``params``, None where it has none."""
    node: Any = params
    for part in key.split("."):
        if node is None or not hasattr(node, part):
            return None
        node = getattr(node, part)
    return node


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


def with_overrides(params: BaseModel, overrides: Iterable[str]) -> BaseModel:
    """A copy of validated ``params`` with ``key=value`` overrides applied and re-validated."""
    data = params.model_dump(mode="json")
    overrides = list(overrides)
    for text in overrides:
        path_keys, value = parse_override(text)
        apply_override(data, path_keys, value, type(params))
    try:
        return type(params).model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_validation_error(e, "--set " + " ".join(overrides), type(params))) from None


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


def render_params_yaml(params: BaseModel | None = None) -> str:
    """YAML text of ``params`` (default: all defaults) with one comment per field."""
    params = Params() if params is None else params
    lines: list[str] = []

    def emit(model_obj: BaseModel, indent: int) -> None:
        comments = field_comments(type(model_obj))
        for name in type(model_obj).model_fields:
            value = getattr(model_obj, name)
            pad = " " * indent
            comment = comments.get(name, "")
            if isinstance(value, BaseModel):
                lines.append(f"{pad}{name}:" + (f"  # {comment}" if comment else ""))
                emit(value, indent + 2)
                continue
            dumped = value.value if hasattr(value, "value") and not isinstance(value, (int, float, str)) else value
            text = yaml.safe_dump(json.loads(json.dumps(dumped, default=str)), default_flow_style=True,
                                  width=10_000).strip()
            text = text.removesuffix("...").strip()
            lines.append(f"{pad}{name}: {text}" + (f"  # {comment}" if comment else ""))

    for section in type(params).model_fields:
        sub = getattr(params, section)
        doc = (type(sub).__doc__ or "").strip().splitlines()
        lines.append("")
        lines.append(f"{section}:" + (f"  # {doc[0]}" if doc else ""))
        emit(sub, 2)
    return ("# Every knob of Diffusion² (validated by d2/config.py before any compute), written by `d2 params`.\n"
            "# Override any key with `--set key=value` or `dvc exp run -S key=value`; presets: params/ "
            "(docs/presets.md).\n" + "\n".join(lines) + "\n")
