"""The levels below the segment, as one object a :class:`~shmcache.cache.Cache` calls.

Read path (``fetch``): L2 (Redis) then L3 (disk).  The caller promotes what it finds
into L1 itself (without a journal record: the value came from below); an L3 hit is
also written up into L2 here, with its original stamp, so it cannot overwrite a newer
value.  Write path: with ``write_mode="behind"`` nothing happens here -- the segment's
journal carries every write to the sidecar (sidecar.py); with ``"through"`` the writing
process seals and writes at once (``write``/``delete``) and publishes the invalidation.

What goes below: every key except this host's private bookkeeping (stampede leases,
metrics samples: keys under ``__shmcache__:`` other than tag and namespace counters,
which hosts must share for tags and namespaces to work across hosts).  A decorated
function restricted to some levels marks its entries with flag bits (``F_NO_L2``,
``F_NO_L3``) that the write-back honours.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from typing import Final

from .config import CacheConfig
from .sealing import Sealed, Sealer
from .tiers import DiskTier, RedisTier, TierWrite, disk_secret

__all__ = ["LowerLevels", "F_NO_L2", "F_NO_L3", "INVALIDATION_SEQ_KEY", "is_local_key",
           "encode_invalidation",
           "decode_invalidation", "now_us"]

#: Entry flag bits (beside the serializer's): keep this entry out of L2 / L3.
F_NO_L2: Final = 0x0100
F_NO_L3: Final = 0x0200

#: Bumped by the sidecar before it applies another host's invalidation (a local key).
INVALIDATION_SEQ_KEY: Final = "__shmcache__:invseq"

_INTERNAL: Final = b"__shmcache__:"
_SHARED_INTERNAL: Final = (b"__shmcache__:tag:", b"__shmcache__:ns:")

# Invalidation messages: b"SCI1" | host id (16 bytes) | records of
# op (b"D" drop a key, b"C" clear everything) | u16 key length | key.
_INV_MAGIC: Final = b"SCI1"
_HOST_LEN: Final = 16
_KLEN: Final = struct.Struct("<H")
_INV_LABEL: Final = b"invalidation"


def now_us() -> int:
    """Wall clock in microseconds: the stamp of a write."""
    return time.time_ns() // 1000


def is_local_key(key: bytes) -> bool:
    """True for this host's own bookkeeping (leases, metrics), never sent below."""
    return key.startswith(_INTERNAL) and not key.startswith(_SHARED_INTERNAL)


def encode_invalidation(sealer: Sealer, host: bytes, drops: Iterable[bytes],
                        clear: bool = False) -> bytes:
    """One message announcing this host's deletes/replacements (and a clear), signed
    with the secret: whoever can publish on the channel without it cannot make hosts
    drop their entries."""
    parts = [_INV_MAGIC, host]
    if clear:
        parts.append(b"C" + _KLEN.pack(0))
    for k in drops:
        parts += [b"D", _KLEN.pack(len(k)), k]
    return sealer.sign(_INV_LABEL, b"".join(parts))


def decode_invalidation(sealer: Sealer, signed: bytes
                        ) -> tuple[bytes, bool, list[bytes]] | None:
    """(sender host, clear?, keys) or None for a message that is not ours (or not
    signed with our secret)."""
    msg = sealer.verified(_INV_LABEL, signed)
    if msg is None or not msg.startswith(_INV_MAGIC):
        return None
    pos = len(_INV_MAGIC)
    host = msg[pos:pos + _HOST_LEN]
    pos += _HOST_LEN
    clear = False
    keys: list[bytes] = []
    try:
        while pos < len(msg):
            op = msg[pos:pos + 1]
            (n,) = _KLEN.unpack_from(msg, pos + 1)
            pos += 1 + _KLEN.size
            if op == b"C":
                clear = True
            elif op == b"D":
                keys.append(msg[pos:pos + n])
                pos += n
            else:
                return None
    except struct.error:
        return None
    return host, clear, keys


class LowerLevels:
    """L2 and/or L3 of one cache, configured from its :class:`CacheConfig`."""

    def __init__(self, cfg: CacheConfig) -> None:
        self.redis: RedisTier | None = None
        self.disk: DiskTier | None = None
        if cfg.uses_redis:
            sealer = Sealer(cfg.secret, encrypt=cfg.encrypt,
                            allow_unsigned=cfg.allow_unsigned)
            self.redis = RedisTier(sealer, url=cfg.redis_url,
                                   cluster_nodes=cfg.redis_cluster_nodes,
                                   prefix=cfg.redis_prefix, timeout=cfg.redis_timeout,
                                   options=dict(cfg.redis_options))
        if cfg.uses_disk:
            path = cfg.disk_dir
            secret: bytes | str = cfg.secret if cfg.secret else disk_secret(path)
            self.disk = DiskTier(Sealer(secret, encrypt=cfg.encrypt), path,
                                 size_limit=cfg.disk_size_mb << 20,
                                 timeout=cfg.redis_timeout)

    # -- reads -----------------------------------------------------------------------

    def fetch(self, key: bytes, flags_mask: int = 0) -> tuple[Sealed, str] | None:
        """The value of ``key`` from the first lower level that has it, and that
        level's name ("REDIS"/"DISK").  ``flags_mask``: F_NO_L2/F_NO_L3 to skip."""
        if is_local_key(key):
            return None
        if self.redis is not None and not flags_mask & F_NO_L2:
            got = self.redis.get(key)
            if got is not None:
                # A tombstone: deleted everywhere since; a local L3 copy is older.
                return None if got.tombstone else (got, "REDIS")
        if self.disk is not None and not flags_mask & F_NO_L3:
            got = self.disk.get(key)
            if got is not None:
                # Up into L2 (shared by every host) only while Redis would still hold
                # a tombstone of a delete made since; an older local copy stays local.
                if self.redis is not None and not got.flags & F_NO_L2 and \
                        now_us() - got.stamp < self.redis.tombstone_ttl_ms * 1000:
                    self._promote_to_l2(key, got)
                return got, "DISK"
        return None

    def _promote_to_l2(self, key: bytes, got: Sealed) -> None:
        assert self.redis is not None
        ttl_ms = _ttl_ms(got.expires_at)
        if ttl_ms < 0:
            return
        blob = self.redis.sealer.seal(key, got.body, flags=got.flags, stamp=got.stamp,
                                      expires_at=got.expires_at)
        self.redis.write([TierWrite(key, blob, ttl_ms)])

    def shared_generation(self, key: bytes, candidate: bytes) -> bytes | None:
        """A tag/namespace generation every host agrees on: ``candidate`` if Redis
        had none, else the one Redis holds.  None without Redis (or while it is down:
        the caller then makes a local one, written behind like any value)."""
        if self.redis is None:
            return None
        blob = self.redis.sealer.seal(key, candidate, flags=0, stamp=now_us())
        got = self.redis.add_or_get(key, blob)
        return None if got is None else got.body

    # -- write-through -----------------------------------------------------------------

    def write(self, key: bytes, body: bytes, flags: int, expires_at: float | None,
              host: bytes) -> None:
        """Write one value to L2/L3 now and announce it (write-through mode)."""
        if is_local_key(key):
            return
        stamp = now_us()
        ttl_ms = _ttl_ms(expires_at)
        if ttl_ms < 0:
            return
        if self.redis is not None and not flags & F_NO_L2:
            blob = self.redis.sealer.seal(key, body, flags=flags, stamp=stamp,
                                          expires_at=expires_at)
            self.redis.write([TierWrite(key, blob, ttl_ms)],
                             encode_invalidation(self.redis.sealer, host, [key]))
        if self.disk is not None and not flags & F_NO_L3:
            blob = self.disk.sealer.seal(key, body, flags=flags, stamp=stamp,
                                         expires_at=expires_at)
            self.disk.write([TierWrite(key, blob, ttl_ms)])

    def delete(self, key: bytes, host: bytes) -> None:
        """Delete one key from L2/L3 now (a tombstone in Redis) and announce it."""
        if is_local_key(key):
            return
        if self.redis is not None:
            blob = self.redis.sealer.seal(key, b"", flags=0, stamp=now_us(), tombstone=True)
            self.redis.write([TierWrite(key, blob, 0, delete=True)],
                             encode_invalidation(self.redis.sealer, host, [key]))
        if self.disk is not None:
            self.disk.write([TierWrite(key, b"", 0, delete=True)])

    def clear(self, host: bytes) -> None:
        """Empty L2 (this prefix) and L3 and tell the other hosts to clear their L1."""
        if self.redis is not None and self.redis.clear():
            self.redis.write([], encode_invalidation(self.redis.sealer, host, [],
                                                    clear=True))
        if self.disk is not None:
            self.disk.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-level counters of this process: {"REDIS": {...}, "DISK": {...}}."""
        out: dict[str, dict[str, int]] = {}
        if self.redis is not None:
            out["REDIS"] = self.redis.stats.as_dict() | {"down": int(self.redis.breaker.down)}
        if self.disk is not None:
            out["DISK"] = self.disk.stats.as_dict() | {"down": int(self.disk.breaker.down)}
        return out

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
        if self.disk is not None:
            self.disk.close()


def _ttl_ms(expires_at: float | None) -> int:
    """Remaining ms (0: no expiry; -1: already expired)."""
    if expires_at is None:
        return 0
    left = int((expires_at - time.time()) * 1000)
    return left if left > 0 else -1

