"""WSGI response caching: :class:`CacheMiddleware`.

Serves stored responses without entering the application and stores what RFC 9111
allows a shared cache to store (``policy.py`` decides, ``store.py`` keeps the bytes in
the segment).  This module is only the WSGI edge: environ in, ``start_response`` and
iterables out, following PEP 3333 for the awkward parts -- applications that use the
``write()`` callable, that call ``start_response`` lazily from their iterable, that
pass ``exc_info``, and iterables with ``close()`` (always called, also when the
middleware consumed the iterable itself).

A response is buffered only while it may still be stored: the moment it cannot be (the
policy refuses it, it declares or reaches more than ``max_body_size`` bytes, it is an
event stream), the real ``start_response`` is called and the rest streams through
untouched.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

from .policy import StoreDecision
from .store import Entry, HttpRequest, HttpStore, Response, StoreFront

__all__ = ["CacheMiddleware"]

_log = logging.getLogger("shmcache.http")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
Write = Callable[[bytes], object]
StartResponse = Callable[..., Write]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_CONDITIONAL_KEYS = ("HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE")


def _close(result: object) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def _split_status(status: str) -> tuple[int, str]:
    code, _, reason = status.partition(" ")
    return int(code), reason


_CONTENT_KEYS: Final = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}
#: Header name -> environ key, filled as names are asked for (a few dozen at most).
_ENV_KEYS: dict[str, str] = dict(_CONTENT_KEYS)


class _EnvironHeaders(Mapping[str, Sequence[str]]):
    """The request headers of an environ, read on demand: a hit asks for a handful of
    them, so copying all of them per request would be most of its cost."""

    __slots__ = ("_env",)

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self._env = environ

    def get(self, name: str, default: Any = None) -> Any:  # the hot path: no KeyError
        key = _ENV_KEYS.get(name)
        if key is None:
            key = "HTTP_" + name.upper().replace("-", "_")
            if len(_ENV_KEYS) < 1024:  # names come from Vary: bounded, but be sure
                _ENV_KEYS[name] = key
        value = self._env.get(key)
        # PEP 3333: CONTENT_TYPE / CONTENT_LENGTH "may be empty or absent" (both mean
        # not sent); any other header sent empty is there, with an empty value.
        if value is None or (value == "" and name in _CONTENT_KEYS):
            return default
        return (str(value),)

    def __getitem__(self, name: str) -> Sequence[str]:
        value: Sequence[str] | None = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        for k in self._env:
            if k.startswith("HTTP_"):
                yield k[5:].replace("_", "-").lower()
        for name, key in _CONTENT_KEYS.items():
            if self._env.get(key):
                yield name

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Chain:
    """Chunks already taken from an application's iterable, then the rest of it;
    ``close()`` closes the application's iterable (PEP 3333) and runs ``after``."""

    def __init__(self, head: list[bytes], rest: Iterator[bytes] | None, result: object,
                 after: Callable[[], None] | None = None) -> None:
        self._head = head
        self._rest = rest
        self._result = result
        self._after = after

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        self._head = []
        if self._rest is not None:
            yield from self._rest

    def close(self) -> None:
        try:
            _close(self._result)
        finally:
            after, self._after = self._after, None
            if after is not None:
                after()


class _Then:
    """A complete body whose ``close()`` -- called by the server once the response has
    gone out -- runs ``after`` (a background revalidation, PEP 3333 gives us no other
    hook after the response without threads)."""

    def __init__(self, body: bytes, after: Callable[[], None]) -> None:
        self._body = body
        self._after: Callable[[], None] | None = after

    def __iter__(self) -> Iterator[bytes]:
        if self._body:
            yield self._body

    def close(self) -> None:
        after, self._after = self._after, None
        if after is not None:
            after()


class _Fill:
    """One GET miss: buffers the application's response while it may be stored,
    switches to streaming it through as soon as it may not."""

    def __init__(self, store: HttpStore, req: HttpRequest, start_response: StartResponse,
                 lease: tuple[str, int] | None, epoch: bytes | None) -> None:
        self.store = store
        self.req = req
        self.real_start = start_response
        self.lease = lease
        self.epoch = epoch
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.decision: StoreDecision | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.passing = False
        self.real_write: Write | None = None

    # The start_response the application sees.
    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Write:
        if exc_info is not None:
            if self.passing:  # headers already handed to the server: it re-raises
                return self.real_start(status, headers, exc_info)
            # Nothing sent yet (PEP 3333 lets the error response replace the first);
            # an error response is never stored.
            self.status, self.headers = status, list(headers)
            self._go_pass(exc_info)
            return self.write
        if self.status is not None:
            raise RuntimeError("start_response called twice without exc_info (PEP 3333)")
        self.status, self.headers = status, list(headers)
        code, _ = _split_status(status)
        self.decision = d = self.store.decide(self.req, code, self.headers)
        if not d.store or not self.store.storable_headers(d, self.headers):
            self._go_pass()
        return self.write

    def write(self, data: bytes) -> None:
        if self.passing:
            assert self.real_write is not None
            self.real_write(data)
            return
        self.chunks.append(bytes(data))
        self.size += len(data)
        if self.size > self.store.max_body_size:
            self._go_pass()
            assert self.real_write is not None
            chunks, self.chunks = self.chunks, []
            for c in chunks:
                self.real_write(c)

    def _go_pass(self, exc_info: ExcInfo | None = None) -> None:
        """From now on the response streams through: release the fill lease (waiters
        run the application themselves) and send the headers."""
        if self.passing:
            return
        self.passing = True
        self.store.stats.not_stored += 1
        self.store.release(self.lease)
        self.lease = None
        assert self.status is not None
        headers = self.store.miss_headers(self.headers)
        if exc_info is not None:
            self.real_write = self.real_start(self.status, headers, exc_info)
        else:
            self.real_write = self.real_start(self.status, headers)

    def abort(self) -> None:
        self.store.release(self.lease)
        self.lease = None

    def run(self, result: Iterable[bytes]) -> Iterable[bytes]:
        """Consume the application's iterable while the response may be stored."""
        try:
            if self.passing and not self.chunks:
                return result  # untouched: keeps wsgi.file_wrapper's fast path
            it = iter(result)
            for chunk in it:
                if self.passing:
                    head, self.chunks = self.chunks, []
                    return _Chain(head + [chunk], it, result)
                self.chunks.append(chunk)
                self.size += len(chunk)
                if self.size > self.store.max_body_size:
                    self._go_pass()
                    head, self.chunks = self.chunks, []
                    return _Chain(head, it, result)
        except BaseException:
            self.abort()
            _close(result)
            raise
        try:
            _close(result)
        except BaseException:
            self.abort()
            raise
        if self.status is None:
            self.abort()
            raise RuntimeError("the application returned without calling start_response")
        if self.passing:
            head, self.chunks = self.chunks, []
            return head
        try:
            code, reason = _split_status(self.status)
            assert self.decision is not None
            resp = self.store.complete(self.req, self.decision, code, reason, self.headers,
                                       b"".join(self.chunks), self.epoch)
        finally:
            self.abort()  # stored (or not): waiters look again
        self.real_start(f"{resp.status} {resp.reason}", resp.headers)
        return [resp.body] if resp.body else []


class CacheMiddleware(StoreFront):
    """WSGI middleware caching whole responses in a shared :class:`~shmcache.Cache`,
    with RFC 9111 shared-cache semantics (see ``docs/http.md``).

    ``cache``: the :class:`~shmcache.Cache` to store in (``None``: ``Cache()``, the
    ``SHMCACHE_*`` environment).  ``default_ttl`` / ``route_ttls`` (path prefix ->
    seconds, longest prefix wins; ``None`` disables the default there): freshness of
    responses that carry none (no ``s-maxage``, ``max-age`` or ``Expires``).
    ``max_body_size``: larger responses stream through unstored.
    ``stale_while_revalidate``: seconds a stale entry is still served while one
    process refreshes it after responding (a response's own directive wins).
    ``single_flight``: concurrent misses of one URL in any process wait for the first
    (at most ``wait_timeout`` seconds; default ``cache.config.wait_timeout``).
    ``implicit_vary``: request headers every stored response varies on unless it is
    ``public``/``s-maxage``/``must-revalidate``.  ``respect_request_no_cache``: a
    client's ``no-cache``/``max-age``/``min-fresh`` make a miss (off: ignored).

    Example::

        >>> from shmcache import Cache, CacheConfig
        >>> def app(environ, start_response):
        ...     start_response("200 OK", [("Content-Type", "text/plain"),
        ...                               ("Cache-Control", "max-age=60")])
        ...     return [b"hello"]
        >>> cache = Cache(CacheConfig(name="doc-http-wsgi", c_memory_size_mb=8))
        >>> wrapped = CacheMiddleware(app, cache)
        >>> from wsgiref.util import setup_testing_defaults
        >>> env = {}; setup_testing_defaults(env)
        >>> seen = []
        >>> b"".join(wrapped(dict(env), lambda s, h, e=None: seen.append(dict(h))))
        b'hello'
        >>> b"".join(wrapped(dict(env), lambda s, h, e=None: seen.append(dict(h))))
        b'hello'
        >>> [h["X-Cache"] for h in seen]
        ['MISS', 'HIT']
        >>> cache.close(); cache.unlink()
    """

    app: WSGIApp

    # -- requests ---------------------------------------------------------------------

    def _request(self, environ: Mapping[str, Any]) -> HttpRequest:
        headers = _EnvironHeaders(environ)
        scheme = str(environ.get("wsgi.url_scheme", "http"))
        host = environ.get("HTTP_HOST")
        if not host:
            host = str(environ.get("SERVER_NAME", ""))
            port = str(environ.get("SERVER_PORT", ""))
            if port and port != ("443" if scheme == "https" else "80"):
                host = f"{host}:{port}"
        path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
        # PEP 3333: the path's bytes arrive as latin-1 text; the key (and ASGI, and
        # invalidation by URL) use the UTF-8 text those bytes spell.
        with contextlib.suppress(UnicodeEncodeError):  # not latin-1: use it as given
            path = path.encode("latin-1").decode("utf-8", "surrogateescape")
        return self.store.request(str(environ.get("REQUEST_METHOD", "GET")), scheme, host,
                                  path or "/", str(environ.get("QUERY_STRING", "")), headers)

    @staticmethod
    def _send(start_response: StartResponse, resp: Response) -> list[bytes]:
        start_response(f"{resp.status} {resp.reason}", resp.headers)
        return [resp.body] if resp.body else []

    # -- the request paths ------------------------------------------------------------

    def __call__(self, environ: dict[str, Any],
                 start_response: StartResponse) -> Iterable[bytes]:
        store = self.store
        req = self._request(environ)
        action, found = store.begin(req)
        if action == "hit":
            assert found.entry is not None
            return self._send(start_response, store.hit_response(req, found.entry))
        if action == "stale":
            return self._stale(environ, start_response, req, found.entry, found.variant)
        if action == "unsafe":
            return self._unsafe(environ, start_response, req)
        if action == "gateway-timeout":
            return self._send(start_response, store.gateway_timeout())
        if action in ("pass", "bypass"):
            return self._pass(environ, start_response)
        lease: tuple[str, int] | None = None
        if store.single_flight and not store.forced_miss(req):
            lease, entry = self._wait(req, found)
            if entry is not None:
                return self._send(start_response, store.hit_response(req, entry))
        return self._fill(environ, start_response, req, lease)

    def _wait(self, req: HttpRequest, found: Any) -> tuple[tuple[str, int] | None, Entry | None]:
        flow = self.store.fill_flow(req, found)
        try:
            while True:
                time.sleep(next(flow))
        except StopIteration as stop:
            result: tuple[tuple[str, int] | None, Entry | None] = stop.value
            return result

    def _fill(self, environ: dict[str, Any], start_response: StartResponse,
              req: HttpRequest, lease: tuple[str, int] | None) -> Iterable[bytes]:
        fill = _Fill(self.store, req, start_response, lease, self.store.epoch(req))
        # The application gets an unconditional request so it produces the whole
        # response to store; the client's conditions are answered from it
        # (store.complete), as a cache does on a miss (RFC 9111 §4.3.2).
        env = dict(environ)
        for k in _CONDITIONAL_KEYS:
            env.pop(k, None)
        try:
            result = self.app(env, fill.start_response)
        except BaseException:
            fill.abort()
            raise
        return fill.run(result)

    def _pass(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]],
                  exc_info: ExcInfo | None = None) -> Write:
            hs = self.store.miss_headers(headers)
            return start_response(status, hs, exc_info) if exc_info else start_response(status, hs)
        return self.app(environ, start)

    def _unsafe(self, environ: dict[str, Any], start_response: StartResponse,
                req: HttpRequest) -> Iterable[bytes]:
        seen: list[tuple[int, list[tuple[str, str]]]] = []

        def start(status: str, headers: list[tuple[str, str]],
                  exc_info: ExcInfo | None = None) -> Write:
            code, _ = _split_status(status)
            seen[:] = [(code, list(headers))]
            # RFC 9111 §4.4, as soon as the outcome is known ...
            self.store.invalidate_request(req, code, headers)
            hs = self.store.miss_headers(headers)
            return start_response(status, hs, exc_info) if exc_info else start_response(status, hs)

        def after() -> None:
            # ... and again once the application is done, for a GET that computed the
            # old state and stored it while this request was still running.
            if seen:
                self.store.invalidate_request(req, *seen[0])

        result = self.app(environ, start)
        return _Chain([], iter(result), result, after)

    def _stale(self, environ: dict[str, Any], start_response: StartResponse,
               req: HttpRequest, entry: Entry | None, variant: str | None) -> Iterable[bytes]:
        assert entry is not None
        resp = self.store.hit_response(req, entry)
        start_response(f"{resp.status} {resp.reason}", resp.headers)
        lease = self.store.lease(variant or req.key)
        if lease is None:  # another process is refreshing it
            return [resp.body] if resp.body else []
        return _Then(resp.body, lambda: self._refresh(environ, req, lease))

    def _refresh(self, environ: Mapping[str, Any], req: HttpRequest,
                 lease: tuple[str, int]) -> None:
        """Revalidate a stale entry after its response went out: run the application
        on a plain GET of the same URL and store what it may (RFC 5861 §3)."""
        store = self.store
        store.stats.refreshes += 1
        try:
            get = store.refresh_request(req)
            env = {k: v for k, v in environ.items() if k not in _CONDITIONAL_KEYS}
            env.update({"REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO(b""),
                        "CONTENT_LENGTH": ""})
            captured: list[tuple[str, list[tuple[str, str]]]] = []
            chunks: list[bytes] = []

            def start(status: str, headers: list[tuple[str, str]],
                      exc_info: ExcInfo | None = None) -> Write:
                captured[:] = [(status, list(headers))]
                return chunks.append

            epoch = store.epoch(get)
            result = self.app(env, start)
            try:
                size = 0
                for chunk in result:
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > store.max_body_size:
                        return
            finally:
                _close(result)
            if not captured:
                return
            code, reason = _split_status(captured[0][0])
            headers = captured[0][1]
            d = store.decide(get, code, headers)
            if d.store and store.storable_headers(d, headers):
                store.complete(get, d, code, reason, headers, b"".join(chunks), epoch)
            else:
                store.stats.not_stored += 1
        except Exception as e:  # noqa: BLE001 - the client already has its response
            store.stats.refresh_errors += 1
            _log.warning("shmcache.http: background refresh failed (%s); the stale "
                         "response is served until it expires", type(e).__name__)
        finally:
            store.release(lease)
