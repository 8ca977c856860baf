"""The dashboard's web side: one request handler, a WSGI and an ASGI adapter, a server.

Routes (relative, so the app can be mounted under any prefix):

===================  ===========================================================
``/``                the page (static/index.html)
``/static/<file>``   its script and style sheet; nothing is fetched from elsewhere
``/api/snapshot``    :func:`shmcache.metrics.snapshot` as JSON (503 while absent)
``/metrics``         Prometheus text of the same figures
``/healthz``         ``ok``
===================  ===========================================================

The page polls ``api/snapshot`` and keeps its history in the browser, so the server
holds no state beyond the attached segment.  Responses carry a Content-Security-Policy
of ``'self'`` only: the page cannot load anything from another origin, by design.
Requests are logged on ``shmcache.http`` at DEBUG level (method, path, status).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from socketserver import ThreadingMixIn
from typing import Any, Final
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..errors import ShmCacheError
from ..logs import HTTP, get_logger
from ..metrics import SegmentCollector, SegmentSource
from ..segment import Segment

__all__ = ["Dashboard", "Response", "make_wsgi_app", "make_asgi_app", "serve",
           "make_server_for"]

_log = get_logger(HTTP)

_STATIC_FILES: Final = frozenset({"app.js", "charts.js", "style.css"})
_CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; "
               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
               "form-action 'none'; frame-ancestors 'none'")
_COMMON_HEADERS: Final = (("Content-Security-Policy", _CSP),
                          ("X-Content-Type-Options", "nosniff"),
                          ("Referrer-Policy", "no-referrer"))

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]],
                    Callable[[MutableMapping[str, Any]], Awaitable[None]]], Awaitable[None]]


@dataclass
class Response:
    """What the handler answers: a status line, headers and the whole body."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def status_line(self) -> str:
        reason = {200: "OK", 301: "Moved Permanently", 404: "Not Found",
                  405: "Method Not Allowed", 503: "Service Unavailable"}.get(self.status, "")
        return f"{self.status} {reason}".rstrip()

    def all_headers(self) -> list[tuple[str, str]]:
        return [("Content-Type", self.content_type),
                ("Content-Length", str(len(self.body))), *_COMMON_HEADERS, *self.headers]


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


class Dashboard:
    """The dashboard of one segment (a name, an open :class:`Segment` or a
    :class:`SegmentSource`).  ``interval`` is the page's default refresh period.

    >>> from shmcache import Segment, unlink_segment
    >>> seg = Segment.create("doc-dashboard", size=8 << 20)
    >>> d = Dashboard(seg)
    >>> d.handle("GET", "/healthz").body, d.handle("GET", "/api/snapshot").status
    (b'ok', 200)
    >>> seg.close(); unlink_segment("doc-dashboard")
    True
    """

    def __init__(self, segment: Segment | str | SegmentSource, *,
                 interval: float = 1.0) -> None:
        self.source = segment if isinstance(segment, SegmentSource) else \
            SegmentSource(segment)
        self.interval = interval
        self.collector = SegmentCollector(self.source)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Detach the segment (if this dashboard attached it)."""
        self.source.close()

    def handle(self, method: str, path: str, query: str = "") -> Response:
        """Answer one request; ``path`` is relative to where the app is mounted."""
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers=[("Allow", "GET, HEAD")])
        if path in ("/", "/index.html"):
            page = _static("index.html").replace(
                b"__INTERVAL_MS__", str(int(self.interval * 1000)).encode()).replace(
                b"__SEGMENT__", _html_escape(self.source.name).encode())
            return Response(200, page, "text/html; charset=utf-8",
                            [("Cache-Control", "no-cache")])
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if name not in _STATIC_FILES:
                return Response(404, b"not found\n")
            ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            return Response(200, _static(name), ctype, [("Cache-Control", "no-cache")])
        if path == "/api/snapshot":
            return self._snapshot(query)
        if path == "/metrics":
            return self._metrics()
        if path == "/healthz":
            return Response(200, b"ok")
        return Response(404, b"not found\n")

    def _snapshot(self, query: str) -> Response:
        fold = parse_qs(query).get("fold", ["1"])[0] != "0"
        try:
            snap = self.source.snapshot(fold=fold)
            error = f"no segment named {self.source.name!r} yet"
        except ShmCacheError as e:  # foreign, of another layout, corrupt, busy
            snap, error = None, f"cannot read segment {self.source.name!r}: {type(e).__name__}"
            _log.warning("%s", error)
        if snap is None:
            body = json.dumps({"error": error, "segment": self.source.name}).encode()
            return Response(503, body, "application/json",
                            [("Cache-Control", "no-store"), ("Retry-After", "1")])
        return Response(200, json.dumps(snap, separators=(",", ":")).encode(),
                        "application/json", [("Cache-Control", "no-store")])

    def _metrics(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        reg = CollectorRegistry(auto_describe=False)
        reg.register(self.collector)
        return Response(200, generate_latest(reg), CONTENT_TYPE_LATEST,
                        [("Cache-Control", "no-store")])


def _html_escape(s: str) -> str:
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _dashboard(segment: Segment | str | SegmentSource | Dashboard,
               interval: float) -> Dashboard:
    return segment if isinstance(segment, Dashboard) else Dashboard(segment,
                                                                     interval=interval)


def make_wsgi_app(segment: Segment | str | SegmentSource | Dashboard, *,
                  interval: float = 1.0) -> WSGIApp:
    """A WSGI app serving the dashboard; mount it under any prefix (Flask:
    ``DispatcherMiddleware(app.wsgi_app, {"/cache": make_wsgi_app(name)})``)."""
    dash = _dashboard(segment, interval)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if path == "":
            # Mounted at /prefix and asked for /prefix: the page's relative links
            # need the trailing slash.
            loc = environ.get("SCRIPT_NAME", "") + "/"
            resp = Response(301, b"", headers=[("Location", loc)])
        else:
            resp = dash.handle(method, path, environ.get("QUERY_STRING", ""))
        start_response(resp.status_line, resp.all_headers())
        _log.debug("%s %s %d", method, path, resp.status)
        return [b"" if method == "HEAD" else resp.body]

    app.dashboard = dash  # type: ignore[attr-defined]
    return app


def make_asgi_app(segment: Segment | str | SegmentSource | Dashboard, *,
                  interval: float = 1.0) -> ASGIApp:
    """An ASGI app serving the dashboard (FastAPI/Starlette:
    ``app.mount("/cache", make_asgi_app(name))``).  Reading the segment is a memory
    operation of a few milliseconds at most; it runs in a worker thread anyway so a
    busy segment lock never stalls the event loop."""
    dash = _dashboard(segment, interval)

    async def app(scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                  send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        root = scope.get("root_path", "")
        path: str = scope["path"]
        # Starlette's Mount keeps the full path and extends root_path; servers that
        # strip it already leave path relative.  Either way, make it relative.
        if root and path.startswith(root):
            path = path[len(root):]
        method = scope.get("method", "GET")
        if path == "":
            resp = Response(301, b"", headers=[("Location", root + "/")])
        else:
            query = scope.get("query_string", b"").decode("latin-1")
            resp = await asyncio.to_thread(dash.handle, method, path, query)
        await send({"type": "http.response.start", "status": resp.status,
                    "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                for k, v in resp.all_headers()]})
        await send({"type": "http.response.body",
                    "body": b"" if method == "HEAD" else resp.body})
        _log.debug("%s %s %d", method, path, resp.status)

    app.dashboard = dash  # type: ignore[attr-defined]
    return app


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        _log.debug("%s " + format, self.client_address[0], *args)


def make_server_for(segment: Segment | str | SegmentSource, *, host: str = "127.0.0.1",
                    port: int = 8321, interval: float = 1.0) -> WSGIServer:
    """A threading HTTP server of the dashboard, bound but not yet serving
    (``server.server_address`` has the port when ``port=0``)."""
    return make_server(host, port, make_wsgi_app(segment, interval=interval),
                       server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)


def serve(segment: Segment | str, *, host: str = "127.0.0.1", port: int = 8321,
          interval: float = 1.0) -> None:
    """Serve the dashboard until interrupted (SIGINT or SIGTERM); prints its URL."""
    httpd = make_server_for(segment, host=host, port=port, interval=interval)
    app = httpd.get_app()
    bound_host, bound_port = httpd.server_address[:2]
    name = segment.name if isinstance(segment, Segment) else segment
    print(f"shmcache dashboard for {name!r} on http://{bound_host!s}:{bound_port}/",
          flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        if app is not None:
            app.dashboard.close()  # type: ignore[attr-defined]
        sys.stdout.flush()
