"""Every error the Segment API promises, raised where it is promised and nowhere else."""

from __future__ import annotations

import os

import posix_ipc
import pytest
from _helpers import make_raw_object, patch_bytes, read_bytes, run_isolated, shm_path

from shmcache import (
    ForeignSegmentError,
    IncompatibleSegmentError,
    KeyTooLongError,
    NotBytesError,
    Segment,
    SegmentClosedError,
    SegmentCorruptError,
    SegmentError,
    SegmentFullError,
    SegmentNotFoundError,
    SegmentNotReadyError,
    ShmCacheError,
    ValueTooLargeError,
    segment_exists,
    unlink_segment,
)
from shmcache.segment import lib

REFUSALS = (ForeignSegmentError, SegmentCorruptError, IncompatibleSegmentError,
            SegmentNotReadyError)


# -- keys ------------------------------------------------------------------------------


def _key_ops(seg: Segment, key: object) -> list:  # type: ignore[type-arg]
    return [
        lambda: seg.set(key, b"v"),  # type: ignore[arg-type]
        lambda: seg.add(key, b"v"),  # type: ignore[arg-type]
        lambda: seg.replace(key, b"v"),  # type: ignore[arg-type]
        lambda: seg.get(key),  # type: ignore[arg-type]
        lambda: seg.get_with_info(key),  # type: ignore[arg-type]
        lambda: seg.info(key),  # type: ignore[arg-type]
        lambda: seg.pin(key),  # type: ignore[arg-type]
        lambda: seg.delete(key),  # type: ignore[arg-type]
        lambda: seg.touch(key, 10),  # type: ignore[arg-type]
        lambda: seg.incr(key, initial=0),  # type: ignore[arg-type]
        lambda: seg.contains(key),  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize("key", [b"", "", b"k" * 251, "é" * 126])
def test_key_too_long_or_empty(seg: Segment, key: object) -> None:
    for i, op in enumerate(_key_ops(seg, key)):
        with pytest.raises(KeyTooLongError):
            op()
            pytest.fail(f"op #{i} accepted key of {len(key)} chars")  # type: ignore[arg-type]
    assert len(seg) == 0
    assert issubclass(KeyTooLongError, ValueError)


def test_key_limit_follows_config(segname: str) -> None:
    with Segment.create(segname, size=4 << 20, max_key_len=16) as s:
        s.set(b"k" * 16, b"ok")
        with pytest.raises(KeyTooLongError):
            s.set(b"k" * 17, b"no")
        with pytest.raises(KeyTooLongError):
            s.get(b"k" * 17)


@pytest.mark.parametrize("key", [1, None, 1.5, object(), ["k"]])
def test_key_wrong_type(seg: Segment, key: object) -> None:
    for op in _key_ops(seg, key):
        with pytest.raises(NotBytesError):
            op()
    assert issubclass(NotBytesError, TypeError)


# -- values ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, "text", None, {"a": 1}, 1.0, [b"x"]])
def test_value_wrong_type(seg: Segment, value: object) -> None:
    for op in (seg.set, seg.add, seg.replace):
        with pytest.raises(NotBytesError):
            op("k", value)  # type: ignore[arg-type]
    seg.set("k", b"old")
    with pytest.raises(NotBytesError):
        seg.replace("k", value)  # type: ignore[arg-type]
    with pytest.raises(NotBytesError):
        seg.set("k", value)  # type: ignore[arg-type]
    assert seg.get("k") == b"old"


def test_value_too_large(seg: Segment) -> None:
    mvl = int(seg.config()["max_value_len"])
    with pytest.raises(ValueTooLargeError):
        seg.set("k", b"x" * (mvl + 1))
    with pytest.raises(ValueTooLargeError):
        seg.add("k", b"x" * (mvl + 1))
    seg.set("k", b"small")
    with pytest.raises(ValueTooLargeError):
        seg.replace("k", b"x" * (mvl + 1))
    with pytest.raises(ValueTooLargeError):
        seg.set("k", memoryview(bytearray(mvl + 1)))
    assert seg.get("k") == b"small"
    assert issubclass(ValueTooLargeError, ValueError)


def test_value_too_large_follows_config(segname: str) -> None:
    with Segment.create(segname, size=4 << 20, max_value_len=1000) as s:
        s.set("k", b"x" * 1000)
        with pytest.raises(ValueTooLargeError):
            s.set("k", b"x" * 1001)
        assert s.get("k") == b"x" * 1000


def test_segment_full_when_everything_is_pinned(segname: str) -> None:
    with Segment.create(segname, size=4 << 20) as s:
        mvl = int(s.config()["max_value_len"])
        chunk = b"p" * (mvl // 2)
        pins = []
        full = None
        try:
            for i in range(10_000):
                try:
                    s.set(f"k{i}", chunk)
                except SegmentFullError as e:
                    full = e
                    break
                p = s.pin(f"k{i}")
                if p is None:  # evicted already: nothing left to evict but pins
                    continue
                pins.append(p)
            if full is None:
                with pytest.raises(SegmentFullError):
                    s.set("big", b"b" * mvl)
            assert s.stats().counters["set_failures"] >= 1
            for p in pins:
                assert p.view == chunk  # pinned bytes never reused for the failed write
        finally:
            for p in pins:
                p.release()
        # Once the pins are gone the memory is usable again.
        s.set("big", b"b" * mvl)
        assert s.get("big") == b"b" * mvl
        assert s.verify() == []
    assert issubclass(SegmentFullError, MemoryError)


# -- ttl arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, 0.0, -1, -0.5])
def test_bad_ttl_value(seg: Segment, ttl: float) -> None:
    seg.set("n", b"1")
    with pytest.raises(ValueError):
        seg.set("k", b"v", ttl=ttl)
    with pytest.raises(ValueError):
        seg.add("k", b"v", ttl=ttl)
    with pytest.raises(ValueError):
        seg.replace("n", b"v", ttl=ttl)
    with pytest.raises(ValueError):
        seg.touch("n", ttl)
    with pytest.raises(ValueError):
        seg.incr("c", initial=0, ttl=ttl)
    assert "k" not in seg and "c" not in seg
    assert seg.get("n") == b"1"


@pytest.mark.parametrize("ttl", ["10", b"10", [10], True, object()])
def test_bad_ttl_type(seg: Segment, ttl: object) -> None:
    seg.set("n", b"1")
    with pytest.raises(TypeError):
        seg.set("k", b"v", ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seg.touch("n", ttl)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        seg.incr("c", initial=0, ttl=ttl)  # type: ignore[arg-type]
    assert "k" not in seg and "c" not in seg


def test_tiny_positive_ttl_is_accepted(seg: Segment) -> None:
    seg.set_clock(1_000_000)
    seg.set("k", b"v", ttl=0.0001)  # rounds up to 1 ms, never to "no expiry"
    info = seg.info("k")
    assert info is not None and info.expires_at is not None


# -- closed handles --------------------------------------------------------------------


def test_closed_handle(segname: str) -> None:
    s = Segment.create(segname, size=4 << 20)
    s.set("k", b"v")
    s.close()
    calls = [
        lambda: s.get("k"), lambda: s.get_with_info("k"), lambda: s.info("k"),
        lambda: s.version("k"), lambda: s.pin("k"), lambda: s.contains("k"),
        lambda: "k" in s, lambda: len(s), lambda: list(s.keys()),
        lambda: s.set("k", b"v"), lambda: s.add("k", b"v"), lambda: s.replace("k", b"v"),
        lambda: s.delete("k"), lambda: s.touch("k", 1), lambda: s.incr("k", initial=1),
        lambda: s.decr("k", initial=1), lambda: s.clear(), lambda: s.sweep_expired(),
        lambda: s.reap(), lambda: s.verify(), lambda: s.stats(), lambda: s.config(),
        lambda: s.slot, lambda: s.set_clock(1.0), lambda: s.now(),
        lambda: s.journal_drain(),
    ]
    for i, c in enumerate(calls):
        with pytest.raises(SegmentClosedError):
            c()
            pytest.fail(f"call #{i} worked on a closed handle")
    s.close()  # idempotent
    assert issubclass(SegmentClosedError, ShmCacheError)


def test_pin_released_after_close_is_harmless(segname: str) -> None:
    s = Segment.create(segname, size=4 << 20)
    s.set("k", b"v")
    p = s.pin("k")
    assert p is not None
    s.close()
    p.release()


# -- names and attach -------------------------------------------------------------------


def test_attach_missing(segname: str) -> None:
    with pytest.raises(SegmentNotFoundError):
        Segment.attach(segname)
    assert issubclass(SegmentNotFoundError, FileNotFoundError)
    assert not segment_exists(segname)


def test_create_existing(seg: Segment, segname: str) -> None:
    with pytest.raises(FileExistsError):
        Segment.create(segname, size=4 << 20)
    assert seg.get("x") is None  # the existing one is untouched


@pytest.mark.parametrize("name", ["", "/", "a/b", 5])
def test_bad_names(name: object) -> None:
    with pytest.raises(ValueError):
        Segment.attach(name)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Segment.create(name, size=4 << 20)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [dict(size=-1), dict(policy="fifo"), dict(max_key_len=-5),
                                dict(lock_timeout=0), dict(stripes=3),
                                dict(page_bytes=1000), dict(max_key_len=70000),
                                dict(size=4096), dict(stripes=2048)])
def test_bad_config(segname: str, kw: dict) -> None:  # type: ignore[type-arg]
    args = {"size": 4 << 20, **kw}
    with pytest.raises(ValueError):
        Segment.create(segname, **args).close()
    assert not segment_exists(segname), "a failed create left its object behind"


def test_garbage_object_refused(segname: str) -> None:
    make_raw_object(segname, os.urandom(1 << 20))
    # in a child: a crash on garbage must fail this test, not kill the test run
    assert run_isolated(_attach_expect_refusal, segname) in (
        "ForeignSegmentError", "SegmentCorruptError")
    assert segment_exists(segname)  # refusing never deletes


def _attach_expect_refusal(name: str) -> str:
    try:
        Segment.attach(name, wait=0.2).close()
    except REFUSALS as e:
        return type(e).__name__
    return "attached"


@pytest.mark.parametrize("size", [0, 1, 7, 100, 4096, 65536])
def test_short_objects_refused_without_crash(segname: str, size: int) -> None:
    # A creator that died between shm_open and initialisation leaves a short or all-zero
    # object: attach must refuse (not SIGBUS on reading past the end).
    make_raw_object(segname, b"\0" * size)
    assert run_isolated(_attach_expect_refusal, segname) != "attached"


def test_zeroed_full_size_object_refused(segname: str) -> None:
    make_raw_object(segname, b"\0" * (4 << 20))
    assert run_isolated(_attach_expect_refusal, segname) != "attached"


def test_truncated_segment_refused(segname: str) -> None:
    s = Segment.create(segname, size=4 << 20)
    s.set("k", b"v")
    s.close()
    os.truncate(shm_path(segname), 64 << 10)
    assert run_isolated(_attach_expect_refusal, segname) in (
        "SegmentCorruptError", "ForeignSegmentError", "IncompatibleSegmentError")


def test_wide_mode_garbage_refused(segname: str) -> None:
    make_raw_object(segname, os.urandom(1 << 20), mode=0o644)
    with pytest.raises(ForeignSegmentError):
        Segment.attach(segname, wait=0.2)


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606, 0o666])
def test_wide_mode_real_segment_refused(segname: str, mode: int) -> None:
    s = Segment.create(segname, size=4 << 20)
    s.set("k", b"v")
    os.chmod(shm_path(segname), mode)
    with pytest.raises(ForeignSegmentError):
        Segment.attach(segname, wait=0.2)
    os.chmod(shm_path(segname), 0o600)
    with Segment.attach(segname) as t:
        assert t.get("k") == b"v"
    s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_other_owner_refused(segname: str) -> None:
    s = Segment.create(segname, size=4 << 20)
    os.chown(shm_path(segname), 65534, 65534)
    try:
        with pytest.raises(ForeignSegmentError):
            Segment.attach(segname, wait=0.2)
    finally:
        os.chown(shm_path(segname), os.geteuid(), os.getegid())
        s.close()


LAYOUT_OFFSET = 8  # seg_header: uint64 magic, then uint32 layout_version (internal.h)


def _layout_offset(name: str) -> int:
    """Offset of the layout-version field, checked against the engine's own value."""
    want = int(lib.shm_layout_version()).to_bytes(4, "little")
    head = read_bytes(name, 0, 64)
    return LAYOUT_OFFSET if head[LAYOUT_OFFSET:LAYOUT_OFFSET + 4] == want else -1


def test_incompatible_layout_version(segname: str) -> None:
    s = Segment.create(segname, size=4 << 20)
    s.set("k", b"v")
    s.close()
    off = _layout_offset(segname)
    assert off >= 0, "layout version not found in the header"
    old = patch_bytes(segname, off, (int(lib.shm_layout_version()) + 1).to_bytes(4, "little"))
    with pytest.raises(IncompatibleSegmentError):
        Segment.attach(segname, wait=0.2)
    with pytest.raises(IncompatibleSegmentError):
        Segment.open(segname, size=4 << 20)
    assert segment_exists(segname)
    patch_bytes(segname, off, old)
    with Segment.attach(segname) as t:
        assert t.get("k") == b"v"


def test_open_recreate_on_incompatible(segname: str) -> None:
    s = Segment.create(segname, size=4 << 20)
    s.set("k", b"v")
    s.close()
    off = _layout_offset(segname)
    assert off >= 0
    patch_bytes(segname, off, b"\xff\xff\xff\x7f")
    with Segment.open(segname, size=4 << 20, on_incompatible="recreate") as t:
        assert t.get("k") is None
        t.set("k", b"fresh")
        assert t.get("k") == b"fresh"
        assert t.verify() == []


def _open_recreate(name: str) -> tuple[bytes | None, int, list[str]]:
    with Segment.open(name, size=4 << 20, on_incompatible="recreate", wait=0.2) as t:
        t.set("k", b"fresh")
        return t.get("k"), int(t.config()["size"]), t.verify()


def test_open_recreate_on_garbage(segname: str) -> None:
    make_raw_object(segname, os.urandom(1 << 20))
    assert run_isolated(_open_recreate, segname) == (b"fresh", 4 << 20, [])


def _open_raise(name: str) -> str:
    try:
        Segment.open(name, size=4 << 20, wait=0.2).close()
    except REFUSALS as e:
        return type(e).__name__
    return "opened"


def test_open_raise_on_garbage(segname: str) -> None:
    make_raw_object(segname, os.urandom(1 << 20))
    assert run_isolated(_open_raise, segname) != "opened"
    assert segment_exists(segname)
    with pytest.raises(ValueError):
        Segment.open(segname, on_incompatible="maybe")


def test_error_hierarchy() -> None:
    for e in (SegmentCorruptError, IncompatibleSegmentError, ForeignSegmentError,
              SegmentNotFoundError, SegmentNotReadyError):
        assert issubclass(e, SegmentError) and issubclass(e, ShmCacheError)
    assert issubclass(SegmentError, OSError)


def test_error_messages_name_the_problem(seg: Segment) -> None:
    with pytest.raises(KeyTooLongError) as ei:
        seg.set(b"k" * 300, b"v")
    assert str(ei.value), "engine gave no message"
    assert "engine error" not in str(ei.value)
    with pytest.raises(ValueTooLargeError) as ei2:
        seg.set("k", b"x" * (int(seg.config()["max_value_len"]) + 1))
    assert str(ei2.value) and "engine error" not in str(ei2.value)


def test_unlink_segment(segname: str) -> None:
    assert unlink_segment(segname) is False
    Segment.create(segname, size=4 << 20).close()
    assert segment_exists(segname)
    assert unlink_segment(segname) is True
    assert not segment_exists(segname)
    assert not os.path.exists(shm_path(segname))


def test_posix_ipc_permission_mapped(segname: str) -> None:
    # Sanity of the raw helper: an object we made is a real POSIX shm object.
    make_raw_object(segname, b"x" * 10)
    mem = posix_ipc.SharedMemory("/" + segname, 0)
    assert mem.size == 10
    mem.close_fd()
