"""The lower levels: Redis or Redis Cluster (L2) and a diskcache directory (L3).

A tier stores *sealed* values (sealing.py) under ``<prefix><key>`` and never raises
into a caller: a connection error, a timeout, a full or read-only disk marks the tier
down for a backoff interval (0.1 s doubling to ``max_backoff``), counts the operation
as *degraded* and answers like a miss.  The first call after the interval tries again,
so service resumes by itself.  Logging names the tier and the error class, never a
URL's password, a key's value or the secret.

Ordering across hosts: every write carries its writer's stamp (microseconds); a Redis
script refuses a write whose stamp is older than the stored one, and deletes leave a
short-lived tombstone, so a write-back that arrives late cannot resurrect a value that
was since replaced or deleted.  On disk (one host) the sidecar is the only writer, in
journal order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .sealing import BadSeal, Sealed, Sealer

__all__ = ["TierStats", "RedisTier", "DiskTier", "TierWrite", "INVALIDATION_CHANNEL"]

_log = logging.getLogger("shmcache.tiers")

#: The pub/sub channel (suffix) on which hosts announce their deletes and replacements.
INVALIDATION_CHANNEL: Final = "invalidate"

# KEYS[1] = key, ARGV[1] = sealed value, ARGV[2] = ttl ms (0 = none).
# Refuses a write older than what is stored (bytes 4..19 are the stamp as fixed-width
# hex, so string order is numeric order).  Anything that is not ours -- another
# program's string, or a hash or list under our prefix -- is overwritten (GET only on
# strings: on other types it would fail the whole script with WRONGTYPE).
_SET_IF_NEWER: Final = """
local cur = false
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then
  cur = redis.call('GET', KEYS[1])
end
if cur and string.sub(cur, 1, 3) == 'SC1' and
   string.sub(cur, 4, 19) > string.sub(ARGV[1], 4, 19) then
  return 0
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""

# KEYS[1] = key, ARGV[1] = sealed value.  Store unless a live value of ours is there;
# return that value (or false when ours was stored).  For generations that every host
# must share (tag and namespace counters): the first host to create one wins.
_ADD_OR_GET: Final = """
if redis.call('TYPE', KEYS[1])['ok'] == 'string' then
  local cur = redis.call('GET', KEYS[1])
  if string.sub(cur, 1, 3) == 'SC1' and string.sub(cur, 20, 20) == 'V' then
    return cur
  end
end
redis.call('SET', KEYS[1], ARGV[1])
return false
"""


def _wrong_value(e: BaseException) -> bool:
    """A reply error about one key's value (WRONGTYPE), not an outage.  Anything
    else Redis refuses with -- OOM, NOPERM, CLUSTERDOWN, TRYAGAIN, READONLY -- fails
    the whole batch, which stays pending and is retried."""
    import redis
    return isinstance(e, redis.ResponseError) and str(e).startswith("WRONGTYPE")


class TierStats:
    """Per-process counters of one tier (plain ints, bumped under the GIL)."""

    __slots__ = ("hits", "misses", "writes", "deletes", "degraded", "bad_seals",
                 "refused_stale", "failures")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.deletes = 0
        #: Operations skipped or failed because the tier was unreachable/broken.
        self.degraded = 0
        #: Values that failed verification (tampered, foreign, garbage): misses.
        self.bad_seals = 0
        #: Write-backs refused because the tier held a newer value.
        self.refused_stale = 0
        #: Times the tier went down (each starts a backoff).
        self.failures = 0

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class TierWrite:
    """One write-back: ``blob`` is a sealed value or tombstone; ``ttl_ms`` 0 = none."""

    key: bytes
    blob: bytes
    ttl_ms: int
    delete: bool = False


class _Breaker:
    """Down/up state with exponential backoff; logs each transition once."""

    def __init__(self, name: str, max_backoff: float) -> None:
        self.name = name
        self.max_backoff = max_backoff
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._backoff = 0.0
        self.down = False

    def allow(self) -> bool:
        return not self.down or time.monotonic() >= self._retry_at

    def ok(self) -> None:
        if self.down:
            with self._lock:
                if self.down:
                    self.down = False
                    self._backoff = 0.0
                    _log.warning("shmcache: %s is reachable again", self.name)

    def fail(self, exc: BaseException, stats: TierStats) -> None:
        with self._lock:
            self._backoff = min(self.max_backoff, max(0.1, self._backoff * 2))
            self._retry_at = time.monotonic() + self._backoff
            if not self.down:
                self.down = True
                stats.failures += 1
                _log.warning("shmcache: %s unavailable (%s: %s); serving without it, "
                             "retrying with backoff", self.name, type(exc).__name__,
                             _redact(str(exc))[:200])


def parse_node(node: str) -> tuple[str, int]:
    """``"host:port"``, ``"host"`` (port 6379) or ``"[v6addr]:port"`` as (host, port);
    ``ValueError`` naming the entry otherwise."""
    n = node.strip()
    if n.startswith("["):
        host, _, rest = n[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif n.count(":") == 1:
        host, _, port = n.partition(":")
    else:
        host, port = n, ""
    try:
        p = int(port) if port else 6379
    except ValueError:
        raise ValueError(f"redis_cluster_nodes entry {node!r}: not host:port") from None
    if not host or not 0 < p < 65536:
        raise ValueError(f"redis_cluster_nodes entry {node!r}: not host:port")
    return host, p


def _redact(msg: str) -> str:
    """Drop anything that looks like credentials in a URL (``user:pass@``)."""
    import re
    return re.sub(r"//[^/@\s]*@", "//***@", msg)


def _verified(tier: _Tier, key: bytes, blob: object) -> Sealed | None:
    """Open a blob read from ``tier``: None (counted as a miss) if absent or refused."""
    if blob is None:
        tier.stats.misses += 1
        return None
    try:
        return tier.sealer.open(key, blob if isinstance(blob, bytes) else b"")
    except BadSeal as e:
        tier.stats.bad_seals += 1
        tier.stats.misses += 1
        tier._bad.note(tier.name, key, e)
        return None


class _BadSealLog:
    """Logs a refused value once per key (bounded), never its content."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def note(self, tier: str, key: bytes, err: BadSeal) -> None:
        if key in self._seen:
            return
        if len(self._seen) >= 4096:
            self._seen.clear()
        self._seen.add(key)
        _log.warning("shmcache: refused the value of %r from %s: %s", key[:200], tier, err)


#: Every tier of this process: a forked child (a gunicorn worker forked while the
#: master's sidecar thread was mid-call) must not inherit a lock held at the fork.
_live_tiers: weakref.WeakSet[_Tier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for t in list(_live_tiers):
        t._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Tier:
    """What both levels share: the sealer, counters, the breaker, and one connection
    (a redis client, a diskcache) opened lazily per process and dropped on failure."""

    name: str

    def __init__(self, sealer: Sealer, name: str, max_backoff: float) -> None:
        self.sealer = sealer
        self.name = name
        self.stats = TierStats()
        self.breaker = _Breaker(name, max_backoff)
        self._conn: Any = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._bad = _BadSealLog()
        _live_tiers.add(self)

    def _open(self) -> Any:
        raise NotImplementedError

    def _connection(self) -> Any:
        if self._conn is None or self._pid != os.getpid():
            with self._lock:
                if self._conn is None or self._pid != os.getpid():
                    # A forked child must not share its parent's sockets or SQLite.
                    self._conn = self._open()
                    self._pid = os.getpid()
        return self._conn

    def _reset_after_fork(self) -> None:
        # The parent's connection is the parent's: drop it, never close it here.
        self._lock = threading.Lock()
        self.breaker._lock = threading.Lock()
        self._conn = None

    def _drop(self) -> None:
        with self._lock:
            old, self._conn = self._conn, None
        if old is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                old.close()

    def _down(self) -> bool:
        """True (and counted as degraded) while the level is backing off."""
        if self.breaker.allow():
            return False
        self.stats.degraded += 1
        return True

    def _failed(self, exc: BaseException) -> None:
        self.stats.degraded += 1
        self.breaker.fail(exc, self.stats)
        self._drop()

    def close(self) -> None:
        """Close this process's connection (a later call opens a new one)."""
        self._drop()


class RedisTier(_Tier):
    """L2: a Redis server (``url``) or a Redis Cluster (``cluster_nodes``)."""

    def __init__(self, sealer: Sealer, *, url: str | None = None,
                 cluster_nodes: Sequence[str] = (), prefix: str = "shmcache:",
                 timeout: float = 0.5, options: dict[str, Any] | None = None,
                 max_backoff: float = 2.0, tombstone_ttl: float = 3600.0) -> None:
        if not url and not cluster_nodes:
            raise ValueError("the REDIS level needs redis_url or redis_cluster_nodes")
        super().__init__(sealer, "Redis Cluster" if cluster_nodes else "Redis", max_backoff)
        self.cluster = bool(cluster_nodes)
        self.url = url
        self.cluster_nodes = tuple(cluster_nodes)
        self.prefix = prefix.encode()
        self.channel = prefix + INVALIDATION_CHANNEL
        self.timeout = timeout
        self.options = dict(options or {})
        self.tombstone_ttl_ms = int(tombstone_ttl * 1000)

    # -- connection ----------------------------------------------------------------------

    def new_client(self, *, pubsub: bool = False) -> Any:
        """A fresh client (the subscriber has its own: a blocking pub/sub connection)."""
        import redis
        common: dict[str, Any] = {
            "socket_timeout": None if pubsub else self.timeout,
            "socket_connect_timeout": self.timeout,
            "health_check_interval": 10,
        }
        common.update(self.options)
        if self.cluster:
            from redis.cluster import ClusterNode, RedisCluster
            nodes = []
            for n in self.cluster_nodes:
                host, port = parse_node(n)
                nodes.append(ClusterNode(host, port))  # type: ignore[no-untyped-call]
            common.pop("health_check_interval", None)
            return RedisCluster(startup_nodes=nodes, **common)
        assert self.url is not None
        return redis.Redis.from_url(self.url, **common)

    def client(self) -> Any:
        """This process's client."""
        return self._connection()

    def _open(self) -> Any:
        return self.new_client()

    # -- reads -----------------------------------------------------------------------------

    def get(self, key: bytes) -> Sealed | None:
        """The verified value of ``key`` -- a tombstone too (``.tombstone``: deleted,
        which the caller must not look up below) -- or None (absent, refused, down)."""
        if self._down():
            return None
        try:
            blob = self.client().get(self.prefix + key)
        except Exception as e:  # noqa: BLE001 - any client/network error: degrade
            if _wrong_value(e):  # e.g. another program's hash under our key: a miss
                self.breaker.ok()
                self.stats.bad_seals += 1
                self.stats.misses += 1
                return None
            self._failed(e)
            return None
        self.breaker.ok()
        got = _verified(self, key, blob)
        if got is None:
            return None
        if got.tombstone:
            self.stats.misses += 1
            return got
        self.stats.hits += 1
        return got

    # -- writes ----------------------------------------------------------------------------

    def write(self, batch: Sequence[TierWrite], invalidate: bytes | None = None) -> bool:
        """Apply ``batch`` in one pipeline, then publish ``invalidate`` (if any).
        False if the tier is down (the caller keeps the batch and retries)."""
        if not batch and invalidate is None:
            return True
        if self._down():
            return False
        try:
            c = self.client()
            pipe = c.pipeline(transaction=False)
            for w in batch:
                ttl = self.tombstone_ttl_ms if w.delete else w.ttl_ms
                # execute_command: cluster pipelines disable .eval() but route EVAL by key
                pipe.execute_command("EVAL", _SET_IF_NEWER, 1, self.prefix + w.key, w.blob, ttl)
            # Per-reply errors (a value Redis refuses) must not fail the batch.
            res = pipe.execute(raise_on_error=False) if batch else []
            if invalidate is not None:
                if self.cluster:
                    c.spublish(self.channel, invalidate)
                else:
                    c.publish(self.channel, invalidate)
        except Exception as e:  # noqa: BLE001 - any client/network error: degrade
            self._failed(e)
            return False
        self.breaker.ok()
        for w, r in zip(batch, res, strict=False):
            if isinstance(r, Exception):
                if not _wrong_value(r):  # a connection error inside the batch
                    self._failed(r)
                    return False
                self.stats.bad_seals += 1
                continue
            if w.delete:
                self.stats.deletes += 1
            else:
                self.stats.writes += 1
            if r == 0:
                self.stats.refused_stale += 1
        return True

    def add_or_get(self, key: bytes, blob: bytes) -> Sealed | None:
        """Store ``blob`` unless the key holds a live value; return the value Redis
        holds afterwards (ours or the earlier one), or None if Redis is unusable."""
        if self._down():
            return None
        try:
            cur = self.client().execute_command("EVAL", _ADD_OR_GET, 1,
                                                self.prefix + key, blob)
        except Exception as e:  # noqa: BLE001 - any client/network error: degrade
            self._failed(e)
            return None
        self.breaker.ok()
        got = _verified(self, key, cur or blob)
        return None if got is None or got.tombstone else got

    def clear(self) -> bool:
        """Remove every key under this tier's prefix (SCAN + UNLINK, on every master)."""
        if self._down():
            return False
        try:
            c = self.client()
            pattern = self.prefix.replace(b"*", b"\\*") + b"*"
            batch: list[bytes] = []
            if self.cluster:
                from redis.cluster import RedisCluster
                for key in c.scan_iter(match=pattern, count=1000,
                                       target_nodes=RedisCluster.PRIMARIES):
                    c.unlink(key)
            else:
                for key in c.scan_iter(match=pattern, count=1000):
                    batch.append(key)
                    if len(batch) >= 500:
                        c.unlink(*batch)
                        batch.clear()
                if batch:
                    c.unlink(*batch)
        except Exception as e:  # noqa: BLE001
            self._failed(e)
            return False
        self.breaker.ok()
        return True



def ensure_private_dir(path: str) -> str:
    """Create ``path`` (and parents) owner-only; refuse one that others can use, or a
    symbolic link (someone else's planted link must not make us chmod its target)."""
    import stat as stat_
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat_.S_ISLNK(st.st_mode) or not stat_.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a plain directory (a link?): refused")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def disk_secret(path: str) -> bytes:
    """The per-directory signing key of a disk-only cache: 32 random bytes in
    ``<path>/.secret`` (0600), made on first use.  Whoever can read it can already
    write the directory, so it authenticates values as well as a configured secret."""
    ensure_private_dir(path)
    f = os.path.join(path, ".secret")
    for _ in range(50):
        try:
            with open(f, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            # Written whole under a temporary name, then linked into place: a reader
            # never sees a partial key, and of two creators the first link wins.
            tmp = f"{f}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
            try:
                os.link(tmp, f)
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            continue
        if len(data) < 32:
            raise PermissionError(f"{f} is damaged (shorter than 32 bytes)")
        return data
    raise PermissionError(f"cannot create {f}")


class DiskTier(_Tier):
    """L3: a diskcache directory (owner-only) bounded by ``size_limit`` bytes."""

    def __init__(self, sealer: Sealer, path: str, *, size_limit: int,
                 max_backoff: float = 2.0, timeout: float = 0.5) -> None:
        super().__init__(sealer, f"disk cache {path}", max_backoff)
        self.path = ensure_private_dir(path)
        self.size_limit = size_limit
        self.timeout = timeout

    def _open(self) -> Any:
        import diskcache
        db = os.path.join(self.path, "cache.db")
        if not os.path.exists(db):  # SQLite gives -wal/-shm the db's mode
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        return diskcache.Cache(self.path, size_limit=self.size_limit, timeout=self.timeout,
                               eviction_policy="least-recently-stored",
                               disk_min_file_size=1 << 20)

    def get(self, key: bytes) -> Sealed | None:
        """The verified value of ``key``, or None (absent, refused, expired, broken)."""
        if self._down():
            return None
        try:
            blob = self._connection().get(key)
        except Exception as e:  # noqa: BLE001 - sqlite/OS errors: degrade
            self._failed(e)
            return None
        self.breaker.ok()
        got = _verified(self, key, blob)
        if got is None:
            return None
        if got.tombstone or (got.expires_at is not None and got.expires_at <= time.time()):
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return got

    def write(self, batch: Iterable[TierWrite]) -> bool:
        """Apply ``batch`` (in order); False if the disk is unusable (kept for retry)."""
        if self._down():
            return False
        try:
            dc = self._connection()
            with dc.transact():
                for w in batch:
                    if w.delete:
                        dc.delete(w.key)
                        self.stats.deletes += 1
                    else:
                        dc.set(w.key, w.blob, expire=w.ttl_ms / 1000.0 if w.ttl_ms else None)
                        self.stats.writes += 1
        except Exception as e:  # noqa: BLE001 - full disk, read-only, permissions
            self._failed(e)
            return False
        self.breaker.ok()
        return True

    def clear(self) -> bool:
        if self._down():
            return False
        try:
            self._connection().clear()
        except Exception as e:  # noqa: BLE001
            self._failed(e)
            return False
        return True

