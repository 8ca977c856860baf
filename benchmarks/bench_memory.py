"""Workload 3: memory per entry, 1,000,000 entries of 100 B values with 12 B keys.

Reported as *overhead*: bytes per entry beyond the 112 B of key + value, every kind of
metadata included (index, headers, allocator waste, the interpreter's object headers for
in-process caches).

shmcache (black box, then the engine's own accounting):

1. ``S_min``: the smallest segment (binary search to 0.5%) into which all N entries fit
   with no eviction and no failed set, default configuration.  ``S_min / N - 112`` is
   the tightest possible figure (a 100% full segment).
2. A segment of ``S_min / 0.9`` bytes (so the N entries fill it to ~90%) is filled and
   its ``stats()`` read: ``fill = (size_bytes - free) / size_bytes`` where ``free`` is
   the bytes not holding any entry (free chunks in slab pages + free pages).  The
   overhead at that fill is ``size_bytes * fill / N - 112``: it counts the whole
   header, slot table and index, however large, plus all slab waste.

Peers, measured in a fresh spawned interpreter each:

* dict, cachebox, theine: RSS delta of inserting N entries (distinct key and value
  objects built in the loop, no key list kept); dict also by ``tracemalloc`` (in its own
  child: tracemalloc's per-allocation records would inflate the RSS figure).
* redis: ``INFO memory`` ``used_memory`` delta / N.
* diskcache (tmpfs): allocated bytes of its directory after ``close()`` / entries
  (a smaller N: sqlite inserts are slow; the per-entry figure is what matters).
* warp-cache shared: allocated bytes of its ``.data`` file after filling a cache of
  exactly N slots with the smallest ``max_key_size`` / ``max_value_size`` that accept
  these keys and values (fixed-size slots: warp-cache reserves them up front).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from typing import Any

from .common import (
    Table,
    dir_bytes,
    fmt_num,
    redis_available,
    redis_server,
    remove_warp_files,
    rss_bytes,
    shmcache_segment,
    tmpfs_dir,
    try_import,
    unique_name,
    verdict,
)

KEY_LEN = 12
VALUE_LEN = 100
RAW = KEY_LEN + VALUE_LEN
GOAL = 64.0
QUOTED = {"redis": 72, "diskcache": 95, "warp-cache shared": 130, "dict": 128,
          "cachebox": 180, "theine": 435}
_BASE = bytes(range(33, 127)) * 3


def key_of(i: int) -> str:
    """The i-th 12-byte key, ``user:0000042``."""
    return f"user:{i:07d}"


def value_of(i: int) -> bytes:
    """A distinct 100-byte value object (a fresh slice each call)."""
    j = i % 97
    return _BASE[j:j + VALUE_LEN]


# -- shmcache ------------------------------------------------------------------------------


def _shm_fill(seg_mod: Any, size: int, n: int) -> tuple[bool, Any]:
    """Create a segment of ``size`` bytes, insert n entries; (all fit?, stats)."""
    name = unique_name("mem")
    try:
        seg = seg_mod.Segment.create(name, size=size)
    except Exception:  # noqa: BLE001 - too small to even create
        seg_mod.unlink_segment(name)
        return False, None
    try:
        s = seg.set
        for i in range(n):
            try:
                s(key_of(i), value_of(i))
            except Exception:  # noqa: BLE001 - SegmentFullError etc.: does not fit
                return False, seg.stats()
        st = seg.stats()
        ok = st.entries == n and st.evictions == 0 and st.counters["set_failures"] == 0
        return ok, st
    finally:
        seg.close()
        seg_mod.unlink_segment(name)


def _free_bytes(st: Any) -> int:
    """Bytes of the data area able to take a new entry.  The engine's ``free_bytes`` is
    exactly that: free chunks of every size class (inside their pages) plus free pages
    times the page size (native/stats.c)."""
    return int(st.free_bytes)


def measure_shmcache(n: int) -> dict[str, Any]:
    """S_min search and the 90%-fill reading (see module docstring)."""
    seg_mod, why = shmcache_segment()
    if seg_mod is None:
        raise RuntimeError(f"shmcache unavailable: {why}")
    lo, hi = n * RAW, n * 512
    ok, _ = _shm_fill(seg_mod, hi, n)
    if not ok:
        raise RuntimeError(f"{n} entries do not fit even in {hi} bytes")
    while hi - lo > hi * 0.005:
        mid = (lo + hi) // 2
        ok, _ = _shm_fill(seg_mod, mid, n)
        if ok:
            hi = mid
        else:
            lo = mid
    s_min = hi
    size90 = int(s_min / 0.9)
    ok, st = _shm_fill(seg_mod, size90, n)
    if not ok:
        raise RuntimeError("entries did not fit in S_min/0.9")
    free = _free_bytes(st)
    fill = (st.size_bytes - free) / st.size_bytes
    return {
        "entries": n,
        "s_min_bytes": s_min,
        "overhead_at_100pct": s_min / n - RAW,
        "size90_bytes": st.size_bytes,
        "fill": fill,
        "overhead": st.size_bytes * fill / n - RAW,
        "index_buckets": st.index_buckets,
        "data_bytes": st.data_bytes,
        "used_bytes": st.used_bytes,
        "payload_bytes": st.payload_bytes,
        "free_bytes": st.free_bytes,
        "pages_free": st.pages_free,
        "page_bytes": st.page_bytes,
        "fragmentation": st.fragmentation,
        "classes": [(c.chunk_bytes, c.pages, c.entries) for c in st.classes if c.entries],
    }


# -- in-process peers (run in a fresh interpreter) ---------------------------------------


def _child_inprocess(kind: str, n: int) -> dict[str, float]:
    """Runs in a spawned child: RSS (and tracemalloc for dict) delta of N entries."""
    import gc

    gc.collect()
    out: dict[str, float] = {}
    if kind == "dict-tracemalloc":
        import tracemalloc

        tracemalloc.start()
        base_t = tracemalloc.get_traced_memory()[0]
        r0 = rss_bytes()
        d: dict[str, bytes] = {}
        for i in range(n):
            d[key_of(i)] = value_of(i)
        out["tracemalloc"] = (tracemalloc.get_traced_memory()[0] - base_t) / n
        tracemalloc.stop()
        return out
    r0 = rss_bytes()
    if kind == "dict":
        d = {}
        for i in range(n):
            d[key_of(i)] = value_of(i)
    elif kind == "cachebox":
        import cachebox

        c: Any = cachebox.LRUCache(n)
        for i in range(n):
            c[key_of(i)] = value_of(i)
        assert len(c) == n
    elif kind == "theine":
        import theine

        t: Any = theine.Cache(n)
        s = t.set
        for i in range(n):
            s(key_of(i), value_of(i))
        t._force_drain_write()
        out["len"] = float(len(t))
    else:
        raise ValueError(kind)
    out["rss"] = (rss_bytes() - r0) / n
    return out


def measure_inprocess(kind: str, n: int) -> dict[str, float]:
    """Per-entry bytes of an in-process cache, measured in a fresh interpreter."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child_inprocess, (kind, n))


def measure_redis(n: int) -> dict[str, float]:
    """``used_memory`` delta per entry of a private redis-server."""
    with redis_server() as srv:
        r = srv.client()
        m0 = int(r.info("memory")["used_memory"])
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.set(key_of(i), value_of(i))
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        m1 = int(r.info("memory")["used_memory"])
        assert r.dbsize() == n
        r.close()
    return {"used_memory": (m1 - m0) / n}


def measure_diskcache(n: int) -> dict[str, float]:
    """Directory bytes per entry of a diskcache on tmpfs."""
    import diskcache  # type: ignore[import-untyped]

    with tmpfs_dir("dcmem") as d:
        dc = diskcache.Cache(d, size_limit=1 << 40)
        empty = dir_bytes(d)
        with dc.transact():
            for i in range(n):
                dc.set(key_of(i), value_of(i))
        dc.close()
        return {"dir_bytes": (dir_bytes(d) - empty) / n}


def _never_called(*_args: object) -> bytes:
    raise RuntimeError("never called")


def _warp_smallest_slots() -> tuple[int, int]:
    """The smallest (max_key_size, max_value_size) warp-cache accepts for our items."""
    from warp_cache._warp_cache_rs import SharedCachedFunction

    def fits(ks: int, vs: int) -> bool:
        name = unique_name("warpprobe")
        try:
            w = SharedCachedFunction(_never_called, 16, max_key_size=ks, max_value_size=vs,
                                     shm_name=name)
            w.set(value_of(0), key_of(0))
            ok = w.get(key_of(0)) is not None
            del w
            return ok
        finally:
            remove_warp_files(name)

    ks = next(k for k in range(KEY_LEN, 256) if fits(k, 4096))
    vs = next(v for v in range(VALUE_LEN, 4096) if fits(ks, v))
    return ks, vs


def measure_warp(n: int) -> dict[str, float]:
    """Allocated bytes per entry of warp-cache's shared data file, N slots all full."""
    from warp_cache._warp_cache_rs import SharedCachedFunction

    ks, vs = _warp_smallest_slots()
    name = unique_name("warpmem")
    try:
        w = SharedCachedFunction(_never_called, n, max_key_size=ks, max_value_size=vs,
                                 shm_name=name)
        s = w.set
        for i in range(n):
            s(value_of(i), key_of(i))
        info = w.cache_info()
        files = [os.path.join("/dev/shm", name + x) for x in (".data", ".lock")]
        total = sum(os.stat(f).st_blocks * 512 for f in files if os.path.exists(f))
        del w
        return {"file_bytes": total / n, "entries_kept": float(info.current_size),
                "max_key_size": float(ks), "max_value_size": float(vs)}
    finally:
        remove_warp_files(name)


def run(quick: bool = False) -> dict[str, Any]:
    """Run workload 3, print its table, return the numbers."""
    n = 100_000 if quick else 1_000_000
    n_disk = 20_000 if quick else 200_000
    rows: list[tuple[str, float | None, str]] = []
    raw: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def attempt(label: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one broken peer must not end the run
            errors[label] = f"{type(e).__name__}: {e}"
            return None

    shm = attempt("shmcache", lambda: measure_shmcache(n))
    raw["shmcache"] = shm
    if shm:
        rows.append(("shmcache, ~90% fill (stats)", shm["overhead"],
                     f"size {shm['size90_bytes']:,} B x fill {shm['fill']:.3f} / {n:,} - 112"))
        rows.append(("shmcache, tightest segment", shm["overhead_at_100pct"],
                     f"S_min {shm['s_min_bytes']:,} B / {n:,} - 112 (binary search, 0.5%)"))
    if redis_available():
        r = attempt("redis", lambda: measure_redis(n))
        raw["redis"] = r
        if r:
            rows.append(("redis", r["used_memory"] - RAW, "INFO used_memory delta / N - 112"))
    if try_import("diskcache")[1] is None:
        d = attempt("diskcache", lambda: measure_diskcache(n_disk))
        raw["diskcache"] = d
        if d:
            rows.append(("diskcache tmpfs", d["dir_bytes"] - RAW,
                         f"directory bytes / N - 112 (N = {n_disk:,})"))
    if try_import("warp_cache")[1] is None:
        w = attempt("warp-cache shared", lambda: measure_warp(n))
        raw["warp-cache shared"] = w
        if w:
            rows.append(("warp-cache shared", w["file_bytes"] - RAW,
                         f"shm files / N - 112 (slots: key {int(w['max_key_size'])} B, "
                         f"value {int(w['max_value_size'])} B)"))
    dct = attempt("dict", lambda: measure_inprocess("dict-tracemalloc", n))
    raw["dict"] = dct
    if dct:
        rows.append(("dict", dct["tracemalloc"] - RAW, "tracemalloc delta / N - 112"))
    dct_rss = attempt("dict (RSS)", lambda: measure_inprocess("dict", n))
    raw["dict (RSS)"] = dct_rss
    if dct_rss:
        rows.append(("dict (RSS)", dct_rss["rss"] - RAW, "RSS delta / N - 112"))
    for kind in ("cachebox", "theine"):
        if try_import(kind)[1] is None:
            m = attempt(kind, lambda k=kind: measure_inprocess(k, n))  # type: ignore[misc]
            raw[kind] = m
            if m:
                rows.append((kind, m["rss"] - RAW, "RSS delta / N - 112"))

    t = Table(f"Memory overhead per entry beyond key+value, {n:,} entries of "
              f"{KEY_LEN} B key + {VALUE_LEN} B value (lower is better)",
              ["system", "overhead B/entry", "TARGETS quote", "method"])
    for label, val, how in rows:
        q = QUOTED.get(label.split(",")[0].split(" (")[0].replace(" tmpfs", ""))
        t.add(label, fmt_num(val, 1) if val is not None else "-",
              "-" if q is None else f"{q}", how)
    if shm:
        t.notes.append(
            f"shmcache 90% segment: index_buckets {shm['index_buckets']:,}, data_bytes "
            f"{shm['data_bytes']:,}, used_bytes {shm['used_bytes']:,}, payload_bytes "
            f"{shm['payload_bytes']:,}, free_bytes {shm['free_bytes']:,}, pages_free "
            f"{shm['pages_free']:,} x {shm['page_bytes']:,} B; size classes in use "
            f"(chunk B, pages, entries): {shm['classes']}")
    for label, why in errors.items():
        t.notes.append(f"{label}: not measured ({why})")
    t.print()

    val = shm["overhead"] if shm else None
    ok = None if val is None else val <= GOAL
    g = Table("Memory, TARGETS goal", ["metric", "value", "goal", "status"])
    g.add("shmcache overhead at ~90% fill", "-" if val is None else f"{val:.1f} B",
          f"<= {GOAL:g} B", verdict(ok))
    g.print()
    return {"overhead_per_entry": {lbl: v for (lbl, v, _h) in rows}, "raw": raw,
            "errors": errors, "goal_met": ok, "entries": n}
