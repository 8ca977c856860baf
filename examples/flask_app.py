"""Flask under gunicorn: a slow endpoint whose responses every worker shares.

    cd examples
    SHMCACHE_NAME=flask-example SHMCACHE_LEVELS=c_memory,disk \\
        ../.venv/bin/gunicorn -c ../workers/gunicorn_conf.py -w 4 -b 127.0.0.1:8000 flask_app:app
    curl -si http://127.0.0.1:8000/users/7 | grep -i '^x-'    # X-Cache: MISS, X-Worker: <pid>
    curl -si http://127.0.0.1:8000/users/7 | grep -i '^x-'    # X-Cache: HIT, from any worker

``GET /users/<id>`` runs a "slow query" (``EXAMPLE_WORK_MS`` milliseconds of CPU work,
5 by default) and answers JSON with ``Cache-Control: max-age=60``.
:class:`shmcache.http.CacheMiddleware` stores the whole response in the shared segment
the gunicorn master opened (``get_cache()``, configured by the ``SHMCACHE_*``
variables), so the first worker to be asked computes it and every worker serves it from
then on without entering Flask: one computation per host, not one per worker (with
``single_flight``, also when several workers are asked at the same moment).

Two things make that visible (``shmcache demo`` prints them):

- every computation is recorded in the segment -- a counter per path and the pid of
  the worker that ran it -- and ``GET /computations?path=/users/7`` reads them back;
- every response, hit or miss, carries ``X-Worker: <pid>`` (added outside the cache
  middleware, so a hit names the worker that served it, not the one that computed it).

``EXAMPLE_CACHE=0`` serves the same application without the response cache (the
uncached baseline of ``shmcache demo``).  Without gunicorn, ``get_cache()`` opens the
segment named by ``SHMCACHE_NAME`` itself (``flask --app flask_app run`` works too).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, jsonify, request

from shmcache.gunicorn import get_cache
from shmcache.http import CacheMiddleware

WORK_MS = float(os.environ.get("EXAMPLE_WORK_MS", "5"))
CACHED = os.environ.get("EXAMPLE_CACHE", "1") != "0"

cache = get_cache()   # the segment the gunicorn master opened; inherited by every worker
app = Flask(__name__)


def slow_query(user_id: int) -> dict[str, Any]:
    """Stands for a slow database query: ``WORK_MS`` of CPU time in this thread.

    CPU time (``thread_time``), not wall time, so a request costs the same whatever else
    the machine is doing, and 4 workers cannot hide the cost by waiting in parallel.
    """
    deadline = time.thread_time() + WORK_MS / 1000
    spins = 0
    while time.thread_time() < deadline:
        spins += 1
    return {"id": user_id, "name": f"user {user_id}", "plan": ("free", "pro")[user_id % 2]}


def record_computation(path: str) -> None:
    """Note in the segment that this worker computed ``path`` (any worker can read it)."""
    cache.incr("example:computations", ttl=3600)
    n = cache.incr(f"example:computations:{path}", ttl=3600)
    cache.set(f"example:computed-by:{path}:{n}", os.getpid(), ttl=3600)


@app.get("/users/<int:user_id>")
def user(user_id: int) -> Response:
    record_computation(request.path)
    resp = jsonify({**slow_query(user_id), "computed_by": os.getpid()})
    resp.headers["Cache-Control"] = "max-age=60"   # what makes the middleware store it
    return resp


@app.get("/computations")
def computations() -> Response:
    """How often ``?path=`` was computed, and by which worker pids; without ``path``,
    how many computations there were in all (never cached)."""
    path = request.args.get("path", "")
    if not path:
        resp = jsonify({"count": cache.incr("example:computations", 0)})
        resp.headers["Cache-Control"] = "no-store"
        return resp
    n = cache.incr(f"example:computations:{path}", 0)
    pids = [cache.get(f"example:computed-by:{path}:{i}") for i in range(1, n + 1)]
    resp = jsonify({"path": path, "count": n, "pids": pids})
    resp.headers["Cache-Control"] = "no-store"
    return resp


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def add_worker_header(inner: WSGIApp) -> WSGIApp:
    """Every response names the process that sent it (``X-Worker``), hits included.
    Read per response: with ``--preload`` this module is imported in the master."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(("X-Worker", str(os.getpid())))
            return start_response(status, headers, exc_info)
        return inner(environ, start)
    return wrapped


# Flask's documented place for WSGI middleware: the Flask object stays the application
# (gunicorn serves flask_app:app, app.test_client() works).
if CACHED:
    # single_flight: concurrent misses of one URL, in any worker, wait for the first
    # one's response instead of running the slow query too.
    app.wsgi_app = CacheMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, cache, single_flight=True)
app.wsgi_app = add_worker_header(app.wsgi_app)  # type: ignore[method-assign,assignment]
