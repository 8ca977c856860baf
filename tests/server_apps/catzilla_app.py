"""Catzilla test application for tests/test_catzilla.py, run by the launcher.

Each route counts its computations in the shared segment (``cache.incr``), so a test
can tell a response served from the cache (the count does not move) from one computed
again, whichever process on whichever port served it.
"""

from __future__ import annotations

import os
from typing import Any

from catzilla import Catzilla, Response

from shmcache.contrib.catzilla import install

app = Catzilla(production=True, show_banner=False, log_requests=False)
rc = install(app)
cache = rc.cache


def _computed(route: str) -> int:
    return cache.incr(f"computations:{route}")


def _body(route: str, n: int, request: Any) -> str:
    return f"{route} pid={os.getpid()} n={n} path={request.path}"


@app.get("/page")
def page(request: Any) -> Response:
    n = _computed("page")
    return Response(body=_body("page", n, request), headers={"Cache-Control": "max-age=300"})


@app.get("/private")
def private(request: Any) -> Response:
    n = _computed("private")
    return Response(body=_body("private", n, request),
                    headers={"Cache-Control": "private, max-age=300"})


@app.get("/nostore")
def nostore(request: Any) -> Response:
    n = _computed("nostore")
    return Response(body=_body("nostore", n, request),
                    headers={"Cache-Control": "No-Store"})


@app.get("/cookie")
def cookie(request: Any) -> Response:
    n = _computed("cookie")
    resp = Response(body=_body("cookie", n, request), headers={"Cache-Control": "max-age=300"})
    resp.set_cookie("session", "s3cr3t")
    return resp


@app.get("/implicit")
def implicit(request: Any) -> Response:
    n = _computed("implicit")   # no explicit freshness: not stored (no default_ttl)
    return Response(body=_body("implicit", n, request))


@app.get("/vary")
def vary(request: Any) -> Response:
    n = _computed("vary")
    lang = request.get_header("Accept-Language")
    return Response(body=f"{_body('vary', n, request)} lang={lang}",
                    headers={"Cache-Control": "max-age=300", "Vary": "Accept-Language"})


@app.post("/page")
def post_page(request: Any) -> Response:
    n = _computed("post")
    return Response(body=_body("post", n, request), headers={"Cache-Control": "max-age=300"})


@app.get("/count")
def count(request: Any) -> Response:
    route = request.query_params.get("route", "page")
    return Response(body=str(cache.incr(f"computations:{route}", 0)),
                    headers={"Cache-Control": "no-store"})


@app.get("/pid")
def pid(request: Any) -> Response:
    return Response(body=str(os.getpid()), headers={"Cache-Control": "no-store"})


@app.get("/stream")
def stream(request: Any) -> Response:
    from catzilla.streaming import StreamingResponse

    n = _computed("stream")   # a streamed body is produced later: never stored
    return StreamingResponse((f"chunk{i} n={n}\n" for i in range(3)),
                             headers={"Cache-Control": "max-age=300"})
