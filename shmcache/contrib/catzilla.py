"""Catzilla: a response-cache middleware pair, and a launcher of N processes on one segment.

Catzilla runs one process per server and has no pre-fork mode, so several Catzilla
processes on a host share a cache only through a segment each attaches by name.  This
module owns two things, and uses nothing of Catzilla beyond its middleware API
(``app.middleware``, ``request.get_header``, ``Response``):

- :func:`install` registers one global ``pre_route`` middleware, which answers a request
  from a stored response without entering the route (``X-Cache: HIT``), and one
  ``post_route`` middleware, which stores the route's response when the HTTP caching
  rules allow it (``X-Cache: MISS``).  Catzilla bodies are text; streaming responses
  are never stored.
- :func:`run_processes` (the ``workers/catzilla_launcher.py`` script, or ``python -m
  shmcache.contrib.catzilla``) creates the segment, starts one Catzilla process per
  port with ``SHMCACHE_NAME`` naming it, restarts a process that dies (reaping its
  slot first), and on SIGTERM/SIGINT stops them all and unlinks the segment (or keeps
  it for a warm restart).

Example (the application module)::

    from catzilla import Catzilla, Response
    from shmcache.contrib.catzilla import install

    app = Catzilla(production=True)
    install(app)                       # Cache() from SHMCACHE_* (the launcher sets the name)

    @app.get("/page")
    def page(request):
        return Response(body="...", headers={"Cache-Control": "max-age=60"})

and ``python workers/catzilla_launcher.py myapp:app --ports 8001,8002``.

HTTP caching rules: those of the WSGI/ASGI middleware, from the same functions of
:mod:`shmcache.http.policy` (RFC 9111, shared cache): only GET responses are stored and
HEAD is answered from them; ``private``, ``no-store``, unqualified ``no-cache``,
``Set-Cookie`` and ``Vary: *`` responses are not stored; freshness from ``s-maxage``,
``max-age``, ``Expires`` or the ``default_ttl`` given to :func:`install`; ``Vary`` plus
``Authorization`` and ``Cookie`` (unless ``public``/``s-maxage``/``must-revalidate``)
select the variant, a missing and an empty header being different; a request's
``no-cache`` (or ``max-age=0``) skips the lookup and its ``no-store`` the store; an
unsafe method's success invalidates the URL; strong ``ETag`` from the content, ``304``
on ``If-None-Match``, ``Age`` on hits.  Not here (the WSGI/ASGI middleware has them):
stale-while-revalidate, single-flight fills, ``only-if-cached``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from ..cache import MISSING, Cache
from ..config import CacheConfig
from ..http import policy
from ..logs import HTTP, get_logger
from ..logs import configure as configure_logging

__all__ = ["install", "CatzillaResponseCache", "run_processes", "main"]

_logger = get_logger(HTTP)

_PRIVATE_ATTR = "_shmcache_lookup"   # what pre_route tells post_route, on the request
#: Fields of a stored response sent with a 304 (RFC 9110 §15.4.5), besides Age/X-Cache.
_304_FIELDS = frozenset({"cache-control", "content-location", "date", "etag", "expires",
                         "vary"})
#: Fields Catzilla writes itself from the Response object: never stored as headers.
_OWN_FIELDS = frozenset({"content-type", "content-length", "etag"})

# Entries are plain dicts (pickled by the Cache), not classes of this module: a deploy
# that changes this code never meets an entry it cannot unpickle.  "v" is the format.
#   response: {"v": 1, "status", "content_type", "body", "headers": [[name, value]],
#              "etag", "stored_at", "age"}
#   vary index, under the URL's key when the response varies: {"v": 1, "vary": [names]};
#   the response is then under the URL's key + "|" + a digest of those request headers.
_FORMAT = 1


class _RequestHeaders(Mapping[str, Sequence[str]]):
    """Catzilla's request headers as :data:`shmcache.http.policy.Headers`.  Catzilla
    parses no header until asked (``request.headers`` is empty), so each is read on
    first use with ``request.get_header(name)``; iteration sees only those read."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self._read: dict[str, list[str] | None] = {}

    def __getitem__(self, name: str) -> Sequence[str]:
        name = name.lower()
        if name not in self._read:
            value = self._request.get_header(name)
            self._read[name] = None if value is None else [str(value)]
        got = self._read[name]
        if got is None:
            raise KeyError(name)
        return got

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, v in self._read.items() if v is not None])

    def __len__(self) -> int:
        return sum(v is not None for v in self._read.values())


@dataclass(frozen=True, slots=True)
class _Lookup:
    """pre_route's findings, kept on the request for post_route."""

    key: str
    facts: policy.RequestFacts
    store: bool              # False: bypassed (a method or header the cache leaves alone)


def _is_response(got: Any) -> bool:
    return isinstance(got, dict) and got.get("v") == _FORMAT and "body" in got


@dataclass
class CatzillaResponseCache:
    """The pair of middleware functions over one :class:`~shmcache.Cache`.

    ``default_ttl``: freshness of responses without explicit freshness (``None``: they
    are not stored).  ``key_prefix`` separates this application's entries.
    ``share_across_ports``: key on the ``Host`` header without its port, so the
    processes of one site listening on several ports share entries (off: the full
    ``Host``).  ``scheme``: of the URLs in the keys (Catzilla serves plain HTTP; a TLS
    proxy in front does not change the resource).
    """

    cache: Cache
    default_ttl: float | None = None
    key_prefix: str = "catzilla:"
    share_across_ports: bool = True
    scheme: str = "http"
    clock: Callable[[], float] = field(default=time.time, repr=False)

    # Catzilla calls a post_route middleware with (request, response) only when its
    # code object takes exactly two positional arguments, so both are plain closures
    # (a bound method would count ``self`` and be called with the request alone).
    def pre_route_middleware(self) -> Callable[[Any], Any]:
        """The ``pre_route`` function: a stored response, or ``None`` to go on."""
        def shmcache_pre_route(request: Any) -> Any:
            return self._serve(request)
        return shmcache_pre_route

    def post_route_middleware(self) -> Callable[[Any, Any], Any]:
        """The ``post_route`` function: stores the response if allowed and adds
        ``X-Cache: MISS``; returns ``None`` (the response goes on)."""
        def shmcache_post_route(request: Any, response: Any) -> Any:
            self._after(request, response)
            return None
        return shmcache_post_route

    # -- keys ---------------------------------------------------------------------------

    def _primary_key(self, request: Any) -> str:
        host = str(request.get_header("Host") or "")
        if self.share_across_ports:
            host = _host_name(host)
        # request.path is the raw target; policy.primary_key wants the decoded path
        # (as WSGI gives it) and re-encodes it, so "/a%20b" and "/a b" are one key.
        path, _, query = str(request.path).partition("?")
        return policy.primary_key(self.key_prefix, self.scheme, host, unquote(path), query)

    @staticmethod
    def _variant_key(key: str, names: Sequence[str], headers: policy.Headers) -> str:
        return f"{key}|{policy.vary_digest(names, headers)}"

    # -- pre_route ----------------------------------------------------------------------

    def _serve(self, request: Any) -> Any:
        try:
            facts = policy.RequestFacts.make(str(request.method), str(request.path),
                                             _RequestHeaders(request))
            key = self._primary_key(request)
            if facts.method not in ("GET", "HEAD"):
                setattr(request, _PRIVATE_ATTR, _Lookup(key, facts, store=False))
                return None   # post_route may have to invalidate the URL
            if facts.bypass_reason() is not None:
                setattr(request, _PRIVATE_ATTR, _Lookup(key, facts, store=False))
                return None
            setattr(request, _PRIVATE_ATTR, _Lookup(key, facts, store=True))
            if facts.cc.has("no-cache") or facts.cc.seconds("max-age") == 0:
                return None   # RFC 9111 §5.2.1: the client wants it from the origin
            got = self.cache.get(key, MISSING)
            if isinstance(got, dict) and got.get("v") == _FORMAT and "vary" in got:
                got = self.cache.get(self._variant_key(key, got["vary"], facts.headers),
                                     MISSING)
            return self._hit(facts, got) if _is_response(got) else None
        except Exception:  # noqa: BLE001 - a cache failure must not fail the request
            _logger.warning("shmcache: catzilla cache lookup failed", exc_info=True)
            return None

    def _hit(self, facts: policy.RequestFacts, st: dict[str, Any]) -> Any:
        from catzilla import Response

        pairs = [(str(k), str(v)) for k, v in st["headers"]] + [("etag", st["etag"])]
        extra = {"Age": str(int(st["age"] + max(0.0, self.clock() - st["stored_at"]))),
                 "X-Cache": "HIT"}
        if policy.not_modified(facts, pairs, status=int(st.get("status", 200))):
            kept = {k: v for k, v in pairs if k.lower() in _304_FIELDS}
            return Response(status_code=304, content_type=st["content_type"], body="",
                            headers={**kept, **extra})
        # For HEAD, Catzilla sends the header section and drops the body itself.
        return Response(status_code=st["status"], content_type=st["content_type"],
                        body=st["body"], headers={**dict(pairs), **extra})

    # -- post_route ---------------------------------------------------------------------

    def _after(self, request: Any, response: Any) -> None:
        try:
            lk = getattr(request, _PRIVATE_ATTR, None)
            if not isinstance(lk, _Lookup):
                return
            status = int(response.status_code)
            if lk.facts.method not in ("GET", "HEAD"):
                # RFC 9111 §4.4: a successful unsafe request invalidates its URL.  The
                # key holds the entry or the vary index: without it no variant is found.
                if policy.invalidates(lk.facts.method, status):
                    self.cache.delete(lk.key)
                return
            response.set_header("X-Cache", "MISS")
            if lk.store and lk.facts.method == "GET" and _storable_body(response):
                self._store(lk, response, status)
        except Exception:  # noqa: BLE001 - a cache failure must not fail the request
            _logger.warning("shmcache: catzilla cache store failed", exc_info=True)

    def _store(self, lk: _Lookup, response: Any, status: int) -> None:
        now = self.clock()
        headers = _response_headers(response)
        d = policy.decide(lk.facts, status, headers, now=now, default_ttl=self.default_ttl)
        if not d.store:
            return
        body: str = response.body
        etags = [v for k, v in headers if k.lower() == "etag"]
        etag = etags[0] if etags else policy.strong_etag(body.encode("utf-8"), headers)
        if not etags:
            response.set_header("ETag", etag)   # the miss gets the validator too
        drop = d.drop | _OWN_FIELDS
        entry = {"v": _FORMAT, "status": status, "content_type": str(response.content_type),
                 "body": body, "headers": [[k, v] for k, v in headers
                                           if k.lower() not in drop],
                 "etag": etag, "stored_at": now, "age": d.age}
        if d.vary:
            # The index gets the freshness of the variant stored with it.
            self.cache.set(lk.key, {"v": _FORMAT, "vary": list(d.vary)}, ttl=d.ttl)
            self.cache.set(self._variant_key(lk.key, d.vary, lk.facts.headers), entry,
                           ttl=d.ttl)
        else:
            self.cache.set(lk.key, entry, ttl=d.ttl)


def _host_name(host: str) -> str:
    if host.startswith("["):               # [::1]:8000
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _storable_body(response: Any) -> bool:
    # Catzilla bodies are text; a streaming response's body is produced later, chunk by
    # chunk, and is never stored.
    if any(c.__name__ == "StreamingResponse" for c in type(response).__mro__):
        return False
    return isinstance(getattr(response, "body", None), str)


def _response_headers(response: Any) -> list[tuple[str, str]]:
    """The response's header fields as (name, value) pairs, Content-Type included,
    read through Catzilla's public ``get_all_headers()`` ("Name: value" lines)."""
    out = [("content-type", str(response.content_type))]
    for line in response.get_all_headers():
        name, sep, value = str(line).partition(":")
        if sep:
            out.append((name.strip().lower(), value.strip()))
    return out


def install(app: Any, cache: Cache | None = None, *, default_ttl: float | None = None,
            key_prefix: str = "catzilla:", share_across_ports: bool = True,
            priority: int = 100) -> CatzillaResponseCache:
    """Register the response cache on a Catzilla ``app``: one global ``pre_route``
    middleware (serve a hit) and one ``post_route`` middleware (store the response).

    ``cache``: the :class:`~shmcache.Cache` to use; ``None`` opens ``Cache()`` from the
    ``SHMCACHE_*`` environment (what the launcher sets) and closes it at exit, which
    frees this process's slot.  ``priority``: Catzilla runs lower numbers first; the
    default 100 puts the lookup after the application's own pre-route middleware (its
    authentication still runs on a hit) and the store after its post-route ones (the
    stored response is the final one).  Returns the :class:`CatzillaResponseCache`.

    Example::

        >>> from catzilla import Catzilla
        >>> app = Catzilla(production=True, show_banner=False)
        >>> rc = install(app, Cache(CacheConfig(name="doc-catzilla", c_memory_size_mb=8)),
        ...              default_ttl=30)
        >>> rc.default_ttl, rc.key_prefix
        (30, 'catzilla:')
        >>> rc.cache.close(); rc.cache.unlink()
    """
    if cache is None:
        cache = Cache()
        atexit.register(cache.close)
    rc = CatzillaResponseCache(cache, default_ttl=default_ttl, key_prefix=key_prefix,
                               share_across_ports=share_across_ports)
    app.middleware(priority=priority, pre_route=True, post_route=False,
                   name="shmcache_pre_route")(rc.pre_route_middleware())
    app.middleware(priority=priority, pre_route=False, post_route=True,
                   name="shmcache_post_route")(rc.post_route_middleware())
    return rc


# -- the launcher ------------------------------------------------------------------------

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WAITED = {signal.SIGCHLD, signal.SIGHUP, *_STOP_SIGNALS}
#: A process that dies sooner than this after its start counts as a failed start.
MIN_UPTIME = 1.0
#: Failed starts in a row on one port after which the launcher gives up (exit code 1):
#: an application that cannot start is not restarted forever.
MAX_FAILED_STARTS = 5


@dataclass
class _Child:
    """One port's process and its restart bookkeeping."""

    port: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failed_starts: int = 0        # consecutive deaths within MIN_UPTIME
    restart_at: float | None = None

    def backoff(self) -> float:
        # Restart at once after a death in service; after failed starts wait 0.5 s,
        # 1 s, 2 s, ... (capped), so a crashing app does not spin the CPU.
        return 0.0 if not self.failed_starts else min(8.0, 0.25 * 2 ** self.failed_starts)


def _spawn(app_ref: str, child: _Child, host: str, env: Mapping[str, str]) -> None:
    cmd = [sys.executable, "-m", "shmcache.contrib.catzilla", "--serve", app_ref,
           "--port", str(child.port), "--host", host]
    child.proc = subprocess.Popen(cmd, env=dict(env))
    child.started = time.monotonic()
    child.restart_at = None


def run_processes(app_ref: str, ports: Sequence[int], *, host: str = "127.0.0.1",
                  config: CacheConfig | None = None, keep_on_exit: bool = False,
                  stop_timeout: float = 10.0) -> int:
    """Run one Catzilla process per port, all sharing one segment; return the exit code.

    ``app_ref`` is ``"module:attribute"`` naming the Catzilla app (which calls
    :func:`install`).  The segment (``config``, else ``SHMCACHE_*``) is created here
    first, then every process attaches it by name through ``SHMCACHE_NAME``.  A process
    that dies has its slot reaped and is restarted on its port: at once after a death
    in service, with a growing delay after one that died within :data:`MIN_UPTIME` of
    its start, and never again after :data:`MAX_FAILED_STARTS` such deaths in a row
    (then everything stops, exit code 1).  SIGTERM or SIGINT stops the processes
    (SIGTERM, then SIGKILL after ``stop_timeout``) and unlinks the segment unless
    ``keep_on_exit``.  Blocks.
    """
    if not ports:
        raise ValueError("at least one port is needed")
    cfg = config if config is not None else CacheConfig.from_env()
    cache = Cache(cfg)
    name = cache.segment.name
    cache.segment.reap()   # slots of an earlier run on a kept segment
    env = dict(os.environ)
    env["SHMCACHE_NAME"] = name
    # Signals are taken synchronously (sigtimedwait): no handler can interrupt a spawn
    # or a reap halfway.  Children unblock them first thing (_serve).
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    children = [_Child(p) for p in ports]
    code = 0
    try:
        for c in children:
            _spawn(app_ref, c, host, env)
        _logger.info("shmcache: %d catzilla processes on segment %r", len(children), name)
        while code == 0:
            now = time.monotonic()
            due = [c.restart_at for c in children if c.restart_at is not None]
            wait = max(0.0, min([1.0, *(d - now for d in due)]))
            sig = signal.sigtimedwait(_WAITED, wait)
            if sig is not None and sig.si_signo in _STOP_SIGNALS:
                break
            if sig is not None and sig.si_signo == signal.SIGHUP:
                _logger.info("shmcache: SIGHUP ignored by the catzilla launcher")
            code = _supervise(children, cache, app_ref, host, env)
    finally:
        _stop_all(children, stop_timeout)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        with contextlib.suppress(Exception):
            cache.segment.reap()
        cache.close()
        if not keep_on_exit:
            cache.unlink()
    return code


def _supervise(children: list[_Child], cache: Cache, app_ref: str, host: str,
               env: Mapping[str, str]) -> int:
    """Notice deaths (reap their slots, schedule restarts) and run due restarts."""
    now = time.monotonic()
    died = [c for c in children if c.proc is not None and c.proc.poll() is not None]
    if died:
        reaped = cache.segment.reap()
        for c in died:
            assert c.proc is not None
            quick = now - c.started < MIN_UPTIME
            c.failed_starts = c.failed_starts + 1 if quick else 0
            _logger.warning("shmcache: catzilla process %d on port %d exited (%s)%s; "
                            "%d slot(s) reaped", c.proc.pid, c.port, c.proc.returncode,
                            " right after its start" if quick else "", reaped)
            c.proc = None
            if c.failed_starts >= MAX_FAILED_STARTS:
                _logger.error("shmcache: the process on port %d failed to start %d times "
                              "in a row; stopping", c.port, c.failed_starts)
                return 1
            c.restart_at = now + c.backoff()
    for c in children:
        if c.restart_at is not None and c.restart_at <= now:
            _spawn(app_ref, c, host, env)
    return 0


def _stop_all(children: Iterable[_Child], timeout: float) -> None:
    procs = [c.proc for c in children if c.proc is not None]
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _serve(app_ref: str, port: int, host: str) -> None:
    """Child side: import the app and serve until Catzilla's own SIGTERM handling ends
    its loop (the cache ``install`` opened is closed at exit, freeing the slot)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())   # the launcher's mask is inherited
    module, _, attr = app_ref.partition(":")
    if module == "" or attr == "":
        raise SystemExit(f"app must be 'module:attribute', got {app_ref!r}")
    app = getattr(importlib.import_module(module), attr)
    app.listen(port, host)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of the launcher (``workers/catzilla_launcher.py``)."""
    ap = argparse.ArgumentParser(
        prog="catzilla_launcher",
        description="Run N Catzilla processes on N ports sharing one shmcache segment "
                    "(configured by SHMCACHE_* variables).")
    ap.add_argument("app", help="the Catzilla app as module:attribute")
    ap.add_argument("--ports", help="comma-separated ports, one process each")
    ap.add_argument("--port", type=int, default=8000, help="first port (with --processes)")
    ap.add_argument("--processes", "-n", type=int, default=2,
                    help="number of processes on consecutive ports from --port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--keep", action="store_true",
                    help="keep the segment (and its entries) at exit for a warm restart")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        _serve(args.app, args.port, args.host)
        return 0
    if args.ports:
        ports = [int(p) for p in args.ports.split(",") if p.strip()]
    else:
        ports = [args.port + i for i in range(args.processes)]
    configure_logging(logging.INFO)
    return run_processes(args.app, ports, host=args.host, keep_on_exit=args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
