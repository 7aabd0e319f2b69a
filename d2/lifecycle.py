"""The life of a ``d2`` process: its ephemeral Prefect API server, and how it ends when interrupted.

The server runs in a session of its own, so a terminal's Ctrl-C (sent to the whole foreground
process group) reaches only the ``d2`` process, which then ends the run and stops the server
itself; a watchdog (also in its own session) stops the server if ``d2`` dies without doing so
(``kill -9``). The server's address is exported as ``PREFECT_API_URL`` to the processes the run
starts (Dask and Ray workers), so they use it instead of starting servers of their own. What
the server prints goes to ``$PREFECT_HOME/server.log``, not to the terminal.

Interrupts: the first SIGINT or SIGTERM raises ``KeyboardInterrupt`` in the main thread (the
flow's :func:`d2.flows.run.run_scope` marks the run ``interrupted`` and its MLflow runs KILLED);
a second one lets that cleanup finish but bounds it: if the process has not ended
:data:`SECOND_SIGNAL_DEADLINE` seconds later, whatever is still ``running`` is marked the same way
(:func:`d2.flows.run.abandon_runs`) and the process ends with 130. The signal handler itself never
writes to MLflow: it runs on the main thread, which may be inside an MLflow transaction at that
moment (the cleanup's own KILLED updates), and a write from the handler would wait on that lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

STOP_GRACE_SECONDS = 3.0  # a server that has not stopped this long after SIGTERM is killed
QUICK_MLFLOW_SECONDS = 2.0  # what a forced end still gives MLflow before the process ends
SECOND_SIGNAL_DEADLINE = 6.0  # after a second Ctrl-C, seconds the cleanup may still take before a forced end

_watchdogs: dict[int, subprocess.Popen] = {}  # server pid -> its watchdog
_exported_url: str | None = None  # the PREFECT_API_URL this process exported for its children


class _OwnSession:
    """Stands in for the ``subprocess`` module while Prefect starts its server: every ``Popen``
    gets a session of its own and writes its output to ``log`` (when given)."""

    def __init__(self, module: Any, log: Any) -> None:
        self._module, self._log = module, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802  (the module's name)
        kwargs["start_new_session"] = True
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        if self._log is not None:
            kwargs.setdefault("stdout", self._log)
            kwargs.setdefault("stderr", self._log)
        return self._module.Popen(*args, **kwargs)


def _server_log() -> Any:
    """``$PREFECT_HOME/server.log`` opened for appending (None when it cannot be: the server then
    writes to this process's stderr)."""
    home = os.environ.get("PREFECT_HOME")
    if not home:
        return None
    try:
        Path(home).mkdir(parents=True, exist_ok=True)
        return open(Path(home) / "server.log", "ab")  # noqa: SIM115  (the server process holds it)
    except OSError:
        return None


def _server_class() -> type:
    """Prefect's ``SubprocessASGIServer`` whose process runs in its own session. Instances are
    shared with Prefect's class (one per port), so Prefect's client finds and reuses it.

    Prefect has no public way to start its ephemeral server in a session of its own, so this and
    :func:`_servers` are the only places that use its internals (``_run_uvicorn_command``,
    ``_instances``)."""
    import prefect.server.api.server as server_mod

    class SessionASGIServer(server_mod.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            log = _server_log()
            real = server_mod.subprocess
            server_mod.subprocess = _OwnSession(real, log)
            try:
                return super()._run_uvicorn_command()
            finally:
                server_mod.subprocess = real
                if log is not None:
                    log.close()  # the server has its own copy of the descriptor

    return SessionASGIServer


def _servers() -> list[Any]:
    server_mod = sys.modules.get("prefect.server.api.server")
    return list(server_mod.SubprocessASGIServer._instances.values()) if server_mod is not None else []


def start_prefect() -> None:
    """Start the ephemeral Prefect API server now, in its own session, with a watchdog, and export
    its address to child processes (unless ``PREFECT_API_URL`` names a server not started here)."""
    global _exported_url
    url = os.environ.get("PREFECT_API_URL")
    if url and url != _exported_url:
        return  # an external server
    if url and any(s.running and s.server_process is not None and s.server_process.poll() is None
                   for s in _servers()):
        return  # ours, still serving (an earlier command in this process)
    if url:
        del os.environ["PREFECT_API_URL"]
    server = _server_class()()
    server.start()
    proc = server.server_process
    if proc is not None and proc.pid not in _watchdogs:
        _watchdogs[proc.pid] = subprocess.Popen(
            [sys.executable, "-I", __file__, str(os.getpid()), str(proc.pid)],  # runs watchdog()
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _exported_url = server.api_url
    os.environ["PREFECT_API_URL"] = _exported_url  # Dask / Ray workers use this server, start none


def watchdog(parent: int, server: int) -> None:
    """Stop process ``server`` (SIGTERM, then SIGKILL) once process ``parent`` is gone; returns
    when the server exits. Runs in a process of its own, in a session of its own."""
    import time

    while os.getppid() == parent:
        try:
            os.kill(server, 0)
        except OSError:
            return
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(server, sig)
        except OSError:
            return
        time.sleep(5)


def stop_prefect(now: bool = False) -> None:
    """Stop the ephemeral Prefect API server this process started, and its watchdog (no-op when
    there is none): SIGTERM, then SIGKILL after :data:`STOP_GRACE_SECONDS` (at once with ``now``)."""
    global _exported_url
    for server in _servers():
        proc = getattr(server, "server_process", None)
        if proc is not None:
            try:
                if now:
                    proc.kill()
                else:
                    proc.terminate()
                proc.wait(timeout=0 if now else STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
            except OSError:
                pass
        try:
            server.stop()  # Prefect's own bookkeeping (the process is gone by now)
        except Exception:  # noqa: BLE001  (exiting anyway)
            pass
        dog = _watchdogs.pop(getattr(proc, "pid", -1), None)
        if dog is not None:
            dog.kill()
            dog.wait()
    if _exported_url and os.environ.get("PREFECT_API_URL") == _exported_url:
        del os.environ["PREFECT_API_URL"]
    _exported_url = None


def quiet_prefect_runs() -> None:
    """Silence Prefect's run loggers and its API clients' (unless ``D2_DEBUG``): once the run is
    cut short or its server is gone, their crash reports, connection errors and tracebacks only
    repeat the one line ``d2`` prints."""
    if os.environ.get("D2_DEBUG"):
        return
    import logging

    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.events.clients", "prefect._internal.concurrency"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def server_problem() -> str | None:
    """A one-line message when the Prefect API server this process started has exited (None
    while it serves, or when there is none)."""
    for server in _servers():
        proc = getattr(server, "server_process", None)
        if proc is not None and proc.poll() is not None:
            quiet_prefect_runs()
            log = Path(os.environ.get("PREFECT_HOME", ".")) / "server.log"
            return (f"the Prefect API server this run started (pid {proc.pid}) exited with code {proc.returncode}"
                    f"{f' (its log: {log})' if log.is_file() and log.stat().st_size else ''}; "
                    "the run stops (rerun it: finished stages are cached)")
    return None


# ---------------------------------------------------------------------------------------
# Interrupts


class Interrupts:
    """What this process was told to stop by: the first signal's name and how many came."""

    count = 0
    name = ""
    notice = ""  # printed when a second signal ends the process at once


def install_handlers(notice: str) -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt(<signal name>)`` once; a second one bounds the
    cleanup to :data:`SECOND_SIGNAL_DEADLINE` seconds (then :func:`quit_now`). Main thread only."""
    Interrupts.notice = notice
    for sig in (signal.SIGINT, signal.SIGTERM):
        _previous.setdefault(sig, signal.signal(sig, _on_signal))


def restore_handlers() -> None:
    """Put back the handlers :func:`install_handlers` replaced (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    while _previous:
        sig, handler = _previous.popitem()
        signal.signal(sig, handler)


_previous: dict[int, Any] = {}


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    Interrupts.count += 1
    if Interrupts.count == 1:
        Interrupts.name = name
        quiet_prefect_runs()  # Prefect's "Crash detected!" would repeat the one line d2 prints
        raise KeyboardInterrupt(name)  # and the flows' driver stops at its next check of interrupted()
    if Interrupts.count == 2:  # the cleanup goes on; a watchdog ends the process if it takes too long
        try:
            print(f"interrupted again: finishing the cleanup, at most {SECOND_SIGNAL_DEADLINE:g} s more",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        threading.Thread(target=_deadline, daemon=True, name="d2-second-signal").start()


def _deadline() -> None:
    import time

    time.sleep(SECOND_SIGNAL_DEADLINE)
    quit_now()


def interrupted() -> bool:
    """Whether a signal asked this process to stop."""
    return Interrupts.count > 0


def quit_now() -> None:
    """End the process now: runs still ``running`` are marked ``interrupted`` (MLflow runs KILLED,
    given at most :data:`QUICK_MLFLOW_SECONDS`), the Prefect server is killed, exit 130."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    runs = sys.modules.get("d2.flows.run")  # loaded when this process runs a flow
    if runs is not None:
        reason = f"interrupted by {Interrupts.name or 'a signal'}, then again (stopped at once)"
        try:
            ids = runs.abandon_runs(reason)
        except Exception:  # noqa: BLE001  (exiting anyway)
            ids = []
        if ids:
            t = threading.Thread(target=runs.close_open_runs, args=(ids, "KILLED", reason), daemon=True)
            t.start()
            t.join(QUICK_MLFLOW_SECONDS)
    stop_prefect(now=True)
    try:
        print(Interrupts.notice or "interrupted again: stopped at once", file=sys.stderr, flush=True)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os._exit(130)


if __name__ == "__main__":  # the watchdog process start_prefect starts
    watchdog(int(sys.argv[1]), int(sys.argv[2]))
