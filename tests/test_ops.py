"""Every Segment operation on one handle, with its edge cases."""

from __future__ import annotations

import os
from typing import Any

import pytest

from shmcache import (
    CounterOverflowError,
    ItemInfo,
    NotAnIntegerError,
    Segment,
    VersionMismatchError,
)

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)


# -- get / set ----------------------------------------------------------------------


def test_set_get_bytes_key(seg: Segment) -> None:
    v = seg.set(b"k", b"hello")
    assert isinstance(v, int) and v > 0
    assert seg.get(b"k") == b"hello"


def test_str_and_bytes_keys_are_the_same_key(seg: Segment) -> None:
    seg.set("user:é", b"1")
    assert seg.get("user:é".encode()) == b"1"
    seg.set(b"plain", b"2")
    assert seg.get("plain") == b"2"
    assert seg.get(bytearray(b"plain")) == b"2"
    assert seg.get(memoryview(b"plain")) == b"2"


@pytest.mark.parametrize("make", [bytes, bytearray, lambda b: memoryview(b),
                                  lambda b: memoryview(bytearray(b))])
def test_value_types(seg: Segment, make) -> None:  # type: ignore[no-untyped-def]
    seg.set("k", make(b"some value"))
    got = seg.get("k")
    assert got == b"some value"
    assert type(got) is bytes


def test_memoryview_slice_value(seg: Segment) -> None:
    data = bytearray(b"0123456789")
    seg.set("k", memoryview(data)[2:6])
    assert seg.get("k") == b"2345"


def test_empty_value(seg: Segment) -> None:
    seg.set("empty", b"")
    assert seg.get("empty") == b""
    assert seg.get("empty", b"default") == b""
    assert "empty" in seg
    info = seg.info("empty")
    assert info is not None and info.value_len == 0


def test_get_default_on_miss(seg: Segment) -> None:
    assert seg.get("missing") is None
    sentinel = object()
    assert seg.get("missing", sentinel) is sentinel
    assert seg.get_with_info("missing") is None
    assert seg.info("missing") is None
    assert seg.version("missing") is None


def test_binary_values_and_keys(seg: Segment) -> None:
    key = bytes(range(1, 200))
    val = bytes(range(256)) * 4
    seg.set(key, val)
    assert seg.get(key) == val
    nul_key = b"a\x00b"
    seg.set(nul_key, b"x")
    assert seg.get(b"a") is None
    assert seg.get(nul_key) == b"x"


def test_overwrite_changes_size(seg: Segment) -> None:
    for n in (10, 1000, 10, 100_000, 3, 70_000, 0, 5):
        val = os.urandom(n)
        seg.set("k", val)
        assert seg.get("k") == val
    assert len(seg) == 1


@pytest.mark.parametrize("n", [64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 200_000, 500_000])
def test_large_values(seg: Segment, n: int) -> None:
    if n > seg.config()["max_value_len"]:
        pytest.skip("larger than this segment's max_value_len")
    val = os.urandom(n)
    seg.set("big", val)
    assert seg.get("big") == val
    got = seg.get_with_info("big")
    assert got is not None and got[0] == val and got[1].value_len == n


def test_value_of_exactly_max_value_len(seg: Segment) -> None:
    mvl = int(seg.config()["max_value_len"])
    assert mvl > 64 * 1024
    val = os.urandom(mvl)
    seg.set("max", val)
    assert seg.get("max") == val
    with seg.pin("max") as mv:
        assert mv == val


def test_large_value_then_small_get_in_same_thread(seg: Segment) -> None:
    # The wrapper grows its per-thread buffer; later small reads must still be right.
    big = os.urandom(300_000)
    seg.set("big", big)
    seg.set("small", b"s")
    assert seg.get("big") == big
    assert seg.get("small") == b"s"
    assert seg.get("big") == big


def test_key_of_exactly_max_key_len(seg: Segment) -> None:
    mkl = int(seg.config()["max_key_len"])
    k = b"k" * mkl
    seg.set(k, b"v")
    assert seg.get(k) == b"v"
    assert k in list(seg.keys())


# -- versions, info ----------------------------------------------------------------


def test_get_with_info_and_info(seg: Segment) -> None:
    ver = seg.set("k", b"abc", flags=7)
    got = seg.get_with_info("k")
    assert got is not None
    val, info = got
    assert val == b"abc"
    assert isinstance(info, ItemInfo)
    assert info.version == ver
    assert info.value_len == 3
    assert info.flags == 7
    assert info.expires_at is None
    assert seg.info("k") == info
    assert seg.version("k") == ver


def test_every_write_bumps_version(seg: Segment) -> None:
    seen = [seg.set("k", b"1")]
    seen.append(seg.set("k", b"2"))
    r = seg.replace("k", b"3")
    assert r is not None
    seen.append(r)
    assert seg.touch("k", 100)
    seen.append(seg.version("k"))
    seen.append(seg.set("k", b"41"))
    seg.incr("k")
    seen.append(seg.version("k"))
    assert seg.touch("k", None)
    seen.append(seg.version("k"))
    assert all(isinstance(v, int) for v in seen)
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen


def test_versions_never_reused_after_delete(seg: Segment) -> None:
    seen = set()
    last = 0
    for i in range(50):
        v = seg.set("k", str(i).encode())
        assert v not in seen and v > last
        seen.add(v)
        last = v
        assert seg.delete("k")
    # Versions are segment-wide: another key never gets a used version either.
    v2 = seg.set("other", b"x")
    assert v2 not in seen


def test_flags_round_trip(seg: Segment) -> None:
    for f in (0, 1, 0x1234, 0xFFFF):
        seg.set("k", b"v", flags=f)
        info = seg.info("k")
        assert info is not None and info.flags == f
    with pytest.raises(ValueError):
        seg.set("k", b"v", flags=0x10000)
    with pytest.raises(ValueError):
        seg.set("k", b"v", flags=-1)


def test_incr_keeps_flags_or_at_least_value(seg: Segment) -> None:
    seg.set("n", b"5", flags=3)
    assert seg.incr("n") == 6
    assert seg.get("n") == b"6"


# -- add / replace -----------------------------------------------------------------


def test_add(seg: Segment) -> None:
    v = seg.add("k", b"first")
    assert isinstance(v, int)
    assert seg.add("k", b"second") is None
    assert seg.get("k") == b"first"
    assert seg.version("k") == v
    seg.delete("k")
    assert seg.add("k", b"third") is not None
    assert seg.get("k") == b"third"


def test_replace(seg: Segment) -> None:
    assert seg.replace("k", b"x") is None
    assert "k" not in seg
    seg.set("k", b"a")
    v = seg.replace("k", b"b")
    assert v is not None and v == seg.version("k")
    assert seg.get("k") == b"b"


# -- delete / compare-and-set ------------------------------------------------------


def test_delete(seg: Segment) -> None:
    assert seg.delete("nope") is False
    seg.set("k", b"v")
    assert seg.delete("k") is True
    assert seg.get("k") is None
    assert seg.delete("k") is False


def test_delete_expect_version(seg: Segment) -> None:
    v1 = seg.set("k", b"a")
    v2 = seg.set("k", b"b")
    with pytest.raises(VersionMismatchError):
        seg.delete("k", expect_version=v1)
    assert seg.get("k") == b"b"
    assert seg.delete("k", expect_version=v2) is True
    assert "k" not in seg


def test_delete_expect_version_on_missing_key(seg: Segment) -> None:
    # Absent key: nothing to delete, whatever version was expected.
    assert seg.delete("nope", expect_version=12345) is False


def test_set_compare_and_set(seg: Segment) -> None:
    v1 = seg.set("k", b"a")
    v2 = seg.set("k", b"b", expect_version=v1)
    assert v2 > v1
    with pytest.raises(VersionMismatchError):
        seg.set("k", b"c", expect_version=v1)
    assert seg.get("k") == b"b"
    assert seg.version("k") == v2


def test_cas_on_missing_key_fails(seg: Segment) -> None:
    # A CAS against a version that no longer exists must not create the key.
    v = seg.set("k", b"a")
    seg.delete("k")
    with pytest.raises((VersionMismatchError, KeyError)):
        seg.set("k", b"b", expect_version=v)
    assert "k" not in seg


# -- touch -------------------------------------------------------------------------


def test_touch(seg: Segment) -> None:
    assert seg.touch("nope", 10) is False
    seg.set("k", b"v")
    now = seg.now()
    assert seg.touch("k", 10)
    info = seg.info("k")
    assert info is not None and info.expires_at is not None
    assert now + 9 <= info.expires_at <= now + 11 + 1
    assert seg.get("k") == b"v"
    assert seg.touch("k", None)
    info = seg.info("k")
    assert info is not None and info.expires_at is None


# -- incr / decr -------------------------------------------------------------------


def test_incr_decr(seg: Segment) -> None:
    with pytest.raises(KeyError):
        seg.incr("c")
    with pytest.raises(KeyError):
        seg.decr("c")
    assert "c" not in seg
    assert seg.incr("c", initial=10) == 11
    assert seg.get("c") == b"11"
    assert seg.incr("c", 5) == 16
    assert seg.decr("c") == 15
    assert seg.decr("c", 20) == -5
    assert seg.get("c") == b"-5"
    assert seg.incr("c", 0) == -5
    assert seg.decr("d", 3, initial=0) == -3


def test_incr_on_existing_decimal_value(seg: Segment) -> None:
    seg.set("n", b"41")
    assert seg.incr("n") == 42
    seg.set("m", b"-7")
    assert seg.incr("m", 7) == 0
    assert seg.get("m") == b"0"


def test_incr_initial_ignored_when_present(seg: Segment) -> None:
    seg.set("n", b"100")
    assert seg.incr("n", 1, initial=0) == 101


@pytest.mark.parametrize("bad", [b"abc", b"", b"1.5", b"12a", b" ", b"0x10",
                                 b"99999999999999999999999"])
def test_incr_not_an_integer(seg: Segment, bad: bytes) -> None:
    seg.set("n", bad)
    with pytest.raises(NotAnIntegerError):
        seg.incr("n")
    assert seg.get("n") == bad


def test_incr_overflow(seg: Segment) -> None:
    seg.set("n", str(INT64_MAX - 1).encode())
    assert seg.incr("n") == INT64_MAX
    with pytest.raises(CounterOverflowError):
        seg.incr("n")
    assert seg.get("n") == str(INT64_MAX).encode()
    seg.set("m", str(INT64_MIN + 1).encode())
    assert seg.decr("m") == INT64_MIN
    with pytest.raises(CounterOverflowError):
        seg.decr("m")
    assert seg.get("m") == str(INT64_MIN).encode()
    with pytest.raises(CounterOverflowError):
        seg.incr("n", 1 << 63)
    with pytest.raises(CounterOverflowError):
        seg.incr("fresh", 1, initial=INT64_MAX)
    assert "fresh" not in seg


def test_incr_type_errors(seg: Segment) -> None:
    seg.set("n", b"1")
    with pytest.raises(TypeError):
        seg.incr("n", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seg.incr("n", True)


# -- contains / len / clear / keys --------------------------------------------------


def test_contains_and_len(seg: Segment) -> None:
    assert len(seg) == 0
    assert "a" not in seg
    assert not seg.contains(b"a")
    for i in range(10):
        seg.set(f"k{i}", b"v")
    assert len(seg) == 10
    assert "k3" in seg and b"k3" in seg and seg.contains("k3")
    seg.delete("k3")
    assert "k3" not in seg
    assert len(seg) == 9
    seg.set("k0", b"again")  # overwrite does not change the count
    assert len(seg) == 9


def test_contains_does_not_count_as_hit(seg: Segment) -> None:
    seg.set("k", b"v")
    before = seg.stats().counters
    for _ in range(5):
        assert "k" in seg
        assert "z" not in seg
    after = seg.stats().counters
    assert after["hits"] == before["hits"]


def test_clear(seg: Segment) -> None:
    for i in range(100):
        seg.set(f"k{i}", os.urandom(i * 37))
    seg.clear()
    assert len(seg) == 0
    assert list(seg.keys()) == []
    assert seg.get("k5") is None
    st = seg.stats()
    assert st.entries == 0
    seg.set("k5", b"back")
    assert seg.get("k5") == b"back"
    assert seg.verify() == []


def test_keys_each_once(seg: Segment) -> None:
    n = 3000
    want = {f"key:{i}".encode() for i in range(n)}
    for k in want:
        seg.set(k, b"x" * 10)
    got = list(seg.keys())
    assert len(got) == n, "some key seen twice or missed"
    assert set(got) == want
    assert all(type(k) is bytes for k in got)


def test_keys_small_batches(seg: Segment) -> None:
    want = {(f"k{i}:" + "x" * (i % 200)).encode() for i in range(1000)}
    for k in want:
        seg.set(k, b"")
    got = list(seg.keys(batch_bytes=1))  # wrapper rounds up to one max key
    assert len(got) == len(want)
    assert set(got) == want


def test_keys_empty(seg: Segment) -> None:
    assert list(seg.keys()) == []


# -- pin -----------------------------------------------------------------------------


def test_pin_basic(seg: Segment) -> None:
    assert seg.pin("nope") is None
    ver = seg.set("k", b"pinned bytes", flags=9)
    p = seg.pin("k")
    assert p is not None
    assert p.view == b"pinned bytes"
    assert p.view.readonly
    assert p.info.version == ver and p.info.flags == 9
    with pytest.raises(TypeError):
        p.view[0] = 1  # type: ignore[index]
    p.release()
    p.release()  # idempotent
    with pytest.raises(ValueError):
        bytes(p.view)


def test_pin_survives_delete_and_replace(seg: Segment) -> None:
    small = b"s" * 100
    big = os.urandom(150_000)
    seg.set("a", small)
    seg.set("b", big)
    pa = seg.pin("a")
    pb = seg.pin("b")
    assert pa is not None and pb is not None
    seg.delete("a")
    seg.set("b", b"replaced")
    # Churn the allocator so freed memory would be reused if the pin did not hold it.
    for i in range(200):
        seg.set(f"churn{i}", bytes([i % 256]) * 100)
        seg.set(f"bigchurn{i % 5}", bytes([i % 256]) * 150_000)
    assert pa.view == small
    assert pb.view == big
    assert seg.get("a") is None
    assert seg.get("b") == b"replaced"
    pa.release()
    pb.release()
    assert seg.verify() == []


def test_pin_survives_clear(seg: Segment) -> None:
    seg.set("k", b"v" * 1000)
    with seg.pin("k") as mv:
        seg.clear()
        for i in range(100):
            seg.set(f"x{i}", b"w" * 1000)
        assert mv == b"v" * 1000
    assert seg.verify() == []


def test_pin_counted_in_slot_stats(seg: Segment) -> None:
    seg.set("k", b"v")
    pins = [seg.pin("k") for _ in range(3)]
    me = [s for s in seg.stats().slots if s.pid == os.getpid()]
    assert me and me[0].pins == 3
    for p in pins:
        assert p is not None
        p.release()
    me = [s for s in seg.stats().slots if s.pid == os.getpid()]
    assert me[0].pins == 0


def test_pin_limit_per_process(seg: Segment) -> None:
    seg.set("k", b"v")
    pins = []
    try:
        with pytest.raises(ValueError):
            for _ in range(10_000):
                p = seg.pin("k")
                assert p is not None
                pins.append(p)
        assert len(pins) >= 64
        assert all(p.view == b"v" for p in pins)
    finally:
        for p in pins:
            p.release()
    with seg.pin("k") as mv:  # usable again once released
        assert mv == b"v"


def test_pin_memory_returned_after_release(seg: Segment) -> None:
    seg.set("k", os.urandom(200_000))
    p = seg.pin("k")
    seg.delete("k")
    p.release()  # type: ignore[union-attr]
    st = seg.stats()
    assert st.entries == 0
    assert st.used_bytes == 0
    assert st.pages_free == st.pages_total


# -- stats / config ------------------------------------------------------------------


def test_stats_counters_move(seg: Segment) -> None:
    c0 = seg.stats().counters
    seg.set("a", b"1")
    seg.set("b", b"2")
    seg.get("a")
    seg.get("a")
    seg.get("zz")
    seg.delete("b")
    seg.touch("a", 50)
    seg.incr("n", initial=0)
    st = seg.stats()
    c = st.counters
    assert c["sets"] - c0["sets"] >= 2
    assert c["hits"] - c0["hits"] == 2
    assert c["misses"] - c0["misses"] == 1
    assert c["deletes"] - c0["deletes"] == 1
    assert c["touches"] - c0["touches"] == 1
    assert c["incrs"] - c0["incrs"] == 1
    assert st.entries == 2 == len(seg)
    assert st.used_bytes > 0 and st.payload_bytes > 0
    assert st.payload_bytes <= st.used_bytes
    assert 0.0 <= st.hit_ratio <= 1.0
    assert st.hit_ratio == pytest.approx(c["hits"] / (c["hits"] + c["misses"]))


def test_stats_slot_counters_include_our_pid(seg: Segment) -> None:
    seg.set("a", b"1")
    seg.get("a")
    st = seg.stats()
    mine = [s for s in st.slots if s.pid == os.getpid()]
    assert len(mine) == 1
    s = mine[0]
    assert s.slot == seg.slot
    assert s.state == "live"
    assert s.counters["sets"] >= 1 and s.counters["hits"] >= 1
    assert st.live_slots >= 1


def test_stats_memory_shape(seg: Segment) -> None:
    st = seg.stats()
    assert st.size_bytes == 8 << 20
    assert 0 < st.data_bytes < st.size_bytes
    assert st.pages_total > 0 and st.pages_free == st.pages_total
    assert st.used_bytes == 0 and st.entries == 0
    assert len(st.classes) >= 1
    assert st.page_bytes == 64 * 1024
    for i in range(50):
        seg.set(f"k{i}", b"x" * (i * 100))
    st = seg.stats()
    assert sum(c.entries for c in st.classes) == st.entries == 50
    assert sum(c.used_bytes for c in st.classes) == st.used_bytes
    assert st.pages_free < st.pages_total


def test_config_returns_what_was_asked(segname: str) -> None:
    with Segment.create(segname, size=16 << 20, max_key_len=100, max_value_len=1 << 20,
                        max_entries=5000, policy="lru", stripes=16, max_slots=32,
                        journal_bytes=64 << 10, lock_timeout=2.5,
                        page_bytes=128 << 10) as s:
        c = s.config()
        assert c["size"] == 16 << 20
        assert c["max_key_len"] == 100
        assert c["max_value_len"] == 1 << 20
        assert c["max_entries"] == 5000
        assert c["policy"] == "lru"
        assert c["stripes"] == 16
        assert c["max_slots"] == 32
        assert c["journal_bytes"] == 64 << 10
        assert c["lock_timeout_ms"] == 2500
        assert c["page_bytes"] == 128 << 10
        st = s.stats()
        assert st.policy == "lru" and st.max_slots == 32 and st.nstripes == 16
        assert st.max_key_len == 100 and st.max_value_len == 1 << 20
        assert st.page_bytes == 128 << 10 and st.max_entries == 5000


def test_config_defaults(seg: Segment) -> None:
    c = seg.config()
    assert c["size"] == 8 << 20
    assert c["max_key_len"] == 250
    assert c["policy"] == "s3fifo"
    assert c["page_bytes"] == 64 * 1024
    assert c["max_slots"] == 256
    assert c["lock_timeout_ms"] == 10000
    assert 0 < int(c["max_value_len"]) < 8 << 20
    st = seg.stats()
    assert st.max_value_len == c["max_value_len"]


@pytest.mark.parametrize("policy", ["lru", "sieve", "s3fifo"])
def test_each_policy_basic_ops(segname: str, policy: str) -> None:
    with Segment.create(segname, size=4 << 20, policy=policy) as s:
        for i in range(200):
            s.set(f"k{i}", str(i).encode())
        for i in range(200):
            assert s.get(f"k{i}") == str(i).encode()
        assert s.stats().policy == policy
        assert s.verify() == []


@pytest.mark.parametrize("policy", ["lru", "sieve", "s3fifo"])
def test_eviction_keeps_segment_sound(segname: str, policy: str) -> None:
    # Write far more than fits: old entries get evicted, never the whole cache at once,
    # every surviving value is intact, and the structures stay valid.
    with Segment.create(segname, size=2 << 20, policy=policy) as s:
        for i in range(3000):
            s.set(f"k{i}", (str(i).encode() + b":") * 300)
            if i % 500 == 499:
                assert len(s) > 0
        st = s.stats()
        assert st.evictions > 0
        assert len(s) > 100
        for k in s.keys():  # noqa: SIM118
            i = int(k[1:])
            assert s.get(k) in (None, (str(i).encode() + b":") * 300)
        assert s.verify() == []


def test_max_entries_bound(segname: str) -> None:
    with Segment.create(segname, size=4 << 20, max_entries=100) as s:
        for i in range(500):
            s.set(f"k{i}", b"v")
        assert len(s) <= 100
        st = s.stats()
        assert st.counters["evicted_entries"] > 0
        assert s.verify() == []


def test_journal(segname: str) -> None:
    with Segment.create(segname, size=4 << 20, journal_bytes=64 << 10) as s:
        v1 = s.set("a", b"1")
        s.delete("a")
        s.set("b", b"2", ttl=100)
        s.touch("b", 200)
        s.clear()
        recs = s.journal_drain()
        ops = [(r.op, r.key) for r in recs]
        assert ops[:4] == [("set", b"a"), ("delete", b"a"), ("set", b"b"), ("touch", b"b")]
        assert ops[4][0] == "clear"
        assert recs[0].version == v1
        assert recs[2].expires_at is not None
        assert s.journal_drain() == []


def test_journal_full_drops_oldest(segname: str) -> None:
    with Segment.create(segname, size=4 << 20, journal_bytes=4096) as s:
        for i in range(1000):
            s.set(f"key{i:05d}", b"v")
        st = s.stats()
        assert st.journal_dropped > 0
        recs = s.journal_drain()
        assert recs, "journal empty after overflow"
        assert recs[-1].key == b"key00999"
        nums = [int(r.key[3:]) for r in recs]
        assert nums == sorted(nums)


def test_context_manager_and_repr(segname: str) -> None:
    with Segment.create(segname, size=4 << 20) as s:
        assert "open" in repr(s)
    assert "closed" in repr(s)
    s.close()  # idempotent


def test_open_creates_then_attaches(segname: str) -> None:
    a = Segment.open(segname, size=4 << 20)
    a.set("k", b"v")
    b = Segment.open(segname, size=4 << 20)
    assert b.get("k") == b"v"
    b.close()
    a.close()


def test_segment_survives_last_close_until_unlinked(segname: str) -> None:
    a = Segment.create(segname, size=4 << 20)
    a.set("k", b"persist")
    a.close()
    b = Segment.attach(segname)
    assert b.get("k") == b"persist"
    b.close()


def test_hit_version_counts_a_hit_without_copying(seg: Segment) -> None:
    v1 = seg.set("hv", b"x" * 1000, flags=7)
    before = seg.stats().counters
    assert seg.hit_version("hv") == (v1, 7)
    assert seg.hit_version(b"absent") is None
    after = seg.stats().counters
    assert after["hits"] - before["hits"] == 1
    assert after["misses"] - before["misses"] == 1
    v2 = seg.set("hv", b"y")
    assert seg.hit_version("hv") == (v2, 0) and v2 > v1
    # the reference (cffi) path agrees with the direct-call one
    assert Segment.hit_version(seg, "hv") == (v2, 0)
    assert Segment.hit_version(seg, "absent") is None
    seg.set_clock(seg.now() + 10)
    seg.set("ttl", b"1", ttl=1)
    seg.set_clock(seg.now() + 5)
    assert seg.hit_version("ttl") is None  # expired counts as a miss


@pytest.mark.parametrize("direct", [True, False])
def test_get_info_add_delete_l0_get_direct_and_reference(seg: Segment, direct: bool) -> None:
    # The direct-call path and the cffi reference implementation must agree.
    def call(name: str, *a: Any, **kw: Any) -> Any:
        fn = getattr(seg, name) if direct else getattr(Segment, name).__get__(seg)
        return fn(*a, **kw)

    v1 = call("add", "k", b"one", flags=5)
    assert isinstance(v1, int) and call("add", "k", b"two") is None
    assert call("get_info", "k") == (b"one", v1, 5)
    assert call("get_info", "nope") is None
    objects: dict[Any, Any] = {"k": (v1, ["obj"], None), "m": (v1, "x", ("meta",))}
    assert call("l0_get", objects, "k", "DFLT") == ["obj"]
    assert call("l0_get", objects, "m", "DFLT") == "DFLT"        # meta: not a plain hit
    assert call("l0_get", objects, "absent", "DFLT") == "DFLT"
    v2 = seg.set("k", b"three")
    assert call("l0_get", objects, "k", "DFLT") == "DFLT"        # version moved on
    with pytest.raises(VersionMismatchError):
        call("delete", "k", expect_version=v1)
    assert call("delete", "k", expect_version=v2) is True
    assert call("delete", "k") is False
    big = b"b" * 5000
    call("add", "big", big)
    assert call("get_info", "big")[0] == big


def test_set_at_keeps_an_absolute_expiry(seg: Segment) -> None:
    at = seg.now() + 30.0
    v1 = seg.set_at("k", b"1", at)
    assert v1 and seg.info("k").expires_at == round(at * 1000) / 1000  # type: ignore[union-attr]
    assert seg.set_at("k", b"2", None, add=True) is None          # add: the key exists
    v2 = seg.set_at("k", b"3", at, expect_version=v1)             # a CAS rewrite ...
    info = seg.info("k")
    assert info is not None and info.version == v2 and seg.get("k") == b"3"
    assert info.expires_at == round(at * 1000) / 1000             # ... keeps the expiry
    with pytest.raises(VersionMismatchError):
        seg.set_at("k", b"4", at, expect_version=v1)
    assert seg.set_at("gone", b"x", seg.now() - 1) and seg.get("gone") is None
    assert seg.set_at("forever", b"x", None) and seg.info("forever").expires_at is None  # type: ignore[union-attr]
