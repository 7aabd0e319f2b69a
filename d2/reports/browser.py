"""Load a report page in a real headless Chromium and say what a person would see go wrong.

Talks to the browser over the DevTools protocol (``--remote-debugging-port``, one websocket):
console errors, uncaught exceptions and failed loads (the ``Log`` domain reports a missing
file as an error) are collected; every ``<img>`` must have decoded (``naturalWidth > 0``) and
every ``<video>`` must have a decoded frame (``readyState >= 2``); a screenshot is written.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell")

MEDIA_STATE_JS = """JSON.stringify({
  imgs: Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0,
                                                width: i.naturalWidth})),
  videos: Array.from(document.querySelectorAll('video')).map(v => ({src: v.getAttribute('src'),
      ok: v.readyState >= 2, readyState: v.readyState, error: v.error ? v.error.code : null,
      width: v.videoWidth, duration: v.duration})),
  canvases: document.querySelectorAll('canvas').length,
  canvasInk: Array.from(document.querySelectorAll('canvas')).map(c => {
    const t = document.createElement('canvas'); t.width = c.width; t.height = c.height;
    const x = t.getContext('2d'); x.drawImage(c, 0, 0);
    const d = x.getImageData(0, 0, c.width, c.height).data; let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] < 200 || d[i + 1] < 200 || d[i + 2] < 200) n++;
    return n;
  }),
  url: location.href,
  ready: document.readyState,
  title: document.title
})"""


def find_browser() -> str | None:
    """The first Chromium-family executable on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Session:
    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=20)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        end = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, end - time.monotonic())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = json.loads(self.ws.recv(timeout=max(0.05, end - time.monotonic())))
            except TimeoutError:
                return
            if "method" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.ws.close()


def _problems(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                               for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            en = p["entry"]
            out.append(f"{en.get('source')}: {en.get('text')} {en.get('url', '')}".strip())
    return out


def inspect_page(page: str | Path, screenshot: str | Path | None = None, browser: str | None = None,
                 wait_s: float = 20.0, width: int = 1280, max_height: int = 2400) -> dict[str, Any]:
    """Open ``page`` (a local HTML file) headless; wait until every image and video has loaded (or
    ``wait_s``). Returns ``{"errors": [...], "imgs": [...], "videos": [...], "canvases": n,
    "canvas_ink": [pixels darker than light grey, per canvas], "url", "screenshot": path or None}``; raises when no browser can be started."""
    exe = browser or find_browser()
    if exe is None:
        raise FileNotFoundError("no Chromium found on PATH (install Debian's `chromium`)")
    if not Path(page).is_file():
        raise FileNotFoundError(f"no page at {page}")
    url = Path(page).resolve().as_uri()
    port = _free_port()
    # Chromium's helper processes may still write into the profile for a moment after it exits
    with tempfile.TemporaryDirectory(prefix="d2-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
             "--disable-dev-shm-usage", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
             "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--hide-scrollbars",
             f"--window-size={width},900", f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        session = None
        try:
            ws_url = None
            end = time.monotonic() + 30
            while time.monotonic() < end and ws_url is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"{exe} exited with code {proc.returncode} before it listened")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                        pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
                    ws_url = pages[0]["webSocketDebuggerUrl"] if pages else None
                except OSError:
                    pass
                if ws_url is None:
                    time.sleep(0.2)
            if ws_url is None:
                raise RuntimeError(f"{exe} did not open its DevTools port {port} within 30 s")
            session = _Session(ws_url)
            for domain in ("Runtime", "Log", "Page"):
                session.call(f"{domain}.enable")
            nav = session.call("Page.navigate", url=url)
            if nav.get("errorText"):
                raise RuntimeError(f"{exe} could not open {url}: {nav['errorText']}")
            end = time.monotonic() + wait_s
            state: dict[str, Any] = {}
            while True:
                session.pump(0.3)
                res = session.call("Runtime.evaluate", expression=MEDIA_STATE_JS, returnByValue=True)
                state = json.loads(res.get("result", {}).get("value") or "{}")
                # the page itself (not the blank page before navigation), parsed, its media loaded
                loaded = state.get("ready") == "complete" and str(state.get("url", "")).startswith("file:") \
                    and all(i["ok"] for i in state.get("imgs", [])) and all(v["ok"] for v in state.get("videos", []))
                if loaded or time.monotonic() > end:
                    break
            session.pump(0.5)
            shot = None
            if screenshot is not None:
                metrics = session.call("Page.getLayoutMetrics")
                size = metrics.get("cssContentSize") or metrics.get("contentSize") or {}
                height = int(min(max_height, size.get("height", 900)))
                img = session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                   clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
                shot = Path(screenshot)
                shot.parent.mkdir(parents=True, exist_ok=True)
                shot.write_bytes(base64.b64decode(img["data"]))
            return {"errors": _problems(session.events), "imgs": state.get("imgs", []),
                    "videos": state.get("videos", []), "canvases": state.get("canvases", 0),
                    "url": state.get("url"), "canvas_ink": state.get("canvasInk", []),
                    "screenshot": str(shot) if shot else None}
        finally:
            if session is not None:
                try:
                    session.close()
                except Exception:  # noqa: BLE001  (the browser is being shut down anyway)
                    pass
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for _ in range(20):  # then the profile goes, once its last writer is gone
                shutil.rmtree(profile, ignore_errors=True)
                if not os.path.exists(profile):
                    break
                time.sleep(0.25)
