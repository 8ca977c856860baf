"""A sidecar whose round fails (an injected engine error) logs it, keeps the lead and
goes on: a sidecar that stopped while holding the lock would leave the host without
one, since the standbys wait for that lock."""

from __future__ import annotations

from typing import Any

from redis_servers import (
    RedisProc,
    fx_hosts,  # noqa: F401 - fixture "hosts"
    fx_prefix,  # noqa: F401 - fixture "prefix"
    fx_redis_server,  # noqa: F401 - fixture "redis_server"
    redis_key,
    wait_until,
)

from shmcache import ShmCacheError


def test_a_failing_round_is_retried_and_the_lead_kept(redis_server: RedisProc,
                                                      hosts: Any) -> None:
    a = hosts.new(url=redis_server.url)
    sc = a._sidecar
    assert sc is not None and sc.is_leader
    real = a.segment.journal_drain
    failures = [0]

    def flaky(*args: Any, **kw: Any) -> Any:
        if failures[0] < 2:
            failures[0] += 1
            raise ShmCacheError("injected: the journal could not be read")
        return real(*args, **kw)

    a.segment.journal_drain = flaky  # type: ignore[method-assign]
    a.set("k", "v", ttl=60)
    r = redis_server.client()
    assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "k")), 15)
    assert failures[0] == 2 and sc.stats()["errors"] == 2
    assert sc.is_leader and sc._thread is not None and sc._thread.is_alive()
