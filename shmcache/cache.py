"""The Python cache API: ``Cache``, its ``cached`` decorator, invalidation and warming.

Layers, one way only: this module turns objects into entries (serializers.py), builds
keys (keys.py), runs the miss path (stampede.py) and talks to the L1 engine through
:class:`~shmcache.segment.Segment`; it knows nothing of slabs or locks.  In front of L1
sits L0, a per-process dict of already-deserialized objects, valid while the entry's
version in the segment is unchanged (every write anywhere bumps it).

Entry format.  The value bytes are the serialized (maybe compressed) payload; the
entry's 16-bit ``flags`` say which serializer and codec made them (serializers.py).  An
entry with tags, a soft expiry (stale-while-revalidate) or a cached exception carries an
envelope before the payload::

    u16 header_len | i64 fresh_until_ms | u8 ntags | (u16 len, tag key, u8 len, gen)*

Tags and namespaces live in the segment so every process sees an invalidation at once:
a tag is a counter key bumped by ``invalidate_tags`` and an entry stores the counters it
saw when it was computed (a mismatch on read is a miss); a namespace is a counter whose
value is part of every key in it, so bumping it orphans the old keys without a scan
(they age out by TTL and eviction).  Events (``invalidate_on``/``emit``) are tags.

Async twins (``aget``, ``aset``, ...) share the sync implementation: L1 operations are
memory operations that never block on I/O, so only the stampede wait (``asyncio.sleep``)
and the call of the cached function (``await``) differ.

Example::

    >>> from shmcache import Cache, CacheConfig
    >>> cache = Cache(CacheConfig(name="doc-cache", c_memory_size_mb=8))
    >>> @cache.cached(ttl=60)
    ... def square(x: int) -> int:
    ...     return x * x
    >>> square(4), square(4)
    (16, 16)
    >>> square.key(4)
    'shmcache.cache.square|4'
    >>> cache.close(); cache.unlink()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import enum
import functools
import gc
import inspect
import logging
import os
import pickle
import struct
import sys
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import (
    Any,
    Concatenate,
    Final,
    Generic,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

from . import stampede
from .config import CacheConfig, CacheLevel, TierNotAvailableError
from .errors import ShmCacheError
from .keys import UnkeyableArgumentError, function_key, qualified_name, shorten
from .levels import F_NO_L2, F_NO_L3, INVALIDATION_SEQ_KEY, LowerLevels
from .segment import Segment, unlink_segment
from .serializers import (
    COMP_MASK,
    COMP_SHIFT,
    F_ENVELOPE,
    F_NEGATIVE,
    SER_MASK,
    Codec,
    Serializer,
    default_codec,
    get_codec,
    get_serializer,
)
from .stampede import FRESH, MISS, STALE, STORE_ERRORS
from .stats import CacheStatistics, Counters, FunctionStats, LevelStats, RateWindow

__all__ = ["Cache", "CachedFunction", "BoundCachedFunction", "CacheDecorator",
           "CachedClassMethod", "WarmReport", "MISSING",
           "CachedCallError"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")
S_contra = TypeVar("S_contra", contravariant=True)
T = TypeVar("T")


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"

    __str__ = __repr__


#: Default of ``get``: pass it to tell a miss from a cached ``None``.
MISSING: Final = _Missing.MISSING
_NOTFOUND: Final = object()  # l0_get's default: distinct from any cached object


class _Unset(enum.Enum):
    UNSET = 0


_UNSET: Final = _Unset.UNSET

_HOST_KEY: Final = "__shmcache__:host"
#: Both lower levels excluded (a decorated function with level=C_MEMORY).
_NO_LOWER: Final = F_NO_L2 | F_NO_L3
_TAG_PREFIX: Final = "__shmcache__:tag:"
_NS_PREFIX: Final = "__shmcache__:ns:"
_EVENT_PREFIX: Final = "event:"
_HDR: Final = struct.Struct("<qB")
_PKG_DIR: Final = os.path.dirname(os.path.abspath(__file__)) + os.sep
_log = logging.getLogger("shmcache.cache")
#: Threads of a Cache's pool of background refreshes (stale-while-revalidate).
_REFRESH_WORKERS: Final = 4

#: A key as the segment sees it: str, or bytes that are not UTF-8 (kept as given).
Key = str | bytes

#: (fresh_until_ms, ((tag counter key, generation bytes), ...), negative)
Meta = tuple[int, tuple[tuple[str, bytes], ...], bool]
#: L0 entry: (version, object, meta or None)
L0Entry = tuple[int, Any, Meta | None]


class CachedCallError(ShmCacheError):
    """A cached exception that could not be pickled, re-raised in its place."""


def _rand_gen() -> int:
    return int.from_bytes(os.urandom(6), "little")


def _warn_user(msg: str) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (the
    user's call of a cached function), however deep the miss path is."""
    f = sys._getframe(1)
    level = 2
    while f is not None and f.f_code.co_filename.startswith(_PKG_DIR):
        f = f.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(msg, RuntimeWarning, stacklevel=level)


@dataclass(frozen=True, slots=True)
class WarmReport:
    """What :meth:`Cache.warm` did: keys loaded, keys skipped (already present), and
    the exception of every loader that failed."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, BaseException] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


#: Every live Cache, so a forked child can reset their background-refresh state.
_live_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The parent's refresh threads and tasks do not exist here, and its lock may have
    # been held at the fork: start over (the pool is recreated on first use).
    for c in list(_live_caches):
        c._reg_lock = threading.Lock()
        c._bg_lock = threading.Lock()
        c._bg_pool = None
        c._bg_futures = set()
        c._bg_tasks = set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Cache:
    """A cache shared by every process that opens the same segment.

    ``Cache()`` reads ``SHMCACHE_*`` environment variables (:meth:`CacheConfig.from_env`)
    and otherwise opens a 64 MiB segment named ``shmcache-<app>-<uid>``;
    ``Cache(CacheConfig(...))`` uses exactly that configuration; ``segment=`` shares an
    already open :class:`Segment` (the cache then does not close it).

    Example::

        >>> cache = Cache(CacheConfig(name="doc-basic", c_memory_size_mb=8))
        >>> cache.set("user:1", {"name": "alice"}, ttl=60)
        >>> cache.get("user:1")
        {'name': 'alice'}
        >>> cache.get("user:2", MISSING) is MISSING
        True
        >>> cache.close(); cache.unlink()
    """

    def __init__(self, config: CacheConfig | None = None, *,
                 segment: Segment | None = None) -> None:
        cfg = config if config is not None else CacheConfig.from_env()
        cfg.check_levels()
        self.config = cfg
        # L2/L3 (levels.py); None for a cache of the segment alone.
        self._lower: LowerLevels | None = (
            LowerLevels(cfg) if cfg.uses_redis or cfg.uses_disk else None)
        behind = self._lower is not None and cfg.write_mode == "behind"
        self._owns_segment = segment is None
        self.segment = segment if segment is not None else Segment.open(
            cfg.segment_name, cfg.size_bytes, policy=cfg.policy,
            max_key_len=cfg.max_key_len, on_incompatible=cfg.on_incompatible,
            journal_bytes=int(cfg.journal_mb * (1 << 20)) if behind else 0)
        self._write_through = self._lower is not None and not behind
        seg_cfg = self.segment.config()
        if segment is None:
            differs = [f"{what} {have} (asked {want})" for what, have, want in (
                ("size", seg_cfg["size"], cfg.size_bytes),
                ("policy", seg_cfg["policy"], cfg.policy),
                ("max_key_len", seg_cfg["max_key_len"], cfg.max_key_len)) if have != want]
            if differs:
                # Another process created it first with other settings: a segment's
                # layout is fixed at creation, so these cannot apply until it is
                # recreated (unlinked when every server using it has stopped).
                _log.warning("shmcache: segment %s already exists with %s; using it as "
                             "it is", self.segment.name, ", ".join(differs))
        if behind and not seg_cfg["journal_bytes"]:
            # Made earlier by a process that did not ask for the lower levels.
            _log.warning("shmcache: segment %s has no write journal; writing L2/L3 "
                         "through instead of behind", self.segment.name)
            self._write_through = True
        self.host_id = self._host_id() if self._lower is not None else b""
        self._sidecar: Any = None
        self.max_key_len = int(self.segment.config()["max_key_len"])
        self._short_limit = self.max_key_len // 4
        self._serializer = get_serializer(cfg.serializer)
        self._codec = _codec_for(cfg.compression)
        self._threshold = cfg.compression_threshold
        self._use_l0 = cfg.object_cache
        # FIFO-bounded; OrderedDict because popping a plain dict's oldest key gets
        # slower with every deletion (iteration skips the dead slots at its front).
        self._l0: OrderedDict[Key, L0Entry] = OrderedDict()
        self._l0_max = max(1, cfg.object_cache_size)
        # A counted hit validated by version, without copying the value (direct call).
        self._hv: Callable[[Key], tuple[int, int] | None] = self.segment.hit_version
        self._sget: Callable[[Key], bytes | None] = self.segment.get
        # Tag and namespace counters: L1, or, with lower levels, L1 then the shared one.
        self._meta_read: Callable[[Key], bytes | None] = (
            self._sget if self._lower is None else self._meta_get)
        self._sget_info: Callable[[Key], tuple[bytes, int, int] | None] = \
            self.segment.get_info
        self._l0get: Callable[[Any, str, Any, bytearray], Any] = self.segment.l0_get
        self._counters = Counters()
        # Decorated functions by key prefix / statistics name: (counters, the function
        # (weakly, so functions made and dropped at run time do not pile up here)).
        self._functions: dict[str, tuple[Counters, Callable[[], Any]]] = {}
        self._reg_lock = threading.Lock()
        self._decode_logged: set[Key] = set()
        self._rate = RateWindow(cfg.stats_window)
        #: Wall clock of soft expiry (stale-while-revalidate) only: ``fresh_until`` is
        #: computed and checked with it; the engine's TTLs do not use it.  A test hook.
        self._clock: Callable[[], float] = time.time
        # Background refreshes (stale-while-revalidate): a pool for sync functions,
        # created lazily per process (a forked child never uses its parent's), and
        # tasks for async ones (held here until done: the loop keeps only weak refs).
        self._bg_lock = threading.Lock()
        self._bg_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._bg_pid = 0
        self._bg_futures: set[concurrent.futures.Future[None]] = set()
        self._bg_tasks: set[asyncio.Task[None]] = set()
        _live_caches.add(self)
        if self._lower is not None and not self._write_through and cfg.sidecar == "auto":
            self._sidecar = self.start_sidecar()

    def _host_id(self) -> bytes:
        """This host's identity in invalidation messages: 16 hex digits kept in the
        segment, so every process of the host (and a restarted sidecar) shares it."""
        for _ in range(3):
            got = self.segment.get(_HOST_KEY)
            if isinstance(got, bytes) and len(got) == 16:
                return got
            self.segment.add(_HOST_KEY, os.urandom(8).hex().encode(), journal=False)
        raise ShmCacheError("could not establish the host id in the segment")

    def start_sidecar(self, **options: Any) -> Any:
        """Start the sidecar (sidecar.py) in a background thread of this process and
        return its handle (``stop()``, ``is_leader``, ``stats()``).  A second sidecar
        on the same segment -- in this process or another -- stands by until the
        active one goes away.  ``options`` go to :class:`~shmcache.sidecar.Sidecar`."""
        from .sidecar import Sidecar
        sc = Sidecar(self, **options)
        sc.start()
        return sc

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Drop the object cache, shut the background refresh pool down (queued
        refreshes are dropped and their leases released; running ones are waited for,
        so none touches a closed segment) and close the segment (if this cache opened
        it).  Refresh tasks of async functions belong to their event loop."""
        with self._bg_lock:
            pool, self._bg_pool = self._bg_pool, None
            mine = self._bg_pid == os.getpid()
        if pool is not None and mine:
            pool.shutdown(wait=True, cancel_futures=True)
        sc, self._sidecar = self._sidecar, None
        if sc is not None and not sc.stop():
            # Its thread is still inside the engine (a long final flush): unmapping the
            # segment under it would crash the process.  Leave the mapping; it goes
            # with the process.
            _log.warning("shmcache: sidecar of %s did not stop in time; leaving the "
                         "segment attached", self.segment.name)
            self._owns_segment = False
        if self._lower is not None:
            self._lower.close()
        self._l0.clear()
        if self._owns_segment:
            self.segment.close()

    def unlink(self) -> None:
        """Remove the segment's name (processes attached keep using it)."""
        unlink_segment(self.segment.name)
        if self._lower is not None:
            from .sidecar import remove_lock
            remove_lock(self.segment.name)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Cache segment={self.segment.name!r}>"

    # -- internals: versions, entries ------------------------------------------------

    def _read(self, key: Key) -> tuple[bytes, int, int] | None:
        """(value bytes, flags, version) of one consistent read, or None on a miss."""
        got = self._sget_info(key)
        return None if got is None else (got[0], got[2], got[1])

    def _encode(self, value: Any, ser: Serializer, codec: Codec | None,
                meta: Meta | None) -> tuple[bytes, int]:
        payload = ser.dumps(value)
        flags = ser.id
        if codec is not None and len(payload) >= self._threshold:
            packed = codec.compress(payload)
            if len(packed) < len(payload):
                payload = packed
                flags |= codec.id << COMP_SHIFT
        if meta is not None:
            fresh_until, tags, negative = meta
            parts = [_HDR.pack(fresh_until, len(tags))]
            for tk, gen in tags:
                b = tk.encode()
                parts += [len(b).to_bytes(2, "little"), b, bytes([len(gen)]), gen]
            hdr = b"".join(parts)
            payload = len(hdr).to_bytes(2, "little") + hdr + payload
            flags |= F_ENVELOPE | (F_NEGATIVE if negative else 0)
        return payload, flags

    @staticmethod
    def _decode(raw: bytes, flags: int) -> tuple[Any, Meta | None]:
        if flags == 0:
            return raw, None
        meta: Meta | None = None
        if flags & F_ENVELOPE:
            hl = int.from_bytes(raw[:2], "little")
            hdr = raw[2:2 + hl]
            fresh_until, ntags = _HDR.unpack_from(hdr)
            pos = _HDR.size
            tags = []
            for _ in range(ntags):
                kl = int.from_bytes(hdr[pos:pos + 2], "little")
                tk = hdr[pos + 2:pos + 2 + kl].decode()
                pos += 2 + kl
                gl = hdr[pos]
                tags.append((tk, bytes(hdr[pos + 1:pos + 1 + gl])))
                pos += 1 + gl
            meta = (fresh_until, tuple(tags), bool(flags & F_NEGATIVE))
            raw = raw[2 + hl:]
        comp = (flags & COMP_MASK) >> COMP_SHIFT
        if comp:
            raw = get_codec(comp).decompress(raw)
        return get_serializer(flags & SER_MASK).loads(raw), meta

    def _check_meta(self, meta: Meta) -> int:
        """FRESH, STALE, or MISS (a tag was invalidated since the entry was made)."""
        fresh_until, tags, _ = meta
        sget = self._meta_read
        for tk, gen in tags:
            if sget(tk) != gen:
                return MISS
        if fresh_until and self._clock() * 1000 > fresh_until:
            return STALE
        return FRESH

    def _l0_put(self, key: Key, entry: L0Entry) -> None:
        l0 = self._l0
        if len(l0) >= self._l0_max:
            with contextlib.suppress(KeyError):
                l0.popitem(last=False)  # oldest inserted first: FIFO bound
        l0[key] = entry

    def _promote(self, key: Key, mask: int = 0) -> tuple[bytes, int, int] | None:
        """An L1 miss: look in L2/L3 and copy a hit into L1 with its remaining TTL
        (no journal record: it came from below).  (bytes, flags, version) or None."""
        assert self._lower is not None
        kb = key.encode() if isinstance(key, str) else key
        seq = self._sget(INVALIDATION_SEQ_KEY)
        found = self._lower.fetch(kb, mask)
        if found is None:
            return None
        sealed, _level = found
        if sealed.expires_at is not None and sealed.expires_at <= time.time():
            return None
        try:  # keeping the writer's expiry exactly, not one recomputed from now
            ver = self.segment.set_at(key, sealed.body, sealed.expires_at, flags=sealed.flags,
                                      add=True, journal=False)
        except STORE_ERRORS:
            ver = None  # a full segment: serve it anyway, uncached in L1
        if ver is None:  # written meanwhile by another process: that one is newer
            got = self._sget_info(key)
            if got is not None:
                return got[0], got[2], got[1]
            ver = 0
        elif self._sget(INVALIDATION_SEQ_KEY) != seq:
            # Another host's invalidation was applied while we read below: what we
            # added may be the value it dropped.  Serve it this once, keep it not.
            with contextlib.suppress(ShmCacheError):
                self.segment.delete(key, expect_version=ver, journal=False)
            ver = 0
        return sealed.body, sealed.flags, ver

    def _meta_get(self, key: Key) -> bytes | None:
        """A tag or namespace counter: L1, else the one the other hosts share below."""
        v = self._sget(key)
        if v is None and self._lower is not None:
            got = self._promote(key)
            if got is not None:
                v = got[0]
        return v

    def _lookup(self, key: Key, c: Counters, use_l0: bool,
                negative: bool = False, l0_checked: bool = False,
                lower_mask: int = 0) -> tuple[int, Any]:
        """(FRESH|STALE, value) or (MISS, None).  A fresh negative entry raises its
        exception when ``negative`` (decorated calls), else counts as a miss.
        ``l0_checked``: the decorator's hot path already asked ``l0_get`` about this
        key, which answers for every object-cache entry without metadata."""
        if use_l0:
            e = self._l0.get(key)
            if e is not None and l0_checked and e[2] is None:
                self._l0.pop(key, None)  # its version was just found changed
                e = None
            if e is not None:
                r = self._hv(key)
                if r is not None and r[0] == e[0]:
                    meta = e[2]
                    if meta is None:
                        c.l0_hits += 1
                        return FRESH, e[1]
                    st = self._check_meta(meta)
                    if st:
                        c.l0_hits += 1
                        return self._result(st, e[1], meta, c, negative)
                self._l0.pop(key, None)
        got = self._read(key)
        below = False
        if got is None and self._lower is not None and lower_mask != _NO_LOWER:
            got = self._promote(key, lower_mask)
            below = got is not None
        if got is None:
            c.misses += 1
            return MISS, None
        raw, flags, version = got
        try:
            value, meta = self._decode(raw, flags)
        except Exception as e:  # noqa: BLE001 - any undecodable entry is a miss
            self._undecodable(key, flags, version, e, c)
            return MISS, None
        st = FRESH if meta is None else self._check_meta(meta)
        if not st:
            c.misses += 1
            return MISS, None
        if use_l0 and version:
            self._l0_put(key, (version, value, meta))
        if below:
            c.lower_hits += 1
        else:
            c.l1_hits += 1
        return self._result(st, value, meta, c, negative)

    def _undecodable(self, key: Key, flags: int, version: int, exc: Exception,
                     c: Counters) -> None:
        """An entry this process cannot decode (its class was renamed by a deploy, an
        unknown serializer id, lz4 not installed here): count it, log it once per key
        (never the value), and drop exactly that entry so it is recomputed."""
        c.misses += 1
        c.errors += 1
        c.decode_errors += 1
        self._l0.pop(key, None)
        with contextlib.suppress(ShmCacheError):  # replaced meanwhile: not ours to drop
            self.segment.delete(key, expect_version=version)
        logged = self._decode_logged
        if key not in logged:
            if len(logged) >= 4096:
                logged.clear()
            logged.add(key)
            _log.warning("shmcache: cannot decode the entry %r (flags %#06x): %s: %s; "
                         "dropped it and treating it as a miss", key, flags,
                         type(exc).__name__, str(exc)[:200])

    @staticmethod
    def _result(st: int, value: Any, meta: Meta | None, c: Counters,
                negative: bool) -> tuple[int, Any]:
        if meta is not None and meta[2]:
            if st != FRESH or not negative:
                return MISS, None
            c.negative_hits += 1
            raise cast(BaseException, value).with_traceback(None)
        return st, value

    def _tag_snapshot(self, tags: Iterable[str]) -> tuple[tuple[str, bytes], ...]:
        out = []
        for t in tags:
            tk = shorten(_TAG_PREFIX + t, self.max_key_len)
            gen = self._meta_read(tk)
            if gen is None:
                gen = self._new_generation(tk)
            out.append((tk, gen))
        return tuple(out)

    def _ns_prefix(self, namespace: str) -> str:
        nk = shorten(_NS_PREFIX + namespace, self.max_key_len)
        gen = self._meta_read(nk)
        if gen is None:
            gen = self._new_generation(nk)
        return f"{namespace}@{gen.decode()}:"

    def _new_generation(self, key: str) -> bytes:
        """Create a tag or namespace counter that is missing everywhere we can see.
        With Redis, the first host's generation wins (created there only if absent),
        so two hosts reading a namespace at once cannot orphan each other's entries."""
        if self._lower is not None:
            shared = self._lower.shared_generation(key.encode(), str(_rand_gen()).encode())
            if shared is not None:
                if self.segment.add(key, shared, None, journal=False) is None:
                    got = self._sget(key)  # another process of this host was first
                    if got is not None:
                        return got
                return shared
        gen = str(self.segment.incr(key, 0, initial=_rand_gen())).encode()
        self._written(key)
        return gen

    @overload
    def _full_key(self, key: str, namespace: str | None) -> str: ...

    @overload
    def _full_key(self, key: str | bytes, namespace: str | None) -> Key: ...

    def _full_key(self, key: str | bytes, namespace: str | None) -> Key:
        # UTF-8 bytes and the str they spell are one key; other bytes stay bytes (the
        # segment takes them as they are, and no str key can equal them).
        k: Key
        if isinstance(key, str):
            k = key
        elif isinstance(key, bytes):
            try:
                k = key.decode("utf-8")
            except UnicodeDecodeError:
                k = key
        else:
            raise TypeError(f"cache keys are str or bytes, not {type(key).__name__}")
        if namespace is not None:
            ns = self._ns_prefix(namespace)
            k = ns + k if isinstance(k, str) else ns.encode() + k
        if len(k) > self._short_limit:
            k = shorten(k, self.max_key_len)
        return k

    def _ttl(self, ttl: float | None | _Unset) -> float | None:
        return self.config.default_ttl if isinstance(ttl, _Unset) else ttl

    def _store(self, key: Key, value: Any, ttl: float | None, *,
               tags: tuple[tuple[str, bytes], ...] = (), stale: float | None = None,
               negative: bool = False, ser: Serializer | None = None,
               codec: Codec | None | _Unset = _UNSET, mode: str = "set",
               use_l0: bool = True, lower_mask: int = 0) -> int | None:
        meta: Meta | None = None
        engine_ttl = ttl
        if tags or stale or negative:
            fresh_until = 0
            if stale and ttl is not None:
                fresh_until = int((self._clock() + ttl) * 1000)
                engine_ttl = ttl + stale
            meta = (fresh_until, tags, negative)
        data, flags = self._encode(value, ser or self._serializer,
                                   self._codec if codec is _UNSET else codec, meta)
        flags |= lower_mask & _NO_LOWER
        seg = self.segment
        if mode == "add":
            ver = seg.add(key, data, engine_ttl, flags=flags)
        elif mode == "replace":
            ver = seg.replace(key, data, engine_ttl, flags=flags)
        else:
            ver = seg.set(key, data, engine_ttl, flags=flags)
        if ver is not None and use_l0 and self._use_l0:
            self._l0_put(key, (ver, value, meta))
        else:
            self._l0.pop(key, None)
        if ver is not None and self._write_through:
            assert self._lower is not None
            self._lower.write(key.encode() if isinstance(key, str) else key, data, flags,
                              None if engine_ttl is None else time.time() + engine_ttl,
                              self.host_id)
        return ver

    def _written(self, key: Key) -> None:
        """Write-through of a key the engine changed in place (incr, touch)."""
        if not self._write_through:
            return
        assert self._lower is not None
        got = self.segment.get_with_info(key)
        if got is not None:
            raw, info = got
            self._lower.write(key.encode() if isinstance(key, str) else key, raw,
                              info.flags, info.expires_at, self.host_id)

    def _delete_key(self, key: Key) -> bool:
        """Delete in L1 and make the lower levels and the other hosts follow."""
        self._l0.pop(key, None)
        found = self.segment.delete(key)
        if self._lower is not None:
            if self._write_through:
                self._lower.delete(key.encode() if isinstance(key, str) else key,
                                   self.host_id)
            elif not found:  # not here, but maybe below or on another host
                self.segment.journal_note_delete(key)
        return found

    # -- internals: background refreshes (stale-while-revalidate) ---------------------

    def _refresh_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        pid = os.getpid()
        with self._bg_lock:
            if self._bg_pool is None or self._bg_pid != pid:
                # First use, after close(), or in a forked child (the parent's pool has
                # no threads here: drop it without shutting it down).
                self._bg_pool = concurrent.futures.ThreadPoolExecutor(
                    _REFRESH_WORKERS, thread_name_prefix="shmcache-refresh")
                self._bg_pid = pid
                self._bg_futures = set()
            return self._bg_pool

    @staticmethod
    def _refresh_context() -> contextvars.Context:
        """The caller's context, minus the re-entrancy guard (the refresh is not part
        of whatever computation the caller may be inside)."""
        ctx = contextvars.copy_context()
        ctx.run(stampede.computing.set, frozenset())
        return ctx

    def _spawn_sync(self, key: str, job: Callable[[], Any],
                    abandon: Callable[[], None]) -> bool:
        """Run ``job`` (a refresh holding the lease) on the pool; False if the pool
        does not take it (shut down meanwhile), so the caller refreshes inline."""
        ctx = self._refresh_context()
        try:
            fut: concurrent.futures.Future[None] = self._refresh_pool().submit(
                ctx.run, self._run_refresh, key, job)
        except RuntimeError:  # shut down by close() meanwhile, or interpreter exit
            return False
        with self._bg_lock:
            self._bg_futures.add(fut)

        def done(f: concurrent.futures.Future[None]) -> None:
            if f.cancelled():  # dropped by close() before it ran: free its lease
                abandon()
            with self._bg_lock:
                self._bg_futures.discard(f)

        fut.add_done_callback(done)
        return True

    def _spawn_async(self, key: str, coro: Coroutine[Any, Any, Any],
                     abandon: Callable[[], None]) -> bool:
        """Run ``coro`` (a refresh holding the lease) as a task of the running loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: refresh inline
            coro.close()
            return False
        task = self._refresh_context().run(loop.create_task,
                                           self._arun_refresh(key, coro))
        self._bg_tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._bg_tasks.discard(t)
            if t.cancelled():  # maybe before it started: free the lease either way
                coro.close()
                abandon()

        task.add_done_callback(done)
        return True

    def _run_refresh(self, key: str, job: Callable[[], Any]) -> None:
        try:
            job()
        except Exception as e:  # noqa: BLE001 - counted by the flow; logged here
            self._refresh_failed(key, e)

    async def _arun_refresh(self, key: str, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except Exception as e:  # noqa: BLE001 - counted by the flow; logged here
            self._refresh_failed(key, e)

    @staticmethod
    def _refresh_failed(key: str, exc: Exception) -> None:
        # The exception's type only: its message may carry arguments or values.
        _log.warning("shmcache: background refresh of %r failed (%s); its lease is "
                     "released and the stale value is served until it expires",
                     key, type(exc).__name__)

    def _background_wait(self, timeout: float | None = None) -> bool:
        """Wait for this process's background refreshes of sync functions queued or
        running now; True if all finished within ``timeout`` (for tests and
        shutdown)."""
        with self._bg_lock:
            pending = set(self._bg_futures) if self._bg_pid == os.getpid() else set()
        _, not_done = concurrent.futures.wait(pending, timeout)
        return not not_done

    async def _abackground_wait(self) -> None:
        """Await the background refresh tasks (async functions) pending now."""
        tasks = set(self._bg_tasks)
        if tasks:
            await asyncio.wait(tasks)

    # -- the key/value API -----------------------------------------------------------

    def get(self, key: str | bytes, default: Any = None, *,
            namespace: str | None = None) -> Any:
        """The cached object, or ``default`` on a miss.  Pass ``default=MISSING`` to
        tell a miss from a cached ``None``.

        >>> cache = Cache(CacheConfig(name="doc-get", c_memory_size_mb=8))
        >>> cache.set("k", None)
        >>> cache.get("k", MISSING) is None, cache.get("nope", MISSING) is MISSING
        (True, True)
        >>> cache.close(); cache.unlink()
        """
        st, v = self._lookup(self._full_key(key, namespace), self._counters, self._use_l0)
        return v if st == FRESH else default

    def set(self, key: str | bytes, value: Any, ttl: float | None | _Unset = _UNSET, *,
            tags: Iterable[str] = (), namespace: str | None = None,
            serializer: str | Serializer | None = None,
            compression: bool | str | None = None) -> None:
        """Store ``value`` (``ttl`` seconds; default ``config.default_ttl``).

        ``tags`` make it go away with :meth:`invalidate_tags`; ``serializer`` and
        ``compression`` override the configuration for this entry (the choice is
        recorded in the entry, so any reader decodes it).  The object cache does not
        keep ``value`` itself: the next :meth:`get` decodes the stored bytes, so this
        process sees what every other process sees (a JSON tuple reads back as a list;
        mutating ``value`` afterwards changes nothing cached).

        >>> cache = Cache(CacheConfig(name="doc-set", c_memory_size_mb=8))
        >>> cache.set("cfg", {"debug": True}, ttl=30, tags=["config"], serializer="json")
        >>> cache.get("cfg")
        {'debug': True}
        >>> cache.close(); cache.unlink()
        """
        self._counters.sets += 1
        self._store(self._full_key(key, namespace), value, self._ttl(ttl),
                    tags=self._tag_snapshot(tags) if tags else (),
                    ser=get_serializer(serializer) if serializer is not None else None,
                    codec=_UNSET if compression is None else _codec_for(compression),
                    use_l0=False)

    def add(self, key: str | bytes, value: Any, ttl: float | None | _Unset = _UNSET, *,
            tags: Iterable[str] = (), namespace: str | None = None) -> bool:
        """Store only if the key is absent; True if stored.

        >>> cache = Cache(CacheConfig(name="doc-add", c_memory_size_mb=8))
        >>> cache.add("once", 1), cache.add("once", 2), cache.get("once")
        (True, False, 1)
        >>> cache.close(); cache.unlink()
        """
        self._counters.sets += 1
        return self._store(self._full_key(key, namespace), value, self._ttl(ttl),
                           tags=self._tag_snapshot(tags) if tags else (),
                           mode="add", use_l0=False) is not None

    def delete(self, key: str | bytes, *, namespace: str | None = None) -> bool:
        """Remove the key in every process; True if it was present."""
        k = self._full_key(key, namespace)
        self._counters.deletes += 1
        return self._delete_key(k)

    def touch(self, key: str | bytes, ttl: float | None | _Unset = _UNSET, *,
              namespace: str | None = None) -> bool:
        """Give the key a new TTL (default ``config.default_ttl``; ``ttl=None``
        removes its expiry); False if absent.  Without ``ttl`` and without a
        ``default_ttl`` there is no TTL to give: ``ValueError`` (rather than silently
        making the entry immortal).

        >>> cache = Cache(CacheConfig(name="doc-touch", c_memory_size_mb=8))
        >>> cache.set("k", 1, ttl=5)
        >>> cache.touch("k", 60), cache.touch("nope", 60)
        (True, False)
        >>> cache.touch("k")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: touch('k') without ttl needs config.default_ttl; ...
        >>> cache.close(); cache.unlink()
        """
        t = self._ttl(ttl)
        if t is None and isinstance(ttl, _Unset):
            raise ValueError(f"touch({key!r}) without ttl needs config.default_ttl; "
                             f"pass ttl=None to remove the expiry")
        k = self._full_key(key, namespace)
        found = self.segment.touch(k, t)
        if found:
            self._written(k)
        return found

    def incr(self, key: str | bytes, delta: int = 1, *, initial: int = 0,
             ttl: float | None = None, namespace: str | None = None) -> int:
        """Atomically add ``delta`` to a counter (created as ``initial`` + ``delta``)
        and return the new value.  Counters are the engine's decimal integers: read
        them with ``incr(key, 0)`` (``get`` returns their raw bytes).

        >>> cache = Cache(CacheConfig(name="doc-incr", c_memory_size_mb=8))
        >>> cache.incr("hits"), cache.incr("hits", 5), cache.incr("hits", 0)
        (1, 6, 6)
        >>> cache.close(); cache.unlink()
        """
        k = self._full_key(key, namespace)
        n = self.segment.incr(k, delta, initial=initial, ttl=ttl)
        self._written(k)
        return n

    def contains(self, key: str | bytes, *, namespace: str | None = None) -> bool:
        """True if the segment holds the key: it does not decode the entry and is not
        counted as a hit, so it is also True for an entry that :meth:`get` treats as a
        miss (tag-invalidated, a cached exception, one it cannot decode) or that is
        stale (past ``ttl`` within ``stale_while_revalidate``)."""
        return self.segment.contains(self._full_key(key, namespace))

    __contains__ = contains

    def get_many(self, keys: Iterable[str | bytes], *,
                 namespace: str | None = None) -> dict[str | bytes, Any]:
        """``{key: value}`` for the keys that are present."""
        out: dict[str | bytes, Any] = {}
        for k in keys:
            v = self.get(k, MISSING, namespace=namespace)
            if v is not MISSING:
                out[k] = v
        return out

    def set_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]],
                 ttl: float | None | _Unset = _UNSET, *, tags: Iterable[str] = (),
                 namespace: str | None = None) -> None:
        """Store several entries (each one atomically; the batch is not)."""
        pairs = items.items() if isinstance(items, Mapping) else items
        tags = tuple(tags)
        for k, v in pairs:
            self.set(k, v, ttl, tags=tags, namespace=namespace)

    def clear(self) -> None:
        """Remove every entry of the segment (all processes), and this process's L0."""
        self._l0.clear()
        self.segment.clear()
        if self._write_through:
            assert self._lower is not None
            self._lower.clear(self.host_id)

    # -- invalidation ----------------------------------------------------------------

    def invalidate_tags(self, *tags: str) -> None:
        """Make every entry carrying any of ``tags`` a miss, in every process at once.

        >>> cache = Cache(CacheConfig(name="doc-tags", c_memory_size_mb=8))
        >>> cache.set("u:1", "alice", tags=["users"])
        >>> cache.invalidate_tags("users")
        >>> cache.get("u:1", MISSING) is MISSING
        True
        >>> cache.close(); cache.unlink()
        """
        for t in tags:
            # A fresh random generation, not +1: two hosts invalidating the same tag at
            # once must not both land on the same next value.
            tk = shorten(_TAG_PREFIX + t, self.max_key_len)
            self.segment.set(tk, str(_rand_gen()).encode())
            self._written(tk)

    def invalidate_namespace(self, namespace: str) -> None:
        """Orphan every key of ``namespace`` (a version bump; no scan)."""
        nk = shorten(_NS_PREFIX + namespace, self.max_key_len)
        self.segment.set(nk, str(_rand_gen()).encode())
        self._written(nk)

    def emit(self, *events: str) -> None:
        """Drop everything registered with ``invalidate_on=`` for these events."""
        self.invalidate_tags(*(_EVENT_PREFIX + e for e in events))

    # -- async twins -----------------------------------------------------------------

    # The async twins share the sync implementation.  Whatever stays in the segment
    # (microseconds) runs on the event loop's thread; whatever may wait on Redis or the
    # disk -- a read that misses L1 with lower levels configured, any write in
    # write-through mode -- runs in a worker thread, so the loop never blocks on I/O.

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def aget(self, key: str | bytes, default: Any = None, *,
                   namespace: str | None = None) -> Any:
        """Async :meth:`get`."""
        k = self._full_key(key, namespace)
        if self._lower is not None and not self.segment.contains(k):
            st, v = await self._io(self._lookup, k, self._counters, self._use_l0)
        else:
            st, v = self._lookup(k, self._counters, self._use_l0)
        return v if st == FRESH else default

    async def aset(self, key: str | bytes, value: Any,
                   ttl: float | None | _Unset = _UNSET, *, tags: Iterable[str] = (),
                   namespace: str | None = None, serializer: str | Serializer | None = None,
                   compression: bool | str | None = None) -> None:
        """Async :meth:`set`."""
        kw: dict[str, Any] = {"tags": tags, "namespace": namespace,
                              "serializer": serializer, "compression": compression}
        if self._write_through:
            return await self._io(self.set, key, value, ttl, **kw)
        self.set(key, value, ttl, **kw)

    async def aadd(self, key: str | bytes, value: Any, ttl: float | None | _Unset = _UNSET,
                   *, tags: Iterable[str] = (), namespace: str | None = None) -> bool:
        """Async :meth:`add`."""
        if self._write_through:
            return await self._io(self.add, key, value, ttl, tags=tags, namespace=namespace)
        return self.add(key, value, ttl, tags=tags, namespace=namespace)

    async def adelete(self, key: str | bytes, *, namespace: str | None = None) -> bool:
        """Async :meth:`delete`."""
        if self._write_through:
            return await self._io(self.delete, key, namespace=namespace)
        return self.delete(key, namespace=namespace)

    async def atouch(self, key: str | bytes, ttl: float | None | _Unset = _UNSET, *,
                     namespace: str | None = None) -> bool:
        """Async :meth:`touch`."""
        if self._write_through:
            return await self._io(self.touch, key, ttl, namespace=namespace)
        return self.touch(key, ttl, namespace=namespace)

    async def aincr(self, key: str | bytes, delta: int = 1, *, initial: int = 0,
                    ttl: float | None = None, namespace: str | None = None) -> int:
        """Async :meth:`incr`."""
        if self._write_through:
            return await self._io(self.incr, key, delta, initial=initial, ttl=ttl,
                                  namespace=namespace)
        return self.incr(key, delta, initial=initial, ttl=ttl, namespace=namespace)

    async def aget_many(self, keys: Iterable[str | bytes], *,
                        namespace: str | None = None) -> dict[str | bytes, Any]:
        """Async :meth:`get_many`."""
        out: dict[str | bytes, Any] = {}
        for k in keys:
            v = await self.aget(k, MISSING, namespace=namespace)
            if v is not MISSING:
                out[k] = v
        return out

    async def aset_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]],
                        ttl: float | None | _Unset = _UNSET, *, tags: Iterable[str] = (),
                        namespace: str | None = None) -> None:
        """Async :meth:`set_many`."""
        if self._write_through:
            return await self._io(self.set_many, items, ttl, tags=tags, namespace=namespace)
        self.set_many(items, ttl, tags=tags, namespace=namespace)

    async def aclear(self) -> None:
        """Async :meth:`clear`."""
        if self._write_through:
            return await self._io(self.clear)
        self.clear()

    # -- decorator -------------------------------------------------------------------

    def cached(self, ttl: float | None | _Unset = _UNSET, *,
               level: CacheLevel | Sequence[CacheLevel] | None = None,
               key_builder: Callable[..., object] | None = None,
               compression: bool | str | None = None,
               serializer: str | Serializer | None = None,
               invalidate_on: Iterable[str] = (),
               tags: Iterable[str] | Callable[..., Iterable[str]] = (),
               namespace: str | None = None,
               stale_while_revalidate: float | None = None,
               copy: bool = False,
               cache_none: bool = True,
               cache_errors: tuple[type[BaseException], ...] = (),
               negative_ttl: float = 5.0,
               stampede: bool = True,
               wait_timeout: float | None = None,
               ignore_self: bool = False,
               name: str | None = None,
               ) -> CacheDecorator:
        """Cache a function's results in the shared segment.

        Works on plain and ``async def`` functions, methods, static and class methods.
        The key is ``module.qualname|args`` (keys.py) unless ``key_builder(*args,
        **kwargs)`` returns one; ``namespace`` prefixes a versioned namespace.  On a
        miss one process computes while the others wait (``stampede``; at most
        ``wait_timeout`` seconds, then they compute themselves); with
        ``stale_while_revalidate=s`` an entry stays ``s`` seconds past ``ttl`` and is
        served stale meanwhile: every caller that finds it stale gets the stale value
        at once, and the one that takes the lease starts a background refresh (a
        thread of this cache's small pool for sync functions, an asyncio task for
        async ones); a failed refresh is counted in ``errors``, logged on the
        ``shmcache.cache`` logger, stores nothing and frees the lease, so the stale
        value is served until it expires.  ``tags`` (static, or a function
        of the arguments) and ``invalidate_on`` events make entries go away with
        :meth:`invalidate_tags` / :meth:`emit`.  ``copy=True`` deserializes a fresh
        object on every hit (for callers that mutate results).  ``cache_none=False``
        does not store ``None``; ``cache_errors`` exceptions are cached for
        ``negative_ttl`` seconds and re-raised.  ``ignore_self`` leaves ``self`` out of
        method keys (otherwise it needs a ``__cache_key__()``).  ``name`` replaces the
        qualified name as the key prefix and the statistics name: functions made by one
        factory share a qualified name, and decorating a second one on the same
        ``Cache`` raises ``TypeError`` unless each has its own ``name`` (or a
        ``key_builder``).  Decorating the same function object again is fine.

        On a miss the computed object itself is kept in this process's object cache
        and returned by later hits here (like ``functools.lru_cache``; other processes
        get a decoded copy): do not mutate results, or pass ``copy=True``.  A segment
        that is full (or locked past ``lock_timeout``) never fails a call: the result is
        computed and returned without the lease or without being stored, counted in
        ``store_errors`` with a ``RuntimeWarning``.  An entry that cannot be decoded
        (its class was renamed, lz4 is missing here) is a miss: it is dropped, logged
        once per key on the ``shmcache.cache`` logger and recomputed.

        The result has ``.key(*args)``, ``.invalidate(*args)``, ``.refresh(*args)``
        (recompute and store) and ``.bypass(*args)`` (call without the cache).

        >>> cache = Cache(CacheConfig(name="doc-cached", c_memory_size_mb=8))
        >>> @cache.cached(ttl=60, key_builder=lambda user_id: f"user:{user_id}")
        ... def get_user(user_id: int) -> dict[str, int]:
        ...     return {"id": user_id}
        >>> get_user(7), get_user.key(7), get_user.invalidate(7)
        ({'id': 7}, 'user:7', True)
        >>> cache.close(); cache.unlink()
        """
        lower_mask = 0
        if level is not None:
            levels = {level} if isinstance(level, CacheLevel) else set(level)
            levels.add(CacheLevel.C_MEMORY)
            extra = levels - set(self.config.levels)
            if extra:
                raise TierNotAvailableError(
                    f"level {', '.join(lv.name for lv in extra)} is not configured for "
                    f"this cache (levels={[lv.name for lv in self.config.levels]})")
            if not levels & {CacheLevel.REDIS, CacheLevel.DISTRIBUTED}:
                lower_mask |= F_NO_L2
            if CacheLevel.DISK not in levels:
                lower_mask |= F_NO_L3
        opts = _Options(
            ttl=self._ttl(ttl), key_builder=key_builder,
            codec=_UNSET if compression is None else _codec_for(compression),
            serializer=get_serializer(serializer) if serializer is not None else None,
            tags=tags, events=tuple(_EVENT_PREFIX + e for e in invalidate_on),
            namespace=namespace, stale=stale_while_revalidate,
            use_l0=self._use_l0 and not copy, cache_none=cache_none,
            cache_errors=tuple(cache_errors), negative_ttl=negative_ttl,
            stampede=stampede,
            wait_timeout=self.config.wait_timeout if wait_timeout is None else wait_timeout,
            ignore_self=ignore_self, name=name, lower_mask=lower_mask)
        if opts.stale is not None and opts.ttl is None:
            raise ValueError("stale_while_revalidate needs a ttl")

        return CacheDecorator(self, opts)

    # -- warming ---------------------------------------------------------------------

    def _fresh(self, key: str) -> bool:
        """A real lookup (not counted): a tag-invalidated, stale, negative or
        undecodable entry is not fresh, so :meth:`warm` reloads it."""
        st, _ = self._lookup(self._full_key(key, None), Counters(), self._use_l0)
        return st == FRESH

    def warm(self, items: Iterable[tuple[str, Callable[[], Any]]], *, concurrency: int = 4,
             force: bool = False, ttl: float | None | _Unset = _UNSET,
             tags: Iterable[str] = (), progress: bool = False) -> Any:
        """Load ``(key, loader)`` pairs; returns a :class:`WarmReport`, or on a thread
        running an event loop, an awaitable of it.

        The rule is decided by the calling thread alone: if it has a running event
        loop (``asyncio.get_running_loop()`` succeeds, i.e. ``warm`` is called from a
        coroutine or from anything the loop runs), ``warm(...)`` does nothing yet and
        returns ``awarm(...)`` with the same arguments -- a coroutine to ``await``
        (``await cache.warm([...])``); loaders run on the loop and may return
        awaitables.  Otherwise it loads synchronously with ``concurrency`` threads and
        returns the report (loaders must not return awaitables there).  So sync code
        that runs on an event loop's thread (a sync helper called from a coroutine)
        gets a coroutine, not a report: it must call :meth:`awarm` and await it, or
        run ``warm`` in an executor (``await loop.run_in_executor(None, lambda:
        cache.warm(items))``).  The return type is ``Any`` for that reason.

        Keys holding a fresh value (what :meth:`get` would return) are skipped unless
        ``force``; tag-invalidated, stale and undecodable entries are reloaded.  A
        failing loader is recorded in the report and does not stop the others;
        ``progress`` shows a tqdm bar if tqdm is installed, else a line on stderr.

        >>> cache = Cache(CacheConfig(name="doc-warm", c_memory_size_mb=8))
        >>> r = cache.warm([("a", lambda: 1), ("b", lambda: 1 / 0)])
        >>> r.loaded, list(r.failed)
        (['a'], ['b'])
        >>> cache.close(); cache.unlink()
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._warm_sync(items, concurrency=concurrency, force=force, ttl=ttl,
                                   tags=tags, progress=progress)
        return self.awarm(items, concurrency=concurrency, force=force, ttl=ttl, tags=tags,
                          progress=progress)

    def _warm_sync(self, items: Iterable[tuple[str, Callable[[], Any]]], *,
                   concurrency: int, force: bool, ttl: float | None | _Unset,
                   tags: Iterable[str], progress: bool) -> WarmReport:
        pairs = list(items)
        report = WarmReport()
        bar = _Progress(len(pairs), progress)
        tags = tuple(tags)
        lock = threading.Lock()

        def one(key: str, loader: Callable[[], Any]) -> None:
            try:
                if not force and self._fresh(key):
                    with lock:
                        report.skipped.append(key)
                    return
                value = loader()
                if inspect.isawaitable(value):
                    with contextlib.suppress(AttributeError):
                        value.close()  # type: ignore[attr-defined]
                    raise TypeError(f"loader for {key!r} returned an awaitable: "
                                    f"use Cache.awarm")
                self.set(key, value, ttl, tags=tags)
                with lock:
                    report.loaded.append(key)
            except Exception as e:  # noqa: BLE001 - reported per item
                with lock:
                    report.failed[key] = e
            finally:
                bar.step(len(report.failed))

        with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as ex:
            list(ex.map(lambda kv: one(*kv), pairs))
        bar.close()
        return report

    async def awarm(self, items: Iterable[tuple[str, Callable[[], Any]]], *,
                    concurrency: int = 4, force: bool = False,
                    ttl: float | None | _Unset = _UNSET, tags: Iterable[str] = (),
                    progress: bool = False) -> WarmReport:
        """Async :meth:`warm`: loaders may be sync or return awaitables; at most
        ``concurrency`` run at once.  ``await cache.warm(...)`` inside a coroutine is
        this (see :meth:`warm`).
        """
        pairs = list(items)
        report = WarmReport()
        bar = _Progress(len(pairs), progress)
        sem = asyncio.Semaphore(max(1, concurrency))
        tags = tuple(tags)

        async def one(key: str, loader: Callable[[], Any]) -> None:
            async with sem:
                try:
                    if not force and self._fresh(key):
                        report.skipped.append(key)
                        return
                    value = loader()
                    if inspect.isawaitable(value):
                        value = await value
                    self.set(key, value, ttl, tags=tags)
                    report.loaded.append(key)
                except Exception as e:  # noqa: BLE001 - reported per item
                    report.failed[key] = e
                finally:
                    bar.step(len(report.failed))

        await asyncio.gather(*(one(k, f) for k, f in pairs))
        bar.close()
        return report

    # -- statistics ------------------------------------------------------------------

    def get_statistics(self) -> CacheStatistics:
        """A typed snapshot of this process's counters and the segment's figures.

        >>> cache = Cache(CacheConfig(name="doc-stats", c_memory_size_mb=8))
        >>> cache.set("a", 1); _ = cache.get("a"); _ = cache.get("b")
        >>> s = cache.get_statistics()
        >>> s.hits, s.misses, s.hit_ratio, s.entries
        (1, 1, 0.5, 1)
        >>> cache.close(); cache.unlink()
        """
        total = Counters()
        funcs: dict[str, FunctionStats] = {}
        with self._reg_lock:
            self._prune_functions()
            regs = list(self._functions.items())
        for name, (c, _) in regs:
            funcs[name] = FunctionStats(name, c.l0_hits + c.l1_hits, c.misses, c.computes,
                                        c.compute_seconds, c.waits, c.stale_serves,
                                        c.errors, c.decode_errors, c.store_errors)
        for c in [self._counters] + [c for _, (c, _) in regs]:
            total.add(c)
        seg = self.segment.stats()
        hits = total.l0_hits + total.l1_hits + total.lower_hits
        tiers = self._lower.stats() if self._lower is not None else {}
        levels = {"L0": LevelStats(total.l0_hits,
                                   total.l1_hits + total.lower_hits + total.misses),
                  CacheLevel.C_MEMORY.name: LevelStats(total.l1_hits,
                                                       total.lower_hits + total.misses)}
        for name, t in tiers.items():
            levels[name] = LevelStats(t["hits"], t["misses"])
        from .sidecar import read_report
        return CacheStatistics(
            hits=hits, misses=total.misses,
            hit_ratio=hits / (hits + total.misses) if hits + total.misses else 0.0,
            levels=levels,
            sets=total.sets, deletes=total.deletes,
            memory_usage_mb=seg.used_bytes / (1 << 20),
            memory_limit_mb=seg.size_bytes / (1 << 20),
            entries=seg.entries, evictions=seg.evictions, expirations=seg.expirations,
            segment_hit_ratio=seg.hit_ratio, ops_per_second=self._rate.rate(total.ops),
            stampede_waits=total.waits, stale_serves=total.stale_serves,
            lease_breaks=total.lease_breaks, wait_timeouts=total.wait_timeouts,
            functions=funcs, decode_errors=total.decode_errors,
            store_errors=total.store_errors,
            degraded_ops=sum(t["degraded"] for t in tiers.values()),
            bad_seals=sum(t["bad_seals"] for t in tiers.values()),
            tiers=tiers, sidecar=read_report(self.segment))

    def _prune_functions(self) -> None:
        """Forget functions that no longer exist (their figures stay in the totals)."""
        for name, (c, ref) in list(self._functions.items()):
            if ref() is None:
                del self._functions[name]
                self._counters.add(c)

    def _register(self, name: str, fn: Any, keyed: bool) -> tuple[str, Counters]:
        """The statistics name and counters of a newly decorated ``fn`` whose keys
        start with ``name``.  Raises ``TypeError`` if another live function already
        uses that prefix (functions made by one factory share a qualified name, so
        they would share -- and return each other's -- results)."""
        with self._reg_lock:
            self._prune_functions()
            reg = self._functions.get(name)
            if reg is not None and reg[1]() is not None and reg[1]() is not fn:
                gc.collect()  # a dropped one may only be waiting for the collector
                self._prune_functions()
                reg = self._functions.get(name)
            other = None if reg is None else reg[1]()
            try:
                ref: Callable[[], Any] = weakref.ref(fn)
            except TypeError:
                ref = functools.partial(lambda f: f, fn)
            if other is None:
                c = Counters()
                self._functions[name] = (c, ref)
                return name, c
            if other is fn:  # decorated again: the same keys, the same figures
                return name, reg[0] if reg is not None else Counters()
            if "<locals>" not in getattr(fn, "__qualname__", "<locals>") and \
                    _same_definition(other, fn):
                # A module-level function defined again (a reload, a notebook cell run
                # twice): the old one is unreachable by its name; like a redeploy, the
                # new definition takes over its keys.
                self._functions[name] = (reg[0] if reg is not None else Counters(), ref)
                return name, self._functions[name][0]
            if keyed:  # key_builder makes the keys; only the statistics name is shared
                i = 2
                while f"{name}#{i}" in self._functions:
                    i += 1
                c = Counters()
                self._functions[f"{name}#{i}"] = (c, ref)
                return f"{name}#{i}", c
            raise TypeError(
                f"cache.cached(): {qualified_name(fn)} would share its cache keys with "
                f"another live function already decorated on this Cache under the name "
                f"{name!r} (functions made by one factory share a qualified name), so "
                f"each would return the other's results; pass name='...' (a distinct "
                f"key prefix per function, e.g. name=f\"get-{{table}}\") or "
                f"key_builder=... to cached()")


def _same_definition(a: Any, b: Any) -> bool:
    """True if ``b`` is ``a`` defined again (same module and qualified name)."""
    return (getattr(a, "__module__", None) == getattr(b, "__module__", None)
            and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None))


def _codec_for(compression: bool | str) -> Codec | None:
    if compression is False:
        return None
    if compression is True:
        return default_codec()
    return get_codec(compression)


class _Progress:
    """A tqdm bar when tqdm is installed, else a carriage-return line on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar: Any = None
        self._lock = threading.Lock()
        if enabled:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, desc="warm", unit="key")

    def step(self, failed: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += 1
            if self._bar is not None:
                self._bar.update(1)
            else:
                sys.stderr.write(f"\rwarm: {self.done}/{self.total} ({failed} failed)")
                sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


@dataclass(frozen=True, slots=True)
class _Options:
    ttl: float | None
    key_builder: Callable[..., object] | None
    codec: Codec | None | _Unset
    serializer: Serializer | None
    tags: Iterable[str] | Callable[..., Iterable[str]]
    events: tuple[str, ...]
    namespace: str | None
    stale: float | None
    use_l0: bool
    cache_none: bool
    cache_errors: tuple[type[BaseException], ...]
    negative_ttl: float
    stampede: bool
    wait_timeout: float
    ignore_self: bool
    name: str | None = None
    #: F_NO_L2 / F_NO_L3: levels this function's entries stay out of (``level=``).
    lower_mask: int = 0


class CacheDecorator:
    """What :meth:`Cache.cached` returns: apply it to a function.

    The overloads are for type checkers only (at run time both give a
    :class:`CachedFunction`): a function whose first parameter is a class
    (``def load(cls: type[X], ...)``, which is how mypy sees a ``@classmethod`` under
    the decorator) is typed as a :class:`CachedClassMethod`, bound to its class on
    every access; anything else keeps its exact signature as a
    :class:`CachedFunction`.
    """

    __slots__ = ("_cache", "_opts")

    def __init__(self, cache: Cache, opts: _Options) -> None:
        self._cache = cache
        self._opts = opts

    @overload
    def __call__(self, fn: Callable[Concatenate[type[S], P], R]
                 ) -> CachedClassMethod[S, P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, fn: Any) -> Any:
        return CachedFunction(self._cache, fn, self._opts)


class CachedClassMethod(Protocol[S_contra, P, R]):
    """The static type of ``@cache.cached()`` over ``@classmethod`` (a
    :class:`CachedFunction` at run time): called on the class or an instance it binds
    ``cls``, so ``Repo.load(1)`` and ``Repo.load.key(1)`` type-check."""

    def __call__(self, cls: type[S_contra], /, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None
                ) -> BoundCachedFunction[P, R]: ...


class CachedFunction(Segment.HotCall[P, R], Generic[P, R]):
    """A function wrapped by :meth:`Cache.cached`; call it like the function.

    Extra methods take the function's arguments: ``key``, ``invalidate``, ``refresh``
    (recompute now and store) and ``bypass`` (call without the cache).  On a class,
    it binds like a method (``obj.method.invalidate(x)`` fills in ``self``).
    """

    def __init__(self, cache: Cache, fn: Callable[P, R], opts: _Options) -> None:
        self._binding = "function"
        raw: Any = fn
        if isinstance(raw, staticmethod):
            raw, self._binding = raw.__func__, "static"
        elif isinstance(raw, classmethod):
            raw, self._binding = raw.__func__, "class"
        self._fn: Callable[..., Any] = raw
        functools.update_wrapper(self, raw)
        self._cache = cache
        self._o = opts
        self._async = inspect.iscoroutinefunction(raw)
        self._name = opts.name if opts.name is not None else qualified_name(raw)
        self._prefix = self._name + "|"
        try:
            self._params = tuple(inspect.signature(raw).parameters)
        except (TypeError, ValueError):
            self._params = ()
        self._stats_name, self._counters = cache._register(
            self._name, raw, opts.key_builder is not None)
        self._counters_t = (self._counters,)  # Cache totals sum the functions
        self._static_tags = (tuple(opts.tags) if not callable(opts.tags) else ()) + opts.events
        self._simple = (opts.key_builder is None and opts.namespace is None
                        and not opts.ignore_self)
        self._hotpath: tuple[str, Callable[[Any, str, Any, bytearray], Any],
                             dict[Key, L0Entry], bytearray] | None = (
            (self._prefix, cache._l0get, cache._l0, self._counters.l0_fast)
            if self._simple and opts.use_l0 and not self._async else None)
        # Calls go to the C base type first (native/py/fastpath.c HotCall): it serves the
        # hot path below without a Python frame and calls _call_slow for the rest.  The
        # Python copy of the hot path runs only if C could not take it.
        hot = self._hotpath
        on = self._hot_configure(type(self)._call_slow, *(
            (hot[1], hot[0], hot[2], hot[3], cache._short_limit, cache.max_key_len)
            if hot is not None else ()))
        self._py_hot = None if on else hot

    # -- keys ------------------------------------------------------------------------

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self._simple and not kwargs and len(args) == 1:
            a = args[0]
            t = type(a)
            if t is int or t is str:
                k = self._prefix + repr(a)
                return k if len(k) <= self._cache._short_limit else \
                    shorten(k, self._cache.max_key_len)
        o = self._o
        if o.key_builder is not None:
            built = o.key_builder(*args, **kwargs)
            if not isinstance(built, (str, bytes)):
                raise TypeError(f"key_builder of {self._name} returned "
                                f"{type(built).__name__}; it must return str")
            k = built.decode() if isinstance(built, bytes) else built
        else:
            try:
                k = function_key(self._fn, args, kwargs, prefix=self._name,
                                 skip_first=o.ignore_self, param_names=self._params)
            except UnkeyableArgumentError as e:
                if o.ignore_self or not self._params or self._params[0] not in (
                        "self", "cls") or "'self'" not in str(e):
                    raise
                raise UnkeyableArgumentError(
                    f"{e}; for methods, pass ignore_self=True if results do not "
                    f"depend on the instance") from None
        return self._cache._full_key(k, o.namespace)

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key of this call (the same in every process)."""
        return self._key(args, kwargs)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drop the cached result of this call, in every process; True if present."""
        k = self._key(args, kwargs)
        self._cache._l0.pop(k, None)
        return self._cache._delete_key(k)

    # -- calling ---------------------------------------------------------------------

    # Calling is the C base type's (Segment.HotCall): a hot-path hit there, else this.
    def _call_slow(self, hk: str | None, /, *args: Any, **kwargs: Any) -> Any:
        """Everything but a hot-path hit.  ``hk``: the key the C hot path built, checked
        in the object cache and missed (only for keys short enough not to be shortened),
        else None."""
        hot = self._py_hot
        if hk is None and hot is not None and not kwargs and len(args) == 1:
            # The hot path, inlined (every call and attribute lookup here costs ~20-70
            # ns of a sub-microsecond hit): one int/str argument whose object is in the
            # per-process cache without an envelope, and whose version in the segment is
            # unchanged -- checked in one direct call.  Everything else falls through.
            a = args[0]
            t = type(a)
            if t is int or t is str:
                prefix, l0get, l0, hits = hot
                hk = prefix + repr(a)
                v: R = l0get(l0, hk, _NOTFOUND, hits)
                if v is not _NOTFOUND:
                    return v
        if self._async:
            return cast(R, self._acall(args, kwargs))
        # After a hot-path miss, its key is the one _key() would build (one int/str
        # argument, no namespace) unless it is long enough to be shortened.
        checked = hk is not None and len(hk) <= self._cache._short_limit
        if checked:
            key: str = cast(str, hk)
        else:
            try:
                key = self._key(args, kwargs)
            except STORE_ERRORS as e:  # the namespace counter could not be created
                self._store_failed(e, "namespace")
                return cast(R, self._fn(*args, **kwargs))
        st, found = self._cache._lookup(key, self._counters, self._o.use_l0, True,
                                        l0_checked=checked, lower_mask=self._o.lower_mask)
        if st == FRESH:
            return cast(R, found)
        flow = self._flow(key, (st, found), args, kwargs)
        return cast(R, stampede.run_sync(flow, key, lambda: self._fn(*args, **kwargs)))

    async def _acall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            key = self._key(args, kwargs)
        except STORE_ERRORS as e:  # the namespace counter could not be created
            self._store_failed(e, "namespace")
            return await self._fn(*args, **kwargs)
        cache, mask = self._cache, self._o.lower_mask
        if cache._lower is not None and mask != _NO_LOWER and \
                not cache.segment.contains(key):
            # An L1 miss may wait on Redis or the disk: not on the event loop's thread.
            st, v = await asyncio.to_thread(cache._lookup, key, self._counters,
                                            self._o.use_l0, True, lower_mask=mask)
        else:
            st, v = cache._lookup(key, self._counters, self._o.use_l0, True,
                                  lower_mask=mask)
        if st == FRESH:
            return v
        flow = self._flow(key, (st, v), args, kwargs)
        return await stampede.run_async(
            flow, key, lambda: cast(Awaitable[Any], self._fn(*args, **kwargs)))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Recompute now (no lease, no lookup), store and return the result."""
        key = self._key(args, kwargs)
        flow = self._flow(key, (MISS, None), args, kwargs, use_lease=False)
        if self._async:
            return cast(R, stampede.run_async(
                flow, key, lambda: cast(Awaitable[Any], self._fn(*args, **kwargs))))
        return cast(R, stampede.run_sync(flow, key, lambda: self._fn(*args, **kwargs)))

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function without reading or writing the cache."""
        return cast(R, self._fn(*args, **kwargs))

    def _store_failed(self, exc: BaseException, what: str) -> None:
        """The segment could not take a write of a call (full, value too large, lock
        timeout): count it and warn at the user's call; the call goes on uncached."""
        c = self._counters
        c.errors += 1
        c.store_errors += 1
        _warn_user(f"{self._name}: {what} not cached ({type(exc).__name__}: {exc}); "
                   f"the call computed its result without the cache")

    def _flow(self, key: str, first: tuple[int, Any], args: tuple[Any, ...],
              kwargs: dict[str, Any], use_lease: bool | None = None) -> stampede.Flow:
        cache, o = self._cache, self._o
        cfg = cache.config

        scratch = Counters()  # re-checks and polls are not counted as misses

        def lookup() -> tuple[int, Any]:
            return cache._lookup(key, scratch, o.use_l0, True, lower_mask=o.lower_mask)

        def before() -> tuple[tuple[str, bytes], ...] | None:
            """The tag generations (None: they could not be stored; do not cache)."""
            tags = self._static_tags
            if callable(o.tags):
                tags = tuple(o.tags(*args, **kwargs)) + tags
            if not tags:
                return ()
            try:
                return cache._tag_snapshot(tags)
            except STORE_ERRORS as e:
                self._store_failed(e, "tag counter")
                return None

        def store(value: Any, tags: tuple[tuple[str, bytes], ...] | None) -> None:
            if (value is None and not o.cache_none) or tags is None:
                return
            try:
                cache._store(key, value, o.ttl, tags=tags, stale=o.stale,
                             ser=o.serializer, codec=o.codec, use_l0=o.use_l0,
                             lower_mask=o.lower_mask)
            except STORE_ERRORS as e:
                self._store_failed(e, "result")
            except TypeError as e:
                raise TypeError(f"{self._name}: cannot cache its result: {e}") from e

        def store_error(exc: BaseException,
                        tags: tuple[tuple[str, bytes], ...] | None) -> None:
            if not o.cache_errors or not isinstance(exc, o.cache_errors) or tags is None:
                return
            try:
                pickle.dumps(exc, protocol=5)
                err: BaseException = exc
            except Exception:  # noqa: BLE001 - unpicklable exception: store its text
                err = CachedCallError(f"{type(exc).__name__}: {exc}")
            try:
                cache._store(key, err, o.negative_ttl, tags=tags, negative=True,
                             ser=get_serializer("pickle"), use_l0=o.use_l0,
                             lower_mask=o.lower_mask | F_NO_L2 | F_NO_L3)
            except STORE_ERRORS as e:
                self._store_failed(e, "exception")
            except ShmCacheError:
                pass

        def background(flow: stampede.Flow, abandon: Callable[[], None]) -> bool:
            """Refresh a stale entry off the caller's path (it returns the stale value):
            a task of the running loop for async functions, the pool for sync ones."""
            if self._async:
                return cache._spawn_async(key, stampede.run_async(
                    flow, key, lambda: cast(Awaitable[Any], self._fn(*args, **kwargs))),
                    abandon)
            return cache._spawn_sync(key, functools.partial(
                stampede.run_sync, flow, key, lambda: self._fn(*args, **kwargs)), abandon)

        return stampede.single_flight(
            cache.segment, key, first=first, lookup=lookup, before=before, store=store,
            store_error=store_error, lease_failed=lambda e: self._store_failed(e, "lease"),
            counters=self._counters_t,
            max_key_len=cache.max_key_len, lease_ttl=cfg.lease_ttl,
            wait_timeout=o.wait_timeout, poll_min=cfg.poll_min, poll_max=cfg.poll_max,
            stale_ok=o.stale is not None,
            use_lease=o.stampede if use_lease is None else use_lease,
            background=background if o.stale is not None else None)

    # -- binding ---------------------------------------------------------------------

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> CachedFunction[P, R]: ...

    @overload
    def __get__(self: CachedFunction[Concatenate[S, P2], T], instance: S,
                owner: type[Any]) -> BoundCachedFunction[P2, T]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if self._binding == "static":
            return self
        if self._binding == "class":
            return BoundCachedFunction(self, owner if owner is not None else type(instance))
        if instance is None:
            return self
        return BoundCachedFunction(self, instance)

    def __repr__(self) -> str:
        return f"<cached {self._name}>"


class BoundCachedFunction(Generic[P, R]):
    """A :class:`CachedFunction` bound to an instance (or a class, for classmethods)."""

    __slots__ = ("_cf", "_first", "__wrapped__")

    def __init__(self, cf: CachedFunction[Any, Any], first: Any) -> None:
        self._cf = cf
        self._first = first
        self.__wrapped__ = cf._fn

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return cast(R, self._cf(self._first, *args, **kwargs))

    def key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """See :meth:`CachedFunction.key`."""
        return self._cf.key(self._first, *args, **kwargs)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """See :meth:`CachedFunction.invalidate`."""
        return self._cf.invalidate(self._first, *args, **kwargs)

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """See :meth:`CachedFunction.refresh`."""
        return cast(R, self._cf.refresh(self._first, *args, **kwargs))

    def bypass(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """See :meth:`CachedFunction.bypass`."""
        return cast(R, self._cf.bypass(self._first, *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cf, name)


__all__ += ["TierNotAvailableError", "CacheConfig", "CacheLevel"]
