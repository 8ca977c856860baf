"""Small WSGI and ASGI applications for the HTTP cache tests, in-process and behind
real servers (gunicorn, uvicorn: ``http_apps:wsgi_application`` /
``http_apps:asgi_application`` with ``SHMCACHE_NAME`` set and this directory on
``PYTHONPATH``).

The response is steered by the query string, so every test picks its own headers (and,
with a token ``t=...``, its own URL):

* ``h=Name:value`` (repeatable): a response header; ``status=404``: the status;
* ``echo=cookie``: the body shows that request header (personal content);
* ``fixed=1``: the body does not show the computation count or the pid (identical
  content from any worker, for ETag comparisons);
* ``size=N``: N more body bytes, ``stream=1`` in 4 KiB chunks, ``write=1`` through the
  WSGI ``write()`` callable;
* ``go=1``: before answering, wait until the test sets ``go:<t>`` in the segment.

Every computation increments the segment counter ``n:<path>?<query>`` (read it with
:func:`computes`), so a test sees how often the application really ran, whichever
process ran it.  ``/block?t=`` occupies a worker until ``release:<t>`` is set (it first
sets ``blocked:<t>`` to its pid): tests use it to choose which gunicorn/uvicorn worker
answers the next request.  Every response passes an outer layer that adds
``X-Served-By: <pid>`` and counts arrivals (``a:<path>?<query>``) before the cache.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from shmcache import MISSING, Cache
from shmcache.http import ASGICacheMiddleware, CacheMiddleware

#: How long an app waits for a test's signal before giving up (a bound, not a timing).
WAIT = 20.0


def computes(cache: Cache, path_qs: str) -> int:
    """How many times the application computed ``path_qs`` (``/r?t=...``)."""
    return cache.incr("n:" + path_qs, 0)


def arrivals(cache: Cache, path_qs: str) -> int:
    """How many requests for ``path_qs`` reached the outer layer (before the cache)."""
    return cache.incr("a:" + path_qs, 0)


def _wait_key(cache: Cache, key: str) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if cache.get(key, MISSING) is not MISSING:
            return True
        time.sleep(0.002)
    return False


class Plan:
    """What ``/r`` answers to one request (parsed from its query string)."""

    def __init__(self, cache: Cache, method: str, path: str, query: str,
                 header: Callable[[str], str | None]) -> None:
        self.cache = cache
        self.path_qs = f"{path}?{query}"
        args = parse_qsl(query, keep_blank_values=True)
        self.params = dict(args)
        self.headers = [tuple(v.split(":", 1)) for k, v in args if k == "h"]
        self.status = int(self.params.get("status", "200"))
        self.method = method
        self.header = header

    def compute(self) -> bytes:
        n = self.cache.incr("n:" + self.path_qs)
        if self.params.get("go") and not _wait_key(self.cache, "go:" + self.params["t"]):
            raise RuntimeError("test never said go")
        if self.params.get("fixed"):
            head = f"fixed {self.path_qs}\n"
        else:
            head = f"count={n} pid={os.getpid()} {self.path_qs}\n"
        echo = self.params.get("echo")
        if echo:
            head += f"{echo}={self.header(echo)}\n"
        return head.encode()

    def padding(self) -> Iterator[bytes]:
        size = int(self.params.get("size", "0"))
        step = 4096 if self.params.get("stream") else max(size, 1)
        for off in range(0, size, step):
            yield b"x" * min(step, size - off)


# -- WSGI -----------------------------------------------------------------------------------

def make_wsgi_app(cache: Cache) -> Callable[..., Iterable[bytes]]:
    """The inner WSGI application (no cache)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            start_response("200 OK", [("Cache-Control", "no-store"),
                                      ("Content-Type", "text/plain")])
            return [b"ok"]
        if path == "/block":
            t = dict(parse_qsl(environ.get("QUERY_STRING", "")))["t"]
            cache.set("blocked:" + t, os.getpid())
            released = _wait_key(cache, "release:" + t)
            start_response("200 OK", [("Cache-Control", "no-store")])
            return [f"released={released} pid={os.getpid()}".encode()]

        def header(name: str) -> str | None:
            key = "HTTP_" + name.upper().replace("-", "_")
            v = environ.get(key)
            return None if v is None else str(v)

        plan = Plan(cache, environ["REQUEST_METHOD"], path, environ.get("QUERY_STRING", ""),
                    header)
        head = plan.compute()
        headers = [("Content-Type", "text/plain")] + [(k, v) for k, v in plan.headers]
        status = f"{plan.status} {HTTPStatus(plan.status).phrase}"
        if plan.params.get("write"):
            write = start_response(status, headers)
            write(head)
            for chunk in plan.padding():
                write(chunk)
            return []
        start_response(status, headers)
        if plan.params.get("stream"):
            return _gen(head, plan.padding())
        return [head + b"".join(plan.padding())]

    return app


def _gen(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from rest


def wsgi_outer(inner: Callable[..., Iterable[bytes]], cache: Cache) -> Callable[..., Any]:
    """Count arrivals and add ``X-Served-By`` outside the cache middleware."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        cache.incr(f"a:{environ.get('PATH_INFO', '')}?{environ.get('QUERY_STRING', '')}")

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, headers + [("X-Served-By", str(os.getpid()))],
                                  exc_info)
        return inner(environ, start)

    return app


# -- ASGI -----------------------------------------------------------------------------------

def make_asgi_app(cache: Cache) -> Callable[..., Any]:
    """The inner ASGI application (no cache)."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any],
                  send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")

        async def respond(status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.encode(), v.encode()) for k, v in headers]})
            await send({"type": "http.response.body", "body": body})

        if path == "/health":
            await respond(200, [("cache-control", "no-store")], b"ok")
            return
        if path == "/block":
            # Blocks this worker's event loop on purpose: the test needs the *other*
            # worker to accept the next connection.
            t = dict(parse_qsl(query))["t"]
            cache.set("blocked:" + t, os.getpid())
            released = _wait_key(cache, "release:" + t)
            await respond(200, [("cache-control", "no-store")],
                          f"released={released} pid={os.getpid()}".encode())
            return
        hdrs: dict[str, str] = {}
        for k, v in scope.get("headers", ()):
            name = k.decode("latin-1").lower()
            hdrs[name] = hdrs[name] + ", " + v.decode("latin-1") if name in hdrs \
                else v.decode("latin-1")
        plan = Plan(cache, scope["method"], path, query, hdrs.get)
        head = plan.compute()
        headers = [("content-type", "text/plain")] + [(k, v) for k, v in plan.headers]
        await send({"type": "http.response.start", "status": plan.status,
                    "headers": [(k.encode(), v.encode()) for k, v in headers]})
        if plan.params.get("stream"):
            await send({"type": "http.response.body", "body": head, "more_body": True})
            for chunk in plan.padding():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        else:
            await send({"type": "http.response.body",
                        "body": head + b"".join(plan.padding())})

    return app


def asgi_outer(inner: Callable[..., Any], cache: Cache) -> Callable[..., Any]:
    """Count arrivals and add ``X-Served-By`` outside the cache middleware."""

    async def app(scope: dict[str, Any], receive: Callable[..., Any],
                  send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        cache.incr(f"a:{scope['path']}?{scope.get('query_string', b'').decode('latin-1')}")

        async def marked(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": list(msg.get("headers", []))
                       + [(b"x-served-by", str(os.getpid()).encode())]}
            await send(msg)
        await inner(scope, receive, marked)

    return app


# -- what the servers import ----------------------------------------------------------------

#: The options both servers run with.
SERVER_OPTIONS: dict[str, Any] = {"single_flight": True, "max_body_size": 64 << 10,
                                  "wait_timeout": WAIT}

_cache: Cache | None = None


def _server_cache() -> Cache:
    global _cache
    if _cache is None:
        _cache = Cache()  # SHMCACHE_NAME / SHMCACHE_SIZE_MB from the test's environment
        _cache.incr("workers_started")
    return _cache


def _build_wsgi() -> Callable[..., Any]:
    cache = _server_cache()
    return wsgi_outer(CacheMiddleware(make_wsgi_app(cache), cache, **SERVER_OPTIONS), cache)


def _build_asgi() -> Callable[..., Any]:
    cache = _server_cache()
    return asgi_outer(ASGICacheMiddleware(make_asgi_app(cache), cache, **SERVER_OPTIONS),
                      cache)


def __getattr__(name: str) -> Any:
    # Built on first access, in the worker that imports us: importing this module in
    # the tests themselves opens no segment.
    if name == "wsgi_application":
        return _build_wsgi()
    if name == "asgi_application":
        return _build_asgi()
    raise AttributeError(name)
