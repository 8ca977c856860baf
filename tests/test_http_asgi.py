"""ASGICacheMiddleware through real ASGI applications called in-process.

Most tests drive the middleware with a minimal ASGI server loop (``call``), which also
checks the message sequence the middleware sends (one start, bodies, a final
``more_body=False``, nothing after).  A FastAPI application is driven through httpx's
ASGI transport.  The WSGI and ASGI middlewares share entries on one segment; the last
test checks that too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
from _helpers import new_name
from http_apps import computes, make_asgi_app, make_wsgi_app
from test_http_wsgi import Client

from shmcache import Cache, CacheConfig, stampede, unlink_segment
from shmcache.http import ASGICacheMiddleware, CacheMiddleware

Message = dict[str, Any]
ASGIApp = Callable[..., Awaitable[None]]


@pytest.fixture
def cache() -> Iterator[Cache]:
    name = new_name("http-asgi-")
    c = Cache(CacheConfig(name=name, c_memory_size_mb=16))
    yield c
    c.close()
    unlink_segment(name)


@dataclass
class Resp:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    messages: list[Message]

    def h(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def x_cache(self) -> str | None:
        return self.h("x-cache")


async def acall(app: ASGIApp, path_qs: str, method: str = "GET",
                headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> Resp:
    path, _, query = path_qs.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1")]
             + [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}
    sent: list[Message] = []
    done = asyncio.Event()
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        # The ASGI message sequence a server enforces.
        if not sent:
            assert message["type"] == "http.response.start", message
            # ASGI: "Header names must be lowercased".
            assert all(bytes(k) == bytes(k).lower() for k, _ in message["headers"])
        else:
            assert message["type"] == "http.response.body", message
            assert sent[-1]["type"] == "http.response.start" or sent[-1].get("more_body"), \
                "a message after the final body"
        sent.append(message)

    await app(scope, receive, send)
    done.set()
    assert sent and not sent[-1].get("more_body", False), "response not completed"
    hs = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
          for k, v in sent[0].get("headers", [])]
    return Resp(sent[0]["status"], hs, b"".join(m.get("body", b"") for m in sent[1:]), sent)


def call(app: ASGIApp, path_qs: str, method: str = "GET",
         headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> Resp:
    return asyncio.run(acall(app, path_qs, method, headers, body))


def q(t: str, *headers: str, **params: str) -> str:
    return "/r?" + urlencode([("t", t)] + [("h", h) for h in headers] + list(params.items()))


MAX60 = "Cache-Control:max-age=60"
PUB60 = "Cache-Control:public, max-age=60"


def setup(cache: Cache, app: ASGIApp | None = None,
          **opts: Any) -> tuple[ASGICacheMiddleware, Callable[..., Resp]]:
    mw = ASGICacheMiddleware(app or make_asgi_app(cache), cache, **opts)
    return mw, lambda *a, **k: call(mw, *a, **k)


# -- hits and misses --------------------------------------------------------------------------

def test_miss_then_hits_without_entering_the_app(cache: Cache) -> None:
    mw, get = setup(cache)
    url = q("basic", MAX60)
    first, second = get(url), get(url)
    assert [first.x_cache, second.x_cache] == ["MISS", "HIT"]
    assert first.body == second.body and computes(cache, url) == 1
    assert second.h("age") == "0" and second.h("ETag") == first.h("etag")
    assert second.h("content-length") == str(len(second.body))
    assert mw.stats.hits == 1 and mw.stats.stores == 1


def test_age_and_expiry(cache: Cache) -> None:
    mw, get = setup(cache)
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("age", "Cache-Control:max-age=10")
    get(url)
    now[0] += 4
    assert get(url).h("age") == "4"
    now[0] += 10
    assert get(url).x_cache == "MISS" and computes(cache, url) == 2


def test_head_and_query_strings(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("head", MAX60)
    assert get(url, "HEAD").x_cache == "MISS"  # a HEAD miss stores nothing
    full = get(url)
    head = get(url, "HEAD")
    assert head.x_cache == "HIT" and head.body == b""
    assert head.h("content-length") == str(len(full.body))
    other = get(q("head", MAX60, x="1"))
    assert other.x_cache == "MISS" and other.body != full.body


# -- CVE regressions and Alice/Bob ------------------------------------------------------------

def test_cve_2026_6907_vary_star(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("star", PUB60, "Vary: *")
    assert [get(url).x_cache, get(url).x_cache] == ["MISS", "MISS"]


@pytest.mark.parametrize("cc", ["PRIVATE, max-age=60", "No-Store, max-age=60",
                                "max-age=60, NO-CACHE"])
def test_cve_2026_8404_case_insensitive(cache: Cache, cc: str) -> None:
    _, get = setup(cache)
    url = q("case", f"Cache-Control:{cc}")
    assert [get(url).x_cache, get(url).x_cache] == ["MISS", "MISS"]


def test_cve_2026_48587_padded_vary(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("pad", PUB60, "Vary:  Cookie  ,", echo="cookie")
    get(url, headers=[("Cookie", "session=alice")])
    bob = get(url, headers=[("Cookie", "session=bob")])
    assert bob.x_cache == "MISS" and b"session=bob" in bob.body


def test_cve_2026_48588_unrelated_cookies(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("cookies", PUB60, "Vary:Cookie", echo="cookie")
    get(url, headers=[("Cookie", "_ga=1; session=alice")])
    for cookie in ["_ga=1; session=bob", "_ga=1"]:
        r = get(url, headers=[("Cookie", cookie)])
        assert r.x_cache == "MISS" and b"Bearer alice" not in r.body
    assert get(url, headers=[("Cookie", "_ga=1; session=alice")]).x_cache == "HIT"


def test_missing_and_empty_header(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("empty", PUB60, "Vary:X-Token", echo="x-token")
    assert get(url).x_cache == "MISS"
    empty = get(url, headers=[("X-Token", "")])
    assert empty.x_cache == "MISS" and b"x-token=\n" in empty.body
    assert get(url).x_cache == "HIT" and get(url, headers=[("X-Token", "")]).x_cache == "HIT"


@pytest.mark.parametrize("headers", [["Cache-Control:private, max-age=60"],
                                     ["Cache-Control:max-age=60"],
                                     ["Cache-Control:max-age=60", "Set-Cookie:s=alice"]])
def test_alice_private_response_never_served_to_bob(cache: Cache, headers: list[str]) -> None:
    _, get = setup(cache)
    url = q("alice" + "|".join(headers), *headers, echo="authorization")
    get(url, headers=[("Authorization", "Bearer alice")])
    for who in ([("Authorization", "Bearer bob")], []):
        r = get(url, headers=who)
        assert r.x_cache == "MISS" and b"Bearer alice" not in r.body


# -- validators, invalidation, request directives ---------------------------------------------

def test_if_none_match_304(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("etag", MAX60)
    etag = get(url).h("etag")
    assert etag is not None
    r = get(url, headers=[("If-None-Match", etag)])
    assert r.status == 304 and r.body == b"" and r.h("etag") == etag and r.x_cache == "HIT"


def test_unsafe_methods_invalidate(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("inv", MAX60)
    get(url)
    assert get(url).x_cache == "HIT"
    assert get(url, "DELETE").status == 200
    assert get(url).x_cache == "MISS"


def test_request_no_cache_and_only_if_cached(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("req", MAX60)
    assert get(url, headers=[("Cache-Control", "only-if-cached")]).status == 504
    first = get(url)
    refreshed = get(url, headers=[("Cache-Control", "no-cache")])
    assert refreshed.x_cache == "MISS" and refreshed.body != first.body
    assert get(url).body == refreshed.body


# -- bodies -----------------------------------------------------------------------------------

def test_large_streams_pass_through_while_streaming(cache: Cache) -> None:
    forwarded: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"cache-control", b"max-age=60")]})
        for _ in range(20):
            await send({"type": "http.response.body", "body": b"x" * 1000, "more_body": True})
            forwarded.append(len(outer))
        await send({"type": "http.response.body", "body": b""})

    mw = ASGICacheMiddleware(app, cache, max_body_size=5000)
    outer: list[Message] = []

    async def run() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b""}

        async def send(m: Message) -> None:
            outer.append(m)
        await mw({"type": "http", "method": "GET", "scheme": "http", "path": "/big",
                  "query_string": b"", "headers": [(b"host", b"h")]}, receive, send)
    asyncio.run(run())
    # Past the limit every chunk goes out as the application sends it.
    assert forwarded[-1] == len(outer) - 1 and forwarded[10] > 1
    assert b"".join(m.get("body", b"") for m in outer[1:]) == b"x" * 20000
    assert mw.stats.stores == 0


def test_small_streams_are_stored(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("stream", MAX60, stream="1", size="9000")
    first = get(url)
    hit = get(url)
    assert hit.x_cache == "HIT" and hit.body == first.body and len(hit.messages) == 2


def test_trailers_pass_through_unstored(cache: Cache) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True,
                    "headers": [(b"cache-control", b"max-age=60")]})
        await send({"type": "http.response.body", "body": b"data"})
        await send({"type": "http.response.trailers", "headers": [(b"x-sum", b"1")]})

    mw = ASGICacheMiddleware(app, cache)
    sent: list[Message] = []

    async def run() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b""}

        async def send(m: Message) -> None:
            sent.append(m)
        await mw({"type": "http", "method": "GET", "scheme": "http", "path": "/t",
                  "query_string": b"", "headers": []}, receive, send)
    asyncio.run(run())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body",
                                         "http.response.trailers"]
    assert sent[0]["trailers"] is True and mw.stats.stores == 0


def test_app_error_releases_the_lease(cache: Cache) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"cache-control", b"max-age=60")]})
        raise RuntimeError("boom")

    mw = ASGICacheMiddleware(app, cache, single_flight=True)
    with pytest.raises(RuntimeError, match="boom"):
        call(mw, "/err")
    key = mw.store.request("GET", "http", "127.0.0.1", "/err", "", {}).key
    assert cache.segment.get(stampede.lease_key(key, cache.max_key_len)) is None


def test_other_scopes_go_to_the_app(cache: Cache) -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        await send({"type": "lifespan.startup.complete"})

    mw = ASGICacheMiddleware(app, cache)
    sent: list[Message] = []

    async def run() -> None:
        async def receive() -> Message:
            return {"type": "lifespan.startup"}

        async def send(m: Message) -> None:
            sent.append(m)
        await mw({"type": "lifespan"}, receive, send)
    asyncio.run(run())
    assert seen == ["lifespan"] and sent == [{"type": "lifespan.startup.complete"}]


# -- single flight and stale-while-revalidate -------------------------------------------------

def test_single_flight_concurrent_tasks(cache: Cache) -> None:
    computed: list[int] = []
    mw: ASGICacheMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        computed.append(1)
        deadline = time.monotonic() + 20
        while mw.stats.waits < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)  # hold the fill until the other task waits
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"cache-control", b"max-age=60")]})
        await send({"type": "http.response.body", "body": b"once"})

    mw = ASGICacheMiddleware(app, cache, single_flight=True)

    async def both() -> list[Resp]:
        return list(await asyncio.gather(acall(mw, "/sf"), acall(mw, "/sf")))
    results = asyncio.run(both())
    assert len(computed) == 1 and sorted(r.x_cache or "" for r in results) == ["HIT", "MISS"]
    assert all(r.body == b"once" for r in results)


def test_stale_while_revalidate(cache: Cache) -> None:
    mw, get = setup(cache, stale_while_revalidate=30)
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("swr", "Cache-Control:max-age=5")
    first = get(url)
    now[0] += 6
    stale = get(url)
    assert stale.x_cache == "HIT" and stale.body == first.body and stale.h("age") == "6"
    assert computes(cache, url) == 2 and mw.stats.refreshes == 1
    fresh = get(url)
    assert fresh.x_cache == "HIT" and fresh.body != first.body


# -- a real framework, and sharing with WSGI --------------------------------------------------

def test_fastapi_through_httpx(cache: Cache) -> None:
    fastapi = pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from fastapi.responses import JSONResponse, StreamingResponse
    app = fastapi.FastAPI()
    counter = {"n": 0}

    @app.get("/items/{item}")
    def item(item: int) -> JSONResponse:
        counter["n"] += 1
        return JSONResponse({"item": item, "n": counter["n"]},
                            headers={"Cache-Control": "public, max-age=60"})

    @app.get("/stream")
    def stream() -> StreamingResponse:
        def gen() -> Iterator[bytes]:
            for _ in range(10):
                yield b"y" * 1000
        return StreamingResponse(gen(), headers={"Cache-Control": "max-age=60"})

    mw = ASGICacheMiddleware(app, cache, max_body_size=4000)

    async def run() -> None:
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            a = await c.get("/items/1")
            b = await c.get("/items/1")
            assert a.json() == b.json() == {"item": 1, "n": 1}
            assert (a.headers["x-cache"], b.headers["x-cache"]) == ("MISS", "HIT")
            r = await c.get("/items/1", headers={"If-None-Match": b.headers["etag"]})
            assert r.status_code == 304
            s1, s2 = await c.get("/stream"), await c.get("/stream")
            assert len(s1.content) == len(s2.content) == 10000
            assert s2.headers["x-cache"] == "MISS"  # over max_body_size: never stored
    asyncio.run(run())
    assert counter["n"] == 1


def test_wsgi_and_asgi_share_entries(cache: Cache) -> None:
    wsgi = Client(CacheMiddleware(make_wsgi_app(cache), cache))
    _, aget = setup(cache)
    url = q("shared", MAX60, "Vary:Accept-Language")
    first = wsgi(url, headers=[("Accept-Language", "fr")])
    hit = aget(url, headers=[("Accept-Language", "fr")])
    assert hit.x_cache == "HIT" and hit.body == first.body and computes(cache, url) == 1
    url2 = q("shared-back", MAX60)
    aget(url2)
    back = wsgi(url2)
    assert back.x_cache == "HIT" and back.reason == "OK" and computes(cache, url2) == 1
