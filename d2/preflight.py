"""What ``d2 <command>`` checks before anything else: :func:`preflight`, in seconds, before the
Prefect API server starts (~7 s).

First the params against the inputs, the dataset, the priors and the devices
(:mod:`d2.validation`), then the machine. Each problem is one :class:`InputError` line naming
the problem and the fix; every probe answers within :data:`CONNECT_TIMEOUT_S` seconds:

* Prefect's home (``PREFECT_HOME``, the project's ``.prefect/``) and its result storage, the
  stage cache (``run.cache_dir``), ``--out``, and the MLflow store (a ``sqlite:`` or ``file:``
  store and the artifact folder ``D2_MLFLOW_ARTIFACTS``) can be written; an ``http(s)``
  MLflow server accepts a connection. A folder that does not exist yet is judged by its nearest
  existing parent; nothing is left behind (a probe file, or the first missing folder, is created
  and removed at once).
* Path components fit the file system's name limit; ``--name`` is a plain name of at most 128 bytes.
* Free disk under ``--out`` and the cache covers the run's estimated size (every object's
  stages in each, :func:`estimate_object_bytes`), and available memory covers the largest
  stage (:func:`estimate_peak_memory`): an absurd resolution or count is refused here, not by
  a failed allocation minutes later.
* A Dask scheduler or Ray cluster named by ``run.address`` accepts a connection.
* A read-only cache that lacks a result the run needs is refused (such a cache only serves hits).

:func:`hold_run_folder` then takes the run folder's lock, so that a second run into the same
folder is refused at once, even while the first is still starting Prefect; the flow adopts that
lock (:func:`d2.utils.paths.adopt_run_folder_lock`).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlparse

from pydantic import BaseModel

from d2 import validation as V
from d2.utils.io import InputError
from d2.utils.paths import RunFolderLocked, UnsafeName, hold_run_lock, safe_name

CONNECT_TIMEOUT_S = 3.0  # how long an MLflow server, a Dask scheduler or a Ray cluster may take to accept
DISK_MARGIN_BYTES = 64 << 20  # free space kept on top of a run's estimated size
PER_OBJECT_BYTES = 4 << 20  # manifests, JSON records, videos and reports of one object (beyond its images)
FLOAT = 4  # bytes of a float32
RUN_COMMANDS = ("generate", "benchmark", "sweep", "demo", "schedule")  # commands that run stages
GENERATION_DEVICES = ("priors.device", "fit.device", "render_eval.device", "metrics.device")  # what they run on
WRITABLE_OUT = "choose a writable --out folder"


# ---------------------------------------------------------------------------------------
# folders


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _reason(e: OSError) -> str:
    return {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
            errno.ENOSPC: "no space left", errno.ENAMETOOLONG: "name too long",
            errno.ENOENT: "the file system refuses new entries there"}.get(e.errno, e.strerror or type(e).__name__)


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
        if base == p:
            raise InputError(f"{what} {p} is not writable ({_reason(e)}); {fix}") from None
        raise InputError(f"{what} {p} cannot be created in {base} ({_reason(e)}); {fix}") from None
    return p


def check_state_folders() -> None:
    """Prefect's home and result storage (the project's ``.prefect/``) can be written."""
    home = os.environ.get("PREFECT_HOME")
    fix = "run d2 from a writable project folder, or set PREFECT_HOME to a writable folder"
    if home:
        check_writable(home, "Prefect's state folder (PREFECT_HOME)", fix)
    storage = os.environ.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH")
    if storage:
        check_writable(storage, "Prefect's result storage (PREFECT_RESULTS_LOCAL_STORAGE_PATH)",
                       "run d2 from a writable project folder, or set PREFECT_RESULTS_LOCAL_STORAGE_PATH")


# ---------------------------------------------------------------------------------------
# network


def _host_port(address: str, default_port: int) -> tuple[str, int] | None:
    """``(host, port)`` of ``scheme://host:port``, ``host:port`` or ``host``; None when there is none."""
    text = address.strip()
    if "://" not in text:
        text = "x://" + text
    u = urlparse(text)
    if not u.hostname:
        return None
    try:
        port = u.port or default_port
    except ValueError:
        return None
    return u.hostname, port


def reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when ``host:port`` accepts a TCP connection within ``timeout`` seconds, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except socket.gaierror as e:
        return f"unknown host ({e.strerror or e})"
    except OSError as e:
        return e.strerror or type(e).__name__


def check_runner(params: BaseModel) -> None:
    """A Dask scheduler or Ray cluster at ``run.address`` accepts a connection, and the runner's
    package is installed."""
    run = params.run
    if run.runner == "threads":
        return
    if run.address and run.address != "auto":
        default = 8786 if run.runner == "dask" else (10001 if run.address.startswith("ray://") else 6379)
        hp = _host_port(run.address, default)
        if hp is None:
            raise InputError(f"run.address = {run.address!r} is not an address like "
                             f"{'tcp://host:8786' if run.runner == 'dask' else 'ray://host:10001'}")
        why = reachable(*hp)
        if why:
            start = "`dask scheduler`" if run.runner == "dask" else "`ray start --head`"
            raise InputError(f"run.address = {run.address}: the {run.runner} cluster is not reachable ({why}); "
                             f"start it ({start}), fix run.address, or set run.address=null for a local cluster")
    import importlib.util

    need = {"dask": ("distributed", "prefect_dask", "pip install prefect-dask"),
            "ray": ("ray", "prefect_ray", "pip install -e '.[ray]' (ray, prefect-ray)")}[run.runner]
    for module in need[:2]:
        if importlib.util.find_spec(module) is None:
            raise InputError(f"run.runner = {run.runner} needs the {module} package: {need[2]}; "
                             "or set run.runner=threads")


# ---------------------------------------------------------------------------------------
# MLflow


def check_mlflow(params: BaseModel) -> None:
    """The MLflow store can be written (``sqlite:``, ``file:`` or a path) or its server accepts a
    connection (``http(s):``); the experiment's artifact folder can be written."""
    if not params.run.mlflow:
        return
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    off = "or set run.mlflow=false"
    if not uri:
        return
    u = urlparse(uri)
    scheme = u.scheme.split("+")[0].lower()
    if scheme in ("http", "https"):
        hp = _host_port(uri, 443 if scheme == "https" else 80)
        why = reachable(*hp) if hp else "no host in the URI"
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
        if db.exists():
            try:
                with open(db, "ab"):
                    pass
            except OSError as e:
                raise InputError(f"MLflow store {db} (MLFLOW_TRACKING_URI) is not writable: {_reason(e)}; "
                                 f"{fix}") from None
    elif scheme in ("file", ""):
        path = unquote(u.path) if scheme == "file" else uri
        check_writable(path, "MLflow store (MLFLOW_TRACKING_URI)",
                       f"set MLFLOW_TRACKING_URI to a writable store, {off}")
    else:
        return  # databricks, postgresql, ...: reached by the client
    artifacts = os.environ.get("D2_MLFLOW_ARTIFACTS")
    if artifacts:
        check_writable(artifacts, "MLflow artifact folder (D2_MLFLOW_ARTIFACTS)",
                       f"set D2_MLFLOW_ARTIFACTS to a writable folder, {off}")


# ---------------------------------------------------------------------------------------
# size estimates


def _gb(n: float) -> str:
    if n >= 1e12:
        return f"{n / 1e12:,.0f} TB"
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _eval_frames(p: BaseModel) -> int:
    return p.protocol.num_frames or p.conditions.num_frames


def _render_res(p: BaseModel) -> int:
    return p.render_eval.resolution or p.protocol.resolution


def estimate_object_bytes(p: BaseModel) -> int:
    """Disk bytes one object's stages write (uncompressed pixels: PNG only makes them smaller)."""
    s = p.sampling
    matrix = s.num_views * s.num_frames * s.resolution ** 2 * 3
    views = len(p.protocol.eval_azimuths_deg) + 1
    renders = views * _eval_frames(p) * _render_res(p) ** 2 * 4
    gaussians = p.fit.num_gaussians * 64 * FLOAT
    return matrix + renders + gaussians + PER_OBJECT_BYTES


def estimate_peak_memory(p: BaseModel, command: str) -> list[tuple[int, str, str]]:
    """``(bytes, knob, what)`` of the largest arrays each stage of ``command`` holds at once
    (float32 pixels; model weights and small tensors left out: a lower bound)."""
    out: list[tuple[int, str, str]] = []
    if command in RUN_COMMANDS:
        s = p.sampling
        vf = s.num_views * s.num_frames
        out.append((vf * s.resolution ** 2 * 3 * FLOAT, "sampling.resolution",
                    f"the {s.num_views} x {s.num_frames} image matrix at {s.resolution} px"))
        fit_res = p.fit.resolution or s.resolution
        out.append((vf * fit_res ** 2 * 3 * FLOAT, "fit.resolution" if p.fit.resolution else "sampling.resolution",
                    f"the fit's {vf} targets at {fit_res} px"))
        r = _render_res(p)
        views = len(p.protocol.eval_azimuths_deg) + 1
        out.append((views * _eval_frames(p) * r ** 2 * 4 * FLOAT,
                    "render_eval.resolution" if p.render_eval.resolution else "protocol.resolution",
                    f"{views} x {_eval_frames(p)} evaluation renders at {r} px"))
    if command in RUN_COMMANDS or command == "evaluate":
        m = p.protocol.resolution
        out.append((2 * p.metrics.batch_size * m ** 2 * 3 * FLOAT * 4, "protocol.resolution",
                    f"scoring batches of {p.metrics.batch_size} images at {m} px"))
    if command in ("prepare", "demo"):
        q = p.prepare
        out.append((len(q.eval_azimuths_deg) * q.num_frames * q.resolution ** 2 * 4 * FLOAT * 2, "prepare.resolution",
                    f"{len(q.eval_azimuths_deg)} x {q.num_frames} benchmark renders at {q.resolution} px"))
    return out


def available_memory() -> int | None:
    """Bytes of memory this process may still use (``MemAvailable``, within a cgroup limit); None if unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001  (unknown: no memory check)
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def check_memory(p: BaseModel, command: str, available: int | None = None) -> None:
    """Refuse resolutions and counts whose arrays alone exceed the available memory."""
    avail = available_memory() if available is None else available
    if avail is None:
        return
    need, knob, what = max(estimate_peak_memory(p, command), key=lambda e: e[0], default=(0, "", ""))
    if need > avail:
        raise InputError(f"{what}: about {_gb(need)} of memory, {_gb(avail)} available; lower {knob} "
                         "(or the view / frame counts)")


def check_disk(p: BaseModel, out: Path | None, cache: Path | None, objects: int, points: int = 1) -> None:
    """Free disk under ``out`` and ``cache`` (added up when they share a disk) covers the run's estimate:
    every object's stages, once in each."""
    each = objects * points * estimate_object_bytes(p)
    need: dict[int, list] = {}
    for folder, what in ((out, "--out"), (cache, "run.cache_dir")):
        if folder is None:
            continue
        base = _nearest_existing(folder)
        try:
            dev = os.stat(base).st_dev
            free = shutil.disk_usage(base).free
        except OSError:
            continue
        entry = need.setdefault(dev, [0, free, []])
        entry[0] += each
        entry[2].append(f"{what} {folder}")
    for total, free, names in need.values():
        if free < total + DISK_MARGIN_BYTES:
            raise InputError(f"{' and '.join(names)}: {_gb(free)} free on the disk, the run needs about "
                             f"{_gb(total + DISK_MARGIN_BYTES)} ({objects} object(s) x {points} point(s)); free space, "
                             "choose another --out / run.cache_dir, or run fewer objects (run.objects)")


# ---------------------------------------------------------------------------------------
# a read-only cache


def check_readonly_cache(p: BaseModel, inputs: Iterable[tuple[str, Path, Path | None]], cache: Path) -> None:
    """When ``cache`` cannot be written, every object's stages must be served from it: walk each
    object's graph through the cache keys and refuse at the first missing result."""
    from d2.flows.asset import object_graph
    from d2.tasks import cache as C
    from d2.tasks.stages import STAGES

    for obj, src, gt in inputs:
        graph = object_graph(p, src, gt)
        value = None
        while True:
            try:
                stage = graph.send(value) if value is not None else next(graph)
            except StopIteration:
                break
            spec = STAGES.specs[stage.name]
            key, _ = C.stage_key(spec, C.stage_inputs(spec, stage.inputs, p), p)
            entry = cache / spec.name / key
            record, reason = C.verify_entry(entry, full=p.run.verify_cache == "full")
            if record is None or not p.run.use_cache:
                why = reason if p.run.use_cache else "run.use_cache is false"
                raise InputError(f"the stage cache {cache} is read-only and holds no {spec.name} result for {obj} "
                                 f"({why}); point run.cache_dir at a writable folder")
            value = str(entry / "out")


# ---------------------------------------------------------------------------------------
# the d2 command


def preflight(command: str, args: Mapping[str, Any], p: BaseModel) -> list[str]:
    """Everything ``d2 <command>`` checks before it starts (the module docstring); ``args`` are its
    arguments (``vars(argparse.Namespace)``). Returns warnings (one line each); raises
    :class:`InputError` for the first problem."""
    out = Path(args["out"]).expanduser() if args.get("out") else None
    if out is not None and out.is_file():
        raise InputError(f"--out {args['out']} is a file; give a folder")
    if command == "prepare":
        warnings = V.check_runtime(p, ("prepare.device",), fits=False, scores=False)
        check_writable(out or Path(p.run.data_dir), "--out", WRITABLE_OUT)
        check_memory(p, command)
        return warnings
    if command == "evaluate":
        for flag in ("pred", "gt"):
            if not Path(args[flag]).expanduser().is_dir():
                raise InputError(f"--{flag} {Path(args[flag]).expanduser()}: folder not found")
        warnings = V.check_runtime(p, ("metrics.device",), fits=False, scores=True)
        if out is not None:
            check_writable(out, "--out", WRITABLE_OUT)
        check_memory(p, command)
        return warnings
    if command not in RUN_COMMANDS:
        return []

    # the params against the inputs, the priors and the devices
    V.check_priors(p)
    warnings = V.check_runtime(p, GENERATION_DEVICES, fits=True, scores=True)
    objects: list[tuple[str, Path, Path | None]] = []  # (object, input, ground truth)
    points = [p]
    data = Path(args.get("data") or p.run.data_dir).expanduser()
    demo_prepares = command == "demo" and not (data / "meta.json").exists()  # the demo writes its dataset first
    if command == "generate":
        src = Path(args["input"]).expanduser()
        gt = Path(args["gt"]).expanduser() if args.get("gt") else None
        warnings += V.check_input(src, p, gt).warnings
        try:
            objects = [(safe_name(args.get("name") or src.stem, "--name"), src, gt)]
        except UnsafeName as e:
            raise InputError(str(e)) from None
    elif not demo_prepares:
        if command == "sweep":
            points = V.check_grid(p, list(args.get("grid") or []))
        checked: set[str] = set()  # what a point reads of the dataset: checked once
        for q in points:
            key = repr((q.conditions, q.protocol, q.run.objects))
            if key not in checked:
                checked.add(key)
                V.check_dataset(data, q)
            if q is not p:
                V.check_priors(q)
        objects = [(o, data / "input" / o, data / "gt" / o) for o in V.dataset_objects(data, list(p.run.objects))]

    # the machine
    check_state_folders()
    if out is not None:
        check_writable(out, "--out", WRITABLE_OUT)
    if demo_prepares:
        check_writable(data, "the demo's dataset folder", "give --data a writable folder, or run d2 from a writable "
                       "project folder")
    cache = Path(os.path.abspath(os.path.expanduser(p.run.cache_dir)))
    try:
        check_writable(cache, "the stage cache (run.cache_dir)", "set run.cache_dir to a writable folder")
        cache_ok = True
    except InputError:
        if not cache.is_dir():
            raise
        cache_ok = False  # a read-only cache: it may still serve every result the run needs
    check_mlflow(p)
    check_runner(p)
    check_memory(p, command)
    if command == "schedule":
        return warnings
    if demo_prepares:
        from d2.world.benchmark import benchmark_objects

        count = len(p.run.objects or p.prepare.objects or benchmark_objects())
    else:
        count = len(objects)
    check_disk(p, out, cache if cache_ok else None, count, len(points))
    if not cache_ok and command != "sweep":  # (a sweep's points: their own keys, checked by the stages)
        check_readonly_cache(p, objects, cache)
    return warnings


def hold_run_folder(out: str | os.PathLike) -> Path:
    """Create ``out`` and take its run lock for this process, before Prefect starts (the flow adopts
    it, :func:`d2.utils.paths.adopt_run_folder_lock`), or refuse at once naming the run that holds it."""
    run_dir = Path(out).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        hold_run_lock(run_dir)
    except RunFolderLocked as e:
        raise InputError(str(e)) from None
    return run_dir
