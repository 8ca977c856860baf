"""shmcache.contrib.flask: the Flask-Caching backend.

Its cachelib contract (timeouts where 0 is forever, get/has/add/inc semantics, the key
prefix and a clear() bounded by it), ``@cache.cached`` and ``@cache.memoize`` on a real
Flask app through its test client, and two Flask servers (separate processes on
127.0.0.1) serving each other's cached views and memoized results.  Expiry is checked
on a frozen engine clock (``Segment.set_clock``, this process only), not by sleeping.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import select
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import new_name
from flask import Flask
from flask_caching import Cache as FlaskCache

import shmcache
from shmcache.contrib.flask import ShmCache

SIZE_MB = 8
TOO_BIG = 3 << 20  # an 8 MiB segment's largest item is smaller than this


@pytest.fixture(scope="module")
def segname() -> Iterator[str]:
    # One segment for the module: the backend keeps its shmcache.Cache for the life of
    # the process, so a segment per test would pile up mappings in pytest.
    name = new_name("flask")
    yield name
    shmcache.unlink_segment(name)


def make_app(segname: str, **config: Any) -> tuple[Flask, FlaskCache]:
    app = Flask(__name__)
    cfg = {"CACHE_TYPE": "shmcache.contrib.flask.ShmCache", "CACHE_SHMCACHE_NAME": segname,
           "CACHE_DEFAULT_TIMEOUT": 300, "CACHE_OPTIONS": {"c_memory_size_mb": SIZE_MB}}
    cfg.update(config)
    return app, FlaskCache(app, config=cfg)


@pytest.fixture
def app_cache(segname: str) -> Iterator[tuple[Flask, FlaskCache]]:
    app, cache = make_app(segname)
    backend = cache.cache
    backend.shmcache.clear()
    yield app, cache
    backend.shmcache.segment.set_clock(None)
    backend.shmcache.clear()


@pytest.fixture
def backend(app_cache: tuple[Flask, FlaskCache]) -> ShmCache:
    b = app_cache[1].cache
    assert isinstance(b, ShmCache)
    return b


def freeze(b: ShmCache) -> Any:
    """Freeze this process's engine clock; returns a function that advances it."""
    seg = b.shmcache.segment
    now = [seg.now()]
    seg.set_clock(now[0])

    def advance(seconds: float) -> float:
        now[0] += seconds
        seg.set_clock(now[0])
        return now[0]

    advance.now = now  # type: ignore[attr-defined]
    return advance


def expires_at(b: ShmCache, key: str) -> float | None:
    info = b.shmcache.segment.info(b.key_prefix + key)
    assert info is not None, key
    return info.expires_at


# -- the backend contract ----------------------------------------------------------------

def test_factory_reads_the_flask_config(segname: str) -> None:
    app, cache = make_app(segname, CACHE_KEY_PREFIX="site1:", CACHE_DEFAULT_TIMEOUT=42,
                          CACHE_OPTIONS={"c_memory_size_mb": SIZE_MB, "compression": False})
    b = cache.cache
    assert isinstance(b, ShmCache)
    assert b.key_prefix == "site1:"
    assert b.default_timeout == 42
    assert b.shmcache.segment.name == segname
    assert b.shmcache.config.compression is False
    assert b.shmcache.config.object_cache is False  # fresh copies unless asked
    with app.app_context():
        cache.set("k", "v")
    assert b.shmcache.segment.get("site1:k") is not None
    b.delete("k")
    _, default = make_app(segname)
    assert default.cache.key_prefix == "flask_cache_"  # Flask-Caching's default
    assert default.cache.shmcache is not b.shmcache  # another configuration


def test_get_set_add_delete_has(backend: ShmCache) -> None:
    assert backend.get("k") is None
    assert backend.has("k") is False
    assert backend.set("k", {"a": [1, 2]}) is True
    assert backend.get("k") == {"a": [1, 2]}
    assert backend.add("k", "other") is False
    assert backend.get("k") == {"a": [1, 2]}
    assert backend.add("k2", "first") is True
    assert backend.delete("k") is True
    assert backend.delete("k") is False
    assert backend.set("none", None) is True
    assert backend.get("none") is None and backend.has("none") is True


def test_get_returns_a_fresh_copy(backend: ShmCache) -> None:
    backend.set("list", [1, 2])
    got = backend.get("list")
    got.append(3)
    assert backend.get("list") == [1, 2]


def test_many(backend: ShmCache) -> None:
    assert backend.set_many({"a": 1, "b": 2, "c": None}) == ["a", "b", "c"]
    assert backend.get_many("a", "x", "b") == [1, None, 2]
    assert backend.get_dict("a", "b") == {"a": 1, "b": 2}
    assert backend.delete_many("a", "x") == ["a", "x"]  # absent counts as deleted
    assert backend.get_many("a", "b") == [None, 2]


def test_timeout_zero_is_forever_and_none_is_the_default(backend: ShmCache) -> None:
    advance = freeze(backend)
    start = advance.now[0]
    backend.set("forever", 1, timeout=0)
    backend.set("default", 2)
    backend.set("short", 3, timeout=10)
    assert backend.add("added", 4, timeout=0) is True
    assert expires_at(backend, "forever") is None
    assert expires_at(backend, "added") is None
    assert expires_at(backend, "default") == pytest.approx(start + 300, abs=0.01)
    advance(11)
    assert backend.get_many("forever", "default", "short") == [1, 2, None]
    advance(290)
    assert backend.get_many("forever", "default", "added") == [1, None, 4]
    forever_by_default = ShmCache(backend.shmcache.segment.name, default_timeout=0,
                                  c_memory_size_mb=SIZE_MB)
    forever_by_default.set("d0", 5)
    advance(10**8)
    assert forever_by_default.get("d0") == 5


def test_negative_timeout_is_already_expired(backend: ShmCache) -> None:
    backend.set("k", "v")
    assert backend.set("k", "w", timeout=-1) is True
    assert backend.has("k") is False
    assert backend.add("k", "w", timeout=-1) is True
    assert backend.has("k") is False
    backend.set("k", "v")
    assert backend.add("k", "w", timeout=-1) is False


def test_timedelta_and_float_timeouts(backend: ShmCache) -> None:
    advance = freeze(backend)
    start = advance.now[0]
    backend.set("td", 1, timeout=dt.timedelta(minutes=2))
    assert expires_at(backend, "td") == pytest.approx(start + 120, abs=0.01)
    with pytest.warns(DeprecationWarning):  # cachelib: floats round up, and are deprecated
        backend.set("fl", 1, timeout=1.2)
    assert expires_at(backend, "fl") == pytest.approx(start + 2, abs=0.01)


def test_inc_dec(backend: ShmCache) -> None:
    advance = freeze(backend)
    assert backend.inc("new") == 1  # created as delta, with the default timeout
    assert expires_at(backend, "new") == pytest.approx(advance.now[0] + 300, abs=0.01)
    assert backend.inc("new", 5) == 6
    assert backend.dec("new", 2) == 4
    assert backend.dec("fresh", 3) == -3
    assert backend.get("new") == 4
    backend.set("none", None)
    assert backend.inc("none") == 1  # cachelib: a None counts as 0
    backend.set("ttl", 10, timeout=100)
    before = expires_at(backend, "ttl")
    advance(50)
    assert backend.inc("ttl") == 11
    assert expires_at(backend, "ttl") == before  # kept, to the millisecond
    advance(51)
    assert backend.get("ttl") is None
    backend.set("text", "abc")
    with pytest.raises(TypeError):
        backend.inc("text")


def test_key_prefix_separates_and_bounds_clear(segname: str, backend: ShmCache) -> None:
    _, other_cache = make_app(segname, CACHE_KEY_PREFIX="other:")
    other = other_cache.cache
    backend.set("k", "mine")
    other.set("k", "theirs")
    other.set("x" * 400, "long key, still under the prefix")
    assert backend.get("k") == "mine" and other.get("k") == "theirs"
    assert other.get("x" * 400) == "long key, still under the prefix"
    assert other.clear() is True
    assert other.get("k") is None and other.get("x" * 400) is None
    assert backend.get("k") == "mine"
    unprefixed = ShmCache(segname, key_prefix="", c_memory_size_mb=SIZE_MB)
    assert unprefixed.clear() is True  # no prefix: the whole segment
    assert backend.get("k") is None


def test_a_value_the_segment_cannot_hold(backend: ShmCache,
                                         caplog: pytest.LogCaptureFixture) -> None:
    big = os.urandom(TOO_BIG)  # incompressible
    backend.set("k", "old")
    with caplog.at_level("WARNING", logger="shmcache.contrib.flask"):
        assert backend.set("k", big) is False
        assert backend.add("k2", big) is False
        assert backend.set_many({"a": 1, "k3": big}) == ["a"]
    assert backend.has("k") is False  # never the value it was replacing
    assert backend.has("k2") is False and backend.has("k3") is False
    assert len(caplog.records) == 3
    assert all("flask_cache_k" not in r.getMessage() for r in caplog.records)


def test_pickling_errors_raise(backend: ShmCache) -> None:
    class Unpicklable:
        def __reduce__(self) -> Any:
            raise pickle.PicklingError("no")

    with pytest.raises(pickle.PicklingError):
        backend.set("u", Unpicklable())
    with pytest.raises(pickle.PicklingError):
        backend.add("u", Unpicklable(), timeout=-1)
    assert backend.has("u") is False


def _inc_in_child(segname: str, n: int) -> tuple[int, int | None]:
    # A forked child (a pre-fork server's worker) re-creates the backend from the same
    # config: it gets the parent's shmcache.Cache, which the child may keep using.
    _, cache = make_app(segname)
    last = None
    for _ in range(n):
        last = cache.cache.inc("forked")
    return os.getpid(), last


def test_forked_children_share_the_parents_backend(backend: ShmCache) -> None:
    from _helpers import FORK, run_isolated

    backend.set("forked", 0)
    pids = set()
    for _ in range(2):
        pid, last = run_isolated(_inc_in_child, backend.shmcache.segment.name, 50, ctx=FORK)
        pids.add(pid)
    assert os.getpid() not in pids and len(pids) == 2
    assert last == 100
    assert backend.get("forked") == 100


def test_options_are_checked(segname: str) -> None:
    with pytest.raises(TypeError, match="unknown option"):
        ShmCache(segname, no_such_option=1)
    with pytest.raises(TypeError, match="CACHE_DEFAULT_TIMEOUT"):
        ShmCache(segname, default_ttl=5)
    with pytest.raises(ValueError, match="c_memory_size_mb"):
        ShmCache(segname, c_memory_size_mb=0)


# -- Flask-Caching's decorators on a real app --------------------------------------------

def test_cached_view(app_cache: tuple[Flask, FlaskCache]) -> None:
    app, cache = app_cache
    calls: list[str] = []

    @app.get("/page")
    @cache.cached(timeout=60, query_string=True)
    def page() -> str:
        calls.append("x")
        return f"render {len(calls)}"

    client = app.test_client()
    assert client.get("/page").text == "render 1"
    assert client.get("/page").text == "render 1"
    assert client.get("/page?q=2").text == "render 2"
    assert len(calls) == 2
    with app.app_context():
        cache.clear()
    assert client.get("/page").text == "render 3"


def test_memoize(app_cache: tuple[Flask, FlaskCache]) -> None:
    app, cache = app_cache
    calls: list[int] = []

    @cache.memoize(timeout=60)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    @cache.memoize(timeout=60, cache_none=True)
    def nothing(n: int) -> None:
        calls.append(-n)

    with app.app_context():
        assert [square(3), square(3), square(4)] == [9, 9, 16]
        assert calls == [3, 4]
        cache.delete_memoized(square, 3)
        assert [square(3), square(4)] == [9, 16]
        assert calls == [3, 4, 3]
        cache.delete_memoized(square)
        assert square(4) == 16
        assert calls == [3, 4, 3, 4]
        assert nothing(1) is None and nothing(1) is None  # a cached None, via has()
        assert calls == [3, 4, 3, 4, -1]


# -- two processes -----------------------------------------------------------------------

SERVER = textwrap.dedent('''
    import os
    from flask import Flask, jsonify
    from flask_caching import Cache
    from werkzeug.serving import make_server

    app = Flask(__name__)
    cache = Cache(app, config={
        "CACHE_TYPE": "shmcache.contrib.flask.ShmCache",
        "CACHE_SHMCACHE_NAME": os.environ["SHMCACHE_NAME"],
        "CACHE_KEY_PREFIX": "shared:",
        "CACHE_OPTIONS": {"c_memory_size_mb": SIZE_MB}})

    @app.get("/view")
    @cache.cached(timeout=300)
    def view():
        return jsonify(pid=os.getpid(), token=os.urandom(8).hex())

    @cache.memoize(timeout=300)
    def square(n):
        return {"square": n * n, "pid": os.getpid(), "token": os.urandom(8).hex()}

    @app.get("/square/<int:n>")
    def get_square(n):
        return jsonify(square(n))

    @app.post("/forget/<int:n>")
    def forget(n):
        cache.delete_memoized(square, n)
        return jsonify(ok=True)

    @app.post("/inc/<key>/<int:times>")
    def inc(key, times):
        return jsonify(last=[cache.cache.inc(key) for _ in range(times)][-1])

    @app.get("/get/<key>")
    def get(key):
        return jsonify(value=cache.get(key))

    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.server_port, flush=True)
    server.serve_forever()
''').replace("SIZE_MB", str(SIZE_MB))


class Server:
    def __init__(self, script: Path, segment: str) -> None:
        root = str(Path(shmcache.__file__).resolve().parent.parent)
        env = dict(os.environ, SHMCACHE_NAME=segment,
                   PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, str(script)], env=env,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + 60
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, "server did not announce its port"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 64)
                assert chunk, f"server exited with {self.proc.wait(10)}"
                line += chunk
        self.base = f"http://127.0.0.1:{int(line)}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str) -> Any:
        req = urllib.request.Request(self.base + path, data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    segment = new_name("flask2p")
    script = tmp_path / "flask_server.py"
    script.write_text(SERVER)
    started: list[Server] = []
    try:
        started.append(Server(script, segment))
        started.append(Server(script, segment))
        yield started[0], started[1]
    finally:
        for s in started:
            s.stop()
        shmcache.unlink_segment(segment)


def test_two_servers_share_cached_views_and_memoized_results(
        servers: tuple[Server, Server]) -> None:
    a, b = servers
    first = a.get("/view")
    assert b.get("/view") == first  # rendered once, by a, for both
    sq = b.get("/square/7")
    assert sq["square"] == 49
    assert a.get("/square/7") == sq  # computed by b, served to a
    assert a.post("/forget/7") == {"ok": True}  # delete_memoized in a ...
    again = b.get("/square/7")  # ... reaches b
    assert again["square"] == 49 and again["token"] != sq["token"]


def test_two_servers_inc_one_counter(servers: tuple[Server, Server]) -> None:
    import concurrent.futures

    a, b = servers
    n = 300
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: s.post(f"/inc/hits/{n}")["last"], [a, b]))
    assert max(results) == 2 * n  # no increment lost between the processes
    assert a.get("/get/hits") == {"value": 2 * n}
