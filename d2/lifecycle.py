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

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

STOP_GRACE_SECONDS = 3.0  # a server that has not stopped this long after SIGTERM is killed
QUICK_MLFLOW_SECONDS = 2.0  # what a forced end still gives MLflow before the process ends
SECOND_SIGNAL_DEADLINE = 6.0  # after a second Ctrl-C, seconds the cleanup may still take before a forced end

_watchdog: subprocess.Popen | None = None  # the process that stops our server if this one is killed
_exported_url: str | None = None  # the PREFECT_API_URL this process exported for its children


# ---------------------------------------------------------------------------------------
# The Prefect API server. Prefect has no public way to start its ephemeral server in a session
# of its own: this section alone uses its internals (``SubprocessASGIServer._run_uvicorn_command``,
# which calls its module's ``subprocess.Popen``, and the class's ``_instances``, one per port).


def _server_class() -> type:
    """Prefect's ``SubprocessASGIServer`` whose process runs in its own session, its output in
    ``$PREFECT_HOME/server.log``. Instances are shared with Prefect's class, so its client finds
    and reuses the server."""
    import prefect.server.api.server as server_mod

    class SessionASGIServer(server_mod.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            home, log = os.environ.get("PREFECT_HOME"), None  # no log file: the server writes to our stderr
            with contextlib.suppress(OSError):
                if home:
                    Path(home).mkdir(parents=True, exist_ok=True)
                    log = open(Path(home) / "server.log", "ab")  # noqa: SIM115  (closed below)
            popen = functools.partial(subprocess.Popen, start_new_session=True, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=log)
            server_mod.subprocess = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})
            try:
                return super()._run_uvicorn_command()
            finally:
                server_mod.subprocess = subprocess
                if log is not None:
                    log.close()

    return SessionASGIServer


def _servers() -> list[Any]:
    server_mod = sys.modules.get("prefect.server.api.server")
    return list(server_mod.SubprocessASGIServer._instances.values()) if server_mod is not None else []


def start_prefect() -> None:
    """Start the ephemeral Prefect API server now, in its own session, with a watchdog, and export
    its address to child processes (unless ``PREFECT_API_URL`` names a server not started here)."""
    global _exported_url, _watchdog
    url = os.environ.get("PREFECT_API_URL")
    if url and url != _exported_url:
        return  # an external server
    if url and any(s.running and s.server_process is not None and s.server_process.poll() is None
                   for s in _servers()):
        return  # ours, still serving (an earlier command in this process)
    os.environ.pop("PREFECT_API_URL", None)
    server = _server_class()()
    server.start()
    if server.server_process is not None and (_watchdog is None or _watchdog.poll() is not None):
        _watchdog = subprocess.Popen(
            [sys.executable, "-I", __file__, str(os.getpid()), str(server.server_process.pid)],  # runs watchdog()
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
    global _exported_url, _watchdog
    for server in _servers():
        proc = server.server_process
        if proc is not None:
            proc.kill() if now else proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
        with contextlib.suppress(Exception):  # exiting anyway
            server.stop()  # Prefect's own bookkeeping (the process is gone by now)
    if _watchdog is not None:
        _watchdog.kill()
        _watchdog.wait()
        _watchdog = None
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
        proc = server.server_process
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


_previous: dict[int, Any] = {}  # the handlers install_handlers replaced


def install_handlers(notice: str) -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt(<signal name>)`` once; a second one bounds the
    cleanup to :data:`SECOND_SIGNAL_DEADLINE` seconds (then :func:`quit_now`). Main thread only."""
    Interrupts.notice = notice
    for sig in (signal.SIGINT, signal.SIGTERM):
        _previous.setdefault(sig, signal.signal(sig, _on_signal))


def restore_handlers() -> None:
    """Put back the handlers :func:`install_handlers` replaced (none when it ran on another thread)."""
    while _previous:
        signal.signal(*_previous.popitem())


def _on_signal(signum: int, frame: Any) -> None:
    Interrupts.count += 1
    if Interrupts.count == 1:
        Interrupts.name = signal.Signals(signum).name
        quiet_prefect_runs()  # Prefect's "Crash detected!" would repeat the one line d2 prints
        raise KeyboardInterrupt(Interrupts.name)  # and the flows' driver stops at its next check of interrupted()
    if Interrupts.count == 2:  # the cleanup goes on; a timer ends the process if it takes too long
        with contextlib.suppress(OSError, ValueError):
            print(f"interrupted again: finishing the cleanup, at most {SECOND_SIGNAL_DEADLINE:g} s more",
                  file=sys.stderr, flush=True)
        timer = threading.Timer(SECOND_SIGNAL_DEADLINE, quit_now)
        timer.daemon = True
        timer.start()


def interrupted() -> bool:
    """Whether a signal asked this process to stop."""
    return Interrupts.count > 0


def quit_now() -> None:
    """End the process now: runs still ``running`` are marked ``interrupted`` (MLflow runs KILLED,
    given at most :data:`QUICK_MLFLOW_SECONDS`), the Prefect server is killed, exit 130."""
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
    with contextlib.suppress(OSError, ValueError):
        print(Interrupts.notice or "interrupted again: stopped at once", file=sys.stderr, flush=True)
        sys.stdout.flush()
    os._exit(130)


if __name__ == "__main__":  # the watchdog process start_prefect starts
    watchdog(int(sys.argv[1]), int(sys.argv[2]))
