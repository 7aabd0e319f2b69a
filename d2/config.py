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
import os
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

DEFAULT_PARAMS = "params.yaml"
PRESETS_DIR = Path(__file__).resolve().parents[1] / "params"  # named, complete params files (docs/presets.md)


class ParamsError(ValueError):
    """A params file or an override is invalid (unknown key, bad value, bad syntax)."""


class RunConfig(BaseModel):
    """How runs are executed, cached and tracked (no effect on any result)."""

    model_config = ConfigDict(extra="forbid")

    max_parallel: int = Field(2, ge=1)  # objects (or sweep points x objects) run at the same time
    threads_per_task: int = Field(1, ge=1)  # torch threads each running stage may use
    cache_dir: str = ".d2cache"  # content-addressed stage cache (relative to the working directory)
    use_cache: bool = True  # False: recompute every stage (results are still stored in the cache)
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
    hint = f" Did you mean '{prefix}{near[0]}'?" if near else ""
    return ParamsError(f"unknown parameter '{prefix}{key}': {where} has {', '.join(known)}.{hint}")


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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ParamsError(f"override '{text}': value is not valid YAML ({e})") from None
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


def _format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid parameters ({source}):"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_params(path: str | os.PathLike | None = DEFAULT_PARAMS, overrides: Iterable[str] = ()) -> BaseModel:
    """Read ``path`` (YAML; None or a missing default file = all defaults), apply ``key=value``
    overrides, and validate. Raises :class:`ParamsError` naming the problem."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if p.exists():
            try:
                loaded = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise ParamsError(f"{p}: not valid YAML ({e})") from None
            data = loaded or {}
            source = str(p)
        elif str(path) != DEFAULT_PARAMS:
            raise ParamsError(f"params file not found: {p}")
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections")
    if "sampling" in Params.model_fields:
        _apply_file_aliases(data)
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
        params = Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_validation_error(e, source)) from None
    check_consistency(params)
    return params


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


def check_consistency(params: BaseModel) -> None:
    """Cross-section checks that would otherwise fail mid-run (after earlier stages computed)."""
    problems: list[str] = []
    cond, samp = getattr(params, "conditions", None), getattr(params, "sampling", None)
    if cond is not None and samp is not None:
        for knob in ("num_views", "num_frames", "resolution"):
            a, b = getattr(cond, knob, None), getattr(samp, knob, None)
            if a is not None and b is not None and a != b:
                problems.append(f"conditions.{knob} = {a} but sampling.{knob} = {b} (they must match)")
    if problems:
        raise ParamsError("inconsistent parameters:\n  " + "\n  ".join(dict.fromkeys(problems)))


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
