"""Running real servers from tests: free ports, readiness by polling, HTTP calls, and
stopping by PID.

Servers run the ``shmcache`` the tests import (``PYTHONPATH`` is set to its checkout, so
the ASan copy of the suite runs its own build), listen on 127.0.0.1 only, and get a
segment name from the test through ``SHMCACHE_NAME``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import shmcache

ROOT = Path(shmcache.__file__).resolve().parents[1]
APPS = Path(__file__).resolve().parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], T], timeout: float, what: str) -> T:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)   # polling a condition with a deadline, not synchronising
        delay = min(delay * 2, 0.1)


def request(port: int, path: str, method: str = "GET",
            headers: Mapping[str, str] | None = None,
            timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection: (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def answers(port: int, path: str = "/pid") -> bool:
    try:
        return request(port, path, timeout=2.0)[0] == 200
    except OSError:
        return False


def children(pid: int) -> set[int]:
    """Direct children of ``pid`` (from /proc)."""
    out: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def server_env(name: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a server process: none of ours SHMCACHE_*, this one's name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(APPS)])
    env["SHMCACHE_NAME"] = name
    env["SHMCACHE_SIZE_MB"] = "8"
    env.update(extra or {})
    return env


class Server:
    """A server process tree started by a test, stopped by PID."""

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str]) -> None:
        # Closed in stop(): the log outlives this call (the server writes to it).
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="shmtest-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(list(cmd), env=dict(env), cwd=str(ROOT),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL for the whole known tree if it does not exit."""
        if self.proc.poll() is None:
            kids = children(self.pid)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in [self.pid, *kids]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(10)
            for pid in kids:   # a child that outlived its parent: never leave one behind
                if alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
        return self.proc.returncode


def python() -> str:
    return sys.executable


def gunicorn_cmd(port: int, app: str, *args: str, conf: str | None = None) -> list[str]:
    """The command line of a gunicorn serving ``app`` on 127.0.0.1:port with the hooks."""
    return [python(), "-m", "gunicorn", "-c", conf or gunicorn_conf(),
            "--bind", f"127.0.0.1:{port}", "--no-control-socket",
            "--graceful-timeout", "5", *args, app]


def gunicorn_conf() -> str:
    """workers/gunicorn_conf.py; in a copy of the suite without workers/ (the ASan run
    copies shmcache/ and tests/ only) the same hooks from ``python:shmcache.gunicorn``."""
    conf = ROOT / "workers" / "gunicorn_conf.py"
    return str(conf) if conf.exists() else "python:shmcache.gunicorn"


def json_body(resp: tuple[int, dict[str, str], bytes]) -> Any:
    import json

    status, _, body = resp
    assert status == 200, resp
    return json.loads(body)
