"""Views: one slow page cached for the whole host with Django's own ``cache_page``.

``cache_page`` stores the rendered response in ``caches["default"]``, which is the
shmcache segment (settings.py): the first worker to render ``/users/7`` stores it, and
the other workers answer from it without running the view.  The slow part is simulated
with ``EXAMPLE_WORK_MS`` of CPU time (5 by default).
"""

import os
import time

from django.core.cache import cache
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import cache_page

WORK_MS = float(os.environ.get("EXAMPLE_WORK_MS", "5"))


def slow_query(user_id: int) -> dict[str, object]:
    """Stands for a slow database query (CPU time of this thread, load-independent)."""
    deadline = time.thread_time() + WORK_MS / 1000
    while time.thread_time() < deadline:
        pass
    return {"id": user_id, "name": f"user {user_id}", "plan": ("free", "pro")[user_id % 2]}


@cache_page(60)
def user(request: HttpRequest, user_id: int) -> JsonResponse:
    # Django's incr needs the key to exist: add() creates it once, atomically.
    cache.add("example:computations", 0, timeout=None)
    cache.incr("example:computations")
    return JsonResponse({**slow_query(user_id), "computed_by": os.getpid()})


def computations(request: HttpRequest) -> JsonResponse:
    """How many times ``user`` ran, in every worker together (never cached)."""
    resp = JsonResponse({"computations": cache.get("example:computations", 0)})
    resp["Cache-Control"] = "no-store"
    return resp
