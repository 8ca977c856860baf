"""The L1 engine as Python sees it: one shared-memory segment, bytes in, bytes out.

``Segment`` is a thin, typed wrapper over the C engine in ``native/`` (through the cffi
module ``shmcache._native``).  It owns three things only: opening the POSIX segment by
name (``posix_ipc``; never ``multiprocessing.shared_memory``, whose resource tracker
unlinks segments at exit), turning engine status codes into exceptions, and the
per-thread copy-out buffers.  It knows nothing of serialization, tiers or decorators.

Example::

    >>> seg = Segment.open("demo-doc", size=8 << 20)
    >>> seg.set(b"user:1", b"alice", ttl=60)
    1
    >>> seg.get(b"user:1")
    b'alice'
    >>> seg.close(); unlink_segment("demo-doc")
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, fields
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import posix_ipc

from . import errors
from ._native import ffi, lib

__all__ = [
    "Segment",
    "ItemInfo",
    "PinnedValue",
    "SegmentStats",
    "ClassStats",
    "SlotStats",
    "JournalRecord",
    "unlink_segment",
    "segment_exists",
    "POLICIES",
]

POLICIES: Final = {"lru": lib.SHM_POLICY_LRU, "sieve": lib.SHM_POLICY_SIEVE,
                   "s3fifo": lib.SHM_POLICY_S3FIFO}
_POLICY_NAMES: Final = {v: k for k, v in POLICIES.items()}
_REASONS: Final = ("capacity", "entries", "rebalance", "expired_read", "expired_sweep")
_JOPS: Final = {lib.SHM_JOP_SET: "set", lib.SHM_JOP_DELETE: "delete",
                lib.SHM_JOP_TOUCH: "touch", lib.SHM_JOP_CLEAR: "clear"}

_INITIAL_BUF = 64 * 1024

_ERRORS: Final[dict[int, type[Exception]]] = {
    lib.SHM_EKEYLEN: errors.KeyTooLongError,
    lib.SHM_EVALLEN: errors.ValueTooLargeError,
    lib.SHM_EFULL: errors.SegmentFullError,
    lib.SHM_ECORRUPT: errors.SegmentCorruptError,
    lib.SHM_EINCOMPAT: errors.IncompatibleSegmentError,
    lib.SHM_EFOREIGN: errors.ForeignSegmentError,
    lib.SHM_ETIMEDOUT: errors.LockTimeoutError,
    lib.SHM_EEXISTS: errors.KeyExistsError,
    lib.SHM_ENOTNUM: errors.NotAnIntegerError,
    lib.SHM_ENOMEM: MemoryError,
    lib.SHM_ESYS: errors.SegmentError,
    lib.SHM_ENOTREADY: errors.SegmentNotReadyError,
    lib.SHM_EINVAL: ValueError,
    lib.SHM_EOVERFLOW: errors.CounterOverflowError,
    lib.SHM_ENOSLOT: errors.NoSlotError,
    lib.SHM_EVERSION: errors.VersionMismatchError,
}


_ERRORS.update({
    -1000: errors.NotBytesError,        # codes of the direct-call path (fastpath.c)
    -1001: errors.SegmentClosedError,
    -1002: ValueError,
    -1003: TypeError,
})


def _raise(rc: int) -> None:
    msg = ffi.string(lib.shm_last_error()).decode("utf-8", "replace")
    _raise_code(rc, msg)


def _raise_code(rc: int, msg: str) -> None:
    exc = _ERRORS.get(rc, errors.ShmCacheError)
    raise exc(msg or f"shmcache engine error {rc}")


def _posix_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip("/"):
        raise ValueError(f"segment name must be a non-empty str, got {name!r}")
    if "/" in name.strip("/"):
        raise ValueError(f"segment name may not contain '/': {name!r}")
    return "/" + name.strip("/")


def _key_bytes(key: object) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    raise errors.NotBytesError(
        f"key must be str or bytes-like, not {type(key).__name__}")


def _value_bytes(value: object) -> Any:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return ffi.from_buffer(value)
    raise errors.NotBytesError(
        f"value must be bytes-like (bytes, bytearray, memoryview), "
        f"not {type(value).__name__}; serialize it first or use shmcache.Cache")


def _ttl_ms(ttl: float | None) -> int:
    if ttl is None:
        return 0
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be seconds as int/float or None, not {type(ttl).__name__}")
    if ttl <= 0:
        raise ValueError(f"ttl must be > 0 seconds (or None for no expiry), got {ttl!r}")
    return max(1, int(ttl * 1000))


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """Metadata of one entry: its version, absolute expiry, length and user flags."""

    version: int
    expires_at: float | None
    value_len: int
    flags: int


def _info(ci: Any) -> ItemInfo:
    exp = ci.expires_at_ms
    return ItemInfo(ci.version, exp / 1000.0 if exp else None, ci.value_len, ci.flags)


def _struct_dict(cdata: Any, cls: type) -> dict[str, Any]:
    return {f.name: getattr(cdata, f.name) for f in fields(cls)}


def _counters(c: Any) -> dict[str, int]:
    d = {k: int(getattr(c, k)) for k in
         ("hits", "misses", "sets", "deletes", "touches", "incrs", "set_failures",
          "lock_repairs", "corrupt_dropped")}
    for i, r in enumerate(_REASONS):
        d[f"evicted_{r}"] = int(c.evictions[i])
    return d


@dataclass(frozen=True, slots=True)
class ClassStats:
    """Memory of one size class (``chunk_bytes == 0``: the large-value page runs)."""

    chunk_bytes: int
    pages: int
    entries: int
    used_bytes: int
    free_bytes: int
    payload_bytes: int
    evictions: int


@dataclass(frozen=True, slots=True)
class SlotStats:
    """One attached process: its pid, liveness and counters."""

    slot: int
    pid: int
    state: str
    generation: int
    attached_at: float
    pins: int
    counters: dict[str, int]


@dataclass(frozen=True, slots=True)
class SegmentStats:
    """A consistent-enough snapshot of the segment's statistics."""

    counters: dict[str, int]
    size_bytes: int
    data_bytes: int
    index_buckets: int
    entries: int
    max_entries: int
    used_bytes: int
    free_bytes: int
    payload_bytes: int
    pages_total: int
    pages_free: int
    journal_bytes: int
    journal_used: int
    journal_records: int
    journal_dropped: int
    generation: int
    policy: str
    nstripes: int
    max_slots: int
    live_slots: int
    page_bytes: int
    max_key_len: int
    max_value_len: int
    fragmentation: float
    classes: list[ClassStats]
    slots: list[SlotStats]

    @property
    def hit_ratio(self) -> float:
        """Hits / (hits + misses) since the segment was created (0.0 before any read)."""
        h, m = self.counters["hits"], self.counters["misses"]
        return h / (h + m) if h + m else 0.0

    @property
    def evictions(self) -> int:
        """Entries removed to make room (capacity, entry count or rebalancing)."""
        c = self.counters
        return c["evicted_capacity"] + c["evicted_entries"] + c["evicted_rebalance"]

    @property
    def expirations(self) -> int:
        """Entries removed because their TTL passed."""
        return self.counters["evicted_expired_read"] + self.counters["evicted_expired_sweep"]


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One write-journal record: what happened to which key, at which version."""

    op: str
    key: bytes
    version: int
    expires_at: float | None
    #: Wall clock of the write (epoch microseconds): orders writes of several hosts.
    at_us: int = 0


class PinnedValue:
    """A zero-copy view of a cached value.

    The bytes stay valid, even if the entry is deleted or replaced meanwhile, until
    :meth:`release` (or the end of a ``with`` block).  Use ``.view`` (a read-only
    ``memoryview``) while pinned; it is released together with the pin.
    """

    __slots__ = ("_seg", "_pin", "_pid", "view", "info")

    def __init__(self, seg: Segment, pin: int, view: memoryview, info: ItemInfo) -> None:
        self._seg: Segment | None = seg
        self._pin = pin
        self._pid = os.getpid()
        self.view = view
        self.info = info

    def release(self) -> None:
        """Drop the pin; the memoryview becomes unusable.  Idempotent.

        In a forked child, an inherited ``PinnedValue`` only drops the child's view: the
        pin belongs to the parent, which releases it itself.
        """
        seg, self._seg = self._seg, None
        if seg is None:
            return
        self.view.release()
        if seg._h is not None and self._pid == os.getpid():
            rc = lib.shm_unpin(seg._h, self._pin)
            if rc < 0:
                _raise(rc)

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):   # never raise from a finalizer
            self.release()


def _hotcall_type() -> Any:
    """The C base type of the cached decorator (native/py/fastpath.c ``HotCall``),
    taken from a FastSeg made without an engine handle; a pure-Python stand-in that
    always takes the slow path if the extension cannot make one."""
    box: list[Any] = []
    if lib.shm_py_fastseg(ffi.NULL, ffi.cast("void *", id(_raise_code)),
                          ffi.cast("void *", id(box))) == 0:
        return box[0].hotcall_type()

    class PyHotCall:
        __class_getitem__ = classmethod(lambda cls, item: cls)

        def _hot_configure(self, slow: Any, *hot: Any) -> bool:
            self._hc_slow = slow
            return False

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self._hc_slow(self, None, *args, **kwargs)

    return PyHotCall


if TYPE_CHECKING:
    from typing import Generic, ParamSpec, TypeVar

    _P = ParamSpec("_P")
    _R = TypeVar("_R")


class Segment:
    """A handle on one shared-memory cache segment.

    Create or attach with :meth:`open`, :meth:`create` or :meth:`attach`.  A handle is
    thread-safe; a forked child may keep using its parent's handle (it gets its own
    process slot).  Keys are ``str`` (UTF-8) or bytes-like; values are bytes-like.
    """

    # The cached decorator's C base type (shmcache.cache.CachedFunction derives from it).
    if TYPE_CHECKING:
        class HotCall(Generic[_P, _R]):
            """Base of the cached decorator's function objects; calling one serves an
            object cache hit of a one-int/str-argument call without a Python frame."""

            def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R: ...

            def _hot_configure(self, slow: Any, l0_get: Any = None,
                               prefix: str | None = None,
                               objects: dict[Any, Any] | None = None,
                               hits: bytearray | None = None, short_limit: int = 0,
                               key_limit: int = 0) -> bool:
                """Set ``slow(self, key_or_None, *args, **kwargs)`` and the hot path (when
                ``l0_get`` is a segment's direct-call ``l0_get``); True if it is on."""
                ...
    else:
        HotCall = _hotcall_type()

    def __init__(self, handle: Any, name: str) -> None:
        self._h: Any = handle
        self.name = name
        self._tls = threading.local()
        # The hottest calls go straight to C (native/py/fastpath.c); these instance
        # attributes shadow the methods below, which document them and remain the
        # reference implementation.
        box: list[Any] = []
        if lib.shm_py_fastseg(handle, ffi.cast("void *", id(_raise_code)),
                              ffi.cast("void *", id(box))) == 0:
            self._fast: Any = box[0]
            f = self._fast
            vars(self).update(get=f.get, set=f.set, add=f.add, delete=f.delete,
                              contains=f.contains, hit_version=f.version,
                              get_info=f.get_info, l0_get=f.l0_get)
        else:
            self._fast = None

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, size: int = 64 << 20, *, max_key_len: int = 250,
               max_value_len: int = 0, max_entries: int = 0, policy: str = "s3fifo",
               stripes: int = 0, avg_item_bytes: int = 0, max_slots: int = 0,
               journal_bytes: int = 0, lock_timeout: float = 10.0,
               page_bytes: int = 0, verify_reads: bool = False) -> Segment:
        """Create a new segment; ``FileExistsError`` if the name is taken.

        ``size`` is the whole segment in bytes.  ``policy`` is ``"s3fifo"`` (default),
        ``"sieve"`` or ``"lru"``.  ``max_entries`` adds a bound by entry count.
        ``verify_reads`` checks each entry's checksum on every read and drops a damaged
        entry instead of serving it (off by default: it costs a hash of the value per
        read, and only this user's processes can write the segment; ``verify()`` and the
        repair after a crash always check).
        """
        cfg = _make_config(size, max_key_len, max_value_len, max_entries, policy, stripes,
                           avg_item_bytes, max_slots, journal_bytes, lock_timeout,
                           page_bytes)
        cfg.flags = lib.SHM_CFG_VERIFY_READS if verify_reads else 0
        pname = _posix_name(name)
        try:
            mem = posix_ipc.SharedMemory(pname, posix_ipc.O_CREX, mode=0o600)
        except posix_ipc.ExistentialError as e:
            raise FileExistsError(f"shared-memory segment {name!r} already exists") from e
        out = ffi.new("shm_cache **")
        try:
            rc = lib.shm_create(mem.fd, cfg, out)
        finally:
            mem.close_fd()
        if rc < 0:
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(pname)
            _raise(rc)
        return cls(out[0], name)

    @classmethod
    def attach(cls, name: str, *, wait: float = 5.0) -> Segment:
        """Attach an existing segment by name.

        Waits up to ``wait`` seconds for a concurrent creator to finish.  Raises
        :class:`SegmentNotFoundError`, :class:`ForeignSegmentError`,
        :class:`IncompatibleSegmentError`, :class:`SegmentCorruptError` or
        :class:`SegmentNotReadyError` instead of ever serving from a doubtful segment.
        """
        pname = _posix_name(name)
        try:
            mem = posix_ipc.SharedMemory(pname, 0)
        except posix_ipc.ExistentialError as e:
            raise errors.SegmentNotFoundError(
                f"no shared-memory segment named {name!r}") from e
        except posix_ipc.PermissionsError as e:
            raise errors.ForeignSegmentError(
                f"segment {name!r} exists but is not ours to open: {e}") from e
        out = ffi.new("shm_cache **")
        try:
            rc = lib.shm_attach(mem.fd, int(wait * 1000), out)
        finally:
            mem.close_fd()
        if rc < 0:
            _raise(rc)
        return cls(out[0], name)

    @classmethod
    def open(cls, name: str, size: int = 64 << 20, *, wait: float = 5.0,
             on_incompatible: str = "raise", **config: Any) -> Segment:
        """Create the segment, or attach it if another process created it first.

        Race-safe when many processes start at once: exactly one creates, the others
        wait for its "ready" flag.  ``on_incompatible="recreate"`` unlinks a segment of
        another layout, a corrupt one, one whose creator died before it was ready, or a
        non-segment object under this name, and creates a fresh one (a cold start)
        instead of raising -- but only if the object belongs to this user with
        owner-only permissions; anything else is refused, never removed.
        """
        if on_incompatible not in ("raise", "recreate"):
            raise ValueError("on_incompatible must be 'raise' or 'recreate'")
        for _ in range(50):
            try:
                return cls.create(name, size, **config)
            except FileExistsError:
                pass
            try:
                return cls.attach(name, wait=wait)
            except errors.SegmentNotFoundError:
                continue  # unlinked between our two calls: try to create again
            except (errors.IncompatibleSegmentError, errors.SegmentCorruptError,
                    errors.SegmentNotReadyError, errors.ForeignSegmentError):
                # Recreate only what is ours: same owner, owner-only mode.  An object
                # of another user, or one with wider permissions, is never unlinked.
                if on_incompatible != "recreate" or not _owned_by_us(name):
                    raise
                unlink_segment(name)
        raise errors.SegmentError(f"could not create or attach segment {name!r}")

    def close(self) -> None:
        """Release this process's slot and unmap the segment.  Idempotent.

        Outstanding :class:`PinnedValue` objects must be released first.
        """
        h, self._h = self._h, None
        if h is not None:
            if self._fast is not None:
                self._fast.detach()
            lib.shm_close(h)

    def unlink(self) -> None:
        """Remove the segment's name; processes still attached keep using it."""
        unlink_segment(self.name)

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._h is None else "open"
        return f"<Segment {self.name!r} {state}>"

    def _handle(self) -> Any:
        h = self._h
        if h is None:
            raise errors.SegmentClosedError(f"segment {self.name!r} is closed")
        return h

    def _buf(self, need: int = 0) -> Any:
        tls = self._tls
        b = getattr(tls, "buf", None)
        if b is None or len(b) < need:
            b = tls.buf = ffi.new("char[]", max(_INITIAL_BUF, need))
            tls.cap = len(b)
            tls.info = ffi.new("shm_item_info *")
        return b

    # -- reads -----------------------------------------------------------------------

    def get(self, key: str | bytes, default: Any = None) -> Any:
        """Return a copy of the value as ``bytes``, or ``default`` on a miss."""
        key = _key_bytes(key)
        tls = self._tls
        try:
            buf = tls.buf
            cap = tls.cap
        except AttributeError:
            buf = self._buf()
            cap = tls.cap
        n = lib.shm_get(self._h or self._handle(), key, len(key), buf, cap, ffi.NULL)
        if n >= 0:
            if n <= cap:
                return ffi.unpack(buf, n)
            return self._get_large(key, n)
        if n == -1:
            return default
        _raise(n)
        return None

    def _get_large(self, key: bytes, n: int) -> bytes | None:
        while True:
            buf = self._buf(n)
            cap = self._tls.cap
            n = lib.shm_get(self._handle(), key, len(key), buf, cap, ffi.NULL)
            if n == -1:
                return None
            if n < 0:
                _raise(n)
            if n <= cap:
                return ffi.unpack(buf, n)  # type: ignore[no-any-return]

    def get_with_info(self, key: str | bytes) -> tuple[bytes, ItemInfo] | None:
        """Return ``(value, ItemInfo)`` or ``None`` on a miss."""
        k = _key_bytes(key)
        self._buf()
        tls = self._tls
        while True:
            buf, cap, info = tls.buf, tls.cap, tls.info
            n = lib.shm_get(self._handle(), k, len(k), buf, cap, info)
            if n == -1:
                return None
            if n < 0:
                _raise(n)
            if n <= cap:
                return ffi.unpack(buf, n), _info(info)
            self._buf(n)

    def get_info(self, key: str | bytes) -> tuple[bytes, int, int] | None:
        """``(value, version, flags)`` read together, or ``None`` on a miss."""
        got = self.get_with_info(key)
        return None if got is None else (got[0], got[1].version, got[1].flags)

    def l0_get(self, objects: dict[Any, tuple[int, Any, Any]], key: str | bytes,
               default: Any, hits: bytearray | None = None) -> Any:
        """A per-process object cache hit in one call: ``objects[key]`` is
        ``(version, obj, meta)``; return ``obj`` if ``meta is None`` and the entry's
        version in the segment is still ``version`` (counted as a hit, and added to the
        native little-endian int64 in ``hits`` if given), else ``default``."""
        e = objects.get(key)
        if e is None or e[2] is not None:
            return default
        hv = self.hit_version(key)
        if hv is None or hv[0] != e[0]:
            return default
        if hits is not None:
            hits[:8] = (int.from_bytes(hits[:8], sys.byteorder) + 1).to_bytes(8, sys.byteorder)
        return e[1]

    def info(self, key: str | bytes) -> ItemInfo | None:
        """Metadata (version, expiry, length, flags) without copying the value."""
        k = _key_bytes(key)
        ci = ffi.new("shm_item_info *")
        rc = lib.shm_info(self._handle(), k, len(k), ci)
        if rc == -1:
            return None
        if rc < 0:
            _raise(rc)
        return _info(ci)

    def version(self, key: str | bytes) -> int | None:
        """The entry's version (bumped by every write), or ``None`` if absent."""
        i = self.info(key)
        return None if i is None else i.version

    def hit_version(self, key: str | bytes) -> tuple[int, int] | None:
        """``(version, flags)`` of the entry, counted as a hit (or a miss) like
        :meth:`get` but without copying the value: for callers that keep their own
        deserialized copy and only need to know it is still current.  ``None`` on a
        miss."""
        k = _key_bytes(key)
        ci = ffi.new("shm_item_info *")
        rc = lib.shm_hit_info(self._handle(), k, len(k), ci)
        if rc == -1:
            return None
        if rc < 0:
            _raise(rc)
        return int(ci.version), int(ci.flags)

    def pin(self, key: str | bytes) -> PinnedValue | None:
        """Zero-copy read: a :class:`PinnedValue` whose ``.view`` stays valid until
        released, or ``None`` on a miss.  Prefer ``with seg.pin(k) as mv: ...``."""
        k = _key_bytes(key)
        pp = ffi.new("const char **")
        ln = ffi.new("uint64_t *")
        ci = ffi.new("shm_item_info *")
        pid = ffi.new("uint32_t *")
        rc = lib.shm_pin(self._handle(), k, len(k), pp, ln, ci, pid)
        if rc == -1:
            return None
        if rc < 0:
            _raise(rc)
        view = memoryview(ffi.buffer(pp[0], ln[0])).toreadonly()
        return PinnedValue(self, pid[0], view, _info(ci))

    def contains(self, key: str | bytes) -> bool:
        """True if the key is present and not expired (does not count as a hit)."""
        k = _key_bytes(key)
        rc = lib.shm_contains(self._handle(), k, len(k))
        if rc < 0:
            _raise(rc)
        return bool(rc)

    def __contains__(self, key: object) -> bool:
        return self.contains(key)  # type: ignore[arg-type]

    def __len__(self) -> int:
        n = lib.shm_count(self._handle())
        if n < 0:
            _raise(n)
        return int(n)

    def keys(self, batch_bytes: int = 64 * 1024) -> Iterator[bytes]:
        """Iterate over the keys (expired ones skipped).  Weakly consistent: keys
        written or removed during the walk may or may not appear."""
        h = self._handle()
        cursor = ffi.new("uint64_t *", 0)
        buf = ffi.new("char[]", max(batch_bytes, 65536 + 2))
        while True:
            n = lib.shm_keys(h, cursor, buf, len(buf))
            if n < 0:
                _raise(n)
            raw = ffi.buffer(buf)
            pos = 0
            for _ in range(n):
                klen = int.from_bytes(raw[pos:pos + 2], "little")
                yield raw[pos + 2:pos + 2 + klen]
                pos += 2 + klen
            if cursor[0] == 0:
                return

    # -- writes ----------------------------------------------------------------------

    def set(self, key: str | bytes, value: bytes | bytearray | memoryview,
            ttl: float | None = None, *, flags: int = 0, expect_version: int = 0,
            journal: bool = True) -> int:
        """Store ``value`` under ``key`` (``ttl`` seconds, ``None`` = no expiry) and
        return the new version.  ``expect_version`` turns it into compare-and-set.
        ``journal=False`` leaves no write-journal record (a value that came from the
        lower tiers must not be written back to them)."""
        mode = lib.SHM_SET if journal else lib.SHM_SET | lib.SHM_NOJOURNAL
        return self._write(key, value, ttl, flags, mode, expect_version)

    def add(self, key: str | bytes, value: bytes | bytearray | memoryview,
            ttl: float | None = None, *, flags: int = 0, journal: bool = True) -> int | None:
        """Store only if absent: the new version, or ``None`` if the key exists."""
        mode = lib.SHM_ADD if journal else lib.SHM_ADD | lib.SHM_NOJOURNAL
        try:
            return self._write(key, value, ttl, flags, mode, 0)
        except errors.KeyExistsError:
            return None

    def replace(self, key: str | bytes, value: bytes | bytearray | memoryview,
                ttl: float | None = None, *, flags: int = 0) -> int | None:
        """Store only if present: the new version, or ``None`` if the key is absent."""
        try:
            return self._write(key, value, ttl, flags, lib.SHM_REPLACE, 0)
        except KeyError:
            return None

    def set_at(self, key: str | bytes, value: bytes | bytearray | memoryview,
               expires_at: float | None, *, flags: int = 0, expect_version: int = 0,
               add: bool = False, journal: bool = True) -> int | None:
        """:meth:`set` (or :meth:`add`, returning ``None`` if the key exists) with an
        absolute expiry (epoch seconds; ``None``: none), so that a rewrite keeps the
        entry's expiry to the millisecond."""
        k = _key_bytes(key)
        v = value if value.__class__ is bytes else _value_bytes(value)
        if not 0 <= flags <= 0xFFFF:
            raise ValueError("flags must fit in 16 bits")
        mode = (lib.SHM_ADD if add else lib.SHM_SET) | (0 if journal else lib.SHM_NOJOURNAL)
        ver = ffi.new("uint64_t *")
        at_ms = 0 if expires_at is None else max(1, round(expires_at * 1000))
        rc = lib.shm_set_at(self._handle(), k, len(k), v, len(v), at_ms, flags, mode,
                            expect_version, ver)
        if rc < 0:
            if rc == -1:
                raise KeyError(key)
            if add and rc == lib.SHM_EEXISTS:
                return None
            _raise(rc)
        return int(ver[0])

    def _write(self, key: str | bytes, value: Any, ttl: float | None, flags: int, mode: int,
               expect: int) -> int:
        k = _key_bytes(key)
        v = value if value.__class__ is bytes else _value_bytes(value)
        if not 0 <= flags <= 0xFFFF:
            raise ValueError("flags must fit in 16 bits")
        ver = ffi.new("uint64_t *")
        rc = lib.shm_set(self._h or self._handle(), k, len(k), v, len(v),
                         _ttl_ms(ttl) if ttl is not None else 0, flags, mode, expect, ver)
        if rc < 0:
            if rc == -1:
                raise KeyError(key)
            _raise(rc)
        return int(ver[0])

    def delete(self, key: str | bytes, *, expect_version: int = 0,
               journal: bool = True) -> bool:
        """Remove the key; True if it was present.  ``journal=False``: no journal
        record (another host's invalidation, already known to the lower tiers)."""
        k = _key_bytes(key)
        rc = lib.shm_delete_ex(self._handle(), k, len(k), expect_version,
                               0 if journal else lib.SHM_NOJOURNAL)
        if rc == -1:
            return False
        if rc < 0:
            _raise(rc)
        return True

    def touch(self, key: str | bytes, ttl: float | None) -> bool:
        """Give the key a new TTL (``None``: no expiry); False if absent."""
        k = _key_bytes(key)
        rc = lib.shm_touch(self._handle(), k, len(k), _ttl_ms(ttl))
        if rc == -1:
            return False
        if rc < 0:
            _raise(rc)
        return True

    def incr(self, key: str | bytes, delta: int = 1, *, initial: int | None = None,
             ttl: float | None = None) -> int:
        """Add ``delta`` to a decimal integer value and return the result.

        A missing key raises ``KeyError`` unless ``initial`` is given, in which case it
        is created as ``initial + delta``.  Values are ASCII decimal, so ``get`` returns
        e.g. ``b"42"``.
        """
        k = _key_bytes(key)
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise TypeError("delta must be an int")
        if not -(1 << 63) <= delta < (1 << 63):
            raise errors.CounterOverflowError("delta does not fit in a signed 64-bit int")
        res = ffi.new("int64_t *")
        rc = lib.shm_incr(self._handle(), k, len(k), delta, initial is not None,
                          initial or 0, _ttl_ms(ttl), res)
        if rc == -1:
            raise KeyError(key)
        if rc < 0:
            _raise(rc)
        return int(res[0])

    def decr(self, key: str | bytes, delta: int = 1, *, initial: int | None = None,
             ttl: float | None = None) -> int:
        """``incr`` with ``-delta``."""
        return self.incr(key, -delta, initial=initial, ttl=ttl)

    def clear(self, *, journal: bool = True) -> None:
        """Remove every entry (pinned values stay readable until released).
        ``journal=False``: no journal record (another host's clear)."""
        rc = lib.shm_clear_ex(self._handle(), 0 if journal else lib.SHM_NOJOURNAL)
        if rc < 0:
            _raise(rc)

    # -- maintenance -----------------------------------------------------------------

    def sweep_expired(self, max_items: int = 0) -> int:
        """Remove expired entries (at most ``max_items``, 0 = all); return the count."""
        n = lib.shm_sweep_expired(self._handle(), max_items)
        if n < 0:
            _raise(n)
        return int(n)

    def reap(self) -> int:
        """Reclaim the slots, pins and in-flight memory of dead processes and finish
        any pending repair; return the number of slots reaped."""
        n = lib.shm_reap(self._handle())
        if n < 0:
            _raise(n)
        return int(n)

    def verify(self) -> list[str]:
        """Walk the whole segment; return one line per broken invariant ([] = sound)."""
        cap = 1 << 16
        buf = ffi.new("char[]", cap)
        n = lib.shm_verify(self._handle(), buf, cap)
        if n < 0:
            _raise(n)
        if n == 0:
            return []
        lines = ffi.string(buf).decode("utf-8", "replace").splitlines()
        return lines or [f"{n} problems"]

    def set_clock(self, now: float | None) -> None:
        """Test hook: freeze this handle's clock at ``now`` (epoch seconds); ``None``
        returns to real time.  Only this process's view of time changes."""
        lib.shm_set_clock(self._handle(), 0 if now is None else int(now * 1000))

    def now(self) -> float:
        """The clock this handle uses for TTLs (epoch seconds)."""
        return float(lib.shm_now_ms(self._handle())) / 1000.0

    def journal_note_delete(self, key: str | bytes) -> None:
        """Journal a delete of a key this segment does not hold, so that the sidecar
        still removes it from the lower tiers and from other hosts' segments."""
        k = _key_bytes(key)
        rc = lib.shm_journal_note(self._handle(), lib.SHM_JOP_DELETE, k, len(k))
        if rc < 0:
            _raise(rc)

    def journal_drain(self, max_bytes: int = 1 << 20) -> list[JournalRecord]:
        """Remove and return the oldest write-journal records (for the sidecar)."""
        buf = ffi.new("char[]", max_bytes)
        n = lib.shm_journal_drain(self._handle(), buf, max_bytes)
        if n < 0:
            _raise(n)
        out: list[JournalRecord] = []
        pos = 0
        hdr = ffi.sizeof("shm_journal_record")
        while pos < n:
            rec = ffi.cast("shm_journal_record *", buf + pos)
            klen = rec.key_len
            key = ffi.unpack(buf + pos + hdr, klen)
            exp = rec.expires_at_ms
            out.append(JournalRecord(_JOPS.get(rec.op, str(rec.op)), key, rec.version,
                                     exp / 1000.0 if exp else None, rec.at_us))
            pos += (hdr + klen + 7) & ~7
        return out

    # -- statistics ------------------------------------------------------------------

    def stats(self) -> SegmentStats:
        """Counters, memory by size class and per attached process."""
        h = self._handle()
        s = ffi.new("shm_stats *")
        rc = lib.shm_stats_get(h, s)
        if rc < 0:
            _raise(rc)
        classes = []
        cs = ffi.new("shm_class_stats *")
        for i in range(s.nclasses):
            if lib.shm_class_stats_get(h, i, cs) == 0:
                classes.append(ClassStats(**_struct_dict(cs, ClassStats)))
        slots = []
        ss = ffi.new("shm_slot_stats *")
        for i in range(s.max_slots):
            if lib.shm_slot_stats_get(h, i, ss) == 0 and ss.state != 0:
                slots.append(SlotStats(i, ss.pid, ("free", "live", "dead")[min(ss.state, 2)],
                                       ss.generation, ss.attached_at_ms / 1000.0, ss.pins,
                                       _counters(ss.counters)))
        return SegmentStats(
            counters=_counters(s.total), size_bytes=s.size_bytes, data_bytes=s.data_bytes,
            index_buckets=s.index_buckets, entries=s.entries, max_entries=s.max_entries,
            used_bytes=s.used_bytes, free_bytes=s.free_bytes, payload_bytes=s.payload_bytes,
            pages_total=s.pages_total, pages_free=s.pages_free,
            journal_bytes=s.journal_bytes, journal_used=s.journal_used,
            journal_records=s.journal_records, journal_dropped=s.journal_dropped,
            generation=s.generation, policy=_POLICY_NAMES.get(s.policy, str(s.policy)),
            nstripes=s.nstripes, max_slots=s.max_slots, live_slots=s.live_slots,
            page_bytes=s.page_bytes, max_key_len=s.max_key_len,
            max_value_len=s.max_value_len, fragmentation=s.fragmentation,
            classes=classes, slots=slots)

    @property
    def slot(self) -> int:
        """This process's slot number in the segment."""
        return int(lib.shm_my_slot(self._handle()))

    def config(self) -> dict[str, int | str | bool]:
        """The configuration the segment was created with (defaults applied)."""
        c = ffi.new("shm_config *")
        rc = lib.shm_get_config(self._handle(), c)
        if rc < 0:
            _raise(rc)
        return {"size": c.size_bytes, "max_value_len": c.max_value_len,
                "max_entries": c.max_entries, "journal_bytes": c.journal_bytes,
                "max_key_len": c.max_key_len,
                "policy": _POLICY_NAMES.get(c.policy, str(c.policy)),
                "stripes": c.nstripes, "avg_item_bytes": c.avg_item_bytes,
                "max_slots": c.max_slots, "lock_timeout_ms": c.lock_timeout_ms,
                "page_bytes": c.page_bytes,
                "verify_reads": bool(c.flags & lib.SHM_CFG_VERIFY_READS)}


def _make_config(size: int, max_key_len: int, max_value_len: int, max_entries: int,
                 policy: str, stripes: int, avg_item_bytes: int, max_slots: int,
                 journal_bytes: int, lock_timeout: float, page_bytes: int) -> Any:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
    for nm, v in (("size", size), ("max_key_len", max_key_len),
                  ("max_value_len", max_value_len), ("max_entries", max_entries),
                  ("stripes", stripes), ("avg_item_bytes", avg_item_bytes),
                  ("max_slots", max_slots), ("journal_bytes", journal_bytes),
                  ("page_bytes", page_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{nm} must be a non-negative int, got {v!r}")
    if lock_timeout <= 0:
        raise ValueError("lock_timeout must be > 0 seconds")
    cfg = ffi.new("shm_config *")
    cfg.size_bytes = size
    cfg.max_value_len = max_value_len
    cfg.max_entries = max_entries
    cfg.journal_bytes = journal_bytes
    cfg.max_key_len = max_key_len
    cfg.policy = POLICIES[policy]
    cfg.nstripes = stripes
    cfg.avg_item_bytes = avg_item_bytes
    cfg.max_slots = max_slots
    cfg.lock_timeout_ms = max(1, int(lock_timeout * 1000))
    cfg.page_bytes = page_bytes
    return cfg


def _owned_by_us(name: str) -> bool:
    try:
        st = os.stat("/dev/shm/" + _posix_name(name).lstrip("/"))
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o077


def unlink_segment(name: str) -> bool:
    """Remove a segment's name (attached processes keep their mapping).  True if it
    existed."""
    try:
        posix_ipc.unlink_shared_memory(_posix_name(name))
        return True
    except posix_ipc.ExistentialError:
        return False


def segment_exists(name: str) -> bool:
    """True if a POSIX shared-memory object of that name exists on this host."""
    return os.path.exists("/dev/shm/" + _posix_name(name).lstrip("/"))
