"""shmcache.gunicorn through real gunicorn servers (workers/gunicorn_conf.py) on 127.0.0.1.

Each test starts a gunicorn master with the hooks, serving tests/server_apps/wsgi_app.py
(or asgi_app.py under uvicorn workers), and checks what the hooks promise: one segment
for every worker (a value computed once, counted in the segment with ``incr``), one
live slot per process, a SIGKILLed worker's slot reaped by ``child_exit`` while the
others serve without error, ``--preload``, ``max_requests`` recycling, ``kill -HUP``,
and ``on_exit`` unlinking or keeping the segment.  Readiness is awaited by polling the
port and the segment's slot table.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import pytest
from _helpers import new_name
from server_apps.harness import (
    Server,
    alive,
    answers,
    children,
    free_port,
    gunicorn_cmd,
    json_body,
    request,
    server_env,
    wait_until,
)

from shmcache import Segment, segment_exists, unlink_segment

pytestmark = pytest.mark.slow

BOOT = 30.0   # seconds: generous for a loaded 2-core machine; only a hang reaches it


class Gunicorn:
    """A running test server: its process, port, segment name and an attached handle."""

    def __init__(self, srv: Server, port: int, name: str) -> None:
        self.srv, self.port, self.name = srv, port, name
        self.seg: Segment | None = None

    @property
    def master(self) -> int:
        return self.srv.pid

    def get(self, path: str) -> Any:
        return json_body(request(self.port, path))

    def segment(self) -> Segment:
        if self.seg is None:
            self.seg = Segment.attach(self.name)
        return self.seg

    def live_pids(self) -> dict[int, int]:
        """pid -> slot of every live slot."""
        return {s.pid: s.slot for s in self.segment().stats().slots if s.state == "live"}

    def wait_workers(self, n: int, *, exclude: AbstractSet[int] = frozenset()) -> set[int]:
        """Wait until the master has ``n`` workers, none in ``exclude``, each holding a
        live slot of its own, with no dead slot left; return their pids."""
        def settled() -> set[int] | None:
            kids = children(self.master)
            if len(kids) != n or kids & exclude:
                return None
            slots = self.segment().stats().slots
            live = {s.pid for s in slots if s.state == "live"}
            if any(s.state == "dead" for s in slots) or not kids | {self.master} <= live:
                return None
            return kids
        return wait_until(settled, BOOT, f"{n} workers with slots\n{self.srv.output()}")


@pytest.fixture
def gunicorn() -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(app: str, *args: str, name: str | None = None,
              env: dict[str, str] | None = None, workers: int = 2) -> Gunicorn:
        name = name or new_name("gu-")
        port = free_port()
        srv = Server(gunicorn_cmd(port, app, "--workers", str(workers), *args),
                     server_env(name, env))
        g = Gunicorn(srv, port, name)
        started.append(g)
        wait_until(lambda: answers(port) or srv.proc.poll() is not None, BOOT,
                   f"gunicorn on port {port}")
        assert srv.proc.poll() is None, srv.output()
        g.wait_workers(workers)
        return g

    yield start
    for g in started:
        if g.seg is not None:
            g.seg.close()
        g.srv.stop()
        unlink_segment(g.name)


def _parallel(fn: Callable[[], Any], n: int, threads: int = 8) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        return list(ex.map(lambda _: fn(), range(n)))


def _computed_once(g: Gunicorn, n: str, requests: int = 24, count_path: str = "/count"
                   ) -> set[int]:
    """Many concurrent requests for one value: all get the same computation, counted
    once in the segment; return the pids that served them."""
    got = _parallel(lambda: g.get(f"/cached?n={n}"), requests)
    assert len({r["value"]["computed_by"] for r in got}) == 1, got
    assert g.get(f"{count_path}?n={n}")["count"] == 1
    return {r["pid"] for r in got}


def test_sync_workers_share_one_segment_and_survive_sigkill(
        gunicorn: Callable[..., Gunicorn]) -> None:
    g = gunicorn("wsgi_app:app", workers=4)
    workers = children(g.master)
    served = _computed_once(g, "a")
    assert len(served) >= 2 and served <= workers   # several workers, one computation

    slots = g.live_pids()
    procs = {g.master, *workers}
    assert procs <= slots.keys()
    assert len({slots[p] for p in procs}) == 5      # a slot of its own for every process

    # A worker SIGKILLed in the middle of cache writes, while others serve a load.
    victim_req = threading.Thread(target=lambda: _swallow(lambda: request(g.port, "/churn")),
                                  daemon=True)
    victim_req.start()
    seg = g.segment()
    victim = int(wait_until(lambda: seg.get("churn_pid"), BOOT, "the /churn worker"))
    assert victim in workers

    stop = threading.Event()
    done: list[int] = []
    errors: list[BaseException] = []

    def load() -> None:
        while not stop.is_set():
            try:
                r = g.get("/cached?n=a")
                assert r["value"]["computed_by"] in workers, r
                done.append(r["pid"])
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(done) >= 20, BOOT, "load before the kill")
        os.kill(victim, signal.SIGKILL)
        replaced = g.wait_workers(4, exclude={victim})
        before = len(done)
        wait_until(lambda: len(done) >= before + 20, BOOT, "load after the replacement")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    victim_req.join(30)
    assert errors == [], errors[:3]
    assert victim not in g.live_pids() and victim not in replaced
    assert all(s.pid != victim for s in seg.stats().slots)    # reaped, not just dead
    assert f"reaped 1 process slot(s) after worker {victim}" in g.srv.output()
    assert seg.verify() == []
    assert g.get("/count?n=a")["count"] == 1


def _swallow(fn: Callable[[], Any]) -> None:
    with contextlib.suppress(OSError):   # the victim's own request dies with it
        fn()


def test_uvicorn_workers_share_one_segment(gunicorn: Callable[..., Gunicorn]) -> None:
    g = gunicorn("asgi_app:app", "-k", "uvicorn.workers.UvicornWorker")
    workers = children(g.master)
    served = _computed_once(g, "u", requests=32)
    assert served <= workers
    slots = g.live_pids()
    assert len({slots[p] for p in {g.master, *workers}}) == 3


def test_gthread_workers_share_one_segment(gunicorn: Callable[..., Gunicorn]) -> None:
    g = gunicorn("wsgi_app:app", "-k", "gthread", "--threads", "4")
    served = _computed_once(g, "g", requests=32)
    assert served <= children(g.master)


def test_master_hook_starts_and_stops_the_sidecar(
        gunicorn: Callable[..., Gunicorn], tmp_path: Path) -> None:
    # A disk level gives the sidecar work; the config leaves it to the hook ("off").
    g = gunicorn("wsgi_app:app", env={
        "SHMCACHE_LEVELS": "c_memory,disk", "SHMCACHE_DISK_PATH": str(tmp_path / "l3"),
        "SHMCACHE_SIDECAR": "off", "SHMCACHE_GUNICORN_SIDECAR": "1",
        "TMPDIR": str(tmp_path)})       # the sidecar's lock file goes there
    _computed_once(g, "s")
    assert f"sidecar started in the master (pid {g.master})" in g.srv.output()
    g.segment().close()
    g.seg = None
    g.srv.signal(signal.SIGTERM)
    assert g.srv.wait(BOOT) == 0, g.srv.output()
    assert "stopping the sidecar failed" not in g.srv.output()


def test_preload_workers_get_slots_of_their_own(gunicorn: Callable[..., Gunicorn]) -> None:
    # The application (and its get_cache()) is imported in the master before on_starting.
    g = gunicorn("wsgi_app:app", "--preload")
    workers = children(g.master)
    _computed_once(g, "p")
    slots = g.live_pids()
    seen = {}
    for _ in range(40):
        r = g.get("/slot")
        seen[r["pid"]] = r["slot"]
        if len(seen) == 2:
            break
    for pid, slot in seen.items():    # what the worker's own handle says is its slot
        assert pid in workers and slots[pid] == slot != slots[g.master]


def test_max_requests_recycling_releases_slots(gunicorn: Callable[..., Gunicorn]) -> None:
    g = gunicorn("wsgi_app:app", "--max-requests", "3", "--max-requests-jitter", "0")
    first = children(g.master)
    served = set()
    for _ in range(16):
        r = g.get("/cached?n=r")
        served.add(r["pid"])
    assert len(served) > 2                       # workers were recycled
    assert g.get("/count?n=r")["count"] == 1     # and the value survived them
    now = g.wait_workers(2)
    assert now != first
    assert not (served | first) - now & g.live_pids().keys()   # exited: slots freed
    # Recycled workers closed their cache at exit: their slots were free before the
    # master looked, so child_exit had nothing to reap (no repair for a clean exit).
    assert "process slot(s) after worker" not in g.srv.output()
    assert g.segment().verify() == []


def test_hup_reload_keeps_serving_and_keeps_entries(gunicorn: Callable[..., Gunicorn]) -> None:
    g = gunicorn("wsgi_app:app")
    old = children(g.master)
    before = g.get("/cached?n=h")["value"]
    g.srv.signal(signal.SIGHUP)
    new = g.wait_workers(2, exclude=old)
    assert not new & old
    r = g.get("/cached?n=h")
    assert r["pid"] in new and r["value"] == before       # served from the kept segment
    assert g.get("/count?n=h")["count"] == 1
    assert not old & g.live_pids().keys()


def test_on_exit_keeps_segment_for_warm_restart_then_unlinks(
        gunicorn: Callable[..., Gunicorn]) -> None:
    name = new_name("gu-keep-")
    g = gunicorn("wsgi_app:app", name=name, env={"SHMCACHE_KEEP_ON_EXIT": "1"})
    first = g.get("/cached?n=k")["value"]
    g.segment().close()
    g.seg = None
    g.srv.signal(signal.SIGTERM)
    assert g.srv.wait(BOOT) == 0, g.srv.output()
    assert segment_exists(name)                          # kept, with its entries

    g2 = gunicorn("wsgi_app:app", name=name)             # warm restart; unlink at exit
    assert g2.get("/cached?n=k")["value"] == first
    assert g2.get("/count?n=k")["count"] == 1
    g2.segment().close()
    g2.seg = None
    g2.srv.signal(signal.SIGTERM)
    assert g2.srv.wait(BOOT) == 0, g2.srv.output()
    assert not segment_exists(name)


def test_usr2_upgrade_hands_the_segment_to_the_new_master(
        gunicorn: Callable[..., Gunicorn]) -> None:
    g = gunicorn("wsgi_app:app")
    old_workers = children(g.master)
    first = g.get("/cached?n=u")["value"]
    g.srv.signal(signal.SIGUSR2)                  # gunicorn re-executes a new master

    def new_master() -> int | None:
        fresh = children(g.master) - old_workers
        for pid in fresh:
            if len(children(pid)) == 2:
                return pid
        return None
    successor = wait_until(new_master, BOOT, f"the new master\n{g.srv.output()}")
    try:
        wait_until(lambda: children(successor) <= g.live_pids().keys(), BOOT,
                   "the new master's workers")
        g.segment().close()
        g.seg = None
        g.srv.signal(signal.SIGTERM)              # the old master leaves: segment kept
        assert g.srv.wait(BOOT) == 0, g.srv.output()
        assert f"kept for master {successor}" in g.srv.output()
        assert segment_exists(g.name)
        r = g.get("/cached?n=u")
        assert r["value"] == first and r["pid"] in children(successor)
        assert g.get("/count?n=u")["count"] == 1
        os.kill(successor, signal.SIGTERM)        # the last master out unlinks it
        wait_until(lambda: not alive(successor), BOOT, "the new master's exit")
        assert not segment_exists(g.name)
    finally:
        if alive(successor):
            for pid in [successor, *children(successor)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
