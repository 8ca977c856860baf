"""L2 on a real Redis Cluster (3 masters, 3 replicas, ``redis-cli --cluster create``):
values spread over the masters, cross-host invalidation over sharded pub/sub, and a
master killed with SIGKILL -- after the replica is promoted, keys are served again and
writes resume.  The failover test runs last: it leaves one node dead.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis_servers import (
    Hosts,
    RedisClusterProcs,
    fx_hosts,  # noqa: F401 - fixture "hosts"
    fx_prefix,  # noqa: F401 - fixture "prefix"
    fx_redis_cluster,  # noqa: F401 - fixture "redis_cluster"
    requires_redis,
    wait_until,
)

from shmcache import MISSING, Cache, CacheLevel

pytestmark = [requires_redis, pytest.mark.slow]

DISTRIBUTED = (CacheLevel.C_MEMORY, CacheLevel.DISTRIBUTED)
KEYS = [f"user:{i}" for i in range(60)]


def cluster_client(cl: RedisClusterProcs) -> Any:
    from redis.cluster import ClusterNode, RedisCluster
    nodes = [ClusterNode("127.0.0.1", n.port)  # type: ignore[no-untyped-call]
             for n in cl.live()]
    return RedisCluster(startup_nodes=nodes, socket_timeout=2.0)


def _host(hosts: Hosts, cl: RedisClusterProcs, **kw: Any) -> Cache:
    return hosts.new(levels=DISTRIBUTED, redis_cluster_nodes=cl.seeds, **kw)


def _listening(cl: RedisClusterProcs, prefix: str, n: int) -> bool:
    """``n`` sidecars subscribed (SSUBSCRIBE) on the channel's shard."""
    ch = (prefix + "invalidate").encode()
    try:
        node = cl.node_of(ch)
        c = node.client(timeout=1.0)
        try:
            res = c.execute_command("PUBSUB", "SHARDNUMSUB", ch)
        finally:
            c.close()
        return int(res[1]) >= n
    except Exception:  # noqa: BLE001 - mid-failover
        return False


def test_values_spread_over_the_masters_and_hosts_share_them(
        redis_cluster: RedisClusterProcs, hosts: Hosts) -> None:
    a = _host(hosts, redis_cluster)
    b = _host(hosts, redis_cluster)
    for i, k in enumerate(KEYS):
        a.set(k, {"id": i}, ttl=600)
    rc = cluster_client(redis_cluster)
    try:
        assert wait_until(lambda: all(rc.exists(hosts.prefix + k) for k in KEYS))
        owners = {redis_cluster.node_of((hosts.prefix + k).encode()).port for k in KEYS}
        assert len(owners) == 3  # 60 keys land on every master
    finally:
        rc.close()
    for i, k in enumerate(KEYS):
        assert b.get(k) == {"id": i}
    assert b.get_statistics().tiers["REDIS"]["hits"] == len(KEYS)


def test_invalidation_between_hosts_over_sharded_pubsub(
        redis_cluster: RedisClusterProcs, hosts: Hosts) -> None:
    a = _host(hosts, redis_cluster)
    b = _host(hosts, redis_cluster)
    assert wait_until(lambda: _listening(redis_cluster, hosts.prefix, 2))
    a.set("cfg", "v1")
    a.set("gone", 1)
    assert wait_until(lambda: b.get("cfg") == "v1" and b.get("gone") == 1)
    a.set("cfg", "v2")
    a.delete("gone")
    assert wait_until(lambda: b.get("cfg") == "v2")
    assert wait_until(lambda: not b.segment.contains("gone"))
    assert b.get("gone", MISSING) is MISSING
    b.invalidate_tags("never-used")  # a write from b reaches a's side as well
    b.set("from-b", "hello")
    assert wait_until(lambda: a.get("from-b") == "hello")


def test_a_killed_master_fails_over_and_service_resumes(
        redis_cluster: RedisClusterProcs, hosts: Hosts) -> None:
    a = _host(hosts, redis_cluster, redis_timeout=0.5)
    assert wait_until(lambda: _listening(redis_cluster, hosts.prefix, 1))
    for i, k in enumerate(KEYS):
        a.set(k, i, ttl=600)
    rc = cluster_client(redis_cluster)
    try:
        assert wait_until(lambda: all(rc.exists(hosts.prefix + k) for k in KEYS))
    finally:
        rc.close()
    # The victim also carries the invalidation channel's shard: a's subscriber has to
    # find the promoted replica.
    victim = redis_cluster.node_of((hosts.prefix + "invalidate").encode())
    replica = redis_cluster.replica_of(victim)
    on_victim = [k for k in KEYS
                 if redis_cluster.node_of((hosts.prefix + k).encode()) is victim]
    # The replica must hold them before its master dies (replication is async).
    rep = replica.client(timeout=1.0)
    try:
        rep.execute_command("READONLY")
        assert wait_until(lambda: all(rep.exists(hosts.prefix + k) for k in on_victim))
    finally:
        rep.close()

    victim.kill()
    errors: list[BaseException] = []

    def served() -> bool:
        try:
            return a.get("probe", MISSING) is MISSING and \
                redis_cluster.all_ok() and replica in redis_cluster.masters()
        except BaseException as e:  # noqa: BLE001 - counted
            errors.append(e)
            return False

    assert wait_until(served, 30, 0.05)
    assert errors == []

    # Keys are served again, from the promoted replica, to a host that never had them.
    b = _host(hosts, redis_cluster)
    assert wait_until(lambda: all(b.get(k) == i for i, k in enumerate(KEYS)), 20)
    assert b.get_statistics().bad_seals == 0
    # Writes resume, on the slots that moved as well.
    for i, k in enumerate(on_victim):
        a.set(k, -i, ttl=600)
    c = _host(hosts, redis_cluster)
    assert wait_until(lambda: all(c.get(k) == -i for i, k in enumerate(on_victim)), 20)
    # Invalidations flow again: every sidecar subscribed on the channel's new shard.
    assert wait_until(lambda: _listening(redis_cluster, hosts.prefix, 3), 20)
    # (A subscriber that reconnected while the topology settled resyncs, dropping c's
    # shared L1 entries: read the key back into c's L1 first.)
    assert wait_until(lambda: c.get(on_victim[0]) == 0 and c.segment.contains(on_victim[0]))
    a.delete(on_victim[0])
    assert wait_until(lambda: not c.segment.contains(on_victim[0]), 10)
    assert wait_until(lambda: c.get(on_victim[0], MISSING) is MISSING, 10)
