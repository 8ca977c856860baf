"""The shared part of the WSGI and ASGI middleware: stored responses in the segment.

Owns the entry layout, the keys, lookups under request directives, stores, invalidation,
single-flight leases and the responses built from stored entries.  It never speaks WSGI
or ASGI (the front ends translate) and never decides RFC 9111 questions itself (that is
``policy.py``).

Layout in the segment, all written with ``cache.set(..., serializer="raw")``:

* ``<prefix><scheme>://<host><path>?<query>`` -- the *index* of a URL: ``b"SHX1"``, an
  8-byte nonce and the request header names its responses vary on.  Every stored variant
  lives under ``<index key>#<nonce hex>#<digest of those request headers>``, so deleting
  the index (an unsafe request, :meth:`HttpStore.invalidate`) orphans every variant at
  once, and a new index never resurrects them (new nonce).
* the variant: ``b"SHR1"``, status, wall-clock times (stored, fresh until, stale until),
  initial age, reason phrase, headers, body length and body -- bytes any process decodes, whatever
  serializer the ``Cache`` is configured with.
* ``<prefix>epoch:<digest>`` -- a counter bumped by every invalidation of the URL: a miss
  reads it before running the application and stores only if it is unchanged, so a
  response computed before a concurrent POST committed is not cached after it.
* single-flight leases: :mod:`shmcache.stampede`'s ``__shmcache__:lease:<key>`` (owner
  pid and start time, so a dead owner's lease is broken at once).

Wall-clock times (``time.time``) are comparable across processes on one host; the
engine's own TTL (fresh + stale window) only bounds how long the bytes occupy memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import http
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

from .. import stampede
from ..cache import Cache
from ..errors import ShmCacheError
from . import policy
from .policy import RequestFacts, StoreDecision

__all__ = ["Entry", "Found", "HttpRequest", "HttpStats", "HttpStore", "StoreFront",
           "Response",
           "FRESH", "STALE", "MISS", "encode_entry", "decode_entry"]

_log = logging.getLogger("shmcache.http")

FRESH: Final = "fresh"
STALE: Final = "stale"
MISS: Final = "miss"

_ENTRY_MAGIC: Final = b"SHR1"
_INDEX_MAGIC: Final = b"SHX1"
_HEAD: Final = struct.Struct("!4sHdddd")  # magic, status, stored_at, age, fresh_until, stale_until
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_U64: Final = struct.Struct("!Q")
#: An index outlives short-lived variants so their URL keeps its nonce between fills.
_INDEX_MIN_TTL: Final = 3600.0
#: The epoch counter of a URL: long enough to cover any fill in progress.
_EPOCH_TTL: Final = 86400.0
#: Decoded entries kept per process (and only small ones: the memo may keep a body alive
#: after the cache's object cache dropped it).
_MEMO_SIZE: Final = 256
_MEMO_MAX_BODY: Final = 32 << 10
#: Fields sent with a 304 (RFC 9110 §15.4.5), besides Age and X-Cache.
_304_FIELDS: Final = frozenset({"cache-control", "content-location", "date", "etag", "expires",
                                "vary"})


# -- stored entries ---------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """A stored response.  Times are epoch seconds; ``age`` is the initial age (RFC 9111
    §4.2.3 ``corrected_initial_age``) when it was stored at ``stored_at``."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float
    age: float
    fresh_until: float
    stale_until: float

    def current_age(self, now: float) -> float:
        """RFC 9111 §4.2.3: ``corrected_initial_age + resident_time``."""
        return self.age + max(0.0, now - self.stored_at)


def _put_str(out: list[bytes], s: str, width: struct.Struct) -> None:
    raw = s.encode("utf-8", "surrogatepass")
    out.append(width.pack(len(raw)))
    out.append(raw)


def encode_entry(e: Entry) -> bytes:
    """The entry as one binary record (see the module docstring).

    >>> e = Entry(200, "OK", (("Content-Type", "text/plain"),), b"hi", 1.0, 0.0, 61.0, 61.0)
    >>> decode_entry(encode_entry(e)) == e
    True
    """
    out = [_HEAD.pack(_ENTRY_MAGIC, e.status, e.stored_at, e.age, e.fresh_until,
                      e.stale_until)]
    _put_str(out, e.reason, _U16)
    out.append(_U16.pack(len(e.headers)))
    for name, value in e.headers:
        _put_str(out, name, _U16)
        _put_str(out, value, _U32)
    out.append(_U64.pack(len(e.body)))
    out.append(e.body)
    return b"".join(out)


def decode_entry(data: object) -> Entry | None:
    """The entry of a record, or ``None`` if ``data`` is not one (another writer's
    value under our key, a truncated record): a miss, never an exception."""
    if not isinstance(data, bytes) or not data.startswith(_ENTRY_MAGIC):
        return None
    try:
        _, status, stored_at, age, fresh_until, stale_until = _HEAD.unpack_from(data)
        pos = _HEAD.size

        def take(width: struct.Struct) -> str:
            nonlocal pos
            (n,) = width.unpack_from(data, pos)
            pos += width.size
            if pos + n > len(data):
                raise ValueError("truncated")
            s = data[pos:pos + n].decode("utf-8", "surrogatepass")
            pos += n
            return s

        reason = take(_U16)
        (count,) = _U16.unpack_from(data, pos)
        pos += _U16.size
        headers = tuple((take(_U16), take(_U32)) for _ in range(count))
        (size,) = _U64.unpack_from(data, pos)
        pos += _U64.size
        if pos + size != len(data):
            return None
        return Entry(status, reason, headers, data[pos:], stored_at, age, fresh_until,
                     stale_until)
    except (struct.error, ValueError, UnicodeDecodeError):
        return None


def _encode_index(nonce: bytes, vary: Sequence[str]) -> bytes:
    return _INDEX_MAGIC + nonce + ",".join(vary).encode("ascii")


def _decode_index(data: object) -> tuple[bytes, tuple[str, ...]] | None:
    if not isinstance(data, bytes) or len(data) < 12 or not data.startswith(_INDEX_MAGIC):
        return None
    try:
        names = data[12:].decode("ascii")
    except UnicodeDecodeError:
        return None
    return data[4:12], tuple(n for n in names.split(",") if n)


def _reason(status: int, reason: str) -> str:
    """The reason phrase to send (ASGI has none: an entry stored by an ASGI app and
    served by WSGI gets the standard phrase)."""
    if reason:
        return reason
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


_T = TypeVar("_T")


def _remember(memo: OrderedDict[str, tuple[object, _T]], key: str, data: object,
              decoded: _T) -> None:
    """Keep a decoding for as long as the cache returns the very same bytes object: its
    object cache does so while the entry is unchanged (validated by version), so
    identity proves the decoding current.  FIFO-bounded."""
    memo[key] = (data, decoded)
    while len(memo) > _MEMO_SIZE:
        memo.popitem(last=False)


# -- requests, responses, statistics ------------------------------------------------------

@dataclass(frozen=True)
class HttpRequest:
    """A request as both front ends describe it: the policy's facts plus the URL parts
    of its key (``path`` percent-decoded, ``query`` as sent)."""

    facts: RequestFacts
    scheme: str
    host: str
    path: str
    query: str
    key: str

    @property
    def method(self) -> str:
        return self.facts.method


@dataclass(frozen=True)
class Response:
    """A response to send: status, reason phrase, headers, body."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Found:
    """The outcome of a lookup: ``state`` is FRESH, STALE (servable while revalidating)
    or MISS; ``variant`` is the entry's key when the URL's index was found (the lease
    of a fill guards it), else ``None``."""

    state: str
    entry: Entry | None = None
    variant: str | None = None


@dataclass
class HttpStats:
    """Counters of one middleware in this process (a snapshot of the work it did, not
    the segment's view).  Bumped without a lock: under thread races a count can be
    lost."""

    hits: int = 0            #: served from the cache (fresh)
    stale_hits: int = 0      #: served stale while revalidating
    misses: int = 0          #: cacheable requests that ran the application
    bypasses: int = 0        #: requests the cache does not handle (methods, ranges, ...)
    stores: int = 0          #: responses stored
    not_stored: int = 0      #: responses the policy refused (or too large / streamed)
    store_errors: int = 0    #: stores the segment refused (full, value too large)
    not_modified: int = 0    #: 304s answered by the cache
    invalidations: int = 0   #: URLs invalidated by unsafe requests
    waits: int = 0           #: misses that waited for another process's fill
    wait_hits: int = 0       #: ... and were then served its response
    wait_timeouts: int = 0   #: ... and gave up waiting
    refreshes: int = 0       #: background revalidations of stale entries
    refresh_errors: int = 0  #: ... that failed

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- the store ----------------------------------------------------------------------------

class HttpStore:
    """Responses of one middleware in one :class:`~shmcache.Cache` (see the module
    docstring for the layout).  The middleware classes build one and hold it as
    ``middleware.store``; its options are theirs."""

    def __init__(self, cache: Cache | None = None, *, default_ttl: float | None = None,
                 route_ttls: Mapping[str, float | None] | None = None,
                 max_body_size: int = 1 << 20, stale_while_revalidate: float = 0.0,
                 single_flight: bool = False, wait_timeout: float | None = None,
                 implicit_vary: Sequence[str] = ("authorization", "cookie"),
                 key_prefix: str = "http:", respect_request_no_cache: bool = True,
                 x_cache_header: str | None = "X-Cache", add_etag: bool = True) -> None:
        if max_body_size < 0:
            raise ValueError("max_body_size must be >= 0")
        if default_ttl is not None and default_ttl < 0:
            raise ValueError("default_ttl must be >= 0 or None")
        if stale_while_revalidate < 0:
            raise ValueError("stale_while_revalidate must be >= 0")
        self.cache = cache if cache is not None else Cache()
        self.default_ttl = default_ttl
        # Longest prefix first, so "/api/slow" beats "/api/".
        self.route_ttls = sorted((route_ttls or {}).items(), key=lambda kv: -len(kv[0]))
        self.max_body_size = max_body_size
        self.stale_while_revalidate = stale_while_revalidate
        self.single_flight = single_flight
        cfg = self.cache.config
        self.wait_timeout = cfg.wait_timeout if wait_timeout is None else wait_timeout
        self.lease_ttl = cfg.lease_ttl
        self.poll_min, self.poll_max = cfg.poll_min, cfg.poll_max
        self.implicit_vary = tuple(n.strip().lower() for n in implicit_vary)
        self.key_prefix = key_prefix
        self.respect_request_no_cache = respect_request_no_cache
        self.x_cache = x_cache_header
        self.add_etag = add_etag
        self.stats = HttpStats()
        # key -> (the bytes object the cache returned, its decoding); see _remember.
        self._memo_index: OrderedDict[str, tuple[object, tuple[bytes, tuple[str, ...]]]] = \
            OrderedDict()
        self._memo_entry: OrderedDict[str, tuple[object, Entry]] = OrderedDict()
        #: Wall clock for freshness and ages; a test hook (the engine's TTLs only bound
        #: memory and do not use it).
        self.clock: Callable[[], float] = time.time

    # -- requests ---------------------------------------------------------------------

    def request(self, method: str, scheme: str, host: str, path: str, query: str,
                headers: Mapping[str, Sequence[str]]) -> HttpRequest:
        """Describe a request (``headers``: lowercase name -> field lines)."""
        facts = RequestFacts.make(method, path, headers)
        return HttpRequest(facts, scheme, host, path, query,
                           policy.primary_key(self.key_prefix, scheme, host, path, query))

    def ttl_for(self, path: str) -> float | None:
        """The configured default freshness of responses without explicit freshness
        (RFC 9111 §4.2.2's heuristic): the longest matching ``route_ttls`` prefix, else
        ``default_ttl``."""
        for prefix, ttl in self.route_ttls:
            if path.startswith(prefix):
                return ttl
        return self.default_ttl

    def forced_miss(self, req: HttpRequest) -> bool:
        """RFC 9111 §5.2.1.4: a request ``no-cache`` asks not to be served a stored
        response without validation; we treat it as a refresh (run the application,
        store its response) unless ``respect_request_no_cache`` is off."""
        return self.respect_request_no_cache and req.facts.cc.has("no-cache")

    def begin(self, req: HttpRequest) -> tuple[str, Found]:
        """What the front end does with ``req`` -- the one decision both middlewares
        share, so they differ only in how they send:

        * ``"unsafe"``: run the application, then invalidate (RFC 9111 §4.4);
        * ``"bypass"``: run the application untouched (not a cacheable request);
        * ``"hit"`` / ``"stale"``: serve ``found.entry`` (stale: and revalidate it if
          :meth:`lease` gives this process the refresh);
        * ``"gateway-timeout"``: ``only-if-cached`` and nothing stored (§5.2.1.7);
        * ``"pass"``: a HEAD miss: run the application, store nothing;
        * ``"fill"``: a GET miss: run the application and store what it may.
        """
        method = req.method
        if not policy.is_safe_method(method):
            self.stats.bypasses += 1
            return "unsafe", Found(MISS)
        if req.facts.bypass_reason() is not None:
            self.stats.bypasses += 1
            return "bypass", Found(MISS)
        found = Found(MISS) if self.forced_miss(req) else self.lookup(req)
        if found.state == FRESH:
            self.stats.hits += 1
            return "hit", found
        if found.state == STALE:
            self.stats.stale_hits += 1
            return "stale", found
        if req.facts.cc.has("only-if-cached"):
            return "gateway-timeout", found
        self.stats.misses += 1
        return ("pass" if method == "HEAD" else "fill"), found

    def refresh_request(self, req: HttpRequest) -> HttpRequest:
        """The GET that revalidates a stale entry in the background (a stale HEAD is
        refreshed by a GET too), without the client's preconditions."""
        headers = {k: v for k, v in req.facts.headers.items()
                   if k not in ("if-none-match", "if-modified-since")}
        return self.request("GET", req.scheme, req.host, req.path, req.query, headers)

    # -- lookups ----------------------------------------------------------------------

    def _index(self, key: str) -> tuple[bytes, tuple[str, ...]] | None:
        data = self.cache.get(key)
        memo = self._memo_index.get(key)
        if memo is not None and memo[0] is data:
            return memo[1]
        idx = _decode_index(data)
        if idx is not None:
            _remember(self._memo_index, key, data, idx)
        return idx

    def _decode(self, key: str, data: object) -> Entry | None:
        memo = self._memo_entry.get(key)
        if memo is not None and memo[0] is data:
            return memo[1]
        entry = decode_entry(data)
        if entry is not None and len(entry.body) <= _MEMO_MAX_BODY:
            _remember(self._memo_entry, key, data, entry)
        return entry

    @staticmethod
    def _variant_key(key: str, nonce: bytes, digest: str) -> str:
        return f"{key}#{nonce.hex()}#{digest}"

    def lookup(self, req: HttpRequest) -> Found:
        """Find the stored response selected by ``req`` (RFC 9111 §4: same URL, the
        Vary-nominated headers match, §4.1) and judge it under the request's directives
        (§5.2.1)."""
        idx = self._index(req.key)
        if idx is None:
            return Found(MISS)
        nonce, vary = idx
        variant = self._variant_key(req.key, nonce, policy.vary_digest(vary, req.facts.headers))
        entry = self._decode(variant, self.cache.get(variant))
        if entry is None:
            return Found(MISS, None, variant)
        return Found(self._judge(req, entry, self.clock()), entry, variant)

    def _judge(self, req: HttpRequest, entry: Entry, now: float) -> str:
        cc = req.facts.cc
        if self.respect_request_no_cache:
            if cc.has("no-cache"):  # §5.2.1.4
                return MISS
            max_age = cc.seconds("max-age")  # §5.2.1.1
            if max_age is not None and (max_age < 0 or entry.current_age(now) > max_age):
                return MISS
            min_fresh = cc.seconds("min-fresh")  # §5.2.1.3
            if min_fresh is not None and entry.fresh_until - now < max(min_fresh, 0):
                return MISS
        if now < entry.fresh_until:
            return FRESH
        # Stale entries are served only inside their stale-while-revalidate window
        # (RFC 5861; §4.2.4 allows it when the response permits): the engine drops the
        # bytes at its end, so a request's max-stale (§5.2.1.2) cannot reach further.
        if now < entry.stale_until:
            return STALE
        return MISS

    # -- responses from entries -------------------------------------------------------

    def hit_response(self, req: HttpRequest, entry: Entry) -> Response:
        """The response to ``req`` from a stored entry: its headers plus ``Age``
        (RFC 9111 §5.1) and ``X-Cache: HIT``; a 304 when the request's conditions
        match (§4.3.2); HEAD without content (RFC 9110 §9.3.2)."""
        age = str(int(entry.current_age(self.clock())))
        extra = [("Age", age)]
        if self.x_cache:
            extra.append((self.x_cache, "HIT"))
        if policy.not_modified(req.facts, entry.headers, entry.stored_at, entry.status):
            self.stats.not_modified += 1
            kept = [(k, v) for k, v in entry.headers if k.lower() in _304_FIELDS]
            return Response(304, "Not Modified", kept + extra, b"")
        body = b"" if req.method == "HEAD" else entry.body
        return Response(entry.status, _reason(entry.status, entry.reason),
                        list(entry.headers) + extra, body)

    def miss_headers(self, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The application's headers plus ``X-Cache: MISS``."""
        out = list(headers)
        if self.x_cache:
            out.append((self.x_cache, "MISS"))
        return out

    def gateway_timeout(self) -> Response:
        """RFC 9111 §5.2.1.7: ``only-if-cached`` and nothing stored."""
        headers = [("Content-Type", "text/plain"), ("Content-Length", "0")]
        return Response(504, "Gateway Timeout", self.miss_headers(headers), b"")

    # -- filling ----------------------------------------------------------------------

    def _epoch_key(self, key: str) -> str:
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16)
        return f"{self.key_prefix}epoch:{digest.hexdigest()}"

    def epoch(self, req: HttpRequest) -> bytes | None:
        """The URL's invalidation counter, read before running the application.  It
        is created (locally, random) when missing, so that an invalidation from
        another host -- which drops the key here -- is seen as a change too."""
        seg, k = self.cache.segment, self._epoch_key(req.key)
        got = seg.get(k)
        if got is None:
            with contextlib.suppress(ShmCacheError):
                seg.add(k, str(int.from_bytes(os.urandom(6), "big")).encode(), journal=False)
            got = seg.get(k)
        return None if got is None else bytes(got)

    def decide(self, req: HttpRequest, status: int,
               headers: Sequence[tuple[str, str]]) -> StoreDecision:
        """The policy's decision for this response (:func:`policy.decide`)."""
        return policy.decide(req.facts, status, headers, now=self.clock(),
                             default_ttl=self.ttl_for(req.path),
                             stale_while_revalidate=self.stale_while_revalidate,
                             implicit_vary=self.implicit_vary)

    def storable_headers(self, decision: StoreDecision,
                         headers: Sequence[tuple[str, str]]) -> bool:
        """Can a response passing ``decision`` be buffered at all?  A declared
        ``Content-Length`` over ``max_body_size`` and event streams never are (they go
        through untouched)."""
        for k, v in headers:
            name = k.lower()
            if name == "content-length":
                try:
                    if int(v.strip()) > self.max_body_size:
                        return False
                except ValueError:
                    return False
            elif name == "content-type" and v.strip().lower().startswith("text/event-stream"):
                return False
        return True

    def complete(self, req: HttpRequest, decision: StoreDecision, status: int, reason: str,
                 headers: Sequence[tuple[str, str]], body: bytes,
                 epoch: bytes | None) -> Response:
        """A fully buffered response of the application: store it when the decision
        allows (RFC 9111 §3) and the URL was not invalidated meanwhile, and return the
        response to send (with the stored ``ETag``; a 304 if the request's conditions --
        which the application did not see -- match it)."""
        out = list(headers)
        if decision.store:
            out = self._with_validators(out, body)
            self._store(req, decision, status, reason, out, body, epoch)
        else:
            self.stats.not_stored += 1
        if policy.not_modified(req.facts, out, self.clock(), status):
            self.stats.not_modified += 1
            kept = [(k, v) for k, v in out if k.lower() in _304_FIELDS]
            return Response(304, "Not Modified", self.miss_headers(kept), b"")
        return Response(status, _reason(status, reason), self.miss_headers(out), body)

    def _with_validators(self, headers: list[tuple[str, str]],
                         body: bytes) -> list[tuple[str, str]]:
        if not self.add_etag or any(k.lower() == "etag" for k, _ in headers):
            return headers
        return headers + [("ETag", policy.strong_etag(body, headers))]

    def _store(self, req: HttpRequest, d: StoreDecision, status: int, reason: str,
               headers: Sequence[tuple[str, str]], body: bytes, epoch: bytes | None) -> None:
        declared = [v for k, v in headers if k.lower() == "content-length"]
        if declared and declared[0].strip() != str(len(body)):
            self.stats.not_stored += 1  # a truncated or padded body is not a representation
            return
        if len(body) > self.max_body_size:
            self.stats.not_stored += 1
            return
        if self.epoch(req) != epoch:
            self.stats.not_stored += 1  # §4.4: invalidated while we computed it
            return
        now = self.clock()
        # RFC 9110 §5.5: surrounding whitespace is not part of a field value (and some
        # servers, h11, refuse to send it).
        kept = [(k, v.strip(" \t")) for k, v in headers if k.lower() not in d.drop]
        # No Date is added: the server sends its own (a second one would be a
        # duplicate singleton field), and Age tells the age (§5.1).
        names = {k.lower() for k, _ in kept}
        if "content-length" not in names and status != 204:
            kept.append(("Content-Length", str(len(body))))
        entry = Entry(status, reason, tuple(kept), body, now, d.age, now + d.ttl,
                      now + d.ttl + d.stale)
        idx = self._index(req.key)
        nonce = idx[0] if idx is not None and idx[1] == d.vary else os.urandom(8)
        variant = self._variant_key(req.key, nonce, policy.vary_digest(d.vary, req.facts.headers))
        engine_ttl = d.ttl + d.stale
        try:
            self.cache.set(variant, encode_entry(entry), engine_ttl, serializer="raw")
            # Written after the variant, so a reader never finds an index whose
            # variant is missing for lack of time; a concurrent first fill may
            # replace our nonce (its own then wins; ours is a lost entry, not a
            # wrong one).
            self.cache.set(req.key, _encode_index(nonce, d.vary),
                           max(engine_ttl, _INDEX_MIN_TTL), serializer="raw")
        except stampede.STORE_ERRORS as e:
            self.stats.store_errors += 1
            _log.debug("shmcache.http: not stored (%s)", type(e).__name__)
            return
        if self.epoch(req) != epoch:
            # An invalidation (epoch bump, then index delete) ran between our check
            # and our index write, which may have put its nonce back and made the
            # variants it meant to drop reachable again: drop the index ourselves.
            self.cache.delete(req.key)
            self.stats.not_stored += 1
            return
        self.stats.stores += 1

    # -- invalidation (RFC 9111 §4.4) -------------------------------------------------

    def invalidate_request(self, req: HttpRequest, status: int,
                           headers: Sequence[tuple[str, str]]) -> None:
        """After an unsafe request's non-error response: invalidate its target URI and
        the same-origin URIs in ``Location`` / ``Content-Location`` (§4.4)."""
        if not policy.invalidates(req.method, status):
            return
        self._invalidate_key(req.key)
        for k, v in headers:
            if k.lower() in ("location", "content-location"):
                key = self._same_origin_key(req, v.strip())
                if key is not None:
                    self._invalidate_key(key)

    def _same_origin_key(self, req: HttpRequest, uri: str) -> str | None:
        try:
            parts = urlsplit(uri)
        except ValueError:
            return None
        if (parts.scheme or parts.netloc) and (parts.scheme.lower() != req.scheme.lower()
                                               or parts.netloc.lower() != req.host.lower()):
            return None  # §4.4: only the same origin
        path = unquote(parts.path, errors="surrogateescape") if parts.path else req.path
        if not path.startswith("/"):
            base = req.path.rsplit("/", 1)[0]
            path = f"{base}/{path}"
        return policy.primary_key(self.key_prefix, req.scheme, req.host, path, parts.query)

    def invalidate(self, url: str) -> None:
        """Drop every stored variant of an absolute URL (``scheme://host/path?query``),
        in every process.

        >>> from shmcache import CacheConfig
        >>> store = HttpStore(Cache(CacheConfig(name="doc-http-inv", c_memory_size_mb=8)))
        >>> store.invalidate("http://example.com/users/1?full=1")
        >>> store.cache.close(); store.cache.unlink()
        """
        parts = urlsplit(url)
        if not parts.scheme or not parts.netloc:
            raise ValueError(f"invalidate() needs an absolute URL, not {url!r}")
        path = unquote(parts.path or "/", errors="surrogateescape")
        self._invalidate_key(policy.primary_key(self.key_prefix, parts.scheme, parts.netloc,
                                                path, parts.query))

    def _invalidate_key(self, key: str) -> None:
        try:
            # The epoch first: a fill that read the old epoch will not store.
            self.cache.segment.incr(self._epoch_key(key), 1, initial=int.from_bytes(
                os.urandom(6), "big"), ttl=_EPOCH_TTL)
            self.cache.delete(key)
        except stampede.STORE_ERRORS as e:
            # Cannot bump the epoch: at least drop the index (the delete never
            # allocates), so the stale variants are unreachable.
            _log.warning("shmcache.http: invalidation degraded (%s)", type(e).__name__)
            self.cache.delete(key)
        self.stats.invalidations += 1

    # -- single flight ----------------------------------------------------------------

    def lease(self, key: str) -> tuple[str, int] | None:
        """Take the fill lease of ``key`` without waiting: ``(lease key, version)``, or
        ``None`` if another process holds it (or the segment cannot take it)."""
        lkey = stampede.lease_key(key, self.cache.max_key_len)
        try:
            ver = stampede.acquire(self.cache.segment, lkey, self.lease_ttl)
        except stampede.STORE_ERRORS:
            return None
        return None if ver is None else (lkey, ver)

    def release(self, lease: tuple[str, int] | None) -> None:
        """Drop a lease taken by :meth:`lease` / :meth:`fill_flow` (only that version)."""
        if lease is not None:
            stampede.release(self.cache.segment, lease[0], lease[1])

    def fill_flow(self, req: HttpRequest, found: Found
                  ) -> Generator[float, None, tuple[tuple[str, int] | None, Entry | None]]:
        """Single flight for a miss, as a generator of seconds to sleep (driven with
        ``time.sleep`` or ``asyncio.sleep``): returns ``(lease, None)`` when this
        process should run the application (holding ``lease`` unless it could not be
        taken) or ``(None, entry)`` when another process's fill produced an entry to
        serve.  A waiter whose filler finished without storing anything (the response
        was not cacheable, or its variant differs) runs the application itself without
        the lease, so uncacheable URLs are not serialised; one whose filler died breaks
        its lease and competes for it again."""
        seg = self.cache.segment
        # The variant's key when the URL's Vary is known, else the URL's: misses of
        # different variants do not wait for each other once the index exists.
        lkey = stampede.lease_key(found.variant or req.key, self.cache.max_key_len)
        deadline = 0.0
        delay = self.poll_min
        while True:
            try:
                ver = stampede.acquire(seg, lkey, self.lease_ttl)
            except stampede.STORE_ERRORS:
                return None, None
            if ver is not None:
                again = self.lookup(req)  # filled between our miss and the lease?
                if again.state == FRESH and again.entry is not None:
                    stampede.release(seg, lkey, ver)
                    if deadline:
                        self.stats.wait_hits += 1
                    return None, again.entry
                return (lkey, ver), None
            now = time.monotonic()
            if not deadline:
                deadline = now + self.wait_timeout
                self.stats.waits += 1
            if now >= deadline:
                self.stats.wait_timeouts += 1
                return None, None
            yield min(delay, deadline - now)
            delay = min(delay * 2, self.poll_max)
            # The lease before the entry: a filler stores, then releases, so a lease
            # found gone means the entry (if any) is visible to the lookup after it.
            got = seg.get_with_info(lkey)
            again = self.lookup(req)
            if again.state == FRESH and again.entry is not None:
                self.stats.wait_hits += 1
                return None, again.entry
            if got is None:
                return None, None
            if not stampede.owner_alive(got[0]):
                # Someone else may have broken or replaced it first: fine.
                with contextlib.suppress(Exception):
                    seg.delete(lkey, expect_version=got[1].version)


class StoreFront:
    """What the WSGI and ASGI middleware share: the wrapped application, the
    :class:`HttpStore` built from the options (documented in ``docs/http.md``), and
    ``cache``/``stats``/``invalidate``."""

    def __init__(self, app: Any, cache: Cache | None = None, *,
                 default_ttl: float | None = None,
                 route_ttls: Mapping[str, float | None] | None = None,
                 max_body_size: int = 1 << 20, stale_while_revalidate: float = 0.0,
                 single_flight: bool = False, wait_timeout: float | None = None,
                 implicit_vary: Sequence[str] = ("authorization", "cookie"),
                 key_prefix: str = "http:", respect_request_no_cache: bool = True,
                 x_cache_header: str | None = "X-Cache", add_etag: bool = True) -> None:
        self.app = app
        self.store = HttpStore(cache, default_ttl=default_ttl, route_ttls=route_ttls,
                               max_body_size=max_body_size,
                               stale_while_revalidate=stale_while_revalidate,
                               single_flight=single_flight, wait_timeout=wait_timeout,
                               implicit_vary=implicit_vary, key_prefix=key_prefix,
                               respect_request_no_cache=respect_request_no_cache,
                               x_cache_header=x_cache_header, add_etag=add_etag)

    @property
    def cache(self) -> Cache:
        """The cache responses are stored in."""
        return self.store.cache

    @property
    def stats(self) -> HttpStats:
        """This process's counters (:class:`HttpStats`)."""
        return self.store.stats

    def invalidate(self, url: str) -> None:
        """Drop every stored variant of an absolute URL in every process."""
        self.store.invalidate(url)
