"""``shmcache demo``: the Flask example under gunicorn, with and without the cache.

    shmcache demo                         # 4 workers, 10 s of load in all
    shmcache demo --workers 2 --duration 2

What it does, all of it on 127.0.0.1 and bounded in time:

1. starts ``examples/flask_app.py`` under gunicorn (``--workers`` sync workers) with the
   response cache switched off, and drives a load of ``--connections`` concurrent
   clients over ``--keys`` hot URLs (``/users/1`` ... ``/users/K``; each costs
   ``--work-ms`` of CPU time when computed) for half of ``--duration``;
2. starts it again with the embedded default -- shared memory plus disk
   (``CacheConfig(levels=(C_MEMORY, DISK))``, no Redis, no secret needed) -- and drives
   the same load for the other half;
3. prints a table (requests/s, p50/p99 latency, hit ratio, computations) and the
   evidence that a response computed by one worker was a hit in the others: the
   application records in the segment which worker computed each URL, and every
   response names the worker that sent it (``X-Worker``);
4. stops everything it started, by PID, on every exit path (also Ctrl-C and SIGTERM;
   a gunicorn master whose demo died gets SIGTERM from the kernel), unlinks the
   segments and removes its temporary directory.

The load generator (:func:`run_load`) and the gunicorn runner (:class:`GunicornServer`)
are also used by ``benchmarks/bench_server.py``.  The example application lives in the
source checkout (``examples/``), not in the installed package: the demo refuses to run
without it.  Exit status: 0 on success, 1 if the run failed (a server that did not
start, requests that failed, no cross-worker hit), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import random
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .segment import segment_exists, unlink_segment

__all__ = ["main", "run_load", "LoadResult", "GunicornServer", "HttpError",
           "find_examples", "http_get"]

#: Per-request bound of the load generator and of every HTTP call here.
REQUEST_TIMEOUT = 15.0
#: How long a server gets to start all its workers.
BOOT_TIMEOUT = 60.0
EVIDENCE_PATH_INDEX = 7   # /users/7, the key the evidence line is about


class HttpError(Exception):
    """An HTTP exchange that did not give a complete response."""


class DemoError(Exception):
    """The demo could not do what it set out to do (the message says why)."""


# -- a minimal HTTP/1.1 client -----------------------------------------------------------
#
# Raw sockets rather than http.client: on a 2-core machine the load generator competes
# with the server for CPU, and http.client costs several times more per request.  It
# speaks exactly what the servers here send: Content-Length bodies, keep-alive unless
# the server says "Connection: close" (gunicorn's sync workers always do).


def _field(head: bytes, name: bytes) -> bytes | None:
    """The value of field ``name`` (lower-case, with the leading CRLF and trailing colon:
    ``b"\\r\\nx-cache:"``) in a lower-cased header block, or ``None``.  A search rather
    than a parse: the load generator reads three fields of every response."""
    i = head.find(name)
    if i < 0:
        return None
    j = head.find(b"\r\n", i + 2)
    return head[i + len(name):j if j >= 0 else len(head)].strip()


def _read_response(sock: socket.socket, buf: bytes) -> tuple[int, bytes, bytes, bytes, bool]:
    """Read one response: ``(status, header block, body, leftover bytes, close)``; the
    header block is lower-cased and starts with the status line."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        chunk = sock.recv(65536)
        if not chunk:
            raise HttpError("connection closed before the response headers")
        buf += chunk
    head = buf[:end].lower() + b"\r\n"
    rest = buf[end + 4:]
    try:
        status = int(head[9:12])   # "HTTP/1.1 200 ..."
    except ValueError:
        raise HttpError(f"bad status line {head[:80]!r}") from None
    close = _field(head, b"\r\nconnection:") == b"close"
    length = _field(head, b"\r\ncontent-length:")
    if length is None:
        if _field(head, b"\r\ntransfer-encoding:") is not None:
            raise HttpError("chunked responses are not supported by this client")
        while True:   # the body runs to the end of the connection
            chunk = sock.recv(65536)
            if not chunk:
                return status, head, rest, b"", True
            rest += chunk
    n = int(length)
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise HttpError("connection closed in the middle of the body")
        rest += chunk
    return status, head, rest[:n], rest[n:], close


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _request_bytes(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection to 127.0.0.1: ``(status, headers, body)``, the
    header names and values lower-cased.

    Example (against a server on ``port``)::

        status, headers, body = http_get(port, "/users/7")
        headers.get("x-cache")      # 'hit' or 'miss'
    """
    with _connect(port) as sock:
        sock.sendall(_request_bytes(path))
        status, head, body, _, _ = _read_response(sock, b"")
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    return status, headers, body


# -- the load generator --------------------------------------------------------------------

#: One request: (start, seconds from the start of the run; latency, seconds; cache state
#: 1 = X-Cache HIT, 0 = MISS, -1 = no header; X-Worker pid or 0; index of the path).
Record = tuple[float, float, int, int, int]


@dataclass
class LoadResult:
    """What :func:`run_load` measured.  ``records`` are in no particular order."""

    paths: Sequence[str]
    duration: float
    records: list[Record] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    #: CPU seconds this process (the load generator) used during the run.
    client_cpu: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.records)

    @property
    def rps(self) -> float:
        """Completed requests per second of the run (or of the window)."""
        return self.requests / self.duration if self.duration > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the latency, in milliseconds (nearest rank)."""
        if not self.records:
            return float("nan")
        lat = sorted(r[1] for r in self.records)
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

    @property
    def hit_ratio(self) -> float | None:
        """The fraction of responses with ``X-Cache: HIT``; ``None`` if none had the
        header (an application without the response cache)."""
        marked = [r[2] for r in self.records if r[2] >= 0]
        return sum(marked) / len(marked) if marked else None

    def served_by(self, path_index: int, hit: bool) -> set[int]:
        """Worker pids that answered ``paths[path_index]`` with a HIT (or a MISS)."""
        want = 1 if hit else 0
        return {r[3] for r in self.records if r[4] == path_index and r[2] == want and r[3]}


class _Conn:
    """One client connection of the load generator and its request in flight."""

    __slots__ = ("sock", "fd", "buf", "out", "start", "index", "reused")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""
        self.out = b""          # request bytes not sent yet
        self.start = 0.0
        self.index = 0
        self.reused = False     # a request was already answered on this connection


def _response_length(buf: bytes) -> tuple[int, bytes] | None:
    """``(total bytes of the first response in buf, its lower-cased header block)``
    once the headers are in, else ``None``."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower() + b"\r\n"
    length = _field(head, b"\r\ncontent-length:")
    if length is None or not length.isdigit():
        raise HttpError("a response without Content-Length (not supported by the load "
                        "generator)")
    return end + 4 + int(length), head


def run_load(port: int, paths: Sequence[str], *, duration: float, connections: int = 8,
             max_requests: int = 200_000, seed: int = 1) -> LoadResult:
    """Drive GET requests for ``paths`` (uniformly at random) at ``127.0.0.1:port`` from
    ``connections`` concurrent clients, each with one request in flight at a time
    (keep-alive, reconnecting when the server closes), for ``duration`` seconds or
    ``max_requests`` requests, whichever comes first; requests in flight at the end are
    waited for (at most the request timeout).

    One thread multiplexes every connection with epoll (Linux): on a small machine the
    load generator shares the CPUs with the server, and threads would spend more of
    them on handing the GIL around than on HTTP.  The returned ``duration`` runs to the
    last response.

    Example (against a server on ``port``)::

        res = run_load(port, [f"/users/{i}" for i in range(1, 101)], duration=2)
        print(f"{res.rps:.0f} req/s, p99 {res.latency_ms(0.99):.2f} ms, "
              f"hits {res.hit_ratio:.1%}")
    """
    if connections < 1 or duration <= 0 or not paths:
        raise ValueError("need connections >= 1, duration > 0 and at least one path")
    encoded = [_request_bytes(p) for p in paths]
    result = LoadResult(list(paths), duration)
    rnd = random.Random(seed)
    clock = time.perf_counter
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    records = result.records
    errors: list[str] = []
    issued = 0
    cpu0 = time.process_time()
    t0 = clock()
    deadline = t0 + duration
    last = t0

    def fail(c: _Conn, what: str) -> None:
        errors.append(what)
        close(c)

    def close(c: _Conn) -> None:
        conns.pop(c.fd, None)
        with contextlib.suppress(OSError):
            ep.unregister(c.fd)
        c.sock.close()

    def due(now: float) -> bool:
        return now < deadline and issued < max_requests and len(errors) < 100

    def begin(c: _Conn | None, now: float) -> None:
        """Start the next request (on ``c``, else on a new connection), if any is due.
        Failed connections are replaced by the main loop, which keeps ``connections``
        of them open while requests are due."""
        nonlocal issued
        if not due(now):
            if c is not None:
                close(c)
            return
        issued += 1
        if c is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(sock)
            conns[c.fd] = c
            ep.register(c.fd, select.EPOLLOUT)
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                fail(c, f"connect: {os.strerror(err)}")
                return
        c.index = rnd.randrange(len(encoded))
        c.out = encoded[c.index]
        c.buf = b""
        c.start = now
        if c.reused:
            send(c)

    def send(c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            n = 0
        except OSError as e:
            fail(c, f"send: {e}")
            return
        c.out = c.out[n:]
        ep.modify(c.fd, select.EPOLLOUT if c.out else select.EPOLLIN)

    def receive(c: _Conn) -> None:
        nonlocal last
        try:
            chunk = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            fail(c, f"recv: {e}")
            return
        if not chunk:
            if c.reused and not c.buf:
                # The server closed an idle keep-alive connection just as we reused it:
                # not a failure, the main loop opens another connection.
                close(c)
                return
            fail(c, "connection closed before the response was complete")
            return
        c.buf += chunk
        try:
            got = _response_length(c.buf)
        except HttpError as e:
            fail(c, str(e))
            return
        if got is None or len(c.buf) < got[0]:
            return
        total, head = got
        now = clock()
        last = now
        status = int(head[9:12]) if head[9:12].isdigit() else 0
        if status != 200:
            fail(c, f"HTTP {status} for {encoded[c.index][:40]!r}")
            return
        state = _field(head, b"\r\nx-cache:")
        worker = _field(head, b"\r\nx-worker:") or b"0"
        records.append((c.start - t0, now - c.start, -1 if state is None else int(state == b"hit"),
                        int(worker) if worker.isdigit() else 0, c.index))
        if len(c.buf) > total:
            fail(c, "bytes after the response (pipelining is not used)")
        elif _field(head, b"\r\nconnection:") == b"close":
            close(c)
            begin(None, now)   # at once: the next poll may be a while away
        else:
            c.reused = True
            begin(c, now)

    try:
        while True:
            now = clock()
            for late in [c for c in conns.values() if now - c.start > REQUEST_TIMEOUT]:
                fail(late, f"no response within {REQUEST_TIMEOUT:.0f} s")
            while len(conns) < connections and due(now):
                begin(None, now)
            if not conns:
                break
            for fd, ev in ep.poll(0.5):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if ev & select.EPOLLOUT and conn.out:
                    send(conn)
                elif ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    receive(conn)
    finally:
        for c in list(conns.values()):
            close(c)
        ep.close()
    result.duration = max(last - t0, 1e-9) if records else duration
    result.client_cpu = time.process_time() - cpu0
    result.errors = len(errors)
    result.error_samples = errors[:5]
    return result


# -- running gunicorn ------------------------------------------------------------------------

_CONF = '''\
# Written by shmcache.demo: the hooks of workers/gunicorn_conf.py (one segment shared
# by every worker, created by the master, unlinked at its exit), plus a readiness mark.
import os
import shmcache.gunicorn

globals().update(shmcache.gunicorn.hooks())


def post_worker_init(worker):
    # The application is loaded: this worker can serve.  The demo waits for one mark
    # per worker instead of guessing with sleeps.
    path = os.path.join(os.environ["SHMCACHE_DEMO_READY_DIR"], str(os.getpid()))
    with open(path, "w"):
        pass
'''


def _parent_death_signal() -> None:
    # Runs in the child between fork and exec: the kernel sends gunicorn's master a
    # SIGTERM if the process that started it dies without stopping it (SIGKILL of the
    # demo); gunicorn then shuts down cleanly and unlinks its segment.  Linux only.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _children(pid: int) -> list[int]:
    """Live direct children of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return out


class GunicornServer:
    """A gunicorn master and its workers, started on a socket bound here (no port race)
    and stopped by PID.

    ``app``: ``module:attribute``; ``cwd``: the directory to import it from; ``env``:
    extra environment (``SHMCACHE_*`` of the caller's environment are dropped first).
    :meth:`start` returns once every worker has loaded the application.

    Example::

        with GunicornServer("flask_app:app", cwd=examples, env={"SHMCACHE_NAME": name},
                            workers=4, workdir=tmp) as srv:
            print(http_get(srv.port, "/users/7")[1]["x-cache"])
    """

    def __init__(self, app: str, *, cwd: Path, env: Mapping[str, str], workers: int,
                 workdir: Path, worker_class: str = "sync", extra_args: Sequence[str] = ()
                 ) -> None:
        self.app, self.cwd, self.workers = app, cwd, workers
        self.worker_class, self.extra_args = worker_class, list(extra_args)
        self.workdir = workdir
        self.ready_dir = workdir / f"ready-{uuid.uuid4().hex[:8]}"
        self.log_path = workdir / f"gunicorn-{uuid.uuid4().hex[:8]}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHE_")}
        root = str(Path(__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(cwd), root, os.environ.get("PYTHONPATH")]))
        self.env.update(env)
        self.env["SHMCACHE_DEMO_READY_DIR"] = str(self.ready_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def worker_pids(self) -> list[int]:
        """The workers that marked themselves ready (and still run)."""
        pids = [int(p.name) for p in self.ready_dir.iterdir()] if self.ready_dir.exists() else []
        return sorted(p for p in pids if os.path.exists(f"/proc/{p}"))

    def start(self) -> GunicornServer:
        self.ready_dir.mkdir(mode=0o700)
        conf = self.workdir / "gunicorn_demo_conf.py"
        conf.write_text(_CONF)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        fd = sock.fileno()
        os.set_inheritable(fd, True)
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(conf), "--workers",
               str(self.workers), "--worker-class", self.worker_class, "--bind", f"fd://{fd}",
               "--timeout", "60", "--graceful-timeout", "5", "--log-level", "warning",
               *self.extra_args, self.app]
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, pass_fds=(fd,),
                                             stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True,
                                             preexec_fn=_parent_death_signal)  # noqa: PLW1509
        finally:
            sock.close()   # gunicorn holds its own copy
        deadline = time.monotonic() + BOOT_TIMEOUT
        while len(self.worker_pids()) < self.workers:
            if self.proc.poll() is not None:
                raise DemoError(f"gunicorn exited with {self.proc.returncode}:\n"
                                f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"gunicorn's workers did not start within {BOOT_TIMEOUT:.0f} "
                                f"s:\n{self.log_tail()}")
            time.sleep(0.02)   # polling for the readiness marks, with a deadline
        return self

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the master (workers finish, the master unlinks the segment), then
        SIGKILL to whatever of the tree is left after ``timeout``.  Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        kids = _children(proc.pid)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(10)
        for pid in kids:   # a worker that outlived its master: never leave one behind
            if os.path.exists(f"/proc/{pid}"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_examples() -> Path:
    """The ``examples/`` directory of the source checkout this package runs from."""
    here = Path(__file__).resolve().parents[1] / "examples"
    if not (here / "flask_app.py").is_file():
        raise DemoError(f"the demo needs the examples of a source checkout ({here} has no "
                        "flask_app.py); run it from a clone of shmcache")
    return here


# -- the demo --------------------------------------------------------------------------------

class _Stop(Exception):
    """SIGTERM/SIGHUP arrived: unwind through every finally, then exit."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


@dataclass
class _Phase:
    label: str
    load: LoadResult
    computations: int
    workers: list[int]


def _json_get(port: int, path: str) -> Any:
    status, _, body = http_get(port, path)
    if status != 200:
        raise DemoError(f"GET {path} answered {status}")
    return json.loads(body)


def _run_phase(label: str, examples: Path, tmp: Path, *, cached: bool, args: argparse.Namespace,
               paths: Sequence[str], duration: float, servers: list[GunicornServer],
               segments: list[str]) -> tuple[_Phase, dict[str, Any] | None]:
    name = f"{args.name}-{'cached' if cached else 'uncached'}"
    segments.append(name)
    env = {"SHMCACHE_NAME": name, "SHMCACHE_SIZE_MB": "64",
           "SHMCACHE_LEVELS": "c_memory,disk", "SHMCACHE_DISK_PATH": str(tmp / f"disk-{name}"),
           "TMPDIR": str(tmp),   # the sidecar's lock file goes there, removed with it
           "EXAMPLE_CACHE": "1" if cached else "0", "EXAMPLE_WORK_MS": str(args.work_ms)}
    srv = GunicornServer("flask_app:app", cwd=examples, env=env, workers=args.workers,
                         workdir=tmp)
    servers.append(srv)
    srv.start()
    print(f"  {label}: gunicorn master pid {srv.pid}, workers {srv.worker_pids()}, "
          f"port {srv.port}; {duration:.1f} s of load ...", flush=True)
    load = run_load(srv.port, paths, duration=duration, connections=args.connections,
                    max_requests=args.max_requests, seed=args.seed)
    if load.errors:
        raise DemoError(f"{label}: {load.errors} requests failed, e.g. "
                        f"{load.error_samples[:3]}\n{srv.log_tail()}")
    computations = int(_json_get(srv.port, "/computations")["count"])
    evidence = _evidence(srv, load, paths) if cached else None
    if evidence is not None:
        evidence["disk_entries"] = _disk_entries(Path(env["SHMCACHE_DISK_PATH"]))
        evidence["disk_path"] = env["SHMCACHE_DISK_PATH"]
    workers = srv.worker_pids()
    srv.stop()
    return _Phase(label, load, computations, workers), evidence


def _evidence(srv: GunicornServer, load: LoadResult, paths: Sequence[str]) -> dict[str, Any]:
    """Who computed the evidence path, and which workers served it as a hit.  Workers
    that happened not to serve it during the load get a few more requests (bounded)."""
    idx = EVIDENCE_PATH_INDEX - 1 if len(paths) >= EVIDENCE_PATH_INDEX else 0
    path = paths[idx]
    hit_by = load.served_by(idx, hit=True)
    workers = set(srv.worker_pids())
    for _ in range(400):
        if workers <= hit_by:
            break
        _, headers, _ = http_get(srv.port, path)   # a fresh connection may reach another
        if headers.get("x-cache") == "hit" and headers.get("x-worker", "").isdigit():
            hit_by.add(int(headers["x-worker"]))
    info = _json_get(srv.port, f"/computations?path={path}")
    return {"path": path, "count": info["count"], "computed_by": info["pids"],
            "hit_by": sorted(hit_by), "workers": sorted(workers)}


def _disk_entries(path: Path) -> int | None:
    """Entries the sidecar has written behind to the disk level (L3), read-only; ``None``
    if that cannot be read.  The level is a diskcache directory: one SQLite table."""
    db = path / "cache.db"
    deadline = time.monotonic() + 2.0
    n: int | None = None
    while time.monotonic() < deadline:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                    timeout=2.0)) as conn:
                n = int(conn.execute("SELECT COUNT(*) FROM Cache").fetchone()[0])
        except sqlite3.Error:
            n = None
        if n:
            return n
        time.sleep(0.05)   # write-behind runs every 10 ms: poll briefly, with a deadline
    return n


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.1%}"


def _table(phases: Sequence[_Phase]) -> str:
    rows = [("", "requests/s", "p50 ms", "p99 ms", "hit ratio", "computations", "requests")]
    for ph in phases:
        ld = ph.load
        rows.append((ph.label, f"{ld.rps:,.0f}", f"{ld.latency_ms(0.50):.2f}",
                     f"{ld.latency_ms(0.99):.2f}", _fmt_ratio(ld.hit_ratio),
                     f"{ph.computations:,}", f"{ld.requests:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shmcache demo",
        description="Run examples/flask_app.py under gunicorn, drive a bounded loopback "
                    "load without and with the shared cache, print the figures.")
    p.add_argument("--workers", type=int, default=4, help="gunicorn sync workers (4)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of load in all, half without and half with the cache (10)")
    p.add_argument("--connections", type=int, default=8, help="concurrent clients (8)")
    p.add_argument("--keys", type=int, default=100, help="distinct URLs /users/1..K (100)")
    p.add_argument("--work-ms", type=float, default=5.0,
                   help="CPU milliseconds one computation of a URL costs (5)")
    p.add_argument("--max-requests", type=int, default=200_000,
                   help="bound on the requests of each half (200000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the key choice")
    p.add_argument("--name", default=f"shmcache-demo-{os.getpid()}-{uuid.uuid4().hex[:8]}",
                   help="prefix of the two segments' names (-uncached, -cached); unique "
                        "by default")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 ok, 1 failed, 2 bad arguments).

    Example::

        >>> main(["--workers", "0"])
        shmcache demo: --workers, --connections and --keys must be at least 1, --duration > 0
        2
    """
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if min(args.workers, args.connections, args.keys) < 1 or args.duration <= 0:
        print("shmcache demo: --workers, --connections and --keys must be at least 1, "
              "--duration > 0")
        return 2
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    servers: list[GunicornServer] = []
    segments: list[str] = []
    tmp: Path | None = None
    try:
        examples = find_examples()
        tmp = Path(tempfile.mkdtemp(prefix="shmcache-demo-"))
        return _demo(args, examples, tmp, servers, segments)
    except DemoError as e:
        print(f"shmcache demo: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop) as e:
        print(f"shmcache demo: interrupted ({type(e).__name__} {e}); stopped everything",
              file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short (it is bounded:
        # SIGTERM, then SIGKILL after 15 s per server).
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            old.setdefault(s, signal.getsignal(s))
            signal.signal(s, signal.SIG_IGN)
        for srv in servers:
            srv.stop()
        for name in segments:
            # The master unlinks its segment at exit; this covers a master that was
            # killed instead.
            if segment_exists(name):
                unlink_segment(name)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)


def _demo(args: argparse.Namespace, examples: Path, tmp: Path, servers: list[GunicornServer],
          segments: list[str]) -> int:
    paths = [f"/users/{i}" for i in range(1, args.keys + 1)]
    half = args.duration / 2
    print(f"shmcache demo: examples/flask_app.py under gunicorn, {args.workers} sync workers; "
          f"{args.connections} connections over {args.keys} URLs on 127.0.0.1; "
          f"{args.work_ms:g} ms of CPU per computation")
    print("  cache: shared memory (64 MiB segment) + disk, i.e. "
          "CacheConfig(levels=(C_MEMORY, DISK)); no Redis")
    print(f"  segments {args.name}-uncached, {args.name}-cached; workdir {tmp} "
          "(both removed at exit)")
    before, _ = _run_phase("uncached", examples, tmp, cached=False, args=args, paths=paths,
                           duration=half, servers=servers, segments=segments)
    after, ev = _run_phase("shmcache (memory + disk)", examples, tmp, cached=True, args=args,
                           paths=paths, duration=half, servers=servers, segments=segments)
    assert ev is not None
    print()
    print(_table([before, after]))
    if before.load.rps > 0:
        print(f"\nspeed-up: {after.load.rps / before.load.rps:.1f}x requests/s, p50 "
              f"{before.load.latency_ms(0.5) / after.load.latency_ms(0.5):.1f}x lower; "
              f"{after.computations} computations for {args.keys} URLs with the cache "
              f"(once per URL per host), {before.computations:,} without")
    computed = ev["computed_by"]
    others = [p for p in ev["hit_by"] if p not in computed]
    print()
    if len(computed) == 1:
        line = (f"key {ev['path']} computed once by pid {computed[0]}, served as HIT by pids "
                f"{', '.join(map(str, others)) or '(none)'}")
        if computed[0] in ev["hit_by"]:
            line += f" (and by {computed[0]} itself)"
        print(line)
    else:
        print(f"key {ev['path']} computed {len(computed)} times, by pids "
              f"{', '.join(map(str, computed))}; served as HIT by pids "
              f"{', '.join(map(str, ev['hit_by']))}")
    print(f"workers: {', '.join(map(str, ev['workers']))}")
    if ev["disk_entries"] is not None:
        print(f"disk level: {ev['disk_entries']} entries written behind by the sidecar (in the "
              f"gunicorn master) to {ev['disk_path']}")
    if not others and args.workers > 1:
        print("shmcache demo: no worker other than the one that computed it served a hit",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
