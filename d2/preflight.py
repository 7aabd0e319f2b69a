"""What ``d2 <command>`` checks before anything else, in seconds, before the Prefect API server
starts (~7 s): :func:`preflight`. Each problem is one :class:`InputError` line naming the problem
and the fix; every probe answers within :data:`CONNECT_TIMEOUT_S` seconds.

First the params against the inputs, the dataset, the priors and the devices
(:mod:`d2.validation`), then the machine: Prefect's home and result storage, the stage cache,
``--out`` and the MLflow store can be written (a folder not created yet is judged by its nearest
existing parent; nothing is left behind); an MLflow server, a Dask scheduler or a Ray cluster
accepts a connection; free disk and available memory cover the run's images (:func:`estimates`:
an absurd resolution is refused here, not by a failed allocation minutes later); a read-only
cache holds each object's first stage (it only serves hits; a later miss is named by the stage
cache when the run reaches it).

This module sits beside :mod:`d2.cli`, its only caller: it may use the stage cache's keys
(:mod:`d2.execution`), never the flows. :func:`hold_run_folder` takes the run folder's lock before
Prefect starts, so that a second run into the same folder is refused at once.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlparse

from pydantic import BaseModel

from d2 import validation as V
from d2.utils.io import InputError
from d2.utils.paths import RunFolderLocked, UnsafeName, hold_run_lock, safe_name

CONNECT_TIMEOUT_S = 3.0  # how long an MLflow server, a Dask scheduler or a Ray cluster may take to accept
DISK_MARGIN_BYTES = 64 << 20  # free space kept on top of a run's estimated size
PER_OBJECT_BYTES = 4 << 20  # manifests, JSON records, videos and reports of one object (beyond its images)
RUN_COMMANDS = ("generate", "benchmark", "sweep", "demo", "schedule")  # commands that run stages
WRITABLE_OUT = "choose a writable --out folder"


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, what: str, fix: str) -> Path:
    """``path`` (a folder, possibly not created yet) can be created and written; else one line
    ``<what> <path>: <why>; <fix>``. Returns the absolute path."""
    p = Path(os.path.abspath(os.path.expanduser(path)))
    base = _nearest_existing(p)
    try:
        limit = int(os.pathconf(base if base.is_dir() else base.parent, "PC_NAME_MAX"))
    except (OSError, ValueError):
        limit = 255
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise InputError(f"{what} {p}: the name {part[:24]}... is {len(os.fsencode(part))} bytes, over the "
                             f"file system's {limit}-byte limit; {fix}")
    if not base.is_dir():
        raise InputError(f"{what} {p}: {base} is a file, not a folder; {fix}")
    # tried, not asked (os.access passes root on folders it cannot write): the probe is removed at once
    try:
        if base == p:
            fd, probe = tempfile.mkstemp(prefix=".d2-probe-", dir=base)
            os.close(fd)
            os.unlink(probe)
        else:
            first = base / p.relative_to(base).parts[0]
            first.mkdir()
            first.rmdir()
    except OSError as e:
        why = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
               errno.ENOSPC: "no space left", errno.ENOENT: "the file system refuses new entries there",
               }.get(e.errno, e.strerror or type(e).__name__)
        state = "is not writable" if base == p else f"cannot be created in {base}"
        raise InputError(f"{what} {p} {state} ({why}); {fix}") from None
    return p


def unreachable(address: str, default_port: int) -> str | None:
    """None when ``scheme://host:port``, ``host:port`` or ``host`` accepts a TCP connection within
    :data:`CONNECT_TIMEOUT_S` seconds, else why not."""
    address = address.strip()
    try:
        u = urlparse(address if "://" in address else "x://" + address)
        host, port = u.hostname, u.port or default_port
    except ValueError as e:
        return f"not an address ({e})"
    if not host:
        return "no host in the address"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except socket.timeout:
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except socket.gaierror as e:
        return f"unknown host ({e.strerror or e})"
    except OSError as e:
        return e.strerror or type(e).__name__


def check_runner(run: BaseModel) -> None:
    """A Dask scheduler or Ray cluster at ``run.address`` accepts a connection; Ray is installed."""
    if run.runner == "threads":
        return
    if run.address and run.address != "auto":
        default = 8786 if run.runner == "dask" else (10001 if run.address.startswith("ray://") else 6379)
        why = unreachable(run.address, default)
        if why:
            start = "`dask scheduler`" if run.runner == "dask" else "`ray start --head`"
            raise InputError(f"run.address = {run.address}: the {run.runner} cluster is not reachable ({why}); "
                             f"start it ({start}), fix run.address, or set run.address=null for a local cluster")
    import importlib.util

    if run.runner == "ray" and importlib.util.find_spec("prefect_ray") is None:  # optional (prefect-dask is not)
        raise InputError("run.runner = ray needs the ray and prefect-ray packages: pip install -e '.[ray]'; "
                         "or set run.runner=threads")


def check_mlflow() -> None:
    """The MLflow store (``MLFLOW_TRACKING_URI``) can be written (``sqlite:``, ``file:`` or a path)
    or its server accepts a connection (``http(s):``); so can its artifact folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    off = "or set run.mlflow=false"
    scheme = urlparse(uri).scheme.split("+")[0].lower()
    if scheme in ("http", "https"):
        why = unreachable(uri, 443 if scheme == "https" else 80)
        if why:
            raise InputError(f"MLflow server {uri} (MLFLOW_TRACKING_URI) is not reachable ({why}); start it, "
                             f"fix MLFLOW_TRACKING_URI, {off}")
        return
    if scheme == "sqlite":
        path = unquote(uri.split("sqlite://", 1)[1])
        if path in ("", "/", "/:memory:"):
            return
        db = Path(path[1:] if path.startswith("/") else path)
        fix = f"set MLFLOW_TRACKING_URI=sqlite:///WRITABLE/mlflow.db, {off}"
        check_writable(db.parent, f"MLflow store {uri}: the folder", fix)
        try:
            if db.exists():
                open(db, "ab").close()  # tried, not asked, as in check_writable
        except OSError as e:
            raise InputError(f"MLflow store {db} (MLFLOW_TRACKING_URI) is not writable ({e.strerror}); {fix}") from None
    elif scheme in ("file", "") and uri:
        check_writable(unquote(urlparse(uri).path) if scheme == "file" else uri, "MLflow store (MLFLOW_TRACKING_URI)",
                       f"set MLFLOW_TRACKING_URI to a writable store, {off}")
    else:
        return  # no store named, or databricks, postgresql, ...: reached by the client
    if os.environ.get("D2_MLFLOW_ARTIFACTS"):
        check_writable(os.environ["D2_MLFLOW_ARTIFACTS"], "MLflow artifact folder (D2_MLFLOW_ARTIFACTS)",
                       f"set D2_MLFLOW_ARTIFACTS to a writable folder, {off}")


# ---------------------------------------------------------------------------------------
# size estimates


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def estimates(p: BaseModel, command: str) -> list[tuple[int, str, str, bool]]:
    """``(values, knob, what, stored)`` of the largest pixel arrays each stage of ``command`` holds
    at once; ``stored``: one object's stages write it to disk (one byte a value, uncompressed). In
    memory each value is a float32; model weights and small tensors are left out: a lower bound."""
    out: list[tuple[int, str, str, bool]] = []
    if command in RUN_COMMANDS:
        s, r = p.sampling, p.render_eval.resolution or p.protocol.resolution
        frames, views = p.protocol.num_frames or p.conditions.num_frames, len(p.protocol.eval_azimuths_deg) + 1
        out.append((s.num_views * s.num_frames * s.resolution ** 2 * 3, "sampling.resolution",
                    f"the {s.num_views} x {s.num_frames} image matrix at {s.resolution} px", True))
        fit_res = p.fit.resolution or s.resolution
        out.append((s.num_views * s.num_frames * fit_res ** 2 * 3, "fit.resolution" if p.fit.resolution else
                    "sampling.resolution", f"the fit's {s.num_views * s.num_frames} targets at {fit_res} px", False))
        out.append((views * frames * r ** 2 * 4, "render_eval.resolution" if p.render_eval.resolution else
                    "protocol.resolution", f"{views} x {frames} evaluation renders at {r} px", True))
        # 64 float32 a Gaussian on disk; with its gradients and Adam moments in memory
        out.append((p.fit.num_gaussians * 64 * 4, "fit.num_gaussians", f"{p.fit.num_gaussians} Gaussians", True))
    if command in RUN_COMMANDS or command == "evaluate":
        m = p.protocol.resolution
        out.append((2 * p.metrics.batch_size * m ** 2 * 3 * 4, "protocol.resolution",
                    f"scoring batches of {p.metrics.batch_size} images at {m} px", False))
    if command in ("prepare", "demo"):
        q = p.prepare
        out.append((len(q.eval_azimuths_deg) * q.num_frames * q.resolution ** 2 * 8, "prepare.resolution",
                    f"{len(q.eval_azimuths_deg)} x {q.num_frames} benchmark renders at {q.resolution} px", False))
    return out


def available_memory() -> int:
    """Bytes of memory this process may still use (available memory, within a cgroup v2 limit)."""
    import psutil

    avail = int(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return avail


def check_memory(p: BaseModel, command: str, available: int | None = None) -> None:
    """Refuse resolutions and counts whose arrays alone exceed the available memory."""
    avail = available_memory() if available is None else available
    values, knob, what, _ = max(estimates(p, command), key=lambda e: e[0], default=(0, "", "", False))
    if values * 4 > avail:
        raise InputError(f"{what}: about {_gb(values * 4)} of memory, {_gb(avail)} available; lower {knob} "
                         "(or the view / frame counts)")


def check_disk(p: BaseModel, out: Path | None, cache: Path | None, objects: int, points: int = 1) -> None:
    """Free disk under ``out`` and ``cache`` (added up when they share a disk) covers the run's estimate:
    every object's stages, once in each."""
    each = objects * points * (sum(e[0] for e in estimates(p, "benchmark") if e[3]) + PER_OBJECT_BYTES)
    need: dict[int, list] = {}  # device -> [bytes, free, folders]
    for folder, what in ((out, "--out"), (cache, "run.cache_dir")):
        if folder is not None:
            base = _nearest_existing(folder)
            entry = need.setdefault(os.stat(base).st_dev, [0, shutil.disk_usage(base).free, []])
            entry[0] += each
            entry[2].append(f"{what} {folder}")
    for total, free, names in need.values():
        if free < total + DISK_MARGIN_BYTES:
            raise InputError(f"{' and '.join(names)}: {_gb(free)} free on the disk, the run needs about "
                             f"{_gb(total + DISK_MARGIN_BYTES)} ({objects} object(s) x {points} point(s)); free space, "
                             "choose another --out / run.cache_dir, or run fewer objects (run.objects)")


def check_readonly_cache(p: BaseModel, inputs: list[tuple[str, Path]], cache: Path) -> None:
    """A cache this process cannot write only serves hits: each object's first stage (the
    conditions of its input) must be there, verified."""
    from d2.execution import cache as C
    from d2.execution.stages import STAGES

    spec = STAGES.specs["conditions"]
    for obj, src in inputs:
        key, _ = C.stage_key(spec, C.stage_inputs(spec, {"input": src}, p), p)
        record, reason = C.verify_entry(Path(cache) / spec.name / key, full=p.run.verify_cache == "full")
        if record is None or not p.run.use_cache:
            raise InputError(f"the stage cache {cache} is read-only and holds no {spec.name} result for {obj} "
                             f"({reason if p.run.use_cache else 'run.use_cache is false'}); "
                             "point run.cache_dir at a writable folder")


# ---------------------------------------------------------------------------------------
# the d2 command


def preflight(command: str, args: Mapping[str, Any], p: BaseModel) -> list[str]:
    """Everything ``d2 <command>`` checks before it starts (the module docstring); ``args`` are its
    arguments (``vars(argparse.Namespace)``). Returns warnings (one line each); raises
    :class:`InputError` for the first problem."""
    out = Path(args["out"]).expanduser() if args.get("out") else None
    if out is not None and out.is_file():
        raise InputError(f"--out {args['out']} is a file; give a folder")
    if command in ("prepare", "evaluate"):
        for flag in ("pred", "gt") if command == "evaluate" else ():
            if not Path(args[flag]).expanduser().is_dir():
                raise InputError(f"--{flag} {Path(args[flag]).expanduser()}: folder not found")
        warnings = V.check_runtime(p, ("prepare.device" if command == "prepare" else "metrics.device",),
                                   fits=False, scores=command == "evaluate")
        if out is not None or command == "prepare":
            check_writable(out or Path(p.run.data_dir), "--out", WRITABLE_OUT)
        check_memory(p, command)
        return warnings
    if command not in RUN_COMMANDS:
        return []

    # the params against the inputs, the priors and the devices
    V.check_priors(p)
    warnings = V.check_runtime(p, ("priors.device", "fit.device", "render_eval.device", "metrics.device"),
                               fits=True, scores=True)
    objects: list[tuple[str, Path]] = []  # (object, input)
    points = [p]
    data = Path(args.get("data") or p.run.data_dir).expanduser()
    demo_prepares = command == "demo" and not (data / "meta.json").exists()  # the demo writes its dataset first
    if command == "generate":
        src = Path(args["input"]).expanduser()
        warnings += V.check_input(src, p, Path(args["gt"]).expanduser() if args.get("gt") else None).warnings
        try:
            objects = [(safe_name(args.get("name") or src.stem, "--name"), src)]
        except UnsafeName as e:
            raise InputError(str(e)) from None
    elif not demo_prepares:
        if command == "sweep":
            points = V.check_grid(p, list(args.get("grid") or []))
        read: set[str] = set()  # what a point reads of the dataset: checked once
        for q in points:
            if (what := repr((q.conditions, q.protocol, q.run.objects))) not in read:
                read.add(what)
                V.check_dataset(data, q)
            if q is not p:
                V.check_priors(q)
        objects = [(o, data / "input" / o) for o in V.dataset_objects(data, list(p.run.objects))]

    # the machine
    fix = "run d2 from a writable project folder, or set"
    for var, what in (("PREFECT_HOME", "Prefect's state folder"),
                      ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "Prefect's result storage")):
        if os.environ.get(var):
            check_writable(os.environ[var], f"{what} ({var})", f"{fix} {var} to a writable folder")
    if out is not None:
        check_writable(out, "--out", WRITABLE_OUT)
    if demo_prepares:
        check_writable(data, "the demo's dataset folder", "give --data a writable folder, or run d2 from a writable "
                       "project folder")
    cache: Path | None = Path(os.path.abspath(os.path.expanduser(p.run.cache_dir)))
    try:
        check_writable(cache, "the stage cache (run.cache_dir)", "set run.cache_dir to a writable folder")
    except InputError:
        if not cache.is_dir():
            raise
        if command not in ("sweep", "schedule"):  # (a sweep's points: their own keys, checked by the stages)
            check_readonly_cache(p, objects, cache)
        cache = None  # read-only: it may still serve every result the run needs, and needs no room
    if p.run.mlflow:
        check_mlflow()
    check_runner(p.run)
    check_memory(p, command)
    if command == "schedule":
        return warnings
    if demo_prepares:
        from d2.world.benchmark import benchmark_objects

        count = len(p.run.objects or p.prepare.objects or benchmark_objects())
    else:
        count = len(objects)
    check_disk(p, out, cache, count, len(points))
    return warnings


def hold_run_folder(out: str | os.PathLike) -> Path:
    """Create ``out`` and take its run lock for this process, before Prefect starts (the flow adopts
    it), or refuse at once naming the run that holds it."""
    run_dir = Path(out).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        hold_run_lock(run_dir)
    except RunFolderLocked as e:
        raise InputError(str(e)) from None
    return run_dir
