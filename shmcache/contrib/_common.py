"""What the framework backends share: one Cache per configuration per process, and
an atomic read-modify-write that keeps an entry's expiry (``incr``/``decr``).

Django makes a backend object per thread, per asyncio context and per alias; a Flask
test suite or app factory makes many: they must not each attach the segment again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Final

from .. import stampede
from ..cache import MISSING, Cache
from ..config import CacheConfig
from ..errors import ShmCacheError, VersionMismatchError
from ..segment import Segment
from ..serializers import Serializer

__all__ = ["shared_cache", "digest", "update_entry", "STORE_ERRORS", "CONFIG_FIELDS"]

#: What a write may fail with for lack of room or a lock (the same set the decorator
#: degrades on): the backends degrade too (Django: drop the key and log; Flask-Caching:
#: return False); a pickling error is the caller's bug and raises.
STORE_ERRORS: Final = stampede.STORE_ERRORS
#: The CacheConfig fields a backend's options may set.
CONFIG_FIELDS: Final = frozenset(f.name for f in fields(CacheConfig))

# A list compared with ==: a CacheConfig may hold unhashable fields (mappings).
_shared: list[tuple[CacheConfig, Cache]] = []
_shared_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    # A thread of the parent may have held the lock at fork(); the Caches themselves
    # stay usable in the child (a forked process gets its own segment slot).
    global _shared_lock
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_after_fork)


def shared_cache(cfg: CacheConfig) -> Cache:
    """The process's :class:`Cache` for ``cfg`` (opened on first use)."""
    with _shared_lock:
        for known, cache in _shared:
            if known == cfg:
                return cache
        cache = Cache(cfg)
        _shared.append((cfg, cache))
        return cache


def digest(key: str | bytes) -> str:
    """A short digest naming a key in logs: keys can be secrets (session keys, tokens)."""
    raw = key.encode() if isinstance(key, str) else key
    return hashlib.blake2b(raw, digest_size=6).hexdigest()


def update_entry(cache: Cache, ser: Serializer, key: str,
                  fn: Callable[[Any], Any]) -> Any:
    """Replace the value of ``key`` by ``fn(value)`` atomically across processes and
    keep its expiry; return the new value, or ``MISSING`` if the key is absent.

    A compare-and-set loop: the value is read between two looks at the entry's version
    (versions are segment-global and only grow, so equal versions mean the value read
    is that version's) and written back with ``expect_version``; a write by any other
    process in between makes the write fail and the loop read again.  ``key`` is the
    segment key (already shortened, so ``Cache`` maps it to itself).
    """
    seg = cache.segment
    while True:
        before = seg.info(key)
        if before is None:
            return MISSING
        value = cache.get(key, MISSING)
        after = seg.info(key)
        if after is None or value is MISSING:
            return MISSING
        if after.version != before.version:
            continue
        new = fn(value)
        data = ser.dumps(new)
        if after.expires_at is None:
            try:
                seg.set(key, data, None, flags=ser.id, expect_version=after.version)
            except (VersionMismatchError, KeyError):
                continue  # written, deleted or evicted meanwhile: look again
            return new
        done = _write_keeping_expiry(seg, key, data, ser.id, after.version,
                                     round(after.expires_at * 1000))
        if done is None:
            continue
        return new if done else MISSING


def _write_keeping_expiry(seg: Segment, key: str, data: bytes, flags: int, version: int,
                          expires_ms: int) -> bool | None:
    """Write ``data`` over ``version`` so that the entry still expires at
    ``expires_ms``: True once written, False if it expired first, None if another
    write got there first.

    The engine takes a relative TTL and adds its own clock.  When that clock ticks
    between our reading it and the write, the expiry lands a millisecond late; then the
    write is repeated (a compare-and-set on the version it just made) until it lands
    exactly.  Otherwise a counter incremented all the time (a rate limit's window)
    would creep later and later.
    """
    first = True
    while True:
        now_ms = round(seg.now() * 1000)
        left_ms = expires_ms - now_ms
        if left_ms <= 0:
            if first:
                return False
            with contextlib.suppress(ShmCacheError):  # ours, and due by now
                seg.delete(key, expect_version=version)
            return True
        try:
            # +0.5 ms: the engine floors seconds * 1000, and the float may land below.
            version = seg.set(key, data, (left_ms + 0.5) / 1000, flags=flags,
                              expect_version=version)
        except (VersionMismatchError, KeyError):
            return None if first else True  # after ours, another write: it stands
        first = False
        if round(seg.now() * 1000) == now_ms:
            return True  # the engine read the same millisecond
        info = seg.info(key)
        if (info is None or info.version != version or info.expires_at is None
                or round(info.expires_at * 1000) == expires_ms):
            return True
