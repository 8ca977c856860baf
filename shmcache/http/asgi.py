"""ASGI response caching: :class:`ASGICacheMiddleware`.

The ASGI edge of the same cache as :class:`~shmcache.http.wsgi.CacheMiddleware` (same
options, same decisions from ``store.py`` / ``policy.py``, same keys and entries: a WSGI
and an ASGI application behind one segment share responses).  Only ``http`` scopes are
cached; ``websocket`` and ``lifespan`` go straight to the application.

A response is buffered from its ``http.response.start`` while it may still be stored;
as soon as it may not (the policy refuses it, it is larger than ``max_body_size``, it
has trailers or uses a send extension) the start message and what was buffered go out
and the rest streams through.  Engine calls are memory operations that never block on
I/O, so they run on the event loop directly; waiting for another process's fill
(single flight) sleeps with ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from .policy import StoreDecision
from .store import Entry, Found, HttpRequest, HttpStore, Response, StoreFront

__all__ = ["ASGICacheMiddleware"]

_log = logging.getLogger("shmcache.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CONDITIONAL = (b"if-none-match", b"if-modified-since")


def _decode_headers(raw: Sequence[Sequence[bytes]]) -> list[tuple[str, str]]:
    return [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw]


def _encode_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    # ASGI: "Header names must be lowercased" (entries stored through WSGI are not).
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def _unconditional(scope: Scope) -> Scope:
    s = dict(scope)
    s["headers"] = [(k, v) for k, v in scope.get("headers", ())
                    if bytes(k).lower() not in _CONDITIONAL]
    return s


async def _send_response(send: Send, resp: Response) -> None:
    await send({"type": "http.response.start", "status": resp.status,
                "headers": _encode_headers(resp.headers)})
    await send({"type": "http.response.body", "body": resp.body, "more_body": False})


class _Fill:
    """One GET miss: the ``send`` the application sees.  Buffers while the response
    may be stored, streams through from the moment it may not."""

    def __init__(self, store: HttpStore, req: HttpRequest, send: Send,
                 lease: tuple[str, int] | None, epoch: bytes | None) -> None:
        self.store = store
        self.req = req
        self.real_send = send
        self.lease = lease
        self.epoch = epoch
        self.start: Message | None = None
        self.headers: list[tuple[str, str]] = []
        self.decision: StoreDecision | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.passing = False
        self.done = False

    def release(self) -> None:
        self.store.release(self.lease)
        self.lease = None

    async def _go_pass(self, more_body: bool = True) -> None:
        self.passing = True
        self.store.stats.not_stored += 1
        self.release()
        assert self.start is not None
        await self.real_send({**self.start,
                              "headers": _encode_headers(self.store.miss_headers(self.headers))})
        if self.chunks:
            body, self.chunks = b"".join(self.chunks), []
            await self.real_send({"type": "http.response.body", "body": body,
                                  "more_body": more_body})
        elif not more_body:
            await self.real_send({"type": "http.response.body", "body": b"",
                                  "more_body": False})

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.passing:
            await self.real_send(message)
            return
        if kind == "http.response.start":
            self.start = dict(message)
            self.headers = _decode_headers(message.get("headers", ()))
            self.decision = d = self.store.decide(self.req, int(message["status"]), self.headers)
            if message.get("trailers") or not d.store or \
                    not self.store.storable_headers(d, self.headers):
                await self._go_pass()
            return
        if kind == "http.response.body" and self.start is not None:
            body = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            self.chunks.append(body)
            self.size += len(body)
            if self.size > self.store.max_body_size:
                await self._go_pass(more_body=more)
            elif not more:
                await self._finish()
            return
        # Trailers, pathsend, zero-copy and other extensions: not something we store.
        if self.start is not None:
            await self._go_pass()
        await self.real_send(message)

    async def _finish(self) -> None:
        assert self.start is not None and self.decision is not None
        try:
            resp = self.store.complete(self.req, self.decision, int(self.start["status"]),
                                       "", self.headers, b"".join(self.chunks), self.epoch)
        finally:
            self.release()
        self.done = True
        self.chunks = []
        await _send_response(self.real_send, resp)

    async def app_returned(self) -> None:
        """The application returned: if it left a response half-buffered, hand what
        it sent to the server as it was (the server then deals with the short
        response, as without the middleware)."""
        self.release()
        if not self.passing and not self.done and self.start is not None:
            await self._go_pass()


class ASGICacheMiddleware(StoreFront):
    """ASGI middleware caching whole responses in a shared :class:`~shmcache.Cache`;
    the options are :class:`~shmcache.http.CacheMiddleware`'s (see ``docs/http.md``).

    Example::

        >>> import asyncio
        >>> from shmcache import Cache, CacheConfig
        >>> async def app(scope, receive, send):
        ...     await send({"type": "http.response.start", "status": 200,
        ...                 "headers": [(b"cache-control", b"max-age=60")]})
        ...     await send({"type": "http.response.body", "body": b"hello"})
        >>> cache = Cache(CacheConfig(name="doc-http-asgi", c_memory_size_mb=8))
        >>> wrapped = ASGICacheMiddleware(app, cache)
        >>> async def get():
        ...     sent = []
        ...     async def receive(): return {"type": "http.request", "body": b""}
        ...     async def send(m): sent.append(m)
        ...     await wrapped({"type": "http", "method": "GET", "scheme": "http",
        ...                    "path": "/", "query_string": b"",
        ...                    "headers": [(b"host", b"example.com")]}, receive, send)
        ...     return dict(sent[0]["headers"])[b"x-cache"], sent[1]["body"]
        >>> asyncio.run(get()), asyncio.run(get())
        ((b'MISS', b'hello'), (b'HIT', b'hello'))
        >>> cache.close(); cache.unlink()
    """

    app: ASGIApp

    def _request(self, scope: Scope) -> HttpRequest:
        headers: dict[str, list[str]] = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(bytes(k).decode("latin-1").lower(), []).append(
                bytes(v).decode("latin-1"))
        scheme = str(scope.get("scheme", "http"))
        host_lines = headers.get("host")
        if host_lines:
            host = host_lines[0]
        else:
            server = scope.get("server") or ("", None)
            host = str(server[0]) if server[1] is None else f"{server[0]}:{server[1]}"
        query = bytes(scope.get("query_string", b"")).decode("latin-1")
        return self.store.request(str(scope.get("method", "GET")), scheme, host,
                                  str(scope.get("path", "/")) or "/", query, headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        store = self.store
        req = self._request(scope)
        action, found = store.begin(req)
        if action == "hit":
            assert found.entry is not None
            await _send_response(send, store.hit_response(req, found.entry))
            return
        if action == "stale":
            await self._stale(scope, req, found, send)
            return
        if action == "unsafe":
            await self._unsafe(scope, receive, send, req)
            return
        if action == "gateway-timeout":
            await _send_response(send, store.gateway_timeout())
            return
        if action in ("pass", "bypass"):
            await self._pass(scope, receive, send)
            return
        lease: tuple[str, int] | None = None
        if store.single_flight and not store.forced_miss(req):
            lease, entry = await self._wait(req, found)
            if entry is not None:
                await _send_response(send, store.hit_response(req, entry))
                return
        fill = _Fill(store, req, send, lease, store.epoch(req))
        try:
            # Unconditional, so the application produces the response to store; the
            # client's conditions are answered from it (RFC 9111 §4.3.2).
            await self.app(_unconditional(scope), receive, fill.send)
        finally:
            fill.release()
        await fill.app_returned()

    async def _wait(self, req: HttpRequest,
                    found: Found) -> tuple[tuple[str, int] | None, Entry | None]:
        flow = self.store.fill_flow(req, found)
        try:
            while True:
                await asyncio.sleep(next(flow))
        except StopIteration as stop:
            result: tuple[tuple[str, int] | None, Entry | None] = stop.value
            return result

    async def _pass(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = self.store.miss_headers(_decode_headers(message.get("headers", ())))
                message = {**message, "headers": _encode_headers(headers)}
            await send(message)
        await self.app(scope, receive, marked)

    async def _unsafe(self, scope: Scope, receive: Receive, send: Send,
                      req: HttpRequest) -> None:
        seen: list[tuple[int, list[tuple[str, str]]]] = []

        async def watching(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = _decode_headers(message.get("headers", ()))
                seen[:] = [(status, headers)]
                self.store.invalidate_request(req, status, headers)  # RFC 9111 §4.4
                message = {**message,
                           "headers": _encode_headers(self.store.miss_headers(headers))}
            await send(message)
        try:
            await self.app(scope, receive, watching)
        finally:
            # Again once the application is done, for a GET that computed the old
            # state and stored it while this request was still running.
            if seen:
                self.store.invalidate_request(req, *seen[0])

    async def _stale(self, scope: Scope, req: HttpRequest, found: Found, send: Send) -> None:
        assert found.entry is not None
        await _send_response(send, self.store.hit_response(req, found.entry))
        lease = self.store.lease(found.variant or req.key)
        if lease is not None:
            # The client has its whole response; the refresh runs on in this task.
            await self._refresh(scope, req, lease)

    async def _refresh(self, scope: Scope, req: HttpRequest, lease: tuple[str, int]) -> None:
        """Revalidate a stale entry after its response went out: run the application
        on a plain GET of the same URL and store what it may (RFC 5861 §3)."""
        store = self.store
        store.stats.refreshes += 1
        finished = asyncio.Event()
        first = True

        async def receive() -> Message:
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": b"", "more_body": False}
            await finished.wait()  # like a live connection: nothing until the end
            return {"type": "http.disconnect"}

        start: list[Message] = []
        chunks: list[bytes] = []
        complete = [False]

        async def collect(message: Message) -> None:
            if message["type"] == "http.response.start":
                start[:] = [message]
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
                if not message.get("more_body", False):
                    complete[0] = True

        try:
            get = store.refresh_request(req)
            epoch = store.epoch(get)
            s = _unconditional(scope)
            s["method"] = "GET"
            await self.app(s, receive, collect)
            size = sum(len(c) for c in chunks)
            if not start or not complete[0] or size > store.max_body_size:
                return
            status = int(start[0]["status"])
            headers = _decode_headers(start[0].get("headers", ()))
            d = store.decide(get, status, headers)
            if d.store and store.storable_headers(d, headers):
                store.complete(get, d, status, "", headers, b"".join(chunks), epoch)
            else:
                store.stats.not_stored += 1
        except Exception as e:  # noqa: BLE001 - the client already has its response
            store.stats.refresh_errors += 1
            _log.warning("shmcache.http: background refresh failed (%s); the stale "
                         "response is served until it expires", type(e).__name__)
        finally:
            finished.set()
            store.release(lease)
