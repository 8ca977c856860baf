"""Shared helpers for the benchmarks: timers, keys, tables, redis-server, tmp dirs.

Everything here is workload-agnostic.  The workloads themselves live in
``bench_single.py``, ``bench_multi.py``, ``bench_memory.py`` and ``bench_hitratio.py``;
``run.py`` is the one entry point.  Nothing here imports a peer library at module
level, so a missing peer only blanks its own rows.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Where tmpfs-backed stores (diskcache) put their files.
TMPFS_ROOT = "/dev/shm"


# -- keys and values ---------------------------------------------------------------------


def make_keys(n: int, prefix: str = "user:", width: int = 6) -> list[str]:
    """``n`` distinct str keys like ``user:123456`` (fixed width, so equal lengths)."""
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def make_value(size: int) -> bytes:
    """A ``size``-byte value (not all one byte, so nothing can special-case it)."""
    pattern = bytes(range(33, 127))
    return (pattern * (size // len(pattern) + 1))[:size]


def unique_name(tag: str) -> str:
    """A short name no earlier run can have left behind (segments, shm files)."""
    return f"shmbench-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- timing ------------------------------------------------------------------------------


@contextlib.contextmanager
def gc_disabled() -> Iterator[None]:
    """Collect once, then keep the cyclic GC off for the duration of the block."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Run ``fn`` ``repeats`` times with the GC disabled; return the best wall time (s)."""
    best = float("inf")
    for _ in range(repeats):
        with gc_disabled():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        best = min(best, dt)
    return best


# -- tables ------------------------------------------------------------------------------


def fmt_num(x: float | int | None, digits: int = 0) -> str:
    """Thousands-separated number, ``-`` for missing."""
    if x is None:
        return "-"
    if isinstance(x, float) and digits:
        return f"{x:,.{digits}f}"
    return f"{round(x):,}"


def fmt_ratio(x: float | None) -> str:
    """A ratio like ``0.73x`` (``-`` for missing)."""
    return "-" if x is None else f"{x:.2f}x"


def fmt_pct(x: float | None) -> str:
    """A percentage with two decimals (``-`` for missing)."""
    return "-" if x is None else f"{100.0 * x:.2f}%"


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either side is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdict(ok: bool | None) -> str:
    """``met`` / ``MISSED`` / ``n/a``."""
    if ok is None:
        return "n/a"
    return "met" if ok else "MISSED"


@dataclass
class Table:
    """A plain-text table printed in GitHub-markdown style (so it pastes into docs)."""

    title: str
    headers: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """Append a row; cells are str()-ed."""
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        """The table as text, columns padded, first column left-aligned."""
        cols = len(self.headers)
        widths = [len(h) for h in self.headers]
        for r in self.rows:
            for i in range(cols):
                widths[i] = max(widths[i], len(r[i]) if i < len(r) else 0)

        def line(cells: Sequence[str]) -> str:
            out = []
            for i in range(cols):
                c = cells[i] if i < len(cells) else ""
                out.append(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]))
            return "| " + " | ".join(out) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        parts = [f"### {self.title}", "", line(self.headers), sep]
        parts += [line(r) for r in self.rows]
        if self.notes:
            parts.append("")
            parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts)

    def print(self) -> None:
        """Print the rendered table followed by a blank line."""
        print(self.render(), flush=True)
        print(flush=True)


# -- temporary places --------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs_dir(tag: str) -> Iterator[str]:
    """A fresh directory on tmpfs (``/dev/shm``), removed afterwards."""
    d = tempfile.mkdtemp(prefix=f"shmbench-{tag}-", dir=TMPFS_ROOT)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def remove_warp_files(shm_name: str) -> None:
    """warp-cache's shared backend leaves ``<name>.data`` and ``<name>.lock`` in
    ``/dev/shm``; remove them."""
    for suffix in (".data", ".lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(TMPFS_ROOT, shm_name + suffix))


def dir_bytes(path: str) -> int:
    """Bytes allocated on disk (st_blocks * 512) by every file under ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


def rss_bytes() -> int:
    """This process's resident set size, from /proc/self/statm."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- redis-server ------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A private redis-server on loopback: no persistence, killed by its PID."""

    port: int
    proc: subprocess.Popen[bytes]
    workdir: str

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def client(self) -> Any:
        """A new redis-py client (hiredis parser if installed), bytes in and out."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


def redis_available() -> bool:
    """True if both the ``redis-server`` binary and redis-py are present."""
    if shutil.which("redis-server") is None:
        return False
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Start ``redis-server`` on a free loopback port; stop it (by PID) on exit."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found (apt-get install redis-server)")
    workdir = tempfile.mkdtemp(prefix="shmbench-redis-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _attempt in range(5):
            port = free_port()
            proc = subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", workdir, "--protected-mode", "yes",
                 "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            server = RedisServer(port, proc, workdir)
            if _wait_redis(server):
                break
            _stop(proc)
            proc = None
        if proc is None:
            raise RuntimeError("redis-server did not come up")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_redis(server: RedisServer, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        try:
            if server.client().ping():
                return True
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- optional imports --------------------------------------------------------------------


def try_import(name: str) -> tuple[Any, str | None]:
    """``(module, None)``, or ``(None, reason)`` if it cannot be imported."""
    import importlib

    try:
        return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - report any import failure as "unavailable"
        return None, f"{type(e).__name__}: {e}"


def shmcache_segment() -> tuple[Any, str | None]:
    """The ``shmcache.segment`` module, or the reason it cannot be used (engine not
    built yet, for instance)."""
    return try_import("shmcache.segment")
