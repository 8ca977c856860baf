"""The examples in examples/: each app's cached endpoint, driven as its framework would.

Flask, FastAPI and Django run in-process (their test clients) inside a fresh interpreter
each (``run_isolated`` with spawn): the examples configure process-wide state at import
-- ``shmcache.gunicorn.get_cache()``, Django's settings -- that must not leak into this
pytest process or into each other.  Catzilla has no in-process client: its example runs
as two real processes on two free ports under the launcher, as its README line says.
Every test asserts that the second request was a hit and that the slow function ran
once.  The segments are named by the test (``SHMCACHE_NAME``) and unlinked here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import SPAWN, new_name, run_isolated
from server_apps.harness import (
    ROOT,
    Server,
    free_port,
    python,
    request,
    server_env,
    wait_until,
)

from shmcache import segment_exists, unlink_segment

EXAMPLES = ROOT / "examples"

# The sanitizer run copies shmcache/ and tests/ only (no examples/).
pytestmark = pytest.mark.skipif(not (EXAMPLES / "flask_app.py").is_file(),
                                reason="examples/ is not part of this copy of the suite")


@pytest.fixture
def segment() -> Iterator[str]:
    name = new_name("example-")
    yield name
    unlink_segment(name)


def _load(path: Path, module: str) -> Any:
    spec = importlib.util.spec_from_file_location(module, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)
    return mod


# -- Flask (WSGI middleware) ---------------------------------------------------------------


def _flask_child(name: str) -> dict[str, Any]:
    os.environ["SHMCACHE_NAME"] = name
    mod = _load(EXAMPLES / "flask_app.py", "flask_app")
    client = mod.app.test_client()
    out: dict[str, Any] = {"pid": os.getpid(), "responses": []}
    for path in ("/users/7", "/users/7", "/users/8"):
        r = client.get(path)
        out["responses"].append({"status": r.status_code, "x_cache": r.headers.get("X-Cache"),
                                 "x_worker": r.headers.get("X-Worker"), "body": r.get_json(),
                                 "cache_control": r.headers.get("Cache-Control")})
    out["seven"] = client.get("/computations?path=/users/7").get_json()
    out["total"] = client.get("/computations").get_json()
    mod.cache.close()
    return out


def test_flask_example_second_request_is_a_hit(segment: str) -> None:
    got = run_isolated(_flask_child, segment, ctx=SPAWN)
    first, second, other = got["responses"]
    assert [first["status"], second["status"], other["status"]] == [200, 200, 200]
    assert (first["x_cache"], second["x_cache"], other["x_cache"]) == ("MISS", "HIT", "MISS")
    assert second["body"] == first["body"] == {"id": 7, "name": "user 7", "plan": "pro",
                                               "computed_by": got["pid"]}
    assert first["x_worker"] == second["x_worker"] == str(got["pid"])
    assert first["cache_control"] == "max-age=60"
    # The slow query ran once for /users/7, by this process, and once for /users/8.
    assert got["seven"] == {"path": "/users/7", "count": 1, "pids": [got["pid"]]}
    assert got["total"]["count"] == 2


def _flask_uncached_child(name: str) -> list[tuple[str | None, int]]:
    os.environ["SHMCACHE_NAME"] = name
    os.environ["EXAMPLE_CACHE"] = "0"
    mod = _load(EXAMPLES / "flask_app.py", "flask_app")
    client = mod.app.test_client()
    seen = [(client.get("/users/7").headers.get("X-Cache"), 0) for _ in range(2)]
    count = client.get("/computations?path=/users/7").get_json()["count"]
    mod.cache.close()
    return [*seen, (None, count)]


def test_flask_example_without_the_cache_computes_every_time(segment: str) -> None:
    # EXAMPLE_CACHE=0 is the demo's baseline: same app, no response cache.
    got = run_isolated(_flask_uncached_child, segment, ctx=SPAWN)
    assert got == [(None, 0), (None, 0), (None, 2)]


# -- FastAPI (ASGI middleware + async decorator) ---------------------------------------------


def _fastapi_child(name: str) -> dict[str, Any]:
    import httpx

    os.environ["SHMCACHE_NAME"] = name
    mod = _load(EXAMPLES / "fastapi_app.py", "fastapi_app")

    async def drive() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=mod.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            first = await c.get("/users/7")
            second = await c.get("/users/7")
            after_two = (await c.get("/computations")).json()["load_user_runs"]
            plan = await c.get("/users/7/plan")
            after_plan = (await c.get("/computations")).json()["load_user_runs"]
            return {"codes": [first.status_code, second.status_code, plan.status_code],
                    "x_cache": [first.headers.get("x-cache"), second.headers.get("x-cache"),
                                plan.headers.get("x-cache")],
                    "bodies": [first.json(), second.json()], "plan": plan.json(),
                    "runs": [after_two, after_plan]}

    out = asyncio.run(drive())
    out["pid"] = os.getpid()
    mod.cache.close()
    return out


def test_fastapi_example_second_request_is_a_hit(segment: str) -> None:
    got = run_isolated(_fastapi_child, segment, ctx=SPAWN)
    assert got["codes"] == [200, 200, 200]
    assert got["x_cache"] == ["MISS", "HIT", "MISS"]
    assert got["bodies"][0] == got["bodies"][1] == {
        "id": 7, "name": "user 7", "plan": "pro", "computed_by": got["pid"]}
    # load_user ran once: for the stored response, not again for its hit, and not
    # again for /plan (whose response is not stored, but whose data is a decorator hit).
    assert got["runs"] == [1, 1]
    assert got["plan"] == {"id": 7, "plan": "pro", "served_by": got["pid"]}


# -- Django (the cache backend + cache_page) -------------------------------------------------


def _django_child(name: str) -> dict[str, Any]:
    os.environ["SHMCACHE_NAME"] = name
    os.environ["DJANGO_SETTINGS_MODULE"] = "exampleproject.settings"
    sys.path.insert(0, str(EXAMPLES / "django_app"))
    import django

    django.setup()
    from django.core.cache import cache
    from django.test import Client

    client = Client()
    first, second = client.get("/users/7"), client.get("/users/7")
    runs = client.get("/computations").json()["computations"]
    out = {"codes": [first.status_code, second.status_code],
           "bodies": [first.json(), second.json()],
           "age": [first.headers.get("Age"), second.headers.get("Age")],
           "runs": runs, "pid": os.getpid(), "segment": cache.shmcache.segment.name}
    cache.shmcache.close()
    return out


def test_django_example_second_request_is_a_hit(segment: str) -> None:
    got = run_isolated(_django_child, segment, ctx=SPAWN)
    assert got["segment"] == segment   # LOCATION follows SHMCACHE_NAME
    assert got["codes"] == [200, 200]
    assert got["bodies"][0] == got["bodies"][1] == {
        "id": 7, "name": "user 7", "plan": "pro", "computed_by": got["pid"]}
    assert got["age"][0] is None and got["age"][1] is not None   # Django marks its hits
    assert got["runs"] == 1


# -- Catzilla (two real processes under the launcher) ----------------------------------------


def test_catzilla_example_hit_in_the_other_process(segment: str) -> None:
    ports = [free_port(), free_port()]
    env = server_env(segment, {"PYTHONPATH": os.pathsep.join([str(ROOT), str(EXAMPLES)])})
    srv = Server([python(), str(ROOT / "workers" / "catzilla_launcher.py"), "catzilla_app:app",
                  "--ports", ",".join(map(str, ports)), "--host", "127.0.0.1"], env)
    try:
        for p in ports:
            def up(p: int = p) -> bool:
                if srv.proc.poll() is not None:
                    return True
                try:
                    return request(p, "/computations", timeout=2.0)[0] == 200
                except OSError:
                    return False
            wait_until(up, 30.0, f"catzilla on port {p}")
            assert srv.proc.poll() is None, srv.output()
        s1, h1, b1 = request(ports[0], "/users/7")
        s2, h2, b2 = request(ports[1], "/users/7")
        _, _, counts = request(ports[1], "/computations")
        assert (s1, s2) == (200, 200)
        assert (h1.get("x-cache"), h2.get("x-cache")) == ("MISS", "HIT")
        assert b1 == b2
        body = json.loads(b1)
        assert body["id"] == 7 and body["computed_by"] > 0
        info = json.loads(counts)
        assert info["computations"] == 1
        assert info["served_by"] != body["computed_by"]   # the other process answered
    finally:
        srv.stop()
    assert not segment_exists(segment)   # the launcher unlinked it at SIGTERM


# -- the README --------------------------------------------------------------------------------


def test_readme_has_a_run_line_for_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for entry in ("flask_app.py", "fastapi_app.py", "django_app", "catzilla_app.py",
                  "two_processes.py"):
        assert entry in readme, entry
    for server in ("gunicorn", "UvicornWorker", "catzilla_launcher.py", "shmcache demo"):
        assert server in readme, server
