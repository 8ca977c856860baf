"""The dashboard: its HTTP routes from the real ``shmcache dashboard`` server, mounted
in a WSGI and an ASGI application, and the page itself in a headless Chromium.

The browser test drives Debian's chromium over the DevTools protocol (a minimal
websocket client below: the standard library has none), waits until the page has fed
every chart several samples of live data from a segment that a separate process keeps
busy, checks that nothing was fetched from another origin, and saves a screenshot to
build/artifacts/dashboard.png.  Without /usr/bin/chromium it fails (``make test``
installs it) unless SHMCACHE_NO_BROWSER=1.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIServer, make_server

import pytest
from _helpers import new_name
from prometheus_client.parser import text_string_to_metric_families

from shmcache import Segment, unlink_segment
from shmcache.dashboard import make_asgi_app, make_wsgi_app

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

LOAD = textwrap.dedent("""
    import random, sys, threading, time
    from shmcache import Cache, CacheConfig
    from shmcache.metrics import enable
    cache = Cache(CacheConfig(name=sys.argv[1], c_memory_size_mb=16))
    pub = enable(cache, interval=0.1)

    @cache.cached(ttl=60, name="get_user")
    def get_user(i):
        return {"id": i, "pad": "x" * (i % 700)}

    @cache.cached(ttl=1, name="build_report")
    def build_report(i):
        return "r" * (i * 37 % 5000)

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    rnd = random.Random(7)
    while not stop.is_set():
        for _ in range(100):
            get_user(rnd.randint(0, 300))
            build_report(rnd.randint(0, 60))
            cache.get(f"k{rnd.randint(0, 1000)}")
            if rnd.random() < 0.2:
                cache.set(f"k{rnd.randint(0, 1000)}", "v" * rnd.randint(1, 6000), ttl=1)
        stop.wait(0.005)   # pace the load; not a synchronisation
    pub.stop()
    cache.close()
""")


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


def _get_no_redirect(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=30) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location", "")


@pytest.fixture(scope="module")
def busy() -> Iterator[str]:
    """A segment another process keeps busy (and publishes its figures for)."""
    name = new_name("dash-")
    p = subprocess.Popen([sys.executable, "-c", LOAD, name], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    try:
        yield name
    finally:
        assert p.stdin is not None
        p.stdin.close()
        try:
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            unlink_segment(name)


class DashboardProcess:
    """``python -m shmcache dashboard --port 0`` and the URL it prints."""

    def __init__(self, name: str, interval: float = 0.2) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmcache", "dashboard", "-n", name, "--port", "0",
             "--interval", str(interval)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert " on http://" in line, f"dashboard did not start: {line!r}"
        self.url = line.rsplit(" on ", 1)[1].strip()

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def dashboard(busy: str) -> Iterator[DashboardProcess]:
    d = DashboardProcess(busy)
    try:
        yield d
    finally:
        assert d.stop() == 0      # SIGTERM ends it cleanly (its slot is released)


def test_routes_and_headers(dashboard: DashboardProcess, busy: str) -> None:
    status, headers, body = _get(dashboard.url)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    html = body.decode()
    assert 'data-interval="200"' in html and busy in html
    for chart in ("hitratio", "ops", "memory", "frag", "removals", "workers", "sidecar"):
        assert f'id="chart-{chart}"' in html
    assert "http://" not in html and "https://" not in html   # nothing from elsewhere

    status, headers, body = _get(dashboard.url + "static/charts.js")
    assert status == 200 and "javascript" in headers["Content-Type"]
    assert b"class LineChart" in body
    assert _get(dashboard.url + "static/../server.py")[0] == 404
    assert _get(dashboard.url + "static/nope.js")[0] == 404
    assert _get(dashboard.url + "api/snapshot", method="POST")[0] == 405

    status, headers, body = _get(dashboard.url + "api/snapshot")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    snap = json.loads(body)
    assert snap["segment"] == busy
    assert snap["cache"]["groups"]["functions"].keys() >= {"get_user", "build_report"}
    assert len(snap["slots"]) >= 2                  # the load process and the dashboard

    status, _, body = _get(dashboard.url + "metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert fams["shmcache_up"].samples[0].value == 1
    assert _get(dashboard.url + "healthz")[2] == b"ok"


def test_waits_for_the_segment_then_follows_it() -> None:
    name = new_name("dashwait-")
    d = DashboardProcess(name)
    try:
        status, headers, body = _get(d.url + "api/snapshot")
        assert status == 503 and "no segment named" in json.loads(body)["error"]
        assert headers["Retry-After"] == "1"
        with Segment.create(name, size=8 << 20) as seg:
            seg.set("a", b"1")
            status, _, body = _get(d.url + "api/snapshot")
            assert status == 200 and json.loads(body)["stats"]["entries"] == 1
    finally:
        assert d.stop() == 0
        unlink_segment(name)


def _serve_wsgi(app: Any) -> tuple[WSGIServer, threading.Thread]:
    httpd = make_server("127.0.0.1", 0, app)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    return httpd, t


def test_mounted_in_a_wsgi_app(busy: str) -> None:
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    flask_app = Flask("host-app")

    @flask_app.get("/")
    def home() -> str:
        return "the application"

    dash = make_wsgi_app(busy)
    flask_app.wsgi_app = DispatcherMiddleware(flask_app.wsgi_app,  # type: ignore[method-assign]
                                              {"/ops/cache": dash})
    httpd, t = _serve_wsgi(flask_app)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert _get(base + "/")[2] == b"the application"
        assert _get_no_redirect(base + "/ops/cache") == (301, "/ops/cache/")
        status, _, body = _get(base + "/ops/cache/")
        assert status == 200 and b'src="static/app.js"' in body    # relative links
        status, _, body = _get(base + "/ops/cache/api/snapshot")
        assert status == 200 and json.loads(body)["segment"] == busy
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(10)
        dash.dashboard.close()  # type: ignore[attr-defined]


def test_mounted_in_an_asgi_app(busy: str) -> None:
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    def home() -> dict[str, str]:
        return {"app": "host"}

    dash = make_asgi_app(busy)
    app.mount("/ops/cache", dash)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    try:
        assert json.loads(_get(base + "/")[2]) == {"app": "host"}
        # Starlette's Mount or the app itself sends the browser to the slash form.
        status, location = _get_no_redirect(base + "/ops/cache")
        assert status in (301, 307) and location.endswith("/ops/cache/")
        status, headers, body = _get(base + "/ops/cache/")
        assert status == 200 and b"chart-workers" in body
        assert "default-src 'none'" in headers["content-security-policy"]
        status, _, body = _get(base + "/ops/cache/api/snapshot")
        assert status == 200 and json.loads(body)["segment"] == busy
        assert _get(base + "/ops/cache/static/app.js")[0] == 200
    finally:
        server.should_exit = True
        t.join(30)
        dash.dashboard.close()  # type: ignore[attr-defined]


# -- a minimal DevTools-protocol client ----------------------------------------------------

class CDP:
    """JSON-RPC over one websocket (RFC 6455 client side: masked text frames)."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        u = urlsplit(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                           f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "devtools closed the connection during the handshake"
            head += chunk
        assert head.split(b"\r\n", 1)[0].split()[1] == b"101", head[:200]
        self.buf = head.split(b"\r\n\r\n", 1)[1]
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            assert chunk, "devtools closed the connection"
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _message(self) -> bytes:
        data = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:                 # ping
                self._send(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("devtools closed the websocket")
            data += payload
            if b0 & 0x80:                     # FIN
                return data

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        self._send(0x1, json.dumps({"id": mid, "method": method, "params": params}).encode())
        while True:
            msg = json.loads(self._message())
            if msg.get("id") == mid:
                assert "error" not in msg, msg
                result: dict[str, Any] = msg["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def chromium() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("SHMCACHE_NO_BROWSER") == "1":
            pytest.skip("SHMCACHE_NO_BROWSER=1 and no chromium")
        pytest.fail("chromium is not installed: apt-get install -y --no-install-recommends "
                    "chromium (make test installs it); SHMCACHE_NO_BROWSER=1 skips this")
    profile = tempfile.mkdtemp(prefix="shmcache-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
         "--window-size=1280,1500", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Chromium picks a free port and writes it to DevToolsActivePort.
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its devtools port"
            time.sleep(0.05)
        yield proc, int(port_file.read_text().split()[0])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _page_websocket(port: int) -> str:
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        assert time.monotonic() < deadline, "no page target in chromium"
        time.sleep(0.05)


def test_page_renders_live_charts_in_chromium(
        chromium: tuple[subprocess.Popen[bytes], int], dashboard: DashboardProcess) -> None:
    _, port = chromium
    cdp = CDP(_page_websocket(port))
    try:
        cdp.call("Page.enable")
        cdp.call("Page.navigate", url=dashboard.url + "?interval=0.2")
        want = 4
        probe = """(() => {
            if (!document.getElementById('top-table')) return null;   // still loading
            const charts = [...document.querySelectorAll('canvas')].map(
                c => [c.id, Number(c.dataset.points || 0), Number(c.dataset.bars || -1)]);
            return {state: document.body.dataset.state,
                    points: Number(document.body.dataset.points || 0), charts,
                    rows: Number(document.getElementById('top-table').dataset.rows),
                    hit: window.shmcacheDashboard &&
                         window.shmcacheDashboard.charts.hitratio.last(
                             'C_MEMORY (engine, all processes)'),
                    ops: window.shmcacheDashboard &&
                         window.shmcacheDashboard.charts.ops.last('total'),
                    status: document.getElementById('status').textContent};
        })()"""
        deadline = time.monotonic() + 60
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = cdp.evaluate(probe) or {}
            if state.get("points", 0) >= want and \
                    all(p >= want for _, p, _ in state["charts"]):
                break
            time.sleep(0.1)
        assert state.get("state") == "live", state
        assert state["points"] >= want, f"charts got too few samples: {state}"
        assert len(state["charts"]) == 7
        assert all(p >= want for _, p, _ in state["charts"]), state["charts"]
        bars = dict((cid, b) for cid, _, b in state["charts"])
        assert bars["chart-memory"] > 0 and bars["chart-workers"] >= 2  # classes, workers
        assert state["rows"] == 2                  # get_user and build_report
        assert state["ops"] > 0 and 0 < state["hit"] <= 1, state
        # Everything the page loaded came from the dashboard's own origin.
        urls = cdp.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        origin = dashboard.url.rstrip("/")
        assert urls and all(u.startswith(origin) for u in urls), urls
        shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        png = base64.b64decode(shot["data"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "dashboard.png").write_bytes(png)
    finally:
        cdp.close()
