"""Configuration of a :class:`~shmcache.cache.Cache`: levels, segment, serialization.

``CacheConfig`` is a plain frozen dataclass; ``CacheConfig.from_env()`` reads the same
fields from ``SHMCACHE_*`` environment variables, which is what ``Cache()`` without an
argument does.  Levels: ``C_MEMORY`` (the shared segment, always), ``REDIS`` (L2, a
server at ``redis_url`` or a cluster at ``redis_cluster_nodes``), ``DISTRIBUTED`` (L2 on
Redis Cluster plus cross-host invalidation of L1) and ``DISK`` (L3, diskcache).
Secrets (``secret``, ``redis_url``, ``redis_options``) never appear in ``repr()``.

Example::

    >>> cfg = CacheConfig(name="demo", c_memory_size_mb=16)
    >>> cfg.segment_name, cfg.size_bytes
    ('demo', 16777216)
    >>> CacheConfig.from_env({"SHMCACHE_NAME": "x", "SHMCACHE_SIZE_MB": "8"}).size_bytes
    8388608
"""

from __future__ import annotations

import enum
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final

from .errors import ShmCacheError

__all__ = ["CacheLevel", "CacheConfig", "TierNotAvailableError", "default_segment_name"]


class CacheLevel(enum.Enum):
    """A tier of the cache: ``C_MEMORY`` (L1, the shared segment), ``REDIS`` (L2),
    ``DISTRIBUTED`` (L2 on Redis Cluster + cross-host L1 invalidation), ``DISK`` (L3)."""

    C_MEMORY = "c_memory"
    REDIS = "redis"
    DISK = "disk"
    DISTRIBUTED = "distributed"


class TierNotAvailableError(ShmCacheError, ValueError):
    """A configured cache level cannot be used as configured (missing address, no
    secret for pickled values on a shared level, C_MEMORY left out, ...)."""


def default_segment_name(app: str | None = None) -> str:
    """``shmcache-<app>-<uid>``: one segment per application and user.

    ``app`` defaults to ``$SHMCACHE_APP``, else the basename of ``sys.argv[0]`` (the
    same in every worker of one server, and in processes it spawns).
    """
    app = app or os.environ.get("SHMCACHE_APP") or \
        os.path.splitext(os.path.basename(sys.argv[0] or ""))[0] or "python"
    app = re.sub(r"[^A-Za-z0-9_.-]", "_", app)[:64]
    return f"shmcache-{app}-{os.getuid()}"


_TRUE: Final = {"1", "true", "yes", "on"}
_FALSE: Final = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Everything a :class:`~shmcache.cache.Cache` needs.  Every field has a default.

    Segment: ``name`` (``None``: :func:`default_segment_name`), ``c_memory_size_mb``,
    ``policy``, ``max_key_len``, ``on_incompatible`` (``"recreate"``: a segment of an
    older layout is replaced by a fresh one -- it is a cache).

    Values: ``serializer`` (``"pickle"``, ``"msgpack"``, ``"json"``, ``"raw"`` or a
    :class:`~shmcache.serializers.Serializer`), ``compression`` (``True``: lz4 when
    installed, else zlib; or ``"lz4"``/``"zlib"``; ``False``: never) applied to
    payloads of at least ``compression_threshold`` bytes, ``default_ttl`` seconds
    (``None``: no expiry).

    L0: ``object_cache`` keeps deserialized objects per process and returns them while
    the entry's version in the segment is unchanged; ``object_cache_size`` bounds it.

    Stampede: ``lease_ttl`` (the lease a computing process holds, renewed never: a
    computation longer than this lets a second process start), ``wait_timeout`` (how
    long a waiter polls before computing itself), ``poll_min``/``poll_max`` (backoff).

    Lower levels (``levels``): ``redis_url`` (``redis://``/``rediss://`` URL: auth,
    TLS and database pass through to redis-py, as do ``redis_options``),
    ``redis_cluster_nodes`` (``"host:port"`` seeds), ``redis_prefix`` (of every key and
    of the invalidation channel), ``redis_timeout`` (seconds per operation; a slower
    Redis is treated as down), ``disk_path`` (default
    ``$XDG_CACHE_HOME/shmcache/<segment name>``, made 0700) and ``disk_size_mb``.
    ``write_mode``: ``"behind"`` (default: the sidecar writes L2/L3 from the segment's
    journal of ``journal_mb`` MiB) or ``"through"`` (the writing process does, at once).
    ``sidecar``: ``"auto"`` starts one in a background thread of this process when it
    is needed (a second one on the host stands by); ``"off"`` leaves it to the gunicorn
    hook or ``shmcache sidecar``.

    Security: values on Redis and disk are HMAC-signed with ``secret`` (or, for a
    disk-only cache without one, a random key kept in the disk directory);
    ``encrypt=True`` adds AES-GCM.  Pickled values are never written to Redis without
    a secret; ``allow_unsigned=True`` allows unsigned JSON/msgpack/raw values there.
    """

    name: str | None = None
    c_memory_size_mb: int = 64
    levels: Sequence[CacheLevel] = (CacheLevel.C_MEMORY,)
    policy: str = "s3fifo"
    max_key_len: int = 250
    on_incompatible: str = "recreate"
    serializer: Any = "pickle"
    compression: bool | str = True
    compression_threshold: int = 4096
    default_ttl: float | None = None
    object_cache: bool = True
    object_cache_size: int = 10_000
    lease_ttl: float = 30.0
    wait_timeout: float = 10.0
    poll_min: float = 0.0005
    poll_max: float = 0.05
    stats_window: float = 60.0
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster_nodes: Sequence[str] = field(default_factory=tuple)
    redis_options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    redis_prefix: str = "shmcache:"
    redis_timeout: float = 0.5
    disk_path: str | None = None
    disk_size_mb: int = 1024
    write_mode: str = "behind"
    journal_mb: float = 4.0
    sidecar: str = "auto"
    secret: str | None = field(default=None, repr=False)
    encrypt: bool = False
    allow_unsigned: bool = False

    def __post_init__(self) -> None:
        levels = tuple(CacheLevel(lv) if not isinstance(lv, CacheLevel) else lv
                       for lv in self.levels)
        object.__setattr__(self, "levels", levels)
        if self.c_memory_size_mb <= 0:
            raise ValueError("c_memory_size_mb must be > 0")
        if self.compression_threshold < 0:
            raise ValueError("compression_threshold must be >= 0")
        if self.default_ttl is not None and self.default_ttl <= 0:
            raise ValueError("default_ttl must be > 0 seconds or None")
        if self.lease_ttl <= 0 or self.wait_timeout < 0:
            raise ValueError("lease_ttl must be > 0 and wait_timeout >= 0")
        if not 0 < self.poll_min <= self.poll_max:
            raise ValueError("need 0 < poll_min <= poll_max")
        if self.on_incompatible not in ("raise", "recreate"):
            raise ValueError("on_incompatible must be 'raise' or 'recreate'")
        if self.write_mode not in ("behind", "through"):
            raise ValueError("write_mode must be 'behind' or 'through'")
        if self.sidecar not in ("auto", "off"):
            raise ValueError("sidecar must be 'auto' or 'off'")
        if self.redis_timeout <= 0 or self.disk_size_mb <= 0 or self.journal_mb <= 0:
            raise ValueError("redis_timeout, disk_size_mb and journal_mb must be > 0")
        object.__setattr__(self, "redis_cluster_nodes", tuple(self.redis_cluster_nodes))

    @property
    def segment_name(self) -> str:
        """The POSIX shared-memory name the cache attaches."""
        return self.name or default_segment_name()

    @property
    def size_bytes(self) -> int:
        """``c_memory_size_mb`` in bytes."""
        return self.c_memory_size_mb << 20

    @property
    def uses_redis(self) -> bool:
        """True if an L2 (``REDIS`` or ``DISTRIBUTED``) is configured."""
        return CacheLevel.REDIS in self.levels or CacheLevel.DISTRIBUTED in self.levels

    @property
    def uses_disk(self) -> bool:
        """True if the L3 (``DISK``) is configured."""
        return CacheLevel.DISK in self.levels

    @property
    def disk_dir(self) -> str:
        """Where the L3 lives: ``disk_path`` or a per-segment default."""
        if self.disk_path:
            return self.disk_path
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache")
        return os.path.join(base, "shmcache", self.segment_name)

    def check_levels(self) -> None:
        """Raise :class:`TierNotAvailableError` if the levels cannot work as configured."""
        if CacheLevel.C_MEMORY not in self.levels:
            raise TierNotAvailableError("levels must include CacheLevel.C_MEMORY (L1)")
        if CacheLevel.DISTRIBUTED in self.levels and not self.redis_cluster_nodes:
            raise TierNotAvailableError(
                "CacheLevel.DISTRIBUTED needs redis_cluster_nodes (SHMCACHE_REDIS_CLUSTER_"
                "NODES=host:port,...)")
        if CacheLevel.REDIS in self.levels and not (self.redis_url or
                                                    self.redis_cluster_nodes):
            raise TierNotAvailableError(
                "CacheLevel.REDIS needs redis_url (SHMCACHE_REDIS_URL) or "
                "redis_cluster_nodes")
        if self.uses_redis and not self.secret:
            ser = self.serializer if isinstance(self.serializer, str) else \
                getattr(self.serializer, "name", "custom")
            if not self.allow_unsigned or ser not in ("json", "msgpack", "raw"):
                raise TierNotAvailableError(
                    "refusing to share values through Redis without a secret: values "
                    "read back from Redis are unpickled only after their HMAC verifies. "
                    "Set CacheConfig(secret=...) / SHMCACHE_SECRET (16+ bytes), or use "
                    "serializer='json'/'msgpack'/'raw' with allow_unsigned=True")
        from .tiers import parse_node
        for node in self.redis_cluster_nodes:
            try:
                parse_node(node)
            except ValueError as e:
                raise TierNotAvailableError(str(e)) from None
        if self.secret is not None and len(self.secret.encode()) < 16:
            raise TierNotAvailableError("secret must be at least 16 bytes")

    def with_(self, **changes: Any) -> CacheConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any,
                 ) -> CacheConfig:
        """Read ``SHMCACHE_<FIELD>`` variables (e.g. ``SHMCACHE_NAME``,
        ``SHMCACHE_SIZE_MB``, ``SHMCACHE_SERIALIZER``, ``SHMCACHE_COMPRESSION``,
        ``SHMCACHE_DEFAULT_TTL``, ``SHMCACHE_OBJECT_CACHE``, ``SHMCACHE_LEVELS`` as a
        comma list, ``SHMCACHE_REDIS_URL``); ``overrides`` win over the environment."""
        env = os.environ if environ is None else environ
        kw: dict[str, Any] = {}
        aliases = {"size_mb": "c_memory_size_mb"}
        types = {f.name: f.type for f in fields(cls)}
        for var, raw in env.items():
            if not var.startswith("SHMCACHE_") or var == "SHMCACHE_APP":
                continue
            fname = var[len("SHMCACHE_"):].lower()
            fname = aliases.get(fname, fname)
            if fname not in types:
                continue
            kw[fname] = _parse(var, fname, str(types[fname]), raw)
        kw.update(overrides)
        return cls(**kw)


class _NotFromEnv(ValueError):
    """A field that has no environment spelling."""


def _parse(var: str, fname: str, ftype: str, raw: str) -> Any:
    raw = raw.strip()
    try:
        if fname == "levels":
            return tuple(CacheLevel(x.strip().lower()) for x in raw.split(",") if x.strip())
        if fname == "redis_options":
            raise _NotFromEnv(f"environment variable {var}: redis_options cannot be set "
                              f"from the environment; pass them in code (credentials and "
                              f"TLS go in SHMCACHE_REDIS_URL)")
        if fname == "redis_cluster_nodes":
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if fname == "compression":
            low = raw.lower()
            return True if low in _TRUE else False if low in _FALSE else low
        if ftype.startswith("bool"):
            if raw.lower() not in _TRUE | _FALSE:
                raise ValueError(raw)
            return raw.lower() in _TRUE
        if ftype.startswith("int"):
            return int(raw)
        if ftype.startswith("float"):
            if raw.lower() in ("", "none"):
                if "None" not in ftype:  # lease_ttl, wait_timeout, ...: a number
                    raise ValueError(raw)
                return None
            return float(raw)
        return raw or None
    except _NotFromEnv:
        raise
    except ValueError as e:
        raise ValueError(f"environment variable {var}={raw!r}: "
                         f"not a valid {ftype}") from e
