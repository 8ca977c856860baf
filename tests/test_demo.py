"""``shmcache demo`` as a user runs it: a subprocess, reduced to 2 workers and 2 s of load.

Checked: exit status 0, the table, the cross-worker evidence line, and that nothing it
started outlives it -- no gunicorn master or worker, no segment, no work directory --
also when it is stopped by SIGTERM in the middle, and when it is SIGKILLed (then the
kernel's parent-death signal makes gunicorn shut down and unlink its segment; only the
demo's own work directory remains, removed here).  The demo's segment names get the
test prefix (``--name``), so the session check in conftest.py would see a leak.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import new_name
from server_apps.harness import ROOT, alive, free_port, wait_until

from shmcache import segment_exists, unlink_segment
from shmcache.demo import run_load

pytestmark = [
    pytest.mark.slow,
    # The sanitizer run copies shmcache/ and tests/ only: no examples/ to run.
    pytest.mark.skipif(not (ROOT / "examples" / "flask_app.py").is_file(),
                       reason="examples/ is not part of this copy of the suite"),
]

SERVER_LINE = re.compile(r"gunicorn master pid (\d+), workers \[([\d, ]+)\]")
EVIDENCE = re.compile(r"^key /users/7 computed once by pid (\d+), served as HIT by pids "
                      r"([\d, ]+)", re.M)


class Demo:
    """One run of the demo; :meth:`cleanup` kills and unlinks whatever a failure left."""

    def __init__(self, *args: str) -> None:
        self.name = new_name("demo-")
        self.segments = [f"{self.name}-uncached", f"{self.name}-cached"]
        self.out = tempfile.TemporaryFile()  # noqa: SIM115 - closed in cleanup()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmcache.demo", "--name", self.name, *args],
            cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.out.seek(0)
        return self.out.read().decode(errors="replace")

    def pids(self) -> list[int]:
        """Every gunicorn master and worker the demo reported."""
        found = []
        for master, workers in SERVER_LINE.findall(self.output()):
            found.append(int(master))
            found += [int(w) for w in workers.split(",")]
        return found

    def workdir(self) -> Path | None:
        m = re.search(r"workdir (\S+)", self.output())
        return Path(m.group(1)) if m else None

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for name in self.segments:
            unlink_segment(name)
        wd = self.workdir()
        if wd is not None:
            shutil.rmtree(wd, ignore_errors=True)
        self.out.close()

    def assert_nothing_left(self) -> None:
        pids = self.pids()
        assert pids, self.output()
        wait_until(lambda: not any(alive(p) for p in pids), 20.0, "gunicorn to be gone")
        assert not any(segment_exists(n) for n in self.segments)


@pytest.fixture
def demo() -> Iterator[list[Demo]]:
    runs: list[Demo] = []
    yield runs
    for d in runs:
        d.cleanup()


def test_demo_prints_the_table_and_cross_worker_hits(demo: list[Demo]) -> None:
    d = Demo("--duration", "2", "--workers", "2", "--connections", "4")
    demo.append(d)
    rc = d.proc.wait(120)
    out = d.output()
    assert rc == 0, out
    assert re.search(r"requests/s\s+p50 ms\s+p99 ms\s+hit ratio\s+computations", out), out
    assert re.search(r"^uncached\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+-\s", out, re.M), out
    row = re.search(r"^shmcache \(memory \+ disk\)\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+"
                    r"([\d.]+)%\s+([\d,]+)\s+([\d,]+)$", out, re.M)  # hit ratio, ...
    assert row, out
    computations, requests = (int(row.group(i).replace(",", "")) for i in (2, 3))
    # At most once per URL for the whole host (single flight), however many requests.
    assert 0 < computations <= min(100, requests), out
    ev = EVIDENCE.search(out)
    assert ev, out
    computed_by = int(ev.group(1))
    hit_by = [int(p) for p in ev.group(2).split(",")]
    cached_workers = [int(w) for w in SERVER_LINE.findall(out)[1][1].split(",")]
    # Computed by one worker of the cached server, a hit in the other one.
    assert computed_by in cached_workers
    assert hit_by and computed_by not in hit_by and set(hit_by) <= set(cached_workers)
    d.assert_nothing_left()
    wd = d.workdir()
    assert wd is not None and not wd.exists()


def test_demo_stopped_by_sigterm_stops_everything(demo: list[Demo]) -> None:
    d = Demo("--duration", "20", "--workers", "2")
    demo.append(d)
    wait_until(lambda: d.pids() or d.proc.poll() is not None, 60.0, "the first server")
    assert d.proc.poll() is None, d.output()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(60) == 143, d.output()
    assert "interrupted" in d.output()
    d.assert_nothing_left()
    wd = d.workdir()
    assert wd is not None and not wd.exists()


def test_gunicorn_goes_away_when_the_demo_is_killed(demo: list[Demo]) -> None:
    d = Demo("--duration", "20", "--workers", "2")
    demo.append(d)
    wait_until(lambda: d.pids() or d.proc.poll() is not None, 60.0, "the first server")
    assert d.proc.poll() is None, d.output()
    d.proc.kill()
    d.proc.wait(10)
    # No finally ran in the demo: the master got SIGTERM from the kernel
    # (PR_SET_PDEATHSIG), stopped its workers and unlinked its segment itself.
    d.assert_nothing_left()


def test_load_generator_counts_refused_connections_and_stops() -> None:
    # Nothing listens on the port: every attempt fails, is counted, and the run ends by
    # itself (at the duration, or after 100 failures) instead of hanging or raising.
    res = run_load(free_port(), ["/users/1"], duration=0.5, connections=2)
    assert res.requests == 0
    assert res.errors > 0
    assert any("refused" in e.lower() for e in res.error_samples), res.error_samples
