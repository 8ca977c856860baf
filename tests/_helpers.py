"""Helpers shared by the tests: running code in a child process and raw segment access.

A child process is how these tests survive a crash in the engine: a SIGSEGV/SIGBUS in
the child becomes a clear test failure in the parent instead of killing pytest.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import posix_ipc

PREFIX = "shmtest-"
FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")


class ChildCrashed(AssertionError):
    """The child process died without reporting (killed by a signal or os._exit)."""


def _child_main(conn: Any, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        res = fn(*args)
        conn.send((True, res))
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        conn.send((False, f"{type(e).__module__}.{type(e).__name__}: {e}\n"
                          f"{traceback.format_exc()}"))
    finally:
        conn.close()


def run_isolated(fn: Callable[..., Any], *args: Any, timeout: float = 60.0,
                 ctx: Any = FORK) -> Any:
    """Run ``fn(*args)`` in a child process; return its result, or raise
    :class:`ChildCrashed` if it died by a signal, AssertionError if it raised or hung."""
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_main, args=(w, fn, args))
    p.start()
    w.close()
    try:
        if not r.poll(timeout):
            p.kill()
            p.join(10)
            raise AssertionError(f"child {fn.__name__} hung for {timeout}s")
        try:
            ok, val = r.recv()
        except EOFError:
            p.join(10)
            sig = f" (signal {-p.exitcode})" if p.exitcode and p.exitcode < 0 else ""
            raise ChildCrashed(f"child {fn.__name__} died without a result: "
                               f"exitcode {p.exitcode}{sig}") from None
    finally:
        r.close()
    p.join(30)
    if p.is_alive():
        p.kill()
        p.join(10)
    if not ok:
        raise AssertionError(f"child {fn.__name__} raised: {val}")
    if p.exitcode not in (0, None):
        raise ChildCrashed(f"child {fn.__name__} exited with {p.exitcode} after reporting")
    return val


def new_name(tag: str = "") -> str:
    """A segment name that no other test (or test run) uses; the session check in
    conftest.py fails the run if any ``shmtest-*`` object is left behind."""
    return f"{PREFIX}{os.getpid()}-{tag}{uuid.uuid4().hex[:8]}"


def shm_path(name: str) -> str:
    return "/dev/shm/" + name.strip("/")


def make_raw_object(name: str, data: bytes, mode: int = 0o600) -> None:
    """Create a POSIX shared-memory object holding exactly ``data`` (not a segment)."""
    mem = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=mode, size=len(data))
    try:
        if data:
            with mmap.mmap(mem.fd, len(data)) as m:
                m[:] = data
    finally:
        mem.close_fd()
    os.chmod(shm_path(name), mode)  # umask must not narrow what the test asked for


def patch_bytes(name: str, offset: int, data: bytes) -> bytes:
    """Overwrite bytes of the object in place through a separate mapping; return the
    bytes that were there."""
    fd = os.open(shm_path(name), os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size) as m:
            old = m[offset:offset + len(data)]
            m[offset:offset + len(data)] = data
            return bytes(old)
    finally:
        os.close(fd)


def read_bytes(name: str, offset: int = 0, n: int | None = None) -> bytes:
    with open(shm_path(name), "rb") as f:
        f.seek(offset)
        return f.read() if n is None else f.read(n)
