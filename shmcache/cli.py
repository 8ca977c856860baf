"""The ``shmcache`` command: inspect and operate the segments of this host.

Every subcommand attaches a segment by name (``-n NAME``, else ``$SHMCACHE_NAME``, else
the default name for ``$SHMCACHE_APP``, else the only segment of this user on the
host), so it works while the application runs and when it does not; it takes a process
slot only for its own lifetime.

======================  =============================================================
``list``                the shmcache segments on this host
``stats``               statistics as a table (``--json``; ``--watch`` refreshes)
``keys [PATTERN]``      keys matching a glob (``--limit``; ``--all`` shows internal keys)
``get KEY``             a value, decoded like ``Cache.get`` (``--raw`` bytes, ``--info``)
``delete KEY``          remove one key
``invalidate``          ``--tag``, ``--namespace``, ``--event``: like the Cache methods
``verify``              integrity check of the whole segment; exit 1 on damage
``clear``               remove every entry (asks, unless ``--yes``)
``warm FILE``           load keys from a JSON spec or a module:function list
``metrics``             Prometheus text of the segment, once
``dashboard``           serve the live dashboard page (and ``/metrics``)
``bench``               run the repository's benchmark suite (benchmarks/run.py)
``demo``, ``sidecar``   run shmcache.demo / shmcache.sidecar
======================  =============================================================

Exit status: 0 success; 1 the check failed or the thing asked for is not there (damage
found by ``verify``, a missing key for ``get``/``delete``, a failed loader in
``warm``); 2 usage errors, a segment that cannot be found or attached, a missing
optional component.

Example::

    $ shmcache stats -n myapp-cache --watch 1
    $ shmcache keys 'user:*' --limit 20
    $ shmcache verify && echo sound
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import pprint
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from . import errors
from .logs import CLI, configure, get_logger
from .segment import Segment

__all__ = ["main", "find_segments", "SegmentEntry"]

_log = get_logger(CLI)

#: The first 8 bytes of every shmcache segment (native/internal.h SEG_MAGIC, "SMHCACH1"
#: little-endian).  Read from the file so ``list`` can tell our objects from others'
#: without attaching each one.
_MAGIC: Final = (0x3148434143484D53).to_bytes(8, "little")
_SHM_DIR: Final = "/dev/shm"
_INTERNAL_PREFIX: Final = b"__shmcache__:"
_PASSTHROUGH: Final = ("sidecar", "demo", "bench")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class CliError(Exception):
    """A message for stderr and an exit status (2 unless said otherwise)."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


# -- finding segments -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SegmentEntry:
    """A shmcache segment found in /dev/shm."""

    name: str
    size: int
    uid: int
    mode: int
    mtime: float


def find_segments(directory: str = _SHM_DIR) -> list[SegmentEntry]:
    """The shmcache segments this user can open on the host, by name.

    >>> isinstance(find_segments(), list)
    True
    """
    out = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for e in entries:
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
            with open(e.path, "rb") as f:
                head = f.read(8)
        except OSError:  # another user's object, or gone meanwhile
            continue
        if head == _MAGIC:
            out.append(SegmentEntry(e.name, st.st_size, st.st_uid, st.st_mode & 0o777,
                                    st.st_mtime))
    return sorted(out, key=lambda s: s.name)


def _resolve_name(name: str | None) -> str:
    if name:
        return name
    env = os.environ.get("SHMCACHE_NAME")
    if env:
        return env
    if os.environ.get("SHMCACHE_APP"):
        from .config import default_segment_name
        return default_segment_name()
    found = find_segments()
    if len(found) == 1:
        return found[0].name
    if not found:
        raise CliError("no shmcache segment on this host; name one with -n NAME")
    raise CliError("several shmcache segments on this host; pick one with -n NAME: "
                   + ", ".join(s.name for s in found))


@contextmanager
def _attached(name: str | None) -> Iterator[Segment]:
    nm = _resolve_name(name)
    try:
        seg = Segment.attach(nm, wait=2.0)
    except errors.SegmentNotFoundError:
        raise CliError(f"no segment named {nm!r} (`shmcache list` shows this host's "
                       f"segments)") from None
    except errors.SegmentCorruptError as e:
        raise CliError(f"segment {nm!r} is damaged and cannot be attached: {e}",
                       EXIT_FAILED) from None
    except errors.ShmCacheError as e:
        raise CliError(f"cannot attach segment {nm!r}: {type(e).__name__}: {e}") from None
    try:
        yield seg
    finally:
        seg.close()


def _cache_for(seg: Segment) -> Any:
    """A Cache over ``seg`` configured from ``SHMCACHE_*`` (serializer, TTLs), so it
    reads and writes entries the way the application does."""
    from .cache import Cache
    from .config import CacheConfig
    try:
        cfg = CacheConfig.from_env(name=seg.name)
    except (ValueError, TypeError) as e:
        raise CliError(f"bad SHMCACHE_* environment: {e}") from None
    return Cache(cfg, segment=seg)


# -- formatting -----------------------------------------------------------------------------

def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _n(v: float) -> str:
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.3f}"


def _pct(v: float) -> str:
    return f"{100.0 * v:.1f}%"


def _table(rows: Sequence[Sequence[str]], out: TextIO, indent: str = "  ") -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                 enumerate(zip(r, widths, strict=True))]
        out.write(indent + "  ".join(cells).rstrip() + "\n")


_SHOWN_STATS: Final = frozenset({
    "size_bytes", "data_bytes", "used_bytes", "free_bytes", "payload_bytes", "entries",
    "max_entries", "policy", "generation", "fragmentation", "hit_ratio", "evictions",
    "expirations", "journal_bytes", "journal_used", "journal_records", "journal_dropped",
    "live_slots", "max_slots"})
_OPS: Final = ("hits", "misses", "sets", "deletes", "touches", "incrs")


def _ops_total(counters: dict[str, Any]) -> float:
    return float(sum(counters.get(k, 0) for k in _OPS))


def render_stats(snap: dict[str, Any], out: TextIO, *, rate: float | None = None) -> None:
    """Write the human-readable statistics table of a :func:`metrics.snapshot`."""
    st, c = snap["stats"], snap["counters"]
    w = out.write
    w(f"segment {snap['segment']}   policy {st.get('policy')}   size "
      f"{_bytes(st.get('size_bytes', 0))}   generation {st.get('generation')}\n")
    data = st.get("data_bytes") or 1
    w(f"memory    used {_bytes(st.get('used_bytes', 0))} of {_bytes(data)} "
      f"({_pct(st.get('used_bytes', 0) / data)})   free {_bytes(st.get('free_bytes', 0))}"
      f"   payload {_bytes(st.get('payload_bytes', 0))}   fragmentation "
      f"{_pct(st.get('fragmentation', 0.0))}\n")
    maxe = st.get("max_entries") or 0
    w(f"entries   {_n(st.get('entries', 0))}" + (f" of {_n(maxe)}" if maxe else "") + "\n")
    w("ops       " + "   ".join(f"{k} {_n(c.get(k, 0))}" for k in _OPS)
      + f"   hit ratio {_pct(st.get('hit_ratio', 0.0))}"
      + (f"   {rate:,.0f} ops/s" if rate is not None else "") + "\n")
    ev = [f"{k[len('evicted_'):]} {_n(v)}" for k, v in c.items() if k.startswith("evicted_")]
    w(f"removed   {'   '.join(ev)}\n")
    other = [f"{k} {_n(v)}" for k, v in c.items()
             if not k.startswith("evicted_") and k not in _OPS]
    if other:
        w(f"engine    {'   '.join(other)}\n")
    if st.get("journal_bytes"):
        w(f"journal   {_n(st.get('journal_records', 0))} records waiting   "
          f"{_bytes(st.get('journal_used', 0))} of {_bytes(st['journal_bytes'])}   "
          f"{_n(st.get('journal_dropped', 0))} dropped\n")
    else:
        w("journal   off\n")
    # Statistics added after this table was written (the sidecar's lag, ...).
    extra = [f"{k} {v if isinstance(v, str) else _n(v)}" for k, v in st.items()
             if k not in _SHOWN_STATS and not k.startswith(("index_", "page", "nstripes",
                                                            "max_key", "max_value"))]
    if extra:
        w(f"other     {'   '.join(extra)}\n")

    sc = snap.get("sidecar") or {}
    if sc:
        w(f"sidecar   pid {int(sc.get('pid', 0))}   last report {sc.get('age_s', 0):.1f} s ago"
          f"   lag {sc.get('lag_ms', 0):.1f} ms   pending {_n(sc.get('pending', 0))}   "
          f"drained {_n(sc.get('drained', 0))}   published {_n(sc.get('published', 0))}   "
          f"applied {_n(sc.get('applied', 0))}   resyncs {_n(sc.get('resyncs', 0))}   "
          f"errors {_n(sc.get('errors', 0))}\n")
    elif st.get("journal_bytes"):
        w("sidecar   none has reported (the journal is not being drained)\n")

    slots = snap["slots"]
    w(f"\nprocesses ({st.get('live_slots', len(slots))} live of {st.get('max_slots')} "
      f"slots)\n")
    rows = [["slot", "pid", "state", "hits", "misses", "sets", "deletes", "pins", "attached"]]
    for s in slots:
        sc = s.get("counters", {})
        me = " (this command)" if s.get("slot") == snap.get("self_slot") else ""
        rows.append([str(s.get("slot")), str(s.get("pid")), str(s.get("state")) + me,
                     _n(sc.get("hits", 0)), _n(sc.get("misses", 0)), _n(sc.get("sets", 0)),
                     _n(sc.get("deletes", 0)), _n(s.get("pins", 0)),
                     time.strftime("%H:%M:%S", time.localtime(s.get("attached_at", 0)))])
    _table(rows, out)

    classes = [k for k in snap["classes"] if k.get("pages") or k.get("entries")]
    if classes:
        w("\nmemory by size class\n")
        rows = [["chunk", "pages", "entries", "used", "free", "payload", "evictions"]]
        for k in classes:
            rows.append([_bytes(k["chunk_bytes"]) if k.get("chunk_bytes") else "large",
                         _n(k.get("pages", 0)), _n(k.get("entries", 0)),
                         _bytes(k.get("used_bytes", 0)), _bytes(k.get("free_bytes", 0)),
                         _bytes(k.get("payload_bytes", 0)), _n(k.get("evictions", 0))])
        _table(rows, out)

    cache = snap["cache"]
    if cache["processes"] or cache["retired_processes"]:
        cc = cache["counters"]
        w(f"\npython level ({len(cache['processes'])} publishing, "
          f"{cache['retired_processes']} exited)\n")
        w("  " + "   ".join(f"{k} {_n(v)}" for k, v in sorted(cc.items())) + "\n")
        for lv, figs in sorted(cache["groups"].get("levels", {}).items()):
            h, m = figs.get("hits", 0), figs.get("misses", 0)
            w(f"  level {lv}: hits {_n(h)}   misses {_n(m)}   hit ratio "
              f"{_pct(h / (h + m) if h + m else 0.0)}\n")
        funcs = cache["groups"].get("functions", {})
        if funcs:
            rows = [["function", "hits", "misses", "hit%", "computes", "avg ms", "waits",
                     "stale", "errors"]]
            for nm, f in sorted(funcs.items(), key=lambda kv: -kv[1].get("hits", 0)):
                h, m, n = f.get("hits", 0), f.get("misses", 0), f.get("computes", 0)
                rows.append([nm, _n(h), _n(m), _pct(h / (h + m) if h + m else 0.0), _n(n),
                             f"{1000.0 * f.get('compute_seconds', 0) / n:.2f}" if n else "-",
                             _n(f.get("waits", 0)), _n(f.get("stale_serves", 0)),
                             _n(f.get("errors", 0))])
            w("\n")
            _table(rows, out)


# -- subcommands ----------------------------------------------------------------------------

def _cmd_list(a: argparse.Namespace) -> int:
    found = find_segments()
    rows: list[dict[str, Any]] = []
    for s in found:
        row: dict[str, Any] = {"name": s.name, "size_bytes": s.size, "mode": oct(s.mode),
                               "modified": s.mtime}
        try:
            with Segment.attach(s.name, wait=0.5) as seg:
                st = seg.stats()
                # Our own slot is not a user of the segment.
                row.update(entries=st.entries, live_processes=st.live_slots - 1,
                           hit_ratio=st.hit_ratio, status="ok")
        except errors.ShmCacheError as e:
            row["status"] = type(e).__name__
        rows.append(row)
    if a.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no shmcache segments on this host", file=sys.stderr)
        return EXIT_OK
    table = [["name", "size", "entries", "processes", "hit ratio", "status"]]
    for r in rows:
        table.append([r["name"], _bytes(r["size_bytes"]), _n(r.get("entries", 0)),
                      _n(r.get("live_processes", 0)), _pct(r.get("hit_ratio", 0.0)),
                      r["status"]])
    _table(table, sys.stdout, indent="")
    return EXIT_OK


def _cmd_stats(a: argparse.Namespace) -> int:
    from .metrics import snapshot
    with _attached(a.name) as seg:
        if a.watch is None:
            snap = snapshot(seg)
            if a.json:
                print(json.dumps(snap, indent=2, sort_keys=True))
            else:
                render_stats(snap, sys.stdout)
            return EXIT_OK
        tty = sys.stdout.isatty()
        prev: tuple[float, float] | None = None
        n = 0
        try:
            while True:
                snap = snapshot(seg)
                now, ops = time.monotonic(), _ops_total(snap["counters"])
                rate = (ops - prev[1]) / (now - prev[0]) if prev and now > prev[0] else None
                prev = (now, ops)
                if a.json:
                    print(json.dumps(snap, sort_keys=True), flush=True)
                else:
                    if tty:
                        sys.stdout.write("\x1b[H\x1b[2J")  # clear the screen
                    elif n:
                        sys.stdout.write("\n" + "-" * 78 + "\n")
                    sys.stdout.write(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
                    render_stats(snap, sys.stdout, rate=rate)
                    sys.stdout.flush()
                n += 1
                if a.count and n >= a.count:
                    return EXIT_OK
                time.sleep(a.watch)
        except KeyboardInterrupt:
            return EXIT_OK


def _show_key(k: bytes) -> str:
    try:
        return k.decode("utf-8")
    except UnicodeDecodeError:
        return repr(k)


def _cmd_keys(a: argparse.Namespace) -> int:
    shown = 0
    more = False
    with _attached(a.name) as seg:
        for k in seg.keys():  # noqa: SIM118 - a Segment is not iterable; keys() pages
            if not a.all and k.startswith(_INTERNAL_PREFIX):
                continue
            text = _show_key(k)
            if a.pattern is not None and not fnmatch.fnmatchcase(text, a.pattern):
                continue
            if a.limit and shown >= a.limit:
                more = True
                break
            print(text)
            shown += 1
    if more:
        print(f"(more keys match; showing the first {a.limit}: raise --limit, or "
              f"--limit 0 for all)", file=sys.stderr)
    return EXIT_OK


def _cmd_get(a: argparse.Namespace) -> int:
    from .cache import MISSING
    with _attached(a.name) as seg:
        if a.info or a.raw:
            if a.namespace:
                raise CliError("--raw and --info read the exact segment key; "
                               "drop --namespace")
            got = seg.get_with_info(a.key)
            if got is None:
                print(f"{a.key}: not found", file=sys.stderr)
                return EXIT_FAILED
            raw, info = got
            if a.raw:
                sys.stdout.buffer.write(raw)
                sys.stdout.flush()
                return EXIT_OK
            ttl = f"{info.expires_at - seg.now():.1f} s" if info.expires_at else "none"
            print(f"key        {a.key}\nversion    {info.version}\nlength     "
                  f"{info.value_len} bytes\nflags      {info.flags:#06x}\nttl left   {ttl}")
            return EXIT_OK
        cache = _cache_for(seg)
        try:
            value = cache.get(a.key, MISSING, namespace=a.namespace)
        finally:
            cache.close()
    if value is MISSING:
        print(f"{a.key}: not found (or expired, invalidated, or not decodable here)",
              file=sys.stderr)
        return EXIT_FAILED
    if a.json:
        print(json.dumps(value, default=repr, indent=2))
    elif isinstance(value, str):
        print(value)
    elif isinstance(value, bytes):
        print(_show_key(value))
    else:
        print(pprint.pformat(value))
    return EXIT_OK


def _cmd_delete(a: argparse.Namespace) -> int:
    with _attached(a.name) as seg:
        cache = _cache_for(seg)
        try:
            gone = cache.delete(a.key, namespace=a.namespace)
        finally:
            cache.close()
    if not gone:
        print(f"{a.key}: not found", file=sys.stderr)
        return EXIT_FAILED
    print(f"deleted {a.key}")
    return EXIT_OK


def _cmd_invalidate(a: argparse.Namespace) -> int:
    if not (a.tag or a.namespace or a.event):
        raise CliError("invalidate needs at least one --tag, --namespace or --event")
    with _attached(a.name) as seg:
        cache = _cache_for(seg)
        try:
            if a.tag:
                cache.invalidate_tags(*a.tag)
            for ns in a.namespace or ():
                cache.invalidate_namespace(ns)
            if a.event:
                cache.emit(*a.event)
        finally:
            cache.close()
    for kind, vals in (("tag", a.tag), ("namespace", a.namespace), ("event", a.event)):
        for v in vals or ():
            print(f"invalidated {kind} {v}")
    return EXIT_OK


def _cmd_verify(a: argparse.Namespace) -> int:
    with _attached(a.name) as seg:
        if a.reap:
            n = seg.reap()
            if n:
                print(f"reaped {n} slot(s) of dead processes")
        try:
            problems = seg.verify()
            entries = len(seg)
        except errors.SegmentCorruptError as e:  # a lock or header too damaged to walk
            problems, entries = [f"cannot complete the check: {e}"], 0
    if problems:
        print(f"{seg.name}: {len(problems)} problem(s) found:")
        for p in problems:
            print(f"  {p}")
        return EXIT_FAILED
    print(f"{seg.name}: sound ({entries:,} entries)")
    return EXIT_OK


def _cmd_clear(a: argparse.Namespace) -> int:
    nm = _resolve_name(a.name)
    if not a.yes:
        if not sys.stdin.isatty():
            raise CliError("clear removes every entry for every process: pass --yes")
        answer = input(f"remove every entry of {nm!r} for every process? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing cleared")
            return EXIT_FAILED
    with _attached(nm) as seg:
        n = len(seg)
        seg.clear()
    print(f"cleared {nm} ({n:,} entries)")
    return EXIT_OK


# -- warm -----------------------------------------------------------------------------------

def _resolve_ref(ref: str) -> Callable[..., Any]:
    mod, sep, attr = ref.partition(":")
    if not sep or not mod or not attr:
        raise CliError(f"{ref!r} is not a module:function reference")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as e:
        raise CliError(f"cannot import {mod!r} (for {ref!r}): {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CliError(f"{mod!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise CliError(f"{ref!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _loader(spec: Any, where: str) -> Callable[[], Any]:
    """A loader from a JSON spec: "mod:fn", {"loader", "args", "kwargs"} or
    {"value": literal}."""
    if isinstance(spec, str):
        return _resolve_ref(spec)
    if isinstance(spec, dict):
        if "value" in spec:
            value = spec["value"]
            return lambda: value
        if "loader" in spec:
            fn = _resolve_ref(str(spec["loader"]))
            args, kwargs = list(spec.get("args", [])), dict(spec.get("kwargs", {}))
            return lambda: fn(*args, **kwargs)
    if isinstance(spec, list) and spec and isinstance(spec[0], str):
        fn = _resolve_ref(spec[0])
        args = spec[1:]
        return lambda: fn(*args)
    raise CliError(f"{where}: a loader is 'module:function', [\"module:function\", "
                   f"args...], {{\"loader\": ..., \"args\": [...], \"kwargs\": {{}}}} or "
                   f"{{\"value\": ...}}")


def _items_from_provider(fn: Callable[..., Any], ref: str) -> list[tuple[str, Callable[[], Any]]]:
    got = fn()
    pairs = got.items() if isinstance(got, dict) else got
    out = []
    for p in pairs:
        try:
            key, loader = p
        except (TypeError, ValueError):
            raise CliError(f"{ref}() must return (key, loader) pairs or a dict") from None
        out.append((str(key), loader if callable(loader) else (lambda v=loader: v)))
    return out


def parse_warm_file(path: str) -> list[tuple[str, Callable[[], Any]]]:
    """``(key, loader)`` pairs from a warm file.

    JSON: ``{"key": loader, ...}`` or ``[{"key": ..., "loader": ..., "args": [...]},
    [key, loader], ...]`` where a loader is ``"module:function"``, ``["module:function",
    arg, ...]``, ``{"loader": ..., "args": [...], "kwargs": {...}}`` or ``{"value": ...}``.
    Text: one entry per line (``#`` comments): ``KEY module:function`` loads one key;
    ``module:function`` alone is a provider returning ``(key, loader)`` pairs or a dict.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from None
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise CliError(f"{path}: invalid JSON: {e}") from None
        items: list[tuple[str, Callable[[], Any]]] = []
        if isinstance(doc, dict):
            for k, spec in doc.items():
                items.append((k, _loader(spec, f"{path}: key {k!r}")))
            return items
        for i, el in enumerate(doc):
            where = f"{path}: item {i}"
            if isinstance(el, dict) and "key" in el:
                spec = {k: v for k, v in el.items() if k != "key"}
                items.append((str(el["key"]), _loader(spec, where)))
            elif isinstance(el, list) and len(el) >= 2:
                items.append((str(el[0]), _loader(el[1] if len(el) == 2 else el[1:], where)))
            else:
                raise CliError(f"{where}: expected {{\"key\": ..., \"loader\": ...}} or "
                               f"[key, loader]")
        return items
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) == 1:
            items.extend(_items_from_provider(_resolve_ref(parts[0]), parts[0]))
        elif len(parts) == 2:
            items.append((parts[0], _resolve_ref(parts[1])))
        else:
            raise CliError(f"{path}:{lineno}: expected 'KEY module:function' or "
                           f"'module:function'")
    return items


class ProgressBar:
    """A text progress bar on a stream: redrawn in place on a terminal, a line per
    10% otherwise (so a log file gets eleven lines, not thousands)."""

    def __init__(self, total: int, stream: TextIO, label: str = "warm") -> None:
        self.total, self.stream, self.label = total, stream, label
        self.tty = stream.isatty()
        self._last_decile = -1

    def update(self, done: int, failed: int) -> None:
        frac = done / self.total if self.total else 1.0
        decile = int(frac * 10)
        if not self.tty and decile == self._last_decile:
            return
        self._last_decile = decile
        width = 30
        fill = int(frac * width)
        line = (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                f"{100 * frac:3.0f}%" + (f" ({failed} failed)" if failed else ""))
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _cmd_warm(a: argparse.Namespace) -> int:
    for p in reversed([os.getcwd(), *(a.path or [])]):
        if p not in sys.path:
            sys.path.insert(0, p)
    items = parse_warm_file(a.file)
    loaded = skipped = 0
    failed: dict[str, BaseException] = {}
    kwargs: dict[str, Any] = {"concurrency": a.concurrency, "force": a.force,
                              "tags": tuple(a.tag or ())}
    if a.ttl is not None:
        kwargs["ttl"] = a.ttl
    bar = ProgressBar(len(items), sys.stderr) if not a.no_progress else None
    with _attached(a.name) as seg:
        cache = _cache_for(seg)
        try:
            # Chunks of a few rounds of the pool: the bar moves, the pool stays busy.
            size = max(a.concurrency * 4, min(256, len(items) // 100 or 1))
            if bar is not None:
                bar.update(0, 0)
            for chunk in _chunks(items, size):
                rep = cache.warm(list(chunk), **kwargs)
                loaded += len(rep.loaded)
                skipped += len(rep.skipped)
                failed.update(rep.failed)
                if bar is not None:
                    bar.update(loaded + skipped + len(failed), len(failed))
        finally:
            cache.close()
            if bar is not None:
                bar.close()
    print(f"warm: {loaded} loaded, {skipped} skipped (already fresh), {len(failed)} failed")
    for k, e in failed.items():
        print(f"  {k}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


# -- metrics, dashboard, pass-through --------------------------------------------------------

def _cmd_metrics(a: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry, generate_latest

    from .metrics import SegmentCollector
    with _attached(a.name) as seg:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(SegmentCollector(seg))
        sys.stdout.write(generate_latest(reg).decode())
    return EXIT_OK


def _cmd_dashboard(a: argparse.Namespace) -> int:
    from .dashboard import serve
    nm = _resolve_name(a.name)
    serve(nm, host=a.host, port=a.port, interval=a.interval)
    return EXIT_OK


def _run_module_main(module: str, argv: list[str]) -> int:
    """Run ``module:main(argv)``, imported only now (optional, others' components)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.startswith(e.name):
            raise CliError(f"`shmcache {module.rsplit('.', 1)[1]}` is not available: "
                           f"{module} is not installed in this version") from None
        raise
    fn = getattr(mod, "main", None)
    if not callable(fn):
        raise CliError(f"{module} has no main(argv) function")
    rc = fn(argv)
    return int(rc or 0)


def _bench(argv: list[str]) -> int:
    # An editable checkout: benchmarks/ sits beside the package directory.
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    if not script.is_file():
        raise CliError(f"`shmcache bench` needs the source checkout's benchmarks/run.py "
                       f"(not found at {script}); it is not part of an installed wheel")
    return subprocess.call([sys.executable, str(script), *argv])


def _passthrough(cmd: str, argv: list[str]) -> int:
    if cmd == "bench":
        return _bench(argv)
    return _run_module_main(f"shmcache.{cmd}", argv)


# -- argument parsing -------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmcache", description="Inspect and operate shmcache segments on this host.",
        epilog="Exit status: 0 ok, 1 failed check / not found, 2 usage or attach error.")
    p.add_argument("--log-level", default="WARNING",
                   help="logging level of the shmcache loggers (default WARNING)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--name", help="segment name (default: $SHMCACHE_NAME, or "
                        "the only segment on the host)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("list", help="list the shmcache segments on this host")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_list)

    s = sub.add_parser("stats", parents=[common], help="statistics (table or --json)")
    s.add_argument("--json", action="store_true", help="the full snapshot as JSON")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, default=None,
                   metavar="SECONDS", help="refresh every SECONDS (default 2)")
    s.add_argument("--count", type=int, default=0, help="with --watch: stop after N")
    s.set_defaults(func=_cmd_stats)

    s = sub.add_parser("keys", parents=[common], help="list keys matching a glob")
    s.add_argument("pattern", nargs="?", help="fnmatch pattern, e.g. 'user:*'")
    s.add_argument("--limit", type=int, default=100, help="at most N keys (0: all)")
    s.add_argument("--all", action="store_true", help="include __shmcache__: keys")
    s.set_defaults(func=_cmd_keys)

    s = sub.add_parser("get", parents=[common], help="print a value")
    s.add_argument("key")
    s.add_argument("--namespace")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--raw", action="store_true", help="the stored bytes, undecoded")
    g.add_argument("--info", action="store_true", help="version, length, flags, TTL")
    g.add_argument("--json", action="store_true", help="the decoded value as JSON")
    s.set_defaults(func=_cmd_get)

    s = sub.add_parser("delete", parents=[common], help="delete a key")
    s.add_argument("key")
    s.add_argument("--namespace")
    s.set_defaults(func=_cmd_delete)

    s = sub.add_parser("invalidate", parents=[common],
                       help="invalidate tags, namespaces or events")
    s.add_argument("--tag", action="append", help="repeatable")
    s.add_argument("--namespace", action="append", help="repeatable")
    s.add_argument("--event", action="append", help="repeatable")
    s.set_defaults(func=_cmd_invalidate)

    s = sub.add_parser("verify", parents=[common], help="integrity check; exit 1 on damage")
    s.add_argument("--reap", action="store_true", help="reap dead processes' slots first")
    s.set_defaults(func=_cmd_verify)

    s = sub.add_parser("clear", parents=[common], help="remove every entry")
    s.add_argument("--yes", action="store_true", help="do not ask")
    s.set_defaults(func=_cmd_clear)

    s = sub.add_parser("warm", parents=[common], help="load keys from FILE")
    s.add_argument("file", help="JSON spec, or lines of 'KEY module:function' / "
                   "'module:function' (a provider of (key, loader) pairs)")
    s.add_argument("--concurrency", type=int, default=4)
    s.add_argument("--force", action="store_true", help="reload keys that are fresh")
    s.add_argument("--ttl", type=float, help="seconds (default: SHMCACHE_DEFAULT_TTL)")
    s.add_argument("--tag", action="append", help="tag every loaded entry (repeatable)")
    s.add_argument("--path", action="append", help="add DIR to sys.path (repeatable)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_warm)

    s = sub.add_parser("metrics", parents=[common], help="print Prometheus metrics once")
    s.set_defaults(func=_cmd_metrics)

    s = sub.add_parser("dashboard", parents=[common], help="serve the live dashboard")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8321, help="0: any free port")
    s.add_argument("--interval", type=float, default=1.0,
                   help="seconds between the page's updates")
    s.set_defaults(func=_cmd_dashboard)

    for cmd, text in (("bench", "run benchmarks/run.py (arguments passed on)"),
                      ("demo", "run the demo (shmcache.demo)"),
                      ("sidecar", "run the per-host sidecar (shmcache.sidecar)")):
        sub.add_parser(cmd, help=text, add_help=False)
    return p


def _split_passthrough(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """``(global options, command, its arguments)`` when the command passes its
    arguments on untouched (bench, demo, sidecar)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--log-level":
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        if arg in _PASSTHROUGH:
            return argv[:i], arg, argv[i + 1:]
        break
    return argv, None, []


def _fail(msg: str, status: int) -> int:
    print(f"shmcache: {msg}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run the ``shmcache`` command; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    head, cmd, rest = _split_passthrough(args)
    parser = _parser()
    try:
        if cmd is not None:
            ns = parser.parse_args([*head, cmd])
            try:
                configure(ns.log_level)
            except ValueError:
                return _fail(f"unknown --log-level {ns.log_level!r}", EXIT_USAGE)
            return _passthrough(cmd, rest)
        ns = parser.parse_args(args)
        try:
            configure(ns.log_level)
        except ValueError:
            return _fail(f"unknown --log-level {ns.log_level!r}", EXIT_USAGE)
        _log.debug("running %s", ns.command)
        status: int = ns.func(ns)
        return status
    except CliError as e:
        return _fail(str(e), e.status)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `shmcache keys | head`: the reader went away; not an error of ours.
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        return EXIT_OK
    except errors.ShmCacheError as e:
        return _fail(f"{type(e).__name__}: {e}", EXIT_USAGE)

