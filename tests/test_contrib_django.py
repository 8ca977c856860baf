"""shmcache.contrib.django: Django's own test runner over the test project, and two
Django processes sharing one segment through the backend.

The Django-side cases live in tests/django_project/djtests/tests.py and run under
``manage.py test`` in a child process (Django wants its settings before anything
imports it); this file checks the runner's verdict and how many tests it ran.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import new_name

import shmcache

PROJECT = Path(__file__).parent / "django_project"
#: The number of tests in djtests/tests.py: a runner that silently skips or loses a
#: class must not pass.
DJANGO_TESTS = 59


def child_env(segment: str) -> dict[str, str]:
    # The children import the shmcache this process imported (the ASan run uses a copy).
    root = str(Path(shmcache.__file__).resolve().parent.parent)
    env = dict(os.environ, SHMCACHE_NAME=segment,
               DJANGO_SETTINGS_MODULE="djproject.settings",
               PYTHONPATH=os.pathsep.join([str(PROJECT), root]))
    return env


@pytest.fixture
def segment() -> Iterator[str]:
    name = new_name("dj")
    yield name
    shmcache.unlink_segment(name)


def test_django_test_runner_passes(segment: str) -> None:
    proc = subprocess.run(
        [sys.executable, "manage.py", "test", "djtests", "--noinput", "-v", "2"],
        cwd=PROJECT, env=child_env(segment), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    ran = re.search(r"^Ran (\d+) tests? in ", out, re.M)
    assert ran is not None, out[-3000:]
    assert int(ran.group(1)) == DJANGO_TESTS, out[-3000:]
    assert re.search(r"^OK$", out, re.M), out[-3000:]
    assert " ... skipped" not in out, out[-3000:]
    assert shmcache.segment_exists(segment)  # the project used the segment it was given


class Worker:
    """One Django process (tests/django_project/worker.py) answering JSON lines."""

    def __init__(self, segment: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PROJECT / "worker.py")], cwd=PROJECT,
            env=child_env(segment), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""

    def send(self, op: str, *args: Any, alias: str = "default", **kwargs: Any) -> None:
        assert self.proc.stdin is not None
        line = json.dumps({"op": op, "args": args, "kwargs": kwargs, "alias": alias})
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 60.0) -> Any:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0, "worker did not answer in time"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                assert chunk, f"worker exited with {self.proc.wait(10)}"
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(msg["error"])
        return msg["ok"]

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        self.send(op, *args, **kwargs)
        return self.reply()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workers(segment: str) -> Iterator[tuple[Worker, Worker]]:
    a, b = Worker(segment), Worker(segment)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_two_processes_share_entries(workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    assert a.call("pid") != b.call("pid")
    a.call("set", "user:1", {"name": "alice", "roles": ["admin"]}, 60)
    assert b.call("get", "user:1") == {"name": "alice", "roles": ["admin"]}
    assert b.call("add", "lock", "b") is True
    assert a.call("add", "lock", "a") is False
    assert a.call("get", "lock") == "b"
    b.call("set", "none", None)
    assert a.call("get", "none", "default") is None  # a cached None, not a miss
    assert a.call("has_key", "none") is True
    assert b.call("delete", "user:1") is True
    assert a.call("get", "user:1", "gone") == "gone"
    a.call("set_many", {"x": 1, "y": 2}, version=2)
    assert b.call("get_many", ["x", "y"], alias="v2") == {"x": 1, "y": 2}
    assert b.call("get_many", ["x", "y"]) == {}  # version 1
    assert a.call("get", "x", alias="prefix") is None  # another KEY_PREFIX


def test_incr_across_processes_is_atomic_and_keeps_the_expiry(
        workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    a.call("set", "hits", 0, 600)
    expires = a.call("expires_at", "hits")
    n = 400
    a.send("incr_loop", "hits", n)  # both run at once, on the 2 cores
    b.send("incr_loop", "hits", n)
    last = {a.reply(120), b.reply(120)}
    assert max(last) == 2 * n
    assert b.call("get", "hits") == 2 * n
    assert b.call("expires_at", "hits") == expires  # to the millisecond
    with pytest.raises(RuntimeError, match="ValueError: Key 'nope' not found"):
        b.call("incr", "nope")


def test_zero_timeout_and_clear_reach_the_other_process(
        workers: tuple[Worker, Worker]) -> None:
    a, b = workers
    a.call("set", "k", "v")
    b.call("set", "k", "w", 0)  # Django: timeout 0 deletes
    assert a.call("has_key", "k") is False
    a.call("set_many", {"p": 1, "q": 2})
    a.call("set", "r", 3, alias="prefix")
    b.call("clear")
    assert a.call("get_many", ["p", "q"]) == {}
    assert a.call("get", "r", alias="prefix") is None
