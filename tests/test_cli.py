"""The ``shmcache`` command against live segments written by other processes.

A writer (a fresh interpreter, not a fork) creates the segment through the Cache API,
fills it with known entries, publishes its Python-level figures and stays attached
until its stdin closes; every command runs as its own process (``python -m shmcache``,
and once through the installed entry point), and its exit status and output are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import new_name, patch_bytes, read_bytes
from prometheus_client.parser import text_string_to_metric_families

from shmcache import Cache, CacheConfig, Segment, unlink_segment

SECRET = "s3cr3t-VALUE-never-in-logs"

WRITER = textwrap.dedent(f"""
    import sys
    from shmcache import Cache, CacheConfig
    from shmcache.metrics import Publisher
    cache = Cache(CacheConfig(name=sys.argv[1], c_memory_size_mb=8))
    for i in range(5):
        cache.set(f"user:{{i}}", {{"id": i, "name": f"user {{i}}"}})
    cache.set("session:1", "{SECRET}")
    cache.set("tagged:1", "t1", tags=["blue"])
    cache.set("plain:1", "p1")
    cache.set("nsk", "in namespace", namespace="tenant-a")
    cache.segment.set("raw:1", b"\\x00\\x01raw")

    @cache.cached(ttl=60, name="square")
    def square(x):
        return x * x

    for x in (1, 2, 1, 1):
        square(x)
    Publisher(cache, interval=60).publish()
    print("ready", flush=True)
    sys.stdin.readline()
    cache.close()
""")


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m shmcache ARGS`` in a fresh process."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SHMCACHE_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True,
                          text=True, env=e, timeout=timeout, input=stdin)


def _start_writer(name: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", WRITER, name], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", f"writer did not start: {line!r}"
    return p


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    """The name of a segment a separate, still running process wrote."""
    name = new_name("cli-")
    p = _start_writer(name)
    try:
        yield name
    finally:
        assert p.stdin is not None
        p.stdin.close()
        try:
            p.wait(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            unlink_segment(name)


@pytest.fixture
def scratch() -> Iterator[str]:
    """A segment a test may damage or clear (created by a separate process)."""
    name = new_name("clis-")
    p = _start_writer(name)
    assert p.stdin is not None
    p.stdin.close()
    p.wait(timeout=30)
    try:
        yield name
    finally:
        unlink_segment(name)


def test_installed_entry_point_runs() -> None:
    exe = Path(sys.executable).with_name("shmcache")
    assert exe.exists(), "the console script `shmcache` is not installed"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for cmd in ("stats", "keys", "get", "delete", "invalidate", "verify", "clear", "warm",
                "bench", "dashboard", "demo", "sidecar", "list"):
        assert cmd in r.stdout


def test_list_finds_the_segment(live: str) -> None:
    r = run_cli("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert live in rows
    assert rows[live]["status"] == "ok"
    assert rows[live]["entries"] >= 10
    assert rows[live]["live_processes"] >= 1  # the writer (the command's own slot excluded)
    assert rows[live]["mode"] == "0o600"


def test_stats_table_and_json(live: str) -> None:
    r = run_cli("stats", "-n", live)
    assert r.returncode == 0, r.stderr
    assert f"segment {live}" in r.stdout
    assert "(this command)" in r.stdout
    assert "square" in r.stdout          # per-function figures published by the writer
    j = run_cli("stats", "-n", live, "--json")
    snap = json.loads(j.stdout)
    assert snap["segment"] == live
    assert snap["stats"]["entries"] >= 10
    assert snap["cache"]["groups"]["functions"]["square"]["hits"] == 2
    assert snap["cache"]["groups"]["functions"]["square"]["misses"] == 2
    pids = {s["pid"] for s in snap["slots"]}
    assert len(pids) >= 2                # the writer and this command


def test_stats_name_from_environment(live: str) -> None:
    r = run_cli("stats", "--json", env={"SHMCACHE_NAME": live})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["segment"] == live


def test_stats_watch_refreshes(live: str) -> None:
    r = run_cli("stats", "-n", live, "--watch", "0.05", "--count", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"segment {live}") == 3
    assert "ops/s" in r.stdout           # a rate from the second frame on
    j = run_cli("stats", "-n", live, "--watch", "0.05", "--count", "2", "--json")
    frames = [json.loads(line) for line in j.stdout.splitlines()]
    assert len(frames) == 2 and frames[1]["time"] >= frames[0]["time"]


def test_missing_segment_is_exit_2() -> None:
    r = run_cli("stats", "-n", new_name("absent-"))
    assert r.returncode == 2
    assert "no segment named" in r.stderr


def test_keys_pattern_limit_and_internal(live: str) -> None:
    r = run_cli("keys", "-n", live, "user:*")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == [f"user:{i}" for i in range(5)]
    r = run_cli("keys", "-n", live, "user:*", "--limit", "2")
    assert len(r.stdout.split()) == 2
    assert "more keys match" in r.stderr
    everything = run_cli("keys", "-n", live, "--limit", "0").stdout.split()
    assert "raw:1" in everything and "session:1" in everything
    assert not any(k.startswith("__shmcache__:") for k in everything)
    internal = run_cli("keys", "-n", live, "--all", "--limit", "0").stdout.split()
    assert any(k.startswith("__shmcache__:metrics:") for k in internal)


def test_get_decodes_like_the_cache(live: str) -> None:
    r = run_cli("get", "-n", live, "user:3")
    assert r.returncode == 0, r.stderr
    assert "'name': 'user 3'" in r.stdout
    r = run_cli("get", "-n", live, "user:3", "--json")
    assert json.loads(r.stdout) == {"id": 3, "name": "user 3"}
    r = run_cli("get", "-n", live, "nsk", "--namespace", "tenant-a")
    assert r.stdout.strip() == "in namespace"
    raw = subprocess.run([sys.executable, "-m", "shmcache", "get", "-n", live, "raw:1",
                          "--raw"], capture_output=True, timeout=60)
    assert raw.returncode == 0 and raw.stdout == b"\x00\x01raw"
    info = run_cli("get", "-n", live, "raw:1", "--info")
    assert "length     5 bytes" in info.stdout and "ttl left   none" in info.stdout
    miss = run_cli("get", "-n", live, "user:999")
    assert miss.returncode == 1 and "not found" in miss.stderr


def test_delete_then_gone(live: str) -> None:
    r = run_cli("delete", "-n", live, "plain:1")
    assert r.returncode == 0 and "deleted plain:1" in r.stdout
    assert run_cli("delete", "-n", live, "plain:1").returncode == 1
    assert run_cli("get", "-n", live, "plain:1").returncode == 1


def test_invalidate_tag_and_namespace(live: str) -> None:
    assert run_cli("invalidate", "-n", live).returncode == 2
    assert run_cli("get", "-n", live, "tagged:1").returncode == 0
    r = run_cli("invalidate", "-n", live, "--tag", "blue")
    assert r.returncode == 0 and "invalidated tag blue" in r.stdout
    assert run_cli("get", "-n", live, "tagged:1").returncode == 1
    assert run_cli("get", "-n", live, "user:1").returncode == 0   # untagged: untouched
    r = run_cli("invalidate", "-n", live, "--namespace", "tenant-a")
    assert r.returncode == 0
    assert run_cli("get", "-n", live, "nsk", "--namespace", "tenant-a").returncode == 1
    # Seen by another process that uses the Cache API, not only by the command.
    with Cache(CacheConfig(name=live), segment=Segment.attach(live)) as c:
        assert c.get("tagged:1", "gone") == "gone"
        c.segment.close()


def test_verify_sound_then_damaged(scratch: str) -> None:
    r = run_cli("verify", "-n", scratch)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sound" in r.stdout
    # Flip one byte of a stored value in place: reads trust the segment, verify checks.
    image = read_bytes(scratch)
    at = image.find(SECRET.encode())
    assert at > 0
    patch_bytes(scratch, at + 3, b"X")
    r = run_cli("verify", "-n", scratch)
    assert r.returncode == 1, r.stdout
    assert "problem" in r.stdout and "checksum" in r.stdout


def test_clear_asks_then_clears(scratch: str) -> None:
    r = run_cli("clear", "-n", scratch, stdin="")
    assert r.returncode == 2 and "--yes" in r.stderr
    with Segment.attach(scratch) as s:
        assert len(s) > 0
    r = run_cli("clear", "-n", scratch, "--yes")
    assert r.returncode == 0, r.stderr
    with Segment.attach(scratch) as s:
        assert len(s) == 0


def test_warm_json_and_text(live: str, tmp_path: Path) -> None:
    (tmp_path / "warm_loaders.py").write_text(textwrap.dedent("""
        def profile(user_id):
            return {"profile": user_id}
        def broken():
            raise RuntimeError("loader failed")
        def provider():
            return [(f"prov:{i}", (lambda i=i: i * 10)) for i in range(3)]
        def constant():
            return "c"
    """))
    spec = tmp_path / "warm.json"
    spec.write_text(json.dumps({
        "profile:7": {"loader": "warm_loaders:profile", "args": [7]},
        "literal:1": {"value": [1, 2, 3]},
        "broken:1": "warm_loaders:broken",
    }))
    r = run_cli("warm", "-n", live, str(spec), "--path", str(tmp_path))
    assert r.returncode == 1, r.stderr           # one loader failed
    assert "warm: 2 loaded, 0 skipped (already fresh), 1 failed" in r.stdout
    assert "broken:1: RuntimeError: loader failed" in r.stderr
    assert "100%" in r.stderr                     # the progress bar finished
    assert json.loads(run_cli("get", "-n", live, "profile:7", "--json").stdout) == \
        {"profile": 7}
    assert json.loads(run_cli("get", "-n", live, "literal:1", "--json").stdout) == [1, 2, 3]
    # Warm again: fresh keys are skipped.
    r = run_cli("warm", "-n", live, str(spec), "--path", str(tmp_path), "--no-progress")
    assert "2 skipped" in r.stdout and r.stderr.count("%") == 0

    text = tmp_path / "warm.txt"
    text.write_text("# providers and single keys\nwarm_loaders:provider\n"
                    "const:1 warm_loaders:constant\n")
    r = run_cli("warm", "-n", live, str(text), "--path", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "4 loaded" in r.stdout
    assert run_cli("get", "-n", live, "prov:2").stdout.strip() == "20"
    bad = tmp_path / "bad.txt"
    bad.write_text("nomodule_here:fn\n")
    r = run_cli("warm", "-n", live, str(bad))
    assert r.returncode == 2 and "cannot import" in r.stderr


def test_metrics_command_parses(live: str) -> None:
    r = run_cli("metrics", "-n", live)
    assert r.returncode == 0, r.stderr
    fams = {f.name: f for f in text_string_to_metric_families(r.stdout)}
    assert fams["shmcache_up"].samples[0].value == 1
    fn = [s for s in fams["shmcache_function_hits"].samples if s.labels["function"] == "square"]
    assert fn and fn[0].value == 2


def test_bench_runs_the_repository_suite() -> None:
    r = run_cli("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout                 # benchmarks/run.py's own usage


@pytest.mark.parametrize("cmd", ["sidecar", "demo"])
def test_optional_commands_dispatch(cmd: str) -> None:
    import importlib.util
    r = run_cli(cmd, "--help")
    if importlib.util.find_spec(f"shmcache.{cmd}") is None:
        assert r.returncode == 2
        assert f"shmcache.{cmd} is not installed" in r.stderr
    else:
        # Arguments reach the module's own main(argv): its usage, not ours.
        assert r.returncode == 0, r.stderr
        assert "usage" in r.stdout.lower()
        assert "Inspect and operate shmcache segments" not in r.stdout


def test_nothing_logs_a_value(live: str, tmp_path: Path) -> None:
    outs = []
    for args in (("stats",), ("keys", "--all"), ("metrics",), ("verify",),
                 ("get", "session:1", "--info"), ("invalidate", "--tag", "x")):
        r = run_cli("--log-level", "debug", args[0], "-n", live, *args[1:])
        assert r.returncode == 0, (args, r.stderr)
        outs.append(r.stdout + r.stderr)
    assert "shmcache.cli" in "".join(outs)        # debug logging was on
    assert not any(SECRET in o for o in outs)
