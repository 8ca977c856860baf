"""Flask-Caching backend: ``flask_caching.Cache`` on one shmcache segment per host.

Every worker process of the server attaches the same segment, so ``@cache.cached`` and
``@cache.memoize`` results computed by one worker are hits in all of them::

    from flask_caching import Cache

    cache = Cache(app, config={
        "CACHE_TYPE": "shmcache.contrib.flask.ShmCache",
        "CACHE_SHMCACHE_NAME": "myapp-cache",            # the segment name (POSIX shm)
        "CACHE_DEFAULT_TIMEOUT": 300,
        "CACHE_KEY_PREFIX": "myapp:",                    # default "flask_cache_"
        "CACHE_OPTIONS": {"c_memory_size_mb": 256},      # any CacheConfig field
    })

Semantics are Flask-Caching's (``cachelib.BaseCache``): ``timeout=None`` means
``default_timeout``, **0 means never expire**, a negative timeout means already expired
(``set`` then deletes the key and returns True, ``add`` stores nothing); timeouts are
whole seconds or ``timedelta`` (floats are rounded up, with cachelib's deprecation
warning).  ``get`` returns ``None`` on a miss (use ``has`` to tell a cached ``None``
apart), ``set``/``add`` return False when the segment cannot hold the value (pickling
errors raise), ``inc``/``dec`` are atomic across processes, keep the entry's expiry and
create a missing key as ``delta`` with the default timeout.  ``clear()`` removes the
keys under this backend's ``CACHE_KEY_PREFIX`` (every process sees it), or the whole
segment when the prefix is empty.

The per-process object cache (``object_cache``) is off unless ``CACHE_OPTIONS`` turns
it on: callers may mutate what ``get`` returns, so each ``get`` unpickles a fresh copy,
as Flask-Caching's other backends do.  A process keeps one ``shmcache.Cache`` per
configuration, shared by every app and backend object that uses it.

Example (outside an app; Flask-Caching calls ``factory`` for you)::

    >>> backend = ShmCache("doc-flask", default_timeout=60, key_prefix="demo:",
    ...                    c_memory_size_mb=8)
    >>> backend.set("answer", 41), backend.inc("answer"), backend.get("answer")
    (True, 42, 42)
    >>> backend.add("answer", 0), backend.get("missing"), backend.has("answer")
    (False, None, True)
    >>> backend.shmcache.unlink()
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import pickle
from collections.abc import Mapping
from typing import Any, cast

from flask_caching.backends.base import BaseCache

from ..cache import MISSING, Cache
from ..config import CacheConfig
from ..errors import (
    ShmCacheError,
)
from ..keys import shorten
from ..serializers import get_serializer
from ._common import CONFIG_FIELDS, STORE_ERRORS, digest, shared_cache, update_entry

__all__ = ["ShmCache"]

_log = logging.getLogger("shmcache.contrib.flask")


class ShmCache(BaseCache):
    """The Flask-Caching (cachelib) cache API on a shmcache segment shared by every
    process of the host.

    ``name`` is the segment (``None``: :func:`shmcache.default_segment_name`),
    ``key_prefix`` is put before every key, and the other keyword arguments are
    :class:`shmcache.CacheConfig` fields (``c_memory_size_mb``, ``policy``,
    ``serializer``, ``compression``, ``object_cache``, ...).  ``shmcache=`` uses an
    existing :class:`shmcache.Cache` instead of the per-process shared one.

    >>> backend = ShmCache("doc-flask-direct", default_timeout=0, c_memory_size_mb=8)
    >>> backend.set("k", None), backend.get("k"), backend.has("k")  # 0: never expires
    (True, None, True)
    >>> backend.set("k", 1, timeout=-1), backend.has("k")           # < 0: expired
    (True, False)
    >>> backend.shmcache.unlink()
    """

    def __init__(self, name: str | None = None, default_timeout: int = 300,
                 key_prefix: str | None = None, ignore_delete_many_errors: bool = False,
                 *, shmcache: Cache | None = None, **config: Any) -> None:
        super().__init__(default_timeout=default_timeout,
                         ignore_delete_many_errors=ignore_delete_many_errors)
        self.key_prefix = key_prefix or ""
        if shmcache is None:
            unknown = set(config) - CONFIG_FIELDS
            if unknown:
                raise TypeError(
                    f"shmcache: unknown option(s) {', '.join(sorted(unknown))}; "
                    f"CACHE_OPTIONS takes CacheConfig fields: "
                    f"{', '.join(sorted(CONFIG_FIELDS - {'name', 'default_ttl'}))}")
            if "default_ttl" in config:
                raise TypeError("shmcache: set CACHE_DEFAULT_TIMEOUT, not default_ttl")
            config.setdefault("object_cache", False)
            shmcache = shared_cache(CacheConfig(name=name, **config))
        elif config:
            raise TypeError("shmcache: pass configuration or shmcache=, not both")
        self._cache = shmcache
        self._ser = get_serializer(shmcache.config.serializer)
        self._max_key_len = shmcache.max_key_len

    @classmethod
    def factory(cls, app: Any, config: dict[str, Any], args: list[Any],
                kwargs: dict[str, Any]) -> ShmCache:
        """Flask-Caching's constructor hook: ``CACHE_SHMCACHE_NAME`` names the segment,
        ``CACHE_KEY_PREFIX`` prefixes keys, ``CACHE_OPTIONS`` (already merged into
        ``kwargs``) holds CacheConfig fields."""
        kwargs = dict(kwargs)
        kwargs.setdefault("name", config.get("CACHE_SHMCACHE_NAME"))
        kwargs.setdefault("key_prefix", config.get("CACHE_KEY_PREFIX"))
        return cls(*args, **kwargs)

    @property
    def shmcache(self) -> Cache:
        """The :class:`shmcache.Cache` under this backend: statistics, tags, unlink."""
        return self._cache

    # -- keys and timeouts -----------------------------------------------------------

    def _key(self, key: str) -> str:
        # Shortened here exactly as Cache shortens it (shorten is idempotent), so inc's
        # compare-and-set, which talks to the segment, uses the same key.  A shortened
        # key keeps its first ~200 bytes, so it still starts with the prefix for clear().
        k: str = shorten(self.key_prefix + key, self._max_key_len)
        return k

    def _ttl(self, timeout: int | dt.timedelta | None) -> float | None:
        """Seconds to live, ``None`` for no expiry; negative means already expired."""
        t = self._normalize_timeout(timeout)
        return None if t == 0 else float(t)

    # -- the cachelib API ------------------------------------------------------------

    def get(self, key: str) -> Any:
        """The cached value, or ``None`` on a miss."""
        return self._cache.get(self._key(key))

    def has(self, key: str) -> bool:
        """True if the key is present and not expired (without unpickling it)."""
        return self._cache.contains(self._key(key))

    def set(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        """Store ``value``; False if the segment cannot hold it."""
        k = self._key(key)
        ttl = self._ttl(timeout)
        try:
            if ttl is not None and ttl < 0:
                self._ser.dumps(value)  # an unpicklable value raises whatever the timeout
                self._cache.delete(k)
                return True
            self._cache.set(k, value, ttl)
        except STORE_ERRORS as e:
            # Never serve the value this write meant to replace.
            with contextlib.suppress(ShmCacheError):
                self._cache.delete(k)
            _log.warning("shmcache: could not store the entry with key digest %s (%s); "
                         "the key is now absent", digest(k), type(e).__name__)
            return False
        except TypeError as e:
            # shmcache's serializer reports an unpicklable value as a TypeError raised
            # from pickle's error; cachelib promises "a subclass of pickle.PickleError".
            if isinstance(e.__cause__, pickle.PickleError):
                raise e.__cause__ from None
            raise
        return True

    def add(self, key: str, value: Any, timeout: int | dt.timedelta | None = None) -> bool:
        """Store only if the key is absent; True if stored."""
        k = self._key(key)
        ttl = self._ttl(timeout)
        try:
            if ttl is not None and ttl < 0:
                self._ser.dumps(value)
                return not self._cache.contains(k)  # "stored", and expired at once
            return self._cache.add(k, value, ttl)
        except STORE_ERRORS as e:
            _log.warning("shmcache: could not add the entry with key digest %s (%s)",
                         digest(k), type(e).__name__)
            return False
        except TypeError as e:
            if isinstance(e.__cause__, pickle.PickleError):
                raise e.__cause__ from None  # see set()
            raise

    def delete(self, key: str) -> bool:
        """Remove the key in every process; True if it was present."""
        return self._cache.delete(self._key(key))

    def get_many(self, *keys: str) -> list[Any]:
        """The values of ``keys`` in order, ``None`` for each miss."""
        get = self._cache.get
        return [get(self._key(k)) for k in keys]

    def set_many(self, mapping: Mapping[str, Any],
                 timeout: int | dt.timedelta | None = None) -> list[Any]:
        """Store every pair; return the keys that were stored."""
        return [k for k, v in mapping.items() if self.set(k, v, timeout)]

    def clear(self) -> bool:
        """Remove this prefix's keys in every process (the whole segment if the prefix
        is empty).  Keys written while it runs may survive."""
        if not self.key_prefix:
            self._cache.clear()
            return True
        prefix = self.key_prefix.encode()
        # Collected first: the engine's key walk is weakly consistent under deletion.
        doomed = [k for k in self._cache.segment.keys()  # noqa: SIM118 - not a dict
                  if k.startswith(prefix)]
        for k in doomed:
            self._cache.delete(k)
        return True

    def inc(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` atomically across processes, keeping the entry's expiry; a
        missing key is created as ``delta`` (default timeout).  ``None`` if the segment
        cannot store it."""
        k = self._key(key)
        ttl = self._ttl(None)
        while True:
            try:
                new = update_entry(self._cache, self._ser, k, lambda v: (v or 0) + delta)
                if new is not MISSING:
                    return cast("int", new)
                if ttl is not None and ttl < 0:
                    return delta  # created and expired at once, like set()
                if self._cache.add(k, delta, ttl):
                    return delta
            except STORE_ERRORS as e:
                _log.warning("shmcache: could not update the entry with key digest %s "
                             "(%s)", digest(k), type(e).__name__)
                return None
            # Another process created it between the two steps: increment theirs.

    def dec(self, key: str, delta: int = 1) -> int | None:
        """``inc`` with ``-delta``."""
        return self.inc(key, -delta)
