"""The HTTP cache behind real servers, over real sockets on 127.0.0.1.

* gunicorn, 2 sync workers, serving ``http_apps:wsgi_application`` (CacheMiddleware);
* uvicorn, 2 worker processes, serving ``http_apps:asgi_application``
  (ASGICacheMiddleware).

Both get the segment name through ``SHMCACHE_NAME``; this process attaches the same
segment to read the application's computation counters and to signal its blocking
endpoints.  Which worker answers is made deterministic rather than hoped for: a
``/block`` request occupies one worker (a sync worker, or an event loop blocked on
purpose), so the next connection can only be accepted by the other one.  Every wait
polls a condition with a deadline.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
from _helpers import new_name
from http_apps import arrivals, computes

from shmcache import MISSING, Cache, CacheConfig, unlink_segment

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DEADLINE = 30.0


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def x_cache(self) -> str | None:
        return self.headers.get("X-Cache")

    @property
    def served_by(self) -> int:
        return int(self.headers["X-Served-By"])


@dataclass
class Server:
    kind: str
    port: int
    cache: Cache
    proc: subprocess.Popen[bytes]

    def fetch(self, path_qs: str, method: str = "GET",
              headers: list[tuple[str, str]] | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE)
        try:
            conn.putrequest(method, path_qs, skip_accept_encoding=True)
            for k, v in headers or []:
                conn.putheader(k, v)
            conn.endheaders()
            r = conn.getresponse()
            return Reply(r.status, r.headers, r.read())
        finally:
            conn.close()


def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _env(name: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"SHMCACHE_NAME": name, "SHMCACHE_SIZE_MB": "16",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS),
                                                            env.get("PYTHONPATH")]))})
    return env


def _start_gunicorn(name: str, log: int) -> tuple[subprocess.Popen[bytes], int]:
    # The test binds the socket and hands gunicorn its descriptor: no free-port race.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    fd = sock.fileno()
    os.set_inheritable(fd, True)
    try:
        proc = subprocess.Popen(
            [str(BIN / "gunicorn"), "--workers", "2", "--worker-class", "sync",
             "--bind", f"fd://{fd}", "--timeout", "60", "--graceful-timeout", "5",
             "--log-level", "warning", "http_apps:wsgi_application"],
            pass_fds=(fd,), env=_env(name), cwd=TESTS, stdout=log, stderr=log)
    finally:
        sock.close()
    return proc, port


def _start_uvicorn(name: str, log: int) -> tuple[subprocess.Popen[bytes], int]:
    # uvicorn --fd takes Unix sockets only: probe a free port (a tiny race, retried).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(BIN / "uvicorn"), "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--log-level", "warning", "--no-access-log", "http_apps:asgi_application"],
        env=_env(name), cwd=TESTS, stdout=log, stderr=log)
    return proc, port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # gunicorn's master / uvicorn's supervisor
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module", params=["gunicorn", "uvicorn"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    kind = request.param
    name = new_name(f"http-{kind}-")
    cache = Cache(CacheConfig(name=name, c_memory_size_mb=16))
    proc: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryFile() as logf:
        try:
            for _attempt in range(3):
                start = _start_gunicorn if kind == "gunicorn" else _start_uvicorn
                proc, port = start(name, logf.fileno())
                srv = Server(kind, port, cache, proc)

                def ready(srv: Server = srv) -> bool:
                    if srv.proc.poll() is not None:
                        return True  # exited (a port taken under uvicorn): retried below
                    if cache.incr("workers_started", 0) < 2:
                        return False
                    try:
                        return srv.fetch("/health").status == 200
                    except OSError:
                        return False
                wait_for(ready, f"{kind} to start")
                if proc.poll() is None:
                    break
                cache.incr("workers_started", -cache.incr("workers_started", 0))
            else:
                logf.seek(0)
                raise AssertionError(f"{kind} did not start:\n{logf.read().decode()[-3000:]}")
            yield srv
        finally:
            if proc is not None:
                _stop(proc)
            cache.close()
            unlink_segment(name)


def url(*headers: str, **params: str) -> str:
    """A URL of the test application no other test uses, answering with ``headers``."""
    pairs = [("t", uuid.uuid4().hex[:12])] + [("h", h) for h in headers] + list(params.items())
    return "/r?" + urlencode(pairs)


class Blocker:
    """Occupies one worker with ``/block`` until :meth:`release`."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.token = uuid.uuid4().hex
        self.reply: list[Reply] = []
        self.thread = threading.Thread(
            target=lambda: self.reply.append(srv.fetch(f"/block?t={self.token}")))
        self.thread.start()
        wait_for(lambda: srv.cache.get("blocked:" + self.token, MISSING) is not MISSING,
                 "a worker to block")
        self.pid = int(srv.cache.get("blocked:" + self.token))

    def release(self) -> None:
        self.srv.cache.set("release:" + self.token, 1)
        self.thread.join(DEADLINE)
        assert self.reply and self.reply[0].body.startswith(b"released=True")


MAX60 = "Cache-Control:max-age=60"
PUB60 = "Cache-Control:public, max-age=60"


# -- across workers ----------------------------------------------------------------------------

def test_computed_once_then_a_hit_in_the_other_worker(server: Server) -> None:
    u = url(MAX60)
    first_busy = Blocker(server)
    miss = server.fetch(u)  # only the other worker can take it
    computed_by = miss.served_by
    assert miss.x_cache == "MISS" and computed_by != first_busy.pid
    second_busy = Blocker(server)  # only the computing worker is free: it blocks now
    assert second_busy.pid == computed_by
    first_busy.release()
    hit = server.fetch(u)  # only the first worker is free
    second_busy.release()
    assert hit.x_cache == "HIT" and hit.served_by == first_busy.pid != computed_by
    assert hit.body == miss.body and f"pid={computed_by}".encode() in hit.body
    assert computes(server.cache, u) == 1
    assert hit.headers["ETag"] == miss.headers["ETag"] and hit.headers["Age"] is not None
    assert len(hit.headers.get_all("Date") or []) == 1  # the server's, not a second one


def test_etag_is_identical_when_another_worker_recomputes(server: Server) -> None:
    u = url(MAX60, fixed="1")
    first_busy = Blocker(server)
    one = server.fetch(u)
    assert server.fetch(u, "POST").status == 200  # invalidates the URL (RFC 9111 §4.4)
    second_busy = Blocker(server)
    first_busy.release()
    two = server.fetch(u)
    second_busy.release()
    assert one.served_by != two.served_by and two.x_cache == "MISS"
    assert computes(server.cache, u) == 3  # GET, POST, GET
    assert one.headers["ETag"] == two.headers["ETag"]


def test_single_flight_across_processes(server: Server) -> None:
    u = url(MAX60, go="1")
    path_qs = u
    token = dict(p.split("=", 1) for p in u.split("?", 1)[1].split("&"))["t"]
    replies: list[Reply] = []
    t1 = threading.Thread(target=lambda: replies.append(server.fetch(u)))
    t1.start()
    wait_for(lambda: computes(server.cache, path_qs) == 1, "the first fill to start")
    t2 = threading.Thread(target=lambda: replies.append(server.fetch(u)))
    t2.start()  # the other worker: the first is busy computing
    wait_for(lambda: arrivals(server.cache, path_qs) == 2, "the second request to arrive")
    server.cache.set("go:" + token, 1)
    t1.join(DEADLINE)
    t2.join(DEADLINE)
    assert len(replies) == 2 and replies[0].served_by != replies[1].served_by
    assert sorted(r.x_cache or "" for r in replies) == ["HIT", "MISS"]
    assert replies[0].body == replies[1].body and computes(server.cache, path_qs) == 1


def test_unsafe_request_invalidates_for_every_worker(server: Server) -> None:
    u = url(MAX60)
    server.fetch(u)
    assert server.fetch(u).x_cache == "HIT"
    assert server.fetch(u, "DELETE").status == 200
    assert server.fetch(u).x_cache == "MISS" and computes(server.cache, u) == 3


# -- the CVE regressions over the wire -----------------------------------------------------------

def test_cve_2026_6907_vary_star_over_the_wire(server: Server) -> None:
    u = url(PUB60, "Vary:*")
    assert [server.fetch(u).x_cache, server.fetch(u).x_cache] == ["MISS", "MISS"]
    assert computes(server.cache, u) == 2


def test_cve_2026_8404_case_insensitive_over_the_wire(server: Server) -> None:
    for cc in ["PRIVATE, MAX-AGE=60", "No-Store, max-age=60"]:
        u = url(f"Cache-Control:{cc}")
        assert [server.fetch(u).x_cache, server.fetch(u).x_cache] == ["MISS", "MISS"]
    u = url("Cache-Control:MAX-AGE=60")
    assert [server.fetch(u).x_cache, server.fetch(u).x_cache] == ["MISS", "HIT"]


def test_cve_2026_48587_padded_vary_over_the_wire(server: Server) -> None:
    # h11 (uvicorn) refuses to send a field value with surrounding whitespace at all;
    # padding around the list's commas is valid everywhere.
    padded = "   Cookie   " if server.kind == "gunicorn" else "Accept-Language ,   COOKIE"
    u = url(PUB60, f"Vary:{padded}", echo="cookie")
    server.fetch(u, headers=[("Cookie", "session=alice")])
    bob = server.fetch(u, headers=[("Cookie", "session=bob")])
    assert bob.x_cache == "MISS" and b"session=bob" in bob.body


def test_cve_2026_48588_unrelated_cookies_over_the_wire(server: Server) -> None:
    u = url(PUB60, "Vary:Cookie", echo="cookie")
    alice = server.fetch(u, headers=[("Cookie", "_ga=7; session=alice")])
    for cookie in ["_ga=7; session=bob", "_ga=7"]:
        r = server.fetch(u, headers=[("Cookie", cookie)])
        assert r.x_cache == "MISS" and b"session=alice" not in r.body
    again = server.fetch(u, headers=[("Cookie", "_ga=7; session=alice")])
    assert again.x_cache == "HIT" and again.body == alice.body


def test_missing_and_empty_header_over_the_wire(server: Server) -> None:
    u = url(PUB60, "Vary:X-Token", echo="x-token")
    missing = server.fetch(u)
    empty = server.fetch(u, headers=[("X-Token", "")])
    assert missing.x_cache == empty.x_cache == "MISS"
    assert b"x-token=None" in missing.body and b"x-token=\n" in empty.body
    assert server.fetch(u, headers=[("X-Token", "")]).body == empty.body


def test_alice_private_response_is_never_served_to_bob(server: Server) -> None:
    for headers in (["Cache-Control:private, max-age=60"], [MAX60]):
        u = url(*headers, echo="authorization")
        server.fetch(u, headers=[("Authorization", "Bearer alice")])
        for who in ([("Authorization", "Bearer bob")], []):
            r = server.fetch(u, headers=who)
            assert r.x_cache == "MISS" and b"Bearer alice" not in r.body


# -- validators and X-Cache ----------------------------------------------------------------------

def test_304s_and_head_over_the_wire(server: Server) -> None:
    u = url(MAX60)
    miss = server.fetch(u)
    etag = miss.headers["ETag"]
    assert miss.x_cache == "MISS" and etag.startswith('"')
    nm = server.fetch(u, headers=[("If-None-Match", etag)])
    assert nm.status == 304 and nm.body == b"" and nm.headers["ETag"] == etag
    assert nm.x_cache == "HIT"
    head = server.fetch(u, "HEAD")
    assert head.status == 200 and head.body == b"" and head.x_cache == "HIT"
    assert head.headers["Content-Length"] == str(len(miss.body))
    assert server.fetch(u, headers=[("If-None-Match", '"stale"')]).status == 200
    assert computes(server.cache, u) == 1


def test_large_responses_stream_through_unstored(server: Server) -> None:
    u = url(MAX60, size="200000", stream="1")
    a, b = server.fetch(u), server.fetch(u)
    assert a.x_cache == b.x_cache == "MISS" and len(b.body) == len(a.body) > 200000
    assert computes(server.cache, u) == 2
