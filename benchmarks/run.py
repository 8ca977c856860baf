"""Run shmcache and its peers side by side and print ratio tables.

Usage::

    python benchmarks/run.py                 # everything (< 15 minutes on 2 cores)
    python benchmarks/run.py --quick         # small sizes: a smoke run
    python benchmarks/run.py --only single,hitratio --json out.json

Workloads (see benchmarks/README.md for the method of each): ``single`` (ns/op in one
process), ``multi`` (two processes on one store, aggregate ops/s), ``memory`` (overhead
per entry) and ``hitratio`` (capacity 100,000 on the standard traces); and, each run as
its own script: ``decorator`` (bench_decorator.py: a cached function's hit against
lru_cache, cachetools, cachebox, warp-cache, diskcache), ``metrics`` (bench_metrics.py:
the hit-path cost of metrics), ``tiers`` (bench_tiers.py: cross-host invalidation lag,
L2 hit against bare redis-py, journal throughput, Redis killed under load) and
``server`` (bench_server.py: the 5 ms endpoint under gunicorn, cached against uncached,
flask-caching SimpleCache and Redis).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKLOADS = ("single", "multi", "memory", "hitratio", "decorator", "metrics", "tiers",
             "server")
#: Workloads that are scripts of their own: (file, arguments of a --quick run).
SCRIPTS: dict[str, tuple[str, list[str]]] = {
    "decorator": ("bench_decorator.py", ["--keys", "500", "--repeats", "2"]),
    "metrics": ("bench_metrics.py", ["--quick"]),
    "tiers": ("bench_tiers.py", ["--quick"]),
    "server": ("bench_server.py", ["--quick"]),
}


def _run_script(name: str, quick: bool) -> dict[str, Any]:
    """Run one script workload in its own interpreter, its output passed through."""
    here = os.path.dirname(os.path.abspath(__file__))
    script, quick_args = SCRIPTS[name]
    cmd = [sys.executable, os.path.join(here, script)] + (quick_args if quick else [])
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, check=False).returncode
    return {"command": " ".join(cmd), "exit": rc,
            "seconds": round(time.perf_counter() - t0, 1)}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "machine": platform.machine(),
           "cpus": str(os.cpu_count())}
    try:
        import shmcache

        out["shmcache"] = (f"{getattr(shmcache, '__version__', '?')} "
                           f"({os.path.dirname(os.path.abspath(shmcache.__file__))})")
    except Exception as e:  # noqa: BLE001 - report, do not fail
        out["shmcache"] = f"unavailable ({type(e).__name__})"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        out["git"] = rev or "-"
    except (OSError, subprocess.SubprocessError):
        out["git"] = "-"
    for dist in ("warp_cache", "cachebox", "theine", "diskcache", "redis",
                 "hiredis", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse options, run the chosen workloads, print tables, optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--json", metavar="PATH", help="also write all numbers as JSON")
    args = ap.parse_args(argv)
    chosen = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in chosen if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {bad}; choose from {WORKLOADS}")

    from benchmarks import bench_hitratio, bench_memory, bench_multi, bench_single

    modules: dict[str, Any] = {"single": bench_single, "multi": bench_multi, "memory": bench_memory,
               "hitratio": bench_hitratio}
    vers = _versions()
    print("# shmcache benchmarks" + (" (QUICK: smoke sizes, not comparable)" if args.quick
                                     else ""))
    print(", ".join(f"{k} {v}" for k, v in vers.items()))
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  (WARNING: other processes are busy; numbers will be noisy)"
             if load[0] > 0.5 else ""))
    print(flush=True)
    report: dict[str, Any] = {"versions": vers, "quick": args.quick, "load_start": load,
                              "results": {},
                              "seconds": {}}
    t_all = time.perf_counter()
    for w in WORKLOADS:
        if w not in chosen:
            continue
        print(f"## {w}", flush=True)
        print(flush=True)
        t0 = time.perf_counter()
        if w in SCRIPTS:
            report["results"][w] = _run_script(w, args.quick)
        else:
            report["results"][w] = modules[w].run(quick=args.quick)
        report["seconds"][w] = round(time.perf_counter() - t0, 1)
        print(f"({w}: {report['seconds'][w]:.0f} s)", flush=True)
        print(flush=True)
    load = os.getloadavg()
    print(f"total {time.perf_counter() - t_all:.0f} s; load average at end: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        print(f"wrote {args.json}")
    failed = [w for w in SCRIPTS if report["results"].get(w, {}).get("exit", 0)]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
