"""Metrics of a shmcache segment, read at scrape time from any one process on the host.

Nothing here runs on a cache hit.  The figures come from two places:

* **the engine** (:meth:`Segment.stats`): operation counters of every process that ever
  attached (the engine folds a closed or reaped process's counters into its totals),
  memory by size class, fragmentation, evictions and expirations by reason, the write
  journal (depth, drops) and one block per process slot.  Any process can read them;
* **the Python layer** (:meth:`Cache.get_statistics`): L0/L1 hits per level, figures
  per decorated function, stampede waits, stale serves.  Those are counted in each
  process's own memory, so a process that wants them exported runs a
  :class:`Publisher`: a daemon thread that every ``interval`` seconds writes the
  process's figures into the segment as one small JSON entry
  (``__shmcache__:metrics:proc:<token>``).  Publishing is the only cost of enabling
  metrics, and it is paid off the hit path.

A reader (the Prometheus :class:`SegmentCollector`, the OpenTelemetry callbacks,
``shmcache stats``, the dashboard) takes one :func:`snapshot`: the engine's statistics
plus the sum of the published figures.  Workers come and go without counters going
backwards: when a publishing process is gone (pid absent, or reused: the token carries
the process start time), a reader or publisher *folds* its last figures into the
``retired`` totals of the index entry (``__shmcache__:metrics:index``) with one
compare-and-set, then deletes its entry; readers re-read the index until its version
is unchanged around their reads, so a fold never counts a process twice or drops it.
A process wrongly taken for dead (another pid namespace) sees its token folded and
starts a new epoch that publishes only what it counted since.

Every numeric field of ``SegmentStats``, ``ClassStats``, ``SlotStats`` and
``CacheStatistics`` (and dict fields of dataclasses, such as ``levels`` and
``functions``) is exported by name, so figures added to those classes later (the
sidecar's lag, say) flow through without a change here.  Engine fields are gauges
unless their name ends in ``dropped``; published Python figures are
counters unless their name says otherwise (``ratio``, ``lag``, ``per_second``, ...):
see :func:`is_counter`.

Limits: the published entries live in the cache like any entry, so memory pressure
can evict them (a live process re-publishes within ``interval``; the retired totals
of exited processes are then lost, which Prometheus sees as a counter reset), and
``clear()`` removes them.  A process killed with SIGKILL loses what it counted since
its last publication.

Example::

    >>> from shmcache import Cache, CacheConfig
    >>> from shmcache.metrics import Publisher, snapshot
    >>> cache = Cache(CacheConfig(name="doc-metrics", c_memory_size_mb=8))
    >>> cache.set("a", 1); _ = cache.get("a")
    >>> pub = Publisher(cache, interval=5.0); pub.publish()
    >>> snap = snapshot(cache.segment)
    >>> snap["counters"]["sets"] >= 1, snap["cache"]["counters"]["hits"]
    (True, 1)
    >>> pub.stop(); cache.close(); cache.unlink()
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, Final

from . import stampede
from .errors import SegmentClosedError, SegmentNotFoundError, ShmCacheError, VersionMismatchError
from .logs import METRICS, get_logger
from .segment import Segment, segment_exists

if TYPE_CHECKING:
    from .cache import Cache

__all__ = ["Publisher", "enable", "snapshot", "fold_dead", "families", "Family",
           "SegmentSource", "SegmentCollector", "register_collector", "instrument_meter",
           "is_counter", "METRICS_PREFIX"]

_log = get_logger(METRICS)

#: Every key of this module starts with this (``shmcache keys`` hides the prefix
#: ``__shmcache__:`` unless asked).
METRICS_PREFIX: Final = "__shmcache__:metrics:"
_INDEX_KEY: Final = METRICS_PREFIX + "index"
_PROC_PREFIX: Final = METRICS_PREFIX + "proc:"
_FORMAT_VERSION: Final = 1
#: Tokens of folded processes kept in the index, so a publisher that was taken for dead
#: (another pid namespace, a long SIGSTOP) finds out and starts a new epoch.
_FOLDED_KEEP: Final = 256
_CAS_TRIES: Final = 64

#: CacheStatistics fields that repeat the segment's figures (exported from the engine
#: once, not once per process) or are ratios/rates derived from counters.
_DERIVED: Final = frozenset({"memory_usage_mb", "memory_limit_mb", "entries", "evictions",
                             "expirations", "segment_hit_ratio", "hit_ratio",
                             "ops_per_second"})
#: A published field whose name contains one of these is a gauge (summing it over
#: processes is still meaningful, folding a dead process's value into totals is not).
_GAUGE_MARKERS: Final = ("ratio", "lag", "per_second", "_mb", "bytes", "depth", "size",
                         "timestamp", "_age", "pending", "inflight", "queue")

#: Cumulative figures of the sidecar's report (the rest are gauges: lag, pending, ...).
_SIDECAR_COUNTERS: Final = frozenset({"drained", "written_redis", "written_disk",
                                      "published", "received", "applied",
                                      "pending_dropped", "swept", "reaped", "batches",
                                      "resyncs", "errors"})

Figures = dict[str, float]
Groups = dict[str, dict[str, Figures]]


def is_counter(name: str, *, published: bool) -> bool:
    """Whether a statistics field is a monotonic counter (else a gauge).

    Engine fields (``published=False``) are gauges unless the name ends in
    ``dropped`` (``pages_total`` is a size, not a count of events); published Python
    figures are counters unless the name contains a gauge marker (``ratio``, ``lag``,
    ``per_second``, ``_mb``, ``bytes``, ``depth``, ``size``, ...).

    >>> is_counter("journal_dropped", published=False), is_counter("stale_serves", published=True)
    (True, True)
    >>> is_counter("sidecar_lag_seconds", published=True)
    False
    """
    if not published:
        return name.endswith("dropped")
    return not any(m in name for m in _GAUGE_MARKERS)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# -- the published figures of one process -----------------------------------------------

def _figures_of(stats: Any) -> dict[str, Any]:
    """``{"figures": {...}, "groups": {...}}`` from a CacheStatistics: every numeric
    field, and every dict field of dataclasses (``levels``, ``functions``)."""
    figs: Figures = {}
    groups: Groups = {}
    for f in fields(stats):
        v = getattr(stats, f.name)
        if f.name in _DERIVED:
            continue
        if _number(v):
            figs[f.name] = v
        elif isinstance(v, Mapping):
            g = {str(k): {x.name: getattr(item, x.name) for x in fields(item)
                          if _number(getattr(item, x.name))}
                 for k, item in v.items() if is_dataclass(item)}
            # Plain nested mappings too: ``tiers`` ({"REDIS": {"hits": ...}}).
            g.update({str(k): {n: x for n, x in item.items() if _number(x)}
                      for k, item in v.items()
                      if isinstance(item, Mapping) and f.name != "sidecar"})
            if g:
                groups[f.name] = g
    return {"figures": figs, "groups": groups}


def _minus(cur: Figures, base: Figures) -> Figures:
    return {k: (v - base.get(k, 0) if is_counter(k, published=True) else v)
            for k, v in cur.items()}


def _subtract(cur: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Counters of ``cur`` minus those of ``base`` (gauges kept as they are)."""
    bg: Groups = base.get("groups", {})
    return {"figures": _minus(cur["figures"], base.get("figures", {})),
            "groups": {g: {k: _minus(v, bg.get(g, {}).get(k, {})) for k, v in items.items()}
                       for g, items in cur["groups"].items()}}


def _add_counters(acc: Figures, figs: Mapping[str, Any]) -> None:
    for k, v in figs.items():
        if _number(v) and is_counter(k, published=True):
            acc[k] = acc.get(k, 0) + v


def _add_groups(acc: Groups, groups: Mapping[str, Any], *, gauges: bool) -> None:
    for g, items in groups.items():
        dst = acc.setdefault(g, {})
        for k, figs in items.items():
            d = dst.setdefault(k, {})
            for n, v in figs.items():
                if _number(v) and (gauges or is_counter(n, published=True)):
                    d[n] = d.get(n, 0) + v


# -- process identity ---------------------------------------------------------------------

def _new_token() -> str:
    # The process's identity (pid + start time, as stampede leases use) and a nonce.
    return f"{stampede.process_token().decode()}:{uuid.uuid4().hex[:8]}"


def _token_alive(token: str) -> bool:
    return stampede.owner_alive(token.rsplit(":", 1)[0].encode())


# -- the index entry ----------------------------------------------------------------------

def _empty_index() -> dict[str, Any]:
    return {"v": _FORMAT_VERSION, "active": [], "folded": [],
            "retired": {"figures": {}, "groups": {}}, "retired_processes": 0}


def _load(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    return d if isinstance(d, dict) and d.get("v") == _FORMAT_VERSION else None


def _dump(d: Mapping[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def _read_index(seg: Segment) -> tuple[dict[str, Any], int]:
    """The index and its version (0: absent).  A damaged one reads as empty."""
    got = seg.get_with_info(_INDEX_KEY)
    if got is None:
        return _empty_index(), 0
    idx = _load(got[0])
    if idx is None or not isinstance(idx.get("active"), list):
        return _empty_index(), got[1].version
    return idx, got[1].version


def _update_index(seg: Segment,
                  change: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Apply ``change`` (returns False for "nothing to do") by compare-and-set."""
    for _ in range(_CAS_TRIES):
        idx, ver = _read_index(seg)
        if not change(idx):
            return idx
        data = _dump(idx)
        if ver == 0:
            if seg.add(_INDEX_KEY, data) is not None:
                return idx
            continue
        try:
            seg.set(_INDEX_KEY, data, expect_version=ver)
            return idx
        except VersionMismatchError:
            continue  # another process changed it between our read and write
    raise ShmCacheError("metrics index: too many concurrent updates")


def _proc_key(token: str) -> str:
    return _PROC_PREFIX + token


def fold_dead(seg: Segment, *, grace: float | None = None,
              only: Iterable[str] | None = None) -> int:
    """Fold the published figures of processes that are gone into the retired totals;
    return how many were folded.

    A process counts as gone when its pid no longer runs the process that published
    (start time) and its last publication is older than ``grace`` seconds (default:
    twice its publishing interval).  ``only`` folds exactly those tokens (a publisher
    retiring itself at exit).
    """
    idx, _ = _read_index(seg)
    now = time.time()
    entries: dict[str, dict[str, Any] | None] = {}
    for tok in (list(only) if only is not None else idx["active"]):
        if tok not in idx["active"] or (only is None and _token_alive(tok)):
            continue  # checked before reading the entry: a live process costs no read
        e = _load(seg.get(_proc_key(tok)))
        if only is None:
            g = grace if grace is not None else 2.0 * float((e or {}).get("interval", 0))
            if e is not None and now - float(e.get("ts", 0)) < g:
                continue
        entries[tok] = e
    if not entries:
        return 0

    folded: list[str] = []

    def change(ix: dict[str, Any]) -> bool:
        folded.clear()
        for tok, e in entries.items():
            if tok not in ix["active"]:
                continue  # folded meanwhile by someone else
            ix["active"].remove(tok)
            if e is not None:
                ret = ix["retired"]
                _add_counters(ret.setdefault("figures", {}), e.get("figures", {}))
                _add_groups(ret.setdefault("groups", {}), e.get("groups", {}), gauges=False)
            ix["folded"] = (ix["folded"] + [tok])[-_FOLDED_KEEP:]
            ix["retired_processes"] = int(ix.get("retired_processes", 0)) + 1
            folded.append(tok)
        return bool(folded)

    _update_index(seg, change)
    for tok in folded:
        seg.delete(_proc_key(tok))
    if folded:
        _log.debug("folded the metrics of %d exited process(es)", len(folded))
    return len(folded)


def _read_processes(seg: Segment, *, fold: bool) -> dict[str, Any]:
    """The published figures: counters summed over live and retired processes,
    gauges per live process.  Consistent with concurrent folds (see module doc)."""
    if fold:
        with contextlib.suppress(ShmCacheError):
            fold_dead(seg)
    entries: dict[str, dict[str, Any]] = {}
    idx = _empty_index()
    for _ in range(5):
        idx, ver = _read_index(seg)
        entries = {}
        for tok in idx["active"]:
            e = _load(seg.get(_proc_key(tok)))
            if e is not None:
                entries[tok] = e
        _, ver2 = _read_index(seg)
        if ver2 == ver:
            break
    folded = set(idx.get("folded", ()))
    counters: Figures = {}
    groups: Groups = {}
    retired = idx.get("retired", {})
    _add_counters(counters, retired.get("figures", {}))
    _add_groups(groups, retired.get("groups", {}), gauges=False)
    procs = []
    for tok, e in sorted(entries.items()):
        if tok in folded:
            continue
        figs = e.get("figures", {})
        _add_counters(counters, figs)
        _add_groups(groups, e.get("groups", {}), gauges=True)
        procs.append({"token": tok, "pid": e.get("pid"), "slot": e.get("slot"),
                      "published_at": e.get("ts"),
                      "gauges": {k: v for k, v in figs.items()
                                 if _number(v) and not is_counter(k, published=True)}})
    return {"processes": procs, "retired_processes": int(idx.get("retired_processes", 0)),
            "counters": counters, "groups": groups}


# -- publishing -----------------------------------------------------------------------------

_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()


class Publisher:
    """Publishes one process's :class:`~shmcache.Cache` figures into its segment.

    ``start()`` runs a daemon thread that publishes every ``interval`` seconds
    (:func:`enable` creates and starts one).  A forked child gets its own publisher
    thread and publishes only what it counts itself (the counts it inherited are the
    parent's).  At interpreter exit, or on ``stop()``, the process publishes a last
    time and folds its figures into the retired totals.

    >>> from shmcache import Cache, CacheConfig
    >>> cache = Cache(CacheConfig(name="doc-publisher", c_memory_size_mb=8))
    >>> pub = Publisher(cache, interval=5.0)
    >>> pub.publish()
    >>> snapshot(cache.segment)["cache"]["processes"][0]["pid"] == os.getpid()
    True
    >>> pub.stop(); cache.close(); cache.unlink()
    """

    def __init__(self, cache: Cache, interval: float = 2.0) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0 seconds")
        self.cache = cache
        self.interval = float(interval)
        self._pid = os.getpid()
        self._token = _new_token()
        self._base: dict[str, Any] = {"figures": {}, "groups": {}}
        self._last: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._failures = 0
        _publishers.add(self)

    @property
    def token(self) -> str:
        """This process's current identity in the index (``pid:start:nonce``)."""
        return self._token

    def start(self) -> Publisher:
        """Start the publishing thread (idempotent); returns ``self``."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._stopped = False
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="shmcache-metrics")
                self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
                self._failures = 0
            except SegmentClosedError:
                return  # the cache was closed: nothing more to publish
            except (ShmCacheError, MemoryError, OSError) as e:
                # A full or locked segment must not kill the thread; say so once.
                self._failures += 1
                if self._failures == 1:
                    _log.warning("cannot publish metrics to %r: %s",
                                 self.cache.segment.name, type(e).__name__)

    def publish(self) -> None:
        """Publish this process's figures now."""
        cur = _figures_of(self.cache.get_statistics())
        seg = self.cache.segment
        with self._lock:
            idx, _ = _read_index(seg)
            if self._token in idx.get("folded", ()):
                # Taken for dead and folded: what we published is counted in the
                # retired totals.  Go on under a new name with what came since.
                if self._last is not None:
                    self._base = self._last
                self._token = _new_token()
            pub = _subtract(cur, self._base)
            entry = {"v": _FORMAT_VERSION, "token": self._token, "pid": os.getpid(),
                     "slot": seg.slot, "ts": time.time(), "interval": self.interval, **pub}
            seg.set(_proc_key(self._token), _dump(entry))
            self._last = cur
            if self._token not in idx["active"]:
                tok = self._token

                def change(ix: dict[str, Any]) -> bool:
                    if tok in ix["active"] or tok in ix["folded"]:
                        return False
                    ix["active"].append(tok)
                    return True

                _update_index(seg, change)
        fold_dead(seg)

    def stop(self, *, retire: bool = True) -> None:
        """Stop the thread; with ``retire`` publish a last time and fold this
        process's figures into the retired totals (its entry disappears)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        if self._stopped or os.getpid() != self._pid:
            return
        self._stopped = True
        if retire:
            try:
                self.publish()
                fold_dead(self.cache.segment, only=[self._token])
            except (ShmCacheError, MemoryError, OSError) as e:
                _log.debug("could not retire metrics: %s", type(e).__name__)

    def _after_fork_child(self) -> None:
        running = self._thread is not None and self._thread.is_alive() \
            and not self._stop.is_set()
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._token = _new_token()
        self._last = None
        self._stopped = False
        try:
            # What the child inherited is the parent's to report, not ours.
            self._base = _figures_of(self.cache.get_statistics())
        except (ShmCacheError, MemoryError, OSError):
            self._base = {"figures": {}, "groups": {}}
        if running:
            self.start()


def enable(cache: Cache, interval: float = 2.0) -> Publisher:
    """Publish ``cache``'s figures every ``interval`` seconds: a started
    :class:`Publisher`.  Call it once per process (in gunicorn's ``post_fork``, or
    before forking: children then publish their own figures)."""
    return Publisher(cache, interval).start()


def _after_fork_in_child() -> None:
    for p in list(_publishers):
        p._after_fork_child()


def _at_exit() -> None:
    for p in list(_publishers):
        if not p._stopped and p._thread is not None:
            with contextlib.suppress(Exception):
                p.stop()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)


# -- snapshots ------------------------------------------------------------------------------

def _plain(obj: Any) -> dict[str, Any]:
    """A dataclass as a dict of its numeric, str and dict-of-number fields."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if _number(v) or isinstance(v, str):
            out[f.name] = v
        elif isinstance(v, Mapping):
            out[f.name] = {str(k): x for k, x in v.items() if _number(x)}
    return out


def snapshot(seg: Segment, *, fold: bool = True) -> dict[str, Any]:
    """Everything known about the segment, as JSON-ready data.

    Keys: ``segment`` (name), ``time``, ``self_slot`` (the reader's own slot),
    ``stats`` (every scalar field of ``SegmentStats`` plus ``hit_ratio``,
    ``evictions``, ``expirations``), ``counters`` (engine totals), ``classes`` and
    ``slots`` (lists of dicts), ``cache`` (published Python figures: ``counters``,
    ``groups`` such as ``levels``/``functions``, live ``processes``).
    """
    st = seg.stats()
    stats: dict[str, Any] = {}
    counters: dict[str, Any] = {}
    lists: dict[str, list[dict[str, Any]]] = {}
    for f in fields(st):
        v = getattr(st, f.name)
        if _number(v) or isinstance(v, str):
            stats[f.name] = v
        elif isinstance(v, Mapping) and f.name == "counters":
            counters = {k: x for k, x in v.items() if _number(x)}
        elif isinstance(v, list):
            lists[f.name] = [_plain(x) for x in v if is_dataclass(x)]
    stats.update(hit_ratio=st.hit_ratio, evictions=st.evictions, expirations=st.expirations)
    try:
        procs = _read_processes(seg, fold=fold)
    except ShmCacheError as e:  # the segment is busy: engine figures alone still help
        _log.debug("published metrics unavailable: %s", type(e).__name__)
        procs = {"processes": [], "retired_processes": 0, "counters": {}, "groups": {}}
    from .sidecar import read_report
    return {"segment": seg.name, "time": time.time(), "self_slot": seg.slot,
            "stats": stats, "counters": counters, "classes": lists.get("classes", []),
            "slots": lists.get("slots", []), "cache": procs, "sidecar": read_report(seg)}


class SegmentSource:
    """A segment by name for a long-lived reader (exporter, dashboard).

    Attached on first use; while the name is absent, :meth:`get` returns ``None``.  If
    the name comes to point at another segment (the application was restarted and
    recreated it), the reader re-attaches instead of reporting the old, unlinked one
    forever.  Given a :class:`Segment`, uses it as is (and never closes it).
    """

    def __init__(self, segment: Segment | str) -> None:
        self._given = segment if isinstance(segment, Segment) else None
        self.name = segment.name if isinstance(segment, Segment) else segment
        self._seg: Segment | None = self._given
        self._ino: int | None = None
        self._lock = threading.Lock()
        # Highest engine totals reported so far, per segment generation (see snapshot).
        self._high: tuple[int, dict[str, float]] = (0, {})

    def _inode(self) -> int | None:
        try:
            return os.stat("/dev/shm/" + self.name.strip("/")).st_ino
        except OSError:
            return None

    def get(self) -> Segment | None:
        """The attached segment, or ``None`` if there is none under the name."""
        if self._given is not None:
            return self._given
        with self._lock:
            ino = self._inode()
            if self._seg is not None and ino == self._ino:
                return self._seg
            if self._seg is not None:
                self._seg.close()
                self._seg = None
            if ino is None or not segment_exists(self.name):
                return None
            try:
                self._seg = Segment.attach(self.name, wait=1.0)
            except SegmentNotFoundError:
                return None
            self._ino = ino
            return self._seg

    def snapshot(self, *, fold: bool = True) -> dict[str, Any] | None:
        """:func:`snapshot` of the segment, or ``None`` if it does not exist."""
        seg = self.get()
        if seg is None:
            return None
        try:
            snap = snapshot(seg, fold=fold)
        except SegmentClosedError:
            return None
        self._monotonic(snap)
        return snap

    def _monotonic(self, snap: dict[str, Any]) -> None:
        """Never report an engine total below one reported before.

        The engine reads its totals without a lock (retired counters, then each
        slot), so a read that races a process closing its slot can miss that slot's
        counts for a moment; a scraper would take the dip for a counter reset.  A
        later read is right again, so holding the highest value seen is exact.
        """
        gen = int(snap["stats"].get("generation", 0))
        with self._lock:
            last_gen, high = self._high
            if last_gen != gen:
                high = {}
            for k, v in snap["counters"].items():
                if v < high.get(k, 0):
                    snap["counters"][k] = high[k]
                else:
                    high[k] = v
            self._high = (gen, high)

    def close(self) -> None:
        """Detach (unless the segment was given)."""
        with self._lock:
            if self._given is None and self._seg is not None:
                self._seg.close()
            self._seg = None


# -- flat metric families (Prometheus, OpenTelemetry) ---------------------------------------

@dataclass
class Family:
    """One metric: a name (without ``_total``), ``counter`` or ``gauge``, a help text
    and ``(labels, value)`` samples."""

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


_HELP: Final = {
    "shmcache_up": "1 if the segment could be read at this scrape, else 0",
    "shmcache_hits": "Engine reads that found a live entry (all processes, ever)",
    "shmcache_misses": "Engine reads that found nothing (all processes, ever)",
    "shmcache_evictions": "Entries removed to make room, by reason",
    "shmcache_expirations": "Entries removed because their TTL passed, by where it was found",
    "shmcache_segment_journal_records": "Write-journal depth: records waiting for the sidecar",
    "shmcache_segment_journal_dropped": "Write-journal records dropped (ring full)",
    "shmcache_segment_fragmentation": "1 - payload/used bytes over live entries",
    "shmcache_segment_hit_ratio": "Engine hits / (hits + misses), all processes, ever",
    "shmcache_segment_info": "The segment's eviction policy (value is always 1)",
    "shmcache_cache_stampede_waits": "Cached calls that waited for another process's computation",
    "shmcache_cache_stale_serves": "Cached calls served a stale value (stale-while-revalidate)",
    "shmcache_cache_processes": "Processes currently publishing Python-level figures",
    "shmcache_cache_retired_processes": "Publishing processes that exited (figures folded in)",
}


class _Builder:
    def __init__(self) -> None:
        self.fams: dict[str, Family] = {}

    def add(self, name: str, kind: str, labels: dict[str, str], value: float,
            doc: str = "") -> None:
        fam = self.fams.get(name)
        if fam is None:
            fam = self.fams[name] = Family(name, kind, _HELP.get(name, doc or name))
        fam.samples.append((labels, float(value)))

    def engine_counters(self, prefix: str, counters: Mapping[str, Any],
                        labels: dict[str, str]) -> None:
        for k, v in counters.items():
            if k.startswith("evicted_expired_"):
                self.add(f"{prefix}expirations", "counter",
                         {**labels, "reason": k[len("evicted_expired_"):]}, v)
            elif k.startswith("evicted_"):
                self.add(f"{prefix}evictions", "counter",
                         {**labels, "reason": k[len("evicted_"):]}, v)
            else:
                self.add(f"{prefix}{k}", "counter", labels, v,
                         f"Engine counter {k!r} (Segment.stats())")


def families(snaps: Mapping[str, dict[str, Any] | None]) -> list[Family]:
    """Flatten ``{segment name: snapshot or None}`` into metric families.

    Names: ``shmcache_<counter>`` (engine totals), ``shmcache_evictions{reason}``,
    ``shmcache_expirations{reason}``, ``shmcache_segment_<field>``,
    ``shmcache_class_<field>{class}``, ``shmcache_slot_<...>{slot,pid,state}``,
    ``shmcache_cache_<figure>`` (published, summed), ``shmcache_level_<field>{level}``,
    ``shmcache_function_<field>{function}``, ``shmcache_process_<gauge>{pid,slot}``.
    Every sample carries ``segment``.
    """
    b = _Builder()
    for name, snap in snaps.items():
        seg = {"segment": name}
        b.add("shmcache_up", "gauge", seg, 0 if snap is None else 1)
        if snap is None:
            continue
        for k, v in snap["stats"].items():
            if k in ("evictions", "expirations"):
                continue  # sums of shmcache_evictions / shmcache_expirations by reason
            if isinstance(v, str):
                b.add("shmcache_segment_info", "gauge", {**seg, k: v}, 1)
            else:
                b.add(f"shmcache_segment_{k}",
                      "counter" if is_counter(k, published=False) else "gauge", seg, v,
                      f"Segment statistic {k!r} (Segment.stats())")
        b.engine_counters("shmcache_", snap["counters"], seg)
        for c in snap["classes"]:
            lab = {**seg, "class": str(c.get("chunk_bytes") or "large")}
            for k, v in c.items():
                if k != "chunk_bytes" and _number(v):
                    b.add(f"shmcache_class_{k}", "counter" if k == "evictions" else "gauge",
                          lab, v, f"Size class {k!r} (chunk_bytes; 'large': page runs)")
        for s in snap["slots"]:
            lab = {**seg, "slot": str(s.get("slot")), "pid": str(s.get("pid")),
                   "state": str(s.get("state"))}
            for k, v in s.items():
                if k not in ("slot", "pid") and _number(v):
                    b.add(f"shmcache_slot_{k}", "gauge", lab, v,
                          f"Process slot {k!r} (one per attached process)")
            b.engine_counters("shmcache_slot_", s.get("counters", {}), lab)
        for k, v in snap.get("sidecar", {}).items():
            if k in ("pid", "heartbeat"):
                continue
            b.add(f"shmcache_sidecar_{k}", "counter" if k in _SIDECAR_COUNTERS else "gauge",
                  seg, v, f"The host's sidecar, as it last reported ({k!r})")
        cache = snap["cache"]
        b.add("shmcache_cache_processes", "gauge", seg, len(cache["processes"]))
        b.add("shmcache_cache_retired_processes", "counter", seg, cache["retired_processes"])
        for k, v in cache["counters"].items():
            b.add(f"shmcache_cache_{k}", "counter", seg, v,
                  f"Python-level figure {k!r} summed over publishing processes")
        for g, items in cache["groups"].items():
            one = g[:-1] if g.endswith("s") else g
            for key, figs in items.items():
                for k, v in figs.items():
                    b.add(f"shmcache_{one}_{k}",
                          "counter" if is_counter(k, published=True) else "gauge",
                          {**seg, one: key}, v, f"Per-{one} figure {k!r}")
        for p in cache["processes"]:
            lab = {**seg, "pid": str(p.get("pid")), "slot": str(p.get("slot"))}
            for k, v in p["gauges"].items():
                b.add(f"shmcache_process_{k}", "gauge", lab, v, f"Per-process gauge {k!r}")
    return list(b.fams.values())


class SegmentCollector:
    """A prometheus_client collector that reads segments at scrape time.

    Register it in any one process (an exporter, one worker, the sidecar): it attaches
    the segments by name and reports every process's figures, so there is no
    multiprocess directory and no per-worker scrape.

    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from shmcache import Segment, unlink_segment
    >>> seg = Segment.create("doc-collector", size=8 << 20)
    >>> reg = CollectorRegistry(); reg.register(SegmentCollector(seg))
    >>> b"shmcache_up{segment=\\"doc-collector\\"} 1.0" in generate_latest(reg)
    True
    >>> seg.close(); unlink_segment("doc-collector")
    True
    """

    def __init__(self, *segments: Segment | str | SegmentSource, fold: bool = True) -> None:
        if not segments:
            raise ValueError("SegmentCollector needs at least one segment or name")
        self.sources = [s if isinstance(s, SegmentSource) else SegmentSource(s)
                        for s in segments]
        self.fold = fold

    def snapshots(self) -> dict[str, dict[str, Any] | None]:
        """``{name: snapshot or None}`` for every segment."""
        out: dict[str, dict[str, Any] | None] = {}
        for src in self.sources:
            try:
                out[src.name] = src.snapshot(fold=self.fold)
            except (ShmCacheError, OSError) as e:
                _log.warning("cannot read segment %r for metrics: %s", src.name,
                             type(e).__name__)
                out[src.name] = None
        return out

    def describe(self) -> list[Any]:
        # Nothing to declare up front: the families depend on what the segment holds
        # at scrape time, and collecting at registration would attach too early.
        return []

    def collect(self) -> Iterator[Any]:
        """Yield prometheus_client metric families (called at each scrape)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for fam in families(self.snapshots()):
            keys = sorted({k for labels, _ in fam.samples for k in labels})
            cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
            m = cls(fam.name, fam.help, labels=keys)
            for labels, value in fam.samples:
                m.add_metric([labels.get(k, "") for k in keys], value)
            yield m


def register_collector(*segments: Segment | str, registry: Any = None) -> SegmentCollector:
    """Create a :class:`SegmentCollector` and register it (default: the global
    ``prometheus_client.REGISTRY``)."""
    if registry is None:
        from prometheus_client import REGISTRY
        registry = REGISTRY
    col = SegmentCollector(*segments)
    registry.register(col)
    return col


def instrument_meter(meter: Any, *segments: Segment | str | SegmentSource,
                     max_age: float = 1.0) -> list[Any]:
    """Create OpenTelemetry observable instruments on ``meter`` (``opentelemetry.metrics
    .get_meter(...)``) for every family present now; returns them.

    One snapshot serves every callback of one collection (it is reused for
    ``max_age`` seconds).  Families that appear only later (a new statistic of a later
    release) need a new call.
    """
    from opentelemetry.metrics import Observation

    col = SegmentCollector(*segments)
    cache: dict[str, Any] = {"at": 0.0, "fams": {}}
    lock = threading.Lock()

    def current() -> dict[str, Family]:
        with lock:
            if time.monotonic() - cache["at"] > max_age:
                cache["fams"] = {f.name: f for f in families(col.snapshots())}
                cache["at"] = time.monotonic()
            fams: dict[str, Family] = cache["fams"]
            return fams

    def callback_for(name: str) -> Callable[[Any], Iterable[Any]]:
        def cb(_options: Any) -> Iterable[Any]:
            fam = current().get(name)
            return [] if fam is None else [Observation(v, dict(lab)) for lab, v in fam.samples]
        return cb

    out = []
    for fam in current().values():
        make = meter.create_observable_counter if fam.kind == "counter" \
            else meter.create_observable_gauge
        out.append(make(fam.name, callbacks=[callback_for(fam.name)], description=fam.help))
    return out
