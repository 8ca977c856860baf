"""shmcache.contrib.catzilla through real Catzilla processes started by the launcher.

Two Catzilla processes on two ports (workers/catzilla_launcher.py) share one segment,
each attaching it by name; tests/server_apps/catzilla_app.py counts each route's
computations in the segment, so a test sees whether a response came from the cache
whichever process served it.  Readiness is awaited by polling the ports.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from _helpers import new_name
from server_apps.harness import (
    ROOT,
    Server,
    answers,
    children,
    free_port,
    python,
    request,
    wait_until,
)
from server_apps.harness import server_env as _server_env

from shmcache import Segment, segment_exists, unlink_segment

pytestmark = pytest.mark.slow

BOOT = 30.0


def launcher_cmd(ports: list[int]) -> list[str]:
    script = ROOT / "workers" / "catzilla_launcher.py"
    # The ASan copy of the suite has no workers/: the script is only main() of this module.
    head = [str(script)] if script.exists() else ["-m", "shmcache.contrib.catzilla"]
    return [python(), *head, "catzilla_app:app", "--ports", ",".join(map(str, ports)),
            "--host", "127.0.0.1"]


@dataclass
class Launched:
    srv: Server
    ports: list[int]
    name: str

    def get(self, i: int, path: str, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        status, hdrs, body = request(self.ports[i], path, method, headers)
        return status, hdrs, body.decode()

    def count(self, route: str) -> int:
        status, _, body = self.get(0, f"/count?route={route}")
        assert status == 200
        return int(body)


def _launch() -> Launched:
    name = new_name("cz-")
    ports = [free_port(), free_port()]
    srv = Server(launcher_cmd(ports), _server_env(name))
    launched = Launched(srv, ports, name)
    try:
        for p in ports:
            wait_until(lambda p=p: answers(p) or srv.proc.poll() is not None, BOOT,
                       f"catzilla on port {p}")
            assert srv.proc.poll() is None, srv.output()
    except BaseException:
        srv.stop()
        unlink_segment(name)
        raise
    return launched


def _teardown(launched: Launched) -> None:
    launched.srv.stop()
    unlink_segment(launched.name)


@pytest.fixture(scope="module")
def cz() -> Iterator[Launched]:
    launched = _launch()
    yield launched
    _teardown(launched)


def test_two_processes_on_two_ports_share_one_entry(cz: Launched) -> None:
    s1, h1, b1 = cz.get(0, "/page?t=share")
    s2, h2, b2 = cz.get(1, "/page?t=share")
    assert (s1, h1["x-cache"]) == (200, "MISS")
    assert (s2, h2["x-cache"]) == (200, "HIT")
    assert b2 == b1                                 # the first process's response
    pid1 = cz.get(0, "/pid")[2]
    pid2 = cz.get(1, "/pid")[2]
    assert pid1 != pid2 and f"pid={pid1}" in b1
    assert h2["etag"] == h1["etag"] and int(h2["age"]) >= 0
    assert h2["cache-control"] == "max-age=300"
    # A different query string is a different resource.
    assert cz.get(1, "/page?t=share2")[1]["x-cache"] == "MISS"


def test_head_is_answered_from_the_get_entry(cz: Launched) -> None:
    assert cz.get(0, "/page?t=head", method="HEAD")[1]["x-cache"] == "MISS"   # not stored
    assert cz.get(0, "/page?t=head")[1]["x-cache"] == "MISS"
    before = cz.count("page")
    status, hdrs, body = cz.get(1, "/page?t=head", method="HEAD")
    assert (status, hdrs["x-cache"], body) == (200, "HIT", "")
    assert cz.count("page") == before


def test_if_none_match_on_a_hit_gives_304(cz: Launched) -> None:
    etag = cz.get(0, "/page?t=etag")[1]["etag"]
    status, hdrs, body = cz.get(1, "/page?t=etag", headers={"If-None-Match": etag})
    assert (status, hdrs["x-cache"], body, hdrs["etag"]) == (304, "HIT", "", etag)
    status, _, body = cz.get(1, "/page?t=etag", headers={"If-None-Match": '"other"'})
    assert status == 200 and body


@pytest.mark.parametrize("route", ["private", "nostore", "cookie", "implicit", "stream"])
def test_responses_a_shared_cache_must_not_store(cz: Launched, route: str) -> None:
    before = cz.count(route)
    first = cz.get(0, f"/{route}")
    second = cz.get(1, f"/{route}")
    assert first[1]["x-cache"] == second[1]["x-cache"] == "MISS"
    assert cz.count(route) == before + 2            # computed each time
    if route == "cookie":
        assert "session=s3cr3t" in second[1]["set-cookie"]   # its own, never replayed
    if route == "stream":
        assert second[0] == 200 and second[2].startswith("chunk0 n=")


def test_request_directives_and_authorization(cz: Launched) -> None:
    # Authorization (response not public): stored, but keyed by the credentials.
    x, y = {"Authorization": "Bearer x"}, {"Authorization": "Bearer y"}
    before = cz.count("page")
    assert cz.get(0, "/page?t=auth", headers=x)[1]["x-cache"] == "MISS"
    assert cz.get(1, "/page?t=auth", headers=x)[1]["x-cache"] == "HIT"
    assert cz.get(1, "/page?t=auth", headers=y)[1]["x-cache"] == "MISS"
    assert cz.get(0, "/page?t=auth")[1]["x-cache"] == "MISS"
    assert cz.count("page") == before + 3
    # no-store: the response is not stored.
    assert cz.get(0, "/page?t=ns", headers={"Cache-Control": "no-store"})[1]["x-cache"] \
        == "MISS"
    assert cz.get(1, "/page?t=ns")[1]["x-cache"] == "MISS"
    # no-cache: not served from the cache, but the fresh response replaces the entry.
    old = cz.get(0, "/page?t=nc")[2]
    _, hdrs, new = cz.get(1, "/page?t=nc", headers={"Cache-Control": "no-cache"})
    assert hdrs["x-cache"] == "MISS" and new != old
    _, hdrs, again = cz.get(0, "/page?t=nc")
    assert (hdrs["x-cache"], again) == ("HIT", new)


def test_unsafe_method_invalidates_the_url(cz: Launched) -> None:
    assert cz.get(0, "/page?t=inv")[1]["x-cache"] == "MISS"
    assert cz.get(1, "/page?t=inv")[1]["x-cache"] == "HIT"
    status, hdrs, _ = cz.get(1, "/page?t=inv", method="POST")
    assert status == 200 and "x-cache" not in hdrs
    assert cz.get(0, "/page?t=inv")[1]["x-cache"] == "MISS"      # gone in every process


def test_vary_selects_variants(cz: Launched) -> None:
    en, fr = {"Accept-Language": "en"}, {"Accept-Language": "fr"}
    assert cz.get(0, "/vary", headers=en)[1]["x-cache"] == "MISS"
    _, hdrs, body = cz.get(1, "/vary", headers=en)
    assert hdrs["x-cache"] == "HIT" and "lang=en" in body
    _, hdrs, body = cz.get(1, "/vary", headers=fr)
    assert hdrs["x-cache"] == "MISS" and "lang=fr" in body
    assert cz.get(0, "/vary")[1]["x-cache"] == "MISS"           # header missing
    assert cz.get(1, "/vary")[1]["x-cache"] == "HIT"
    empty = {"Accept-Language": ""}                              # present but empty
    assert cz.get(0, "/vary", headers=empty)[1]["x-cache"] == "MISS"
    assert cz.get(1, "/vary", headers=empty)[1]["x-cache"] == "HIT"
    assert cz.get(0, "/vary", headers=fr)[1]["x-cache"] == "HIT"


def test_post_is_not_cached(cz: Launched) -> None:
    before = cz.count("post")
    for i in (0, 1):
        status, hdrs, _ = cz.get(i, "/page?t=post", method="POST")
        assert status == 200 and "x-cache" not in hdrs
    assert cz.count("post") == before + 2


def test_launcher_restarts_a_killed_process_and_unlinks_at_exit() -> None:
    launched = _launch()
    try:
        seg = Segment.attach(launched.name)
        try:
            body = launched.get(0, "/page?t=restart")[2]
            victim = int(launched.get(1, "/pid")[2])
            assert victim in children(launched.srv.pid)
            os.kill(victim, signal.SIGKILL)

            def replaced() -> bool:
                try:
                    return int(launched.get(1, "/pid")[2]) != victim
                except OSError:
                    return False
            wait_until(replaced, BOOT, f"a new process on port {launched.ports[1]}")
            # Reaped by the launcher: no slot of the victim, none dead.
            wait_until(lambda: all(s.pid != victim and s.state != "dead"
                                   for s in seg.stats().slots), BOOT, "the victim's slot")
            _, hdrs, again = launched.get(1, "/page?t=restart")
            assert (hdrs["x-cache"], again) == ("HIT", body)      # entries survived
            assert seg.verify() == []
        finally:
            seg.close()
        kids = children(launched.srv.pid)
        launched.srv.signal(signal.SIGTERM)
        assert launched.srv.wait(BOOT) == 0, launched.srv.output()
        assert not segment_exists(launched.name)
        assert not any(answers(p) for p in launched.ports)
        assert all(not os.path.exists(f"/proc/{k}") for k in kids)
    finally:
        _teardown(launched)
