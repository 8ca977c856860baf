"""Real Redis servers for the tier tests: a standalone server and a 3-master cluster.

Every server is a ``redis-server`` child of this process on a free 127.0.0.1 port, with
persistence off and its files in a private temporary directory; it is stopped by its
PID (SIGTERM, then SIGKILL) in the fixture's teardown.  Tests isolate themselves with
a unique ``redis_prefix`` (the tier's key prefix and invalidation channel) instead of
FLUSHALL, so a sidecar still draining from an earlier test cannot touch their keys.

The fixtures are imported by the test modules (``from redis_servers import fx_hosts``,
then requested as ``hosts``): conftest.py belongs to the whole suite.  ``hosts`` builds
"hosts" -- one :class:`~shmcache.Cache` per segment, each with its own sidecar -- and
closes and unlinks them at teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import new_name

from shmcache import Cache, CacheConfig, CacheLevel, unlink_segment
from shmcache.sidecar import lock_path

SECRET = "x" * 32
L1_L2 = (CacheLevel.C_MEMORY, CacheLevel.REDIS)
L1_L2_L3 = (CacheLevel.C_MEMORY, CacheLevel.REDIS, CacheLevel.DISK)

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

requires_redis = pytest.mark.skipif(REDIS_SERVER is None or REDIS_CLI is None,
                                    reason="redis-server/redis-cli not installed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.005) -> bool:
    """Poll ``cond`` until it is truthy (True) or ``timeout`` passes (False).  The way
    these tests wait for the sidecar, pub/sub and failover: a condition, never a nap."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class RedisProc:
    """One ``redis-server`` process; :meth:`kill` and :meth:`start` again reuse its port
    and directory (a restart as clients see it: same address, empty data)."""

    def __init__(self, port: int | None = None, *, workdir: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        assert REDIS_SERVER is not None
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="shmtest-redis-")
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, timeout: float = 5.0) -> Any:
        """A new redis-py client on this server (bytes in, bytes out)."""
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def start(self, timeout: float = 10.0) -> RedisProc:
        assert REDIS_SERVER is not None and self.proc is None
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.workdir,
             "--protected-mode", "yes", "--loglevel", "warning", *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not self._wait_ping(timeout):
            self.stop()
            raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
        return self

    def _wait_ping(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            with contextlib.suppress(Exception):
                c = self.client(timeout=0.5)
                try:
                    if c.ping():
                        return True
                finally:
                    c.close()
            time.sleep(0.02)
        return False

    def kill(self) -> None:
        """SIGKILL (a crash: no shutdown, no goodbye to clients) and reap."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 5 s."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RedisClusterProcs:
    """Three masters and three replicas made into a cluster with ``redis-cli --cluster
    create``; ``cluster-node-timeout`` is 1 s so a failover takes a few seconds."""

    def __init__(self, node_timeout_ms: int = 1000) -> None:
        self.workdir = tempfile.mkdtemp(prefix="shmtest-cluster-")
        self.nodes: list[RedisProc] = []
        ports: set[int] = set()
        while len(ports) < 12:  # six client ports and six bus ports, all distinct
            ports.add(free_port())
        bus = sorted(ports)[6:]
        for i, port in enumerate(sorted(ports)[:6]):
            d = os.path.join(self.workdir, str(port))
            os.mkdir(d)
            self.nodes.append(RedisProc(port, workdir=d, extra=(
                # The bus port defaults to port + 10000, past 65535 for an ephemeral
                # port: give it a free one of its own.
                "--cluster-port", str(bus[i]),
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms))))

    @property
    def seeds(self) -> tuple[str, ...]:
        return tuple(n.addr for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterProcs:
        assert REDIS_CLI is not None
        for n in self.nodes:
            n.start()
        subprocess.run([REDIS_CLI, "--cluster", "create", *self.seeds,
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=timeout)
        if not wait_until(self.all_ok, timeout, 0.05):
            raise RuntimeError("the cluster did not reach cluster_state:ok")
        return self

    def live(self) -> list[RedisProc]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def info(self, node: RedisProc) -> dict[str, str]:
        c = node.client(timeout=1.0)
        try:
            raw = c.execute_command("CLUSTER", "INFO")
        finally:
            c.close()
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def all_ok(self) -> bool:
        """cluster_state:ok on every live node, and every live node agrees on the
        number of reachable masters (3)."""
        try:
            for n in self.live():
                i = self.info(n)
                if i.get("cluster_state") != "ok" or i.get("cluster_size") != "3":
                    return False
            return len(self.masters()) == 3
        except Exception:  # noqa: BLE001 - a node not ready yet
            return False

    def masters(self) -> list[RedisProc]:
        """The live nodes that are masters now, each seen by itself."""
        out = []
        for n in self.live():
            c = n.client(timeout=1.0)
            try:
                role = c.execute_command("ROLE")[0]
            finally:
                c.close()
            if role in (b"master", "master"):
                out.append(n)
        return out

    def node_of(self, key: bytes) -> RedisProc:
        """The master serving ``key``'s slot now (as a live master reports it)."""
        c = self.masters()[0].client(timeout=1.0)
        try:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
            slots = c.execute_command("CLUSTER", "SLOTS")
        finally:
            c.close()
        for lo, hi, master, *_ in slots:
            if int(lo) <= slot <= int(hi):
                port = int(master[1])
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves {key!r}")

    def replica_of(self, master: RedisProc) -> RedisProc:
        c = master.client(timeout=1.0)
        try:
            info = c.info("replication")
        finally:
            c.close()
        port = int(info["slave0"]["port"])
        return next(n for n in self.nodes if n.port == port)

    def cleanup(self) -> None:
        for n in self.nodes:
            n.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module", name="redis_server")
def fx_redis_server() -> Iterator[RedisProc]:
    """A standalone server shared by one test module (tests use their own prefix)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    srv = RedisProc().start()
    yield srv
    srv.cleanup()


@pytest.fixture(name="own_redis")
def fx_own_redis() -> Iterator[RedisProc]:
    """A server for one test alone: for tests that kill, pause or flush it."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    srv = RedisProc().start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module", name="redis_cluster")
def fx_redis_cluster() -> Iterator[RedisClusterProcs]:
    """Three masters + three replicas, shared by one module."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server/redis-cli not installed")
    cl = RedisClusterProcs()
    try:
        cl.start()
        yield cl
    finally:
        cl.cleanup()


@pytest.fixture(name="prefix")
def fx_prefix() -> str:
    """A key prefix (and invalidation channel) no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}:"


class Hosts:
    """Makes "hosts": a :class:`Cache` on a segment of its own, all pointing at the same
    Redis (and each at its own disk directory).  Everything made is closed and its
    segment unlinked at teardown."""

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.tmp = tmp
        self.prefix = prefix
        self.caches: list[Cache] = []
        self.names: list[str] = []

    def config(self, *, name: str | None = None, url: str | None = None,
               levels: tuple[CacheLevel, ...] = L1_L2, **kw: Any) -> CacheConfig:
        name = name or new_name("h")
        if name not in self.names:
            self.names.append(name)
        opts: dict[str, Any] = dict(name=name, c_memory_size_mb=8, levels=levels,
                                    secret=SECRET, redis_prefix=self.prefix,
                                    disk_path=str(self.tmp / f"disk-{name}"),
                                    redis_timeout=0.5)
        if url is not None:
            opts["redis_url"] = url
        opts.update(kw)
        return CacheConfig(**opts)

    def new(self, *, wait_leader: bool = True, **kw: Any) -> Cache:
        cache = Cache(self.config(**kw))
        self.caches.append(cache)
        if wait_leader and cache._sidecar is not None:
            assert cache._sidecar.wait_leader(10), "the sidecar did not become leader"
        return cache

    def close(self) -> None:
        for c in reversed(self.caches):
            with contextlib.suppress(Exception):
                c.close()
        for n in self.names:
            unlink_segment(n)
            drop_lock_file(n)


@pytest.fixture(name="hosts")
def fx_hosts(tmp_path: Path, prefix: str) -> Iterator[Hosts]:
    h = Hosts(tmp_path, prefix)
    yield h
    h.close()


def drop_lock_file(segment_name: str) -> None:
    """Remove the segment's sidecar lock file (the library leaves it behind)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_path(segment_name))


def redis_key(prefix: str, key: str) -> bytes:
    """The Redis key under which a tier keeps ``key``."""
    return prefix.encode() + key.encode()


def is_subscribed(client: Any, prefix: str, n: int = 1) -> bool:
    """True once ``n`` sidecars listen on the prefix's invalidation channel (standalone
    pub/sub): a cross-host test must not publish before the other host listens."""
    ch = (prefix + "invalidate").encode()
    counts = dict(client.pubsub_numsub(ch))
    return int(counts.get(ch, 0)) >= n
