"""A 5 ms endpoint under gunicorn: shmcache's response cache against the alternatives.

Usage::

    python benchmarks/bench_server.py             # about 2 minutes on 2 cores
    python benchmarks/bench_server.py --quick     # smoke run (numbers not comparable)

Prints a table and writes ``build/bench_server.json``.

Method.  One Flask application (this file's :func:`create_app`): ``GET /users/<id>``
burns 5 ms of CPU time of its thread (a slow query) and answers ~100 bytes of JSON with
``Cache-Control: max-age=60``.  It runs under gunicorn with 4 sync workers (the default
worker class) on 127.0.0.1, in one of these variants:

* ``uncached``: the application as is;
* ``shmcache middleware``: wrapped in ``shmcache.http.CacheMiddleware`` (single flight
  on) over the embedded default, shared memory + disk (``levels=c_memory,disk``); a
  hit never enters Flask;
* ``shmcache via Flask-Caching``: the view decorated with Flask-Caching's
  ``@cache.cached(timeout=60)`` over ``shmcache.contrib.flask.ShmCache`` -- the same
  code path as the next two, only the store differs;
* ``Flask-Caching SimpleCache``: the same decorator over the per-process dict
  (each worker fills its own copy);
* ``Flask-Caching RedisCache``: the same decorator over a private ``redis-server``
  started on a free loopback port (no persistence; stopped by PID).

Load: the load generator of ``shmcache demo`` (:func:`shmcache.demo.run_load`, raw
sockets, one thread per connection) in this process, 8 concurrent connections, each
request for one of 100 hot URLs at random.  Every variant starts cold on a fresh server
and store: a ``--warmup`` run (2 s) whose figures are reported as "cold", then the
measured run (``--duration``, 5 s).  Hit ratio = 1 - computations / requests of the
measured run (the application counts its computations in a small segment of its own).
The variants run round-robin ``--rounds`` times (2) and each keeps its best round by
requests/s: the machine is shared, and alternation spreads drift over all of them.

The machine has 2 cores: the load generator competes with the server for them (its
CPU use is reported), so absolute numbers are lower than a separate client machine
would show; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Table, redis_available, redis_server, unique_name  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKERS = 4
KEYS = 100
CONNECTIONS = 8

#: (key, label, which store) in the order they run in a round.
VARIANTS: list[tuple[str, str]] = [
    ("uncached", "uncached"),
    ("shmcache", "shmcache middleware"),
    ("shmcache-fc", "shmcache via Flask-Caching"),
    ("simple", "Flask-Caching SimpleCache"),
    ("redis", "Flask-Caching RedisCache"),
]


# -- the application (imported by gunicorn's workers: bench_server:create_app()) ----------


def _burn_cpu(ms: float) -> None:
    # CPU time of this thread: the same cost whatever else the machine runs.
    deadline = time.thread_time() + ms / 1000
    while time.thread_time() < deadline:
        pass


def create_app() -> Any:
    """The benchmark's WSGI application for ``$BENCH_VARIANT`` (gunicorn calls this in
    every worker)."""
    from flask import Flask, Response, jsonify

    from shmcache import Segment

    variant = os.environ["BENCH_VARIANT"]
    work_ms = float(os.environ.get("BENCH_WORK_MS", "5"))
    counter = Segment.attach(os.environ["BENCH_COUNTER"])
    app = Flask("bench_server")

    def user(user_id: int) -> Response:
        counter.incr("computations", initial=0)
        _burn_cpu(work_ms)
        resp = jsonify({"id": user_id, "name": f"user {user_id}",
                        "plan": ("free", "pro")[user_id % 2], "computed_by": os.getpid()})
        resp.headers["Cache-Control"] = "max-age=60"
        return resp

    view: Callable[..., Any] = user
    if variant in ("shmcache-fc", "simple", "redis"):
        from flask_caching import Cache as FlaskCache

        config: dict[str, Any] = {
            "shmcache-fc": {"CACHE_TYPE": "shmcache.contrib.flask.ShmCache",
                            "CACHE_SHMCACHE_NAME": os.environ["SHMCACHE_NAME"]},
            "simple": {"CACHE_TYPE": "SimpleCache"},
            "redis": {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_HOST": "127.0.0.1",
                      "CACHE_REDIS_PORT": int(os.environ.get("BENCH_REDIS_PORT", "0"))},
        }[variant]
        fc = FlaskCache(app, config={**config, "CACHE_DEFAULT_TIMEOUT": 60})
        view = fc.cached(timeout=60)(user)
    app.add_url_rule("/users/<int:user_id>", "user", view)
    if variant == "shmcache":
        from shmcache.gunicorn import get_cache
        from shmcache.http import CacheMiddleware

        app.wsgi_app = CacheMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, get_cache(), single_flight=True)
    app.wsgi_app = _with_worker_header(app.wsgi_app)  # type: ignore[method-assign]
    return app


def _with_worker_header(inner: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(("X-Worker", str(os.getpid())))
            return start_response(status, headers, exc_info)
        return inner(environ, start)
    return wrapped


# -- the driver ------------------------------------------------------------------------------


def _figures(load: Any, computations: int) -> dict[str, Any]:
    requests = load.requests
    return {"requests": requests, "seconds": round(load.duration, 3), "rps": round(load.rps, 1),
            "p50_ms": round(load.latency_ms(0.50), 3), "p99_ms": round(load.latency_ms(0.99), 3),
            "computations": computations,
            "hit_ratio": round(1 - computations / requests, 4) if requests else None,
            "errors": load.errors, "client_cpu_cores": round(load.client_cpu / load.duration, 2)
            if load.duration else None}


def run_variant(variant: str, args: argparse.Namespace, tmp: Path,
                redis_port: int | None) -> dict[str, Any]:
    """One cold start of ``variant``: warm-up run, then the measured run."""
    from shmcache import Segment, segment_exists, unlink_segment
    from shmcache.demo import GunicornServer, run_load

    name = unique_name("srv")
    counter_name = unique_name("srvcount")
    counter = Segment.create(counter_name, size=1 << 20)
    env = {"SHMCACHE_NAME": name, "SHMCACHE_SIZE_MB": "64",
           "SHMCACHE_LEVELS": "c_memory,disk" if variant == "shmcache" else "c_memory",
           "SHMCACHE_DISK_PATH": str(tmp / f"disk-{name}"), "TMPDIR": str(tmp),
           "BENCH_VARIANT": variant, "BENCH_COUNTER": counter_name,
           "BENCH_WORK_MS": str(args.work_ms), "BENCH_REDIS_PORT": str(redis_port or 0)}
    paths = [f"/users/{i}" for i in range(1, KEYS + 1)]
    srv = GunicornServer("bench_server:create_app()", cwd=HERE, env=env, workers=WORKERS,
                         workdir=tmp)
    try:
        srv.start()
        cold = run_load(srv.port, paths, duration=args.warmup, connections=CONNECTIONS,
                        seed=1)
        c_cold = counter.incr("computations", 0, initial=0)
        warm = run_load(srv.port, paths, duration=args.duration, connections=CONNECTIONS,
                        seed=2)
        c_all = counter.incr("computations", 0, initial=0)
        if cold.errors or warm.errors:
            raise RuntimeError(f"{variant}: requests failed: "
                               f"{(cold.error_samples + warm.error_samples)[:3]}\n"
                               f"{srv.log_tail()}")
    finally:
        srv.stop()
        counter.close()
        unlink_segment(counter_name)
        if segment_exists(name):   # the master unlinks it; this covers a killed one
            unlink_segment(name)
    return {"cold": _figures(cold, c_cold), "warm": _figures(warm, c_all - c_cold)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of the cold run")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of the measured run")
    p.add_argument("--work-ms", type=float, default=5.0, help="CPU ms of one computation")
    p.add_argument("--only", help="comma-separated variant keys "
                   f"({', '.join(k for k, _ in VARIANTS)})")
    p.add_argument("--quick", action="store_true", help="1 round, 1 s + 1.5 s")
    p.add_argument("--json", default=str(ROOT / "build" / "bench_server.json"))
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every server started here is stopped by its PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.rounds, args.warmup, args.duration = 1, 1.0, 1.5
    chosen = [(k, label) for k, label in VARIANTS
              if not args.only or k in args.only.split(",")]
    notes: list[str] = []
    if any(k == "redis" for k, _ in chosen) and not redis_available():
        chosen = [(k, label) for k, label in chosen if k != "redis"]
        notes.append("Flask-Caching RedisCache: skipped, redis-server or redis-py missing")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in chosen}
    tmp = Path(tempfile.mkdtemp(prefix="shmbench-server-"))
    t_start = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            redis_port = None
            if any(k == "redis" for k, _ in chosen):
                redis_port = stack.enter_context(redis_server()).port
            for r in range(args.rounds):
                for key, label in chosen:
                    print(f"round {r + 1}/{args.rounds}: {label} ...", flush=True)
                    results[key].append(run_variant(key, args, tmp, redis_port))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: max(runs, key=lambda x: x["warm"]["rps"]) for k, runs in results.items()}
    base = best.get("uncached", {}).get("warm", {}).get("rps")
    table = Table(
        f"5 ms endpoint, gunicorn {WORKERS} sync workers, {CONNECTIONS} connections, "
        f"{KEYS} hot keys, 127.0.0.1 (best of {args.rounds} by requests/s)",
        ["variant", "req/s", "vs uncached", "p50 ms", "p99 ms", "hit ratio", "cold req/s",
         "computations", "client CPU"])
    for key, label in chosen:
        w, c = best[key]["warm"], best[key]["cold"]
        table.add(label, f"{w['rps']:,.0f}", f"{_ratio(w['rps'], base) or '-'}x",
                  f"{w['p50_ms']:.2f}", f"{w['p99_ms']:.2f}",
                  "-" if key == "uncached" else f"{w['hit_ratio']:.1%}",
                  f"{c['rps']:,.0f}", f"{c['computations'] + w['computations']:,}",
                  f"{w['client_cpu_cores']:.2f}")
    summary: dict[str, Any] = {}
    if "shmcache" in best:
        s = best["shmcache"]["warm"]
        summary["shmcache_vs_uncached_rps"] = _ratio(s["rps"], base)
        for key in ("simple", "redis", "shmcache-fc"):
            if key in best:
                o = best[key]["warm"]
                summary[f"shmcache_vs_{key}_rps"] = _ratio(s["rps"], o["rps"])
                summary[f"{key}_vs_shmcache_p99"] = _ratio(o["p99_ms"], s["p99_ms"])
        goal = summary.get("shmcache_vs_uncached_rps")
        ahead = all(s["rps"] > best[k]["warm"]["rps"] and s["p99_ms"] < best[k]["warm"]["p99_ms"]
                    for k in ("simple", "redis") if k in best)
        summary["goal_20x_uncached"] = bool(goal and goal >= 20)
        summary["goal_ahead_of_simple_and_redis"] = ahead
        notes.append(f"shmcache middleware: {goal}x uncached requests/s (goal >= 20x: "
                     f"{'met' if summary['goal_20x_uncached'] else 'NOT met'}); ahead of "
                     f"SimpleCache and RedisCache in req/s and p99: "
                     f"{'yes' if ahead else 'NO'}")
        for key in ("simple", "redis"):
            if key in best:
                notes.append(f"vs {dict(VARIANTS)[key]}: {summary[f'shmcache_vs_{key}_rps']}x "
                             f"req/s, p99 {summary[f'{key}_vs_shmcache_p99']}x lower")
    notes.append("cold req/s: the first run on a fresh server and store; computations: "
                 "both runs (a shared cache computes each key once per host, a per-process "
                 "one once per worker)")
    notes.append("client CPU: cores the load generator used (it shares the 2 cores)")
    table.notes = notes
    table.print()
    out = {"benchmark": "bench_server", "workers": WORKERS, "connections": CONNECTIONS,
           "keys": KEYS, "work_ms": args.work_ms, "rounds": args.rounds,
           "warmup_s": args.warmup, "duration_s": args.duration,
           "python": platform.python_version(), "cpus": os.cpu_count(),
           "elapsed_s": round(time.monotonic() - t_start, 1),
           "best": best, "runs": results, "summary": summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} ({out['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
