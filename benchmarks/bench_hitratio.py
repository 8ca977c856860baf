"""Workload 4: hit ratio at a capacity of 100,000 entries on the standard traces.

Traces come from :mod:`benchmarks.traces` (``TRACES``: ``zipf0.99``, ``zipf0.7``,
``scan-mix``; 2,000,000 requests over 1,000,000 keys).  Integer keys become str keys
``k<id>``; every cache sees the identical request sequence through the same
demand-fill loop::

    v = get(k)
    if v is None:
        set(k, value)

shmcache is bounded by entry count (``max_entries=100_000``) in a segment large enough
that bytes never bind, once per policy.  The peers are bounded by their own entry
capacity.  The optimal bound is the infinite-cache ratio (only first-reference misses).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .common import (
    Table,
    fmt_pct,
    make_value,
    remove_warp_files,
    shmcache_segment,
    try_import,
    unique_name,
    verdict,
)

CAPACITY = 100_000
VALUE_SIZE = 16
POLICIES = ("s3fifo", "sieve", "lru")
DEFAULT_POLICY = "s3fifo"


def _never_called(*_args: object) -> bytes:
    raise RuntimeError("warp-cache wrapped function must not be called by the benchmark")


def replay(get: Callable[[str], Any], put: Callable[[str, bytes], Any],
           keys: list[str], value: bytes) -> int:
    """Demand-fill replay; returns the number of hits."""
    hits = 0
    for k in keys:
        if get(k) is None:
            put(k, value)
        else:
            hits += 1
    return hits


def replay_theine(cache: Any, keys: list[str], value: bytes) -> int:
    """Same loop for theine, whose get returns ``(value, found)``."""
    get, put = cache.get, cache.set
    hits = 0
    for k in keys:
        if get(k)[1]:
            hits += 1
        else:
            put(k, value)
    return hits


def run_shmcache(policy: str, keys: list[str], capacity: int, value: bytes) -> float:
    """Hit ratio of a shmcache segment with ``policy`` and ``max_entries=capacity``."""
    seg_mod, why = shmcache_segment()
    if seg_mod is None:
        raise RuntimeError(f"shmcache unavailable: {why}")
    name = unique_name(f"hr-{policy}")
    size = max(64 << 20, capacity * 1024)
    seg = seg_mod.Segment.create(name, size=size, max_entries=capacity, policy=policy)
    try:
        hits = replay(seg.get, seg.set, keys, value)
        st = seg.stats()
        if st.counters["evicted_capacity"]:
            raise RuntimeError(f"bytes bound the segment ({st.counters['evicted_capacity']} "
                               "capacity evictions): make it larger")
    finally:
        seg.close()
        seg_mod.unlink_segment(name)
    return hits / len(keys)


def run_peer(peer: str, keys: list[str], capacity: int, value: bytes) -> float:
    """Hit ratio of one peer cache of ``capacity`` entries."""
    if peer == "theine (W-TinyLFU)":
        import theine

        t: Any = theine.Cache(capacity)
        try:
            return replay_theine(t, keys, value) / len(keys)
        finally:
            t.close()
    if peer == "cachebox.LRUCache":
        import cachebox

        c: Any = cachebox.LRUCache(capacity)
        return replay(c.get, c.__setitem__, keys, value) / len(keys)
    if peer == "warp-cache shared (SIEVE)":
        from warp_cache._warp_cache_rs import SharedCachedFunction

        name = unique_name("warphr")
        w = SharedCachedFunction(_never_called, capacity, max_key_size=64,
                                 max_value_size=VALUE_SIZE + 64, shm_name=name)
        try:
            def put(k: str, v: bytes) -> None:
                w.set(v, k)

            return replay(w.get, put, keys, value) / len(keys)
        finally:
            del w
            remove_warp_files(name)
    raise ValueError(peer)


PEERS = {"theine (W-TinyLFU)": "theine", "cachebox.LRUCache": "cachebox",
         "warp-cache shared (SIEVE)": "warp_cache"}


def run(quick: bool = False) -> dict[str, Any]:
    """Run workload 4, print its table, return the numbers."""
    from .traces import TRACES, optimal_hit_ratio

    capacity = 10_000 if quick else CAPACITY
    n_req = 200_000 if quick else None
    value = make_value(VALUE_SIZE)
    results: dict[str, dict[str, float | None]] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    shm_ok = shmcache_segment()[1]
    rows = [f"shmcache {p}" + (" (default)" if p == DEFAULT_POLICY else "")
            for p in POLICIES] + list(PEERS) + ["optimal bound (infinite cache)"]
    for r in rows:
        results[r] = {}
    for tname, make in TRACES.items():
        trace = make()
        if n_req is not None:
            trace = trace[:n_req]
        keys = [f"k{i}" for i in trace.tolist()]
        results["optimal bound (infinite cache)"][tname] = float(optimal_hit_ratio(trace))
        for p in POLICIES:
            row = f"shmcache {p}" + (" (default)" if p == DEFAULT_POLICY else "")
            if shm_ok is not None:
                errors[row] = shm_ok
                results[row][tname] = None
                continue
            t0 = time.perf_counter()
            try:
                results[row][tname] = run_shmcache(p, keys, capacity, value)
            except Exception as e:  # noqa: BLE001
                errors[row] = f"{type(e).__name__}: {e}"
                results[row][tname] = None
            timings[f"{row} {tname}"] = time.perf_counter() - t0
        for peer, mod in PEERS.items():
            why = try_import(mod)[1]
            if why:
                errors[peer] = why
                results[peer][tname] = None
                continue
            t0 = time.perf_counter()
            try:
                results[peer][tname] = run_peer(peer, keys, capacity, value)
            except Exception as e:  # noqa: BLE001
                errors[peer] = f"{type(e).__name__}: {e}"
                results[peer][tname] = None
            timings[f"{peer} {tname}"] = time.perf_counter() - t0
        del keys, trace

    names = list(TRACES)
    t = Table(f"Hit ratio, capacity {capacity:,} entries (higher is better)",
              ["policy", *names])
    for r in rows:
        t.add(r, *(fmt_pct(results[r].get(n)) for n in names))
    t.notes.append(("QUICK: first 200,000 requests of each trace, capacity 10,000 - "
                    "not comparable with TARGETS" if quick else
                    "2,000,000 requests per trace over 1,000,000 keys (benchmarks/traces.py)")
                   + "; demand fill: get, and set on a miss")
    t.notes.append("theine varies by ~0.1 pt between runs (its read buffer is lossy and "
                   "picks stripes at random); every other row is deterministic")
    for r, why in errors.items():
        t.notes.append(f"{r}: not measured ({why})")
    t.print()

    default = results[rows[POLICIES.index(DEFAULT_POLICY)]]
    theine_r = results["theine (W-TinyLFU)"]
    g = Table("Hit ratio, TARGETS goal: shmcache default policy >= theine on every trace",
              ["trace", f"shmcache {DEFAULT_POLICY}", "theine", "difference (pts)", "status"])
    verdicts: dict[str, Any] = {}
    for n in names:
        a, b = default.get(n), theine_r.get(n)
        ok = None if a is None or b is None else a >= b
        diff = None if a is None or b is None else 100.0 * (a - b)
        verdicts[n] = {"shmcache": a, "theine": b, "met": ok}
        g.add(n, fmt_pct(a), fmt_pct(b), "-" if diff is None else f"{diff:+.2f}", verdict(ok))
    g.print()
    return {"hit_ratio": results, "goal": verdicts, "errors": errors,
            "capacity": capacity, "seconds": timings}
