"""Faults below L1, with real servers and real files: tampered and foreign values,
Redis killed and restarted under load, Redis hung, Redis flushed, a disk that cannot be
written.  In every case callers see hits or misses, never an exception, and the level
catches up by itself once it is back.

A hung Redis is made with SIGSTOP on the server (it accepts connections and answers
nothing, like a server stuck in a slow command) and ended with SIGCONT, so the test
does not sit out a fixed ``DEBUG SLEEP``.  A full disk is made with ``RLIMIT_FSIZE`` in
a child process: it stops root as well as anyone (``chmod`` does not stop root), and
SQLite then fails exactly as on a full disk (EFBIG instead of ENOSPC).
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache
import pytest
from _helpers import new_name, run_isolated
from redis_servers import (
    SECRET,
    Hosts,
    RedisProc,
    drop_lock_file,
    fx_hosts,  # noqa: F401 - fixture "hosts"
    fx_own_redis,  # noqa: F401 - fixture "own_redis"
    fx_prefix,  # noqa: F401 - fixture "prefix"
    fx_redis_server,  # noqa: F401 - fixture "redis_server"
    is_subscribed,
    redis_key,
    requires_redis,
    wait_until,
)

from shmcache import MISSING, Cache, CacheConfig, CacheLevel, unlink_segment
from shmcache.sealing import Sealer

pytestmark = [requires_redis, pytest.mark.slow]

L1_L3 = (CacheLevel.C_MEMORY, CacheLevel.DISK)


class _Plant:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _evil(path: Path) -> bytes:
    return pickle.dumps(_Plant(str(path)), protocol=5)


def test_the_planted_pickle_is_live(tmp_path: Path) -> None:
    """The control: the payload the tests below plant does run when unpickled."""
    marker = tmp_path / "control"
    pickle.loads(_evil(marker))
    assert marker.exists()


def _forgeries(key: bytes, legit: bytes, payload: bytes) -> dict[str, bytes]:
    """Ways to put ``payload`` (a pickle) in front of a reader of ``key``."""
    ours = Sealer(SECRET)
    theirs = Sealer("y" * 32)
    stamp = time.time_ns() // 1000 + 10**9  # newer than anything: stamps do not help
    real = ours.open(key, legit)
    body_len_at = 3 + 16 + 1 + 2 + 1 + 1  # prefix, flags u16, mode u8, pad u8
    swapped = bytearray(legit[:body_len_at]) + len(payload).to_bytes(4, "little") + \
        legit[body_len_at + 4:body_len_at + 4 + 8] + payload + legit[-32:]
    flipped = bytearray(legit)
    flipped[-40] ^= 0x01  # one bit of the body
    return {
        # the body replaced, header and MAC kept
        "body swapped": bytes(swapped),
        # one bit changed
        "bit flipped": bytes(flipped),
        # a well-formed value sealed with another secret
        "other secret": theirs.seal(key, payload, flags=real.flags, stamp=stamp),
        # our own valid value for another key, moved here
        "moved": ours.seal(b"other-key", payload, flags=real.flags, stamp=stamp),
        # an unsigned value (checksum only) where a signature is required
        "unsigned": Sealer(None, allow_unsigned=True).seal(key, b"\x00", flags=0,
                                                          stamp=stamp),
    }


def test_tampered_values_in_redis_are_misses_and_never_unpickled(
        redis_server: RedisProc, hosts: Hosts, tmp_path: Path) -> None:
    a = hosts.new(url=redis_server.url)
    b = hosts.new(url=redis_server.url)
    r = redis_server.client()
    a.set("victim", "harmless", ttl=600)
    rk = redis_key(hosts.prefix, "victim")
    assert wait_until(lambda: r.get(rk) is not None)
    legit = r.get(rk)
    marker = tmp_path / "unpickled-from-redis"
    for n, (how, blob) in enumerate(_forgeries(b"victim", legit, _evil(marker)).items(), 1):
        r.set(rk, blob)
        assert b.get("victim", MISSING) is MISSING, how
        assert not b.segment.contains("victim"), how  # not promoted either
        assert b.get_statistics().bad_seals == n, how
    assert not marker.exists()
    # The genuine value still opens (the refusals were about the values, not the tier).
    r.set(rk, legit)
    assert b.get("victim") == "harmless"
    assert b.get_statistics().tiers["REDIS"]["down"] == 0


def test_tampered_values_on_disk_are_misses_and_never_unpickled(hosts: Hosts,
                                                               tmp_path: Path) -> None:
    a = hosts.new(levels=L1_L3)
    a.set("victim", "harmless", ttl=600)
    disk = diskcache.Cache(a.config.disk_dir)
    try:
        assert wait_until(lambda: disk.get(b"victim") is not None)
        legit = disk.get(b"victim")
        marker = tmp_path / "unpickled-from-disk"
        for n, (how, blob) in enumerate(
                _forgeries(b"victim", legit, _evil(marker)).items(), 1):
            disk.set(b"victim", blob)
            a.segment.delete("victim", journal=False)  # only the disk has it now
            assert a.get("victim", MISSING) is MISSING, how
            assert a.get_statistics().bad_seals == n, how
        assert not marker.exists()
        disk.set(b"victim", legit)
        a.segment.delete("victim", journal=False)
        assert a.get("victim") == "harmless"
    finally:
        disk.close()


def test_a_disk_only_cache_signs_with_a_private_key_file(hosts: Hosts,
                                                        tmp_path: Path) -> None:
    a = hosts.new(levels=L1_L3, secret=None)
    a.set("k", "v")
    d = a.config.disk_dir
    assert os.stat(d).st_mode & 0o777 == 0o700
    key_file = os.path.join(d, ".secret")
    assert wait_until(lambda: os.path.exists(key_file))
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    disk = diskcache.Cache(d)
    try:
        assert wait_until(lambda: disk.get(b"k") is not None)
        marker = tmp_path / "unpickled"
        # Signed with the configured-secret key instead of the directory's: refused.
        disk.set(b"k", Sealer(SECRET).seal(b"k", _evil(marker), flags=1,
                                          stamp=time.time_ns() // 1000))
    finally:
        disk.close()
    a.segment.delete("k", journal=False)
    assert a.get("k", MISSING) is MISSING
    assert not marker.exists()


def test_foreign_and_garbage_values_in_redis_are_misses(redis_server: RedisProc,
                                                       hosts: Hosts) -> None:
    b = hosts.new(url=redis_server.url)
    r = redis_server.client()
    junk = {
        "empty": b"",
        "text": b"hello from another program",
        "json": b'{"id": 1}',
        "magic only": b"SC1",
        "truncated header": b"SC1" + b"0" * 16 + b"V" + b"\x01",
        "bad stamp": b"SC1" + b"zz" * 8 + b"V" + bytes(16) + bytes(32),
        "random": os.urandom(200),
        "huge length": b"SC1" + b"0" * 16 + b"V" + b"\x01\x00\x01\x00" +
                       b"\xff\xff\xff\xff" + bytes(8) + bytes(32),
    }
    for n, (how, blob) in enumerate(junk.items(), 1):
        r.set(redis_key(hosts.prefix, how), blob)
        assert b.get(how, MISSING) is MISSING, how
        assert b.get_statistics().bad_seals == n, how
    assert b.get_statistics().tiers["REDIS"]["down"] == 0


def test_a_foreign_key_of_another_type_is_a_miss_and_does_not_take_l2_down(
        redis_server: RedisProc, hosts: Hosts) -> None:
    """A key of another Redis type under the prefix (a hash written by another program)
    would make GET and the write-back script fail with WRONGTYPE.  It must be a miss for
    that key only (not an outage of L2), and our write-back replaces it."""
    a = hosts.new(url=redis_server.url)
    r = redis_server.client()
    r.hset(redis_key(hosts.prefix, "h"), "field", "value")
    assert a.get("h", MISSING) is MISSING  # no exception
    a.set("h", "ours")
    a.set("other", 1)
    assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "other")))
    # Ours replaces the foreign key, and the batch drains.
    assert wait_until(lambda: r.type(redis_key(hosts.prefix, "h")) == b"string", 5)
    assert a._sidecar is not None
    assert wait_until(lambda: a.segment.stats().journal_records == 0
                      and a._sidecar.stats()["pending"] == 0, 5)
    assert a.get_statistics().tiers["REDIS"]["down"] == 0


# -- Redis killed, hung, flushed ---------------------------------------------------------


def test_redis_killed_under_load_and_restarted(own_redis: RedisProc, hosts: Hosts) -> None:
    a = hosts.new(url=own_redis.url)
    b = hosts.new(url=own_redis.url)
    r = own_redis.client()
    errors: list[BaseException] = []
    stop = threading.Event()
    ops = [0]
    for j in range(100):
        a.set(f"old:{j}", j, ttl=600)

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                a.set(f"load:{i % 100}", i, ttl=600)
                a.get(f"load:{(i * 7) % 100}")
                b.get(f"load:{(i * 13) % 100}")  # L1 misses on b go to Redis
                b.get(f"absent:{i}")
            except BaseException as e:  # noqa: BLE001 - the test counts them
                errors.append(e)
            i += 1
            ops[0] = i

    t = threading.Thread(target=load, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: r.dbsize() >= 200)
        own_redis.kill()
        assert wait_until(lambda: a.get_statistics().tiers["REDIS"]["down"] == 1)
        at_kill = ops[0]
        # Written while Redis is gone: they must reach it after the restart.
        for j in range(100):
            a.set(f"down:{j}", j, ttl=600)
            a.delete(f"old:{j}")
        assert wait_until(lambda: ops[0] > at_kill + 100)  # the load went on meanwhile
        own_redis.start()  # same port, empty
        assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "down:99")), 20)
    finally:
        stop.set()
        t.join(30)
    assert errors == []
    assert wait_until(lambda: all(r.exists(redis_key(hosts.prefix, f"down:{j}"))
                                  for j in range(100)), 20)
    c = hosts.new(url=own_redis.url)
    for j in range(100):
        assert c.get(f"down:{j}") == j
        assert c.get(f"old:{j}", MISSING) is MISSING  # deleted while Redis was down
    # The keys written under load are current in L2: what a's L1 holds.
    for j in range(100):
        k = f"load:{j}"

        def same(k: str = k) -> bool:
            return bool(c.get(k) == a.get(k))

        assert wait_until(same), k
    st = a.get_statistics()
    assert st.degraded_ops > 0 and st.tiers["REDIS"]["down"] == 0
    # Invalidations flow again: b's subscriber reconnected.
    assert b.get("down:5") == 5 and b.segment.contains("down:5")
    a.delete("down:5")
    assert wait_until(lambda: not b.segment.contains("down:5"), 15)


def test_an_invalidation_sent_while_a_subscriber_reconnects_is_not_lost(
        redis_server: RedisProc, hosts: Hosts) -> None:
    """Invalidations travel by pub/sub, which delivers only to connected subscribers: a
    message published while a host's subscriber reconnects (a dropped connection, a
    Redis restart, a failover) is lost.  After a reconnect the sidecar therefore drops
    its shared L1 entries (a resync), so the host reads the replaced value from L2."""
    a = hosts.new(url=redis_server.url)
    b = hosts.new(url=redis_server.url)
    r = redis_server.client()
    assert wait_until(lambda: is_subscribed(r, hosts.prefix, 2))
    a.set("k", "v1")
    # (A promotion overlapping an applied invalidation is served but not kept.)
    assert wait_until(lambda: b.get("k") == "v1" and b.segment.contains("k"))
    # Drop the subscribers' connections (as a network blip would), then replace k.
    r.client_kill_filter(_type="pubsub")
    a.set("k", "v2")
    assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "k"))
                      and a.segment.stats().journal_records == 0)
    assert wait_until(lambda: is_subscribed(r, hosts.prefix, 2), 15)
    assert wait_until(lambda: b.get("k") == "v2", 5)


def test_a_hung_redis_costs_callers_about_redis_timeout(own_redis: RedisProc,
                                                        hosts: Hosts) -> None:
    a = hosts.new(url=own_redis.url, redis_timeout=0.2)
    r = own_redis.client()
    a.set("hot", "in L1")
    a.set("cold", "in L2 only")
    assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "cold")))
    a.segment.delete("cold", journal=False)
    os.kill(own_redis.pid, signal.SIGSTOP)  # accepts, answers nothing
    try:
        t0 = time.monotonic()
        assert a.get("cold", MISSING) is MISSING
        assert a.get("hot") == "in L1"
        a.set("during", 1)  # L1 writes do not wait for anything
        assert a.get("during") == 1
        elapsed = time.monotonic() - t0
        assert a.get_statistics().degraded_ops >= 1
    finally:
        os.kill(own_redis.pid, signal.SIGCONT)
    # Bounded by redis_timeout (0.2 s), not by the hang: the server answered nothing
    # until SIGCONT.  A generous margin: only "did not wait for Redis" is asserted.
    assert elapsed < 2.0
    assert wait_until(lambda: a.get("cold", MISSING) == "in L2 only", 15)
    assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "during")), 15)


def test_flushall_gives_misses_then_refills(own_redis: RedisProc, hosts: Hosts) -> None:
    r = own_redis.client()
    calls = [0]

    def square_on(cache: Cache) -> Callable[[int], int]:
        @cache.cached(ttl=600)  # one qualified name on every host: the same keys
        def square(x: int) -> int:
            calls[0] += 1
            return x * x
        return square

    square = square_on(hosts.new(url=own_redis.url))
    assert [square(i) for i in range(10)] == [i * i for i in range(10)]
    assert wait_until(lambda: r.dbsize() >= 10)
    r.flushall()
    b = hosts.new(url=own_redis.url)
    square = square_on(b)
    assert [square(i) for i in range(10)] == [i * i for i in range(10)]
    assert calls[0] == 20  # b computed: L2 was empty, and nothing refused
    assert b.get_statistics().bad_seals == 0
    assert wait_until(lambda: r.dbsize() >= 10)  # b's results refilled L2
    c = hosts.new(url=own_redis.url)
    square = square_on(c)
    assert [square(i) for i in range(10)] == [i * i for i in range(10)]
    assert calls[0] == 20  # served from the refilled L2
    assert c.get_statistics().tiers["REDIS"]["hits"] == 10


# -- a disk that cannot be written ----------------------------------------------------


def _disk_full_child(name: str, disk: str) -> dict[str, Any]:
    """In a child: a cache whose disk becomes unwritable (RLIMIT_FSIZE 0: any write
    that grows a file fails with EFBIG, root included), then writable again."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    cache = Cache(CacheConfig(name=name, c_memory_size_mb=8, levels=L1_L3,
                              secret=SECRET, disk_path=disk))
    out: dict[str, Any] = {}
    try:
        assert cache._sidecar is not None and cache._sidecar.wait_leader(10)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
        try:
            for i in range(50):
                cache.set(f"k{i}", "x" * 1000 + str(i))
            out["l1"] = all(cache.get(f"k{i}") == "x" * 1000 + str(i) for i in range(50))
            assert wait_until(lambda: cache.get_statistics().tiers["DISK"]["degraded"] > 0)
            cache.segment.delete("k0", journal=False)
            out["miss_while_full"] = cache.get("k0", MISSING) is MISSING
            out["down"] = cache.get_statistics().tiers["DISK"]["down"]
            out["pending"] = cache._sidecar.stats()["pending"]
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        cache.set("k0", "x" * 1000 + "0")
        # Writable again: what was pending reaches the disk.
        assert cache._lower is not None and cache._lower.disk is not None
        dc = diskcache.Cache(disk)
        try:
            out["caught_up"] = wait_until(
                lambda: all(dc.get(f"k{i}".encode()) is not None for i in range(50)), 20)
        finally:
            dc.close()
        out["degraded"] = cache.get_statistics().tiers["DISK"]["degraded"]
    finally:
        cache.close()
    return out


def test_an_unwritable_disk_degrades_and_catches_up(tmp_path: Path) -> None:
    name = new_name("disk")
    try:
        out = run_isolated(_disk_full_child, name, str(tmp_path / "l3"), timeout=60)
    finally:
        unlink_segment(name)
        drop_lock_file(name)
    assert out["l1"] is True
    assert out["miss_while_full"] is True
    assert out["down"] == 1
    assert out["pending"] >= 49
    assert out["caught_up"] is True
    assert out["degraded"] > 0


def test_a_broken_disk_directory_is_degraded_not_an_error(hosts: Hosts) -> None:
    """The database path taken by a directory (what a botched deploy can leave): the
    level cannot open at all; callers notice nothing."""
    a = hosts.new(levels=L1_L3)
    os.makedirs(os.path.join(a.config.disk_dir, "cache.db", "x"))
    a.set("k", 1)
    a.segment.delete("k", journal=False)
    assert a.get("k", MISSING) is MISSING
    a.set("k2", 2)
    assert a.get("k2") == 2
    assert wait_until(lambda: a.get_statistics().tiers["DISK"]["degraded"] >= 2)
    assert a.get_statistics().degraded_ops >= 2
