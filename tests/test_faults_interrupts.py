"""Interrupts as a terminal sends them: a real ``d2 benchmark`` in a process group of its own,
signalled as a whole (Ctrl-C reaches every process of the foreground group), must end within
10 s with exit 130 (143 for SIGTERM), the manifest ``interrupted``, every MLflow run of the flow
KILLED and no process left behind (the Prefect server and the watchdog included). A lost Prefect
server ends in one line that the manifest repeats; Dask workers share the run's server; a closed
pipe (``| head``) ends quietly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from d2_toy import make_toy, prepare_tiny, toy_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARK = "D2_TEST_PROCESS_MARK"  # every process a run starts inherits it: how leftovers are found


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults-int")
    params, data = prepare_tiny(root)
    return {"root": root, "params": params, "data": data}


def marked(mark: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
        except (OSError, IndexError):
            continue
    return out


def servers(mark: str) -> list[int]:
    return [pid for pid, cmd in marked(mark) if "uvicorn" in cmd and "prefect.server" in cmd]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def no_process_left(pgid: int, mark: str, within: float = 3.0) -> list[tuple[int, str]]:
    """What is left of the run (its process group and everything it started) after ``within`` s."""
    deadline = time.time() + within
    while time.time() < deadline:
        if not group_alive(pgid) and not marked(mark):
            return []
        time.sleep(0.1)
    return marked(mark) or [(pgid, "process group")]


class Run:
    """``d2 benchmark`` with MLflow in ``tmp``, started in a new session (its own process group)."""

    def __init__(self, tiny, tmp: Path, *extra: str, steps: int = 400) -> None:
        self.tmp, self.out, self.mark = tmp, tmp / "run", uuid.uuid4().hex
        self.uri = f"sqlite:///{tmp / 'mlflow.db'}"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "MLFLOW_TRACKING_URI": self.uri, "D2_MLFLOW_ARTIFACTS": str(tmp / "mlruns"), MARK: self.mark}
        env.pop("PREFECT_API_URL", None)
        cmd = [str(BIN / "d2"), "benchmark", "--params", str(tiny["params"]), "--out", str(self.out),
               "--no-progress", "--set", f"run.cache_dir={tmp / 'cache'}", "--set", f"sampling.num_steps={steps}",
               "--set", "run.mlflow=true", "--set", "run.mlflow_experiment=interrupts", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=tmp, start_new_session=True)
        self.pgid = self.proc.pid

    def wait_for(self, stage: str, timeout: float = 600) -> dict:
        """The manifest once ``stage`` has finished for some object (the next stage is running)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                m = load(self.out / "manifest.json")
                if any(s["stage"] == stage for s in m["stages"]):
                    return m
            except (OSError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"the benchmark never finished {stage}: {self.proc.stderr.read()[-3000:]}")

    def signal(self, *sigs: int, gap: float = 0.1) -> tuple[int, str, float]:
        """Send ``sigs`` to the whole group; (exit code, stderr, seconds from the first to the exit)."""
        t0 = time.perf_counter()
        for i, sig in enumerate(sigs):
            if i:
                time.sleep(gap)
            os.killpg(self.pgid, sig)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the run did not end within 60 s of the signal")
        return self.proc.returncode, err, time.perf_counter() - t0

    def kill(self) -> None:
        for pid, _ in marked(self.mark):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(timeout=30)

    def mlflow_statuses(self) -> dict[str, str]:
        """run name -> status of every MLflow run of the experiment."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name("interrupts")
        return {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])}


def assert_interrupted(run: Run, rc: int, err: str, elapsed: float, codes=(130,)) -> dict:
    assert rc in codes, (rc, err[-3000:])
    assert elapsed < 10, (elapsed, err[-3000:])
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    assert "interrupted" in err.splitlines()[-1]
    m = load(run.out / "manifest.json")
    assert m["status"] == "interrupted" and "interrupted" in m["error"], m.get("error")
    statuses = run.mlflow_statuses()
    assert set(statuses) == {"benchmark/run", "bouncing_ball", "windmill"}, statuses
    assert set(statuses.values()) == {"KILLED"}, statuses
    assert no_process_left(run.pgid, run.mark) == []
    # nothing half-written is a result: the sampling that was cut has no done.json
    assert not list((run.tmp / "cache" / "sampling").rglob("done.json"))
    return m


class InterruptAfterFirstStage:
    """A progress listener that records a SIGINT as the signal handler does, once the first stage is done."""

    def stage_started(self, obj: str, stage: str) -> None:
        pass

    def stage_finished(self, result) -> None:
        from d2.lifecycle import Interrupts

        Interrupts.count, Interrupts.name = 1, "SIGINT"


def test_an_interrupted_sweep_ends_every_manifest_and_mlflow_run_it_opened(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from d2.flows import run as runs
    from d2.flows.sweep import run_sweep
    from d2.lifecycle import Interrupts
    from d2.execution.manifest import LISTENERS
    from d2.validation import parse_grid

    toy = make_toy(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("D2_MLFLOW_ARTIFACTS", str(tmp_path / "mlruns"))
    monkeypatch.setattr(Interrupts, "count", 0)  # restored after the test, as the listener changes them
    monkeypatch.setattr(Interrupts, "name", "")
    listener = InterruptAfterFirstStage()
    LISTENERS.append(listener)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(toy.data, tmp_path / "sweep", toy_params(tmp_path, "run.mlflow_experiment=cut", mlflow=True),
                      parse_grid(["sampling.s0=0.3,0.6"]), stages=toy.stages)
    finally:
        LISTENERS.remove(listener)
    for path in [tmp_path / "sweep" / "manifest.json", *(tmp_path / "sweep" / "points").glob("*/manifest.json")]:
        m = load(path)
        assert m["status"] == "interrupted" and m["error"] == "interrupted by SIGINT", path
    assert len(list((tmp_path / "sweep" / "points").glob("*/manifest.json"))) == 2
    assert runs.ACTIVE == {}
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cut").experiment_id])
    assert len(runs) == 1 + 2 + 4  # the sweep, its points, their objects
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_ends_interrupted_with_its_mlflow_runs_killed(tiny, tmp_path):
    run = Run(tiny, tmp_path)
    run.wait_for("conditions")
    assert len(servers(run.mark)) == 1
    rc, err, elapsed = run.signal(signal.SIGINT)
    assert_interrupted(run, rc, err, elapsed)
    assert len(err.strip().splitlines()) <= 2, err


@pytest.mark.slow
def test_sigterm_to_the_process_group_ends_interrupted(tiny, tmp_path):
    run = Run(tiny, tmp_path)
    run.wait_for("conditions")
    rc, err, elapsed = run.signal(signal.SIGTERM)
    m = assert_interrupted(run, rc, err, elapsed, codes=(130, 143))
    assert "SIGTERM" in m["error"]


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_cleanup_still_ends_interrupted_within_10_s(tiny, tmp_path):
    run = Run(tiny, tmp_path)
    run.wait_for("conditions")
    t0 = time.perf_counter()
    os.killpg(run.pgid, signal.SIGINT)
    # two signals that land before Python runs its handler count once: the second is sent once the
    # first is being handled (the manifest says so), while the cleanup it started still runs
    while time.perf_counter() - t0 < 10 and load(run.out / "manifest.json")["status"] == "running":
        time.sleep(0.02)
    rc, err, elapsed = run.signal(signal.SIGINT)
    elapsed = time.perf_counter() - t0
    assert_interrupted(run, rc, err, elapsed)
    assert "interrupted again" in err, err  # the second Ctrl-C was seen and bounded the cleanup


@pytest.mark.slow
def test_a_lost_prefect_server_ends_in_one_line_that_the_manifest_repeats(tiny, tmp_path):
    run = Run(tiny, tmp_path)
    run.wait_for("conditions")
    (server,) = servers(run.mark)
    t0 = time.perf_counter()
    os.kill(server, signal.SIGKILL)
    _, err = run.proc.communicate(timeout=120)
    elapsed = time.perf_counter() - t0
    assert run.proc.returncode == 1 and elapsed < 15, (elapsed, err[-3000:])
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert "Prefect API server" in err and "exited" in err
    m = load(run.out / "manifest.json")
    assert m["status"] == "failed" and any("Prefect API server" in e["error"] for e in m["errors"]), m["errors"]
    assert set(run.mlflow_statuses().values()) == {"FAILED"}
    assert no_process_left(run.pgid, run.mark) == []


@pytest.mark.slow
def test_dask_workers_share_the_runs_prefect_server_and_leave_nothing_behind(tiny, tmp_path):
    run = Run(tiny, tmp_path, "--set", "run.runner=dask", "--set", "run.workers=2", "--set", "run.max_parallel=2",
              steps=300)
    run.wait_for("conditions")
    workers = [pid for pid, cmd in marked(run.mark) if "multiprocessing" in cmd]
    assert len(workers) >= 2, marked(run.mark)
    assert len(servers(run.mark)) == 1, marked(run.mark)  # the driver's only: workers start none
    os.kill(workers[0], signal.SIGKILL)
    time.sleep(1.0)
    assert len(servers(run.mark)) == 1, marked(run.mark)
    rc, err, elapsed = run.signal(signal.SIGINT)
    assert rc == 130 and elapsed < 10, (rc, elapsed, err[-3000:])
    assert load(run.out / "manifest.json")["status"] == "interrupted"
    assert no_process_left(run.pgid, run.mark, within=5.0) == []


def test_a_closed_pipe_ends_quietly(tiny):
    proc = subprocess.Popen([str(BIN / "d2"), "params", "--params", str(tiny["params"])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.stdout.close()  # as `| head` does once it has its lines: every write after this fails
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err.decode() == "", err.decode()
