"""Model-based tests: random operation sequences checked against a dict.

The segment is large and the key space small, so nothing is ever evicted and the model
must match exactly.  The second machine sends every other operation through a separate
process that attached the segment by name (another mapping address, another slot).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import pytest
from _helpers import SPAWN
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shmcache import Segment

KEYS = st.sampled_from([b"a", b"b", b"c", "d", "é", b"key:" + b"x" * 200, b"\x00\xff", b"n"])
NUMS = st.integers(-(10 ** 12), 10 ** 12)
VALUES = st.one_of(
    NUMS.map(lambda i: str(i).encode()),
    st.binary(max_size=3000).map(lambda b: b"x" + b),  # never a decimal integer
    st.just(b"x" * 70_000),  # larger than a slab page: goes through page runs
)
TTLS = st.one_of(st.none(), st.integers(1000, 10 ** 6))

SETTINGS = settings(max_examples=120, stateful_step_count=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
SEG_SIZE = 32 << 20


def _kb(k: Any) -> bytes:
    return k.encode() if isinstance(k, str) else k


def _call(seg: Segment, op: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """Run one operation; exceptions become their class name so they can be compared
    and sent through a pipe."""
    try:
        res = getattr(seg, op)(*args, **kw)
        if op == "keys":
            res = sorted(bytes(k) for k in res)
        return ("ok", res)
    except Exception as e:  # noqa: BLE001
        return ("exc", type(e).__name__)


def _server(name: str, conn: Any) -> None:
    seg = Segment.attach(name)
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            op, args, kw = msg
            conn.send(_call(seg, op, args, kw))
    finally:
        seg.close()
        conn.close()


def _parse_int(v: bytes) -> int | None:
    try:
        s = v.decode("ascii")
    except UnicodeDecodeError:
        return None
    if s and (s.isdigit() or (s[0] == "-" and s[1:].isdigit())):
        return int(s)
    return None


class Machine(RuleBasedStateMachine):
    """Operations on a Segment versus a dict; ``run`` picks the process for each op."""

    seg: Segment
    run: Callable[[int, str, tuple[Any, ...], dict[str, Any]], Any]

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[bytes, bytes] = {}
        self.versions: dict[bytes, int] = {}
        self.step = 0

    def do(self, op: str, *args: Any, **kw: Any) -> Any:
        self.step += 1
        kind, res = self.run(self.step, op, args, kw)
        return kind, res

    def ok(self, op: str, *args: Any, **kw: Any) -> Any:
        kind, res = self.do(op, *args, **kw)
        assert kind == "ok", f"{op}{args} raised {res}"
        return res

    @initialize()
    def start_empty(self) -> None:
        self.ok("clear")
        assert self.ok("__len__") == 0

    def _bump(self, k: bytes, ver: Any) -> None:
        assert isinstance(ver, int) and ver > self.versions.get(k, 0), (k, ver)
        self.versions[k] = ver

    @rule(k=KEYS, v=VALUES, ttl=TTLS)
    def set(self, k: Any, v: bytes, ttl: int | None) -> None:
        self._bump(_kb(k), self.ok("set", k, v, ttl))
        self.model[_kb(k)] = v

    @rule(k=KEYS, v=VALUES)
    def add(self, k: Any, v: bytes) -> None:
        ver = self.ok("add", k, v)
        if _kb(k) in self.model:
            assert ver is None
        else:
            self._bump(_kb(k), ver)
            self.model[_kb(k)] = v

    @rule(k=KEYS, v=VALUES)
    def replace(self, k: Any, v: bytes) -> None:
        ver = self.ok("replace", k, v)
        if _kb(k) in self.model:
            self._bump(_kb(k), ver)
            self.model[_kb(k)] = v
        else:
            assert ver is None

    @rule(k=KEYS)
    def delete(self, k: Any) -> None:
        assert self.ok("delete", k) == (_kb(k) in self.model)
        self.model.pop(_kb(k), None)

    @rule(k=KEYS, stale=st.booleans())
    def delete_cas(self, k: Any, stale: bool) -> None:
        kb = _kb(k)
        cur = self.versions.get(kb, 0) if kb in self.model else 0
        if kb not in self.model:
            assert self.ok("delete", k, expect_version=12345) is False
        elif stale:
            kind, res = self.do("delete", k, expect_version=cur - 1 if cur > 1 else cur + 1)
            assert (kind, res) == ("exc", "VersionMismatchError")
        else:
            assert self.ok("delete", k, expect_version=cur) is True
            del self.model[kb]

    @rule(k=KEYS, v=VALUES, stale=st.booleans())
    def set_cas(self, k: Any, v: bytes, stale: bool) -> None:
        kb = _kb(k)
        if kb not in self.model:
            return
        cur = self.versions[kb]
        if stale:
            kind, res = self.do("set", k, v, expect_version=cur + 1000)
            assert (kind, res) == ("exc", "VersionMismatchError")
        else:
            self._bump(kb, self.ok("set", k, v, expect_version=cur))
            self.model[kb] = v

    @rule(k=KEYS)
    def get(self, k: Any) -> None:
        assert self.ok("get", k) == self.model.get(_kb(k))

    @rule(k=KEYS)
    def get_with_info(self, k: Any) -> None:
        got = self.ok("get_with_info", k)
        kb = _kb(k)
        if kb not in self.model:
            assert got is None
        else:
            val, info = got
            assert val == self.model[kb]
            assert info.version == self.versions[kb]
            assert info.value_len == len(val)

    @rule(k=KEYS, delta=st.integers(-1000, 1000), initial=st.one_of(st.none(), NUMS))
    def incr(self, k: Any, delta: int, initial: int | None) -> None:
        kb = _kb(k)
        kind, res = self.do("incr", k, delta, initial=initial)
        if kb in self.model:
            cur = _parse_int(self.model[kb])
            if cur is None:
                assert (kind, res) == ("exc", "NotAnIntegerError")
                return
            want = cur + delta
        elif initial is None:
            assert (kind, res) == ("exc", "KeyError")
            return
        else:
            want = initial + delta
        assert (kind, res) == ("ok", want)
        self.model[kb] = str(want).encode()
        self.versions[kb] = self.ok("version", k)

    @rule(k=KEYS, ttl=TTLS)
    def touch(self, k: Any, ttl: int | None) -> None:
        assert self.ok("touch", k, ttl) == (_kb(k) in self.model)
        if _kb(k) in self.model:
            self._bump(_kb(k), self.ok("version", k))

    @rule(k=KEYS)
    def contains(self, k: Any) -> None:
        assert self.ok("contains", k) == (_kb(k) in self.model)

    @rule()
    def length(self) -> None:
        assert self.ok("__len__") == len(self.model)

    @rule()
    def keys(self) -> None:
        assert self.ok("keys") == sorted(self.model)

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def clear(self) -> None:
        self.ok("clear")
        self.model.clear()

    @invariant()
    def no_eviction(self) -> None:
        # The premise of exact model equality: nothing was evicted behind our back.
        if self.step and self.step % 10 == 0:
            st_ = self.seg.stats()
            assert st_.evictions == 0
            assert st_.entries == len(self.model)

    def teardown(self) -> None:
        if self.model or self.step:
            assert self.seg.verify() == []


@pytest.mark.slow
def test_single_process_model(segname: str) -> None:
    seg = Segment.create(segname, size=SEG_SIZE)
    try:
        class Local(Machine):
            pass

        Local.seg = seg
        Local.run = staticmethod(lambda step, op, args, kw: _call(seg, op, args, kw))
        run_state_machine_as_test(Local, settings=SETTINGS)
    finally:
        seg.close()


@pytest.mark.slow
def test_two_process_model(segname: str) -> None:
    seg = Segment.create(segname, size=SEG_SIZE)
    parent, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_server, args=(segname, child))
    proc.start()
    child.close()

    def remote(op: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        parent.send((op, args, kw))
        if not parent.poll(60):
            raise AssertionError(f"child did not answer {op}{args}")
        return parent.recv()

    def run(step: int, op: str, args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
        # alternate processes; reads of the other side's writes are what this tests
        if step % 2:
            return remote(op, args, kw)
        return _call(seg, op, args, kw)

    try:
        class TwoProc(Machine):
            pass

        TwoProc.seg = seg
        TwoProc.run = staticmethod(run)
        run_state_machine_as_test(TwoProc, settings=SETTINGS)
    finally:
        try:
            parent.send(None)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
            seg.close()
    assert proc.exitcode == 0
