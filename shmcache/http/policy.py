"""RFC 9111 rules for a *shared* cache, as pure functions: no I/O, no clock, no cache.

This module owns the decisions of the HTTP middleware and nothing else: parsing
``Cache-Control`` (case-insensitively, RFC 9111 §5.2), whether a response may be stored
(§3), how long it is fresh (§4.2), how old it is (§4.2.3), which request headers select
it (``Vary``, §4.1), the cache key of a request (§2), which requests invalidate stored
responses (§4.4), and conditional requests answered from a stored response (§4.3.2, RFC
9110 §13). The middleware (``wsgi.py``, ``asgi.py``) and the entry store (``store.py``)
call these; everything here is testable with plain values.

Header values are ``str`` as PEP 3333 delivers them (ISO-8859-1 decoded bytes); the
ASGI side decodes its bytes the same way, so both front ends reach the same decisions
and the same keys.

Example::

    >>> cc = parse_cache_control(["Public, MAX-AGE=60"])
    >>> cc.has("public"), cc.seconds("max-age")
    (True, 60)
    >>> normalize_vary(["  Accept-Encoding ,COOKIE", "accept-encoding"])
    ('accept-encoding', 'cookie')
    >>> normalize_vary(["Cookie, *"]) is None
    True
"""

from __future__ import annotations

import email.utils
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from typing import Final
from urllib.parse import quote

__all__ = [
    "CacheControl", "Headers", "RequestFacts", "StoreDecision", "parse_cache_control",
    "normalize_vary", "field_value", "vary_digest", "primary_key", "parse_http_date",
    "parse_delta_seconds", "freshness_lifetime", "initial_age", "decide",
    "parse_entity_tags", "if_none_match_matches", "not_modified", "is_safe_method",
    "invalidates", "strong_etag", "HEURISTIC_STATUSES", "HOP_BY_HOP", "CACHEABLE_METHODS",
    "DELTA_MAX",
]

#: Request header name (lowercase) -> its field values, in arrival order; a header that
#: was not sent is absent.  Absent and ``[""]`` (sent, empty) are different requests.
Headers = Mapping[str, Sequence[str]]

#: RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2^31.
DELTA_MAX: Final = 2 ** 31

#: RFC 9110 §15.1 / RFC 9111 §4.2.2: status codes whose responses are "heuristically
#: cacheable" -- the only ones a configured default TTL may apply to (without ``public``).
#: 206 is excluded although listed: this cache does not store or combine partial content
#: (RFC 9111 §3.3-3.4).
HEURISTIC_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})

#: Methods whose responses are stored.  HEAD is answered *from* stored GET responses
#: (RFC 9110 §9.3.2: the same header section without content) but never stored itself.
CACHEABLE_METHODS: Final = frozenset({"GET"})

#: RFC 9110 §9.2.1 safe methods; every other method invalidates (RFC 9111 §4.4).
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})

#: RFC 9111 §3.1: a cache does not store the connection-specific fields (RFC 9110 §7.6.1).
#: ``Age`` and ``X-Cache`` are recomputed per response by this cache.
HOP_BY_HOP: Final = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                               "transfer-encoding", "upgrade", "proxy-authenticate",
                               "proxy-authorization", "age", "x-cache"})

# RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_ETAG: Final = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')
_OWS: Final = " \t"


# -- Cache-Control (RFC 9111 §5.2) --------------------------------------------------------

def _split_list(value: str) -> list[str]:
    """Split a comma-separated field value (RFC 9110 §5.6.1), commas inside
    quoted-strings (RFC 9110 §5.6.4) included in their element."""
    out: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    out.append("".join(buf))
    return out


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


@dataclass(frozen=True)
class CacheControl:
    """Parsed ``Cache-Control`` directives: lowercase names -> argument (``None`` when
    the directive has none).  ``conflicts`` names directives that appeared more than
    once with different arguments (RFC 9111 §4.2.1: such freshness is treated as
    stale; here: the response is not stored).

    >>> cc = parse_cache_control(['no-cache="Set-Cookie, X-User"', "Max-Age=5"])
    >>> cc.get("no-cache"), cc.seconds("max-age"), cc.seconds("s-maxage")
    ('Set-Cookie, X-User', 5, None)
    """

    directives: Mapping[str, str | None] = field(default_factory=dict)
    conflicts: frozenset[str] = frozenset()

    def has(self, name: str) -> bool:
        """True if the directive is present (with or without an argument)."""
        return name in self.directives

    def get(self, name: str) -> str | None:
        """The directive's argument, unquoted; ``None`` if absent or argument-less."""
        return self.directives.get(name)

    def seconds(self, name: str) -> int | None:
        """A delta-seconds argument (RFC 9111 §1.2.2); ``None`` if absent; ``-1`` if
        present but invalid (no argument, not a non-negative integer, or conflicting)."""
        if name not in self.directives:
            return None
        if name in self.conflicts:
            return -1
        return parse_delta_seconds(self.directives[name])

    def field_names(self, name: str) -> tuple[str, ...]:
        """The lowercase field names of a qualified ``no-cache="a, b"`` / ``private``."""
        arg = self.directives.get(name)
        if not arg:
            return ()
        return tuple(n.strip(_OWS).lower() for n in arg.split(",") if n.strip(_OWS))


def parse_cache_control(values: Iterable[str] | str | None) -> CacheControl:
    """Parse every ``Cache-Control`` field line of a message.

    Directive names are case-insensitive (RFC 9111 §5.2: "Cache directives are
    identified by a token, to be compared case-insensitively") -- matching them
    case-sensitively let ``Private``/``NO-STORE`` responses be stored (CVE-2026-8404).
    Arguments may be tokens or quoted-strings (§5.2: recipients accept both forms).
    Empty list elements and surrounding whitespace are ignored (RFC 9110 §5.6.1).

    >>> parse_cache_control("NO-STORE").has("no-store")
    True
    >>> parse_cache_control(["max-age=60", "max-age=120"]).seconds("max-age")
    -1
    """
    if values is None:
        return CacheControl()
    if isinstance(values, str):
        values = [values]
    out: dict[str, str | None] = {}
    conflicts: set[str] = set()
    for line in values:
        for element in _split_list(line):
            element = element.strip(_OWS)
            if not element:
                continue
            name, eq, arg = element.partition("=")
            name = name.strip(_OWS).lower()
            if not name:
                continue
            value = _unquote(arg.strip(_OWS)) if eq else None
            if name in out and out[name] != value:
                conflicts.add(name)
            out.setdefault(name, value)
    return CacheControl(out, frozenset(conflicts))


def parse_delta_seconds(value: str | None) -> int:
    """RFC 9111 §1.2.2 delta-seconds; ``-1`` when invalid (absent, negative, not
    digits), capped at 2^31.

    >>> parse_delta_seconds("60"), parse_delta_seconds("-5"), parse_delta_seconds("1e3")
    (60, -1, -1)
    """
    if value is None or not value.isascii() or not value.isdigit():
        return -1
    return min(int(value), DELTA_MAX)


# -- Vary (RFC 9111 §4.1) -----------------------------------------------------------------

def normalize_vary(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """The request header names a response varies on: lowercase, sorted, unique.

    ``None`` means the response can never be matched (RFC 9111 §4.1: "A stored response
    with a Vary header field value containing a member "*" always fails to match") and so
    must not be stored (CVE-2026-6907).  An element that is not a valid field name is
    treated the same way: we cannot know which request header it meant, and guessing
    could serve one user's variant to another.  Whitespace around members is optional
    whitespace (RFC 9110 §5.6.1) and is stripped: a padded `` Cookie`` still varies on
    Cookie (CVE-2026-48587).

    >>> normalize_vary(["Accept-Language", ""]), normalize_vary([" * "])
    (('accept-language',), None)
    """
    names: set[str] = set()
    for line in values or ():
        for member in line.split(","):
            member = member.strip(_OWS)
            if not member:
                continue
            if member == "*" or not _TOKEN.match(member):
                return None
            names.add(member.lower())
    return tuple(sorted(names))


def field_value(headers: Headers, name: str) -> str | None:
    """The normalised value of request header ``name`` for matching (RFC 9111 §4.1:
    values may be normalised in ways known to keep their semantics): its field lines
    combined (RFC 9110 §5.3; ``Cookie`` lines with ``"; "``, RFC 9113 §8.2.3), each
    stripped of surrounding whitespace.  ``None`` if the header was not sent, ``""`` if
    it was sent empty: the two must select different responses.

    >>> field_value({"accept": [" text/html ", "*/*"]}, "accept")
    'text/html, */*'
    >>> field_value({"x-a": [""]}, "x-a"), field_value({}, "x-a")
    ('', None)
    """
    lines = headers.get(name)
    if lines is None:
        return None
    sep = "; " if name == "cookie" else ", "
    return sep.join(v.strip(_OWS) for v in lines)


def vary_digest(names: Sequence[str], headers: Headers) -> str:
    """A digest of the request's values of the ``names`` headers: the secondary key
    (RFC 9111 §4.1).  A missing header and an empty one are encoded differently, so
    ``X-A`` absent and ``X-A:`` (empty) never share an entry.

    >>> vary_digest(["x-a"], {}) != vary_digest(["x-a"], {"x-a": [""]})
    True
    """
    h = hashlib.blake2b(digest_size=16)
    for name in names:
        value = field_value(headers, name)
        h.update(name.encode("ascii", "replace"))
        if value is None:
            h.update(b"\x00")  # absent
        else:
            raw = value.encode("utf-8", "surrogatepass")
            h.update(b"\x01" + len(raw).to_bytes(4, "big") + raw)
    return h.hexdigest()


# -- keys (RFC 9111 §2) -------------------------------------------------------------------

# Characters left as they are when the decoded path is re-encoded for the key: RFC 3986
# pchar and "/", so "?" and "#" (and "%") are always escaped and cannot be confused with
# the query separator.
_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"


def primary_key(prefix: str, scheme: str, host: str, path: str, query: str) -> str:
    """The primary cache key: the target URI (RFC 9111 §2: "the cache key consists of
    the request method and target URI"; only GET is stored, so the method is implied).
    ``path`` is the percent-decoded path as WSGI/ASGI deliver it; it is re-encoded so a
    decoded ``?`` cannot move text between path and query.  The query string is part of
    the key exactly as sent.

    >>> primary_key("http:", "http", "Example.COM:8000", "/a?b", "x=1")
    'http:http://example.com:8000/a%3Fb?x=1'
    """
    return (f"{prefix}{scheme.lower()}://{host.lower()}"
            f"{quote(path, safe=_PATH_SAFE, encoding='utf-8', errors='surrogateescape')}"
            f"?{query}")


# -- dates, freshness, age (RFC 9111 §4.2) ------------------------------------------------

def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7, the three formats) as epoch seconds; ``None`` if
    absent or invalid.

    >>> parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT")
    784111777.0
    >>> parse_http_date("0") is None
    True
    """
    if not value:
        return None
    try:
        dt = email.utils.parsedate_to_datetime(value.strip(_OWS))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if dt.tzinfo is None:  # asctime-date carries no zone: HTTP dates are GMT
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _one(headers: Sequence[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def freshness_lifetime(status: int, cc: CacheControl, headers: Sequence[tuple[str, str]],
                       now: float, default_ttl: float | None) -> float | None:
    """The freshness lifetime of a response in seconds (RFC 9111 §4.2.1), or ``None``
    when it has none (not storable).

    Shared-cache order: ``s-maxage`` (§5.2.2.10), ``max-age`` (§5.2.2.1), ``Expires``
    minus ``Date`` (§5.3), then the configured default as the heuristic (§4.2.2), only
    for heuristically cacheable statuses or ``public`` responses.  Invalid or
    conflicting explicit values make the response stale (§4.2.1: "caches are encouraged
    to consider responses that have invalid freshness information ... to be stale"):
    lifetime 0.

    >>> freshness_lifetime(200, parse_cache_control("max-age=60, s-maxage=5"), [], 0, None)
    5.0
    >>> freshness_lifetime(200, parse_cache_control(""), [], 0, 30)
    30.0
    >>> freshness_lifetime(201, parse_cache_control(""), [], 0, 30) is None
    True
    """
    for name in ("s-maxage", "max-age"):
        secs = cc.seconds(name)
        if secs is not None:
            return float(max(secs, 0))
    expires = _one(headers, "expires")
    if expires:
        if len(set(expires)) > 1:  # §4.2.1: several differing Expires: stale
            return 0.0
        exp = parse_http_date(expires[0])
        if exp is None:  # §5.3: an invalid date (e.g. "0") means already expired
            return 0.0
        dates = _one(headers, "date")
        date = parse_http_date(dates[0]) if dates else None
        return max(0.0, exp - (date if date is not None else now))
    if default_ttl is not None and (status in HEURISTIC_STATUSES or cc.has("public")):
        return max(0.0, float(default_ttl))
    return None


def initial_age(headers: Sequence[tuple[str, str]], response_time: float) -> float:
    """``corrected_initial_age`` of RFC 9111 §4.2.3 for a response received at
    ``response_time`` from an in-process origin (request and response time coincide,
    so ``response_delay`` is 0).

    >>> initial_age([("Age", "10")], 100.0)
    10.0
    """
    ages = _one(headers, "age")
    age_value = parse_delta_seconds(ages[0].strip(_OWS)) if ages else -1
    dates = _one(headers, "date")
    date = parse_http_date(dates[0]) if dates else None
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    return max(apparent, float(max(age_value, 0)))


# -- requests -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestFacts:
    """What the policy needs to know about a request.  ``headers`` maps lowercase names
    to their field lines (absent = not sent)."""

    method: str
    path: str
    headers: Headers
    cc: CacheControl

    @classmethod
    def make(cls, method: str, path: str, headers: Headers) -> RequestFacts:
        """Build the facts, parsing the request's ``Cache-Control``."""
        return cls(method.upper(), path, headers, parse_cache_control(headers.get("cache-control")))

    def header(self, name: str) -> str | None:
        """The normalised value of one header (:func:`field_value`)."""
        return field_value(self.headers, name)

    def bypass_reason(self) -> str | None:
        """Why this request must neither be answered from nor fill the cache, if so.

        A GET with content (its meaning is undefined, RFC 9110 §9.3.1, and the key
        ignores it), range and precondition requests other than If-None-Match /
        If-Modified-Since (this cache never stores partial content, RFC 9111 §3.3), and
        protocol upgrades go straight to the application.
        """
        if self.method not in ("GET", "HEAD"):
            return "method"
        h = self.headers
        cl = field_value(h, "content-length")
        if "transfer-encoding" in h or (cl is not None and cl not in ("", "0")):
            return "request-content"
        for name in ("range", "if-range", "if-match", "if-unmodified-since", "upgrade"):
            if name in h:
                return name
        return None


# -- storing (RFC 9111 §3) ----------------------------------------------------------------

@dataclass(frozen=True)
class StoreDecision:
    """Whether and how to store one response.

    ``ttl`` is how long it stays fresh from now (lifetime minus initial age), ``age``
    its initial age, ``stale`` the stale-while-revalidate window after that, ``vary``
    the request headers selecting it (the response's ``Vary`` plus implicit ones),
    ``drop`` response header names not to store, ``reason`` why not when not.
    """

    store: bool
    reason: str = ""
    ttl: float = 0.0
    age: float = 0.0
    stale: float = 0.0
    vary: tuple[str, ...] = ()
    drop: frozenset[str] = frozenset()


def _no(reason: str) -> StoreDecision:
    return StoreDecision(False, reason)


def decide(req: RequestFacts, status: int, headers: Sequence[tuple[str, str]], *,
           now: float, default_ttl: float | None, stale_while_revalidate: float = 0.0,
           implicit_vary: Sequence[str] = ("authorization", "cookie")) -> StoreDecision:
    """May a shared cache store this response to this request, and how (RFC 9111 §3)?

    ``headers`` are the response's ``(name, value)`` pairs.  ``implicit_vary`` names
    request headers that select the stored response even when ``Vary`` omits them,
    unless the response says ``public``, ``s-maxage`` or ``must-revalidate`` -- the
    directives RFC 9111 §3.5 requires before a shared cache may reuse a response to an
    ``Authorization`` request for other requests.  Listing ``authorization`` there keys
    such responses by the credentials instead of refusing them (the middleware's
    default); without it, §3.5 applies literally and they are not stored.

    >>> req = RequestFacts.make("GET", "/", {})
    >>> decide(req, 200, [("Cache-Control", "Private, max-age=60")], now=0,
    ...        default_ttl=None).reason
    'private'
    >>> d = decide(req, 200, [("Cache-Control", "max-age=60")], now=0, default_ttl=None)
    >>> d.store, d.ttl, d.vary
    (True, 60.0, ('authorization', 'cookie'))
    """
    # §3: "the request method is understood by the cache" and cacheable; we store GET.
    if req.method not in CACHEABLE_METHODS:
        return _no("method")
    # §5.2.1.5: request no-store: "MUST NOT store any part of ... any response to it".
    if req.cc.has("no-store"):
        return _no("request-no-store")
    # §3: "the response status code is final" and understood; 206 needs range support
    # (§3.3) and 304 is a validation, not a representation.
    if not 200 <= status <= 599 or status in (206, 304):
        return _no("status")
    cc = parse_cache_control(_one(headers, "cache-control"))
    # §5.2.2.5 no-store; §5.2.2.7 private: "a shared cache MUST NOT store the response"
    # (the qualified form only forbids the named fields; refusing it whole is simpler
    # and never wrong).
    if cc.has("no-store"):
        return _no("no-store")
    if cc.has("private"):
        return _no("private")
    # §5.2.2.4: unqualified no-cache forbids reuse without validation at the origin on
    # every request; storing it would never save a call of the application.  The
    # qualified form forbids reusing only the named fields: they are not stored.
    drop = set(HOP_BY_HOP)
    if cc.has("no-cache"):
        names = cc.field_names("no-cache")
        if not names:
            return _no("no-cache")
        drop.update(names)
    # §3.1: fields named by Connection are connection-specific.
    for line in _one(headers, "connection"):
        drop.update(n.strip(_OWS).lower() for n in line.split(",") if n.strip(_OWS))
    # Not RFC 9111 (which allows it), but the rule of every shared cache since cookies:
    # a Set-Cookie is one client's state, and replaying it to others hijacks sessions.
    if _one(headers, "set-cookie"):
        return _no("set-cookie")
    vary = normalize_vary(_one(headers, "vary"))
    if vary is None:  # §4.1: Vary "*" never matches (CVE-2026-6907)
        return _no("vary-star")
    shared_ok = cc.has("public") or cc.has("s-maxage") or cc.has("must-revalidate")
    if not shared_ok:
        implicit = {n.lower() for n in implicit_vary}
        # §3.5: a response to a request with Authorization is not reused for others
        # unless the response allows it; keyed by the credentials, it never is.
        if "authorization" in req.headers and "authorization" not in implicit:
            return _no("authorization")
        vary = tuple(sorted(set(vary) | implicit))
    lifetime = freshness_lifetime(status, cc, headers, now, default_ttl)
    if lifetime is None:
        return _no("no-freshness")
    age = initial_age(headers, now)
    ttl = lifetime - age
    if ttl <= 0:
        return _no("stale")
    # §4.2.4: must-revalidate / proxy-revalidate (shared caches) forbid serving stale.
    stale = 0.0
    if not (cc.has("must-revalidate") or cc.has("proxy-revalidate")):
        swr = cc.seconds("stale-while-revalidate")  # RFC 5861 §3
        stale = float(swr) if swr is not None and swr >= 0 else max(0.0, stale_while_revalidate)
    return StoreDecision(True, "", ttl, age, stale, vary, frozenset(drop))


# -- invalidation (RFC 9111 §4.4) ---------------------------------------------------------

def is_safe_method(method: str) -> bool:
    """RFC 9110 §9.2.1."""
    return method.upper() in _SAFE_METHODS


def invalidates(method: str, status: int) -> bool:
    """RFC 9111 §4.4: "A cache MUST invalidate the target URI ... when it receives a
    non-error status code in response to an unsafe request method"."""
    return not is_safe_method(method) and 200 <= status < 400


# -- validators and conditional requests (RFC 9110 §8.8.3, §13) ---------------------------

def strong_etag(body: bytes, headers: Sequence[tuple[str, str]]) -> str:
    """A strong entity tag from the representation: content plus the metadata that
    changes its bytes' meaning (type, coding, language), so every process computes the
    same tag for the same representation (RFC 9110 §8.8.3: strong validators change
    with the representation data).

    >>> strong_etag(b"hi", [("Content-Type", "text/plain")])
    '"77bc6782d63a51ab2b01ba95e4e221bf"'
    """
    h = hashlib.blake2b(digest_size=16)
    for name in ("content-type", "content-encoding", "content-language"):
        for v in _one(headers, name):
            h.update(f"{name}:{v.strip(_OWS)}\n".encode("utf-8", "surrogatepass"))
    h.update(b"\n")
    h.update(body)
    return f'"{h.hexdigest()}"'


def parse_entity_tags(value: str) -> list[tuple[bool, str]]:
    """The entity-tags of an ``If-None-Match`` list (RFC 9110 §8.8.3) as ``(weak,
    opaque-tag)`` pairs; parsing stops at the first invalid member (``*`` is handled
    by :func:`if_none_match_matches`).

    >>> parse_entity_tags('W/"a", "b"')
    [(True, '"a"'), (False, '"b"')]
    """
    out: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        m = _ETAG.match(value, pos)
        if m is None or m.end() == pos:
            break
        out.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return out


def if_none_match_matches(value: str, etag: str | None) -> bool:
    """RFC 9110 §13.1.2 with the weak comparison it mandates: ``*`` matches any current
    representation, otherwise any listed tag whose opaque part equals ``etag``'s.

    >>> if_none_match_matches('W/"x", "y"', '"x"'), if_none_match_matches("*", '"q"')
    (True, True)
    """
    if value.strip(_OWS) == "*":
        return True
    if not etag:
        return False
    mine = etag.strip(_OWS)
    if mine.startswith("W/"):
        mine = mine[2:]
    return any(tag == mine for _, tag in parse_entity_tags(value))


def not_modified(req: RequestFacts, headers: Sequence[tuple[str, str]],
                 received: float | None = None, status: int = 200) -> bool:
    """Would the conditional GET/HEAD ``req`` get a 304 from a response with these
    headers (RFC 9111 §4.3.2, RFC 9110 §13.2.2)?  If-None-Match wins over
    If-Modified-Since; the latter compares ``Last-Modified``, else ``Date``, else
    ``received`` (when the cache received the response).  Only a 2xx (and 304)
    selected representation can be answered with 304 (RFC 9110 §13.2.1): a stored
    404 or 301 is sent as it is.
    """
    if req.method not in ("GET", "HEAD") or not (200 <= status < 300 or status == 304):
        return False
    inm = req.header("if-none-match")
    if inm is not None:
        etags = _one(headers, "etag")
        return if_none_match_matches(inm, etags[0] if etags else None)
    ims = parse_http_date(req.header("if-modified-since"))
    if ims is None:
        return False
    last = _one(headers, "last-modified") or _one(headers, "date")
    when = parse_http_date(last[0]) if last else received
    return when is not None and when <= ims
