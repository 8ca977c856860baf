"""CacheMiddleware (WSGI) through real WSGI applications called in-process.

Both sides of the middleware are wrapped in ``wsgiref.validate.validator``: the outer
one checks that the middleware behaves as a PEP 3333 application towards the server,
the inner one that it behaves as a PEP 3333 server towards the application (calls
``start_response`` correctly, iterates and closes the iterable).  The application
counts its computations in the segment (``http_apps.computes``), so "served without
entering the application" is asserted, not assumed.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest
from _helpers import new_name
from http_apps import computes, make_wsgi_app

from shmcache import Cache, CacheConfig, stampede, unlink_segment
from shmcache.http import CacheMiddleware

App = Callable[..., Iterable[bytes]]


@pytest.fixture
def cache() -> Iterator[Cache]:
    name = new_name("http-wsgi-")
    c = Cache(CacheConfig(name=name, c_memory_size_mb=16))
    yield c
    c.close()
    unlink_segment(name)


@dataclass
class Resp:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def h(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def x_cache(self) -> str | None:
        return self.h("X-Cache")


def environ(path_qs: str, method: str = "GET",
            headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> dict[str, Any]:
    path, _, query = path_qs.partition("?")
    env: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                           "SCRIPT_NAME": "",
                           "wsgi.input": io.BytesIO(body)}
    setup_testing_defaults(env)
    env.pop("CONTENT_TYPE", None)  # setup_testing_defaults invents one
    for k, v in headers:
        name = k.upper().replace("-", "_")
        if name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            env[name] = v
        else:
            env["HTTP_" + name] = v
    if body:
        env["CONTENT_LENGTH"] = str(len(body))
    return env


class Client:
    """A minimal WSGI server: call, collect, close."""

    def __init__(self, app: App) -> None:
        self.app = validator(app)

    def __call__(self, path_qs: str, method: str = "GET",
                 headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> Resp:
        got: list[tuple[str, list[tuple[str, str]]]] = []
        written: list[bytes] = []

        def start_response(status: str, hs: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            got[:] = [(status, hs)]
            return written.append

        result = self.app(environ(path_qs, method, headers, body), start_response)
        try:
            chunks = list(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        code, _, reason = got[0][0].partition(" ")
        return Resp(int(code), reason, got[0][1], b"".join(written + chunks))


def setup(cache: Cache, app: App | None = None, **opts: Any) -> tuple[CacheMiddleware, Client]:
    mw = CacheMiddleware(validator(app or make_wsgi_app(cache)), cache, **opts)
    return mw, Client(mw)


def q(t: str, *headers: str, **params: str) -> str:
    """``/r?t=<t>&h=...``: the test app's URL answering with these headers."""
    from urllib.parse import urlencode
    pairs = [("t", t)] + [("h", h) for h in headers] + list(params.items())
    return "/r?" + urlencode(pairs)


MAX60 = "Cache-Control:max-age=60"
PUB60 = "Cache-Control:public, max-age=60"


# -- hits and misses --------------------------------------------------------------------------

def test_miss_then_hits_without_entering_the_app(cache: Cache) -> None:
    mw, get = setup(cache)
    url = q("basic", MAX60)
    first, second, third = get(url), get(url), get(url)
    assert computes(cache, url) == 1
    assert [first.x_cache, second.x_cache, third.x_cache] == ["MISS", "HIT", "HIT"]
    assert first.body == second.body == third.body
    assert first.status == second.status == 200 and second.reason == "OK"
    assert second.h("Age") == "0" and first.h("Age") is None
    assert second.h("Content-Type") == "text/plain"
    assert second.h("Content-Length") == str(len(second.body))
    assert first.h("ETag") == second.h("ETag") and first.h("ETag", ).startswith('"')  # type: ignore[union-attr]
    assert mw.stats.hits == 2 and mw.stats.misses == 1 and mw.stats.stores == 1


def test_age_and_expiry_follow_the_clock(cache: Cache) -> None:
    mw, get = setup(cache)
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("age", "Cache-Control:max-age=10")
    get(url)
    now[0] += 7
    hit = get(url)
    assert hit.x_cache == "HIT" and hit.h("Age") == "7"
    now[0] += 4  # 11 s old: past max-age=10
    again = get(url)
    assert again.x_cache == "MISS" and computes(cache, url) == 2


def test_age_from_the_application_counts(cache: Cache) -> None:
    mw, get = setup(cache)
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("origin-age", "Cache-Control:max-age=10", "Age:8")
    get(url)
    now[0] += 1
    assert get(url).h("Age") == "9"
    now[0] += 2  # 8 + 3 > 10
    assert get(url).x_cache == "MISS"


def test_query_string_is_part_of_the_key(cache: Cache) -> None:
    _, get = setup(cache)
    a, b = q("qs", MAX60, x="1"), q("qs", MAX60, x="2")
    assert get(a).x_cache == "MISS" and get(b).x_cache == "MISS"
    assert get(a).x_cache == "HIT" and get(b).x_cache == "HIT"
    assert get(a).body != get(b).body


def test_head_is_served_from_the_get_entry(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("head", MAX60)
    full = get(url)
    head = get(url, "HEAD")
    assert head.x_cache == "HIT" and head.body == b""
    assert head.h("Content-Length") == str(len(full.body))
    assert head.h("ETag") == full.h("ETag")
    assert computes(cache, url) == 1


def test_head_miss_goes_to_the_app_and_stores_nothing(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("head-miss", MAX60)
    assert get(url, "HEAD").x_cache == "MISS"
    assert get(url).x_cache == "MISS"  # the HEAD stored nothing
    assert computes(cache, url) == 2


# -- the Django 2026 CVE regressions ----------------------------------------------------------

def test_cve_2026_6907_vary_star_is_not_cached(cache: Cache) -> None:
    mw, get = setup(cache)
    for vary in ["*", " * ", "Accept, *"]:
        url = q("vary-star" + vary, PUB60, f"Vary:{vary}")
        assert [get(url).x_cache, get(url).x_cache] == ["MISS", "MISS"]
        assert computes(cache, url) == 2
    assert mw.stats.stores == 0


@pytest.mark.parametrize("cc", ["PRIVATE, max-age=60", "Private, Max-Age=60",
                                "max-age=60, pRiVaTe", "NO-STORE, MAX-AGE=60",
                                "No-Store, public, max-age=60", "max-age=60,NO-CACHE"])
def test_cve_2026_8404_directives_are_case_insensitive(cache: Cache, cc: str) -> None:
    _, get = setup(cache)
    url = q("case", f"Cache-Control:{cc}")
    assert [get(url).x_cache, get(url).x_cache] == ["MISS", "MISS"]
    assert computes(cache, url) == 2


def test_cve_2026_8404_max_age_is_case_insensitive(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("case-maxage", "Cache-Control:MAX-AGE=60")
    assert [get(url).x_cache, get(url).x_cache] == ["MISS", "HIT"]


@pytest.mark.parametrize("vary", ["  Cookie", "Cookie  ", "Accept-Encoding ,  COOKIE ",
                                  ", cookie,"])
def test_cve_2026_48587_padded_vary_values(cache: Cache, vary: str) -> None:
    _, get = setup(cache)
    url = q("padded", PUB60, f"Vary:{vary}", echo="cookie")
    alice = get(url, headers=[("Cookie", "session=alice")])
    bob = get(url, headers=[("Cookie", "session=bob")])
    assert alice.x_cache == bob.x_cache == "MISS"
    assert b"cookie=session=bob" in bob.body
    assert get(url, headers=[("Cookie", "session=alice")]).body == alice.body


def test_cve_2026_48588_cookie_vary_with_unrelated_cookies(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("cookie-vary", PUB60, "Vary:Cookie", echo="cookie")
    first = get(url, headers=[("Cookie", "_ga=GA1.2.3; session=alice")])
    assert first.x_cache == "MISS"
    # Another visitor with the same unrelated cookie but another session, one with
    # only the unrelated cookie, one with none: all different responses, none served
    # Alice's.
    for cookies in (["_ga=GA1.2.3; session=bob"], ["_ga=GA1.2.3"], []):
        r = get(url, headers=[("Cookie", c) for c in cookies])
        assert r.x_cache == "MISS" and b"alice" not in r.body, cookies
    again = get(url, headers=[("Cookie", "_ga=GA1.2.3; session=alice")])
    assert again.x_cache == "HIT" and again.body == first.body
    assert computes(cache, url) == 4


def test_missing_and_empty_header_do_not_collide(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("empty", PUB60, "Vary:X-Token", echo="x-token")
    missing = get(url)
    empty = get(url, headers=[("X-Token", "")])
    assert missing.x_cache == empty.x_cache == "MISS"
    assert b"x-token=None" in missing.body and b"x-token=\n" in empty.body
    assert get(url).body == missing.body and get(url, headers=[("X-Token", "")]).body == empty.body
    assert computes(cache, url) == 2


# -- Alice's private response is never served to Bob ------------------------------------------

ALICE = [("Authorization", "Bearer alice"), ("Cookie", "session=alice")]
BOB = [("Authorization", "Bearer bob"), ("Cookie", "session=bob")]


@pytest.mark.parametrize("headers", [
    ["Cache-Control:private, max-age=60"],
    ["Cache-Control:Private"],
    ["Cache-Control:max-age=60", "Set-Cookie:session=alice; HttpOnly"],
    ["Cache-Control:max-age=60"],                    # implicit Vary: Authorization, Cookie
    ["Cache-Control:max-age=60", "Vary:Accept"],
    ["Cache-Control:no-store"],
    ["Expires:Fri, 01 Jan 2100 00:00:00 GMT"],
])
def test_alice_private_response_never_served_to_bob(cache: Cache, headers: list[str]) -> None:
    _, get = setup(cache, default_ttl=60)
    url = q("alice" + "|".join(headers), *headers, echo="authorization")
    alice = get(url, headers=ALICE)
    assert b"Bearer alice" in alice.body
    for who in (BOB, [], [("Authorization", "Bearer alice")], [("Cookie", "session=alice")]):
        r = get(url, headers=who)
        assert b"Bearer alice" not in r.body or who == [("Authorization", "Bearer alice")]
        assert r.x_cache == "MISS", who


def test_public_responses_are_shared_across_credentials(cache: Cache) -> None:
    _, get = setup(cache)
    for cc in ["public, max-age=60", "s-maxage=60", "max-age=60, must-revalidate"]:
        url = q("shared" + cc, f"Cache-Control:{cc}")
        assert get(url, headers=ALICE).x_cache == "MISS"
        assert get(url, headers=BOB).x_cache == "HIT", cc
        assert get(url).x_cache == "HIT"


def test_implicit_vary_keys_by_credentials(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("per-user", MAX60, echo="authorization")
    a1, b1 = get(url, headers=ALICE), get(url, headers=BOB)
    a2, b2 = get(url, headers=ALICE), get(url, headers=BOB)
    assert [a1.x_cache, b1.x_cache, a2.x_cache, b2.x_cache] == ["MISS", "MISS", "HIT", "HIT"]
    assert a2.body == a1.body and b2.body == b1.body and a1.body != b1.body


def test_rfc_strict_authorization(cache: Cache) -> None:
    _, get = setup(cache, implicit_vary=())
    url = q("strict", MAX60)
    assert [get(url, headers=ALICE).x_cache, get(url, headers=ALICE).x_cache] == ["MISS", "MISS"]
    anon = q("strict-anon", MAX60)
    assert [get(anon).x_cache, get(anon, headers=[("Cookie", "a=1")]).x_cache] == ["MISS", "HIT"]


# -- what is (not) stored ---------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "stored"), [
    ([MAX60], True),
    (["Cache-Control:no-cache, max-age=60"], False),
    (["Cache-Control:max-age=0"], False),
    ([], False),                                              # no freshness, no default
    (["Expires:Fri, 01 Jan 2100 00:00:00 GMT"], True),
    (["Expires:0"], False),
    (["Cache-Control:max-age=60", "Cache-Control:max-age=30"], False),
    (["Cache-Control:s-maxage=0, max-age=60"], False),        # s-maxage wins when shared
])
def test_storability(cache: Cache, headers: list[str], stored: bool) -> None:
    mw, get = setup(cache)
    url = q("store" + "|".join(headers), *headers)
    get(url)
    assert (get(url).x_cache == "HIT") is stored
    assert mw.stats.stores == int(stored)


@pytest.mark.parametrize(("status", "headers", "stored"), [
    (404, [], True), (410, [], True), (301, [], True),        # heuristically cacheable
    (201, [], False), (500, [], False), (302, [], False),
    (201, [MAX60], True), (500, [MAX60], True),                # explicit freshness
    (206, [MAX60], False), (201, ["Cache-Control:public"], True),
])
def test_status_codes(cache: Cache, status: int, headers: list[str], stored: bool) -> None:
    _, get = setup(cache, default_ttl=60)
    url = q(f"status{status}" + "|".join(headers), *headers, status=str(status))
    first = get(url)
    assert first.status == status
    assert (get(url).x_cache == "HIT") is stored


def test_default_ttl_and_route_ttls(cache: Cache) -> None:
    mw, get = setup(cache, default_ttl=30, route_ttls={"/r": 5, "/rr": None})
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("route")
    get(url)
    assert get(url).x_cache == "HIT"
    now[0] += 6  # the /r route's 5 s, not the 30 s default
    assert get(url).x_cache == "MISS"
    # Explicit freshness beats the route's default.
    explicit = q("route-explicit", MAX60)
    get(explicit)
    now[0] += 20
    assert get(explicit).x_cache == "HIT"


def test_route_none_disables_the_default(cache: Cache) -> None:
    _, get = setup(cache, default_ttl=30, route_ttls={"/": None})
    url = q("no-default")
    get(url)
    assert get(url).x_cache == "MISS"


def test_hop_by_hop_and_no_cache_fields_are_not_stored(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("fields", 'Cache-Control:max-age=60, no-cache="X-Secret"', "X-Secret:s3cr3t",
            "X-Kept:yes")
    assert get(url).h("X-Secret") == "s3cr3t"  # the miss passes it through
    hit = get(url)
    assert hit.x_cache == "HIT" and hit.h("X-Secret") is None and hit.h("X-Kept") == "yes"


def test_content_length_mismatch_is_not_stored(cache: Cache) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        cache.incr("n:bad-length")
        start_response("200 OK", [("Content-Type", "text/plain"), MAX_PAIR,
                                  ("Content-Length", "100")])
        return [b"short"]
    mw = CacheMiddleware(app, cache)
    get = Client.__new__(Client)
    get.app = mw  # the outer validator would reject the bad Content-Length itself
    get("/x")
    assert get("/x").x_cache == "MISS" and mw.stats.stores == 0


MAX_PAIR = ("Cache-Control", "max-age=60")


# -- validators and conditional requests ------------------------------------------------------

def test_if_none_match_gets_304_from_the_cache(cache: Cache) -> None:
    mw, get = setup(cache)
    url = q("etag", MAX60)
    etag = get(url).h("ETag")
    assert etag is not None
    for inm in [etag, f"W/{etag}", f'"nope", {etag}', "*"]:
        r = get(url, headers=[("If-None-Match", inm)])
        assert r.status == 304 and r.body == b"" and r.x_cache == "HIT", inm
        assert r.h("ETag") == etag and r.h("Cache-Control") == "max-age=60"
        assert r.h("Content-Type") is None
    assert get(url, headers=[("If-None-Match", '"other"')]).status == 200
    assert mw.stats.not_modified == 4 and computes(cache, url) == 1


def test_etag_is_a_content_hash(cache: Cache) -> None:
    mw, get = setup(cache)
    url = q("etag-hash", MAX60, fixed="1")
    first = get(url)
    mw.invalidate("http://127.0.0.1" + url)
    second = get(url)
    assert second.x_cache == "MISS" and computes(cache, url) == 2
    assert first.h("ETag") == second.h("ETag")  # same content, same tag, any process


def test_conditional_miss_answers_304_and_the_app_sees_no_condition(cache: Cache) -> None:
    mw, get = setup(cache)
    url = q("cond-miss", MAX60, fixed="1", echo="if-none-match")
    etag = get(url).h("ETag")
    mw.invalidate("http://127.0.0.1" + url)
    r = get(url, headers=[("If-None-Match", etag or "")])
    assert r.status == 304 and r.x_cache == "MISS" and computes(cache, url) == 2
    body = get(url).body  # the stored full response: the app saw no If-None-Match
    assert b"if-none-match=None" in body


def test_if_modified_since(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("ims", MAX60, "Last-Modified:Fri, 15 Jan 2027 07:00:00 GMT")
    get(url)
    newer = get(url, headers=[("If-Modified-Since", "Fri, 15 Jan 2027 08:00:00 GMT")])
    older = get(url, headers=[("If-Modified-Since", "Fri, 15 Jan 2027 06:00:00 GMT")])
    assert newer.status == 304 and older.status == 200


def test_if_modified_since_without_dates_uses_the_storage_time(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("ims-stored", MAX60)
    stored = get(url)
    assert stored.h("Date") is None  # none added: the server sends its own
    hit = get(url)
    assert hit.x_cache == "HIT" and hit.h("Date") is None
    assert get(url, headers=[("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")]).status \
        == 304
    assert get(url, headers=[("If-Modified-Since", "Fri, 01 Jan 2010 00:00:00 GMT")]).status \
        == 200


def test_application_etag_is_kept(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("own-etag", MAX60, 'ETag:"v1"')
    assert get(url).h("ETag") == '"v1"'
    assert get(url, headers=[("If-None-Match", '"v1"')]).status == 304


# -- request directives -----------------------------------------------------------------------

def test_request_no_cache_refreshes_the_entry(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("req-no-cache", MAX60)
    first = get(url)
    fresh = get(url, headers=[("Cache-Control", "No-Cache")])
    assert fresh.x_cache == "MISS" and fresh.body != first.body
    assert get(url).body == fresh.body  # the refresh was stored for everyone


def test_request_max_age_and_min_fresh(cache: Cache) -> None:
    mw, get = setup(cache)
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("req-max-age", MAX60)
    get(url)
    now[0] += 10
    assert get(url, headers=[("Cache-Control", "max-age=20")]).x_cache == "HIT"
    assert get(url, headers=[("Cache-Control", "max-age=5")]).x_cache == "MISS"
    now[0] += 5
    assert get(url, headers=[("Cache-Control", "min-fresh=30")]).x_cache == "HIT"
    assert get(url, headers=[("Cache-Control", "min-fresh=59")]).x_cache == "MISS"


def test_request_no_store_is_served_but_never_stores(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("req-no-store", MAX60)
    assert get(url, headers=[("Cache-Control", "no-store")]).x_cache == "MISS"
    assert get(url).x_cache == "MISS"  # nothing was stored
    assert get(url, headers=[("Cache-Control", "no-store")]).x_cache == "HIT"


def test_only_if_cached(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("oic", MAX60)
    r = get(url, headers=[("Cache-Control", "only-if-cached")])
    assert r.status == 504 and computes(cache, url) == 0
    get(url)
    assert get(url, headers=[("Cache-Control", "only-if-cached")]).x_cache == "HIT"


def test_request_directives_can_be_ignored(cache: Cache) -> None:
    _, get = setup(cache, respect_request_no_cache=False)
    url = q("ignore-no-cache", MAX60)
    get(url)
    for cc in ["no-cache", "max-age=0"]:
        assert get(url, headers=[("Cache-Control", cc)]).x_cache == "HIT"
    assert computes(cache, url) == 1


def test_requests_the_cache_does_not_handle(cache: Cache) -> None:
    mw, get = setup(cache)
    url = q("bypass", MAX60)
    get(url)
    assert get(url, headers=[("Range", "bytes=0-3")]).x_cache == "MISS"
    assert get(url, body=b"payload").x_cache == "MISS"  # a GET with content
    assert get(url).x_cache == "HIT"
    assert mw.stats.bypasses == 2


# -- invalidation (RFC 9111 §4.4) -------------------------------------------------------------

def test_unsafe_methods_invalidate_every_variant(cache: Cache) -> None:
    mw, get = setup(cache)
    url = q("inv", PUB60, "Vary:Accept-Language")
    for lang in ("en", "fr"):
        get(url, headers=[("Accept-Language", lang)])
        assert get(url, headers=[("Accept-Language", lang)]).x_cache == "HIT"
    post = get(url, "POST")
    assert post.status == 200 and post.x_cache == "MISS"
    for lang in ("en", "fr"):
        assert get(url, headers=[("Accept-Language", lang)]).x_cache == "MISS"
    assert mw.stats.invalidations >= 1


@pytest.mark.parametrize(("method", "status", "invalidated"), [
    ("POST", 200, True), ("PUT", 204, True), ("DELETE", 302, True), ("PATCH", 200, True),
    ("POST", 404, False), ("DELETE", 500, False), ("OPTIONS", 200, False),
])
def test_invalidation_needs_a_non_error_unsafe_response(cache: Cache, method: str, status: int,
                                                         invalidated: bool) -> None:
    inner = make_wsgi_app(cache)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] != "GET":
            start_response(f"{status} X", [] if status == 204 else [("Content-Type", "text/plain")])
            return [b""]
        return inner(environ, start_response)
    _, get = setup(cache, app)
    url = q("inv-status", MAX60)
    get(url)
    get(url, method)
    assert (get(url).x_cache == "MISS") is invalidated


def test_location_and_content_location_are_invalidated(cache: Cache) -> None:
    other, same, foreign = q("loc-a", MAX60), q("loc-b", MAX60), q("loc-c", MAX60)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            start_response("201 Created", [
                ("Content-Type", "text/plain"), ("Location", other),
                ("Content-Location", "http://127.0.0.1" + same),
                ("Link", "unrelated"), ("Content-Location", "http://elsewhere" + foreign)])
            return [b""]
        return make_wsgi_app(cache)(environ, start_response)
    _, get = setup(cache, app)
    for u in (other, same, foreign):
        get(u)
    get("/post-target", "POST")
    assert get(other).x_cache == "MISS" and get(same).x_cache == "MISS"
    assert get(foreign).x_cache == "HIT"


def test_invalidation_during_a_fill_wins(cache: Cache) -> None:
    url = q("race", MAX60)
    mw: CacheMiddleware

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # A POST to the same URL commits while this GET is computing the old state.
        mw.invalidate("http://127.0.0.1" + url)
        start_response("200 OK", [("Content-Type", "text/plain"), MAX_PAIR])
        return [b"old state"]
    mw, get = setup(cache, app)
    assert get(url).x_cache == "MISS"
    assert get(url).x_cache == "MISS" and mw.stats.stores == 0


def test_invalidation_racing_the_index_write_wins(cache: Cache,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    mw, get = setup(cache)
    url = q("race-index", PUB60, "Vary:Accept-Language")
    get(url, headers=[("Accept-Language", "en")])
    assert get(url, headers=[("Accept-Language", "en")]).x_cache == "HIT"
    real_set = cache.set

    def set_racing(key: Any, value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, bytes) and value.startswith(b"SHX1"):
            # A POST's invalidation lands after the fill checked the epoch and
            # before it writes the URL's index (with the old nonce).
            mw.invalidate("http://127.0.0.1" + url)
        real_set(key, value, *args, **kwargs)
    monkeypatch.setattr(cache, "set", set_racing)
    get(url, headers=[("Accept-Language", "fr")])
    monkeypatch.undo()
    # Neither the new variant nor the one stored before the invalidation is served.
    assert get(url, headers=[("Accept-Language", "en")]).x_cache == "MISS"
    assert get(url, headers=[("Accept-Language", "fr")]).x_cache == "MISS"


# -- bodies: size, streaming, write(), close() ------------------------------------------------

class Tracked:
    """An application iterable that records how far it was consumed and its close()."""

    def __init__(self, chunks: list[bytes], fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.taken = 0
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for i, c in enumerate(self.chunks):
            if i == self.fail_at:
                raise RuntimeError("boom")
            self.taken += 1
            yield c

    def close(self) -> None:
        self.closed += 1


def tracked_app(it: list[Tracked], chunks: list[bytes], headers: list[tuple[str, str]],
                fail_at: int | None = None) -> App:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")] + headers)
        t = Tracked(chunks, fail_at)
        it.append(t)
        return t
    return app


def test_large_bodies_stream_through_unstored(cache: Cache) -> None:
    its: list[Tracked] = []
    mw = CacheMiddleware(tracked_app(its, [b"x" * 1000] * 50, [MAX_PAIR]), cache,
                         max_body_size=4000)
    env = environ("/big")
    got: list[str] = []
    result = mw(env, lambda s, h, e=None: got.append(dict(h)["X-Cache"]))
    # Returned after buffering just past the limit, not after the whole body.
    assert got == ["MISS"] and its[0].taken <= 5
    body = b"".join(result)
    result.close()  # type: ignore[attr-defined]
    assert len(body) == 50_000 and its[0].closed == 1
    assert mw.stats.stores == 0
    mw(environ("/big"), lambda s, h, e=None: None)
    assert len(its) == 2


def test_a_response_the_segment_cannot_take_is_served_anyway(cache: Cache) -> None:
    import os
    body = os.urandom(int(cache.segment.config()["max_value_len"]) + 4096)  # incompressible

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "application/octet-stream"), MAX_PAIR])
        return [body]
    mw, get = setup(cache, app, max_body_size=len(body) * 2)
    r = get("/huge")
    assert r.status == 200 and r.body == body and r.x_cache == "MISS"
    assert mw.stats.store_errors == 1 and get("/huge").x_cache == "MISS"


def test_declared_large_body_is_not_buffered_at_all(cache: Cache) -> None:
    its: list[Tracked] = []
    mw = CacheMiddleware(tracked_app(its, [b"x" * 10] * 10, [MAX_PAIR, ("Content-Length", "100")]),
                         cache, max_body_size=50)
    result = mw(environ("/declared"), lambda s, h, e=None: None)
    assert result is its[0] and its[0].taken == 0  # untouched: file_wrapper etc. survive


def test_event_streams_are_not_buffered(cache: Cache) -> None:
    its: list[Tracked] = []
    mw = CacheMiddleware(tracked_app(its, [b"data: 1\n\n"] * 3,
                                     [MAX_PAIR, ("Content-Type", "text/event-stream")]), cache)
    result = mw(environ("/events"), lambda s, h, e=None: None)
    assert its[0].taken == 0 and b"".join(result).count(b"data") == 3


def test_close_is_called_on_stored_responses(cache: Cache) -> None:
    its: list[Tracked] = []
    _, get = setup(cache, tracked_app(its, [b"a", b"b"], [MAX_PAIR]))
    assert get("/close").body == b"ab"
    assert its[0].closed == 1
    assert get("/close").x_cache == "HIT" and len(its) == 1


def test_close_and_lease_release_when_the_iterable_raises(cache: Cache) -> None:
    its: list[Tracked] = []
    mw = CacheMiddleware(tracked_app(its, [b"a", b"b", b"c"], [MAX_PAIR], fail_at=1), cache,
                         single_flight=True)
    with pytest.raises(RuntimeError, match="boom"):
        mw(environ("/raises"), lambda s, h, e=None: None)
    assert its[0].closed == 1
    key = mw.store.request("GET", "http", "127.0.0.1", "/raises", "", {}).key
    assert cache.segment.get(stampede.lease_key(key, cache.max_key_len)) is None
    assert mw.stats.stores == 0


def test_write_callable_applications(cache: Cache) -> None:
    _, get = setup(cache)
    small = q("write", MAX60, write="1", size="100")
    first = get(small)
    assert first.x_cache == "MISS" and len(first.body) > 100
    hit = get(small)
    assert hit.x_cache == "HIT" and hit.body == first.body
    mw2, get2 = setup(cache, max_body_size=1000)
    large = q("write-large", MAX60, write="1", size="5000")
    r = get2(large)
    assert r.x_cache == "MISS" and r.body.endswith(b"x" * 5000)
    assert get2(large).x_cache == "MISS" and mw2.stats.stores == 0


def test_streamed_generator_responses_are_stored_when_small(cache: Cache) -> None:
    _, get = setup(cache)
    url = q("gen", MAX60, stream="1", size="10000")
    first = get(url)
    assert get(url).x_cache == "HIT" and get(url).body == first.body


def test_error_response_with_exc_info_is_not_stored(cache: Cache) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        cache.incr("n:exc")
        start_response("200 OK", [("Content-Type", "text/plain"), MAX_PAIR])
        try:
            raise ValueError("late failure")
        except ValueError:
            import sys
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                           sys.exc_info())
            return [b"error"]
    mw, get = setup(cache, app)
    r = get("/exc")
    assert r.status == 500 and r.body == b"error" and r.x_cache == "MISS"
    assert get("/exc").status == 500 and mw.stats.stores == 0
    assert cache.incr("n:exc", 0) == 2


# -- single flight and stale-while-revalidate -------------------------------------------------

def wait_until(cond: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.001)
    return False


def test_single_flight_one_computation_for_concurrent_misses(cache: Cache) -> None:
    mw: CacheMiddleware
    computed: list[int] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        computed.append(1)
        # Hold the fill until the other request is waiting for it.
        assert wait_until(lambda: mw.stats.waits >= 1)
        start_response("200 OK", [("Content-Type", "text/plain"), MAX_PAIR])
        return [b"once"]
    mw, get = setup(cache, app, single_flight=True)
    results: list[Resp] = []
    threads = [threading.Thread(target=lambda: results.append(get("/sf"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(computed) == 1
    assert sorted(r.x_cache or "" for r in results) == ["HIT", "MISS"]
    assert all(r.body == b"once" for r in results) and mw.stats.wait_hits == 1


def test_single_flight_does_not_serialise_uncacheable_urls(cache: Cache) -> None:
    mw: CacheMiddleware
    computed: list[int] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        computed.append(1)
        if len(computed) == 1:
            assert wait_until(lambda: mw.stats.waits >= 1)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
        return [b"personal"]
    mw, get = setup(cache, app, single_flight=True, wait_timeout=60)
    threads = [threading.Thread(target=get, args=("/nostore",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # The waiter saw the lease go without an entry and ran the app itself at once.
    assert len(computed) == 2 and mw.stats.wait_timeouts == 0


def test_single_flight_breaks_a_dead_owners_lease(cache: Cache) -> None:
    mw, get = setup(cache, single_flight=True, wait_timeout=60)
    url = q("dead-owner", MAX60)
    path, _, query = url.partition("?")
    key = mw.store.request("GET", "http", "127.0.0.1", path, query, {}).key
    # A lease left by a process that no longer exists (pid 2^22+1 is above pid_max).
    cache.segment.add(stampede.lease_key(key, cache.max_key_len), b"4194305:1", 60)
    assert get(url).x_cache == "MISS"
    assert mw.stats.waits == 1 and mw.stats.wait_timeouts == 0 and computes(cache, url) == 1


def test_stale_while_revalidate_serves_stale_then_refreshes(cache: Cache) -> None:
    mw, get = setup(cache, stale_while_revalidate=30)
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("swr", "Cache-Control:max-age=5")
    first = get(url)
    now[0] += 8
    stale = get(url)  # served stale; the refresh runs in close(), after the response
    assert stale.x_cache == "HIT" and stale.body == first.body and stale.h("Age") == "8"
    assert computes(cache, url) == 2 and mw.stats.refreshes == 1
    fresh = get(url)
    assert fresh.x_cache == "HIT" and fresh.body != first.body and fresh.h("Age") == "0"
    assert computes(cache, url) == 2


def test_stale_is_not_refreshed_twice(cache: Cache) -> None:
    mw, get = setup(cache)
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("swr-lease", "Cache-Control:max-age=5, stale-while-revalidate=30")
    get(url)
    now[0] += 8
    path, _, query = url.partition("?")
    found = mw.store.lookup(mw.store.request("GET", "http", "127.0.0.1", path, query, {}))
    lease = mw.store.lease(found.variant or "")  # another process is refreshing it
    assert lease is not None
    try:
        assert get(url).x_cache == "HIT" and computes(cache, url) == 1
    finally:
        mw.store.release(lease)


def test_must_revalidate_is_never_served_stale(cache: Cache) -> None:
    mw, get = setup(cache, stale_while_revalidate=30)
    now = [time.time()]
    mw.store.clock = lambda: now[0]
    url = q("mr", "Cache-Control:max-age=5, must-revalidate")
    get(url)
    now[0] += 8
    assert get(url).x_cache == "MISS"


# -- a real framework -------------------------------------------------------------------------

def test_flask_application(cache: Cache) -> None:
    flask = pytest.importorskip("flask")
    app = flask.Flask("shmcache_http_test")
    app.secret_key = "test-only"
    hits = {"n": 0}

    @app.get("/page")
    def page() -> Any:
        hits["n"] += 1
        resp = flask.make_response(f"page {hits['n']}")
        resp.headers["Cache-Control"] = "public, max-age=60"
        return resp

    @app.post("/login/<name>")
    def login(name: str) -> Any:
        flask.session["user"] = name
        return "ok"

    @app.get("/me")
    def me() -> Any:
        resp = flask.make_response(f"user {flask.session.get('user')}")
        resp.headers["Cache-Control"] = "max-age=60"
        return resp  # Flask adds Vary: Cookie because the session was read

    mw, get = setup(cache, app.wsgi_app)
    assert get("/page").body == get("/page").body == b"page 1"
    cookies = {}
    for who in ("alice", "bob"):
        r = get(f"/login/{who}", "POST")
        assert r.h("Set-Cookie")
        cookies[who] = (r.h("Set-Cookie") or "").split(";")[0]
    a = get("/me", headers=[("Cookie", cookies["alice"])])
    b = get("/me", headers=[("Cookie", cookies["bob"])])
    assert a.body == b"user alice" and b.body == b"user bob"
    a2 = get("/me", headers=[("Cookie", cookies["alice"])])
    assert a2.x_cache == "HIT" and a2.body == b"user alice"
    assert get("/me").body == b"user None"


def test_stored_errors_and_redirects_never_answer_304(cache: Cache) -> None:
    # RFC 9110 §13.2.1: a condition is evaluated against a 2xx representation only; a
    # stored 404 or 301 is sent as it is, whatever If-None-Match / If-Modified-Since say.
    _, get = setup(cache, default_ttl=60)
    for status in (404, 301):
        url = q(f"no304-{status}", MAX60, status=str(status))
        assert get(url).status == status
        for cond in [("If-None-Match", "*"),
                     ("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")]:
            r = get(url, headers=[cond])
            assert r.status == status and r.x_cache == "HIT", (status, cond)
        assert computes(cache, url) == 1


def test_non_ascii_paths_are_invalidated_by_their_url(cache: Cache) -> None:
    # PEP 3333 delivers the path's UTF-8 bytes as latin-1 text; the key must be built
    # from the UTF-8 text, or an invalidation naming the URL (Location) misses it.
    target = "/caf\u00e9"
    wire = target.encode("utf-8").decode("latin-1")

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            start_response("204 No Content", [("Location", "/caf%C3%A9")])
            return [b""]
        start_response("200 OK", [("Content-Type", "text/plain"), (MAX60.split(":")[0],
                                                                  MAX60.split(":")[1])])
        return [b"menu"]
    _, get = setup(cache, app)
    assert get(wire).x_cache == "MISS" and get(wire).x_cache == "HIT"
    get("/order", "POST")
    assert get(wire).x_cache == "MISS"
