"""Several processes on one segment: forked children that inherit the handle, spawned
processes that attach by name, second handles in one process, and create/attach races.

Synchronisation is by pipes, events and barriers only; every join has a timeout so a
hung engine lock fails the test instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import pytest
from _helpers import FORK, SPAWN

from shmcache import NoSlotError, Segment, VersionMismatchError
from shmcache.segment import ffi

JOIN = 60.0


def _join_all(procs: list[Any], timeout: float = JOIN) -> None:
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(10)
    assert not hung, f"{len(hung)} child processes hung"
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    assert not bad, f"child exit codes: {bad}"


# -- child bodies (module level so 'spawn' can import them) ------------------------------


def _fork_writer(seg: Segment, i: int, n: int, close: bool) -> None:
    for j in range(n):
        seg.set(f"c{i}:{j}", f"{i}:{j}".encode() * (1 + j % 50))
        seg.incr("shared-counter", initial=0)
        if j % 7 == 0:
            seg.delete(f"c{i}:{j}")
    if close:
        seg.close()


def _spawn_worker(name: str, i: int, n: int, conn: Any) -> None:
    seg = Segment.attach(name)
    try:
        for j in range(n):
            seg.set(f"s{i}:{j}", f"spawned {i} {j}".encode())
            seg.incr("shared-counter", initial=0)
        parent_vals = [seg.get(f"parent:{j}") for j in range(n)]
        conn.send((os.getpid(), seg.slot, parent_vals))
    finally:
        seg.close()
        conn.close()


def _child_slot_report(seg: Segment, conn: Any, release: Any) -> None:
    seg.set("from-child", str(os.getpid()).encode())
    seg.get("from-child")
    conn.send((os.getpid(), seg.slot, seg.get("from-parent")))
    release.wait(JOIN)
    seg.close()


def _racer(name: str, i: int, barrier: Any, conn: Any) -> None:
    created = []
    real_create = Segment.create.__func__  # type: ignore[attr-defined]

    def recording_create(cls: type, *a: Any, **kw: Any) -> Segment:
        s = real_create(cls, *a, **kw)
        created.append(True)
        return s

    Segment.create = classmethod(recording_create)  # type: ignore[method-assign,assignment]
    barrier.wait(JOIN)
    seg = Segment.open(name, size=4 << 20, wait=30.0)
    seg.set(f"racer{i}", str(i).encode())
    barrier.wait(JOIN)  # everyone has written
    seen = [seg.get(f"racer{j}") for j in range(barrier.parties)]
    conn.send((bool(created), seg.stats().generation, seg.config()["size"], seen))
    barrier.wait(JOIN)  # nobody closes before everyone has read
    seg.close()
    conn.close()


def _incr_worker(name: str, n: int, barrier: Any) -> None:
    seg = Segment.attach(name)
    barrier.wait(JOIN)
    for _ in range(n):
        seg.incr("ctr")
        seg.decr("down")
    seg.close()


def _cas_worker(name: str, n: int, barrier: Any, conn: Any) -> None:
    seg = Segment.attach(name)
    barrier.wait(JOIN)
    conflicts = 0
    done = 0
    while done < n:
        got = seg.get_with_info("cas")
        assert got is not None
        val, info = got
        try:
            seg.set("cas", str(int(val) + 1).encode(), expect_version=info.version)
            done += 1
        except VersionMismatchError:
            conflicts += 1
    conn.send(conflicts)
    seg.close()
    conn.close()


def _add_racer(name: str, i: int, barrier: Any, conn: Any) -> None:
    seg = Segment.attach(name)
    barrier.wait(JOIN)
    conn.send(seg.add("once", str(i).encode()) is not None)
    seg.close()
    conn.close()


def _attach_and_hold(name: str, conn: Any) -> None:
    # Held until the parent closes its end of the duplex pipe (or kills us): a pipe, not
    # an mp.Event, because a process killed inside Event.wait() deadlocks Event.set().
    try:
        seg = Segment.attach(name)
    except NoSlotError:
        conn.send("noslot")
        return
    conn.send(("ok", seg.slot))
    with contextlib.suppress(EOFError):
        conn.recv()
    seg.close()


def _pin_and_die(name: str, conn: Any) -> None:
    seg = Segment.attach(name)
    p = seg.pin("pinned")
    assert p is not None
    conn.send(bytes(p.view[:4]))
    signal.pause()  # hold the pin until SIGKILLed


# -- tests -------------------------------------------------------------------------------


@pytest.mark.slow
def test_forked_writers(seg: Segment) -> None:
    nproc, n = 4, 400
    procs = [FORK.Process(target=_fork_writer, args=(seg, i, n, i % 2 == 0))
             for i in range(nproc)]
    for p in procs:
        p.start()
    _join_all(procs)
    for i in range(nproc):
        for j in range(n):
            want = None if j % 7 == 0 else f"{i}:{j}".encode() * (1 + j % 50)
            assert seg.get(f"c{i}:{j}") == want, (i, j)
    assert seg.get("shared-counter") == str(nproc * n).encode()
    # Children that exited without close() leave dead slots; reap reclaims them.
    seg.reap()
    st = seg.stats()
    assert [s.pid for s in st.slots] == [os.getpid()]
    assert st.live_slots == 1
    assert st.counters["sets"] >= nproc * n  # counters of exited processes are kept
    assert seg.verify() == []


@pytest.mark.slow
def test_spawned_attach_by_name(seg: Segment, segname: str) -> None:
    nproc, n = 3, 200
    for j in range(n):
        seg.set(f"parent:{j}", f"p{j}".encode())
    pipes, procs = [], []
    for i in range(nproc):
        r, w = SPAWN.Pipe(duplex=False)
        p = SPAWN.Process(target=_spawn_worker, args=(segname, i, n, w))
        p.start()
        w.close()
        pipes.append(r)
        procs.append(p)
    reports = []
    for r in pipes:
        assert r.poll(JOIN), "spawned child never reported"
        reports.append(r.recv())
    _join_all(procs)
    for _pid, slot, parent_vals in reports:
        assert parent_vals == [f"p{j}".encode() for j in range(n)]
        assert slot >= 0 and slot != seg.slot  # (closed children's slots are reused)
    for i in range(nproc):
        for j in range(n):
            assert seg.get(f"s{i}:{j}") == f"spawned {i} {j}".encode()
    assert seg.get("shared-counter") == str(nproc * n).encode()
    st = seg.stats()
    assert st.live_slots == 1, "closed children still hold slots"
    assert seg.verify() == []


def test_second_handle_same_process(seg: Segment, segname: str) -> None:
    seg.set("k", b"first handle")
    with Segment.attach(segname) as t:
        assert t.get("k") == b"first handle"
        t.set("k2", b"second handle")
        assert seg.get("k2") == b"second handle"
        p1, p2 = seg.pin("k"), t.pin("k")
        assert p1 is not None and p2 is not None
        a1 = int(ffi.cast("uintptr_t", ffi.from_buffer(p1.view)))
        a2 = int(ffi.cast("uintptr_t", ffi.from_buffer(p2.view)))
        assert a1 != a2, "second handle did not get its own mapping"
        assert p1.view == p2.view == b"first handle"
        p1.release()
        p2.release()
        t.delete("k")
        assert "k" not in seg
    # closing the second handle leaves the first fully usable
    seg.set("k3", b"still fine")
    assert seg.get("k3") == b"still fine"
    assert seg.verify() == []


def test_forked_child_gets_its_own_slot(seg: Segment) -> None:
    seg.set("from-parent", b"hello child")
    parent_slot = seg.slot
    r, w = FORK.Pipe(duplex=False)
    release = FORK.Event()
    p = FORK.Process(target=_child_slot_report, args=(seg, w, release))
    p.start()
    w.close()
    try:
        assert r.poll(JOIN), "child never reported"
        cpid, cslot, seen = r.recv()
        assert seen == b"hello child"
        assert cpid == p.pid
        assert cslot != parent_slot
        assert seg.slot == parent_slot
        st = seg.stats()
        by_pid = {s.pid: s for s in st.slots}
        assert os.getpid() in by_pid and cpid in by_pid
        assert by_pid[cpid].slot == cslot and by_pid[os.getpid()].slot == parent_slot
        assert by_pid[cpid].state == "live"
        assert by_pid[cpid].counters["sets"] >= 1 and by_pid[cpid].counters["hits"] >= 2
        assert seg.get("from-child") == str(cpid).encode()
    finally:
        release.set()
        _join_all([p])
    st = seg.stats()
    assert cpid not in {s.pid for s in st.slots}, "closed child's slot not freed"


def test_fork_with_os_fork(seg: Segment) -> None:
    # A bare os.fork(), as gunicorn does: the child keeps using the parent's handle.
    seg.set("k", b"0")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            ok = seg.get("k") == b"0" and seg.slot != -1
            seg.set("k", b"child")
            os.write(w, str(seg.slot).encode() if ok else b"bad")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got != b"bad" and int(got) != seg.slot
    assert seg.get("k") == b"child"
    seg.reap()  # the child exited without close()
    assert [s.pid for s in seg.stats().slots] == [os.getpid()]
    assert seg.verify() == []


@pytest.mark.slow
def test_open_race_exactly_one_creator(segname: str) -> None:
    nproc = 8
    barrier = FORK.Barrier(nproc)
    pipes, procs = [], []
    for i in range(nproc):
        r, w = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_racer, args=(segname, i, barrier, w))
        p.start()
        w.close()
        pipes.append(r)
        procs.append(p)
    reports = []
    for r in pipes:
        assert r.poll(JOIN), "racer never reported"
        reports.append(r.recv())
    _join_all(procs)
    creators = sum(1 for c, *_ in reports if c)
    assert creators == 1, f"{creators} processes created the segment"
    assert len({g for _, g, _, _ in reports}) == 1
    assert {s for _, _, s, _ in reports} == {4 << 20}
    for *_, seen in reports:
        assert seen == [str(j).encode() for j in range(nproc)]
    with Segment.attach(segname) as s:
        assert s.verify() == []
        assert len(s) == nproc


@pytest.mark.slow
def test_concurrent_incr_exact(seg: Segment, segname: str) -> None:
    nproc, n = 4, 2000
    seg.set("ctr", b"0")
    seg.set("down", b"0")
    barrier = FORK.Barrier(nproc)
    procs = [FORK.Process(target=_incr_worker, args=(segname, n, barrier))
             for _ in range(nproc)]
    for p in procs:
        p.start()
    _join_all(procs)
    assert seg.get("ctr") == str(nproc * n).encode()
    assert seg.get("down") == str(-nproc * n).encode()
    assert seg.stats().counters["incrs"] >= 2 * nproc * n


@pytest.mark.slow
def test_concurrent_compare_and_set_exact(seg: Segment, segname: str) -> None:
    nproc, n = 4, 500
    seg.set("cas", b"0")
    barrier = FORK.Barrier(nproc)
    pipes, procs = [], []
    for _ in range(nproc):
        r, w = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_cas_worker, args=(segname, n, barrier, w))
        p.start()
        w.close()
        pipes.append(r)
        procs.append(p)
    for r in pipes:
        assert r.poll(JOIN)
        r.recv()
    _join_all(procs)
    assert seg.get("cas") == str(nproc * n).encode(), "a compare-and-set lost an update"


def test_add_race_one_winner(seg: Segment, segname: str) -> None:
    nproc = 6
    barrier = FORK.Barrier(nproc)
    pipes, procs = [], []
    for i in range(nproc):
        r, w = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_add_racer, args=(segname, i, barrier, w))
        p.start()
        w.close()
        pipes.append(r)
        procs.append(p)
    wins = []
    for r in pipes:
        assert r.poll(JOIN)
        wins.append(r.recv())
    _join_all(procs)
    assert sum(wins) == 1
    assert seg.get("once") == str(wins.index(True)).encode()


def _start_holder(name: str) -> tuple[Any, Any, Any]:
    parent, child = SPAWN.Pipe()
    p = SPAWN.Process(target=_attach_and_hold, args=(name, child))
    p.start()
    child.close()
    assert parent.poll(JOIN), "holder never reported"
    return p, parent, parent.recv()


def test_no_slot_error_and_reap(segname: str) -> None:
    s = Segment.create(segname, size=4 << 20, max_slots=3)
    holders = []
    try:
        for _ in range(2):
            p, conn, res = _start_holder(segname)
            holders.append((p, conn))
            assert res[0] == "ok"
        assert s.stats().live_slots == 3
        # All three slots are held by live processes: the next attach must be refused.
        p, conn, res = _start_holder(segname)
        assert res == "noslot"
        _join_all([p])
        # One holder dies without closing: its slot is reclaimable.
        os.kill(holders[0][0].pid, signal.SIGKILL)
        holders[0][0].join(JOIN)
        s.reap()
        p, conn, res = _start_holder(segname)
        holders.append((p, conn))
        assert res[0] == "ok", "a dead process's slot was not reused"
    finally:
        for _, conn in holders:
            conn.close()
        for p, _ in holders:
            p.join(JOIN)
            if p.is_alive():
                p.kill()
                p.join(10)
        s.close()


def test_dead_slot_reclaimed_without_explicit_reap(segname: str) -> None:
    # Slot exhaustion triggers a reap by itself (slots.c: slot_claim repairs and retries).
    s = Segment.create(segname, size=4 << 20, max_slots=2)
    holders = []
    try:
        p, conn, res = _start_holder(segname)
        holders.append((p, conn))
        assert res[0] == "ok"
        os.kill(p.pid, signal.SIGKILL)
        p.join(JOIN)
        p, conn, res = _start_holder(segname)
        holders.append((p, conn))
        assert res[0] == "ok"
    finally:
        for _, conn in holders:
            conn.close()
        for p, _ in holders:
            p.join(JOIN)
        s.close()


def test_dead_process_pins_released_by_reap(seg: Segment, segname: str) -> None:
    seg.set("pinned", b"PINS" + os.urandom(200_000))
    r, w = FORK.Pipe(duplex=False)
    p = FORK.Process(target=_pin_and_die, args=(segname, w))
    p.start()
    w.close()
    assert r.poll(JOIN)
    assert r.recv() == b"PINS"
    assert any(s.pins == 1 for s in seg.stats().slots if s.pid == p.pid)
    seg.delete("pinned")
    assert seg.stats().used_bytes > 0, "pinned bytes were freed under a live pin"
    os.kill(p.pid, signal.SIGKILL)
    p.join(JOIN)
    assert seg.reap() >= 1
    st = seg.stats()
    assert p.pid not in {s.pid for s in st.slots}
    assert st.used_bytes == 0 and st.pages_free == st.pages_total
    assert seg.verify() == []


def test_values_written_by_child_visible_via_fresh_attach(segname: str) -> None:
    # A process that maps the segment after the writer is gone sees everything.
    with Segment.create(segname, size=4 << 20) as s:
        p = FORK.Process(target=_fork_writer, args=(s, 9, 50, True))
        p.start()
        _join_all([p])
    with Segment.attach(segname) as t:
        assert t.get("c9:1") == b"9:1" * 2
        assert t.get("shared-counter") == b"50"


def _release_inherited_pin(seg: Segment, inherited: Any, conn: Any) -> None:
    own = seg.pin("child-key")
    assert own is not None
    pins_before = [s.pins for s in seg.stats().slots if s.slot == seg.slot][0]
    with contextlib.suppress(Exception):  # refusing is fine; unpinning ours is not
        inherited.release()  # the parent's pin, inherited through fork
    pins_after = [s.pins for s in seg.stats().slots if s.slot == seg.slot][0]
    seg.delete("child-key")
    for i in range(300):  # churn: freed chunks of that class get reused
        seg.set(f"churn{i}", bytes([i % 256]) * 1000)
    conn.send((pins_before, pins_after, bytes(own.view) == b"C" * 1000))
    own.release()
    seg.close()


def test_inherited_pin_released_in_child_leaves_childs_pins_alone(seg: Segment) -> None:
    # Pin ids are per slot: the child's first pin gets the same id the parent's pin had.
    # Releasing the inherited PinnedValue in the child must not drop the child's own pin.
    seg.set("parent-key", b"P" * 1000)
    seg.set("child-key", b"C" * 1000)
    parent_pin = seg.pin("parent-key")
    assert parent_pin is not None
    r, w = FORK.Pipe(duplex=False)
    p = FORK.Process(target=_release_inherited_pin, args=(seg, parent_pin, w))
    p.start()
    w.close()
    assert r.poll(JOIN)
    pins_before, pins_after, intact = r.recv()
    p.join(JOIN)
    assert pins_before == 1
    assert pins_after == 1, "releasing the inherited pin dropped the child's own pin"
    assert intact, "the child's pinned bytes were reused while it still held the pin"
    assert p.exitcode == 0
    assert parent_pin.view == b"P" * 1000
    parent_pin.release()
    assert seg.verify() == []


def test_threads_share_one_handle(seg: Segment) -> None:
    import threading

    n, nthreads = 2000, 4
    seg.set("tctr", b"0")
    barrier = threading.Barrier(nthreads)
    errors: list[str] = []

    def work(t: int) -> None:
        try:
            barrier.wait(JOIN)
            for j in range(n):
                seg.incr("tctr")
                val = f"t{t}:{j}".encode() * (1 + j % 300)
                seg.set(f"t{t}:{j % 50}", val)
                assert seg.get(f"t{t}:{j % 50}") == val
                with seg.pin(f"t{t}:{j % 50}") as mv:  # type: ignore[union-attr]
                    assert mv == val
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert seg.get("tctr") == str(n * nthreads).encode()
    assert seg.verify() == []


def _thread_attach_then_exit(name: str, out: list[Any]) -> None:
    out.append(Segment.attach(name))


def test_handle_created_by_exited_thread_keeps_its_slot(seg: Segment, segname: str) -> None:
    # The slot's liveness mutex is held by the attaching thread; when that thread ends
    # (a common pattern: attach in a worker's startup thread) the process is still
    # alive and must not be reaped by others.
    import threading

    out: list[Any] = []
    t = threading.Thread(target=_thread_attach_then_exit, args=(segname, out))
    t.start()
    t.join(JOIN)
    h = out[0]
    h.set("k", b"v" * 1000)
    p = h.pin("k")
    assert p is not None
    seg.reap()  # another handle reaps: h's slot belongs to a live process
    assert h.slot in {s.slot for s in seg.stats().slots}
    seg.delete("k")
    for i in range(300):
        seg.set(f"churn{i}", b"x" * 1000)
    assert p.view == b"v" * 1000, "pin of a live process released by reap"
    p.release()
    h.close()
    assert seg.verify() == []


def _attach_and_die(name: str) -> None:
    s = Segment.attach(name)  # kept referenced: its finalizer would close it
    assert s.slot >= 0
    os._exit(0)  # no close(): the slot stays claimed by a dead process


def test_dead_slot_is_reported_until_reaped(seg: Segment, segname: str) -> None:
    p = SPAWN.Process(target=_attach_and_die, args=(segname,))
    p.start()
    p.join(JOIN)
    assert p.exitcode == 0
    states = {s.pid: s.state for s in seg.stats().slots}
    assert states[os.getpid()] == "live" and states[p.pid] == "dead"
    assert seg.reap() == 1
    assert [s.pid for s in seg.stats().slots] == [os.getpid()]
