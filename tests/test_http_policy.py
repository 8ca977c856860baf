"""Unit tests of the RFC 9111 rules (shmcache/http/policy.py) and the entry records.

Pure functions on plain values: no segment, no server.  The CVE-named tests pin the
policy side of the Django 2026 cache-middleware regressions; test_http_wsgi.py,
test_http_asgi.py and test_http_server.py repeat them through the middleware.
"""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shmcache.http import policy
from shmcache.http.policy import (
    RequestFacts,
    decide,
    field_value,
    freshness_lifetime,
    if_none_match_matches,
    initial_age,
    normalize_vary,
    not_modified,
    parse_cache_control,
    parse_http_date,
    primary_key,
    strong_etag,
    vary_digest,
)
from shmcache.http.store import Entry, decode_entry, encode_entry

NOW = 1_800_000_000.0
DATE_NOW = "Fri, 15 Jan 2027 08:00:00 GMT"  # == NOW


def req(method: str = "GET", **headers: str) -> RequestFacts:
    return RequestFacts.make(method, "/p", {k.replace("_", "-").lower(): [v]
                                            for k, v in headers.items()})


def dec(headers: list[tuple[str, str]], request: RequestFacts | None = None, status: int = 200,
        default_ttl: float | None = None, **kw: object) -> policy.StoreDecision:
    return decide(request or req(), status, headers, now=NOW, default_ttl=default_ttl,
                  **kw)  # type: ignore[arg-type]


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(policy)
    assert tried > 20 and failures == 0


def test_http_date_parsing() -> None:
    assert parse_http_date(DATE_NOW) == NOW
    # RFC 9110 §5.6.7: the two obsolete formats are accepted too.
    assert parse_http_date("Friday, 15-Jan-27 08:00:00 GMT") == NOW
    assert parse_http_date("Fri Jan 15 08:00:00 2027") == NOW
    assert parse_http_date("0") is None
    assert parse_http_date("") is None
    assert parse_http_date(None) is None


# -- Cache-Control ------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["private", "Private", "PRIVATE", "pRiVaTe"])
def test_cve_2026_8404_private_in_any_case_is_never_stored(spelling: str) -> None:
    d = dec([("Cache-Control", f"{spelling}, max-age=60")])
    assert not d.store and d.reason == "private"


@pytest.mark.parametrize("value", ["NO-STORE", "No-Store, max-age=60", "max-age=60,No-store",
                                   " no-store ", 'no-store="x"'])
def test_cve_2026_8404_no_store_in_any_case(value: str) -> None:
    assert dec([("cache-control", value)]).reason == "no-store"


def test_header_names_are_case_insensitive_too() -> None:
    assert dec([("CACHE-CONTROL", "max-age=60"), ("VARY", "*")]).reason == "vary-star"
    assert dec([("cache-control", "max-age=60"), ("set-COOKIE", "a=1")]).reason == "set-cookie"


def test_directive_arguments_token_and_quoted() -> None:
    cc = parse_cache_control(['max-age="60"', 'no-cache="Set-Cookie, X-Secret",  ,'])
    assert cc.seconds("max-age") == 60
    assert cc.field_names("no-cache") == ("set-cookie", "x-secret")
    # A comma inside a quoted string does not split the directive.
    cc = parse_cache_control('private="a,b", public')
    assert cc.get("private") == "a,b" and cc.has("public")


def test_invalid_and_conflicting_freshness_is_stale() -> None:
    # RFC 9111 §4.2.1: invalid / conflicting values: treat the response as stale.
    assert dec([("Cache-Control", "max-age=abc")]).reason == "stale"
    assert dec([("Cache-Control", "max-age=-1")]).reason == "stale"
    assert dec([("Cache-Control", "max-age=60"), ("Cache-Control", "max-age=30")]).reason \
        == "stale"
    # The same value repeated is no conflict.
    assert dec([("Cache-Control", "max-age=60, max-age=60")]).store


@given(st.lists(st.sampled_from(["no-store", "private", "public", "max-age=5", "no-cache",
                                 "s-maxage=9", "must-revalidate"]), min_size=1, max_size=5),
       st.randoms(use_true_random=False))
def test_parsing_ignores_case_and_whitespace(directives: list[str], rnd: object) -> None:
    import random
    assert isinstance(rnd, random.Random)
    mangled = []
    for d in directives:
        name, eq, arg = d.partition("=")
        name = "".join(c.upper() if rnd.random() < 0.5 else c for c in name)
        mangled.append(" " * rnd.randint(0, 2) + name + eq + arg + "\t" * rnd.randint(0, 1))
    assert parse_cache_control(",".join(mangled)) == parse_cache_control(",".join(directives))


# -- Vary ---------------------------------------------------------------------------------

def test_cve_2026_6907_vary_star_is_never_stored() -> None:
    for vary in ["*", " * ", "Accept, *", "*, Cookie"]:
        d = dec([("Cache-Control", "public, max-age=60"), ("Vary", vary)])
        assert not d.store and d.reason == "vary-star", vary
    # On a second field line too.
    d = dec([("Cache-Control", "max-age=60"), ("Vary", "Accept"), ("Vary", "*")])
    assert d.reason == "vary-star"


def test_cve_2026_48587_padded_vary_values_still_vary() -> None:
    for vary in ["  Cookie", "Cookie  ", "\tCookie\t", " Accept-Language ,  COOKIE ",
                 "cookie,,", ", cookie"]:
        d = dec([("Cache-Control", "public, max-age=60"), ("Vary", vary)])
        assert d.store and "cookie" in d.vary, vary


def test_vary_normalisation() -> None:
    assert normalize_vary([" Accept-Encoding,accept-encoding ", "Accept-Language"]) == \
        ("accept-encoding", "accept-language")
    assert normalize_vary([]) == ()
    assert normalize_vary(["", " , "]) == ()
    # Not a field name: which header would it mean?  Never stored.
    assert normalize_vary(["Accept Language"]) is None
    assert normalize_vary(["Accept;q=1"]) is None


def test_missing_and_empty_headers_give_different_keys() -> None:
    names = ["x-token"]
    missing = vary_digest(names, {})
    empty = vary_digest(names, {"x-token": [""]})
    blank = vary_digest(names, {"x-token": ["  "]})
    assert missing != empty
    assert empty == blank  # whitespace around a field value is not part of it
    assert vary_digest(names, {"x-token": ["a"]}) != empty
    # Several headers: which one is absent matters.
    two = ["x-a", "x-b"]
    assert vary_digest(two, {"x-a": [""]}) != vary_digest(two, {"x-b": [""]})
    # No ambiguity between a value and the next header's encoding.
    assert vary_digest(two, {"x-a": ["1"], "x-b": ["2"]}) != \
        vary_digest(two, {"x-a": ["1\x01x-b2"]})


def test_field_values_combine_lines() -> None:
    assert field_value({"accept": ["a", " b "]}, "accept") == "a, b"
    assert field_value({"cookie": ["a=1", "b=2"]}, "cookie") == "a=1; b=2"
    assert field_value({}, "cookie") is None


def test_cve_2026_48588_cookie_vary_keys_on_the_whole_cookie_header() -> None:
    # A response varying on Cookie is keyed by the entire Cookie header: a request
    # whose cookies differ only in an "unrelated" cookie is another variant, and so is
    # one without cookies.
    names = ["cookie"]
    alice = vary_digest(names, {"cookie": ["session=alice; theme=dark"]})
    bob = vary_digest(names, {"cookie": ["session=bob; theme=dark"]})
    unrelated = vary_digest(names, {"cookie": ["theme=dark"]})
    none = vary_digest(names, {})
    assert len({alice, bob, unrelated, none}) == 4


# -- Authorization / implicit vary (RFC 9111 §3.5) -----------------------------------------

def test_authorization_is_varied_on_unless_shared_explicitly() -> None:
    r = req(authorization="Bearer alice")
    d = dec([("Cache-Control", "max-age=60")], r)
    assert d.store and "authorization" in d.vary
    for cc in ["public, max-age=60", "s-maxage=60", "max-age=60, must-revalidate"]:
        d = dec([("Cache-Control", cc)], r)
        assert d.store and "authorization" not in d.vary, cc


def test_implicit_vary_applies_to_anonymous_requests_too() -> None:
    # So an anonymous response is never served to a request with credentials/cookies.
    d = dec([("Cache-Control", "max-age=60")])
    assert d.vary == ("authorization", "cookie")


def test_rfc_strict_authorization_without_implicit_vary() -> None:
    r = req(authorization="Bearer alice")
    d = dec([("Cache-Control", "max-age=60")], r, implicit_vary=())
    assert not d.store and d.reason == "authorization"
    assert dec([("Cache-Control", "public, max-age=60")], r, implicit_vary=()).store
    assert dec([("Cache-Control", "max-age=60")], req(), implicit_vary=()).vary == ()


# -- storability ----------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "reason"), [
    ([("Cache-Control", "no-cache, max-age=60")], "no-cache"),
    ([("Cache-Control", "max-age=60"), ("Set-Cookie", "sid=1")], "set-cookie"),
    ([], "no-freshness"),
    ([("Cache-Control", "max-age=0")], "stale"),
    ([("Cache-Control", "max-age=10"), ("Age", "10")], "stale"),
])
def test_not_stored(headers: list[tuple[str, str]], reason: str) -> None:
    assert dec(headers).reason == reason


def test_methods_and_statuses() -> None:
    ok = [("Cache-Control", "max-age=60")]
    assert dec(ok, req("HEAD")).reason == "method"
    assert dec(ok, req("POST")).reason == "method"
    assert dec(ok, req(cache_control="No-Store")).reason == "request-no-store"
    for status in (206, 304, 101, 600):
        assert dec(ok, status=status).reason == "status", status
    assert dec(ok, status=201).store  # explicit freshness: any final status (§3)
    assert dec([], status=201, default_ttl=60).reason == "no-freshness"  # not heuristic
    assert dec([("Cache-Control", "public")], status=201, default_ttl=60).store
    assert dec([], status=404, default_ttl=60).store


def test_freshness_order() -> None:
    def life(*headers: tuple[str, str], default: float | None = None) -> float | None:
        hs = list(headers)
        return freshness_lifetime(200, parse_cache_control(
            [v for k, v in hs if k == "Cache-Control"]), hs, NOW, default)

    cc = ("Cache-Control", "max-age=60, s-maxage=600")
    expires = ("Expires", "Fri, 15 Jan 2027 09:00:00 GMT")
    assert life(cc, expires) == 600  # §5.2.2.10: s-maxage first in a shared cache
    assert life(("Cache-Control", "max-age=60"), expires) == 60
    assert life(expires, ("Date", DATE_NOW)) == 3600
    assert life(expires) == 3600  # no Date: the time we received it
    assert life(("Expires", "0")) == 0  # §5.3: invalid means already expired
    assert life(expires, ("Expires", "Fri, 15 Jan 2027 10:00:00 GMT")) == 0
    assert life(default=30) == 30
    assert life(("Cache-Control", "max-age=60"), default=30) == 60
    assert life(("Cache-Control", "max-age=99999999999")) == policy.DELTA_MAX


def test_age_is_corrected_initial_age() -> None:
    assert initial_age([], NOW) == 0
    assert initial_age([("Age", "30")], NOW) == 30
    assert initial_age([("Date", "Fri, 15 Jan 2027 07:59:00 GMT")], NOW) == 60
    assert initial_age([("Date", "Fri, 15 Jan 2027 07:59:00 GMT"), ("Age", "90")], NOW) == 90
    assert initial_age([("Age", "junk")], NOW) == 0
    d = dec([("Cache-Control", "max-age=100"), ("Age", "40")])
    assert d.ttl == 60 and d.age == 40


def test_stale_while_revalidate_window() -> None:
    assert dec([("Cache-Control", "max-age=5")], stale_while_revalidate=30).stale == 30
    # The response's own directive (RFC 5861) wins over the configured one.
    assert dec([("Cache-Control", "max-age=5, stale-while-revalidate=7")],
               stale_while_revalidate=30).stale == 7
    # §4.2.4: must-revalidate / proxy-revalidate forbid serving stale.
    for cc in ["max-age=5, must-revalidate", "max-age=5, Proxy-Revalidate"]:
        assert dec([("Cache-Control", cc)], stale_while_revalidate=30).stale == 0


def test_dropped_fields() -> None:
    d = dec([("Cache-Control", 'max-age=60, no-cache="X-Secret"'), ("X-Secret", "s"),
             ("Connection", "X-Hop"), ("X-Hop", "1")])
    assert d.store
    assert {"x-secret", "x-hop", "connection", "transfer-encoding", "age"} <= d.drop


def test_bypass_reasons() -> None:
    assert req().bypass_reason() is None
    assert req(content_length="0").bypass_reason() is None
    assert req(content_length="5").bypass_reason() == "request-content"
    assert req(transfer_encoding="chunked").bypass_reason() == "request-content"
    assert req(range="bytes=0-1").bypass_reason() == "range"
    assert req(if_match='"x"').bypass_reason() == "if-match"
    assert req("POST").bypass_reason() == "method"


# -- keys -----------------------------------------------------------------------------------

def test_primary_key() -> None:
    k = primary_key("http:", "HTTP", "Example.com", "/a b", "q=1&Q=2")
    assert k == "http:http://example.com/a%20b?q=1&Q=2"
    # The query string is part of the key, as sent (order and case matter).
    assert primary_key("p:", "http", "h", "/a", "x=1&y=2") != \
        primary_key("p:", "http", "h", "/a", "y=2&x=1")
    # A decoded "?" in the path cannot be confused with the query separator.
    assert primary_key("p:", "http", "h", "/a?b", "") != primary_key("p:", "http", "h", "/a", "b")
    assert primary_key("p:", "http", "h", "/a%3F", "") != \
        primary_key("p:", "http", "h", "/a?", "")
    # Paths are case-sensitive, hosts are not.
    assert primary_key("p:", "http", "h", "/A", "") != primary_key("p:", "http", "h", "/a", "")
    assert primary_key("p:", "http", "H", "/a", "") == primary_key("p:", "http", "h", "/a", "")


# -- validators -----------------------------------------------------------------------------

def test_strong_etag_is_deterministic_and_representation_specific() -> None:
    a = strong_etag(b"body", [("Content-Type", "text/html")])
    assert a == strong_etag(b"body", [("content-type", "text/html")])
    assert a.startswith('"') and a.endswith('"') and not a.startswith("W/")
    assert a != strong_etag(b"body!", [("Content-Type", "text/html")])
    assert a != strong_etag(b"body", [("Content-Type", "text/html"),
                                      ("Content-Encoding", "gzip")])


def test_if_none_match() -> None:
    assert if_none_match_matches('"a"', '"a"')
    assert if_none_match_matches('W/"a"', '"a"')  # weak comparison (RFC 9110 §13.1.2)
    assert if_none_match_matches('"x", W/"a" , "y"', '"a"')
    assert if_none_match_matches("*", '"anything"')
    assert not if_none_match_matches('"b"', '"a"')
    assert not if_none_match_matches('"a"', None)
    assert not if_none_match_matches("garbage", '"a"')


def test_not_modified() -> None:
    stored = [("ETag", '"e1"'), ("Last-Modified", "Fri, 15 Jan 2027 07:00:00 GMT")]
    assert not_modified(req(if_none_match='"e1"'), stored)
    assert not not_modified(req(if_none_match='"e2"'), stored)
    # If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2).
    assert not not_modified(req(if_none_match='"e2"', if_modified_since=DATE_NOW), stored)
    assert not_modified(req(if_modified_since=DATE_NOW), stored)
    assert not not_modified(req(if_modified_since="Fri, 15 Jan 2027 06:00:00 GMT"), stored)
    assert not_modified(req("HEAD", if_none_match='"e1"'), stored)
    assert not not_modified(req("POST", if_none_match='"e1"'), stored)
    # No Last-Modified: the stored Date stands in (RFC 9111 §4.3.2).
    assert not_modified(req(if_modified_since=DATE_NOW), [("Date", DATE_NOW)])


def test_invalidation_rules() -> None:
    assert policy.invalidates("POST", 200) and policy.invalidates("delete", 302)
    assert not policy.invalidates("POST", 404) and not policy.invalidates("PUT", 500)
    assert not policy.invalidates("GET", 200) and not policy.invalidates("OPTIONS", 200)


# -- entry records --------------------------------------------------------------------------

def test_entry_round_trip() -> None:
    e = Entry(404, "Not Found", (("Content-Type", "text/plain; charset=utf-8"),
                                 ("X-Odd", "caf\xe9 \udcff"), ("X-Empty", "")),
              b"\x00body" * 100, NOW, 3.5, NOW + 60, NOW + 90)
    assert decode_entry(encode_entry(e)) == e


def test_garbage_is_not_an_entry() -> None:
    e = Entry(200, "OK", (("A", "b"),), b"x", NOW, 0, NOW, NOW)
    data = encode_entry(e)
    for bad in [None, "str", b"", b"SHR1", data[:20], data[:-1], data + b"x", b"XXXX" + data[4:],
                {"a": 1}]:
        assert decode_entry(bad) is None, bad
