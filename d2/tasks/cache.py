"""The content-addressed stage cache.

A stage's cache key is the sha256 of

* the content hash of each of its input artifacts (files or folders; paths do not count),
* the subset of params it reads (``params_subset_hash``),
* the version of its code: the source of its modules and of every module of the same
  top-level package they import (transitively, imports inside functions included), plus
  the source of the stage's wrapper function.

Results live in ``<cache_dir>/<stage>/<key>/`` (``out/`` holds the stage's files,
``done.json`` is written last, so a folder without it is an interrupted computation: it is
computed again in place, and a stage may resume from what it left, e.g. a checkpoint). A stage always computes into that same folder, so paths a stage records in
its outputs are the same on every machine run, and downstream keys stay stable. Runs see
the results as hard-linked copies under their own output folder.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from pydantic import BaseModel

from d2.config import params_subset_hash
from d2.utils.io import write_json

# ---------------------------------------------------------------------------------------
# Content hashes of artifacts

_hash_memo: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


BIG_FILE = 32 << 20  # files at least this large (model weights) get their hash remembered on disk


def _file_hash(path: Path, memo_dir: Path | None = None) -> str:
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        hit = _hash_memo.get(memo_key)
    if hit is not None:
        return hit
    disk = None
    if memo_dir is not None and st.st_size >= BIG_FILE:
        disk = memo_dir / (hashlib.sha1(memo_key[0].encode()).hexdigest() + ".json")
        try:
            rec = json.loads(disk.read_text())
            if (rec["size"], rec["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
                with _hash_lock:
                    _hash_memo[memo_key] = rec["sha256"]
                return rec["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _hash_lock:
        _hash_memo[memo_key] = digest
    if disk is not None:
        write_json(disk, {"path": memo_key[0], "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return digest


def hash_path(path: str | os.PathLike, memo_dir: Path | None = None) -> str:
    """sha256 of a file's bytes, or of a folder's sorted (relative path, file hash) list.

    A cache entry's ``out/`` folder is hashed once when stored (read back from its
    ``done.json``). Hidden files (``.name``) are ignored.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input artifact not found: {p}")
    if p.is_file():
        return _file_hash(p, memo_dir)
    done = p.parent / "done.json"
    if p.name == "out" and done.exists():
        try:
            return json.loads(done.read_text())["content_hash"]
        except (KeyError, ValueError):
            pass
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        h.update(rel.as_posix().encode() + b"\0" + _file_hash(f, memo_dir).encode() + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Code versions


_ast_memo: dict[tuple[str, int, int], tuple[bytes, list[str]]] = {}


_top_memo: dict[str, list[Path]] = {}


def _module_file(name: str) -> Path | None:
    """The source file of module ``name``, found on disk without importing it (only its
    top-level package is looked up), so that a cache hit never imports a heavy stage."""
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
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                base = ".".join(base_parts)
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
# Stages and the cache


@dataclass(frozen=True)
class StageSpec:
    """What the cache needs to know about a stage."""

    name: str  # stage name (folder name in the cache and in run folders)
    compute: Callable[[dict[str, Path], Path, BaseModel], dict | None]  # (inputs, out_dir, params) -> info
    modules: tuple[str, ...]  # modules whose source (with their imports) versions the stage
    params_keys: tuple[str, ...]  # dotted params keys the stage reads
    ignore_keys: tuple[str, ...] = ()  # knobs inside those that cannot change results ('progress', 'fit.device')
    extra_inputs: Callable[[BaseModel], dict[str, Path]] | None = None  # params -> more input artifacts (weights)


@dataclass
class StageResult:
    """One stage execution of one object, as recorded in the manifest."""

    stage: str
    object: str
    status: str  # "computed" or "cached"
    key: str
    seconds: float  # wall time of this execution (lookup, compute or link)
    compute_seconds: float  # seconds the computation took when it was computed
    store_dir: Path  # <cache>/<stage>/<key>/out (immutable input of downstream stages)
    out_dir: Path  # the run's copy
    outputs: list[str] = field(default_factory=list)  # files, relative to out_dir
    info: dict[str, Any] = field(default_factory=dict)  # what the stage returned

    def to_json(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return {
            "stage": self.stage, "object": self.object, "status": self.status, "key": self.key,
            "seconds": round(self.seconds, 4), "compute_seconds": round(self.compute_seconds, 4),
            "out_dir": str(self.out_dir), "store_dir": str(self.store_dir), "outputs": self.outputs,
            "info": self.info,
        }


def stage_key(spec: StageSpec, inputs: Mapping[str, str | os.PathLike], params: BaseModel,
              memo_dir: Path | None = None) -> tuple[str, dict]:
    """(cache key, its ingredients) of ``spec`` on ``inputs`` under ``params``."""
    functions: list[Callable] = [spec.compute] + ([spec.extra_inputs] if spec.extra_inputs else [])
    ingredients = {
        "stage": spec.name,
        "code": code_version(list(spec.modules), functions),
        "params": params_subset_hash(params, spec.params_keys, spec.ignore_keys),
        "inputs": {name: hash_path(p, memo_dir) for name, p in sorted(inputs.items())},
    }
    blob = json.dumps(ingredients, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), ingredients


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock (threads and processes) on ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _link_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of ``src`` made of hard links (plain copies across devices)."""
    if dst.exists() or dst.is_symlink():
        shutil.rmtree(dst) if dst.is_dir() and not dst.is_symlink() else dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, tmp, copy_function=link)
    os.replace(tmp, dst)


def _list_outputs(d: Path) -> list[str]:
    return sorted(f.relative_to(d).as_posix() for f in d.rglob("*") if f.is_file())


def run_stage(spec: StageSpec, obj: str, inputs: Mapping[str, str | os.PathLike], params: BaseModel,
              cache_dir: str | os.PathLike, run_out_dir: str | os.PathLike | None,
              use_cache: bool = True) -> StageResult:
    """Run ``spec`` for ``obj`` through the cache: compute on a miss, reuse on a hit.

    ``inputs`` maps names to artifact paths (files or folders); the stage's ``compute``
    gets them as ``Path``s and writes into its ``out_dir``. With ``run_out_dir`` the result
    is linked there. Concurrent calls with the same key compute once (a file lock).
    """
    t0 = time.perf_counter()
    if spec.extra_inputs is not None:
        inputs = {**inputs, **{f"extra:{k}": v for k, v in spec.extra_inputs(params).items()}}
    key, ingredients = stage_key(spec, inputs, params, Path(cache_dir).resolve() / ".filehash")
    entry = Path(cache_dir).resolve() / spec.name / key
    out = entry / "out"
    done = entry / "done.json"
    with _locked(Path(cache_dir).resolve() / spec.name / f"{key}.lock"):
        if use_cache and done.exists():
            meta = json.loads(done.read_text())
            status = "cached"
        else:
            if entry.exists() and (done.exists() or not use_cache):
                shutil.rmtree(entry)  # use_cache=False: compute from scratch
            # A failed or interrupted attempt with this key leaves its files in out/ (no done.json,
            # so they are never taken as a result): a stage may resume from them (fit's checkpoint).
            out.mkdir(parents=True, exist_ok=True)
            tc = time.perf_counter()
            info = spec.compute({k: Path(v) for k, v in inputs.items()}, out, params) or {}
            compute_s = time.perf_counter() - tc
            meta = {"stage": spec.name, "object": obj, "key": key, "ingredients": ingredients,
                    "compute_seconds": compute_s, "info": info, "content_hash": hash_path(out),
                    "created": time.time()}
            write_json(done, meta)
            status = "computed"
    run_copy = out
    if run_out_dir is not None:
        run_copy = Path(run_out_dir)
        _link_tree(out, run_copy)
    return StageResult(stage=spec.name, object=obj, status=status, key=key,
                       seconds=time.perf_counter() - t0, compute_seconds=float(meta["compute_seconds"]),
                       store_dir=out, out_dir=run_copy, outputs=_list_outputs(out),
                       info=json.loads(json.dumps(meta.get("info", {}), default=str)))
