"""``Cache.cached``: functions, coroutines, methods, keys, bypass/refresh/invalidate,
re-entrancy, negative caching, stale-while-revalidate and static typing."""

from __future__ import annotations

import asyncio
import datetime
import enum
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import run_isolated

from shmcache import MISSING, Cache, CacheConfig, CacheLevel, TierNotAvailableError
from shmcache import stampede as sf
from shmcache.keys import UnkeyableArgumentError, encode_arg


@pytest.fixture
def cache(segname: str) -> Iterator[Cache]:
    c = Cache(CacheConfig(name=segname, c_memory_size_mb=8))
    yield c
    c.close()


def test_plain_function_and_wraps(cache: Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60)
    def get_user(user_id: int) -> dict[str, Any]:
        """Doc of get_user."""
        calls.append(user_id)
        return {"id": user_id, "bio": "x" * 1000}

    assert get_user(1) == get_user(1) == {"id": 1, "bio": "x" * 1000}
    assert get_user(2)["id"] == 2
    assert calls == [1, 2]
    assert get_user.__name__ == "get_user" and get_user.__doc__ == "Doc of get_user."
    assert get_user.__wrapped__ is not None  # type: ignore[attr-defined]


def test_async_function(cache: Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60)
    async def fetch(x: int) -> int:
        calls.append(x)
        await asyncio.sleep(0)
        return x + 1

    async def main() -> list[int]:
        return [await fetch(1), await fetch(1), await fetch.refresh(1)]

    assert asyncio.run(main()) == [2, 2, 2]
    assert calls == [1, 1]
    assert asyncio.iscoroutine(c := fetch(5))
    assert asyncio.run(c) == 6


class Repo:
    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.calls = 0

    def __cache_key__(self) -> int:
        return self.shard


def test_methods_static_and_class_methods(cache: Cache) -> None:
    class Users(Repo):
        @cache.cached(ttl=60)
        def get(self, uid: int) -> str:
            self.calls += 1
            return f"{self.shard}:{uid}"

        @staticmethod
        @cache.cached(ttl=60)
        def static_inner(x: int) -> int:
            return x * 2

        @cache.cached(ttl=60)  # type: ignore[arg-type]
        @staticmethod
        def static_outer(x: int) -> int:
            return x * 3

        @classmethod
        @cache.cached(ttl=60)
        def class_inner(cls, x: int) -> str:
            return f"{cls.__name__}{x}"

        @cache.cached(ttl=60)  # type: ignore[arg-type]
        @classmethod
        def class_outer(cls, x: int) -> str:
            return f"{cls.__name__}-{x}"

    a, b = Users(1), Users(2)
    assert a.get(5) == a.get(5) == "1:5" and a.calls == 1
    assert b.get(5) == "2:5"                      # the instance is part of the key
    assert a.get.key(5) != b.get.key(5)
    assert a.get.invalidate(5) is True and a.get(5) == "1:5" and a.calls == 2
    assert Users.static_inner(2) == 4 and Users.static_outer(2) == 6
    assert a.static_outer(3) == 9 and a.static_inner(3) == 6
    assert Users.class_inner(1) == "Users1" and a.class_inner(1) == "Users1"
    assert Users.class_outer(1) == "Users-1"
    assert "<" in Users.class_outer.key(1)  # the class is keyed by qualified name


def test_method_without_cache_key_needs_ignore_self(cache: Cache) -> None:
    class Service:
        @cache.cached(ttl=60)
        def bad(self, x: int) -> int:
            return x

        @cache.cached(ttl=60, ignore_self=True)
        def good(self, x: int) -> int:
            return x

    with pytest.raises(TypeError, match="'self'.*ignore_self"):
        Service().bad(1)
    assert Service().good(1) == 1 and Service().good.key(1).endswith("good|1")


def test_unkeyable_argument_names_it_and_points_to_key_builder(cache: Cache) -> None:
    class Request:
        pass

    @cache.cached(ttl=60)
    def handler(user_id: int, request: Request) -> int:
        return user_id

    with pytest.raises(UnkeyableArgumentError) as ei:
        handler(1, Request())
    msg = str(ei.value)
    assert "'request'" in msg and "Request" in msg and "key_builder" in msg
    assert isinstance(ei.value, TypeError)
    with pytest.raises(TypeError, match="'request'"):
        handler(1, request=Request())

    @cache.cached(ttl=60, key_builder=lambda user_id, request: f"h:{user_id}")
    def handler2(user_id: int, request: Request) -> int:
        return user_id

    assert handler2(3, Request()) == 3 and handler2.key(3, Request()) == "h:3"


def test_unpicklable_result_gives_clear_error(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def make() -> Any:
        return lambda: 1

    with pytest.raises(TypeError, match=r"make: cannot cache its result.*not picklable"):
        make()


def test_default_keys_are_canonical(cache: Cache) -> None:
    class Color(enum.Enum):
        RED = 1

    @cache.cached(ttl=60)
    def f(*args: Any, **kwargs: Any) -> int:
        return 1

    k = f.key(1, "a", 2.5, None, True, b"b", (1, [2]), {"b": 1, "a": 2}, frozenset({2, 1}),
              Color.RED, datetime.date(2024, 1, 2), uuid.UUID(int=7), z=1, a=2)
    assert k == f.key(1, "a", 2.5, None, True, b"b", (1, [2]), {"a": 2, "b": 1},
                      frozenset({1, 2}), Color.RED, datetime.date(2024, 1, 2),
                      uuid.UUID(int=7), a=2, z=1)
    assert k.startswith(f"{__name__}.test_default_keys_are_canonical.<locals>.f|1|'a'|")
    assert f.key(1) != f.key("1") != f.key(1.0) and f.key(True) != f.key(1)
    assert encode_arg({"x": (1, 2)}) == "{'x':(1,2)}"
    long = f.key("x" * 1000)
    assert len(long.encode()) <= cache.max_key_len and long == f.key("x" * 1000)
    assert f("x" * 1000) == 1


def test_key_is_stable_across_interpreter_runs(cache: Cache) -> None:
    # A fresh interpreter with another hash seed builds the same key.
    code = textwrap.dedent("""
        from shmcache.keys import function_key
        def f(): pass
        f.__module__, f.__qualname__ = "app.users", "get_user"
        print(function_key(f, (42, "x", (1, 2.5), {"b": 1, "a": None}, frozenset("ab")), {}))
    """)
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           check=True).stdout for seed in (1, 2)}
    assert len(outs) == 1
    assert outs.pop().strip() == ("app.users.get_user|42|'x'|(1,2.5)|{'a':None,'b':1}|"
                                  "set{'a','b'}")


def test_bypass_refresh_invalidate(cache: Cache) -> None:
    n = [0]

    @cache.cached(ttl=60)
    def counter(x: int) -> int:
        n[0] += 1
        return n[0]

    assert counter(1) == 1 and counter(1) == 1
    assert counter.bypass(1) == 2 and counter(1) == 1   # bypass does not store
    assert counter.refresh(1) == 3 and counter(1) == 3  # refresh stores
    assert counter.invalidate(1) is True and counter.invalidate(1) is False
    assert counter(1) == 4
    assert cache.get(counter.key(1)) == 4


def test_reentrant_calls_do_not_deadlock(cache: Cache) -> None:
    depth = [0]

    @cache.cached(ttl=60, wait_timeout=30)
    def again(x: int) -> int:
        depth[0] += 1
        if depth[0] == 1:
            return again(x) + 1   # the same key, from inside its own computation
        return 10

    @cache.cached(ttl=60)
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    assert again(1) == 11
    assert fib(60) == 1548008755920
    assert cache.get_statistics().wait_timeouts == 0


def test_negative_caching(cache: Cache) -> None:
    calls: list[str] = []

    @cache.cached(ttl=60, cache_errors=(LookupError,), negative_ttl=60)
    def lookup(k: str) -> str:
        calls.append(k)
        if k == "missing":
            raise KeyError(k)
        if k == "bad":
            raise ValueError(k)
        return k

    for _ in range(2):
        with pytest.raises(KeyError):
            lookup("missing")
        with pytest.raises(ValueError):
            lookup("bad")
    assert calls == ["missing", "bad", "bad"]    # KeyError cached, ValueError not
    assert cache.get(lookup.key("missing"), MISSING) is MISSING  # not a plain value

    nones: list[int] = []

    @cache.cached(ttl=60, cache_none=False)
    def maybe(x: int) -> int | None:
        nones.append(x)
        return None

    assert maybe(1) is None and maybe(1) is None and nones == [1, 1]


def _soft_clock(cache: Cache) -> list[float]:
    """Drive the soft expiry (``fresh_until``) of ``cache`` by hand: advance ``now[0]``
    to make entries stale; the engine's TTLs keep running on real time."""
    now = [time.time()]
    cache._clock = lambda: now[0]
    return now


def test_stale_while_revalidate_waiters_get_the_stale_value(cache: Cache) -> None:
    now = _soft_clock(cache)
    v = [0]

    @cache.cached(ttl=60, stale_while_revalidate=3600)
    def slow(x: int) -> int:
        v[0] += 1
        return v[0]

    assert slow(1) == 1
    now[0] += 61                                       # past ttl, within ttl + s
    # Another (live) process is refreshing: hold its lease, as it would.
    lkey = sf.lease_key(slow.key(1), cache.max_key_len)
    ver = sf.acquire(cache.segment, lkey, 30)
    assert ver is not None
    assert slow(1) == 1                               # stale value, at once
    assert cache.get_statistics().stale_serves == 1
    assert v[0] == 1 and not cache._bg_futures         # no refresh of ours
    # That process stores the refreshed value and lets go.
    slow.refresh(1)
    sf.release(cache.segment, lkey, ver)
    assert slow(1) == 2 and v[0] == 2


def test_stale_while_revalidate_lone_sync_caller_refreshes_in_background(
        cache: Cache) -> None:
    now = _soft_clock(cache)
    calls = [0]
    started, gate = threading.Event(), threading.Event()

    @cache.cached(ttl=60, stale_while_revalidate=3600)
    def slow(x: int) -> int:
        calls[0] += 1
        if calls[0] > 1:
            started.set()
            assert gate.wait(60)
        return calls[0]

    assert slow(1) == 1
    now[0] += 61
    lkey = sf.lease_key(slow.key(1), cache.max_key_len)
    assert slow(1) == 1                  # a lone caller: the stale value, at once ...
    assert started.wait(60)              # ... while the refresh runs (blocked on gate)
    assert sf.acquire(cache.segment, lkey, 30) is None   # the refresh holds the lease
    assert slow(1) == 1                  # still stale; no second refresh
    st = cache.get_statistics()
    assert st.stale_serves == 2 and calls[0] == 2
    gate.set()
    assert cache._background_wait(60)
    assert slow(1) == 2 and slow(1) == 2 and calls[0] == 2
    fs = cache.get_statistics().functions[slow._stats_name]
    assert (fs.computes, fs.errors, fs.stale_serves) == (2, 0, 2)
    ver = sf.acquire(cache.segment, lkey, 30)            # the lease was released
    assert ver is not None
    sf.release(cache.segment, lkey, ver)


def test_stale_while_revalidate_async_refreshes_in_a_task(cache: Cache) -> None:
    now = _soft_clock(cache)
    calls = [0]

    async def main() -> None:
        started, gate = asyncio.Event(), asyncio.Event()

        @cache.cached(ttl=60, stale_while_revalidate=3600)
        async def slow(x: int) -> int:
            calls[0] += 1
            if calls[0] > 1:
                started.set()
                await gate.wait()
            return calls[0]

        assert await slow(1) == 1
        now[0] += 61
        assert await slow(1) == 1            # stale, at once
        await asyncio.wait_for(started.wait(), 60)
        assert len(cache._bg_tasks) == 1     # held until done
        assert await slow(1) == 1            # still stale while the task runs
        assert calls[0] == 2
        gate.set()
        await asyncio.wait_for(cache._abackground_wait(), 60)
        assert not cache._bg_tasks
        assert await slow(1) == 2 and calls[0] == 2
        lkey = sf.lease_key(slow.key(1), cache.max_key_len)
        ver = sf.acquire(cache.segment, lkey, 30)
        assert ver is not None
        sf.release(cache.segment, lkey, ver)

    asyncio.run(main())
    assert cache.get_statistics().stale_serves == 2


def test_stale_while_revalidate_failed_background_refresh(
        cache: Cache, caplog: pytest.LogCaptureFixture) -> None:
    now = _soft_clock(cache)
    calls = [0]

    # cache_errors too: a failed background refresh must not replace the stale value
    # with a negative entry.
    @cache.cached(ttl=60, stale_while_revalidate=3600, cache_errors=(RuntimeError,))
    def flaky(x: int) -> int:
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("secret-value-42")
        return 7

    assert flaky(1) == 7
    now[0] += 61
    with caplog.at_level("WARNING", logger="shmcache.cache"):
        assert flaky(1) == 7
        assert cache._background_wait(60)
    fs = cache.get_statistics().functions[flaky._stats_name]
    assert fs.errors == 1 and calls[0] == 2
    assert "background refresh" in caplog.text and "RuntimeError" in caplog.text
    assert "secret-value-42" not in caplog.text
    lkey = sf.lease_key(flaky.key(1), cache.max_key_len)
    ver = sf.acquire(cache.segment, lkey, 30)            # released: another can take it
    assert ver is not None
    assert flaky(1) == 7                                  # the lease is taken: stale
    sf.release(cache.segment, lkey, ver)
    assert flaky(1) == 7                                  # still the stale value ...
    assert cache._background_wait(60)                     # ... and another try
    fs = cache.get_statistics().functions[flaky._stats_name]
    assert fs.errors == 2 and calls[0] == 3 and fs.stale_serves == 3


def test_stale_while_revalidate_failed_async_refresh(cache: Cache) -> None:
    now = _soft_clock(cache)
    calls = [0]

    async def main() -> None:
        @cache.cached(ttl=60, stale_while_revalidate=3600)
        async def flaky(x: int) -> int:
            calls[0] += 1
            if calls[0] > 1:
                raise RuntimeError("boom")
            return 7

        assert await flaky(1) == 7
        now[0] += 61
        assert await flaky(1) == 7
        await asyncio.wait_for(cache._abackground_wait(), 60)
        assert cache.get_statistics().functions[flaky._stats_name].errors == 1
        lkey = sf.lease_key(flaky.key(1), cache.max_key_len)
        ver = sf.acquire(cache.segment, lkey, 30)
        assert ver is not None
        sf.release(cache.segment, lkey, ver)
        assert await flaky(1) == 7

    asyncio.run(main())


def test_stale_close_shuts_the_refresh_pool_down(segname: str) -> None:
    c = Cache(CacheConfig(name=segname, c_memory_size_mb=8))
    now = _soft_clock(c)
    gate = threading.Event()
    calls = [0]

    @c.cached(ttl=60, stale_while_revalidate=3600)
    def f(x: int) -> int:
        calls[0] += 1
        if calls[0] > 1:
            assert gate.wait(60)
        return calls[0]

    try:
        assert f(1) == 1
        now[0] += 61
        assert f(1) == 1
        pool = c._bg_pool
        assert pool is not None
        gate.set()
    finally:
        c.close()
    assert c._bg_pool is None and calls[0] == 2   # close() waited for the refresh
    with pytest.raises(RuntimeError):
        pool.submit(int)


def test_stale_close_drops_queued_refreshes_and_frees_their_leases(segname: str) -> None:
    c = Cache(CacheConfig(name=segname, c_memory_size_mb=8))
    now = _soft_clock(c)
    gate = threading.Event()
    started = {x: threading.Event() for x in range(5)}
    calls: list[int] = []

    @c.cached(ttl=60, stale_while_revalidate=3600)
    def f(x: int) -> int:
        calls.append(x)
        if calls.count(x) > 1:
            started[x].set()
            assert gate.wait(60)
        return x

    try:
        for x in range(5):
            assert f(x) == x
        now[0] += 61
        for x in range(4):               # occupy every worker of the pool
            assert f(x) == x
            assert started[x].wait(60)
        assert f(4) == 4                 # queued behind them
        pool = c._bg_pool
        assert pool is not None
        lkey = sf.lease_key(f.key(4), c.max_key_len)
        assert sf.acquire(c.segment, lkey, 30) is None
        pool.shutdown(wait=False, cancel_futures=True)   # what close() does first
        ver = sf.acquire(c.segment, lkey, 30)            # its lease was freed
        assert ver is not None
        sf.release(c.segment, lkey, ver)
        gate.set()
    finally:
        gate.set()
        c.close()
    assert sorted(calls) == [0, 0, 1, 1, 2, 2, 3, 3, 4]  # 4 was never refreshed


def _stale_refresh_in_forked_child(c: Cache, parent_pool: Any) -> int:
    # Called on the parent's (inherited) Cache: must make a pool of its own.
    @c.cached(ttl=60, stale_while_revalidate=3600, name="fork-child")
    def g(x: int) -> int:
        return os.getpid()

    now = _soft_clock(c)
    g(1)
    now[0] += 61
    assert g(1) != 0
    assert c._background_wait(60)
    assert c._bg_pool is not None and c._bg_pool is not parent_pool
    assert g(1) == os.getpid()
    return 1


def test_stale_forked_child_does_not_use_the_parents_pool(cache: Cache) -> None:
    now = _soft_clock(cache)

    @cache.cached(ttl=60, stale_while_revalidate=3600)
    def f(x: int) -> int:
        return x

    f(1)
    now[0] += 61
    f(1)
    assert cache._background_wait(60)
    assert cache._bg_pool is not None
    assert run_isolated(_stale_refresh_in_forked_child, cache, cache._bg_pool) == 1


def test_level_and_namespace_options(cache: Cache) -> None:
    with pytest.raises(TierNotAvailableError):
        cache.cached(ttl=1, level=CacheLevel.REDIS)
    n = [0]

    @cache.cached(ttl=60, level=CacheLevel.C_MEMORY, namespace="catalog")
    def item(x: int) -> int:
        n[0] += 1
        return x

    item(1)
    item(1)
    assert n[0] == 1 and item.key(1).startswith("catalog@")
    cache.invalidate_namespace("catalog")
    item(1)
    assert n[0] == 2


def test_tags_on_decorator(cache: Cache) -> None:
    n = [0]

    @cache.cached(ttl=60, tags=lambda uid: [f"user:{uid}"], invalidate_on=["reload"])
    def profile(uid: int) -> int:
        n[0] += 1
        return uid

    profile(1)
    profile(2)
    cache.invalidate_tags("user:1")
    profile(1)
    profile(2)
    assert n[0] == 3
    cache.emit("reload")
    profile(1)
    profile(2)
    assert n[0] == 5


def test_copy_option_gives_fresh_objects(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def shared() -> list[int]:
        return [1]

    @cache.cached(ttl=60, copy=True)
    def private() -> list[int]:
        return [1]

    assert shared() is shared()
    private().append(2)
    a, b = private(), private()
    assert a == b == [1] and a is not b


_TYPED_USE = """
from shmcache import Cache

cache = Cache()

@cache.cached(ttl=60)
def get_user(user_id: int, *, full: bool = False) -> dict[str, int]:
    return {"id": user_id}

@cache.cached(ttl=60)
async def aget_user(user_id: int) -> str:
    return str(user_id)

@cache.cached(ttl=60)
def by_kind(kind: type[int], n: int) -> int:
    return n

class Svc:
    def __cache_key__(self) -> int:
        return 1

    @cache.cached(ttl=60)
    def m(self, x: str) -> float:
        return 1.0

    @cache.cached(ttl=60)
    @classmethod
    def load(cls, x: int) -> "Svc":
        return cls()

    @cache.cached(ttl=60)
    @classmethod
    async def aload(cls, x: int) -> int:
        return x

class Tools:
    @staticmethod
    @cache.cached(ttl=60)
    def inner(x: int) -> int:
        return x

    @cache.cached(ttl=60)
    @staticmethod
    def outer(x: int) -> int:
        return x

i1: int = Tools.inner(1)
i2: int = Tools.outer(1)
Tools.inner("no")  # E: wrong argument type
Tools.outer("no")  # E: wrong argument type
i3: int = Tools().inner(1)  # P: needs the plugin
i4: int = Tools().outer(1)  # P: needs the plugin
k0: str = Tools().outer.key(1)  # P: needs the plugin

ok: dict[str, int] = get_user(1, full=True)
k: str = get_user.key(1)
f: float = Svc().m("x")
b: bool = Svc().m.invalidate("x")
s1: Svc = Svc.load(1)
s2: Svc = Svc().load(2)
k2: str = Svc.load.key(1)
b2: bool = Svc().load.invalidate(1)
n1: int = by_kind(int, 1)
by_kind(1, 1)  # E: not a class
Svc.load("x")  # E: wrong argument type
Svc.load(Svc, 1)  # E: cls is bound already

async def use() -> int:
    return len(await aget_user(3)) + await Svc.aload(1)

get_user("no")  # E: wrong argument type
Svc().m(1)  # E: wrong argument type
"""


def _mypy_flags(tmp_path: Path, *extra: str) -> tuple[set[int], str]:
    src = tmp_path / "typed_use.py"
    src.write_text(_TYPED_USE)
    res = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                          "--cache-dir", str(tmp_path / ".mypy"), *extra, str(src)],
                         capture_output=True, text=True)
    errors = [ln for ln in res.stdout.splitlines()
              if ": error:" in ln and ln.startswith(str(src))]
    return {int(ln.split(":")[1]) for ln in errors}, res.stdout


def _marked(tag: str) -> set[int]:
    return {i + 1 for i, ln in enumerate(_TYPED_USE.splitlines()) if f"# {tag}:" in ln}


def test_signatures_survive_mypy_strict(tmp_path: Path) -> None:
    # Functions, async functions, methods and class methods keep their exact signatures
    # (cls and self bound); static methods called on the class too.  Called through an
    # instance, a cached static method needs the plugin (mypy runs every descriptor's
    # __get__, even on a staticmethod): without it exactly those lines are flagged.
    flagged, out = _mypy_flags(tmp_path)
    assert flagged == _marked("E") | _marked("P"), out


def test_mypy_plugin_types_static_methods_through_instances(tmp_path: Path) -> None:
    cfg = tmp_path / "mypy.ini"
    cfg.write_text("[mypy]\nplugins = shmcache.mypy_plugin\n")
    flagged, out = _mypy_flags(tmp_path, "--config-file", str(cfg))
    assert flagged == _marked("E"), out


def test_hot_path_hits_are_counted_per_function_and_see_other_writers(cache: Cache) -> None:
    calls: list[int] = []

    @cache.cached(ttl=60)
    def square(n: int) -> list[int]:
        calls.append(n)
        return [n * n]

    first = square(3)
    for _ in range(5):
        assert square(3) is first          # the per-process object, no unpickle
    st = cache.get_statistics()
    fs = next(f for name, f in st.functions.items() if name.endswith("square"))
    assert fs.hits == 5 and fs.misses == 1 and calls == [3]
    assert st.levels["L0"].hits == 5
    # another writer replaces the entry: the version check sends the next call to L1
    raw, _version, flags = cache.segment.get_info(square.key(3)) or (b"", 0, 0)
    cache.segment.set(square.key(3), raw, flags=flags)
    again = square(3)
    assert again == [9] and again is not first and calls == [3]


# -- keys that used to collide --------------------------------------------------------


def _module_level(v: int) -> int:
    return v


class _Shape:
    @classmethod
    def unit(cls) -> int:
        return 1

    def area(self) -> int:
        return 1


def test_callable_arguments_without_a_stable_identity_are_unkeyable(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def apply(fn: Any, x: int) -> Any:
        return fn(x)

    def make_adder(n: int) -> Any:
        def add(v: int) -> int:
            return v + n
        return add

    def local(v: int) -> int:
        return v

    for bad in (lambda v: v + 1, make_adder(1), local, _Shape().area, [].append):
        with pytest.raises(UnkeyableArgumentError) as ei:
            apply(bad, 10)
        msg = str(ei.value)
        assert "'fn'" in msg and "key_builder" in msg, msg
    with pytest.raises(UnkeyableArgumentError, match="lambda"):
        apply.key(fn=lambda v: v)
    # Functions a qualified name identifies stay keyable.
    assert apply(_module_level, 3) == 3 and apply(abs, -3) == 3
    assert "_Shape.unit>" in apply.key(_Shape.unit, 0)  # a method bound to a class
    assert f"<{__name__}._module_level>" in apply.key(_module_level, 1)
    assert apply.key(abs, 1) != apply.key(len, 1)


def test_tuple_subclasses_do_not_collide_with_tuples(cache: Cache) -> None:
    from collections import namedtuple
    A = namedtuple("A", "x y")
    B = namedtuple("B", "x y")

    class L(list[int]):
        pass

    @cache.cached(ttl=60)
    def kind(p: Any) -> str:
        return type(p).__name__

    assert (kind(A(1, 2)), kind(B(1, 2)), kind((1, 2))) == ("A", "B", "tuple")
    assert kind(L([1])) == "L" and kind([1]) == "list"
    assert len({kind.key(A(1, 2)), kind.key(B(1, 2)), kind.key((1, 2))}) == 3
    assert kind.key(A(1, 2)) == kind.key(A(1, 2))


# -- functions that share a qualified name --------------------------------------------


def test_factory_functions_of_one_qualname_need_a_name(cache: Cache) -> None:
    db = {"users": {1: "alice"}, "orders": {1: "order#1"}}

    def make_getter(table: str, **kw: Any) -> Any:
        @cache.cached(ttl=60, **kw)
        def get(i: int) -> str:
            return db[table][i]
        return get

    users = make_getter("users")
    with pytest.raises(TypeError, match=r"name=.*key_builder"):
        make_getter("orders")
    users2 = make_getter("users2", name="getter-users2")
    orders = make_getter("orders", name="getter-orders")
    assert users(1) == "alice" and orders(1) == "order#1"
    assert orders.key(1) == "getter-orders|1" and users2.key(1) == "getter-users2|1"
    with pytest.raises(TypeError, match="name="):  # an explicit name is a prefix too
        make_getter("users", name="getter-orders")
    keyed = make_getter("orders", key_builder=lambda i: f"orders:{i}")
    assert keyed(1) == "order#1"
    fn_names = set(cache.get_statistics().functions)
    assert {"getter-orders", "getter-users2"} <= fn_names
    assert len(fn_names) == 4  # users, its key_builder twin (#2), and the two named ones
    # Decorating the same function object again is fine: same keys, same figures.
    def plain(i: int) -> int:
        return i
    a, b = cache.cached()(plain), cache.cached(ttl=5)(plain)
    assert a(1) == 1 and b(1) == 1 and a.key(1) == b.key(1)


def test_functions_made_and_dropped_do_not_pile_up(cache: Cache) -> None:
    def handler(x: int) -> int:
        @cache.cached(ttl=60)
        def inner(y: int) -> int:
            return y * 2
        return inner(x)

    for i in range(50):
        assert handler(i) == 2 * i
    st = cache.get_statistics()
    assert len(cache._functions) <= 1
    assert st.misses == 50  # the figures of dropped functions stay in the totals


# -- a full segment degrades, never fails a call ---------------------------------------


def _fill_with_pins(cache: Cache) -> list[Any]:
    """Pin values until the segment has no chunk left even after eviction."""
    from shmcache.errors import SegmentFullError
    seg = cache.segment
    mvl = int(seg.config()["max_value_len"])
    pins: list[Any] = []
    for size in (mvl - 100, 4000, 1000, 200, 50, 1):
        while True:
            k = f"fill{len(pins)}"
            try:
                seg.set(k, b"x" * size)
            except SegmentFullError:
                break
            p = seg.pin(k)
            assert p is not None
            pins.append(p)
    with pytest.raises(SegmentFullError):
        seg.add("probe", b"1234:5678", 30)
    return pins


def test_full_segment_computes_without_lease_tags_or_store(segname: str) -> None:
    import warnings
    cache = Cache(CacheConfig(name=segname, c_memory_size_mb=1, compression=False))
    calls: list[str] = []

    @cache.cached(ttl=60)
    def plain(x: int) -> int:
        calls.append("plain")
        return x + 1

    @cache.cached(ttl=60, tags=["t"], invalidate_on=["e"])
    def tagged(x: int) -> int:
        calls.append("tagged")
        return x + 2

    @cache.cached(ttl=60, namespace="ns")
    def spaced(x: int) -> int:
        calls.append("spaced")
        return x + 3

    @cache.cached(ttl=60, cache_errors=(KeyError,), stampede=False)
    def failing(x: int) -> int:
        calls.append("failing")
        raise KeyError(x)

    @cache.cached(ttl=60)
    async def coro(x: int) -> int:
        calls.append("coro")
        return x + 4

    async def use_coro() -> int:
        return await coro(1)

    pins = _fill_with_pins(cache)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert plain(1) == 2 and plain(1) == 2
            assert tagged(1) == 3 and spaced(1) == 4
            assert asyncio.run(use_coro()) == 5
            with pytest.raises(KeyError):
                failing(1)
        assert calls == ["plain", "plain", "tagged", "spaced", "coro", "failing"]
        assert w and all(issubclass(x.category, RuntimeWarning) for x in w)
        # Attributed to the caller's line here, not to shmcache internals.
        assert {x.filename for x in w} == {__file__}, [(x.filename, x.lineno) for x in w]
        assert any("SegmentFullError" in str(x.message) for x in w)
        st = cache.get_statistics()
        assert st.store_errors >= 6 and st.functions[plain._stats_name].store_errors >= 2
    finally:
        for p in pins:
            p.release()
    cache.clear()
    calls.clear()
    assert plain(1) == 2 and plain(1) == 2 and tagged(1) == 3 and tagged(1) == 3
    assert calls == ["plain", "tagged"]  # room again: cached as usual
    cache.close()


def test_store_errors_of_any_kind_degrade(cache: Cache, monkeypatch: Any) -> None:
    import warnings

    from shmcache.errors import LockTimeoutError, ValueTooLargeError

    def timeout(*a: Any, **k: Any) -> Any:
        raise LockTimeoutError("lock not taken in time")

    @cache.cached(ttl=60)
    def f(x: int) -> int:
        return x

    monkeypatch.setattr(cache.segment, "set", timeout)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert f(1) == 1
    assert len(w) == 1 and w[0].filename == __file__ and "LockTimeoutError" in str(w[0].message)

    def too_large(*a: Any, **k: Any) -> Any:
        raise ValueTooLargeError("too large")

    monkeypatch.setattr(cache.segment, "set", too_large)
    monkeypatch.setattr(cache.segment, "add", timeout)  # the lease, too
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert f(2) == 2
    assert {x.filename for x in w} == {__file__} and len(w) == 2
    assert cache.get_statistics().store_errors == 3
