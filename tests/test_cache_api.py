"""The key/value API of ``Cache``: semantics, serializers, config, invalidation,
statistics and warming (in one process; cross-process cases are in
test_cache_multiprocess.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmcache import (
    MISSING,
    Cache,
    CacheConfig,
    CacheLevel,
    CacheStatistics,
    Segment,
    TierNotAvailableError,
    WarmReport,
    register_serializer,
)
from shmcache.config import default_segment_name
from shmcache.serializers import COMP_MASK, COMP_SHIFT, F_ENVELOPE, SER_MASK


@pytest.fixture
def cache(segname: str) -> Iterator[Cache]:
    c = Cache(CacheConfig(name=segname, c_memory_size_mb=8))
    yield c
    c.close()


def test_get_set_distinguishes_miss_from_cached_none(cache: Cache) -> None:
    assert cache.get("k") is None
    assert cache.get("k", MISSING) is MISSING
    cache.set("k", None)
    assert cache.get("k", MISSING) is None
    assert cache.get("k", "dflt") is None
    assert "k" in cache and "other" not in cache


def test_add_delete_touch_incr_many_clear(cache: Cache) -> None:
    assert cache.add("a", 1) is True
    assert cache.add("a", 2) is False
    assert cache.get("a") == 1
    assert cache.touch("a", 60) is True
    assert cache.touch("nope", 60) is False
    assert cache.delete("a") is True
    assert cache.delete("a") is False
    assert cache.incr("n") == 1 and cache.incr("n", 4) == 5 and cache.incr("n", 0) == 5
    cache.set_many({"x": [1], "y": (2,)}, ttl=30)
    cache.set_many([("z", b"raw")])
    assert cache.get_many(["x", "y", "z", "w"]) == {"x": [1], "y": (2,), "z": b"raw"}
    cache.clear()
    assert cache.get_many(["x", "y", "z"]) == {}


def test_async_twins_share_entries_with_sync(cache: Cache) -> None:
    async def main() -> list[Any]:
        await cache.aset("k", {"a": 1}, 60)
        out = [cache.get("k"), await cache.aget("k"), await cache.aadd("k", 2)]
        cache.set("s", "sync")
        out += [await cache.aget("s"), await cache.aincr("c", 3), await cache.atouch("s", 9)]
        await cache.aset_many({"m": 1})
        out += [await cache.aget_many(["m", "none"]), await cache.adelete("m")]
        await cache.aclear()
        out.append(await cache.aget("k", MISSING))
        return out

    assert asyncio.run(main()) == [{"a": 1}, {"a": 1}, False, "sync", 3, True, {"m": 1},
                                   True, MISSING]


def test_ttl_expiry_is_a_miss(cache: Cache) -> None:
    cache.set("short", "v", ttl=0.05)
    assert cache.get("short") == "v"
    cache.segment.set_clock(time.time() + 1)  # the engine's test clock, not a sleep
    try:
        assert cache.get("short", MISSING) is MISSING
    finally:
        cache.segment.set_clock(None)


@pytest.mark.parametrize("ser,value", [("pickle", {"t": (1, 2)}), ("json", {"t": [1, 2]}),
                                       ("msgpack", {"t": [1, 2]}), ("raw", b"\x00bytes")])
def test_serializer_is_recorded_in_flags(cache: Cache, ser: str, value: Any) -> None:
    ids = {"raw": 0, "pickle": 1, "json": 2, "msgpack": 3}
    cache.set("k", value, serializer=ser)
    info = cache.segment.info("k")
    assert info is not None
    assert info.flags & SER_MASK == ids[ser]
    cache._l0.clear()  # force a decode from the segment
    assert cache.get("k") == value


def test_raw_engine_values_read_back_as_bytes(cache: Cache) -> None:
    cache.segment.set("plain", b"hello")
    assert cache.get("plain") == b"hello"


def test_custom_serializer(segname: str) -> None:
    class Upper:
        id, name = 12, "upper-test"

        def dumps(self, obj: Any) -> bytes:
            return str(obj).upper().encode()

        def loads(self, data: bytes) -> Any:
            return bytes(data).decode()

    register_serializer(Upper())
    with Cache(CacheConfig(name=segname, c_memory_size_mb=8, serializer="upper-test",
                           object_cache=False)) as c:
        c.set("k", "shout")
        assert c.get("k") == "SHOUT"


def test_compression_above_threshold_only(segname: str) -> None:
    cfg = CacheConfig(name=segname, c_memory_size_mb=8, compression="lz4",
                      compression_threshold=1000, object_cache=False)
    with Cache(cfg) as c:
        c.set("small", "x" * 10)
        c.set("big", "x" * 10_000)
        small, big = c.segment.info("small"), c.segment.info("big")
        assert small is not None and big is not None
        assert small.flags & COMP_MASK == 0
        assert (big.flags & COMP_MASK) >> COMP_SHIFT == 1 and big.value_len < 1000
        assert c.get("big") == "x" * 10_000
        c.set("off", "y" * 10_000, compression=False)
        info = c.segment.info("off")
        assert info is not None and info.flags & COMP_MASK == 0


def test_unpicklable_value_gives_clear_error(cache: Cache) -> None:
    with pytest.raises(TypeError, match="not picklable"):
        cache.set("k", lambda: 1)
    with pytest.raises(TypeError, match="JSON"):
        cache.set("k", {1, 2}, serializer="json")
    with pytest.raises(TypeError, match="raw serializer"):
        cache.set("k", "text", serializer="raw")


def test_object_cache_returns_same_object_until_version_changes(cache: Cache) -> None:
    cache.set("obj", {"a": [1]})
    cache._l0.clear()
    first = cache.get("obj")
    assert cache.get("obj") is first                  # L0 hit: no deserialization
    other = Segment.attach(cache.segment.name)       # a second handle, as another worker
    try:
        assert other.set("obj", b"replaced") > 0         # a raw write bumps the version
    finally:
        other.close()
    assert cache.get("obj") == b"replaced"


def test_copy_mode_returns_fresh_objects(segname: str) -> None:
    with Cache(CacheConfig(name=segname, c_memory_size_mb=8, object_cache=False)) as c:
        c.set("obj", {"a": [1]})
        one = c.get("obj")
        one["a"].append(2)
        assert c.get("obj") == {"a": [1]}


def test_tags_namespaces_and_events(cache: Cache) -> None:
    cache.set("u1", "alice", tags=["users", "team:1"])
    cache.set("u2", "bob", tags=["users"])
    cache.set("t", "team", tags=["team:1"])
    info = cache.segment.info("u1")
    assert info is not None and info.flags & F_ENVELOPE
    cache.invalidate_tags("team:1")
    assert cache.get_many(["u1", "u2", "t"]) == {"u2": "bob"}
    cache.set("p", 1, namespace="products")
    assert cache.get("p", namespace="products") == 1
    assert cache.get("p") is None  # the namespace is part of the key
    cache.invalidate_namespace("products")
    assert cache.get("p", MISSING, namespace="products") is MISSING
    cache.set("p", 2, namespace="products")
    assert cache.get("p", namespace="products") == 2


def test_config_from_env_and_levels(segname: str) -> None:
    cfg = CacheConfig.from_env({"SHMCACHE_NAME": segname, "SHMCACHE_SIZE_MB": "4",
                                "SHMCACHE_SERIALIZER": "json", "SHMCACHE_COMPRESSION": "0",
                                "SHMCACHE_DEFAULT_TTL": "30", "SHMCACHE_OBJECT_CACHE": "no",
                                "SHMCACHE_UNRELATED": "x"})
    assert (cfg.name, cfg.size_bytes, cfg.serializer, cfg.compression, cfg.default_ttl,
            cfg.object_cache) == (segname, 4 << 20, "json", False, 30.0, False)
    with pytest.raises(ValueError, match="SHMCACHE_SIZE_MB"):
        CacheConfig.from_env({"SHMCACHE_SIZE_MB": "lots"})
    levels = CacheConfig.from_env({"SHMCACHE_LEVELS": "c_memory,redis"}).levels
    assert levels == (CacheLevel.C_MEMORY, CacheLevel.REDIS)
    # A level without its address, or pickles shared through Redis without a secret,
    # is refused before anything is created.
    with pytest.raises(TierNotAvailableError, match="redis_url"):
        Cache(CacheConfig(name=segname, levels=[CacheLevel.C_MEMORY, CacheLevel.REDIS]))
    with pytest.raises(TierNotAvailableError, match="without a secret"):
        Cache(CacheConfig(name=segname, levels=[CacheLevel.C_MEMORY, CacheLevel.REDIS],
                          redis_url="redis://127.0.0.1:1/0"))
    with pytest.raises(TierNotAvailableError, match="redis_cluster_nodes"):
        Cache(CacheConfig(name=segname, levels=[CacheLevel.C_MEMORY,
                                                CacheLevel.DISTRIBUTED], secret="s" * 16))
    assert "hunter2" not in repr(CacheConfig(secret="hunter2" * 3,
                                             redis_url="redis://u:hunter2@h/0"))
    assert isinstance(TierNotAvailableError("x"), ValueError)
    name = default_segment_name("my app")
    assert name == f"shmcache-my_app-{os.getuid()}"


def test_environment_configures_default_cache(segname: str, monkeypatch: Any) -> None:
    monkeypatch.setenv("SHMCACHE_NAME", segname)
    monkeypatch.setenv("SHMCACHE_SIZE_MB", "4")
    with Cache() as c:
        assert c.segment.name == segname
        assert c.get_statistics().memory_limit_mb == 4.0


def test_statistics(cache: Cache) -> None:
    cache.set("a", 1)
    cache._l0.clear()
    cache.get("a")          # L1 hit
    cache.get("a")          # L0 hit
    cache.get("missing")    # miss

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        return x

    f(1)
    f(1)
    s = cache.get_statistics()
    assert isinstance(s, CacheStatistics)
    assert (s.hits, s.misses) == (3, 2)
    assert s.levels["L0"].hits == 2 and s.levels["C_MEMORY"].hits == 1
    assert s.entries >= 2 and s.memory_usage_mb > 0 and s.evictions == 0
    assert s.ops_per_second > 0
    fs = s.functions[f"{__name__}.test_statistics.<locals>.f"]
    assert (fs.hits, fs.misses, fs.computes) == (1, 1, 1)


def test_warm_skips_present_reports_failures(cache: Cache,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cache.set("present", "old")

    def boom() -> int:
        raise RuntimeError("loader failed")

    items = [("present", lambda: "new"), ("a", lambda: 1), ("b", boom), ("c", lambda: 3)]
    r = cache.warm(items, concurrency=2, progress=True)
    assert sorted(r.loaded) == ["a", "c"] and r.skipped == ["present"]
    assert list(r.failed) == ["b"] and isinstance(r.failed["b"], RuntimeError)
    assert cache.get("present") == "old"
    r = cache.warm(items, force=True)
    assert cache.get("present") == "new" and "present" in r.loaded
    err = capsys.readouterr().err
    assert "warm" in err  # tqdm's bar or the plain stderr line


def test_warm_awaited_in_a_coroutine_and_sync_elsewhere(cache: Cache) -> None:
    async def load(n: int) -> int:
        await asyncio.sleep(0)
        return n

    async def main() -> tuple[Any, Any]:
        pending = cache.warm([("w1", lambda: 1), ("w2", lambda: load(2))])
        assert asyncio.iscoroutine(pending)      # a running loop here: an awaitable
        r1 = await pending
        # Sync code on a loop's thread runs warm in an executor (no loop there).
        loop = asyncio.get_running_loop()
        r2 = await loop.run_in_executor(None, lambda: cache.warm([("w3", lambda: 3)]))
        return r1, r2

    r1, r2 = asyncio.run(main())
    assert isinstance(r1, WarmReport) and sorted(r1.loaded) == ["w1", "w2"] and r1.ok
    assert isinstance(r2, WarmReport) and r2.loaded == ["w3"]
    r3 = cache.warm([("w1", lambda: 9), ("w4", lambda: 4)])  # no loop: the report
    assert isinstance(r3, WarmReport)
    assert r3.loaded == ["w4"] and r3.skipped == ["w1"]
    assert cache.get_many(["w1", "w2", "w3", "w4"]) == {"w1": 1, "w2": 2, "w3": 3, "w4": 4}


def test_awarm_with_async_loaders(cache: Cache) -> None:
    async def load(n: int) -> int:
        await asyncio.sleep(0)
        return n

    async def main() -> Any:
        return await cache.awarm([(f"k{i}", lambda i=i: load(i)) for i in range(10)]
                                 + [("sync", lambda: "s")], concurrency=3)

    r = asyncio.run(main())
    assert len(r.loaded) == 11 and r.ok
    assert cache.get_many(["k3", "sync"]) == {"k3": 3, "sync": "s"}


def test_threads_and_event_loop_together(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> int:
        cache.incr(f"computes:{x}")
        return x * 2

    @cache.cached(ttl=60, key_builder=lambda x: f.key(x))
    async def af(x: int) -> int:
        cache.incr(f"computes:{x}")
        return x * 2

    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def worker() -> None:
        try:
            start.wait(10)
            for i in range(200):
                assert f(i % 20) == (i % 20) * 2
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def loop_worker() -> None:
        async def main() -> None:
            start.wait(10)
            for i in range(200):
                assert await af(i % 20) == (i % 20) * 2

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    threads.append(threading.Thread(target=loop_worker))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(cache.incr(f"computes:{x}", 0) == 1 for x in range(20))


# -- regressions -------------------------------------------------------------------------


def test_set_does_not_keep_the_callers_object(cache: Cache, segname: str) -> None:
    other = Cache(CacheConfig(name=segname, c_memory_size_mb=8))
    try:
        cache.set("t", (1, 2), serializer="json")
        assert cache.get("t") == other.get("t") == [1, 2]  # what every process sees
        d = {"a": 1}
        cache.set("d", d)
        d["a"] = 999  # mutating the caller's object afterwards changes nothing cached
        assert cache.get("d") == other.get("d") == {"a": 1}
        cache.set_many({"m": [1]})
        got = cache.get("m")
        assert got == [1] and cache.get("m") is got  # decoded once, then served from L0
        e: list[int] = []
        assert cache.add("e", e) and cache.get("e") is not e
    finally:
        other.close()


def test_undecodable_entries_are_logged_dropped_misses(cache: Cache, monkeypatch: Any,
                                                       caplog: pytest.LogCaptureFixture,
                                                       ) -> None:
    import logging

    from shmcache import serializers
    caplog.set_level(logging.WARNING, logger="shmcache.cache")
    cache.segment.set("unknown-ser", b"s3cr3t", flags=0x000E)  # no serializer 14 here
    for _ in range(2):
        assert cache.get("unknown-ser", MISSING) is MISSING
    assert "unknown-ser" not in cache  # dropped, so a recompute can replace it
    cache.set("lz", "x" * 10_000, compression="lz4")
    cache._l0.clear()
    monkeypatch.setitem(serializers._CODECS, 1, None)  # this reader has no lz4
    assert cache.get("lz", "dflt") == "dflt"
    st = cache.get_statistics()
    assert st.decode_errors == 2 and st.misses == 3
    recs = [r for r in caplog.records if r.name == "shmcache.cache"]
    assert len(recs) == 2 and "ValueError" in recs[0].getMessage()
    assert "ImportError" in recs[1].getMessage() and "lz4" in recs[1].getMessage()
    assert not any("s3cr3t" in r.getMessage() or "xxxx" in r.getMessage() for r in recs)

    @cache.cached(ttl=60, key_builder=lambda: "unknown-ser")
    def recompute() -> str:
        return "fresh"

    cache.segment.set("unknown-ser", b"s3cr3t", flags=0x000E)
    assert recompute() == "fresh" and recompute() == "fresh"
    assert cache.get_statistics().functions[recompute._stats_name].computes == 1


def test_warm_reloads_tag_invalidated_stale_and_negative_entries(cache: Cache) -> None:
    from shmcache.serializers import get_serializer
    cache.set("tagged", "old", tags=["T"])
    cache.invalidate_tags("T")
    assert cache.contains("tagged") and cache.get("tagged", MISSING) is MISSING
    # A stale entry (its soft expiry is long past, the engine keeps it 60 s more).
    data, flags = cache._encode("old", get_serializer("pickle"), None, (1, (), False))
    cache.segment.set("stale", data, 60, flags=flags)
    cache.set("fresh", "old")
    r = cache.warm([("tagged", lambda: "new"), ("stale", lambda: "new"),
                    ("fresh", lambda: "new")])
    assert sorted(r.loaded) == ["stale", "tagged"] and r.skipped == ["fresh"]
    assert cache.get("tagged") == cache.get("stale") == "new"
    assert cache.get("fresh") == "old"
    cache.set("tagged2", "old", tags=["T"])
    cache.invalidate_tags("T")
    cache._store("negative", KeyError("x"), 60, negative=True, ser=get_serializer("pickle"))
    assert cache.contains("negative") and cache.get("negative", MISSING) is MISSING
    r = asyncio.run(cache.awarm([("tagged2", lambda: "newer"), ("negative", lambda: 1),
                                 ("fresh", lambda: "newer")]))
    assert sorted(r.loaded) == ["negative", "tagged2"] and r.skipped == ["fresh"]
    assert cache.get("tagged2") == "newer" and cache.get("negative") == 1


def test_bytes_keys_round_trip(cache: Cache) -> None:
    for k in (b"\xff\xfe", b"\x80" * 400, b"caf\xc3\xa9"):
        cache.set(k, k)
        assert cache.get(k) == k and k in cache
        cache.set(k, "ns", namespace="n")
        assert cache.get(k, namespace="n") == "ns"
        assert cache.delete(k) is True and cache.get(k, MISSING) is MISSING
    cache.set(b"plain", 1)
    assert cache.get("plain") == 1  # UTF-8 bytes and their str are one key
    assert cache.get(b"\xff", MISSING) is MISSING and cache.get("\xff", MISSING) is MISSING


def test_touch_without_ttl_needs_a_default(segname: str) -> None:
    with Cache(CacheConfig(name=segname, c_memory_size_mb=8)) as c:
        c.set("k", 1, ttl=100)
        with pytest.raises(ValueError, match="default_ttl"):
            c.touch("k")
        info = c.segment.info("k")
        assert info is not None and info.expires_at is not None  # still expires
        assert c.touch("k", None) is True
        info = c.segment.info("k")
        assert info is not None and info.expires_at is None  # explicitly immortal
    with Cache(CacheConfig(name=segname, c_memory_size_mb=8, default_ttl=50)) as c:
        c.set("k", 1, ttl=None)
        assert c.touch("k") is True
        info = c.segment.info("k")
        assert info is not None and info.expires_at is not None


def test_small_api_edges() -> None:
    assert str(MISSING) == repr(MISSING) == "MISSING"
    for var in ("SHMCACHE_LEASE_TTL", "SHMCACHE_WAIT_TIMEOUT"):
        with pytest.raises(ValueError, match=var):
            CacheConfig.from_env({var: "none"})
    assert CacheConfig.from_env({"SHMCACHE_DEFAULT_TTL": "none"}).default_ttl is None


def test_existing_segment_with_other_settings_is_used_and_warned_about(
        segname: str, caplog: pytest.LogCaptureFixture) -> None:
    with Cache(CacheConfig(name=segname, c_memory_size_mb=4)) as first:
        with caplog.at_level("WARNING", logger="shmcache.cache"):
            with Cache(CacheConfig(name=segname, c_memory_size_mb=4)):
                pass
            assert not caplog.records
            with Cache(CacheConfig(name=segname, c_memory_size_mb=8, policy="lru")) as c:
                assert c.segment.config()["size"] == 4 << 20  # the layout is fixed
        assert "size 4194304 (asked 8388608)" in caplog.text and "policy" in caplog.text
        first.set("k", 1)


def test_configuration_errors_name_what_is_wrong() -> None:
    with pytest.raises(TierNotAvailableError, match="'h:x': not host:port"):
        CacheConfig(levels=[CacheLevel.C_MEMORY, CacheLevel.DISTRIBUTED],
                    redis_cluster_nodes=["h:x"], secret="s" * 16).check_levels()
    with pytest.raises(ValueError, match="redis_options cannot be set from the environment"):
        CacheConfig.from_env({"SHMCACHE_REDIS_OPTIONS": "{}"})
