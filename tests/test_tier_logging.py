"""Nothing the lower levels log carries a secret or a cached value: not the HMAC
secret, not a password in the Redis URL, not a value -- through an outage, a recovery
and a refused (tampered) value, at DEBUG."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from redis_servers import (
    RedisProc,
    fx_hosts,  # noqa: F401 - fixture "hosts"
    fx_own_redis,  # noqa: F401 - fixture "own_redis"
    fx_prefix,  # noqa: F401 - fixture "prefix"
    redis_key,
    wait_until,
)

from shmcache import MISSING


def test_logs_never_carry_secrets_or_values(own_redis: RedisProc, hosts: Any,
                                            caplog: pytest.LogCaptureFixture) -> None:
    secret = "S3CRET-hmac-key-0123456789"
    password = "pa55-in-the-url"
    value = "VALUE-that-must-not-be-logged"
    r = own_redis.client()
    r.config_set("requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{own_redis.url.rsplit(':', 1)[1]}"
    caplog.set_level(logging.DEBUG, logger="shmcache")
    a = hosts.new(url=url, secret=secret)
    a.set("k", value, ttl=60)
    authed = redis.Redis.from_url(url)
    assert wait_until(lambda: authed.exists(redis_key(hosts.prefix, "k")))
    # A tampered value: refused and logged (by key), never by content.
    raw = authed.get(redis_key(hosts.prefix, "k"))
    authed.set(redis_key(hosts.prefix, "k"), raw[:-1] + bytes([raw[-1] ^ 1]))
    a.segment.delete("k", journal=False)
    assert a.get("k", MISSING) is MISSING
    assert a.get_statistics().bad_seals == 1
    # An outage and a recovery.
    own_redis.kill()
    a.segment.delete("k", journal=False)
    assert a.get("k", MISSING) is MISSING
    assert a.get_statistics().tiers["REDIS"]["down"] == 1
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "unavailable" in text and "refused" in text  # the events were logged...
    for s in (secret, password, value):
        assert s not in text                           # ...without what they carry
    assert secret not in repr(a.config) and password not in repr(a.config)
