"""The lower levels with a real redis-server: promotion, write-behind order, stamps,
invalidation between two hosts, tags and namespaces across hosts, write-through,
encryption and the refusal to share pickles without a secret.

A "host" is a :class:`Cache` on a segment of its own with its own sidecar thread; two
hosts on this machine share one Redis exactly as two machines would.  Every wait is a
condition polled with a deadline (the sidecar drains every 10 ms).
"""

from __future__ import annotations

import os
import time
from typing import Any

import diskcache
import pytest
from redis_servers import (
    L1_L2_L3,
    Hosts,
    RedisProc,
    fx_hosts,  # noqa: F401 - fixture "hosts"
    fx_prefix,  # noqa: F401 - fixture "prefix"
    fx_redis_server,  # noqa: F401 - fixture "redis_server"
    is_subscribed,
    redis_key,
    requires_redis,
    wait_until,
)

from shmcache import MISSING, Cache
from shmcache.config import TierNotAvailableError
from shmcache.sealing import Sealer, stamp_of
from shmcache.tiers import TierWrite

pytestmark = [requires_redis, pytest.mark.slow]

NS = "__shmcache__:ns:"
ABSENT = object()
TOMBSTONE = object()


def l2_value(cache: Cache, r: Any, key: str) -> Any:
    """What Redis holds for ``key``, opened with the cache's sealer and decoded:
    the object, ``TOMBSTONE`` or ``ABSENT``."""
    assert cache._lower is not None and cache._lower.redis is not None
    blob = r.get(redis_key(cache.config.redis_prefix, key))
    if blob is None:
        return ABSENT
    got = cache._lower.redis.sealer.open(key.encode(), blob)
    if got.tombstone:
        return TOMBSTONE
    return Cache._decode(got.body, got.flags)[0]


def reaches_l2(cache: Cache, r: Any, key: str, value: Any, timeout: float = 10.0) -> bool:
    return wait_until(lambda: l2_value(cache, r, key) == value, timeout)


def two_listening(hosts: Hosts, server: RedisProc, **kw: Any) -> tuple[Cache, Cache]:
    """Two hosts whose sidecars both listen for invalidations already."""
    a = hosts.new(url=server.url, **kw)
    b = hosts.new(url=server.url, **kw)
    r = server.client()
    assert wait_until(lambda: is_subscribed(r, hosts.prefix, 2))
    return a, b


# -- promotion ----------------------------------------------------------------------------


def test_l2_hit_is_promoted_into_l1_with_its_remaining_ttl(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url)
    # No sidecar on b: its journal is never drained, so a record would stay visible.
    b = hosts.new(url=redis_server.url, sidecar="off")
    r = redis_server.client()
    a.set("user:1", {"name": "alice"}, ttl=600)
    assert reaches_l2(a, r, "user:1", {"name": "alice"})
    # Age the L2 copy: three seconds left of its 600, as if written long ago.
    rk = redis_key(hosts.prefix, "user:1")
    assert a._lower is not None and a._lower.redis is not None
    sealer = a._lower.redis.sealer
    old = sealer.open(b"user:1", r.get(rk))
    expires = time.time() + 3.0
    r.set(rk, sealer.seal(b"user:1", old.body, flags=old.flags, stamp=old.stamp + 1,
                          expires_at=expires), px=3000)

    assert not b.segment.contains("user:1")
    assert b.get("user:1") == {"name": "alice"}
    info = b.segment.info("user:1")
    assert info is not None and info.expires_at is not None
    # The remaining 3 s, not a fresh 600 s (the engine rounds to milliseconds).
    assert abs(info.expires_at - expires) < 0.5
    st = b.get_statistics()
    assert st.tiers["REDIS"]["hits"] == 1 and st.levels["REDIS"].hits == 1

    # Now an L1 hit: Redis is not asked again, and nothing is written back.
    assert b.get("user:1") == {"name": "alice"}
    assert b.get_statistics().tiers["REDIS"]["hits"] == 1
    assert b.segment.stats().journal_records == 0


def test_l3_hit_is_promoted_into_l2_and_l1_keeping_its_stamp(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url, levels=L1_L2_L3)
    r = redis_server.client()
    a.set("report:7", list(range(100)), ttl=600)
    assert reaches_l2(a, r, "report:7", list(range(100)))
    disk = diskcache.Cache(a.config.disk_dir)
    try:
        assert wait_until(lambda: disk.get(b"report:7") is not None)
        disk_stamp = stamp_of(disk.get(b"report:7"))
    finally:
        disk.close()

    # L2 lost it (evicted, flushed) and so did L1: only the disk has it.
    r.delete(redis_key(hosts.prefix, "report:7"))
    assert a.segment.delete("report:7", journal=False)
    before = a.get_statistics().tiers

    assert a.get("report:7") == list(range(100))
    after = a.get_statistics().tiers
    assert after["DISK"]["hits"] == before["DISK"]["hits"] + 1
    assert after["REDIS"]["misses"] == before["REDIS"]["misses"] + 1
    assert a.segment.contains("report:7")
    blob = r.get(redis_key(hosts.prefix, "report:7"))
    assert blob is not None and stamp_of(blob) == disk_stamp
    # Another host without a disk reads the promoted copy from L2.
    b = hosts.new(url=redis_server.url)
    assert b.get("report:7") == list(range(100))


def test_a_tombstone_in_l2_hides_an_older_l3_copy(redis_server: RedisProc,
                                                 hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url, levels=L1_L2_L3)
    r = redis_server.client()
    a.set("k", "v1")
    disk = diskcache.Cache(a.config.disk_dir)
    try:
        assert wait_until(lambda: disk.get(b"k") is not None)
        blob = disk.get(b"k")
    finally:
        disk.close()
    a.delete("k")
    assert wait_until(lambda: l2_value(a, r, "k") is TOMBSTONE)
    # Put the old copy back on disk, as a host whose L3 missed the delete would hold.
    disk = diskcache.Cache(a.config.disk_dir)
    try:
        disk.set(b"k", blob)
    finally:
        disk.close()
    assert a.get("k", MISSING) is MISSING


# -- write-behind order ----------------------------------------------------------------


def test_write_behind_ends_with_the_last_of_many_sets(redis_server: RedisProc,
                                                     hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url)
    r = redis_server.client()
    for i in range(500):
        a.set("counter", i)
        a.set(f"k{i % 50}", i)
    assert reaches_l2(a, r, "counter", 499)
    for j in range(50):
        assert reaches_l2(a, r, f"k{j}", 450 + j)
    b = hosts.new(url=redis_server.url)
    assert b.get("counter") == 499


def test_a_delete_wins_over_earlier_sets_and_a_later_set_over_it(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url)
    r = redis_server.client()
    for i in range(100):
        a.set("gone", i)
    a.delete("gone")
    for i in range(100):
        a.set("back", i)
        if i == 50:
            a.delete("back")
    assert wait_until(lambda: l2_value(a, r, "gone") is TOMBSTONE)
    assert reaches_l2(a, r, "back", 99)
    b = hosts.new(url=redis_server.url)
    assert b.get("gone", MISSING) is MISSING
    assert b.get("back") == 99


def test_a_late_write_back_with_an_older_stamp_is_refused(redis_server: RedisProc,
                                                         hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url)
    r = redis_server.client()
    a.set("k", "current")
    assert reaches_l2(a, r, "k", "current")
    assert a._lower is not None and a._lower.redis is not None
    tier = a._lower.redis
    rk = redis_key(hosts.prefix, "k")
    now = stamp_of(r.get(rk))
    assert now is not None
    body, flags = a._encode("late", a._serializer, None, None)

    def late(stamp: int, **kw: Any) -> TierWrite:
        return TierWrite(b"k", tier.sealer.seal(b"k", body, flags=flags, stamp=stamp, **kw),
                         0)

    refused = tier.stats.refused_stale
    assert tier.write([late(now - 1)])
    assert tier.stats.refused_stale == refused + 1
    assert l2_value(a, r, "k") == "current"

    # After a delete, an older write cannot resurrect the key either.
    a.delete("k")
    assert wait_until(lambda: l2_value(a, r, "k") is TOMBSTONE)
    tomb = stamp_of(r.get(rk))
    assert tomb is not None and tomb > now
    assert tier.write([late(tomb - 1)])
    assert tier.stats.refused_stale == refused + 2
    assert l2_value(a, r, "k") is TOMBSTONE

    # A newer one is taken.
    assert tier.write([late(tomb + 1)])
    assert l2_value(a, r, "k") == "late"


# -- two hosts ----------------------------------------------------------------------------


def test_a_delete_on_one_host_removes_the_key_from_the_others_l1(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a, b = two_listening(hosts, redis_server)
    r = redis_server.client()
    a.set("user:1", "alice")
    assert reaches_l2(a, r, "user:1", "alice")
    # (A promotion that overlaps an applied invalidation -- here possibly the message
    # announcing this very set -- is served but not kept: read until it is kept.)
    assert wait_until(lambda: b.get("user:1") == "alice" and b.segment.contains("user:1"))

    a.delete("user:1")
    assert wait_until(lambda: not b.segment.contains("user:1"))
    assert b.get("user:1", MISSING) is MISSING
    assert b._sidecar is not None and b._sidecar.stats()["applied"] >= 1


def test_a_delete_of_a_key_absent_from_this_l1_still_reaches_the_others(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a, b = two_listening(hosts, redis_server)
    r = redis_server.client()
    b.set("only-b", 1)
    assert reaches_l2(b, r, "only-b", 1)
    assert not a.segment.contains("only-b")
    assert a.delete("only-b") is False  # not in a's L1 ...
    assert wait_until(lambda: not b.segment.contains("only-b"))  # ... gone from b's
    assert wait_until(lambda: l2_value(a, r, "only-b") is TOMBSTONE)


def test_a_replacement_on_one_host_replaces_the_others_copy(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a, b = two_listening(hosts, redis_server)
    r = redis_server.client()
    a.set("cfg", {"v": 1})
    assert reaches_l2(a, r, "cfg", {"v": 1})
    assert b.get("cfg") == {"v": 1}
    a.set("cfg", {"v": 2})
    assert wait_until(lambda: b.get("cfg") == {"v": 2})
    # and the other way round
    b.set("cfg", {"v": 3})
    assert wait_until(lambda: a.get("cfg") == {"v": 3})
    assert reaches_l2(a, r, "cfg", {"v": 3})


def test_tags_invalidated_on_one_host_are_invalid_on_the_other(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a, b = two_listening(hosts, redis_server)
    r = redis_server.client()
    a.set("u:1", "alice", tags=["users"])
    a.set("p:1", "page", tags=["pages"])
    assert reaches_l2(a, r, "u:1", "alice") and reaches_l2(a, r, "p:1", "page")
    assert b.get("u:1") == "alice" and b.get("p:1") == "page"

    a.invalidate_tags("users")
    assert a.get("u:1", MISSING) is MISSING
    assert wait_until(lambda: b.get("u:1", MISSING) is MISSING)
    assert b.get("p:1") == "page"  # another tag: untouched
    # and from b back to a
    b.set("u:2", "bob", tags=["users"])
    assert reaches_l2(b, r, "u:2", "bob")
    assert a.get("u:2") == "bob"
    b.invalidate_tags("users")
    assert wait_until(lambda: a.get("u:2", MISSING) is MISSING)


def test_namespaces_invalidated_on_one_host_are_invalid_on_the_other(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a, b = two_listening(hosts, redis_server)
    r = redis_server.client()
    a.set("x", 1, namespace="tenant-1")
    a.set("x", 2, namespace="tenant-2")
    # b reads once a's namespace generations are in L2 (see the test below for a read
    # that comes first).
    assert wait_until(lambda: all(r.exists(redis_key(hosts.prefix, NS + t))
                                  for t in ("tenant-1", "tenant-2")))
    assert wait_until(lambda: b.get("x", namespace="tenant-1") == 1)
    assert b.get("x", namespace="tenant-2") == 2

    a.invalidate_namespace("tenant-1")
    assert a.get("x", MISSING, namespace="tenant-1") is MISSING
    assert wait_until(lambda: b.get("x", MISSING, namespace="tenant-1") is MISSING)
    assert b.get("x", namespace="tenant-2") == 2
    # The new generation is shared: a value stored under it on b is seen on a.
    b.set("x", 10, namespace="tenant-1")
    assert wait_until(lambda: a.get("x", namespace="tenant-1") == 10)


def test_a_read_on_another_host_does_not_invalidate_a_namespace(
        redis_server: RedisProc, hosts: Hosts) -> None:
    """A host that reads a namespace before the writing host's sidecar has written its
    generation to L2 must not mint a competing generation (which, with a newer stamp,
    would win in Redis and orphan the writer's entries -- by a read): generations are
    created in Redis only if absent, and the first one wins."""
    a, b = two_listening(hosts, redis_server)
    r = redis_server.client()
    assert a._sidecar is not None and b._sidecar is not None
    a._sidecar.stop()  # hold a's write-back back: b reads before it lands
    a.set("x", 1, namespace="tenant-1")
    assert b.get("x", MISSING, namespace="tenant-1") is MISSING  # not in L2 yet: fine
    ns_key = redis_key(hosts.prefix, NS + "tenant-1")
    assert wait_until(lambda: b.segment.stats().journal_records == 0
                      and not b._sidecar.stats()["pending"])
    heard = b._sidecar.stats()["received"]

    a._sidecar = a.start_sidecar()
    assert a._sidecar.wait_leader(10)
    assert wait_until(lambda: a.segment.stats().journal_records == 0
                      and not a._sidecar.stats()["pending"]
                      and b._sidecar.stats()["received"] > heard)
    assert r.exists(ns_key)
    # Both hosts must agree on a's generation: a only wrote, b only read.
    assert b.get("x", MISSING, namespace="tenant-1") == 1
    assert a.get("x", MISSING, namespace="tenant-1") == 1


def test_clear_on_one_host_empties_l2_and_the_others_l1(redis_server: RedisProc,
                                                       hosts: Hosts) -> None:
    a, b = two_listening(hosts, redis_server)
    r = redis_server.client()
    for i in range(20):
        a.set(f"k{i}", i)
    assert reaches_l2(a, r, "k19", 19)
    assert b.get("k3") == 3
    a.clear()
    assert wait_until(lambda: not b.segment.contains("k3"))
    assert wait_until(lambda: all(l2_value(a, r, f"k{i}") is ABSENT for i in range(20)))
    assert b.get("k3", MISSING) is MISSING


# -- write-through ------------------------------------------------------------------------


def test_write_through_writes_and_announces_before_returning(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url, write_mode="through", levels=L1_L2_L3)
    b = hosts.new(url=redis_server.url)
    r = redis_server.client()
    assert wait_until(lambda: is_subscribed(r, hosts.prefix, 1))
    assert a._sidecar is None  # nothing to drain: the writer writes
    a.set("k", "v1", ttl=60)
    assert l2_value(a, r, "k") == "v1"  # no waiting: it is there when set() returns
    disk = diskcache.Cache(a.config.disk_dir)
    try:
        assert disk.get(b"k") is not None
    finally:
        disk.close()
    assert b.get("k") == "v1"
    a.set("k", "v2", ttl=60)
    assert l2_value(a, r, "k") == "v2"
    assert wait_until(lambda: b.get("k") == "v2")  # b's L1 copy was dropped
    a.delete("k")
    assert l2_value(a, r, "k") is TOMBSTONE
    assert wait_until(lambda: not b.segment.contains("k"))
    assert a.incr("n", 5) == 5
    assert r.get(redis_key(hosts.prefix, "n")) is not None


# -- sealing: encryption and secrets ----------------------------------------------------


def test_encrypted_values_round_trip_and_never_show_the_plaintext(
        redis_server: RedisProc, hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url, encrypt=True, levels=L1_L2_L3)
    r = redis_server.client()
    plain = "CONFIDENTIAL-4f8a1c-card-number"
    a.set("doc", plain, ttl=600)
    assert reaches_l2(a, r, "doc", plain)
    assert plain.encode() not in r.get(redis_key(hosts.prefix, "doc"))
    disk_dir = a.config.disk_dir
    disk = diskcache.Cache(disk_dir)
    try:
        assert wait_until(lambda: disk.get(b"doc") is not None)
    finally:
        disk.close()
    for root, _, files in os.walk(disk_dir):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert plain.encode() not in fh.read(), f

    b = hosts.new(url=redis_server.url, encrypt=True)
    assert b.get("doc") == plain
    # Same secret without the encryption key in use: refused, a miss.
    c = hosts.new(url=redis_server.url, encrypt=False)
    assert c.get("doc", MISSING) is MISSING
    assert c.get_statistics().bad_seals == 1


def test_pickles_to_redis_without_a_secret_are_refused_at_construction(
        redis_server: RedisProc, hosts: Hosts) -> None:
    cfg = hosts.config(url=redis_server.url, secret=None)
    with pytest.raises(TierNotAvailableError, match="secret") as e:
        Cache(cfg)
    assert "SHMCACHE_SECRET" in str(e.value)
    # allow_unsigned does not extend to pickle
    with pytest.raises(TierNotAvailableError, match="secret"):
        Cache(cfg.with_(allow_unsigned=True))
    with pytest.raises(TierNotAvailableError, match="16 bytes"):
        Cache(cfg.with_(secret="short"))


def test_unsigned_json_values_are_shared_and_pickle_claims_refused(
        redis_server: RedisProc, hosts: Hosts, tmp_path: Any) -> None:
    a, b = (hosts.new(url=redis_server.url, secret=None, allow_unsigned=True,
                      serializer="json") for _ in range(2))
    r = redis_server.client()
    a.set("j", {"a": [1, 2]})
    assert wait_until(lambda: b.get("j") == {"a": [1, 2]})

    # An unsigned value claiming a pickled body (checksums are public: anyone can make
    # one) is refused before anything is unpickled.
    marker = tmp_path / "unsigned-pickle-ran"
    payload = _plant_pickle(str(marker))
    forged = _forge_unsigned(b"evil", payload, flags=1)
    r.set(redis_key(hosts.prefix, "evil"), forged)
    assert b.get("evil", MISSING) is MISSING
    assert b.get_statistics().bad_seals == 1
    assert not marker.exists()


class _Plant:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _plant_pickle(path: str) -> bytes:
    import pickle
    return pickle.dumps(_Plant(path), protocol=5)


def _forge_unsigned(key: bytes, body: bytes, flags: int) -> bytes:
    """An unsigned sealed value with any flags: seal it as raw, then patch the flags
    and recompute the (keyless) checksum, as an attacker could."""
    import hashlib
    import struct
    s = Sealer(None, allow_unsigned=True)
    blob = bytearray(s.seal(key, body, flags=0, stamp=time.time_ns() // 1000 + 10**9))
    struct.pack_into("<H", blob, 3 + 16 + 1, flags)
    data = bytes(blob[:-16])
    mac = hashlib.blake2b(len(key).to_bytes(2, "little") + key + data,
                          digest_size=16).digest()
    return data + mac


def test_the_seed_levels_start_one_sidecar_unless_off(redis_server: RedisProc,
                                                      hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url, levels=L1_L2_L3)
    assert a._sidecar is not None and a._sidecar.is_leader
    # A second cache on the same segment (another worker) stands by.
    b = hosts.new(url=redis_server.url, levels=L1_L2_L3, name=a.segment.name,
                  wait_leader=False)
    assert b._sidecar is not None
    assert wait_until(lambda: b._sidecar._lock_fd >= 0)  # it has tried the lock
    assert not b._sidecar.is_leader
    off = hosts.new(url=redis_server.url, sidecar="off")
    assert off._sidecar is None
