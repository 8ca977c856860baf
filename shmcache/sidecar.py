"""The sidecar: one per host, it connects the shared segment to the levels below.

It drains the segment's write journal in batches and writes behind to Redis (one
pipeline per batch) and to disk (one transaction), publishes this host's deletes and
replacements on the invalidation channel, applies the other hosts' invalidations to
this host's segment, sweeps expired entries, reaps dead processes' slots, and reports
its figures in the segment (``__shmcache__:sidecar``) where ``get_statistics()``, the
CLI and the metrics exporter read them.

One per segment: the active sidecar holds an exclusive ``flock`` on
``$TMPDIR/shmcache-<uid>/<segment>.sidecar.lock``; any other stands by and takes over
when the lock is released -- which the kernel does when the holder exits, however it
dies.  Workers never wait for it: if it is gone they keep serving from L1 and the
journal stays bounded (the oldest records are dropped and counted).

A write-back reads the value from the segment *now* (the journal carries only key,
version and time), so what reaches Redis is never older than what the segment holds;
stamps and tombstones in Redis (tiers.py) keep late write-backs from other hosts from
resurrecting deleted or replaced values.  When a level is down the batch stays pending
(per level, bounded by ``pending_max`` keys, coalesced by key) and is retried with the
level's backoff, so the level catches up by itself once it is back.

Run it as ``python -m shmcache.sidecar`` / ``shmcache sidecar`` (options below, the
rest from ``SHMCACHE_*``), from the gunicorn master hook, or ``cache.start_sidecar()``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import tempfile
import threading
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from .errors import ShmCacheError
from .levels import (
    F_NO_L2,
    F_NO_L3,
    INVALIDATION_SEQ_KEY,
    decode_invalidation,
    encode_invalidation,
    is_local_key,
    now_us,
)
from .segment import JournalRecord, Segment
from .tiers import TierWrite, ensure_private_dir

if TYPE_CHECKING:
    from .cache import Cache

__all__ = ["Sidecar", "read_report", "main", "REPORT_KEY"]

_log = logging.getLogger("shmcache.sidecar")

REPORT_KEY: Final = "__shmcache__:sidecar"
_CHUNK: Final = 1000  # keys per pipeline


def read_report(segment: Segment) -> dict[str, float]:
    """The figures the host's sidecar last wrote into the segment ({} if none)."""
    try:
        raw = segment.get(REPORT_KEY)
    except ShmCacheError:
        return {}
    if not isinstance(raw, bytes):
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out = {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}
    if "heartbeat" in out:
        out["age_s"] = max(0.0, time.time() - out["heartbeat"])
    return out


def _lock_file(segment_name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"shmcache-{os.getuid()}",
                        segment_name.lstrip("/") + ".sidecar.lock")


def lock_path(segment_name: str) -> str:
    """The per-segment leadership lock file (in an owner-only directory)."""
    path = _lock_file(segment_name)
    ensure_private_dir(os.path.dirname(path))
    return path


def remove_lock(segment_name: str) -> None:
    """Remove the segment's lock file when no sidecar holds it (when the segment is
    unlinked for good; a held lock is left alone)."""
    path = _lock_file(segment_name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


_live: weakref.WeakSet[Sidecar] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares the parent's lock (same open file description) but has no
    # sidecar thread: close its copy so the lock goes away with the parent.
    for sc in list(_live):
        sc._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Sidecar:
    """The sidecar of one :class:`~shmcache.cache.Cache`'s segment (see the module)."""

    def __init__(self, cache: Cache, *, interval: float = 0.01,
                 batch_bytes: int = 1 << 20, maintenance_interval: float = 1.0,
                 standby_interval: float = 0.5, pending_max: int = 100_000) -> None:
        if cache._lower is None:
            raise ShmCacheError("this cache has no lower levels (REDIS/DISK) to serve")
        self.cache = cache
        self.segment = cache.segment
        self.lower = cache._lower
        self.host = cache.host_id
        self.interval = interval
        self.batch_bytes = batch_bytes
        self.maintenance_interval = maintenance_interval
        self.standby_interval = standby_interval
        self.pending_max = pending_max
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sub: threading.Thread | None = None
        self._lock_fd = -1
        self.is_leader = False
        # Per level: key -> its newest record not yet written there.
        self._pending: dict[str, OrderedDict[bytes, JournalRecord]] = {}
        if self.lower.redis is not None:
            self._pending["REDIS"] = OrderedDict()
        if self.lower.disk is not None:
            self._pending["DISK"] = OrderedDict()
        self._clear_pending: set[str] = set()
        self._figures: dict[str, float] = {
            "drained": 0, "written_redis": 0, "written_disk": 0, "published": 0,
            "received": 0, "applied": 0, "pending_dropped": 0, "lag_ms": 0.0,
            "max_lag_ms": 0.0, "swept": 0, "reaped": 0, "batches": 0, "resyncs": 0,
            "errors": 0, "seal_errors": 0}
        self._last_maint = 0.0
        self._last_error_log = -1e9
        self._resync_wanted = threading.Event()
        self._dropped_seen = 0
        self._had_predecessor = False
        _live.add(self)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Sidecar:
        """Run in a daemon thread of this process (returns self, the handle)."""
        if self._thread is not None:
            raise ShmCacheError("this sidecar is already running")
        self._thread = threading.Thread(target=self._main, name="shmcache-sidecar",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop (flushing what it can first) and give up leadership.  False if the
        thread is still running after ``timeout`` (the segment must then stay open)."""
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
        s, self._sub = self._sub, None
        if s is not None:
            s.join(timeout)
        self._release()
        return not ((t is not None and t.is_alive()) or (s is not None and s.is_alive()))

    def run(self) -> None:
        """Run in the calling thread until :meth:`stop` (from another thread or a
        signal handler)."""
        self._main()

    def wait_leader(self, timeout: float) -> bool:
        """Block until this sidecar is the active one (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not self.is_leader and time.monotonic() < deadline:
            if self._stop.wait(0.01):
                break
        return self.is_leader

    def stats(self) -> dict[str, float]:
        """Figures of this sidecar (also written into the segment while active)."""
        out = dict(self._figures)
        out["leader"] = float(self.is_leader)
        out["pending"] = float(max((len(p) for p in self._pending.values()), default=0))
        return out

    def _forked(self) -> None:
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
        self._lock_fd = -1
        self.is_leader = False
        self._thread = self._sub = None
        self._stop = threading.Event()

    def _try_lead(self) -> bool:
        if self._lock_fd < 0:
            self._lock_fd = os.open(lock_path(self.segment.name),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.is_leader = True
        return True

    def _release(self) -> None:
        self.is_leader = False
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    # -- the loop --------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.is_leader:
                    if not self._try_lead():
                        self._stop.wait(self.standby_interval)
                        continue
                    _log.info("shmcache: sidecar of %s active (pid %d)", self.segment.name,
                              os.getpid())
                    prev = read_report(self.segment)
                    self._had_predecessor = bool(prev) and (
                        prev.get("pid") != os.getpid() or not prev.get("leader"))
                    if self.lower.redis is not None:
                        self._sub = threading.Thread(target=self._subscribe,
                                                     name="shmcache-sidecar-sub",
                                                     daemon=True)
                        self._sub.start()
                try:
                    busy = self._step()
                except Exception:  # noqa: BLE001 - never take the host's process down
                    # Keep the lead and go on after a pause: a sidecar that stopped
                    # while holding the lock would leave the host without one.
                    self._figures["errors"] += 1
                    now = time.monotonic()
                    if now - self._last_error_log >= 60:
                        self._last_error_log = now
                        _log.exception("shmcache: sidecar of %s: a round failed; "
                                       "retrying", self.segment.name)
                    self._stop.wait(1.0)
                    continue
                if not busy:
                    self._stop.wait(self.interval)
            if self.is_leader:
                self._step()  # what was written before stop() still goes out
                self._report()
        except Exception:  # noqa: BLE001 - never take the host's process down
            _log.exception("shmcache: sidecar of %s stopped on an error", self.segment.name)
            self._stop.set()

    def _step(self) -> bool:
        """One round: drain, write behind, maintenance.  True if it found work."""
        recs = self.segment.journal_drain(self.batch_bytes)
        if recs:
            self._figures["drained"] += len(recs)
            self._figures["batches"] += 1
            self._merge(recs)
        if self._resync_wanted.is_set():
            self._resync_wanted.clear()
            self._resync()
        pending = any(self._pending.values()) or bool(self._clear_pending)
        try:
            if pending:
                self._flush()
        finally:  # sweeps, reaping and the heartbeat go on even if a flush fails
            now = time.monotonic()
            if now - self._last_maint >= self.maintenance_interval:
                self._last_maint = now
                self._maintenance()
        return bool(recs)

    def _merge(self, recs: list[JournalRecord]) -> None:
        for r in recs:
            if r.op == "clear":
                for name, p in self._pending.items():
                    p.clear()
                    self._clear_pending.add(name)
                continue
            if is_local_key(r.key):
                continue
            for p in self._pending.values():
                old = p.pop(r.key, None)
                if old is not None and old.op != "touch" and r.op == "touch":
                    r = JournalRecord(old.op, r.key, r.version, r.expires_at, r.at_us)
                p[r.key] = r
                if len(p) > self.pending_max:
                    p.popitem(last=False)
                    self._figures["pending_dropped"] += 1

    def _flush(self) -> None:
        lower = self.lower
        if self._clear_pending:
            if "REDIS" in self._clear_pending and lower.redis is not None and \
                    lower.redis.clear() and lower.redis.write(
                        [], encode_invalidation(lower.redis.sealer, self.host, [],
                                                clear=True)):
                self._clear_pending.discard("REDIS")
                self._figures["published"] += 1
            if "DISK" in self._clear_pending and lower.disk is not None and \
                    lower.disk.clear():
                self._clear_pending.discard("DISK")
        now = now_us()
        for name, pending in self._pending.items():
            if not pending or name in self._clear_pending:
                continue
            tier = lower.redis if name == "REDIS" else lower.disk
            assert tier is not None
            if not tier.breaker.allow():
                continue  # backing off: retried when the level may be back
            skip = F_NO_L2 if name == "REDIS" else F_NO_L3
            items = list(pending.items())
            for i in range(0, len(items), _CHUNK):
                chunk = items[i:i + _CHUNK]
                horizon = (lower.redis.tombstone_ttl_ms * 1000
                           if name == "REDIS" and lower.redis is not None else 0)
                writes, drops = self._writes(tier.sealer, chunk, skip, horizon)
                if name == "REDIS":
                    assert lower.redis is not None
                    msg = (encode_invalidation(lower.redis.sealer, self.host, drops)
                           if drops else None)
                    ok = lower.redis.write(writes, msg)
                    if ok and msg is not None:
                        self._figures["published"] += 1
                else:
                    assert lower.disk is not None
                    ok = lower.disk.write(writes)
                if not ok:
                    break  # the level is down: keep the rest, retry after its backoff
                self._figures["written_" + name.lower()] += len(writes)
                for k, r in chunk:
                    if pending.get(k) is r:
                        del pending[k]
                lag = max((now - r.at_us) / 1000.0 for _, r in chunk)
                self._figures["lag_ms"] = lag
                self._figures["max_lag_ms"] = max(self._figures["max_lag_ms"], lag)

    def _writes(self, sealer: Any, chunk: Sequence[tuple[bytes, JournalRecord]],
                skip: int, horizon_us: int = 0) -> tuple[list[TierWrite], list[bytes]]:
        """The write-backs of ``chunk``.  ``horizon_us``: a set older than this (a long
        outage) goes down as a tombstone instead -- deletes made meanwhile by other
        hosts may have left no tombstone to refuse it against any more."""
        writes: list[TierWrite] = []
        drops: list[bytes] = []
        now = now_us()
        for key, r in chunk:
            got = None if r.op == "delete" else self.segment.get_with_info(key)
            if got is not None and horizon_us and now - r.at_us > horizon_us:
                got = None
            if got is not None and not got[1].flags & skip:
                try:
                    sealed = self._sealed(sealer, key, got[0], got[1], r)
                except ShmCacheError as e:  # e.g. a pickle for an unsigned Redis
                    self._figures["seal_errors"] += 1
                    _log.warning("shmcache: cannot write %r below (%s); removing it "
                                 "there instead", key[:200], e)
                    got = None
                else:
                    if sealed is not None:
                        writes.append(sealed)
                        if r.op != "touch":
                            drops.append(key)
                    continue
            if got is None:  # deleted, or gone since (evicted, expired): remove below
                writes.append(TierWrite(key, sealer.seal(key, b"", flags=0, stamp=r.at_us,
                                                         tombstone=True), 0, delete=True))
                drops.append(key)
        return writes, drops

    @staticmethod
    def _sealed(sealer: Any, key: bytes, body: bytes, info: Any,
                r: JournalRecord) -> TierWrite | None:
        ttl_ms = 0
        if info.expires_at is not None:
            ttl_ms = int((info.expires_at - time.time()) * 1000)
            if ttl_ms <= 0:
                return None
        return TierWrite(key, sealer.seal(key, body, flags=info.flags, stamp=r.at_us,
                                          expires_at=info.expires_at), ttl_ms)

    def _maintenance(self) -> None:
        # Records the journal dropped (it overflowed) may have been deletes: this host
        # cannot tell which keys, so its shared L1 entries are re-read from below.
        with contextlib.suppress(ShmCacheError):
            dropped = self.segment.stats().journal_dropped
            if dropped > self._dropped_seen and self.lower.redis is not None:
                self._resync_wanted.set()
            self._dropped_seen = dropped
        with contextlib.suppress(ShmCacheError):
            self._figures["swept"] += self.segment.sweep_expired(10_000)
        with contextlib.suppress(ShmCacheError):
            self._figures["reaped"] += self.segment.reap()
        self._report()

    def _report(self) -> None:
        st = self.stats()
        seg = self.segment.stats()
        st.update(pid=float(os.getpid()), heartbeat=time.time(),
                  journal_records=float(seg.journal_records),
                  journal_dropped=float(seg.journal_dropped))
        with contextlib.suppress(ShmCacheError):
            self.segment.set(REPORT_KEY, json.dumps(st).encode(), journal=False)

    # -- other hosts' invalidations ----------------------------------------------------

    def _subscribe(self) -> None:
        redis_tier = self.lower.redis
        assert redis_tier is not None
        backoff = 0.1
        # A sidecar that takes over from another (or starts on a segment kept from a
        # previous run: a report is there) cannot know what was published while none
        # listened, so it resyncs on its first subscription too.
        subscribed_before = self._had_predecessor
        # Pub/sub reaches only connected subscribers: whatever other hosts published
        # while this one was disconnected is lost.  So after every reconnect (ours, or
        # redis-py's own inside get_message) this host forgets its shared L1 entries
        # (resync): they are re-read from L2 on demand.  Correct, at the price of a
        # colder L1 after a network blip.
        connects = [0]
        while not self._stop.is_set() and self.is_leader:
            client: Any = None
            try:
                client = redis_tier.new_client(pubsub=True)
                ps = client.pubsub(ignore_subscribe_messages=True)
                on_connect = getattr(ps, "on_connect", None)
                if on_connect is not None:
                    # redis-py keeps a WeakMethod of it: a bound method, and `counted`
                    # stays referenced by this frame for as long as ps lives.
                    def counted(ps_: Any, conn: Any, _orig: Any = on_connect) -> Any:
                        connects[0] += 1
                        return _orig(conn)
                    ps.on_connect = types.MethodType(counted, ps)
                if redis_tier.cluster:
                    ps.ssubscribe(redis_tier.channel)
                    get = ps.get_sharded_message
                else:
                    ps.subscribe(redis_tier.channel)
                    get = ps.get_message
                if subscribed_before:
                    self._resync_wanted.set()
                subscribed_before = True
                seen = connects[0]
                backoff = 0.1
                while not self._stop.is_set():
                    msg = get(timeout=0.2)
                    if connects[0] != seen and seen:
                        self._resync_wanted.set()  # redis-py reconnected by itself
                    seen = connects[0]
                    if msg and msg.get("type") in ("message", "smessage"):
                        self._apply(msg["data"])
            except Exception as e:  # noqa: BLE001 - reconnect with backoff
                _log.debug("shmcache: invalidation subscriber: %s: %s", type(e).__name__, e)
                self._stop.wait(backoff)
                backoff = min(5.0, backoff * 2)
            finally:
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()

    def _resync(self) -> None:
        """Forget the shared L1 entries that may have missed an invalidation -- but
        not this host's own writes that have not reached the lower levels yet: the
        journal is drained first, so those are all pending here.  (A write landing
        between that drain and its key's delete is dropped with it: a later miss,
        never a stale value.)"""
        n = 0
        while True:
            recs = self.segment.journal_drain(self.batch_bytes)
            if not recs:
                break
            self._figures["drained"] += len(recs)
            self._merge(recs)
        pending = set().union(*self._pending.values()) if self._pending else set()
        try:
            for k in list(self.segment.keys()):
                if is_local_key(k) or k in pending:
                    continue
                info = self.segment.info(k)
                if info is None:
                    continue
                with contextlib.suppress(ShmCacheError):  # changed meanwhile: keep it
                    if self.segment.delete(k, expect_version=info.version, journal=False):
                        n += 1
        except ShmCacheError as e:
            _log.warning("shmcache: resync of %s failed: %s", self.segment.name, e)
        self._figures["resyncs"] += 1
        _log.warning("shmcache: invalidation channel of %s reconnected: dropped %d shared "
                     "L1 entries that may have missed invalidations", self.segment.name, n)

    def _apply(self, data: Any) -> None:
        self._figures["received"] += 1
        assert self.lower.redis is not None
        msg = decode_invalidation(self.lower.redis.sealer,
                                  data if isinstance(data, bytes) else b"")
        if msg is None:
            return
        host, clear, keys = msg
        if host == self.host:
            return
        keys = [k for k in keys if not is_local_key(k)]
        try:
            # Before the deletes: a promotion from L2 racing this invalidation sees the
            # sequence move and drops what it added (Cache._promote).
            self.segment.incr(INVALIDATION_SEQ_KEY, 1, initial=0)
            if clear:
                self.segment.clear(journal=False)
            for k in keys:
                if self.segment.delete(k, journal=False):
                    self._figures["applied"] += 1
        except ShmCacheError as e:
            _log.warning("shmcache: could not apply an invalidation: %s", e)
        # This host's L3 holds copies as old as its L1's: they go too (or it would
        # serve them once Redis forgets the key).
        disk = self.lower.disk
        if disk is not None:
            if clear:
                disk.clear()
            elif keys:
                disk.write([TierWrite(k, b"", 0, delete=True) for k in keys])


# -- command line ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shmcache.sidecar``: run the host's sidecar in the foreground."""
    from .cache import Cache
    from .config import CacheConfig, CacheLevel

    ap = argparse.ArgumentParser(
        prog="shmcache sidecar",
        description="Drain the segment's journal to Redis/disk, apply other hosts' "
                    "invalidations, sweep and reap.  Other settings: SHMCACHE_* "
                    "environment variables (the secret: SHMCACHE_SECRET).")
    ap.add_argument("--name", help="segment name (default: SHMCACHE_NAME or the app's)")
    ap.add_argument("--size-mb", type=int, help="segment size if it has to be created")
    ap.add_argument("--levels", help="comma list, e.g. c_memory,redis,disk")
    ap.add_argument("--redis-url", help="redis://host:port/db (prefer SHMCACHE_REDIS_URL "
                    "when it carries a password)")
    ap.add_argument("--redis-cluster-nodes", help="host:port,host:port")
    ap.add_argument("--disk-path")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    over: dict[str, Any] = {"sidecar": "off", "write_mode": "behind"}
    if a.name:
        over["name"] = a.name
    if a.size_mb:
        over["c_memory_size_mb"] = a.size_mb
    if a.levels:
        over["levels"] = tuple(CacheLevel(x.strip().lower()) for x in a.levels.split(",")
                               if x.strip())
    if a.redis_url:
        over["redis_url"] = a.redis_url
    if a.redis_cluster_nodes:
        over["redis_cluster_nodes"] = tuple(a.redis_cluster_nodes.split(","))
    if a.disk_path:
        over["disk_path"] = a.disk_path
    try:
        cfg = CacheConfig.from_env(**over)
        cache = Cache(cfg)
    except (ShmCacheError, ValueError) as e:
        print(f"shmcache sidecar: {e}")
        return 2
    sc = Sidecar(cache)

    def on_signal(signum: int, frame: Any) -> None:
        sc._stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _log.info("shmcache sidecar for %s (levels %s)", cache.segment.name,
              ",".join(lv.name for lv in cfg.levels))
    try:
        sc.run()
    finally:
        sc.stop()
        cache.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
