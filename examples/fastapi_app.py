"""FastAPI under gunicorn's uvicorn workers: whole responses and a slow lookup, shared.

    cd examples
    SHMCACHE_NAME=fastapi-example ../.venv/bin/gunicorn -c ../workers/gunicorn_conf.py \\
        -k uvicorn.workers.UvicornWorker -w 4 -b 127.0.0.1:8000 fastapi_app:app
    curl -si http://127.0.0.1:8000/users/7 | grep -i '^x-'    # X-Cache: MISS, then HIT

(or ``uvicorn --workers 4 fastapi_app:app``: each worker then attaches the segment
named by ``SHMCACHE_NAME`` itself, and nobody unlinks it at exit --
``shmcache delete``/``unlink_segment`` does.)

Two levels of caching, both in the segment every worker shares:

- ``load_user`` stands for a slow query (``EXAMPLE_WORK_MS`` of CPU time, 5 by
  default) and is decorated with ``@cache.cached``: it runs once per user for the whole
  host, whichever endpoint and worker asks first;
- :class:`shmcache.http.ASGICacheMiddleware` stores the responses of ``GET
  /users/{id}`` (``Cache-Control: max-age=60``) and serves them without entering
  FastAPI at all (``X-Cache: HIT``).  ``GET /users/{id}/plan`` is not stored
  (``no-store``) but still gets the user from ``load_user``'s cache.

``GET /computations`` tells how often ``load_user`` really ran, in any worker.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import FastAPI, Response

from shmcache.gunicorn import get_cache
from shmcache.http import ASGICacheMiddleware

WORK_MS = float(os.environ.get("EXAMPLE_WORK_MS", "5"))

cache = get_cache()   # the segment the gunicorn master opened (SHMCACHE_* variables)
app = FastAPI(title="shmcache FastAPI example")
app.add_middleware(ASGICacheMiddleware, cache=cache)


def _burn_cpu(ms: float) -> None:
    # CPU time of this thread, not wall time: the cost does not depend on the load.
    deadline = time.thread_time() + ms / 1000
    while time.thread_time() < deadline:
        pass


@cache.cached(ttl=300, key_builder=lambda user_id: f"example:user:{user_id}")
async def load_user(user_id: int) -> dict[str, Any]:
    """The slow query, computed once per host (concurrent callers in other workers wait
    for the first one instead of running it too).  It blocks the event loop for its
    few milliseconds, as a synchronous database driver would."""
    cache.incr("example:load_user_runs", ttl=3600)
    _burn_cpu(WORK_MS)
    return {"id": user_id, "name": f"user {user_id}", "plan": ("free", "pro")[user_id % 2],
            "computed_by": os.getpid()}


@app.get("/users/{user_id}")
async def user(user_id: int, response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = "max-age=60"   # what makes the middleware store it
    return await load_user(user_id)


@app.get("/users/{user_id}/plan")
async def plan(user_id: int, response: Response) -> dict[str, Any]:
    response.headers["Cache-Control"] = "no-store"
    u = await load_user(user_id)
    return {"id": user_id, "plan": u["plan"], "served_by": os.getpid()}


@app.get("/computations")
async def computations(response: Response) -> dict[str, int]:
    response.headers["Cache-Control"] = "no-store"
    return {"load_user_runs": cache.incr("example:load_user_runs", 0)}
