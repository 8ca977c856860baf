"""Django cache backend: ``django.core.cache`` on one shmcache segment per host.

Every worker process of the server attaches the segment named by ``LOCATION`` and reads
and writes the same entries, so a value cached by one worker is a hit in all of them::

    CACHES = {
        "default": {
            "BACKEND": "shmcache.contrib.django.ShmCache",
            "LOCATION": "myapp-cache",            # the segment name (POSIX shm)
            "TIMEOUT": 300,                       # Django's default timeout
            "OPTIONS": {"c_memory_size_mb": 256}, # any CacheConfig field
        }
    }

Semantics are Django's (``BaseCache``): ``TIMEOUT``/``timeout`` in seconds, ``None``
for no expiry, ``0`` or negative for "expire now" (``set`` then deletes the key, ``add``
stores nothing and says whether the key was absent, ``touch`` deletes it); keys built by
``make_and_validate_key`` from ``KEY_PREFIX``, ``VERSION`` and ``KEY_FUNCTION``, with
Django's ``CacheKeyWarning`` for keys memcached would refuse; any picklable value;
``incr``/``decr`` raise ``ValueError`` on a missing key and keep the entry's expiry;
``set_many`` returns the keys it could not store.  Extra rules, each a consequence of
one segment shared by every process and every alias:

- ``clear()`` empties the whole segment (every ``KEY_PREFIX``, every process), as
  Django's Redis and memcached backends flush their server.
- ``close()`` keeps the segment attached: Django calls it after every request, and the
  segment (and its per-process ``shmcache.Cache``) is shared by all threads and aliases
  of the process that name the same ``LOCATION`` and ``OPTIONS``.
- A value the segment cannot hold (larger than its largest item, or a segment full of
  pinned entries) is not an exception: like memcached, ``set`` drops the key's previous
  value, logs a warning (``shmcache.contrib.django``; never the key or the value) and
  returns; ``set_many`` lists such keys.  Pickling errors do raise.
- The per-process object cache (``object_cache``) is off unless ``OPTIONS`` turns it
  on: Django code mutates what ``get`` returns (sessions do), so every ``get`` must
  unpickle a fresh copy, as Django's other backends do.
- ``MAX_ENTRIES`` and ``CULL_FREQUENCY`` are accepted and ignored: the segment is bounded
  by bytes and evicts gradually (S3-FIFO by default).

The async methods (``aget``, ``aset``, ...) run the same code directly on the event
loop's thread instead of Django's ``sync_to_async`` default: every operation is a
memory operation that never waits on I/O, so a thread hop would only add latency.

Example (outside a Django project, ``settings.configure`` stands in for settings.py)::

    >>> from django.conf import settings
    >>> settings.configure(CACHES={"default": {
    ...     "BACKEND": "shmcache.contrib.django.ShmCache", "LOCATION": "doc-django",
    ...     "OPTIONS": {"c_memory_size_mb": 8}}})
    >>> from django.core.cache import cache
    >>> cache.set("greeting", {"text": "hi"}, timeout=60)
    >>> cache.get("greeting"), cache.get("missing", "default")
    ({'text': 'hi'}, 'default')
    >>> cache.set("hits", 1)
    >>> cache.incr("hits", 10)
    11
    >>> import shmcache; shmcache.unlink_segment("doc-django")
    True
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterable, Mapping
from typing import Any, Final

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.core.exceptions import ImproperlyConfigured

from ..cache import MISSING, Cache
from ..config import CacheConfig
from ..errors import (
    ShmCacheError,
)
from ..keys import shorten
from ..serializers import get_serializer
from ._common import CONFIG_FIELDS, STORE_ERRORS, digest, shared_cache, update_entry

__all__ = ["ShmCache"]

_log = logging.getLogger("shmcache.contrib.django")


#: BaseCache's own OPTIONS for its culling backends; the segment is bounded by bytes.
_IGNORED_OPTIONS: Final = frozenset({"MAX_ENTRIES", "CULL_FREQUENCY"})
#: CacheConfig fields that Django spells elsewhere in the CACHES entry.
_SPELLED_ELSEWHERE: Final = {"name": "LOCATION", "default_ttl": "TIMEOUT"}

def _config(location: str, options: Mapping[str, Any]) -> CacheConfig:
    """``CacheConfig`` from ``LOCATION`` and ``OPTIONS`` (field names, any case)."""
    kw: dict[str, Any] = {"object_cache": False}
    for opt, value in options.items():
        if opt.upper() in _IGNORED_OPTIONS:
            continue
        name = opt.lower()
        if name in _SPELLED_ELSEWHERE:
            raise ImproperlyConfigured(
                f"shmcache: OPTIONS[{opt!r}] is set by the cache's "
                f"{_SPELLED_ELSEWHERE[name]} entry instead")
        if name not in CONFIG_FIELDS:
            raise ImproperlyConfigured(
                f"shmcache: unknown OPTIONS key {opt!r}; OPTIONS takes CacheConfig "
                f"fields: {', '.join(sorted(CONFIG_FIELDS - set(_SPELLED_ELSEWHERE)))}")
        kw[name] = value
    try:
        return CacheConfig(name=location or None, **kw)
    except (TypeError, ValueError) as e:
        raise ImproperlyConfigured(f"shmcache: invalid OPTIONS: {e}") from e


class ShmCache(BaseCache):  # type: ignore[misc]  # django ships no type information
    """Django's cache API on a shmcache segment shared by every process of the host.

    Django instantiates it from ``CACHES``: ``ShmCache(LOCATION, params)``.  ``LOCATION``
    names the segment (empty: :func:`shmcache.default_segment_name`), ``OPTIONS`` holds
    :class:`shmcache.CacheConfig` fields (``c_memory_size_mb``, ``policy``,
    ``serializer``, ``compression``, ``object_cache``, ...).

    >>> backend = ShmCache("doc-django-direct", {"TIMEOUT": 60,
    ...                    "OPTIONS": {"c_memory_size_mb": 8}})
    >>> backend.set("k", None)
    >>> backend.get("k", "default") is None, backend.has_key("k")
    (True, True)
    >>> backend.set("k", 1, timeout=0)   # Django: timeout 0 expires (deletes) the key
    >>> backend.has_key("k")
    False
    >>> backend.shmcache.unlink()
    """

    def __init__(self, location: str, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._config = _config(location, params.get("OPTIONS") or {})
        self._cache = shared_cache(self._config)
        self._ser = get_serializer(self._config.serializer)
        self._max_key_len = self._cache.max_key_len

    @property
    def shmcache(self) -> Cache:
        """The :class:`shmcache.Cache` under this backend (shared by every backend of
        the process with the same configuration): statistics, invalidation by tag."""
        return self._cache

    # -- keys and timeouts -----------------------------------------------------------

    def _key(self, key: Any, version: int | None) -> str:
        # Shortened here exactly as Cache shortens it (shorten is idempotent), so the
        # compare-and-set of incr, which talks to the segment, uses the same key.
        k: str = shorten(self.make_and_validate_key(key, version=version), self._max_key_len)
        return k

    def _ttl(self, timeout: Any) -> float | None:
        """Seconds to live, ``None`` for no expiry; ``<= 0`` means expire now."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        return None if timeout is None else float(timeout)

    def _store(self, key: str, value: Any, ttl: float | None) -> bool:
        try:
            if ttl is not None and ttl <= 0:
                self._ser.dumps(value)  # an unpicklable value raises whatever the timeout
                self._cache.delete(key)
                return True
            self._cache.set(key, value, ttl)
        except STORE_ERRORS as e:
            self._failed_store(key, e)
            return False
        except TypeError as e:
            if isinstance(e.__cause__, pickle.PickleError):
                raise e.__cause__ from None  # see add()
            raise
        return True

    def _failed_store(self, key: str, exc: Exception) -> None:
        # Never serve the value this write meant to replace (what memcached does too).
        with contextlib.suppress(ShmCacheError):
            self._cache.delete(key)
        _log.warning("shmcache: could not store the entry with key digest %s (%s); the "
                     "key is now absent", digest(key), type(exc).__name__)

    # -- the sync API ----------------------------------------------------------------

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> bool:
        """Store only if the key is absent (or expired); True if stored."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)
        try:
            if ttl is not None and ttl <= 0:
                self._ser.dumps(value)
                return not self._cache.contains(k)  # "stored", and expired at once
            return self._cache.add(k, value, ttl)
        except STORE_ERRORS as e:
            _log.warning("shmcache: could not add the entry with key digest %s (%s)",
                         digest(k), type(e).__name__)
            return False
        except TypeError as e:
            # shmcache's serializer reports an unpicklable value as a TypeError raised
            # from pickle's error; Django code catches pickle.PickleError (as locmem,
            # Redis and memcached raise it), so that is what it gets.
            if isinstance(e.__cause__, pickle.PickleError):
                raise e.__cause__ from None
            raise

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """The cached value (a cached ``None`` included), or ``default`` on a miss."""
        v = self._cache.get(self._key(key, version), MISSING)
        return default if v is MISSING else v

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
            version: int | None = None) -> None:
        """Store ``value``; ``timeout`` 0 or negative deletes the key instead."""
        self._store(self._key(key, version), value, self._ttl(timeout))

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT,
              version: int | None = None) -> bool:
        """Give the key a new expiry; False if it is absent."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)
        if ttl is not None and ttl <= 0:
            return self._cache.delete(k)
        return self._cache.touch(k, ttl)

    def delete(self, key: Any, version: int | None = None) -> bool:
        """Remove the key in every process; True if it was present."""
        return self._cache.delete(self._key(key, version))

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """``{key: value}`` for the keys present."""
        out: dict[Any, Any] = {}
        get = self._cache.get
        for key in keys:
            v = get(self._key(key, version), MISSING)
            if v is not MISSING:
                out[key] = v
        return out

    def has_key(self, key: Any, version: int | None = None) -> bool:
        """True if the key is present and not expired (without unpickling it)."""
        return self._cache.contains(self._key(key, version))

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Add ``delta`` atomically across processes, keeping the entry's expiry;
        ``ValueError`` if the key is absent, ``TypeError`` if its value is not a number.
        """
        k = self._key(key, version)
        new = update_entry(self._cache, self._ser, k, lambda v: v + delta)
        if new is MISSING:
            raise ValueError(f"Key '{key}' not found")
        return new

    def set_many(self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT,
                 version: int | None = None) -> list[Any]:
        """Store every pair; return the keys that could not be stored (no room)."""
        ttl = self._ttl(timeout)
        return [key for key, value in data.items()
                if not self._store(self._key(key, version), value, ttl)]

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """Remove every key."""
        for key in keys:
            self._cache.delete(self._key(key, version))

    def clear(self) -> None:
        """Empty the whole segment: every key prefix, version and process."""
        self._cache.clear()

    def close(self, **kwargs: Any) -> None:
        """Nothing to do: the segment stays attached for the next request (Django calls
        this at the end of every request)."""

    # -- async: the same code, on the loop's thread (see the module docstring) ---------

    async def aadd(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
                   version: int | None = None) -> bool:
        return self.add(key, value, timeout, version)

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self.get(key, default, version)

    async def aset(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT,
                   version: int | None = None) -> None:
        self.set(key, value, timeout, version)

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT,
                     version: int | None = None) -> bool:
        return self.touch(key, timeout, version)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        return self.delete(key, version)

    async def aget_many(self, keys: Iterable[Any],
                        version: int | None = None) -> dict[Any, Any]:
        return self.get_many(keys, version)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return self.has_key(key, version)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return self.incr(key, delta, version)

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return self.decr(key, delta, version)

    async def aset_many(self, data: Mapping[Any, Any], timeout: Any = DEFAULT_TIMEOUT,
                        version: int | None = None) -> list[Any]:
        return self.set_many(data, timeout, version)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        self.delete_many(keys, version)

    async def aclear(self) -> None:
        self.clear()

    async def aclose(self, **kwargs: Any) -> None:
        self.close(**kwargs)
