"""The lower levels measured: cross-host invalidation lag, L2 hit cost, journal drain
throughput, and a Redis outage under load.

Usage::

    python benchmarks/bench_tiers.py            # about 1 minute on 2 cores
    python benchmarks/bench_tiers.py --quick    # smoke run (a few seconds)

It starts its own ``redis-server`` (loopback, free port, no persistence), prints one
table per measure and writes every figure to ``build/bench_tiers.json``.

Method.

* **Invalidation lag.**  Two "hosts": two segments, each with its sidecar in a process
  of its own (``python -m shmcache.sidecar``, as deployed), on one Redis.  For each of
  ``--changes`` keys the bench plants the key in host B's L1 (without a journal
  record, as a value promoted from L2 would be), then sets or deletes it on host A
  (alternating) and polls B's segment in a tight loop until the key is gone.  The lag
  is the time from just before A's ``set``/``delete`` to the first poll that misses:
  A's sidecar noticing the journal record (it sleeps up to 10 ms when idle), the
  write-back pipeline and PUBLISH, B's subscriber and its delete.  Goal: p99 < 100 ms.
* **L2 hit cost.**  One cache, ``object_cache=False`` (so an L1 hit unpickles, as an
  L2 hit does), 1,000 keys with a ~200-byte dict each, written through to Redis.  An
  L1 hit is ``cache.get``; an L2 hit is ``segment.delete(key, journal=False)`` then
  ``cache.get`` (L1 miss, GET, HMAC check, unpickle, copy into L1) -- the delete is
  included and timed alone too; bare redis-py is ``client.get`` of the same sealed
  bytes (no unpickle).  ns per call, best of several passes.
* **Journal throughput.**  ``--journal-writes`` sets go into a segment with no
  sidecar running; then a sidecar (a thread of the bench process) is started and
  the time until every key is in Redis is measured.  The same sealed values are then
  written with redis-py one ``SET`` at a time, and with a plain ``SET`` pipeline of
  1,000 (what the Lua script that guards stamps costs over bare SETs).
* **Outage.**  A load thread sets and gets 1,000 keys (about 2,000 ops/s) on a cache
  whose sidecar runs in-process (``sidecar="auto"``, the default).  After a few
  seconds Redis is SIGKILLed, restarted on the same port ``--outage`` seconds later
  (empty), and the bench measures how long after the restart Redis holds, for every
  key, a value at least as new as the one written before the restart.  Caller
  exceptions must be 0.  The catch-up time is dominated by the level's backoff: after
  a long outage it has grown to its 2 s cap, so the first retry can come up to 2 s
  after Redis is back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    Table,
    fmt_num,
    fmt_ratio,
    free_port,
    gc_disabled,
    unique_name,
    verdict,
)
from shmcache import Cache, CacheConfig, CacheLevel, unlink_segment  # noqa: E402
from shmcache.sidecar import lock_path, read_report  # noqa: E402

L1_L2 = (CacheLevel.C_MEMORY, CacheLevel.REDIS)
# A throwaway signing key for the bench's own values; never a real one.
SECRET = "bench-tiers-" + "k" * 24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- redis-server ---------------------------------------------------------------------


class RedisProc:
    """A private redis-server that can be killed and started again on its port."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server not found (apt-get install redis-server)")
        self.exe = exe
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="shmbench-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.client().ping():
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def caches(redis: RedisProc) -> Iterator[Callable[..., Cache]]:
    """A factory of caches on fresh segments; all closed and unlinked at the end."""
    made: list[Cache] = []
    prefix = f"bench{os.getpid()}:"

    def make(**kw: Any) -> Cache:
        opts: dict[str, Any] = dict(name=unique_name("tiers"), c_memory_size_mb=64,
                                    levels=L1_L2, redis_url=redis.url, secret=SECRET,
                                    redis_prefix=prefix)
        opts.update(kw)
        c = Cache(CacheConfig(**opts))
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            with contextlib.suppress(Exception):
                c.close()
            unlink_segment(c.segment.name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path(c.segment.name))


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100.0 * len(s)))]


def value(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"user {i}", "email": f"user{i}@example.com",
            "roles": ["reader", "writer"], "score": i * 1.5, "bio": "x" * 80}


# -- 1. cross-host invalidation lag ---------------------------------------------------


def bench_lag(redis: RedisProc, make: Callable[..., Cache], changes: int) -> dict[str, Any]:
    a = make(sidecar="off")
    b = make(sidecar="off")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHE_")}
    env.update(SHMCACHE_SECRET=SECRET, SHMCACHE_REDIS_URL=redis.url,
               SHMCACHE_REDIS_PREFIX=a.config.redis_prefix,
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-m", "shmcache.sidecar", "--name",
                               c.segment.name, "--levels", "c_memory,redis",
                               "--log-level", "WARNING"], env=env)
             for c in (a, b)]
    try:
        for c, p in zip((a, b), procs, strict=True):
            def leading(c: Cache = c, pid: int = p.pid) -> bool:
                rep = read_report(c.segment)
                return rep.get("pid") == pid and rep.get("leader") == 1.0

            if not wait_until(leading, 30):
                raise RuntimeError("a sidecar did not start")
        r = redis.client()
        ch = (a.config.redis_prefix + "invalidate").encode()
        if not wait_until(lambda: dict(r.pubsub_numsub(ch)).get(ch, 0) >= 2, 10):
            raise RuntimeError("the sidecars did not subscribe")
        bseg = b.segment
        contains = bseg.contains
        lags: dict[str, list[float]] = {"set": [], "delete": []}
        lost = 0
        for i in range(changes):
            key = f"lag:{i}"
            bseg.set(key, b"copy", journal=False)
            op = "set" if i % 2 == 0 else "delete"
            t0 = time.perf_counter()
            if op == "set":
                a.set(key, i)
            else:
                a.delete(key)
            deadline = t0 + 5.0
            while contains(key):
                if time.perf_counter() > deadline:
                    lost += 1
                    break
            else:
                lags[op].append(time.perf_counter() - t0)
        both = lags["set"] + lags["delete"]
        ms = [x * 1000 for x in both]
        return {"changes": changes, "lost": lost,
                "p50_ms": pct(ms, 50), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99),
                "max_ms": max(ms), "mean_ms": statistics.fmean(ms),
                "set_p50_ms": pct([x * 1000 for x in lags["set"]], 50),
                "delete_p50_ms": pct([x * 1000 for x in lags["delete"]], 50),
                "goal_p99_ms": 100.0, "met": pct(ms, 99) < 100.0 and lost == 0}
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# -- 2. L2 hit cost ---------------------------------------------------------------------


def _per_call_ns(fn: Callable[[], None], calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        with gc_disabled():
            t0 = time.perf_counter_ns()
            fn()
            best = min(best, (time.perf_counter_ns() - t0) / calls)
    return best


def bench_l2_hit(redis: RedisProc, make: Callable[..., Cache], n: int,
                 repeats: int) -> dict[str, Any]:
    c = make(write_mode="through", object_cache=False)
    keys = [f"hit:{i:05d}" for i in range(n)]
    for i, k in enumerate(keys):
        c.set(k, value(i))
    r = redis.client()
    rkeys = [(c.config.redis_prefix + k).encode() for k in keys]
    blob_len = statistics.fmean(len(r.get(k)) for k in rkeys[:100])
    seg = c.segment
    get = c.get
    sdel = seg.delete

    def l1() -> None:
        for k in keys:
            get(k)

    def l2() -> None:
        for k in keys:
            sdel(k, journal=False)
            get(k)

    def only_delete() -> None:
        for k in keys:
            sdel(k, journal=False)

    def restore() -> None:
        for k in keys:  # back into L1 for the next pass (from L2)
            get(k)

    def bare() -> None:
        g = r.get
        for k in rkeys:
            g(k)

    l1_ns = _per_call_ns(l1, n, repeats)
    l2_ns = _per_call_ns(l2, n, repeats)
    del_ns = float("inf")
    for _ in range(repeats):
        restore()
        del_ns = min(del_ns, _per_call_ns(only_delete, n, 1))
    restore()
    bare_ns = _per_call_ns(bare, n, repeats)
    before = c.get_statistics().tiers["REDIS"]
    l2()
    after = c.get_statistics().tiers["REDIS"]
    assert after["hits"] - before["hits"] == n, "the L2 pass did not hit L2"
    return {"keys": n, "sealed_bytes": blob_len, "l1_hit_ns": l1_ns, "l2_hit_ns": l2_ns,
            "segment_delete_ns": del_ns, "bare_redis_get_ns": bare_ns,
            "l2_over_bare": l2_ns / bare_ns, "l2_over_l1": l2_ns / l1_ns}


# -- 3. journal drain throughput --------------------------------------------------------


def bench_journal(redis: RedisProc, make: Callable[..., Cache], n: int) -> dict[str, Any]:
    c = make(sidecar="off", journal_mb=32)
    for i in range(n):
        c.set(f"j:{i:06d}", value(i))
    st = c.segment.stats()
    if st.journal_dropped:
        raise RuntimeError("the journal overflowed: raise journal_mb")
    t0 = time.perf_counter()
    sc = c.start_sidecar()
    try:
        ok = wait_until(lambda: sc.stats()["written_redis"] >= n
                        and not sc.stats()["pending"], 120, 0.002)
        drain_s = time.perf_counter() - t0
        batches = sc.stats()["batches"]
    finally:
        sc.stop()
    if not ok:
        raise RuntimeError("the sidecar did not drain the journal")
    r = redis.client()
    m = min(n, 10_000)
    rkeys = [(c.config.redis_prefix + f"j:{i:06d}").encode() for i in range(m)]
    blobs = r.mget(rkeys)
    other = [b"bare:" + k for k in rkeys]
    with gc_disabled():
        t0 = time.perf_counter()
        for k, v in zip(other, blobs, strict=True):
            r.set(k, v)
        one_by_one_s = time.perf_counter() - t0
    with gc_disabled():
        t0 = time.perf_counter()
        for i in range(0, m, 1000):
            p = r.pipeline(transaction=False)
            for k, v in zip(other[i:i + 1000], blobs[i:i + 1000], strict=True):
                p.set(k, v)
            p.execute()
        piped_s = time.perf_counter() - t0
    r.delete(*other)
    return {"writes": n, "batches": batches, "sidecar_writes_per_s": n / drain_s,
            "sidecar_drain_s": drain_s, "redis_py_set_one_by_one_per_s": m / one_by_one_s,
            "redis_py_set_pipelined_per_s": m / piped_s,
            "sidecar_over_one_by_one": (n / drain_s) / (m / one_by_one_s)}


# -- 4. Redis killed under load -------------------------------------------------------


def bench_outage(redis: RedisProc, make: Callable[..., Cache], warm: float,
                 outage: float) -> dict[str, Any]:
    c = make()
    assert c._sidecar is not None and c._sidecar.wait_leader(10)
    nkeys = 1000
    last: dict[str, int] = {}
    errors: list[str] = []
    counts = [0]
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            k = f"o:{i % nkeys}"
            try:
                c.set(k, i)
                last[k] = i
                c.get(f"o:{(i * 7) % nkeys}")
                c.get(f"absent:{i}")  # an L1 miss: asks Redis (or its breaker)
            except Exception as e:  # noqa: BLE001 - what callers would see
                errors.append(type(e).__name__)
            i += 1
            counts[0] = i
            if i % 4 == 0:
                time.sleep(0.002)  # ~2,000 ops/s: a busy worker, not a spin

    t = threading.Thread(target=load, daemon=True)
    t.start()
    phases: dict[str, float] = {}
    try:
        time.sleep(warm)  # the load runs meanwhile: this is its duration, not a sync
        n0, t0 = counts[0], time.monotonic()
        redis.kill()
        time.sleep(outage)
        n1, t1 = counts[0], time.monotonic()
        phases["ops_per_s_during_outage"] = (n1 - n0) / (t1 - t0)
        redis.start()
        restarted = time.monotonic()
        target = dict(last)
        sealer = c._lower.redis.sealer if c._lower and c._lower.redis else None
        assert sealer is not None
        prefix = c.config.redis_prefix
        r = redis.client()
        keys = sorted(target)

        def current() -> bool:
            blobs = r.mget([(prefix + k).encode() for k in keys])
            for k, blob in zip(keys, blobs, strict=True):
                if blob is None:
                    return False
                got = sealer.open(k.encode(), blob)
                if Cache._decode(got.body, got.flags)[0] < target[k]:
                    return False
            return True

        ok = wait_until(current, 60, 0.02)
        caught_up = time.monotonic() - restarted
        n2, t2 = counts[0], time.monotonic()
        time.sleep(1.0)  # one more second of load after the catch-up
        phases["ops_per_s_after"] = (counts[0] - n2) / (time.monotonic() - t2)
    finally:
        stop.set()
        t.join(30)
    st = c.get_statistics()
    return {"outage_s": outage, "ops_total": counts[0], "caller_errors": len(errors),
            "error_types": sorted(set(errors)), "caught_up": ok,
            "l2_current_after_restart_s": caught_up, "keys": len(target),
            "degraded_ops": st.degraded_ops, "redis_failures": st.tiers["REDIS"]["failures"],
            "journal_dropped": c.segment.stats().journal_dropped, **phases}


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--changes", type=int, default=1000)
    ap.add_argument("--journal-writes", type=int, default=50_000)
    ap.add_argument("--outage", type=float, default=10.0)
    ap.add_argument("--json", default=os.path.join(ROOT, "build", "bench_tiers.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.changes, a.journal_writes, a.outage = 100, 5000, 2.0
    redis = RedisProc()
    redis.start()
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "args": vars(a)}
    try:
        with caches(redis) as make:
            lag = results["invalidation_lag"] = bench_lag(redis, make, a.changes)
            t = Table(f"Cross-host invalidation lag ({lag['changes']} changes, "
                      "set/delete on A until gone from B's L1)",
                      ["", "p50 ms", "p90 ms", "p99 ms", "max ms", "goal p99", "verdict"])
            t.add("A -> Redis -> B", fmt_num(lag["p50_ms"], 2), fmt_num(lag["p90_ms"], 2),
                  fmt_num(lag["p99_ms"], 2), fmt_num(lag["max_ms"], 2), "< 100 ms",
                  verdict(lag["met"]))
            t.notes.append(f"p50 of sets {lag['set_p50_ms']:.2f} ms, of deletes "
                           f"{lag['delete_p50_ms']:.2f} ms; lost: {lag['lost']}")
            t.print()

            hit = results["l2_hit"] = bench_l2_hit(redis, make, 200 if a.quick else 1000,
                                                   2 if a.quick else 5)
            t = Table(f"L2 hit cost ({hit['keys']} keys, ~{hit['sealed_bytes']:.0f} "
                      "sealed bytes each)", ["path", "ns/call", "vs bare GET", "vs L1 hit"])
            t.add("shmcache L1 hit (get, unpickle)", fmt_num(hit["l1_hit_ns"]),
                  fmt_ratio(hit["l1_hit_ns"] / hit["bare_redis_get_ns"]), "1.00x")
            t.add("shmcache L2 hit (delete from L1 + get)", fmt_num(hit["l2_hit_ns"]),
                  fmt_ratio(hit["l2_over_bare"]), fmt_ratio(hit["l2_over_l1"]))
            t.add("  of which segment.delete", fmt_num(hit["segment_delete_ns"]), "", "")
            t.add("bare redis-py GET", fmt_num(hit["bare_redis_get_ns"]), "1.00x",
                  fmt_ratio(hit["bare_redis_get_ns"] / hit["l1_hit_ns"]))
            t.print()

            jr = results["journal"] = bench_journal(redis, make, a.journal_writes)
            t = Table(f"Journal drain to Redis ({jr['writes']:,} writes, "
                      f"{jr['batches']:.0f} batches)", ["writer", "writes/s", "vs one by one"])
            t.add("sidecar (pipelined EVAL, stamps checked)",
                  fmt_num(jr["sidecar_writes_per_s"]), fmt_ratio(jr["sidecar_over_one_by_one"]))
            t.add("redis-py SET one by one", fmt_num(jr["redis_py_set_one_by_one_per_s"]),
                  "1.00x")
            t.add("redis-py SET, pipelines of 1,000",
                  fmt_num(jr["redis_py_set_pipelined_per_s"]),
                  fmt_ratio(jr["redis_py_set_pipelined_per_s"]
                            / jr["redis_py_set_one_by_one_per_s"]))
            t.print()

            out = results["outage"] = bench_outage(redis, make, 1.0 if a.quick else 3.0,
                                                   a.outage)
            t = Table(f"Redis SIGKILLed for {out['outage_s']:.0f} s under load",
                      ["caller errors", "ops", "ops/s down", "ops/s after",
                       "L2 current after restart", "degraded ops"])
            t.add(out["caller_errors"], fmt_num(out["ops_total"]),
                  fmt_num(out["ops_per_s_during_outage"]), fmt_num(out["ops_per_s_after"]),
                  f"{out['l2_current_after_restart_s']:.2f} s"
                  + ("" if out["caught_up"] else " (NOT caught up)"),
                  fmt_num(out["degraded_ops"]))
            t.notes.append(f"{out['keys']} keys checked in Redis against the last value "
                           "written before the restart; journal records dropped: "
                           f"{out['journal_dropped']}")
            t.print()
    finally:
        redis.stop()
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {a.json}")
    ok = results["outage"]["caller_errors"] == 0 and results["outage"]["caught_up"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
