"""Statistics of a :class:`~shmcache.cache.Cache`: per-process counters and the typed
snapshot ``get_statistics()`` returns.

Counters are plain integer attributes bumped without a lock (a ``+= 1`` under the GIL
can lose an update when two threads race; for statistics that is acceptable and keeps
a cache hit cheap).  Operation counts are per process; memory, entries and evictions
come from the segment and so cover every process.  ``ops_per_second`` is measured
between ``get_statistics()`` calls: the rate since the oldest sample still inside the
window (``stats_window`` seconds), or since the cache was opened.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["FunctionStats", "LevelStats", "CacheStatistics", "Counters"]


class Counters:
    """Mutable per-process counters (one per ``Cache`` and one per decorated function)."""

    __slots__ = ("_l0_hits", "l0_fast", "l1_hits", "lower_hits", "misses", "sets",
                 "deletes", "computes",
                 "compute_seconds", "waits", "stale_serves", "lease_breaks",
                 "wait_timeouts", "errors", "negative_hits", "decode_errors",
                 "store_errors")

    # The figures that add up across counters (l0_hits is a property over two fields).
    FIELDS = ("l0_hits", "l1_hits", "lower_hits", "misses", "sets", "deletes", "computes",
              "compute_seconds", "waits", "stale_serves", "lease_breaks", "wait_timeouts",
              "errors", "negative_hits", "decode_errors", "store_errors")

    def __init__(self) -> None:
        self._l0_hits = 0
        # Object-cache hits of the decorator's hot path, counted in C by Segment.l0_get
        # (a native int64: bumping a Python attribute there costs more than the check).
        self.l0_fast = bytearray(8)
        self.l1_hits = 0
        # Served from L2/L3 after an L1 miss (each level also counts in its TierStats).
        self.lower_hits = 0
        self.misses = 0
        self.sets = 0
        self.deletes = 0
        self.computes = 0
        self.compute_seconds = 0.0
        self.waits = 0
        self.stale_serves = 0
        self.lease_breaks = 0
        self.wait_timeouts = 0
        # errors: every failure -- the function raised, an entry could not be decoded
        # (decode_errors), a result or lease could not be stored (store_errors).
        self.errors = 0
        self.negative_hits = 0
        self.decode_errors = 0
        self.store_errors = 0

    def add(self, other: Counters) -> None:
        """Add ``other``'s figures to these."""
        for f in Counters.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))

    @property
    def l0_hits(self) -> int:
        """Hits served from the per-process object cache."""
        return self._l0_hits + int.from_bytes(self.l0_fast, sys.byteorder)

    @l0_hits.setter
    def l0_hits(self, value: int) -> None:
        self._l0_hits = value - int.from_bytes(self.l0_fast, sys.byteorder)

    @property
    def ops(self) -> int:
        return (self.l0_hits + self.l1_hits + self.lower_hits + self.misses + self.sets
                + self.deletes)


@dataclass(frozen=True, slots=True)
class LevelStats:
    """Hits and misses of one level (``"L0"`` object cache, ``"C_MEMORY"`` segment)."""

    hits: int
    misses: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


@dataclass(frozen=True, slots=True)
class FunctionStats:
    """Figures of one decorated function in this process.  ``errors`` counts every
    failure: exceptions of the function, entries that could not be decoded
    (``decode_errors``, each also a miss) and results, leases or tag counters that could
    not be stored because the segment was full or locked (``store_errors``)."""

    name: str
    hits: int
    misses: int
    computes: int
    compute_seconds: float
    waits: int
    stale_serves: int
    errors: int
    decode_errors: int = 0
    store_errors: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def avg_compute_ms(self) -> float:
        return 1000.0 * self.compute_seconds / self.computes if self.computes else 0.0


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot: ``hit_ratio``, per-level hits/misses, memory, entries, evictions,
    ``ops_per_second``, per-function figures, stampede waits and stale serves.

    ``hits``/``misses``/``levels``/``functions`` count this process's calls;
    ``memory_usage_mb``, ``entries``, ``evictions`` and ``segment_hit_ratio`` describe
    the shared segment (all processes).
    """

    hits: int
    misses: int
    hit_ratio: float
    levels: dict[str, LevelStats]
    sets: int
    deletes: int
    memory_usage_mb: float
    memory_limit_mb: float
    entries: int
    evictions: int
    expirations: int
    segment_hit_ratio: float
    ops_per_second: float
    stampede_waits: int
    stale_serves: int
    lease_breaks: int
    wait_timeouts: int
    functions: dict[str, FunctionStats] = field(default_factory=dict)
    #: Entries that could not be decoded here (counted as misses, dropped).
    decode_errors: int = 0
    #: Results, leases and tag counters a cached call could not store (segment full,
    #: value too large, lock timeout): the call still returned its result.
    store_errors: int = 0
    #: L2/L3 operations skipped or failed because the level was down (callers saw a
    #: miss, never an exception), and values refused because their HMAC failed.
    degraded_ops: int = 0
    bad_seals: int = 0
    #: The lower levels' own counters in this process ({"REDIS": {...}, "DISK": ...}).
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    #: The host's sidecar as it last reported in the segment (lag_ms, drained, ...);
    #: empty when none has run.
    sidecar: dict[str, float] = field(default_factory=dict)


class RateWindow:
    """Samples of (time, total ops) for ``ops_per_second`` over a recent window."""

    def __init__(self, window: float, start_ops: int = 0) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), start_ops)])

    def rate(self, total_ops: int) -> float:
        now = time.monotonic()
        with self._lock:
            s = self._samples
            # Keep the newest sample older than the window as the base, drop the rest.
            while len(s) > 1 and now - s[1][0] >= self.window:
                s.popleft()
            t0, n0 = s[0]
            s.append((now, total_ops))
        dt = now - t0
        return (total_ops - n0) / dt if dt > 0 else 0.0
