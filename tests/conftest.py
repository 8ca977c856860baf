"""Shared fixtures for the engine tests: one fresh, uniquely named segment per test.

Every segment a test makes is named ``shmtest-<pid>-<random>`` so that a session-level
check can prove none of them outlives the test run (a leaked POSIX shared-memory object
stays in /dev/shm until reboot).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _helpers import PREFIX, new_name

from shmcache import Segment, unlink_segment

SEG_SIZE = 8 << 20


def _ours() -> set[str]:
    # Only this run's names: another pytest run on the machine may be creating its own.
    mine = f"{PREFIX}{os.getpid()}-"
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(mine)}
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_segments() -> Iterator[None]:
    before = _ours()
    yield
    leaked = _ours() - before
    for n in leaked:  # clean up so one failing run does not poison the next
        unlink_segment(n)
    assert not leaked, f"tests leaked shared-memory objects: {sorted(leaked)}"


@pytest.fixture
def segname() -> Iterator[str]:
    name = new_name()
    yield name
    unlink_segment(name)


@pytest.fixture
def seg(segname: str) -> Iterator[Segment]:
    s = Segment.create(segname, size=SEG_SIZE)
    yield s
    s.close()
