"""Gunicorn server hooks: the master creates one segment, every worker shares it.

Owns the life of one segment across a gunicorn server: created by the master before it
forks, a fresh process slot checked in every worker, dead workers' slots reaped, and
the segment unlinked (or kept for a warm restart) when the master exits.  It never
touches entries: what workers cache is the application's business, through
:func:`get_cache`.

Wire the hooks in a gunicorn config module (``workers/gunicorn_conf.py`` is a ready
one)::

    # gunicorn_conf.py
    import shmcache.gunicorn
    from shmcache import CacheConfig

    globals().update(shmcache.gunicorn.hooks(
        config=CacheConfig(name="myapp-cache", c_memory_size_mb=256),
        keep_on_exit=False))

or take the module-level hooks, configured from ``SHMCACHE_*`` variables
(:meth:`CacheConfig.from_env`, plus ``SHMCACHE_KEEP_ON_EXIT`` and
``SHMCACHE_GUNICORN_SIDECAR``)::

    from shmcache.gunicorn import child_exit, on_exit, on_reload, on_starting, post_fork

(``gunicorn -c python:shmcache.gunicorn app:app`` does the same).  The application gets
the shared cache with :func:`get_cache`::

    from shmcache.gunicorn import get_cache
    cache = get_cache()            # at import, in the master (--preload) or a worker

What each hook does, and why:

- ``on_starting`` (master, before it listens or forks): opens (creates) the segment, so
  every worker inherits one mapping of it; reaps slots that processes of an earlier run
  left behind (a kept segment).  The sidecar: a ``Cache`` with levels below L1 and
  ``CacheConfig.sidecar="auto"`` starts its own as it opens, here in the master, so
  workers (which inherit it) start none; with ``sidecar=True`` the hook starts one
  itself (for ``sidecar="off"``; an L1-only cache has nothing for a sidecar to do: the
  hook logs a warning and goes on).
- ``post_fork`` (worker, just after the fork): the engine's fork handler has already
  given the inherited handle a slot of its own; this checks that the slot is there and
  is this pid's (else attaches afresh by name), and closes the cache at a clean exit
  (``atexit``, after Python joined the non-daemon threads, so no request thread still
  uses it): a worker recycled by ``max_requests`` or a reload then frees its slot itself
  and costs the others no repair.
- ``child_exit`` (master, after gunicorn reaped a worker): ``Segment.reap()`` frees the
  slot of a worker that died without closing (SIGKILL, OOM killer, timeout) -- its
  pins, half-done writes and lock ownership -- and folds its counters into the totals.
- ``on_reload`` (master, ``kill -HUP``): the segment and its entries are kept; new
  workers attach the same segment.  A reloaded config naming another segment is not
  obeyed (that needs a restart): a warning says so.
- ``on_exit`` (master): stops the sidecar, then unlinks the segment, or keeps it (with
  its entries) for a warm restart when ``keep_on_exit`` -- and always while another
  master uses it (a ``kill -USR2`` binary upgrade in progress).

Boot-time hooks (``on_starting``, ``post_fork``) raise, so a server that cannot open its
cache fails at start with the reason; the run-time ones (``child_exit``, ``on_reload``,
``on_exit``) log and swallow errors, since an exception there would stop gunicorn's
arbiter loop or skip its shutdown.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .cache import Cache
from .config import CacheConfig
from .errors import ShmCacheError

__all__ = ["GunicornHooks", "SidecarHandle", "hooks", "get_cache", "on_starting",
           "post_fork", "child_exit", "on_reload", "on_exit"]

_logger = logging.getLogger("shmcache.gunicorn")

#: ``1/true/yes/on``: keep the segment when the master exits (a warm restart).
ENV_KEEP_ON_EXIT = "SHMCACHE_KEEP_ON_EXIT"
#: ``1/true/yes/on``: the hooks start a sidecar in the master (``Cache.start_sidecar()``).
#: Not ``SHMCACHE_SIDECAR``: that is ``CacheConfig.sidecar`` (``auto``/``off``).
ENV_SIDECAR = "SHMCACHE_GUNICORN_SIDECAR"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class SidecarHandle(Protocol):
    """What ``Cache.start_sidecar()`` returns: something the master can stop."""

    def stop(self) -> None: ...


def _env_flag(var: str, environ: Mapping[str, str]) -> bool:
    raw = environ.get(var, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"environment variable {var}={raw!r}: not a valid bool")


@dataclass(frozen=True, slots=True)
class _Settings:
    """What one ``hooks()`` call asked for; ``None`` fields are read from the
    environment when the master starts (gunicorn's ``raw_env`` is applied by then)."""

    config: CacheConfig | None = None
    keep_on_exit: bool | None = None
    sidecar: bool | None = None

    def resolve_config(self) -> CacheConfig:
        return self.config if self.config is not None else CacheConfig.from_env()

    def resolve_keep(self) -> bool:
        if self.keep_on_exit is not None:
            return self.keep_on_exit
        return _env_flag(ENV_KEEP_ON_EXIT, os.environ)

    def resolve_sidecar(self) -> bool:
        if self.sidecar is not None:
            return self.sidecar
        return _env_flag(ENV_SIDECAR, os.environ)


class _State:
    """This process's share of the server.  Module-level, not per ``hooks()`` object:
    a ``kill -HUP`` makes gunicorn execute the config module again, which builds new
    hook objects, but the segment the master opened must stay the one workers use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: _Settings | None = None   # of the latest hooks() / on_starting
        self.cache: Cache | None = None
        self.sidecar: SidecarHandle | None = None
        self.sidecar_pid = 0                      # only the master that started it stops it
        self.keep_on_exit = False


_state = _State()


def _after_fork_in_child() -> None:
    # The lock may have been held by another thread of the parent at the fork.
    _state.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_at_exit() -> None:
    # Runs after the interpreter joined non-daemon threads (gthread's pool included), so
    # no request still uses the segment.  A clean close frees this process's slot now;
    # otherwise the master's child_exit would have to reap it (a full repair).
    with _state.lock:
        cache, _state.cache = _state.cache, None
    if cache is not None:
        try:
            cache.close()
        except Exception:  # noqa: BLE001 - exiting anyway; the master reaps the slot
            _logger.debug("shmcache: close at exit failed", exc_info=True)


atexit.register(_close_at_exit)


def _log(server: Any) -> Any:
    """gunicorn's logger when the hook got the arbiter, else this module's."""
    log = getattr(server, "log", None)
    return log if log is not None and hasattr(log, "warning") else _logger


def _open_locked(settings: _Settings) -> Cache:
    if _state.cache is None:
        _state.cache = Cache(settings.resolve_config())
    return _state.cache


def get_cache() -> Cache:
    """The process's shared :class:`~shmcache.Cache`: the one the master opened (inherited
    by every worker), or, outside a server wired with these hooks, one opened on first
    call from the configuration given to :func:`hooks`, else from ``SHMCACHE_*``.

    Call it at import of the application module or in a request; every call returns the
    same object.  With ``--preload`` the application is imported in the master before
    ``on_starting``: that first call creates the segment and ``on_starting`` adopts it.

    Example::

        >>> import os
        >>> os.environ["SHMCACHE_NAME"] = "doc-gunicorn"
        >>> cache = get_cache()
        >>> cache is get_cache(), cache.segment.name
        (True, 'doc-gunicorn')
        >>> cache.close(); cache.unlink(); _state.cache = None
        >>> del os.environ["SHMCACHE_NAME"]
    """
    with _state.lock:
        return _open_locked(_state.settings or _Settings())


class GunicornHooks:
    """The server hooks bound to one configuration; :func:`hooks` makes one and returns
    its methods by gunicorn setting name.

    ``config``: the cache configuration (``None``: :meth:`CacheConfig.from_env` when the
    master starts).  ``keep_on_exit``: keep the segment and its entries when the master
    exits, for a warm restart (``None``: ``$SHMCACHE_KEEP_ON_EXIT``, default unlink).
    ``sidecar``: the hook starts a sidecar in the master with ``Cache.start_sidecar()``
    (``None``: ``$SHMCACHE_GUNICORN_SIDECAR``, default off).  Leave it off when the
    configuration's own ``sidecar="auto"`` starts one (a cache with levels below L1):
    a second one would only stand by.
    """

    def __init__(self, config: CacheConfig | None = None, *, keep_on_exit: bool | None = None,
                 sidecar: bool | None = None) -> None:
        self.settings = _Settings(config, keep_on_exit, sidecar)

    def as_dict(self) -> dict[str, Callable[..., None]]:
        """The hooks by gunicorn setting name, to splat into a config module."""
        return {"on_starting": self.on_starting, "post_fork": self.post_fork,
                "child_exit": self.child_exit, "on_reload": self.on_reload,
                "on_exit": self.on_exit}

    # -- master ----------------------------------------------------------------------

    def on_starting(self, server: Any) -> None:
        """Master, before it listens or forks: open the segment, reap stale slots, start
        the sidecar if asked."""
        log = _log(server)
        with _state.lock:
            _state.settings = self.settings
            cache = _open_locked(self.settings)
            _state.keep_on_exit = self.settings.resolve_keep()
        # Slots of processes of an earlier server on a kept segment (a warm restart
        # after a crash of the master): free them now rather than at the first claim.
        reaped = cache.segment.reap()
        st = cache.segment.stats()
        log.info("shmcache: segment %r ready (%d MiB, %d entries kept, %d stale slots "
                 "reaped); on exit it is %s", cache.segment.name, st.size_bytes >> 20,
                 st.entries, reaped, "kept" if _state.keep_on_exit else "unlinked")
        if self.settings.resolve_sidecar():
            self._start_sidecar(cache, log)

    @staticmethod
    def _start_sidecar(cache: Cache, log: Any) -> None:
        # The seam for the sidecar (journal drain, TTL sweeps, metrics): a thread or
        # process the Cache starts and this master stops in on_exit.  Workers keep
        # serving from L1 without it, so its absence is a warning, not a failure.
        start = getattr(cache, "start_sidecar", None)
        if start is None:
            log.warning("shmcache: a sidecar was asked for but this shmcache has no "
                        "Cache.start_sidecar(); workers serve from the segment without one")
            return
        try:
            _state.sidecar = start()
        except ShmCacheError as e:   # e.g. an L1-only cache: nothing for a sidecar to do
            log.warning("shmcache: sidecar not started: %s", e)
            return
        _state.sidecar_pid = os.getpid()
        log.info("shmcache: sidecar started in the master (pid %d)", os.getpid())

    def child_exit(self, server: Any, worker: Any) -> None:
        """Master, after a worker exited: free the slots of dead processes (a worker
        that closed its cache cleanly has none left; this costs a scan of the slot
        table only)."""
        log = _log(server)
        try:
            cache = _state.cache
            if cache is None:
                return
            n = cache.segment.reap()
            if n:
                log.info("shmcache: reaped %d process slot(s) after worker %s exited",
                         n, getattr(worker, "pid", "?"))
        except Exception:  # noqa: BLE001 - must not stop the arbiter loop
            log.exception("shmcache: reaping after worker exit failed")

    def on_reload(self, server: Any) -> None:
        """Master, on ``kill -HUP``: keep the segment (entries survive the reload) and
        reap; gunicorn then forks new workers, which attach it in ``post_fork``."""
        log = _log(server)
        try:
            cache = _state.cache
            latest = _state.settings or self.settings
            if cache is None:
                return
            wanted = latest.resolve_config().segment_name
            if wanted != cache.segment.name:
                log.warning("shmcache: the reloaded configuration names segment %r, but "
                            "this server keeps %r until it restarts", wanted,
                            cache.segment.name)
            _state.keep_on_exit = latest.resolve_keep()
            cache.segment.reap()
        except Exception:  # noqa: BLE001 - must not stop the arbiter loop
            log.exception("shmcache: reload handling failed")

    def on_exit(self, server: Any) -> None:
        """Master, at shutdown (workers are gone): stop the sidecar, then unlink the
        segment or keep it for a warm restart."""
        log = _log(server)
        sidecar, _state.sidecar = _state.sidecar, None
        if sidecar is not None and _state.sidecar_pid == os.getpid():
            try:
                sidecar.stop()
            except Exception:  # noqa: BLE001 - the segment must still be cleaned up
                log.exception("shmcache: stopping the sidecar failed")
        with _state.lock:
            cache, _state.cache = _state.cache, None
        if cache is None:
            return
        name = cache.segment.name
        try:
            cache.segment.reap()   # a kept segment starts the next run with no dead slots
        except Exception:  # noqa: BLE001
            log.exception("shmcache: final reap failed")
        other = _other_master(server)
        try:
            cache.close()
        finally:
            if other:
                log.info("shmcache: segment %r kept for master %d", name, other)
            elif _state.keep_on_exit:
                log.info("shmcache: segment %r kept for the next start", name)
            else:
                cache.unlink()
                log.info("shmcache: segment %r unlinked", name)

    # -- worker ----------------------------------------------------------------------

    def post_fork(self, server: Any, worker: Any) -> None:
        """Worker, just after the fork: make sure this process holds a slot of its own
        in the segment it inherited (attaching by name if not)."""
        log = _log(server)
        with _state.lock:
            cache = _open_locked(_state.settings or self.settings)
            if not _own_slot(cache):
                # The fork handler could not claim a slot (all held by live processes,
                # or the master's handle was closed): a new handle claims one or raises
                # NoSlotError, which fails the boot with the reason.  The old object
                # stays usable (uncounted) for application code that kept it.
                log.warning("shmcache: worker %d has no slot of its own in %r; "
                            "attaching afresh", os.getpid(), cache.segment.name)
                cache = _state.cache = Cache(cache.config)
        log.debug("shmcache: worker %d uses slot %d of %r", os.getpid(),
                  cache.segment.slot, cache.segment.name)


def _other_master(server: Any) -> int:
    """After ``kill -USR2`` two masters share the segment until one exits: the new one
    (``reexec_pid`` in the old master) or the old one (``master_pid`` in a new master,
    until gunicorn notices its parent is gone).  The pid of the other one if it still
    runs (the one that leaves then must not unlink the segment), else 0."""
    for attr in ("reexec_pid", "master_pid"):
        pid = getattr(server, attr, 0)
        if isinstance(pid, int) and pid > 0 and _running(pid):
            if attr == "master_pid" and os.getppid() != pid:
                continue   # our old master is gone: we were promoted
            return pid
    return 0


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X", "")


def _own_slot(cache: Cache) -> bool:
    """True if the cache's handle holds a live slot registered to this pid."""
    try:
        slot = cache.segment.slot
    except Exception:  # noqa: BLE001 - a closed handle has no slot
        return False
    if slot < 0:
        return False
    pid = os.getpid()
    return any(s.slot == slot and s.pid == pid and s.state == "live"
               for s in cache.segment.stats().slots)


def hooks(config: CacheConfig | None = None, *, keep_on_exit: bool | None = None,
          sidecar: bool | None = None) -> dict[str, Callable[..., None]]:
    """Gunicorn hooks for one shared segment, by setting name, to splat into a config
    module: ``on_starting``, ``post_fork``, ``child_exit``, ``on_reload``, ``on_exit``.

    ``config`` also becomes what :func:`get_cache` opens in this process (so an
    application preloaded in the master uses it).  See :class:`GunicornHooks`.

    Example::

        >>> from shmcache import CacheConfig
        >>> h = hooks(config=CacheConfig(name="myapp-cache"), keep_on_exit=True)
        >>> sorted(h)
        ['child_exit', 'on_exit', 'on_reload', 'on_starting', 'post_fork']
        >>> _state.settings = None
    """
    made = GunicornHooks(config, keep_on_exit=keep_on_exit, sidecar=sidecar)
    with _state.lock:
        _state.settings = made.settings
    return made.as_dict()


# Module-level hooks configured from the environment: ``from shmcache.gunicorn import
# on_starting, ...`` in a config module, or ``gunicorn -c python:shmcache.gunicorn``.
# Created without registering settings, so importing this module changes nothing.
_default = GunicornHooks()
on_starting = _default.on_starting
post_fork = _default.post_fork
child_exit = _default.child_exit
on_reload = _default.on_reload
on_exit = _default.on_exit
