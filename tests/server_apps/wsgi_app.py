"""WSGI test application for tests/test_gunicorn.py: every worker shares one cache.

``get_cache()`` runs at import: in the master with ``--preload``, in each worker
without.  The cached function counts its computations in the segment (``cache.incr``),
so a test can prove a value was computed once for all workers.

Endpoints (JSON): ``/pid``; ``/cached?n=K`` (computed once per K, for every worker);
``/count?n=K`` (how many times K was computed); ``/slot`` (this worker's slot and pid);
``/churn`` (records its pid under ``churn_pid``, then writes and reads the cache until
killed, at most 20 s: the victim of the SIGKILL test); ``/slow?s=S`` (sleeps, to spread
concurrent requests over the workers).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from shmcache.gunicorn import get_cache

cache = get_cache()


@cache.cached(ttl=300, key_builder=lambda n: f"value:{n}")
def compute(n: str) -> dict[str, Any]:
    cache.incr(f"computations:{n}")
    time.sleep(0.05)  # slow enough that concurrent requests meet in the stampede lease
    return {"n": n, "computed_by": os.getpid()}


def _churn(deadline: float) -> None:
    cache.segment.set("churn_pid", str(os.getpid()).encode())  # raw: the test reads it
    i = 0
    while time.monotonic() < deadline:
        key = f"churn:{i % 512}"
        cache.set(key, b"x" * (64 + i % 4000))
        cache.get(key)
        i += 1


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    body: dict[str, Any] = {"pid": os.getpid()}
    if path == "/cached":
        body["value"] = compute(q.get("n", "0"))
    elif path == "/count":
        body["count"] = cache.incr(f"computations:{q.get('n', '0')}", 0)
    elif path == "/slot":
        body["slot"] = cache.segment.slot
    elif path == "/churn":
        _churn(time.monotonic() + 20)
    elif path == "/slow":
        time.sleep(float(q.get("s", "0.05")))
    elif path != "/pid":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]
