"""The sidecar: one active per segment, a stand-by that takes over, workers that keep
serving when it is killed, a bounded journal, and ``python -m shmcache.sidecar`` as a
process of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _helpers import SPAWN, new_name
from redis_servers import (
    L1_L2,
    SECRET,
    Hosts,
    RedisProc,
    drop_lock_file,
    fx_hosts,  # noqa: F401 - fixture "hosts"
    fx_prefix,  # noqa: F401 - fixture "prefix"
    fx_redis_server,  # noqa: F401 - fixture "redis_server"
    redis_key,
    requires_redis,
    wait_until,
)

from shmcache import Cache, CacheConfig, unlink_segment
from shmcache.sidecar import read_report

pytestmark = [requires_redis, pytest.mark.slow]


def test_a_second_sidecar_stands_by_and_takes_over(redis_server: RedisProc,
                                                   hosts: Hosts) -> None:
    a = hosts.new(url=redis_server.url)
    first = a._sidecar
    assert first is not None and first.is_leader
    second = a.start_sidecar(standby_interval=0.02)
    try:
        assert wait_until(lambda: second._lock_fd >= 0)  # it has tried the lock
        assert not second.is_leader
        r = redis_server.client()
        a.set("before", 1)
        assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "before")))
        assert first.stats()["drained"] >= 1 and second.stats()["drained"] == 0

        first.stop()
        assert not first.is_leader
        assert second.wait_leader(5)
        a.set("after", 2)
        assert wait_until(lambda: r.exists(redis_key(hosts.prefix, "after")))
        assert second.stats()["drained"] >= 1
        # The active one reports into the segment for every process to read.
        assert wait_until(lambda: read_report(a.segment).get("pid") == os.getpid()
                          and read_report(a.segment).get("leader") == 1.0)
    finally:
        second.stop()


def _sidecar_child(name: str, url: str, prefix: str, conn: Any) -> None:
    """A process whose Cache runs the host's sidecar; it reports leadership, then
    waits to be killed."""
    cache = Cache(CacheConfig(name=name, c_memory_size_mb=8, levels=L1_L2, secret=SECRET,
                              redis_url=url, redis_prefix=prefix))
    assert cache._sidecar is not None
    conn.send(cache._sidecar.wait_leader(10))
    conn.recv()  # never comes: the parent SIGKILLs this process


def test_a_killed_sidecar_leaves_workers_serving_and_the_journal_bounded(
        redis_server: RedisProc, prefix: str) -> None:
    name = new_name("sc")
    # The "worker": no sidecar of its own, a small journal (64 KiB).
    worker = Cache(CacheConfig(name=name, c_memory_size_mb=8, levels=L1_L2, secret=SECRET,
                               redis_url=redis_server.url, redis_prefix=prefix,
                               sidecar="off", journal_mb=1 / 16))
    p = None
    try:
        mine, theirs = SPAWN.Pipe()
        p = SPAWN.Process(target=_sidecar_child,
                          args=(name, redis_server.url, prefix, theirs))
        p.start()
        assert mine.poll(60) and mine.recv() is True
        r = redis_server.client()
        worker.set("seen", 1)
        assert wait_until(lambda: r.exists(redis_key(prefix, "seen")))

        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        for i in range(5000):  # ~50 bytes of journal each: far more than 64 KiB
            worker.set(f"k{i}", i)
            assert worker.get(f"k{i}") == i
        st = worker.segment.stats()
        assert st.journal_used <= st.journal_bytes
        assert st.journal_dropped > 0
        assert worker.get("k0") == 0 and worker.get("seen") == 1
        assert not r.exists(redis_key(prefix, "k4999"))  # nobody drained it

        # The kernel released the dead sidecar's lock: a new one leads at once and
        # drains what the journal kept (the newest records).
        sc = worker.start_sidecar()
        try:
            assert sc.wait_leader(5)
            assert wait_until(lambda: r.exists(redis_key(prefix, "k4999")))
            assert wait_until(lambda: read_report(worker.segment).get("journal_dropped",
                                                                      0) > 0)
        finally:
            sc.stop()
    finally:
        if p is not None and p.is_alive():
            p.kill()
            p.join(30)
        worker.close()
        unlink_segment(name)
        drop_lock_file(name)


def test_the_sidecar_command_leads_drains_and_exits_0_on_sigterm(
        redis_server: RedisProc, prefix: str, tmp_path: Path) -> None:
    name = new_name("cli")
    worker = Cache(CacheConfig(name=name, c_memory_size_mb=8, levels=L1_L2, secret=SECRET,
                               redis_url=redis_server.url, redis_prefix=prefix,
                               sidecar="off"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHE_")}
    env.update(SHMCACHE_SECRET=SECRET, SHMCACHE_REDIS_PREFIX=prefix,
               SHMCACHE_REDIS_URL=redis_server.url)
    log = tmp_path / "sidecar.log"
    proc = None
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shmcache.sidecar", "--name", name,
                 "--levels", "c_memory,redis"], env=env, stdout=out,
                stderr=subprocess.STDOUT)
        pid = proc.pid
        assert wait_until(lambda: read_report(worker.segment).get("pid") == pid
                          and read_report(worker.segment).get("leader") == 1.0, 30), \
            log.read_text()
        r = redis_server.client()
        for i in range(100):
            worker.set(f"k{i}", i)
        assert wait_until(lambda: all(r.exists(redis_key(prefix, f"k{i}"))
                                      for i in range(100)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
        text = log.read_text()
        assert SECRET not in text and "active" in text
        # Leadership went with it: a sidecar of the worker leads now.
        sc = worker.start_sidecar()
        try:
            assert sc.wait_leader(5)
        finally:
            sc.stop()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        worker.close()
        unlink_segment(name)
        drop_lock_file(name)


def test_the_sidecar_command_refuses_a_config_without_a_secret(redis_server: RedisProc,
                                                               ) -> None:
    name = new_name("cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHE_")}
    try:
        res = subprocess.run(
            [sys.executable, "-m", "shmcache.sidecar", "--name", name,
             "--levels", "c_memory,redis", "--redis-url", redis_server.url],
            env=env, capture_output=True, text=True, timeout=60)
    finally:
        unlink_segment(name)
        drop_lock_file(name)
    assert res.returncode == 2
    assert "secret" in res.stdout + res.stderr
