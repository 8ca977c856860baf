"""Stampede control across processes: one process computes a missing key, others wait.

The protocol lives entirely in the segment, so it works between any processes that
attach it (forked workers, spawned ones, unrelated programs):

* **Lease.** A process that misses tries ``Segment.add`` of ``__shmcache__:lease:<key>``
  holding ``pid:starttime`` with a short TTL (``lease_ttl``).  ``add`` is atomic, so at
  most one process holds a live lease; the TTL bounds how long a hung owner can block.
* **Waiters** poll the result key with exponential backoff (``poll_min`` doubling up to
  ``poll_max``) for at most ``wait_timeout`` seconds, then compute themselves.  With
  ``stale_while_revalidate`` a waiter that found a stale value returns it at once.
* **Stale-while-revalidate.** A caller that takes the lease of a stale entry returns
  the stale value too and hands the lease to a background refresh (a flow the cache
  drives on a thread pool or as an asyncio task) that computes, stores and releases it.
* **Dead owners.** On every poll a waiter checks the lease's owner; a process that is
  gone, a zombie, or whose pid was reused (start time differs) loses its lease at once
  (``delete`` with ``expect_version``, so only that exact lease is removed).
* **Errors.** An owner whose computation raises releases its lease on the way out, so a
  waiter wakes on its next poll and computes (or finds a cached negative entry).
* **Full segment.** If the lease cannot be stored (:data:`STORE_ERRORS`), the caller
  computes without it (``lease_failed`` reports it) instead of failing the call.
* **Re-entrancy.** A computation that asks for its own key again (same thread, same
  task) computes directly instead of waiting for itself; tracked in a ``ContextVar``,
  so threads and asyncio tasks each see only their own calls.

The flow is written once, as a generator that yields *steps* (:data:`COMPUTE` or a
number of seconds to sleep) and is driven by :func:`run_sync` or :func:`run_async`;
sync and async callers differ only in how they sleep and call the function.

This module never serializes; it calls back into the cache for lookups and stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Final

from .errors import LockTimeoutError, SegmentFullError, ValueTooLargeError
from .keys import shorten
from .segment import Segment
from .stats import Counters

__all__ = ["COMPUTE", "MISS", "FRESH", "STALE", "STORE_ERRORS", "Flow", "Background",
           "lease_key", "acquire", "release", "owner_alive", "process_token", "single_flight",
           "run_sync",
           "run_async", "computing"]

MISS: Final = 0
FRESH: Final = 1
STALE: Final = 2

#: Errors of a segment write that mean "could not store this now" (full even after
#: eviction, a value over ``max_value_len``, a lock not taken in time): a cached call
#: degrades to computing without the lease / without caching, it never fails on them.
STORE_ERRORS: Final = (SegmentFullError, ValueTooLargeError, LockTimeoutError)


class _Compute:
    __slots__ = ()

    def __repr__(self) -> str:
        return "COMPUTE"


COMPUTE: Final = _Compute()

#: A step of the flow: COMPUTE, or seconds to sleep.
Step = _Compute | float
Flow = Generator[Step, Any, Any]
#: Schedules a background refresh flow: ``background(flow, abandon) -> scheduled``.
Background = Callable[[Flow, Callable[[], None]], bool]

_LEASE_PREFIX: Final = "__shmcache__:lease:"

#: Keys being computed by the current thread / asyncio task (re-entrancy guard).
computing: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "shmcache_computing", default=frozenset())


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), None if gone/zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()
    if not rest or rest[0] in (b"Z", b"X"):
        return None
    return rest[19].decode() if len(rest) > 19 else "?"


_me: tuple[int, bytes] | None = None


def process_token() -> bytes:
    """``b"<pid>:<start time>"``: this process, distinct from any later one that
    reuses its pid (what :func:`owner_alive` checks)."""
    global _me
    pid = os.getpid()
    if _me is None or _me[0] != pid:  # recomputed after fork
        _me = (pid, f"{pid}:{_start_time(pid) or '?'}".encode())
    return _me[1]


def lease_key(key: str, max_key_len: int) -> str:
    """The lease key guarding ``key``."""
    return shorten(_LEASE_PREFIX + key, max_key_len)


def acquire(seg: Segment, lkey: str, ttl: float) -> int | None:
    """Take the lease: its version, or ``None`` if another holder has it."""
    return seg.add(lkey, process_token(), ttl)


def release(seg: Segment, lkey: str, version: int) -> None:
    """Drop our lease (only that exact version: never a successor's)."""
    # It may have expired and been retaken: then it is not ours any more.
    with contextlib.suppress(Exception):
        seg.delete(lkey, expect_version=version)


def owner_alive(token: bytes) -> bool:
    """True unless the lease's owner process is gone, a zombie, or its pid reused."""
    try:
        pid_s, start = token.decode().split(":", 1)
        pid = int(pid_s)
    except ValueError:
        return False
    now = _start_time(pid)
    return now is not None and (start == "?" or now == start)


def _break_if_dead(seg: Segment, lkey: str, counters: tuple[Counters, ...]) -> bool:
    """Check the lease: True if it is gone (or we just broke a dead owner's lease)."""
    got = seg.get_with_info(lkey)
    if got is None:
        return True
    token, info = got
    if owner_alive(token):
        return False
    try:
        seg.delete(lkey, expect_version=info.version)
    except Exception:  # noqa: BLE001 - someone else broke or replaced it first
        return True
    for c in counters:
        c.lease_breaks += 1
    return True


def single_flight(seg: Segment, key: str, *, first: tuple[int, Any],
                  lookup: Callable[[], tuple[int, Any]],
                  before: Callable[[], Any],
                  store: Callable[[Any, Any], None],
                  store_error: Callable[[BaseException, Any], None],
                  lease_failed: Callable[[BaseException], None],
                  counters: tuple[Counters, ...], max_key_len: int, lease_ttl: float,
                  wait_timeout: float, poll_min: float, poll_max: float,
                  stale_ok: bool, use_lease: bool = True,
                  background: Background | None = None) -> Flow:
    """The miss path of a cached call, as a generator of steps.

    ``first`` is the ``(state, value)`` the caller's lookup found (MISS or STALE).
    ``before()`` runs just before computing and returns a context for ``store`` (the
    tag generations, read before the computation so an invalidation during it wins).
    The generator's return value is the result; exceptions propagate.

    With ``stale_ok`` and ``background``, a caller that takes the lease of a STALE
    entry returns the stale value and hands ``background(refresh, abandon)`` a flow
    that computes, stores and releases the lease (:func:`_refresh`); ``background``
    returns True once it has scheduled it (it must then drive it to its end, or call
    ``abandon()`` -- which releases the lease -- if it never starts it), False to have
    this caller refresh inline instead.
    """
    state, stale = first
    if not use_lease or key in computing.get():
        return (yield from _compute(key, before, store, store_error, counters))
    lkey = lease_key(key, max_key_len)
    deadline = 0.0
    delay = poll_min
    while True:
        try:
            ver = acquire(seg, lkey, lease_ttl)
        except STORE_ERRORS as e:
            lease_failed(e)
            return (yield from _compute(key, before, store, store_error, counters))
        if ver is not None:
            handed = False
            try:
                st, val = lookup()  # filled (or refreshed) between our miss and the lease?
                if st == FRESH:
                    return val
                if st == STALE and stale_ok and background is not None:
                    # Serve the stale value now; the lease goes with the refresh.
                    refresh = _refresh(seg, lkey, ver, key, before, store, counters)
                    if background(refresh, functools.partial(release, seg, lkey, ver)):
                        handed = True
                        for c in counters:
                            c.stale_serves += 1
                        return val
                return (yield from _compute(key, before, store, store_error, counters))
            finally:
                if not handed:
                    release(seg, lkey, ver)
        if state == STALE and stale_ok:
            for c in counters:
                c.stale_serves += 1
            return stale
        now = time.monotonic()
        if not deadline:
            deadline = now + wait_timeout
            for c in counters:
                c.waits += 1
        if now >= deadline:
            for c in counters:
                c.wait_timeouts += 1
            return (yield from _compute(key, before, store, store_error, counters))
        yield min(delay, max(deadline - now, 0.0))
        delay = min(delay * 2, poll_max)
        st, val = lookup()
        if st == FRESH:
            return val
        if st == STALE:
            state, stale = st, val
        _break_if_dead(seg, lkey, counters)  # gone or broken: the loop retries the lease


def _refresh(seg: Segment, lkey: str, ver: int, key: str, before: Callable[[], Any],
             store: Callable[[Any, Any], None], counters: tuple[Counters, ...]) -> Flow:
    """A background refresh of a stale entry under our lease ``ver``: compute, store,
    release.  A failure (of the function or of storing its result) is counted in
    ``errors`` and raised to the driver; nothing is stored in its place (no negative
    entry), so the stale value keeps being served until it expires."""

    def store_counted(value: Any, ctx: Any) -> None:
        try:
            store(value, ctx)
        except Exception:
            for c in counters:
                c.errors += 1
            raise

    try:
        return (yield from _compute(key, before, store_counted, _no_store_error, counters))
    finally:
        release(seg, lkey, ver)


def _no_store_error(exc: BaseException, ctx: Any) -> None:
    pass


def _compute(key: str, before: Callable[[], Any], store: Callable[[Any, Any], None],
             store_error: Callable[[BaseException, Any], None],
             counters: tuple[Counters, ...]) -> Flow:
    ctx = before()
    t0 = time.perf_counter()
    try:
        value = yield COMPUTE
    except Exception as e:
        for c in counters:
            c.errors += 1
        store_error(e, ctx)
        raise
    finally:
        dt = time.perf_counter() - t0
        for c in counters:
            c.computes += 1
            c.compute_seconds += dt
    store(value, ctx)
    return value


def run_sync(flow: Flow, key: str, compute: Callable[[], Any]) -> Any:
    """Drive ``flow`` in this thread: sleep with ``time.sleep``, call ``compute()``."""
    try:
        step = flow.send(None)
        while True:
            if step is COMPUTE:
                tok = computing.set(computing.get() | {key})
                try:
                    value = compute()
                except BaseException as e:  # noqa: BLE001 - handed to the flow
                    computing.reset(tok)
                    step = flow.throw(e)
                    continue
                computing.reset(tok)
                step = flow.send(value)
            else:
                time.sleep(step)  # type: ignore[arg-type]
                step = flow.send(None)
    except StopIteration as stop:
        return stop.value


async def run_async(flow: Flow, key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
    """Drive ``flow`` in a task: ``await asyncio.sleep``, ``await compute()``."""
    try:
        step = flow.send(None)
        while True:
            if step is COMPUTE:
                tok = computing.set(computing.get() | {key})
                try:
                    value = await compute()
                except BaseException as e:  # noqa: BLE001 - handed to the flow
                    computing.reset(tok)
                    step = flow.throw(e)
                    continue
                computing.reset(tok)
                step = flow.send(value)
            else:
                await asyncio.sleep(step)  # type: ignore[arg-type]
                step = flow.send(None)
    except StopIteration as stop:
        return stop.value
