"""What the framework backends share: one Cache per configuration per process, and
an atomic read-modify-write that keeps an entry's expiry (``incr``/``decr``).

Django makes a backend object per thread, per asyncio context and per alias; a Flask
test suite or app factory makes many: they must not each attach the segment again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Final

from .. import stampede
from ..cache import MISSING, Cache
from ..config import CacheConfig
from ..errors import VersionMismatchError
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
        if after.expires_at is not None and after.expires_at <= seg.now():
            return MISSING  # due: the engine treats it as gone
        new = fn(value)
        try:  # the absolute expiry: a rewrite keeps it to the millisecond
            seg.set_at(key, ser.dumps(new), after.expires_at, flags=ser.id,
                       expect_version=after.version)
        except (VersionMismatchError, KeyError):
            continue  # written, deleted or evicted meanwhile: look again
        return new
