"""What a review of the lower levels found, pinned down: Redis refusing writes (OOM)
keeps them pending instead of counting them done; a value that cannot be sealed does
not stall the sidecar; invalidation messages without the secret are ignored; a planted
symbolic link is not taken for the lock or disk directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from redis_servers import (
    RedisProc,
    fx_hosts,  # noqa: F401 - fixture "hosts"
    fx_own_redis,  # noqa: F401 - fixture "own_redis"
    fx_prefix,  # noqa: F401 - fixture "prefix"
    fx_redis_server,  # noqa: F401 - fixture "redis_server"
    is_subscribed,
    redis_key,
    wait_until,
)

from shmcache.tiers import ensure_private_dir


def test_writes_redis_refuses_stay_pending_and_arrive_later(own_redis: RedisProc,
                                                            hosts: Any) -> None:
    a = hosts.new(url=own_redis.url)
    r = own_redis.client()
    r.config_set("maxmemory", 1)                 # every write now answers -OOM
    r.config_set("maxmemory-policy", "noeviction")
    a.set("k", "v", ttl=60)
    assert a._sidecar is not None
    assert wait_until(lambda: a._sidecar.stats()["pending"] == 1
                      and a.get_statistics().tiers["REDIS"]["failures"] >= 1)
    assert not r.exists(redis_key(hosts.prefix, "k"))
    r.config_set("maxmemory", 0)                 # room again: the retry delivers it
    assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "k")), 15)
    assert a.get_statistics().tiers["REDIS"]["bad_seals"] == 0


def test_a_value_that_cannot_be_sealed_does_not_stall_the_sidecar(
        redis_server: RedisProc, hosts: Any) -> None:
    a = hosts.new(url=redis_server.url, secret=None, allow_unsigned=True,
                  serializer="json")
    r = redis_server.client()
    a.set("pickled", {1, 2}, serializer="pickle")   # no secret: must not go to Redis
    a.set("plain", [1, 2])
    assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "plain")), 15)
    assert a._sidecar is not None and a._sidecar.stats()["seal_errors"] == 1
    blob = r.get(redis_key(hosts.prefix, "pickled"))
    assert blob is None or blob[19:20] == b"T"       # at most a tombstone
    assert a.get("pickled") == {1, 2}                 # still served from L1


def test_forged_invalidations_are_ignored(redis_server: RedisProc, hosts: Any) -> None:
    from shmcache.levels import encode_invalidation
    from shmcache.sealing import Sealer

    a = hosts.new(url=redis_server.url)
    r = redis_server.client()
    assert wait_until(lambda: is_subscribed(r, hosts.prefix, 1))
    a.set("k", 1)
    forged = encode_invalidation(Sealer("another secret entirely"), b"f" * 16, [b"k"],
                                 clear=True)
    unsigned = encode_invalidation(Sealer(None, allow_unsigned=True), b"f" * 16, [b"k"])
    for msg in (forged, unsigned, b"SCI1" + b"f" * 16 + b"D\x01\x00k"):
        assert r.publish(hosts.prefix + "invalidate", msg) == 1
    assert a._sidecar is not None
    assert wait_until(lambda: a._sidecar.stats()["received"] >= 3)
    assert a.segment.contains("k") and a._sidecar.stats()["applied"] == 0


def test_a_planted_symlink_is_not_used_as_a_private_directory(tmp_path: Path) -> None:
    target = tmp_path / "someone-elses"
    target.mkdir(mode=0o755)
    link = tmp_path / "shmcache-link"
    os.symlink(target, link)
    with pytest.raises(PermissionError, match="not a plain directory"):
        ensure_private_dir(str(link))
    assert (target.stat().st_mode & 0o777) == 0o755   # not chmod-ed through the link
