"""Checks of params against the inputs, datasets, priors and devices, run before any compute
(no Prefect, no model loads); :mod:`d2.preflight` runs them, then checks the machine. Each
problem is one :class:`InputError` line naming the file or the key, the problem, and what to
do. The functions are pure apart from reading the files they check; frames are named as
:mod:`d2.stages.conditions` reads them (:func:`~d2.stages.conditions.list_frames`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from d2.config import ParamsError, get_param, parse_override, with_overrides
from d2.stages import conditions as C
from d2.utils.io import InputError
from d2.utils.paths import UnsafeName, safe_name

MAX_GRID_POINTS = 4096  # a sweep grid larger than this is refused (each point is a whole benchmark)


def check_input(path: str | os.PathLike, params: BaseModel, gt_dir: str | os.PathLike | None = None,
                decode_all: bool = True) -> C.InputFiles:
    """One object's input, checked as the conditions stage reads it (:func:`d2.stages.conditions.check_input`),
    and its ground truth when given (:func:`check_gt`; a folder of frames is the front view)."""
    inp = C.check_input(path, params.conditions, decode_all)
    if gt_dir is not None:
        check_gt(gt_dir, params, inp.path if inp.path.is_dir() else None, inp.kind)
    return inp


# ---------------------------------------------------------------------------------------
# ground truth and datasets


def scored_frames(params: BaseModel, kind: str) -> list[int]:
    """The ground-truth frames scored for an input of ``kind``: the frames the asset will cover
    (its source frames, :func:`d2.stages.conditions.source_frames`), or the protocol's first
    ``num_frames``; refused when the two cannot be paired."""
    from d2.eval.protocol import FramePairingError, frames_to_score

    try:
        return list(frames_to_score(C.source_frames(params.conditions, kind), params.protocol.num_frames))
    except FramePairingError as e:
        raise InputError(str(e)) from None


def check_gt(gt_dir: str | os.PathLike, params: BaseModel, input_dir: str | os.PathLike | None = None,
             kind: str = "video") -> None:
    """One object's ground truth holds every view (``eval_k``) and every frame scored
    (:func:`scored_frames` for an input of ``kind``).

    ``input_dir`` (the object's input frames) is checked too when the protocol scores the
    front view. Images are header-checked (readable, supported mode, not degenerate).
    """
    gt = Path(gt_dir).expanduser()
    prot = params.protocol
    frames = scored_frames(params, kind)
    views = len(prot.eval_azimuths_deg)
    if not gt.is_dir():
        raise InputError(f"{gt}: ground-truth folder not found (expected eval_0..eval_{views - 1}/<i>.png)")
    folders = [(gt / f"eval_{k}", f"protocol.eval_azimuths_deg has {views} views") for k in range(views)]
    if prot.include_front_view:
        if input_dir is None:
            raise InputError(f"{gt}: protocol.include_front_view scores the input frames, which this input lacks "
                             "(give a folder of frames); or set protocol.include_front_view=false")
        folders.append((Path(input_dir), "protocol.include_front_view is true"))
    for folder, why in folders:
        if not folder.is_dir():
            raise InputError(f"{folder}: missing ({why}); add it or change the protocol")
        have = C.list_frames(folder)
        missing = [i for i in frames if i not in have]
        if missing:
            from d2.eval.protocol import span_label

            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            how = "the frames the asset covers" if prot.num_frames is None else "protocol.num_frames"
            raise InputError(f"{folder}: missing frame(s) {shown} of the {len(frames)} scored ({span_label(frames)}: "
                             f"{how}); it has {len(have)}; add them, or lower conditions.num_frames / "
                             f"protocol.num_frames")
        for i in frames:
            C.check_image(have[i])


def dataset_objects(data_dir: str | os.PathLike, only: list[str] | None = None) -> list[str]:
    """The objects of a benchmark dataset (``input/<object>``, each a plain folder name), restricted
    to ``only`` (run.objects); :func:`check_dataset` checks their inputs and ground truth."""
    data = Path(data_dir).expanduser()
    inputs = data / "input"
    if not data.is_dir():
        raise InputError(f"{data}: benchmark dataset not found; create one with `d2 prepare --out {data}`")
    if not inputs.is_dir():
        raise InputError(f"{data}: not a benchmark dataset (no input/ folder); create one with "
                         f"`d2 prepare --out {data}`")
    names = sorted(p.name for p in inputs.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise InputError(f"{inputs}: no object folders; a dataset holds input/<object>/<i>.png")
    if only:
        unknown = [o for o in only if o not in names]
        if unknown:
            raise InputError(f"run.objects names objects not in {inputs}: {', '.join(unknown)} "
                             f"(has: {', '.join(names)})")
        names = [o for o in names if o in only]
    for n in names:
        try:
            safe_name(n, f"object folder {inputs / n}:")
        except UnsafeName as e:
            raise InputError(str(e)) from None
    return names


def check_dataset(data_dir: str | os.PathLike, params: BaseModel, objects: list[str] | None = None) -> list[str]:
    """Every object's input (:func:`check_input`, pixels decoded for the first frame only) and ground
    truth, before the first stage; returns the objects. The :class:`InputError` names the first
    problem and counts the rest. A Consistent4D-sized set is checked in well under a second."""
    data = Path(data_dir).expanduser()
    names = dataset_objects(data, objects if objects is not None else list(params.run.objects))
    problems: list[str] = []
    for o in names:
        try:
            check_input(data / "input" / o, params, data / "gt" / o, decode_all=False)
        except InputError as e:
            problems.append(str(e))
    if problems:
        more = f"\n  and {len(problems) - 1} more: " + "; ".join(problems[1:4]) + \
            (" ..." if len(problems) > 4 else "") if len(problems) > 1 else ""
        raise InputError(f"dataset {data}: {problems[0]}{more}")
    return names


# ---------------------------------------------------------------------------------------
# params that need the environment: priors, devices, weight files


def check_priors(params: BaseModel) -> None:
    """Miniature weights are present, and the priors' resolution is the conditions' (found from
    configs and ``d2_prior.json`` only; nothing is loaded). Backend names are the config's check."""
    from d2.stages.priors import mini_prior_dir, read_prior_meta

    cfg = params.priors
    want = params.conditions.resolution
    for family in ("video", "multiview"):
        name = getattr(cfg, f"{family}_backend") or cfg.backend
        res, where = None, ""
        if name in ("tiny", "gaussian"):
            res, where = getattr(cfg, name).resolution, f"priors.{name}.resolution"
        elif name == "mini":
            folder = mini_prior_dir(cfg, family)
            try:
                meta = read_prior_meta(folder)
            except (ValueError, OSError) as e:
                raise InputError(" ".join(str(e).split())) from None
            if meta is None:
                raise InputError(f"{folder / 'd2_prior.json'}: the miniature {family} prior is missing; train it with "
                                 "`python -m d2.train.priors --out data/priors` or set priors.backend")
            res, where = meta["resolution"], f"the mini {family} prior ({folder})"
        if res is not None and res != want:
            raise InputError(f"{where} is {res} px but conditions.resolution = {want}; set conditions.resolution "
                             f"and sampling.resolution to {res}")


def _check_device(key: str, value: str) -> None:
    import torch

    if value == "auto":
        return
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise InputError(f"{key} = {value!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{key} = {value!r} but CUDA is not available here; set {key}=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{key} = {value!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{key} = {value!r} but MPS is not available here; set {key}=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{key} = {value!r}: device type {dev.type!r} is not supported; use cpu or cuda")


def check_runtime(params: BaseModel, devices: tuple[str, ...], fits: bool, scores: bool) -> list[str]:
    """Torch devices exist; the fit's LPIPS weights exist when it needs them; explicit
    metric weight files exist. Returns warnings (TorchScript files named by the user)."""
    warnings: list[str] = []
    for key in devices:
        value = get_param(params, key)
        if isinstance(value, str):
            _check_device(key, value)
    if fits and params.fit.lambda_lpips > 0 and params.fit.lpips_required:  # else the fit goes without, says fit.json
        from d2.eval.perceptual import _find_file, vgg16_search_paths

        paths = vgg16_search_paths(params.fit.lpips_vgg_weights)
        if _find_file(paths) is None:
            raise InputError(f"fit.lambda_lpips = {params.fit.lambda_lpips:g} with fit.lpips_required needs the "
                             f"VGG16 weights, not found at {', '.join(map(str, paths))}; set "
                             "fit.lpips_vgg_weights=FILE, or fit.lpips_required=false to fit without LPIPS")
    if scores:
        m = params.metrics
        for key, value in (("metrics.clip_weights", m.clip_weights), ("metrics.lpips_vgg_weights", m.lpips_vgg_weights),
                           ("metrics.i3d_weights", m.i3d_weights)):
            if value is None:
                continue
            if not Path(value).expanduser().is_file():
                raise InputError(f"{key} = {value}: file not found; fix the path or set {key}=null to search caches")
            if key == "metrics.i3d_weights" or (key == "metrics.clip_weights" and Path(value).suffix == ".pt"):
                warnings.append(f"{key} ({value}) is loaded with torch.jit.load: a TorchScript file is code that "
                                "runs when loaded; use only a file you trust (prefer .safetensors where the metric "
                                "reads it)")
    return warnings


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``--grid`` axes, e.g. ``['sampling.s0=0.3,0.5', 'fit.iters=10,20']``, as
    ``{'sampling.s0': [0.3, 0.5], 'fit.iters': [10, 20]}`` (values parsed as YAML). A knob given
    twice is refused: the rows would be labelled with one value and run with the other."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"grid axis '{item}' must look like key=v1,v2,...")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            values = [parse_override(f"{key}={v}")[1] for v in raw.split(",") if v.strip() != ""]
        except ParamsError as e:
            raise InputError(f"grid axis '{item}': {e}") from None
        if not values:
            raise InputError(f"grid axis '{item}' has no values")
        if key in grid:
            raise InputError(f"sweep grid: '{key}' given twice; give each knob one --grid axis with all its values")
        grid[key] = values
    return grid


def grid_points(params: BaseModel, grid: dict[str, list[Any]]) -> list[tuple[str, list[str], BaseModel]]:
    """Every point of a sweep grid as (id, overrides, validated params), validated before any compute."""
    keys = list(grid)
    n = math.prod(map(len, grid.values()))
    if n > MAX_GRID_POINTS:
        raise InputError(f"the sweep grid has {n} points (max {MAX_GRID_POINTS}); use fewer values per axis")
    points = []
    for i, combo in enumerate(itertools.product(*grid.values())):
        overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in zip(keys, combo)]
        slug = "_".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
        try:
            point = with_overrides(params, overrides)
        except ParamsError as e:
            raise InputError(f"sweep point {e}") from None  # its message starts with the overrides
        points.append((f"p{i:02d}_" + re.sub(r"[^A-Za-z0-9_.=-]", "-", slug)[:80], overrides, point))
    return points


def check_grid(params: BaseModel, items: list[str]) -> list[BaseModel]:
    """Every point of a sweep grid (``key=v1,v2,...`` axes, as ``d2 sweep --grid``), validated."""
    return [p for _, _, p in grid_points(params, parse_grid(items))]
