"""TTL semantics, driven by the per-handle test clock (``set_clock``), never by sleeping."""

from __future__ import annotations

import time

import pytest

from shmcache import Segment

T0 = 2_000_000_000.0  # a fixed "now" (2033), far from the real clock


@pytest.fixture
def clocked(seg: Segment) -> Segment:
    seg.set_clock(T0)
    return seg


def test_clock_hook(clocked: Segment) -> None:
    assert clocked.now() == T0
    clocked.set_clock(None)
    assert abs(clocked.now() - time.time()) < 60


def test_visible_before_expiry_gone_after(clocked: Segment) -> None:
    s = clocked
    s.set("k", b"v", ttl=10)
    info = s.info("k")
    assert info is not None and info.expires_at == pytest.approx(T0 + 10)
    s.set_clock(T0 + 9.999)
    assert s.get("k") == b"v"
    assert "k" in s
    assert b"k" in list(s.keys())
    assert s.pin("k") is not None
    s.set_clock(T0 + 10)
    assert s.get("k") is None
    assert s.get("k", b"dflt") == b"dflt"
    assert "k" not in s
    assert b"k" not in list(s.keys())
    assert s.info("k") is None
    assert s.get_with_info("k") is None
    assert s.pin("k") is None
    assert s.verify() == []


def test_expired_is_absent_for_writes(clocked: Segment) -> None:
    s = clocked
    s.set("a", b"1", ttl=5)
    s.set("r", b"1", ttl=5)
    s.set("n", b"7", ttl=5)
    s.set("t", b"1", ttl=5)
    s.set("d", b"1", ttl=5)
    s.set_clock(T0 + 6)
    assert s.add("a", b"2") is not None, "add refused over an expired entry"
    assert s.get("a") == b"2"
    assert s.info("a").expires_at is None  # type: ignore[union-attr]
    assert s.replace("r", b"2") is None, "replace revived an expired entry"
    assert "r" not in s
    with pytest.raises(KeyError):
        s.incr("n")
    assert s.incr("n", initial=100) == 101
    assert s.touch("t", 100) is False
    assert "t" not in s
    assert s.delete("d") is False


def test_expiry_counts_as_miss(clocked: Segment) -> None:
    s = clocked
    s.set("k", b"v", ttl=1)
    c0 = s.stats().counters
    s.set_clock(T0 + 2)
    assert s.get("k") is None
    c1 = s.stats().counters
    assert c1["hits"] == c0["hits"]
    assert c1["misses"] == c0["misses"] + 1
    assert c1["evicted_expired_read"] == c0["evicted_expired_read"] + 1
    assert s.stats().entries == 0


def test_overwrite_without_ttl_clears_expiry(clocked: Segment) -> None:
    s = clocked
    s.set("k", b"v", ttl=10)
    s.set("k", b"w")
    s.set_clock(T0 + 10_000)
    assert s.get("k") == b"w"


def test_touch_extends(clocked: Segment) -> None:
    s = clocked
    v0 = s.set("k", b"v", ttl=10)
    s.set_clock(T0 + 5)
    assert s.touch("k", 10)
    info = s.info("k")
    assert info is not None
    assert info.expires_at == pytest.approx(T0 + 15)
    assert info.version > v0
    s.set_clock(T0 + 12)
    assert s.get("k") == b"v"
    s.set_clock(T0 + 15)
    assert s.get("k") is None


def test_touch_shortens(clocked: Segment) -> None:
    s = clocked
    s.set("k", b"v", ttl=1000)
    assert s.touch("k", 1)
    s.set_clock(T0 + 1)
    assert "k" not in s


def test_touch_none_removes_expiry(clocked: Segment) -> None:
    s = clocked
    s.set("k", b"v", ttl=10)
    assert s.touch("k", None)
    info = s.info("k")
    assert info is not None and info.expires_at is None
    s.set_clock(T0 + 10 ** 6)
    assert s.get("k") == b"v"
    assert s.sweep_expired() == 0


def test_incr_with_ttl(clocked: Segment) -> None:
    s = clocked
    assert s.incr("c", initial=0, ttl=10) == 1
    info = s.info("c")
    assert info is not None and info.expires_at == pytest.approx(T0 + 10)
    s.set_clock(T0 + 10)
    assert "c" not in s


def test_fractional_ttl(clocked: Segment) -> None:
    s = clocked
    s.set("k", b"v", ttl=1.5)
    s.set_clock(T0 + 1.499)
    assert "k" in s
    s.set_clock(T0 + 1.5)
    assert "k" not in s


def test_sweep_expired(clocked: Segment) -> None:
    s = clocked
    for i in range(100):
        s.set(f"e{i}", b"x" * (i * 10), ttl=10 + (i % 3))
    for i in range(50):
        s.set(f"p{i}", b"y" * 20)
    for i in range(20):
        s.set(f"late{i}", b"z", ttl=1000)
    c0 = s.stats().counters
    assert s.sweep_expired() == 0
    s.set_clock(T0 + 20)
    assert s.sweep_expired(10) == 10
    assert s.sweep_expired() == 90
    assert s.sweep_expired() == 0
    c1 = s.stats().counters
    assert c1["evicted_expired_sweep"] - c0["evicted_expired_sweep"] == 100
    assert c1["evicted_expired_read"] == c0["evicted_expired_read"]
    assert len(s) == 70
    assert s.stats().entries == 70
    keys = set(s.keys())
    assert keys == {f"p{i}".encode() for i in range(50)} | {f"late{i}".encode()
                                                           for i in range(20)}
    assert s.stats().expirations >= 100
    assert s.verify() == []


def test_sweep_frees_memory(clocked: Segment) -> None:
    s = clocked
    for i in range(20):
        s.set(f"big{i}", b"b" * 100_000, ttl=5)
    assert s.stats().used_bytes > 0
    s.set_clock(T0 + 5)
    assert s.sweep_expired() == 20
    st = s.stats()
    assert st.used_bytes == 0 and st.entries == 0
    assert st.pages_free == st.pages_total


def test_pinned_expired_value_stays_readable(clocked: Segment) -> None:
    s = clocked
    s.set("k", b"pinned", ttl=1)
    p = s.pin("k")
    assert p is not None
    s.set_clock(T0 + 2)
    assert s.sweep_expired() == 1
    assert p.view == b"pinned"
    p.release()
    assert s.verify() == []


def test_second_handle_same_clock(clocked: Segment, segname: str) -> None:
    s = clocked
    s.set("k", b"v", ttl=10)
    with Segment.attach(segname) as t:
        t.set_clock(T0 + 9)
        assert t.get("k") == b"v"
        info = t.info("k")
        assert info is not None and info.expires_at == pytest.approx(T0 + 10)
        t.set_clock(T0 + 10)
        assert t.get("k") is None
        assert "k" not in t
        # the first handle's clock is its own: it still sees the time it was given
        assert s.now() == T0


def test_expiry_is_absolute_across_handles(seg: Segment, segname: str) -> None:
    # A writer whose clock is an hour behind sets a 10 s TTL: to a handle on the real
    # clock the entry expired long ago.
    seg.set_clock(time.time() - 3600)
    seg.set("k", b"v", ttl=10)
    assert seg.get("k") == b"v"
    with Segment.attach(segname) as t:
        assert t.get("k") is None
        assert "k" not in t
        assert b"k" not in list(t.keys())


def test_clock_is_per_handle(clocked: Segment, segname: str) -> None:
    with Segment.attach(segname) as t:
        assert abs(t.now() - time.time()) < 60
        t.set_clock(5.0)
        assert t.now() == 5.0
        assert clocked.now() == T0
