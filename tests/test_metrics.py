"""Metrics: Prometheus text read back with prometheus_client's parser, per-process
figures published through the segment, and totals that never go backwards while
worker processes start, finish, crash and fork.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import FORK, new_name
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shmcache import Cache, CacheConfig, CacheStatistics, Segment, unlink_segment
from shmcache.metrics import (
    Publisher,
    SegmentCollector,
    enable,
    families,
    fold_dead,
    instrument_meter,
    is_counter,
    snapshot,
)

SECRET = "metrics-SECRET-value-0451"


@pytest.fixture
def name() -> Iterator[str]:
    n = new_name("met-")
    yield n
    unlink_segment(n)


def scrape(col: SegmentCollector) -> dict[str, Any]:
    """Prometheus text of ``col``, parsed back: {family name: family}."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(col)
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, sample: str | None = None,
          **labels: str) -> float:
    """The one sample of ``family`` whose labels include ``labels``."""
    want = sample or (family + "_total" if fams[family].type == "counter" else family)
    got = [s.value for s in fams[family].samples
           if s.name == want and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (family, labels, fams[family].samples)
    return float(got[0])


WORKER = textwrap.dedent("""
    import os, signal, sys, time
    from shmcache import Cache, CacheConfig
    from shmcache.metrics import Publisher
    name, mode, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = Cache(CacheConfig(name=name, c_memory_size_mb=8))
    pub = Publisher(cache, interval=0.05).start()

    @cache.cached(ttl=300, name="work")
    def work(x):
        return x + 1

    for i in range(calls):
        work(i % 4)                      # 4 misses at most, the rest hits
    cache.get("absent-key")              # one plain miss
    if mode == "stale":
        @cache.cached(ttl=10, stale_while_revalidate=100, name="soft")
        def soft(x):
            return x
        soft(1)
        cache._clock = lambda: time.time() + 20    # the entry is now stale
        soft(1)                                    # served stale, refreshed behind
        cache._background_wait(10)
    pub.publish()                        # everything counted is now published
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "exit":
        os._exit(0)                      # no atexit: the figures stay published
    pub.stop()                           # retire: fold our figures ourselves
    cache.close()
""")


def run_worker(name: str, mode: str, calls: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WORKER, name, mode, str(calls)])


def test_prometheus_text_parses_back(name: str) -> None:
    seg = Segment.create(name, size=8 << 20, journal_bytes=64 << 10)
    try:
        w = run_worker(name, "stale", 10)
        assert w.wait(timeout=60) == 0
        fams = scrape(SegmentCollector(seg))
    finally:
        seg.close()
    assert value(fams, "shmcache_up", segment=name) == 1
    # Python-level figures of a process that has exited, from the retired totals.
    assert value(fams, "shmcache_function_hits", function="work") == 6
    assert value(fams, "shmcache_function_misses", function="work") == 4
    assert value(fams, "shmcache_function_computes", function="work") == 4
    assert value(fams, "shmcache_cache_stale_serves") == 1
    assert value(fams, "shmcache_function_stale_serves", function="soft") == 1
    assert value(fams, "shmcache_cache_stampede_waits") == 0
    assert value(fams, "shmcache_level_hits", level="L0") >= 6
    assert value(fams, "shmcache_cache_retired_processes") == 1
    assert value(fams, "shmcache_cache_processes") == 0
    # Engine figures: totals, removals by reason, memory by class, journal.
    assert value(fams, "shmcache_hits") >= 6
    assert value(fams, "shmcache_misses") >= 5
    reasons = {s.labels["reason"] for s in fams["shmcache_evictions"].samples}
    assert {"capacity", "entries", "rebalance"} <= reasons
    assert {s.labels["reason"] for s in fams["shmcache_expirations"].samples} == \
        {"read", "sweep"}
    assert value(fams, "shmcache_segment_journal_records") > 0   # nobody drains it
    assert fams["shmcache_segment_journal_dropped"].type == "counter"
    assert value(fams, "shmcache_segment_info", policy="s3fifo") == 1
    assert sum(s.value for s in fams["shmcache_class_entries"].samples) == \
        value(fams, "shmcache_segment_entries")
    assert fams["shmcache_segment_fragmentation"].type == "gauge"
    for fam in fams.values():
        assert fam.name.startswith("shmcache_")
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples)


def test_figures_of_a_running_worker_per_slot(name: str) -> None:
    with Cache(CacheConfig(name=name, c_memory_size_mb=8)) as cache:
        cache.set("k", 1)
        for _ in range(3):
            cache.get("k")
        pub = Publisher(cache, interval=60)
        pub.publish()
        mine = [s for s in cache.segment.stats().slots if s.slot == cache.segment.slot][0]
        # The collector attaches its own handle: its reads count in its own slot.
        fams = scrape(SegmentCollector(name))
        slot = str(cache.segment.slot)
        pid = str(os.getpid())
        for k in ("hits", "misses", "sets"):
            assert value(fams, f"shmcache_slot_{k}", slot=slot, pid=pid, state="live") \
                == mine.counters[k]
        assert mine.counters["hits"] >= 3
        assert value(fams, "shmcache_cache_processes") == 1
        assert value(fams, "shmcache_cache_sets") == 1
        pub.stop(retire=False)


def test_counters_stay_correct_while_workers_come_and_go(name: str) -> None:
    seg = Segment.create(name, size=8 << 20)
    col = SegmentCollector(seg)
    series = ("shmcache_hits", "shmcache_misses", "shmcache_cache_hits",
              "shmcache_cache_misses")
    seen: list[dict[str, float]] = []

    def record() -> dict[str, float]:
        fams = scrape(col)
        row = {s: value(fams, s) for s in series if s in fams}
        if "shmcache_function_hits" in fams:
            row["fn_hits"] = value(fams, "shmcache_function_hits", function="work")
            row["fn_misses"] = value(fams, "shmcache_function_misses", function="work")
        seen.append(row)
        return row

    modes = ["retire", "kill", "exit", "retire", "kill", "retire"]
    calls = 40
    try:
        for wave in (modes[:3], modes[3:]):
            procs = [run_worker(name, m, calls) for m in wave]
            while any(p.poll() is None for p in procs):   # scrape while they run
                record()
            for p, m in zip(procs, wave, strict=True):
                assert p.wait(timeout=60) == (-signal.SIGKILL if m == "kill" else 0)
            record()
        fold_dead(seg, grace=0)        # exited without retiring: fold them now
        final = record()
    finally:
        seg.close()
    for before, after in zip(seen, seen[1:], strict=False):
        for k, v in before.items():
            assert after.get(k, 0) >= v, f"{k} went backwards: {before} -> {after}"
    # Every worker published after its last call: the totals are exact.  Each calls
    # work() `calls` times (a miss or a hit, depending on who stored x first) and
    # makes one plain miss.
    n = len(modes)
    assert final["fn_hits"] + final["fn_misses"] == n * calls
    assert final["shmcache_cache_hits"] + final["shmcache_cache_misses"] == n * (calls + 1)
    assert final["fn_misses"] >= 4 and final["shmcache_cache_misses"] >= 4 + n
    fams = scrape(SegmentCollector(name))
    assert value(fams, "shmcache_cache_retired_processes") == n
    assert value(fams, "shmcache_cache_processes") == 0


def test_forked_child_publishes_only_its_own_counts(name: str) -> None:
    with Cache(CacheConfig(name=name, c_memory_size_mb=8)) as cache:
        @cache.cached(ttl=60, name="inherit")
        def f(x: int) -> int:
            return x

        for _ in range(5):
            f(1)                                  # 1 miss, 4 hits in the parent
        pub = enable(cache, interval=60)

        def child() -> None:
            # A forked child: it inherited the Cache, its counters and the publisher.
            for _ in range(3):
                f(1)                              # 3 hits of its own
            pub.stop()                            # publish and retire

        p = FORK.Process(target=child)
        p.start()
        p.join(60)
        assert p.exitcode == 0
        pub.publish()
        fn = snapshot(cache.segment)["cache"]["groups"]["functions"]["inherit"]
        assert (fn["hits"], fn["misses"]) == (4 + 3, 1)   # the parent's counted once
        pub.stop()


def test_a_process_taken_for_dead_is_not_counted_twice(name: str) -> None:
    with Cache(CacheConfig(name=name, c_memory_size_mb=8)) as cache:
        cache.set("k", 1)
        pub = Publisher(cache, interval=60)
        for _ in range(2):
            cache.get("k")
        pub.publish()
        first = pub.token
        # As if another pid namespace's reader folded us: our figures are retired.
        assert fold_dead(cache.segment, only=[first]) == 1
        for _ in range(3):
            cache.get("k")
        pub.publish()
        assert pub.token != first                 # a new epoch
        snap = snapshot(cache.segment)
        assert snap["cache"]["counters"]["hits"] == 5
        assert snap["cache"]["retired_processes"] == 1
        pub.stop()
        assert snapshot(cache.segment)["cache"]["counters"]["hits"] == 5


@dataclasses.dataclass(frozen=True, slots=True)
class LaterStatistics(CacheStatistics):
    """What a later release might add: a gauge and a counter."""

    sidecar_lag_seconds: float = 0.0
    drained: int = 0


class LaterCache(Cache):
    def get_statistics(self) -> CacheStatistics:
        s = super().get_statistics()
        return LaterStatistics(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
                               sidecar_lag_seconds=0.25, drained=7)


def test_new_statistics_fields_flow_through(name: str) -> None:
    with LaterCache(CacheConfig(name=name, c_memory_size_mb=8)) as cache:
        pub = Publisher(cache, interval=60)
        pub.publish()
        fams = scrape(SegmentCollector(name))
        assert fams["shmcache_cache_drained"].type == "counter"
        assert value(fams, "shmcache_cache_drained") == 7
        assert fams["shmcache_process_sidecar_lag_seconds"].type == "gauge"
        assert value(fams, "shmcache_process_sidecar_lag_seconds",
                     pid=str(os.getpid())) == 0.25
        # A field the engine's SegmentStats gains later is exported as it is.
        snap = snapshot(cache.segment)
        snap["stats"]["sidecar_lag_seconds"] = 1.5
        fam = {f.name: f for f in families({name: snap})}["shmcache_segment_sidecar_lag_seconds"]
        assert fam.kind == "gauge" and fam.samples == [({"segment": name}, 1.5)]
        pub.stop(retire=False)
    assert is_counter("journal_dropped", published=False)
    assert not is_counter("pages_total", published=False)
    assert not is_counter("hit_ratio", published=True)


def test_missing_and_recreated_segment(name: str) -> None:
    col = SegmentCollector(name)
    assert value(scrape(col), "shmcache_up", segment=name) == 0
    with Segment.create(name, size=8 << 20) as a:
        a.set("x", b"1")
        fams = scrape(col)
        assert value(fams, "shmcache_up") == 1 and value(fams, "shmcache_segment_entries") == 1
    unlink_segment(name)
    with Segment.create(name, size=8 << 20):
        # The name now points at a new, empty segment: the collector follows it.
        assert value(scrape(col), "shmcache_segment_entries") == 0
    col.sources[0].close()


def test_opentelemetry_meter(name: str) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with Cache(CacheConfig(name=name, c_memory_size_mb=8)) as cache:
        cache.set("k", 1)
        cache.get("k")
        Publisher(cache, interval=60).publish()
        instruments = instrument_meter(provider.get_meter("shmcache-test"), cache.segment)
        assert instruments
        data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                points[m.name] = list(m.data.data_points)
    hits = points["shmcache_hits"]
    assert hits[0].attributes["segment"] == name and hits[0].value >= 1
    assert points["shmcache_cache_hits"][0].value == 1
    provider.shutdown()


def test_publishing_and_scraping_log_no_values(name: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="shmcache")
    with Cache(CacheConfig(name=name, c_memory_size_mb=8)) as cache:
        cache.set("secret-key", SECRET)
        assert cache.get("secret-key") == SECRET
        pub = Publisher(cache, interval=60)
        pub.publish()
        fold_dead(cache.segment, only=[pub.token])   # logs at DEBUG
        text = generate_latest_text(cache.segment)
        pub.stop()
    assert any(r.name.startswith("shmcache.") for r in caplog.records)
    assert SECRET not in caplog.text and SECRET not in text


def generate_latest_text(seg: Segment) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SegmentCollector(seg))
    return generate_latest(reg).decode()


def test_publisher_thread_publishes_periodically(name: str) -> None:
    with Cache(CacheConfig(name=name, c_memory_size_mb=8)) as cache:
        pub = enable(cache, interval=0.02)
        cache.set("k", 1)
        cache.get("k")
        deadline = time.monotonic() + 10
        hits = 0
        while time.monotonic() < deadline:
            hits = snapshot(cache.segment)["cache"]["counters"].get("hits", 0)
            if hits == 1:
                break
            time.sleep(0.01)
        assert hits == 1
        pub.stop()
        assert not pub._thread or not pub._thread.is_alive()
