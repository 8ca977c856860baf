"""A Django process driven line by line over stdin/stdout, for the cross-process tests.

Each input line is JSON ``{"op": ..., "args": [...], "kwargs": {...}, "alias": ...}``,
calling that method of ``django.core.cache.caches[alias]``; the reply line is
``{"ok": result}`` or ``{"error": "ExceptionType: message"}``.  Two extra ops:
``incr_loop`` (``incr(key)`` n times, for contention) and ``expires_at`` (the entry's
absolute expiry in the segment).  Run with ``DJANGO_SETTINGS_MODULE=djproject.settings``.
"""

import json
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproject.settings")
django.setup()

from django.core.cache import caches  # noqa: E402 - needs django.setup() first


def run(cmd: dict) -> object:
    backend = caches[cmd.get("alias", "default")]
    op, args, kwargs = cmd["op"], cmd.get("args", []), cmd.get("kwargs", {})
    if op == "pid":
        return os.getpid()
    if op == "incr_loop":
        key, n = args
        return [backend.incr(key) for _ in range(n)][-1]
    if op == "expires_at":
        info = backend.shmcache.segment.info(backend.make_key(*args))
        return None if info is None else info.expires_at
    return getattr(backend, op)(*args, **kwargs)


for line in sys.stdin:
    try:
        reply = {"ok": run(json.loads(line))}
    except Exception as e:  # noqa: BLE001 - every failure goes back to the test
        reply = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
