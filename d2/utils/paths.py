"""Names and run folders: what a run may write, and whether another run holds a folder."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from pathlib import Path

LOCK_FILE = ".d2-run.lock"  # held (flock) by the run writing into a folder

_NAME_RE = re.compile(r"^[^/\\\x00]+$")
MAX_NAME_BYTES = 128  # longest object name / --name (UTF-8 bytes): it becomes a folder and part of file names


class UnsafeName(ValueError):
    """An object name that would leave the run folder."""


def safe_name(name: str, what: str = "object name") -> str:
    """``name`` when it is one plain path component, else :class:`UnsafeName` (nothing is written)."""
    if not name or name in (".", "..") or not _NAME_RE.match(name) or name != name.strip() or name.startswith("."):
        raise UnsafeName(f"{what} {name!r} is not a plain folder name (no '/', '\\\\', leading '.' or surrounding "
                         "spaces): it would write outside the run folder")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_NAME_BYTES:
        raise UnsafeName(f"{what} {name[:20]!r}... is {size} bytes long, over the {MAX_NAME_BYTES}-byte limit "
                         "(it names folders and files); give a shorter name")
    return name


def inside(folder: Path, path: Path) -> Path:
    """``path`` (its parent resolved) when it lies inside ``folder``, else ValueError."""
    folder = folder.resolve()
    parent = path.parent.resolve()
    if parent != folder and folder not in parent.parents:
        raise ValueError(f"refusing to write {path}: outside the run folder {folder}")
    return parent / path.name


def flock_holder(path: Path) -> str | None:
    """The text of lock file ``path`` when another open file holds its ``flock`` ('' if it says
    nothing), else None (free, or no such file). A probe: it never keeps the lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)


def run_folder_holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir`` when another live run writes into it, else None. Only a check (the run
    itself takes the lock): lets a command refuse before anything starts."""
    holder = flock_holder(run_dir / LOCK_FILE)
    return None if holder is None else holder or "unknown process"


# ---------------------------------------------------------------------------------------
# the run folder's lock: taken by the command before Prefect starts, adopted by the flow


class RunFolderLocked(RuntimeError):
    """Another live d2 run holds the run folder's lock."""


_HELD: dict[str, int] = {}  # realpath of a lock file -> the open descriptor holding its flock


def lock_run_folder(run_dir: Path) -> int:
    """Take ``run_dir``'s run lock (``flock`` on its lock file, released when the process dies) and
    write the holder into it; :class:`RunFolderLocked` naming the live run that holds it."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise RunFolderLocked(f"{run_dir} is in use by another d2 run ({holder}); wait for it to finish or choose "
                             "another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
              .encode(), 0)
    return fd


def hold_run_lock(run_dir: Path) -> None:
    """Take ``run_dir``'s lock for this process until the flow adopts it (once per folder)."""
    lock = os.path.realpath(run_dir / LOCK_FILE)
    if lock not in _HELD:
        _HELD[lock] = lock_run_folder(run_dir)


def adopt_run_folder_lock(run_dir: Path) -> int | None:
    """The descriptor holding ``run_dir``'s lock when :func:`hold_run_lock` took it in this process
    (the caller now owns it and releases it), else None."""
    return _HELD.pop(os.path.realpath(run_dir / LOCK_FILE), None)
