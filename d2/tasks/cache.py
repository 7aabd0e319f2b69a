"""The content-addressed stage cache: keys, entries, verification, locks.

A stage's **key** is the sha256 of

* the content hash of each of its input artifacts (files or folders; paths do not count),
* the params it reads, without the knobs that cannot change a result
  (:data:`d2.config.NO_EFFECT`),
* the version of its code: the source of its ``compute`` wrapper and of its stage modules
  with every ``d2`` module they import (transitively, imports inside functions included;
  :func:`d2.stages.priors.build_prior` names every priors backend, so their modules are in it).

Its **entry** is ``<cache>/<stage>/<key>/``: ``out/`` holds the stage's files, ``done.json``
is written last and records every file's size, mtime and sha256 plus a digest of that list.
A folder without a valid ``done.json`` is never a result (an interrupted or failed attempt:
the next attempt computes in place and may resume from what it left, e.g. a checkpoint).

A hit is **verified** before it is served (:func:`verify_entry`): ``done.json`` parses and its
digest matches its file list, ``out/`` holds exactly those files at those sizes, and files
whose mtime changed hash as recorded (``run.verify_cache: full`` rehashes every file).
Anything else is a miss, recomputed, and the reason is logged.

:func:`run_stage` is the one lookup: it computes the key once, verifies the entry once under
the key's ``flock`` (``<cache>/.locks/<stage>-<key>.lock``), and serves or computes it. The
entry is the only record of a result: nothing else (no Prefect result record) can disagree
with it, and nothing in the cache names a path, so it can be copied, moved or mounted anywhere.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
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
from d2.tasks.progress import set_progress_file
from d2.utils.io import strict_json, write_json

log = logging.getLogger("d2.cache")

RECORD_FORMAT = 2  # version of done.json's layout (older records are misses)
LOCKS = ".locks"  # one flock file per key under the cache root

# ---------------------------------------------------------------------------------------
# Content hashes of artifacts

_hash_memo: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (remembered per process by path, size and mtime)."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        hit = _hash_memo.get(memo_key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _hash_lock:
        _hash_memo[memo_key] = digest
    return digest


def visible_files(folder: Path) -> list[Path]:
    """Files below ``folder`` in sorted order, hidden ones (``.name`` anywhere in the path) left out."""
    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts) and f.is_file():
            out.append(f)
    return out


def listing_digest(files: Mapping[str, str]) -> str:
    """sha256 of a folder's sorted ``relative path -> file sha256`` list (its content hash)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel].encode() + b"\n")
    return h.hexdigest()


def hash_path(path: str | os.PathLike) -> str:
    """Content hash of a file (sha256 of its bytes) or a folder (:func:`listing_digest`).

    A cache entry's ``out/`` folder reads the digest its ``done.json`` recorded (it was
    verified when it was served).
    """
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

_ast_memo: dict[tuple[str, int, int], tuple[bytes, list[str]]] = {}
_top_memo: dict[str, list[Path]] = {}


def _module_file(name: str) -> Path | None:
    """The source file of module ``name``, found without importing it (only its top-level
    package is looked up), so that a cache hit never imports a heavy stage."""
    top, _, rest = name.partition(".")
    if top not in _top_memo:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            _top_memo[top] = []
        elif spec.submodule_search_locations:
            _top_memo[top] = [Path(p) for p in spec.submodule_search_locations]
        elif spec.origin and spec.origin.endswith(".py"):
            _top_memo[top] = [Path(spec.origin)]
        else:
            _top_memo[top] = []
    for base in _top_memo[top]:
        if base.is_file():  # a single-file top-level module
            return base if not rest else None
        parts = rest.split(".") if rest else []
        candidate = base.joinpath(*parts)
        for path in (candidate.with_suffix(".py") if parts else None, candidate / "__init__.py"):
            if path is not None and path.is_file():
                return path
    return None


def _imports_of(name: str, path: Path) -> tuple[bytes, list[str]]:
    """(source bytes, absolute names of the modules it imports anywhere in the file)."""
    st = path.stat()
    memo_key = (str(path), st.st_size, st.st_mtime_ns)
    if memo_key in _ast_memo:
        return _ast_memo[memo_key]
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
    _ast_memo[memo_key] = (src, found)
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


def file_records(out: Path) -> dict[str, list]:
    """``relative path -> [size, mtime_ns, sha256]`` of every visible file below ``out``."""
    recs = {}
    for f in visible_files(out):
        st = f.stat()
        recs[f.relative_to(out).as_posix()] = [st.st_size, st.st_mtime_ns, file_sha256(f)]
    return recs


def verify_entry(entry: Path, full: bool = False) -> tuple[dict | None, str]:
    """``(record, '')`` when ``entry`` holds a complete, unmodified result, else ``(None, reason)``.

    Cheap by default: sizes, the recorded digest, and a rehash of files whose mtime changed;
    ``full`` rehashes every file.
    """
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


def entry_dir(cache_dir: str | os.PathLike, stage: str, key: str) -> Path:
    """``<cache>/<stage>/<key>``: where a stage's entry lives under the cache root in use."""
    return Path(cache_dir) / stage / key


def store_dir(cache_dir: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    """The ``out/`` folder of a stage result (:func:`result_from_record`) under ``cache_dir``.

    Results name no path: the cache root is the one this run uses, so a cache that was copied,
    moved or mounted at another path serves its files from where it is now.
    """
    return entry_dir(cache_dir, result["stage"], result["key"]) / "out"


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
    probe = folder if folder.exists() else folder.parent
    return os.access(probe, os.W_OK)


@contextlib.contextmanager
def key_lock(cache_dir: Path, name: str) -> Iterator[None]:
    """Hold ``<cache>/.locks/<name>.lock`` exclusively while the block runs.

    ``flock`` excludes other threads, processes and machines (on filesystems with working
    ``flock``, e.g. NFSv4); the kernel drops it when its process dies, so a killed worker
    never leaves a key locked.
    """
    path = cache_dir / LOCKS / f"{name}.lock"
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
    computing stage reports its progress to ``progress_path`` (:mod:`d2.tasks.progress`).

    Returns :func:`result_from_record`'s dict (status ``computed`` or ``cached``).
    """
    cache_dir = Path(cache_dir)
    paths = stage_inputs(spec, inputs, params)
    key, ingredients = stage_key(spec, paths, params)
    entry = entry_dir(cache_dir, spec.name, key)
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


def _remove_if_empty(*folders: Path) -> None:
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()


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
    except Exception as e:
        with contextlib.suppress(OSError, ValueError):
            earlier = json.loads(attempts_log.read_text()) if attempts_log.exists() else []
            write_json(attempts_log, earlier + [f"{type(e).__name__}: {e}"])
        _remove_if_empty(out, entry)
        raise
    except BaseException:
        _remove_if_empty(out, entry)
        raise
    finally:
        set_progress_file(None)
    failed: list[str] = []
    with contextlib.suppress(OSError, ValueError):
        failed = json.loads(attempts_log.read_text())
        attempts_log.unlink()
    record = {"format": RECORD_FORMAT, "stage": spec.name, "object": obj, "key": key, "ingredients": ingredients,
              "compute_seconds": round(time.perf_counter() - tc, 4),
              "info": strict_json(json.loads(json.dumps(info, default=str))), "files": file_records(out),
              "failed_attempts": failed}
    record["content_hash"] = listing_digest({k: v[2] for k, v in record["files"].items()})
    write_json(entry / "done.json", record)
    return result_from_record(record, "computed")
