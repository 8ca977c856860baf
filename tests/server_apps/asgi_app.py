"""ASGI test application for the uvicorn-worker tests (a bare ASGI callable, no
framework): the same endpoints as wsgi_app.py's ``/pid``, ``/cached`` and ``/count``,
with the cached function ``async``."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from shmcache.gunicorn import get_cache

cache = get_cache()


@cache.cached(ttl=300, key_builder=lambda n: f"avalue:{n}")
async def compute(n: str) -> dict[str, Any]:
    cache.incr(f"acomputations:{n}")
    await asyncio.sleep(0.05)
    return {"n": n, "computed_by": os.getpid()}


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
              send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    q = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    body: dict[str, Any] = {"pid": os.getpid()}
    status = 200
    if scope["path"] == "/cached":
        body["value"] = await compute(q.get("n", "0"))
    elif scope["path"] == "/count":
        body["count"] = cache.incr(f"acomputations:{q.get('n', '0')}", 0)
    elif scope["path"] != "/pid":
        status = 404
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
