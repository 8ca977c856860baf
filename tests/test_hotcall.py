"""The cached decorator's hot path in C (native/py/fastpath.c ``HotCall``, the base type of
``CachedFunction``): hits served without a Python frame, version checks, what falls
through to the Python slow path, reference counting and garbage collection."""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
from _helpers import new_name

from shmcache import Cache, CacheConfig, unlink_segment
from shmcache.cache import CachedFunction
from shmcache.errors import SegmentClosedError


@pytest.fixture
def cache(segname: str) -> Iterator[Cache]:
    c = Cache(CacheConfig(name=segname, c_memory_size_mb=8))
    yield c
    c.close()


class SlowCalls:
    """Records each Python-level ``_call_slow`` entry and the key the C path passed."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

    def __enter__(self) -> SlowCalls:
        def prof(frame: FrameType, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code.co_name == "_call_slow":
                self.keys.append(frame.f_locals["hk"])
        sys.setprofile(prof)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


def test_hits_skip_python_and_return_the_same_object(cache: Cache) -> None:
    calls: list[object] = []

    @cache.cached(ttl=60, name="user")
    def user(uid: int) -> dict[str, Any]:
        calls.append(uid)
        return {"id": uid}

    @cache.cached(ttl=60, name="label")
    def label(name: str) -> list[str]:
        calls.append(name)
        return [name]

    assert isinstance(user, CachedFunction)
    with SlowCalls() as slow:
        first = user(7)
        lab = label("a")
    # Each first call missed in C and handed its checked key to the slow path.
    assert slow.keys == [user.key(7), label.key("a")]
    with SlowCalls() as slow:
        got = [user(7) for _ in range(5)] + [label("a") for _ in range(3)]
    assert slow.keys == []  # every hit was served by the C path
    assert all(g is first for g in got[:5]) and all(g is lab for g in got[5:])
    assert calls == [7, "a"]
    fs = cache.get_statistics().functions
    assert fs[user._stats_name].hits == 5 and fs[user._stats_name].misses == 1
    assert fs[label._stats_name].hits == 3 and fs[label._stats_name].misses == 1


def test_a_replaced_entry_misses_the_hot_path(segname: str, cache: Cache) -> None:
    n = [0]

    def compute(uid: int) -> dict[str, int]:
        n[0] += 1
        return {"id": uid, "n": n[0]}

    f = cache.cached(ttl=60, name="replaced")(compute)
    old = f(1)
    assert f(1) is old
    other = Cache(CacheConfig(name=segname, c_memory_size_mb=8))  # another process's view
    try:
        g = other.cached(ttl=60, name="replaced")(compute)
        assert g.refresh(1) == {"id": 1, "n": 2}  # a new version of the same key
    finally:
        other.close()
    with SlowCalls() as slow:
        new = f(1)
    assert slow.keys == [f.key(1)]  # the stale object was refused in C
    assert new == {"id": 1, "n": 2} and new is not old
    assert n[0] == 2  # read from the segment, not recomputed
    with SlowCalls() as slow:
        assert f(1) is new  # the fresh object is now served in C
    assert slow.keys == []


def test_other_calls_go_the_slow_path(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: Any, y: int = 0) -> list[Any]:
        return [x, y]

    long_arg = "x" * (cache.max_key_len + 1)
    cases: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((1,), {"y": 2}),       # keywords
        ((1, 2), {}),           # two arguments
        ((1.5,), {}),           # not int/str
        ((True,), {}),          # a subclass of int: its repr differs from int's
        ((b"ab",), {}),
        ((long_arg,), {}),      # a key long enough to be shortened
        (("\u00e9" * (cache.max_key_len // 2 + 1),), {}),  # too long once UTF-8 encoded
    ]
    for args, kwargs in cases:
        first = f(*args, **kwargs)
        with SlowCalls() as slow:
            again = f(*args, **kwargs)
        assert slow.keys == [None], (args, kwargs)
        assert again == first == [args[0], kwargs.get("y", args[1] if len(args) > 1 else 0)]
    assert f(True) == [True, 0] and f(1) == [1, 0]  # True and 1 are different keys


def test_keys_between_the_limits_hit_in_c(cache: Cache) -> None:
    """A key too long to be handed over as checked but never shortened (a long
    qualified name, say) is still served from the object cache in C."""
    @cache.cached(ttl=60)
    def f(x: str) -> list[str]:
        return [x]

    arg = "y" * (cache._short_limit + 1)
    assert cache._short_limit < len(f.key(arg)) <= cache.max_key_len
    with SlowCalls() as slow:
        first = f(arg)
    assert slow.keys == [None]  # the slow path builds (and checks) the key itself
    with SlowCalls() as slow:
        assert f(arg) is first
    assert slow.keys == []


def test_no_hot_path_without_object_cache_or_for_async(segname: str) -> None:
    c = Cache(CacheConfig(name=segname, c_memory_size_mb=8, object_cache=False))
    try:
        @c.cached(ttl=60)
        def f(x: int) -> list[int]:
            return [x]

        @c.cached(ttl=60)
        async def af(x: int) -> list[int]:
            return [x]

        assert f(3) == [3]
        with SlowCalls() as slow:
            assert f(3) == [3]
        assert slow.keys == [None]
        assert asyncio.run(af(4)) == [4]
        assert asyncio.run(af(4)) == [4]  # a coroutine each time, from the Python path
    finally:
        c.close()


def test_async_keeps_the_python_path(cache: Cache) -> None:
    @cache.cached(ttl=60)
    async def af(x: int) -> dict[str, int]:
        return {"x": x}

    first = asyncio.run(af(5))
    coro = af(5)
    assert asyncio.iscoroutine(coro)
    assert asyncio.run(coro) == first


def test_hits_do_not_leak_references_or_memory(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: int) -> dict[str, int]:
        return {"x": x}

    obj = f(11)
    assert f(11) is obj
    for _ in range(1000):  # warm up: interned keys, freelists
        f(11)
    rc = sys.getrefcount(obj)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100_000):
            f(11)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert sys.getrefcount(obj) == rc
    assert after - before < 4096, after - before
    assert cache.get_statistics().functions[f._stats_name].hits == 101_001


def test_slow_path_refcounts(cache: Cache) -> None:
    @cache.cached(ttl=60)
    def f(x: Any, **kw: Any) -> list[Any]:
        return [x]

    arg = "k" * (cache._short_limit + 5)
    f(arg)
    f(1, a=2)
    rc_arg, rc_f = sys.getrefcount(arg), sys.getrefcount(f)
    for _ in range(10_000):
        f(arg)
        f(1, a=2)
        f(1, a=2, b=3, c=4, d=5, e=6, g=7, h=8, i=9)  # more than the C stack buffer
    assert sys.getrefcount(arg) == rc_arg and sys.getrefcount(f) == rc_f


def test_gc_collects_a_self_referencing_function() -> None:
    name = new_name()
    c = Cache(CacheConfig(name=name, c_memory_size_mb=8))
    try:
        def make() -> weakref.ref[Any]:
            @c.cached(ttl=60)
            def fact(n: int) -> int:
                return 1 if n <= 1 else n * fact(n - 1)  # fact -> closure -> fact

            assert fact(5) == 120 and fact(5) == 120
            # The C fields are visible to the collector.
            assert any(r is c._l0 for r in gc.get_referents(fact))
            return weakref.ref(fact)

        gc.collect()
        ref = make()
        assert ref() is not None
        gc.collect()
        assert ref() is None
    finally:
        c.close()
        unlink_segment(name)


def test_closed_cache_raises_on_a_hot_hit(segname: str) -> None:
    c = Cache(CacheConfig(name=segname, c_memory_size_mb=8))

    @c.cached(ttl=60)
    def f(x: int) -> list[int]:
        return [x]

    f(1)
    c.close()
    with pytest.raises(SegmentClosedError):
        f(1)
