"""Logger names of shmcache, and a one-call set-up for command-line tools.

Every module logs through the standard :mod:`logging` module under one stable tree, so
an application can route or silence shmcache with its usual logging configuration:

=====================  ===========================================================
``shmcache``           the root of the tree (configure this one)
``shmcache.cache``     the Python API: undecodable entries, failed refreshes
``shmcache.sidecar``   the per-host sidecar: journal drain, invalidations, reaping
``shmcache.tiers``     Redis and disk levels: outages, recoveries, refused values
``shmcache.gunicorn``  the gunicorn hooks: segment created, workers reaped
``shmcache.contrib``   the Django and Flask backends (``.django``, ``.flask``)
``shmcache.http``      HTTP middleware and the dashboard's web server
``shmcache.metrics``   metrics publishing and collection
``shmcache.cli``       the ``shmcache`` command
=====================  ===========================================================

What is never logged, by any of them: a cached value, a serialized payload, or a
secret (HMAC keys, passwords in URLs).  Keys may be logged (they are how an operator
finds an entry); :func:`safe_key` shortens them so a huge key cannot flood a log.

Example::

    >>> import logging
    >>> from shmcache.logs import CACHE, get_logger, safe_key
    >>> get_logger(CACHE).name
    'shmcache.cache'
    >>> safe_key("user:" + "x" * 200)[:12]
    "'user:xxxxxx"
"""

from __future__ import annotations

import logging
import sys
from typing import Final, TextIO

__all__ = ["ROOT", "CACHE", "SIDECAR", "TIERS", "HTTP", "GUNICORN", "CONTRIB", "METRICS",
           "CLI", "LOGGER_NAMES",
           "get_logger", "configure", "safe_key"]

ROOT: Final = "shmcache"
CACHE: Final = "shmcache.cache"
SIDECAR: Final = "shmcache.sidecar"
HTTP: Final = "shmcache.http"
TIERS: Final = "shmcache.tiers"
GUNICORN: Final = "shmcache.gunicorn"
CONTRIB: Final = "shmcache.contrib"
METRICS: Final = "shmcache.metrics"
CLI: Final = "shmcache.cli"

#: The stable logger names (documented in docs/operations.md; do not rename).
LOGGER_NAMES: Final = (ROOT, CACHE, SIDECAR, TIERS, HTTP, GUNICORN, CONTRIB, METRICS, CLI)

_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
_MAX_KEY_CHARS: Final = 120


def get_logger(name: str = ROOT) -> logging.Logger:
    """The logger ``name``, which must be ``shmcache`` or below it."""
    if name != ROOT and not name.startswith(ROOT + "."):
        raise ValueError(f"shmcache loggers live under {ROOT!r}, not {name!r}")
    return logging.getLogger(name)


def configure(level: int | str = logging.WARNING, stream: TextIO | None = None) -> None:
    """Send the ``shmcache`` tree to ``stream`` (stderr) at ``level``; for tools.

    Libraries must not configure logging; the ``shmcache`` command calls this once
    (``--log-level``).  Calling it again replaces the handler it installed rather than
    adding a second one.
    """
    root = logging.getLogger(ROOT)
    for h in list(root.handlers):
        if getattr(h, "_shmcache_cli", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler._shmcache_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


def safe_key(key: str | bytes) -> str:
    """``repr(key)`` cut to a bounded length: for log messages, never for values."""
    r = repr(key)
    return r if len(r) <= _MAX_KEY_CHARS else f"{r[:_MAX_KEY_CHARS]}...({len(key)} chars)"
