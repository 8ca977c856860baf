"""Catzilla: several processes on several ports, one response cache between them.

    cd examples
    SHMCACHE_NAME=catzilla-example ../.venv/bin/python ../workers/catzilla_launcher.py \\
        catzilla_app:app --ports 8001,8002
    curl -si http://127.0.0.1:8001/users/7 | grep -i '^x-'    # X-Cache: MISS
    curl -si http://127.0.0.1:8002/users/7 | grep -i '^x-'    # X-Cache: HIT, other process

Catzilla has no pre-fork mode: the launcher creates the segment, starts one Catzilla
process per port with ``SHMCACHE_NAME`` naming it, and unlinks the segment when it is
stopped (Ctrl-C).  :func:`shmcache.contrib.catzilla.install` registers a ``pre_route``
middleware that answers a stored response without entering the route and a
``post_route`` one that stores cacheable responses.

``GET /users/{id}`` stands for a slow query (``EXAMPLE_WORK_MS`` of CPU time, 5 by
default) and sends ``Cache-Control: max-age=60``; ``GET /computations`` tells how often
it really ran, in any process.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from catzilla import Catzilla, Response

from shmcache.contrib.catzilla import install

WORK_MS = float(os.environ.get("EXAMPLE_WORK_MS", "5"))

app = Catzilla(production=True, show_banner=False, log_requests=False)
cache = install(app).cache   # Cache() from SHMCACHE_*: the launcher's segment


def slow_query(user_id: int) -> dict[str, Any]:
    """Stands for a slow database query (CPU time of this thread, load-independent)."""
    deadline = time.thread_time() + WORK_MS / 1000
    while time.thread_time() < deadline:
        pass
    return {"id": user_id, "name": f"user {user_id}", "plan": ("free", "pro")[user_id % 2]}


def _json(data: dict[str, Any], cache_control: str) -> Response:
    return Response(body=json.dumps(data), content_type="application/json",
                    headers={"Cache-Control": cache_control})


@app.get("/users/{user_id}")
def user(request: Any) -> Response:
    user_id = int(request.path_params["user_id"])
    cache.incr("example:computations", ttl=3600)
    return _json({**slow_query(user_id), "computed_by": os.getpid()}, "max-age=60")


@app.get("/computations")
def computations(request: Any) -> Response:
    return _json({"computations": cache.incr("example:computations", 0),
                  "served_by": os.getpid()}, "no-store")
