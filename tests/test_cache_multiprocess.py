"""The cache API across real processes: stampede control, dead owners, shared entries.

Synchronization is through the segment or multiprocessing primitives, never sleeps.
A computing function that must wait for a competitor to be *waiting* watches the
segment's miss counter: a waiter polls the result key, and every poll is a miss.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from _helpers import FORK, SPAWN

from shmcache import Cache, CacheConfig, Segment

pytestmark = pytest.mark.slow

SIZE_MB = 8


def _cache(name: str, **kw: Any) -> Cache:
    return Cache(CacheConfig(name=name, c_memory_size_mb=SIZE_MB, **kw))


def _child(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send((True, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        conn.send((False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class Child:
    """A child process running ``fn(*args)``; ``result()`` returns what it returned."""

    def __init__(self, fn: Callable[..., Any], *args: Any, ctx: Any = FORK) -> None:
        self.r, w = ctx.Pipe(duplex=False)
        self.p = ctx.Process(target=_child, args=(w, fn, args))
        self.p.start()
        w.close()

    def result(self, timeout: float = 60.0) -> Any:
        assert self.r.poll(timeout), "child hung"
        ok, val = self.r.recv()
        self.p.join(30)
        assert ok, f"child raised: {val}"
        return val

    def kill(self) -> None:
        self.p.kill()
        self.p.join(30)  # reaped: its pid is gone, not a zombie


def _misses(seg: Segment) -> int:
    return seg.stats().counters["misses"]


def _wait_for_waiter(seg: Segment, base: int, bound: float = 20.0) -> bool:
    """Block until another process has polled (missed) at least twice since ``base``.
    Bounded so a lost competitor cannot hang the test; returns whether it happened."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if _misses(seg) >= base + 2:
            return True
        time.sleep(0.001)
    return False


# -- two processes race on one missing key ----------------------------------------------


def _racer(name: str, barrier: Any) -> dict[str, Any]:
    cache = _cache(name)
    seg = cache.segment

    @cache.cached(ttl=60, wait_timeout=30)
    def expensive(x: int) -> dict[str, int]:
        base = _misses(seg)
        cache.incr("computes")
        saw = _wait_for_waiter(seg, base)
        return {"x": x, "saw_waiter": int(saw)}

    barrier.wait(30)
    value = expensive(7)
    st = cache.get_statistics()
    cache.close()
    return {"value": value, "waits": st.stampede_waits, "timeouts": st.wait_timeouts}


def test_two_processes_compute_a_missing_key_once(segname: str) -> None:
    with _cache(segname) as cache:
        barrier = FORK.Barrier(2)
        a, b = Child(_racer, segname, barrier), Child(_racer, segname, barrier)
        ra, rb = a.result(), b.result()
        assert cache.incr("computes", 0) == 1
        assert ra["value"] == rb["value"]
        assert ra["value"]["saw_waiter"] == 1  # the other process really was waiting
        assert ra["waits"] + rb["waits"] == 1
        assert ra["timeouts"] == rb["timeouts"] == 0


# -- a waiter is released when the computing process dies -------------------------------


def _hanger(name: str, started: Any) -> None:
    cache = _cache(name)

    @cache.cached(ttl=60, key_builder=lambda x: f"report:{x}")
    def report(x: int) -> str:
        if cache.incr("computes") == 1:
            started.set()
            time.sleep(600)  # hangs until SIGKILLed
        return f"report-{x}"

    report(1)


def _waiter(name: str) -> dict[str, Any]:
    cache = _cache(name)

    @cache.cached(ttl=60, wait_timeout=60, key_builder=lambda x: f"report:{x}")
    def report(x: int) -> str:
        if cache.incr("computes") == 1:
            raise AssertionError("the waiter must not be first")
        return f"report-{x}"

    value = report(1)
    st = cache.get_statistics()
    return {"value": value, "breaks": st.lease_breaks, "timeouts": st.wait_timeouts}


def test_waiter_is_released_when_owner_is_sigkilled(segname: str) -> None:
    with _cache(segname) as cache:
        started = FORK.Event()
        owner = Child(_hanger, segname, started)
        assert started.wait(30)
        waiter = Child(_waiter, segname)
        os.kill(owner.p.pid, signal.SIGKILL)
        owner.p.join(30)
        res = waiter.result()
        assert res == {"value": "report-1", "breaks": 1, "timeouts": 0}
        assert cache.incr("computes", 0) == 2
        assert cache.segment.verify() == []


# -- an exception in the computing process wakes the waiters ----------------------------


def _failer_or_waiter(name: str, barrier: Any) -> dict[str, Any]:
    cache = _cache(name)
    seg = cache.segment

    @cache.cached(ttl=60, wait_timeout=60)
    def flaky(x: int) -> int:
        base = _misses(seg)
        if cache.incr("computes") == 1:
            _wait_for_waiter(seg, base)
            raise ValueError("backend down")
        return x * 10

    barrier.wait(30)
    try:
        out: Any = flaky(4)
    except ValueError as e:
        out = f"raised {e}"
    st = cache.get_statistics()
    return {"out": out, "timeouts": st.wait_timeouts}


def test_exception_in_owner_wakes_waiter(segname: str) -> None:
    with _cache(segname) as cache:
        barrier = FORK.Barrier(2)
        a, b = (Child(_failer_or_waiter, segname, barrier),
                Child(_failer_or_waiter, segname, barrier))
        outs = sorted([a.result(), b.result()], key=lambda r: str(r["out"]))
        assert [r["out"] for r in outs] == [40, "raised backend down"]
        assert all(r["timeouts"] == 0 for r in outs)
        assert cache.incr("computes", 0) == 2


# -- entries shared between processes, sync and async ----------------------------------


def square(x: int) -> int:
    """Module level, so a spawned process keys it the same way."""
    return x * x


def _spawned_lookup(name: str, expected_key: str) -> dict[str, Any]:
    cache = _cache(name)
    fn = cache.cached(ttl=60)(square)
    calls = 0

    def counting(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * x

    fn._fn = counting  # count computations in this process without changing the key
    out = {"key": fn.key(12), "value": fn(12), "calls": calls}
    assert out["key"] == expected_key
    cache.close()
    return out


def test_key_built_in_one_process_is_found_by_a_spawned_process(segname: str) -> None:
    with _cache(segname) as cache:
        fn = cache.cached(ttl=60)(square)
        assert fn(12) == 144
        res = Child(_spawned_lookup, segname, fn.key(12), ctx=SPAWN).result()
        assert res == {"key": fn.key(12), "value": 144, "calls": 0}


async def _async_square(x: int) -> int:
    return x * x


def _async_writer(name: str) -> str:
    cache = _cache(name)
    fn = cache.cached(ttl=60, key_builder=lambda x: f"sq:{x}")(_async_square)
    assert asyncio.run(fn(9)) == 81
    asyncio.run(cache.aset("plain", {"from": "async"}))
    return fn.key(9)


def test_async_and_sync_callers_share_entries(segname: str) -> None:
    with _cache(segname) as cache:
        key = Child(_async_writer, segname).result()
        assert key == "sq:9"

        @cache.cached(ttl=60, key_builder=lambda x: f"sq:{x}")
        def sync_square(x: int) -> int:
            raise AssertionError("must be served from the cache")

        assert sync_square(9) == 81
        assert cache.get("plain") == {"from": "async"}


def _reader(name: str, key: str) -> Any:
    cache = _cache(name)
    return cache.get(key)


@pytest.mark.parametrize("kw", [{"serializer": "msgpack"},
                                {"compression": "lz4", "serializer": "pickle"},
                                {"compression": "zlib", "serializer": "json"}])
def test_entry_written_with_codec_is_read_by_another_process(segname: str,
                                                             kw: dict[str, Any]) -> None:
    value = {"name": "x" * 5000, "ids": list(range(50))}
    with _cache(segname) as cache:
        cache.set("e", value, **kw)
        info = cache.segment.info("e")
        assert info is not None and info.flags != 0
        if "compression" in kw:
            assert info.value_len < 5000  # really compressed
        # The reader uses the default config (pickle): the flags say how to decode.
        assert Child(_reader, segname, "e", ctx=SPAWN).result() == value


# -- invalidation is visible to every process at once ----------------------------------


def _holder(name: str, conn: Any) -> list[Any]:
    cache = _cache(name)
    seen = []
    seen.append(cache.get("cfg"))           # fills this process's L0
    seen.append(cache.get("tagged"))
    conn.send("ready")
    assert conn.recv() == "go"              # the parent wrote and invalidated meanwhile
    seen.append(cache.get("cfg"))
    seen.append(cache.get("tagged", "gone"))
    seen.append(cache.get("ns-key", "gone", namespace="users"))
    return seen


def test_writes_and_invalidations_reach_other_processes(segname: str) -> None:
    with _cache(segname) as cache:
        cache.set("cfg", {"v": 1})
        cache.set("tagged", "t", tags=["users"])
        cache.set("ns-key", "n", namespace="users")
        parent, child_end = FORK.Pipe()
        child = Child(_holder, segname, child_end)
        assert parent.recv() == "ready"
        cache.set("cfg", {"v": 2})
        cache.invalidate_tags("users")
        cache.invalidate_namespace("users")
        parent.send("go")
        assert child.result() == [{"v": 1}, "t", {"v": 2}, "gone", "gone"]


def _emit_child(name: str) -> None:
    _cache(name).emit("user_updated")


def test_emit_in_another_process_drops_registered_entries(segname: str) -> None:
    with _cache(segname) as cache:
        calls = []

        @cache.cached(ttl=60, invalidate_on=["user_updated"])
        def profile(uid: int) -> str:
            calls.append(uid)
            return f"p{uid}"

        assert profile(1) == profile(1) == "p1"
        Child(_emit_child, segname).result()
        assert profile(1) == "p1"
        assert calls == [1, 1]


# -- an entry another deploy wrote that this one cannot decode ---------------------------

_DEPLOY = """
import json, logging, sys
from shmcache import Cache, CacheConfig
logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(message)s",
                    stream=sys.stdout)
cache = Cache(CacheConfig(name=sys.argv[1], c_memory_size_mb=8))
class {cls}:
    def __init__(self, n):
        self.n, self.secret = n, "s3cr3t-value"
@cache.cached(ttl=600)
def get_user(i):
    return {cls}(i)
first, second = get_user(1), get_user(1)
st = cache.get_statistics()
print(json.dumps({{"type": type(first).__name__, "same": second is first,
                   "computes": st.functions[get_user._stats_name].computes,
                   "decode_errors": st.decode_errors, "misses": st.misses}}))
cache.close()
"""


def _deploy(name: str, cls: str) -> tuple[dict[str, Any], list[str]]:
    import json
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", _DEPLOY.format(cls=cls), name],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    return json.loads(lines[-1]), [ln for ln in lines if ln.startswith("LOG ")]


def test_entry_of_a_renamed_class_is_a_miss_in_the_new_deploy(segname: str) -> None:
    with _cache(segname):
        old, old_logs = _deploy(segname, "User")
        assert old == {"type": "User", "same": True, "computes": 1, "decode_errors": 0,
                       "misses": 1} and old_logs == []
        new, logs = _deploy(segname, "Person")  # the class was renamed
        assert new["type"] == "Person" and new["computes"] == 1
        assert new["decode_errors"] == 1 and new["misses"] == 1
        assert len(logs) == 1 and logs[0].startswith("LOG shmcache.cache")
        assert "AttributeError" in logs[0] and "get_user|1" in logs[0]
        assert "s3cr3t" not in logs[0]  # never the value
        again, logs = _deploy(segname, "Person")  # the recomputed entry serves it now
        assert again["computes"] == 0 and again["decode_errors"] == 0 and logs == []
