"""The content-addressed stage cache: keys, entries, verification, locks.

A stage's **key** hashes the content of its input artifacts (not their paths), the params it
reads (less :data:`d2.config.NO_EFFECT`) and its code: the source of its ``compute`` wrapper
and of every ``d2`` module its stage modules import, transitively (imports inside functions too).

Its **entry** is ``<cache>/<stage>/<key>/``: ``out/`` holds the files and ``done.json``, written
last, records each file's size, mtime and sha256 and a digest of that list. A folder without a
valid ``done.json`` is an unfinished attempt (the next one computes in place and may resume).
A hit is verified before it is served (:func:`verify_entry`); anything else is a logged miss.

:func:`run_stage` is the one lookup: key once, verify once under the key's ``flock``, serve or
compute. The entry is the only record of a result and names no path, so the cache can be
copied, moved or mounted anywhere.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pydantic import BaseModel

from d2.config import NO_EFFECT, params_subset_hash
from d2.execution.progress import set_progress_file
from d2.utils.io import strict_json, write_json

log = logging.getLogger("d2.cache")

RECORD_FORMAT = 2  # version of done.json's layout (older records are misses)

# ---------------------------------------------------------------------------------------
# Content hashes of artifacts


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (remembered per process by path, size and mtime)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def visible_files(folder: Path) -> list[Path]:
    """Files below ``folder`` in sorted order, hidden ones (``.name`` anywhere in the path) left out."""
    return [f for f in sorted(folder.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def listing_digest(files: Mapping[str, str]) -> str:
    """sha256 of a folder's sorted ``relative path -> file sha256`` list (its content hash)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel].encode() + b"\n")
    return h.hexdigest()


def hash_path(path: str | os.PathLike) -> str:
    """Content hash of a file (sha256 of its bytes) or a folder (:func:`listing_digest`); a cache
    entry's ``out/`` reads the digest its ``done.json`` recorded (verified when it was served)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input artifact not found: {p}")
    if p.is_file():
        return file_sha256(p)
    if p.name == "out":
        try:
            record = json.loads((p.parent / "done.json").read_text())
            if record.get("format") == RECORD_FORMAT:
                return str(record["content_hash"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return listing_digest({f.relative_to(p).as_posix(): file_sha256(f) for f in visible_files(p)})


# ---------------------------------------------------------------------------------------
# Code versions


@functools.lru_cache(maxsize=None)
def _package_dirs(top: str) -> tuple[Path, ...]:
    """Where top-level package ``top`` lives (found without importing it), or nothing."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return ()
    return tuple(Path(p) for p in spec.submodule_search_locations or ()) if spec is not None else ()


def _module_file(name: str) -> Path | None:
    """The source file of module ``name``, found without importing it, so that a cache hit never
    imports a heavy stage."""
    top, _, rest = name.partition(".")
    for base in _package_dirs(top):
        candidate = base.joinpath(*rest.split(".")) if rest else base
        for path in (candidate.with_suffix(".py") if rest else None, candidate / "__init__.py"):
            if path is not None and path.is_file():
                return path
    return None


def _imports_of(name: str, path: Path) -> tuple[bytes, list[str]]:
    """(source bytes, absolute names of the modules it imports anywhere in the file)."""
    st = path.stat()
    with _PARSE_LOCK:  # CPython 3.11's ast.parse is not safe in two threads at once (SystemError)
        return _parse(name, path, st.st_size, st.st_mtime_ns)


_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _parse(name: str, path: Path, size: int, mtime_ns: int) -> tuple[bytes, list[str]]:
    src = path.read_bytes()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts)
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.append(mod)
            found += [f"{mod}.{a.name}" for a in node.names]  # `from pkg import module`
    return src, found


def module_closure(roots: list[str]) -> dict[str, Path]:
    """The modules ``roots`` import transitively, within their own top-level packages and d2."""
    packages = {r.split(".")[0] for r in roots} | {"d2"}
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in packages:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        _, imported = _imports_of(name, path)
        todo += imported
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
    return seen


def code_version(modules: list[str], functions: list[Callable] = ()) -> str:
    """sha256 over the source of ``modules``' import closure and of ``functions``."""
    h = hashlib.sha256()
    closure = module_closure(list(modules))
    missing = [m for m in modules if m not in closure]
    if missing:
        raise ImportError(f"stage code not found: {', '.join(missing)}")
    for name in sorted(closure):
        src, _ = _imports_of(name, closure[name])
        h.update(name.encode() + b"\0" + hashlib.sha256(src).hexdigest().encode() + b"\n")
    for fn in functions:
        h.update(b"fn\0" + inspect.getsource(fn).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Stages and their keys


@dataclass(frozen=True)
class StageSpec:
    """A stage as the cache sees it. Pickles by reference (its functions live in modules)."""

    name: str  # stage name (folder name in the cache and in run folders)
    compute: Callable[[dict[str, Path], Path, BaseModel], dict | None]  # (inputs, out_dir, params) -> info
    modules: tuple[str, ...]  # the stage's modules: their import closures (and compute's source) version it
    params_keys: tuple[str, ...]  # dotted params keys the stage reads
    extra_inputs: Callable[[BaseModel], dict[str, Path]] | None = None  # params -> more input artifacts (weights)
    device_key: str | None = None  # dotted params key of the torch device it computes on ('fit.device')


def stage_inputs(spec: StageSpec, inputs: Mapping[str, str | os.PathLike], params: BaseModel) -> dict[str, Path]:
    """The stage's inputs with its extra inputs (weights), as paths."""
    out = {k: Path(v) for k, v in inputs.items()}
    if spec.extra_inputs is not None:
        out.update({f"extra:{k}": Path(v) for k, v in spec.extra_inputs(params).items()})
    return out


def stage_key(spec: StageSpec, inputs: Mapping[str, str | os.PathLike], params: BaseModel) -> tuple[str, dict]:
    """(cache key, its ingredients) of ``spec`` on ``inputs`` (extra inputs included) under ``params``."""
    functions: list[Callable] = [spec.compute] + ([spec.extra_inputs] if spec.extra_inputs else [])
    ingredients = {
        "stage": spec.name,
        "code": code_version(list(spec.modules), functions),
        "params": params_subset_hash(params, spec.params_keys, NO_EFFECT),
        "inputs": {name: hash_path(p) for name, p in sorted(inputs.items())},
    }
    blob = json.dumps(ingredients, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), ingredients


# ---------------------------------------------------------------------------------------
# Entries


def verify_entry(entry: Path, full: bool = False) -> tuple[dict | None, str]:
    """``(record, '')`` when ``entry`` holds a complete, unmodified result, else ``(None, reason)``:
    sizes, the recorded digest, and a rehash of files whose mtime changed (``full``: of every file)."""
    done = entry / "done.json"
    if not done.exists():
        return None, "no result yet" if not entry.exists() else f"no done.json in {entry} (an unfinished attempt)"
    try:
        record = json.loads(done.read_text())
        files: dict[str, list] = record["files"]
        if record.get("format") != RECORD_FORMAT:
            return None, f"{done}: record format {record.get('format')!r}, expected {RECORD_FORMAT}"
        if listing_digest({k: v[2] for k, v in files.items()}) != record["content_hash"]:
            return None, f"{done}: its file list does not match its digest"
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return None, f"{done} is unreadable ({type(e).__name__}: {e})"
    out = entry / "out"
    present = {f.relative_to(out).as_posix(): f for f in visible_files(out)} if out.is_dir() else {}
    if set(present) != set(files):
        missing = sorted(set(files) - set(present))
        extra = sorted(set(present) - set(files))
        return None, f"{out}: files differ from the record (missing {missing[:3]}, unexpected {extra[:3]})"
    for rel, (size, mtime_ns, sha) in files.items():
        st = present[rel].stat()
        if st.st_size != size:
            return None, f"{out / rel}: {st.st_size} bytes, recorded {size}"
        if (full or st.st_mtime_ns != mtime_ns) and file_sha256(present[rel]) != sha:
            return None, f"{out / rel}: content changed since it was stored"
    return record, ""


def store_dir(cache_dir: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """The ``out/`` folder of a stage result (:func:`result_from_record`) under the cache root this
    run uses (a cache copied, moved or mounted elsewhere serves its files from where it is now)."""
    return Path(cache_dir) / result["stage"] / result["key"] / "out"


def result_from_record(record: dict, status: str) -> dict[str, Any]:
    """The small JSON result of a stage execution (what the Prefect task returns). It holds no
    path: :func:`store_dir` locates its files."""
    return {"stage": record["stage"], "key": record["key"], "status": status,
            "compute_seconds": float(record["compute_seconds"]),
            "outputs": sorted(record["files"]), "content_hash": record["content_hash"],
            "info": record.get("info", {}),
            "failed_attempts": record.get("failed_attempts", []) if status == "computed" else []}


def cache_writable(folder: Path) -> bool:
    """Whether this process may write into the cache root (a read-only cache only serves hits)."""
    return os.access(folder if folder.exists() else folder.parent, os.W_OK)


@contextlib.contextmanager
def key_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Hold ``<cache>/.locks/<name>.lock`` exclusively while the block runs: ``flock`` excludes other
    threads, processes and machines (where ``flock`` works, e.g. NFSv4), and dies with its process."""
    path = cache_dir / ".locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the file drops its lock


def run_stage(spec: StageSpec, obj: str, inputs: Mapping[str, str | os.PathLike], params: BaseModel,
              cache_dir: str | os.PathLike, progress_path: Path | None = None) -> dict[str, Any]:
    """Serve ``spec``'s verified entry for ``inputs`` under ``params``, or compute it into the cache.

    The key is computed once and the entry verified once, under the key's lock: of two workers
    that need one key, one computes and the other then serves what it stored. ``run.use_cache:
    false`` recomputes; a read-only cache serves verified hits and names itself on a miss. A
    computing stage reports its progress to ``progress_path`` (:mod:`d2.execution.progress`).

    Returns :func:`result_from_record`'s dict (status ``computed`` or ``cached``).
    """
    cache_dir = Path(cache_dir)
    paths = stage_inputs(spec, inputs, params)
    key, ingredients = stage_key(spec, paths, params)
    entry = cache_dir / spec.name / key
    writable = cache_writable(cache_dir)
    with key_lock(cache_dir, f"{spec.name}-{key}") if writable else contextlib.nullcontext():
        if params.run.use_cache:
            record, reason = verify_entry(entry, full=params.run.verify_cache == "full")
            if record is not None:
                return result_from_record(record, "cached")
        else:
            reason = "run.use_cache is false"
        if not writable:
            raise PermissionError(f"the stage cache {cache_dir} is read-only and holds no valid {spec.name} result "
                                  f"for key {key[:12]} ({reason}); point run.cache_dir at a writable folder")
        if (entry / "done.json").exists() or not params.run.use_cache:  # a stale or refused result: start over
            if params.run.use_cache:
                log.warning("cache miss for %s[%s]: %s; recomputing", spec.name, obj, reason)
            shutil.rmtree(entry, ignore_errors=True)
        return _compute(spec, obj, paths, params, entry, key, ingredients, progress_path)


def _compute(spec: StageSpec, obj: str, paths: dict[str, Path], params: BaseModel, entry: Path, key: str,
             ingredients: dict, progress_path: Path | None) -> dict[str, Any]:
    """Compute a stage into ``entry/out`` (resuming from what a failed attempt left there) and
    write ``done.json`` last. A failed attempt leaves no empty folder and is remembered for the
    attempt that succeeds (retries)."""
    out = entry / "out"
    out.mkdir(parents=True, exist_ok=True)
    attempts_log = entry / "failed_attempts.json"
    if params.run.threads_per_task:  # the same thread count wherever it runs: CPU kernels' float sums depend on it
        import torch

        torch.set_num_threads(params.run.threads_per_task)
    tc = time.perf_counter()
    set_progress_file(progress_path)
    try:
        info = spec.compute(paths, out, params) or {}
    except BaseException as e:
        if isinstance(e, Exception):
            with contextlib.suppress(OSError, ValueError):
                earlier = json.loads(attempts_log.read_text()) if attempts_log.exists() else []
                write_json(attempts_log, earlier + [f"{type(e).__name__}: {e}"])
        for d in (out, entry):  # no empty folder left behind
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        set_progress_file(None)
    failed: list[str] = []
    with contextlib.suppress(OSError, ValueError):
        failed = json.loads(attempts_log.read_text())
        attempts_log.unlink()
    record = {"format": RECORD_FORMAT, "stage": spec.name, "object": obj, "key": key, "ingredients": ingredients,
              "compute_seconds": round(time.perf_counter() - tc, 4),
              "info": strict_json(json.loads(json.dumps(info, default=str))), "failed_attempts": failed,
              "files": {f.relative_to(out).as_posix(): [f.stat().st_size, f.stat().st_mtime_ns, file_sha256(f)]
                        for f in visible_files(out)}}  # what verify_entry checks
    record["content_hash"] = listing_digest({k: v[2] for k, v in record["files"].items()})
    write_json(entry / "done.json", record)
    return result_from_record(record, "computed")
