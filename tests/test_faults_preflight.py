"""Faults a user causes in the environment and in params files, refused before Prefect starts.

Each fault runs the real ``d2`` command (a subprocess) or the pre-flight function, and checks
the one line that names the problem and the fix, the exit code (2, as every validation error),
the time, and that nothing was written or lost. No test starts Prefect.

Times: a ``d2`` process spends its first seconds starting Python and importing torch (about
2 s on an idle 2-core machine, several times that on a loaded one), so a refusing subprocess
is held to :data:`CHECK_S` CPU seconds beyond the start-up of ``d2 params`` measured in the same
session, and its wall time to no waiting (see :func:`refused`). The pre-flight functions
themselves are held to :data:`CHECK_S` wall seconds (params files: 1 s).

Folders that cannot be written: mode 0555, or, when the tests run as root (who writes through
any mode), a read-only bind mount that only the command under test sees (``unshare``).
"""

from __future__ import annotations

import errno
import os
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from d2.config import ParamsError, load_params
from d2.preflight import check_disk, check_memory, check_writable, hold_run_folder, preflight
from d2.utils.io import InputError
from d2.utils.paths import LOCK_FILE, adopt_run_folder_lock, run_folder_holder

from d2_toy import prepare_tiny

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHECK_S = 5.0  # what a refusal may take beyond starting the process
AS_ROOT = os.geteuid() == 0


# ---------------------------------------------------------------------------------------
# helpers


def snapshot(folder: Path) -> dict[str, tuple[int, int] | str]:
    """Everything under ``folder``: files as ``(size, mtime_ns)``, folders by name."""
    out: dict[str, tuple[int, int] | str] = {}
    for p in sorted(folder.rglob("*")) if folder.exists() else []:
        st = p.lstat()
        out[str(p.relative_to(folder))] = "folder" if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a ``d2`` subprocess: this checkout first on the path, the project's
    state derived from its working directory (nothing inherited from the test process)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "D2_", "DASK_", "RAY_", "TORCHINDUCTOR_"))}
    env.update({"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def d2(args: list[str], cwd: Path, env: dict[str, str], read_only: tuple[Path, ...] = (),
       timeout: float = 300) -> tuple[int, list[str], float]:
    """Run ``d2 ARGS`` in ``cwd``; (exit code, stderr lines, :class:`Took`). The ``read_only`` folders
    cannot be written by it: a read-only bind mount in a mount namespace of its own when the
    tests run as root (root writes through any mode), else mode 0555 for the call."""
    cmd = [str(BIN / "d2"), *args]
    modes = {}
    if read_only and AS_ROOT:
        mounts = " && ".join(f"mount --bind {q} {q} && mount -o remount,bind,ro {q} {q}"
                             for q in map(shlex.quote, map(str, read_only)))
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'{mounts} && cd {shlex.quote(str(cwd))} && exec "$@"', "sh", *cmd]
    else:
        for folder in read_only:
            modes[folder] = folder.stat().st_mode
            folder.chmod(0o555)
    t0, c0 = time.perf_counter(), cpu_of_children()
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        for folder, mode in modes.items():
            folder.chmod(mode)
    took = Took(time.perf_counter() - t0, cpu_of_children() - c0)
    return r.returncode, [ln for ln in r.stderr.splitlines() if ln.strip()], took


@dataclass(frozen=True)
class Took:
    """What a command took: wall seconds, and CPU seconds of it and its children."""

    wall: float
    cpu: float


def cpu_of_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny prepared dataset and params, a state folder (Prefect's home, MLflow's store), and the
    start-up time of ``d2 params``."""
    root = tmp_path_factory.mktemp("faults")
    params, data = prepare_tiny(root)
    state, home = root / "state", root / "home"
    for folder in (state, home):
        folder.mkdir()
    env = clean_env(PREFECT_HOME=str(state / ".prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{state / 'mlflow.db'}",
                    D2_MLFLOW_ARTIFACTS=str(state / "mlruns"), HOME=str(home))
    rc, err, startup = d2(["params", "--params", str(params)], root, env)
    assert rc == 0, err
    return {"root": root, "params": params, "data": data, "state": state, "env": env, "startup": startup}


def refused(rc: int, err: list[str], took: Took, startup: Took, *needles: str) -> str:
    """The command exited 2 with one line holding every needle, in time; that line.

    In time: CPU time within :data:`CHECK_S` plus twice the start-up of ``d2 params`` (CPU time
    too grows on a loaded machine), and no waiting: wall time within :data:`CHECK_S` plus four
    start-ups (the faults it replaces waited 20 to 260 s on timeouts and on Prefect)."""
    assert rc == 2, err
    assert len(err) == 1, err
    assert took.cpu < CHECK_S + 2 * startup.cpu, f"{took.cpu:.1f} CPU s (start-up {startup.cpu:.1f} s): {err}"
    assert took.wall < CHECK_S + 4 * startup.wall, f"{took.wall:.1f} s (start-up {startup.wall:.1f} s): {err}"
    for n in needles:
        assert n in err[0], err
    assert "Traceback" not in err[0]
    return err[0]


def scratch(world, name: str) -> Path:
    folder = world["state"] / name
    folder.mkdir()
    return folder


# ---------------------------------------------------------------------------------------
# folders and stores


def test_read_only_working_directory_is_refused_at_once(world):
    """Run from a read-only project folder: Prefect's state cannot be created there."""
    proj = world["root"] / "ro-project"
    proj.mkdir()
    shutil.copy(world["params"], proj / "params.yaml")
    env = clean_env(HOME=world["env"]["HOME"])  # PREFECT_HOME, MLflow: derived from the working directory
    before = snapshot(proj)
    rc, err, s = d2(["benchmark", "--data", str(world["data"]), "--out", str(scratch(world, "ro-cwd-out") / "run"),
                     "--no-progress"], proj, env, read_only=(proj,))
    line = refused(rc, err, s, world["startup"], "Prefect's state folder", str(proj / ".prefect"), "PREFECT_HOME")
    assert "writable" in line
    assert snapshot(proj) == before


def test_read_only_out_is_refused_and_the_old_run_is_untouched(world):
    out = world["state"] / "ro-out"
    out.mkdir()
    (out / "manifest.json").write_text('{"status": "completed"}\n')
    (out / "objects").mkdir()
    (out / "objects" / "frame.png").write_bytes(b"png")
    before = snapshot(out)
    rc, err, s = d2(["benchmark", "--params", str(world["params"]), "--out", str(out), "--no-progress"],
                    world["root"], world["env"], read_only=(out,))
    refused(rc, err, s, world["startup"], "--out", str(out), "not writable", "choose a writable --out")
    assert snapshot(out) == before


def test_uncreatable_out_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"--out /proc/d2-nope cannot be created in /proc .*writable --out"):
        check_writable("/proc/d2-nope", "--out", "choose a writable --out folder")
    long = tmp_path / ("n" * 300)
    with pytest.raises(InputError, match="over the file system's"):
        check_writable(long, "--out", "choose another --out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri,needles", [
    ("http://127.0.0.1:{port}", ("MLflow server http://127.0.0.1:", "not reachable", "run.mlflow=false")),
    ("sqlite:////proc/d2-nope/mlflow.db", ("MLflow store sqlite:////proc/d2-nope/mlflow.db", "cannot be created",
                                           "MLFLOW_TRACKING_URI")),
])
def test_unusable_mlflow_store_is_refused(world, uri, needles):
    uri = uri.format(port=closed_port())
    out = scratch(world, f"mlflow-{uri.split(':')[0]}") / "run"
    env = {**world["env"], "MLFLOW_TRACKING_URI": uri}
    rc, err, s = d2(["benchmark", "--params", str(world["params"]), "--set", "run.mlflow=true", "--out", str(out),
                     "--no-progress"], world["root"], env)
    refused(rc, err, s, world["startup"], *needles)
    assert not out.exists()


@pytest.mark.parametrize("runner,address", [("dask", "tcp://127.0.0.1:{port}"), ("ray", "ray://127.0.0.1:{port}")])
def test_unreachable_cluster_is_refused(world, runner, address):
    address = address.format(port=closed_port())
    out = scratch(world, f"cluster-{runner}") / "run"
    rc, err, s = d2(["benchmark", "--params", str(world["params"]), "--set", f"run.runner={runner}",
                     "--set", f"run.address={address}", "--out", str(out), "--no-progress"],
                    world["root"], world["env"])
    refused(rc, err, s, world["startup"], f"run.address = {address}", "not reachable", "run.address=null")
    assert not out.exists()


def test_too_long_name_is_refused(world):
    out = scratch(world, "long-name") / "run"
    name = "x" * 300
    rc, err, s = d2(["generate", "--params", str(world["params"]), "--input", str(world["data"] / "input" / "windmill"),
                     "--name", name, "--out", str(out), "--no-progress"], world["root"], world["env"])
    refused(rc, err, s, world["startup"], "--name", "300 bytes", "128-byte limit", "shorter name")
    assert not out.exists()


def test_absurd_resolution_is_refused_before_any_allocation(world):
    out = scratch(world, "absurd") / "run"
    rc, err, s = d2(["benchmark", "--params", str(world["params"]), "--set", "protocol.resolution=100000",
                     "--out", str(out), "--no-progress"], world["root"], world["env"])
    refused(rc, err, s, world["startup"], "protocol.resolution", "of memory", "available")
    assert not out.exists()


def test_memory_and_disk_estimates(world, monkeypatch):
    p = load_params(world["params"])
    t0 = time.perf_counter()
    check_memory(p, "benchmark", available=1 << 30)  # the tiny run fits in 1 GB
    big = load_params(world["params"], ["conditions.resolution=4096", "sampling.resolution=4096"])
    with pytest.raises(InputError, match=r"the 4 x 3 image matrix at 4096 px: about .* GB of memory, .* available; "
                                         r"lower sampling.resolution"):
        check_memory(big, "benchmark", available=1 << 30)
    out, cache = world["state"] / "disk-out", world["state"] / "disk-cache"
    check_disk(p, out, cache, objects=2)  # plenty of room here

    class Full:
        free = 10 << 20

    monkeypatch.setattr("d2.preflight.shutil.disk_usage", lambda path: Full)
    with pytest.raises(InputError, match=r"--out .* and run.cache_dir .*: 10 MB free on the disk, the run needs about"):
        check_disk(p, out, cache, objects=2)
    assert time.perf_counter() - t0 < CHECK_S
    assert not out.exists() and not cache.exists()


def test_a_failed_copy_into_the_run_folder_leaves_no_temporary_copy(tmp_path, monkeypatch):
    """A full disk while copying a stage's outputs: the run folder keeps what it had, no ``.tmp``."""
    from d2.flows import run as engine

    src = tmp_path / "cache" / "out"
    src.mkdir(parents=True)
    (src / "a.bin").write_bytes(b"new")
    run = tmp_path / "run"
    dst = run / "objects" / "ball" / "fit"
    dst.mkdir(parents=True)
    (dst / "a.bin").write_bytes(b"old")

    def full(s, d, **kw):
        Path(d).mkdir()
        (Path(d) / "a.bin").write_bytes(b"ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.shutil, "copytree", full)
    with pytest.raises(OSError):
        engine.place(src, dst, run)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["fit"]
    assert (dst / "a.bin").read_bytes() == b"old"


def test_read_only_cache_miss_is_refused_in_one_line(world):
    cache = world["state"] / "ro-cache"
    cache.mkdir()
    out = scratch(world, "ro-cache-out") / "run"
    rc, err, s = d2(["benchmark", "--params", str(world["params"]), "--set", f"run.cache_dir={cache}",
                     "--out", str(out), "--no-progress"], world["root"], world["env"], read_only=(cache,))
    refused(rc, err, s, world["startup"], f"the stage cache {cache} is read-only", "no conditions result for",
            "writable folder")
    assert not out.exists() and list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------
# the run folder's lock


def test_a_second_run_is_refused_while_the_first_starts_prefect(world):
    """The first run holds its folder before it starts Prefect: a second is refused at once."""
    out = scratch(world, "busy") / "run"
    hold_run_folder(out)  # what the first run does before starting Prefect
    try:
        before = snapshot(out)
        rc, err, s = d2(["benchmark", "--params", str(world["params"]), "--out", str(out), "--no-progress"],
                        world["root"], world["env"])
        refused(rc, err, s, world["startup"], "is in use by another d2 run", f"pid {os.getpid()}", "another --out")
        assert snapshot(out) == before
    finally:
        os.close(adopt_run_folder_lock(out))
    assert run_folder_holder(out) is None


def test_the_command_locks_the_run_folder_before_starting_prefect(world, monkeypatch):
    from d2 import cli

    out = world["state"] / "lock-order" / "run"
    seen = []

    class Stop(Exception):
        pass

    def start_prefect():
        seen.append(run_folder_holder(out))
        raise Stop("stop before Prefect")

    monkeypatch.setattr(cli, "start_prefect", start_prefect)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{world['state'] / 'mlflow.db'}")
    assert cli.main(["benchmark", "--params", str(world["params"]), "--out", str(out), "--no-progress"]) == 1
    assert seen and seen[0] and f"pid {os.getpid()}" in seen[0]
    fd = adopt_run_folder_lock(out)
    assert fd is not None
    os.close(fd)
    assert (out / LOCK_FILE).is_file() and sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_environment_checks_are_quick_in_process(world, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    p = load_params(world["params"], ["run.mlflow=true"])
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="MLflow server"):
        preflight("benchmark", {"data": str(world["data"]), "out": str(world["state"] / "q")}, p)
    assert time.perf_counter() - t0 < CHECK_S


# ---------------------------------------------------------------------------------------
# params files


def billion_laughs(path: Path) -> Path:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    lines.append("run: {objects: *a9}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_billion_laughs_is_refused_at_once(world, tmp_path):
    path = billion_laughs(tmp_path / "laughs.yaml")
    assert path.stat().st_size < 1200
    t0 = time.perf_counter()
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert time.perf_counter() - t0 < 1.0
    assert "aliases (*name) expand to more than" in str(e.value) and "lol" not in str(e.value)
    with pytest.raises(ParamsError, match="aliases"):
        load_params(None, ["run.objects=[&a [x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a], "
                           "&c [*b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c], "
                           "&e [*d, *d, *d, *d, *d, *d, *d, *d], &f [*e, *e, *e, *e, *e, *e, *e, *e], "
                           "&g [*f, *f, *f, *f, *f, *f, *f, *f], &h [*g, *g, *g, *g, *g, *g, *g, *g]]"])
    shutil.copy(path, world["state"] / "laughs.yaml")
    rc, err, s = d2(["params", "--params", str(world["state"] / "laughs.yaml")], world["root"], world["env"])
    refused(rc, err, s, world["startup"], "laughs.yaml: aliases")


def test_large_params_file_is_refused_at_once(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "w") as f:
        f.write("run:\n  objects:\n")
        f.writelines(f"  - object_{i:08d}\n" for i in range(1_300_000))
    assert path.stat().st_size > 25_000_000
    t0 = time.perf_counter()
    with pytest.raises(ParamsError, match=r"big.yaml: 2\d.\d MB, over the 1 MB limit of a params file"):
        load_params(path)
    assert time.perf_counter() - t0 < 1.0


def test_deep_nesting_is_refused_at_once(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("run:\n  objects: " + "[" * 20000 + "]" * 20000 + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ParamsError, match="deep.yaml: nested deeper than 32 levels"):
        load_params(path)
    assert time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()
    with pytest.raises(ParamsError, match="override 'run.objects=...': nested deeper"):
        load_params(None, ["run.objects=" + "[" * 5000 + "]" * 5000])
    assert time.perf_counter() - t0 < 1.0
    interleaved = tmp_path / "interleaved.yaml"  # brackets apart: the loader counts the depth while composing
    interleaved.write_text("run:\n  objects: " + "[a, " * 3000 + "]" * 3000 + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ParamsError, match="interleaved.yaml: nested deeper than 32 levels"):
        load_params(interleaved)
    assert time.perf_counter() - t0 < 1.0


def test_validation_messages_never_print_a_large_input(tmp_path):
    """A value of the wrong type that aliases expand (within the limits) is named, not printed."""
    anchors = ['&a0 ["' + "w" * 50 + '", "x", "y", "z"]'] + \
        [f"&a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 6)]
    path = tmp_path / "wide.yaml"
    path.write_text(f"run:\n  objects: [{', '.join(anchors)}]\n"
                    "  max_parallel: *a5\n  workers: *a5\n  threads_per_task: *a5\n")
    t0 = time.perf_counter()
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert time.perf_counter() - t0 < CHECK_S
    text = str(e.value)
    assert "run.max_parallel" in text and "run.workers" in text and "more" in text  # at most 8 problems listed
    assert len(text) < 1500 and len(text.splitlines()) <= 10 and text.count("w" * 50) <= 2


# ---------------------------------------------------------------------------------------
# local clusters: scratch space in the project, no INFO lines


DASK_SCRIPT = """
import os, sys
from prefect.logging.configuration import setup_logging
setup_logging()  # Prefect's handlers, as in a flow run
from d2.flows.runners import local_cluster_kwargs, quiet_dask
quiet_dask()
from distributed import Client, LocalCluster
with LocalCluster(**local_cluster_kwargs(1)) as cluster, Client(cluster) as client:
    assert client.submit(lambda x: x + 1, 1).result() == 2
"""


def test_local_dask_cluster_keeps_scratch_in_the_project_and_logs_no_info(tmp_path):
    tmp = tmp_path / "systemtmp"
    tmp.mkdir()
    state = tmp_path / "proj" / ".prefect"
    env = clean_env(TMPDIR=str(tmp), PREFECT_HOME=str(state), PREFECT_LOGGING_LEVEL="WARNING")
    r = subprocess.run([sys.executable, "-c", DASK_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert " INFO " not in r.stderr and "INFO" not in r.stdout, r.stderr[-2000:]
    assert list(tmp.iterdir()) == []  # nothing in the system temp folder
    assert (state / "dask" / "dask-scratch-space").is_dir()


def test_torch_compile_cache_is_kept_in_the_project(tmp_path):
    tmp = tmp_path / "systemtmp"
    tmp.mkdir()
    state = tmp_path / "proj" / ".prefect"
    script = ("from d2.config import load_params\nfrom d2.flows.runners import task_runner\n"
              "task_runner(load_params(None))\nimport torch._dynamo\n")
    env = clean_env(TMPDIR=str(tmp), PREFECT_HOME=str(state))
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(tmp.iterdir()) == [] and (state / "torchinductor").is_dir()


def test_local_ray_temp_folder_is_in_the_project_when_short_enough(monkeypatch, tmp_path):
    from d2.flows.runners import RAY_TEMP_MAX, ray_temp

    monkeypatch.setenv("PREFECT_HOME", "/tmp/p/.prefect")
    assert ray_temp() == Path("/tmp/p/.prefect/ray")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / ("s" * RAY_TEMP_MAX)))
    assert ray_temp() is None  # Ray's sockets would exceed the unix socket path limit
