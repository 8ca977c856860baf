"""Two independent processes share one cache segment by name.

    python examples/two_processes.py        (or: make demo)

The script starts two fresh interpreters (``subprocess`` with ``sys.executable``, not
``fork``): a *writer* that creates the segment and stores some keys, then stays attached,
and a *reader* that attaches the same segment by name, reads the keys back, prints what
it saw and the segment's statistics (entries, hit ratio, one slot per attached process),
and finally unlinks the segment.  Nothing is copied between the two processes except
through the shared-memory segment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from shmcache import Segment, unlink_segment  # noqa: E402

SIZE = 16 << 20
USERS = {f"user:{i}": {"id": i, "name": n, "plan": p} for i, (n, p) in enumerate(
    [("alice", "pro"), ("bob", "free"), ("carol", "team"), ("dave", "free"), ("erin", "pro")],
    start=1)}
BIG_KEY = "report:2024"
BIG_VALUE = bytes(range(256)) * 1024  # 256 KiB: larger than one slab page
HITS_KEY = "page:hits"


def writer(name: str) -> int:
    seg = Segment.open(name, size=SIZE)
    for key, user in USERS.items():
        seg.set(key, json.dumps(user).encode())
    seg.set(BIG_KEY, BIG_VALUE)
    seg.set("session:xyz", b"expires soon", ttl=300)
    for _ in range(41):
        seg.incr(HITS_KEY, initial=0)
    print(f"[writer pid {os.getpid()}, slot {seg.slot}] wrote {len(USERS)} users, "
          f"a {len(BIG_VALUE) // 1024} KiB report, a session with a 300 s TTL and "
          f"{HITS_KEY}=41", flush=True)
    print("READY", flush=True)
    sys.stdin.read()  # stay attached until the parent says we are done
    seg.close()
    print(f"[writer pid {os.getpid()}] detached", flush=True)
    return 0


def reader(name: str, writer_pid: int) -> int:
    seg = Segment.attach(name)
    me = os.getpid()
    print(f"[reader pid {me}, slot {seg.slot}] attached {name!r} "
          f"(created by pid {writer_pid})")
    ok = True
    for key, user in USERS.items():
        raw = seg.get(key)
        got = json.loads(raw) if raw is not None else None
        ok &= got == user
        print(f"  {key:<12} -> {got}")
    big = seg.get(BIG_KEY)
    ok &= big == BIG_VALUE
    print(f"  {BIG_KEY:<12} -> {len(big or b'') // 1024} KiB, "
          f"{'intact' if big == BIG_VALUE else 'DIFFERENT'}")
    info = seg.info("session:xyz")
    left = (info.expires_at - time.time()) if info and info.expires_at else None
    ok &= left is not None and 0 < left <= 300
    print(f"  {'session:xyz':<12} -> {seg.get('session:xyz')!r}, "
          f"expires in {left:.0f} s" if left is not None else "  session:xyz  -> missing")
    hits = seg.incr(HITS_KEY)
    ok &= hits == 42
    print(f"  {HITS_KEY:<12} -> incremented by the reader to {hits}")
    missing = seg.get("user:999")
    ok &= missing is None
    print(f"  {'user:999':<12} -> {missing} (a miss, on purpose)")

    st = seg.stats()
    print("segment stats:")
    print(f"  entries      {st.entries}")
    print(f"  hit ratio    {st.hit_ratio:.2f}  ({st.counters['hits']} hits, "
          f"{st.counters['misses']} misses, {st.counters['sets']} sets)")
    print(f"  memory       {st.used_bytes / 1024:.0f} KiB used of "
          f"{st.data_bytes / 1024:.0f} KiB ({st.size_bytes >> 20} MiB segment, "
          f"policy {st.policy})")
    print(f"  live slots   {st.live_slots}")
    for s in st.slots:
        who = "reader" if s.pid == me else "writer" if s.pid == writer_pid else "?"
        print(f"    slot {s.slot:<3} pid {s.pid:<8} {s.state:<5} ({who}): "
              f"{s.counters['sets']} sets, {s.counters['hits']} hits, "
              f"{s.counters['misses']} misses")
    pids = {s.pid for s in st.slots if s.state == "live"}
    ok &= {me, writer_pid} <= pids
    ok &= st.entries == len(USERS) + 3
    seg.close()
    unlink_segment(name)
    print(f"[reader pid {me}] closed and unlinked {name!r}")
    if not ok:
        print("reader: something did not match what the writer wrote", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    name = f"shmcache-demo-{os.getpid()}"
    me = [sys.executable, os.path.abspath(__file__)]
    print(f"== shmcache demo: two processes, one segment {name!r} ==")
    w = subprocess.Popen([*me, "writer", name], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    rc = 1
    try:
        assert w.stdout is not None and w.stdin is not None
        for line in w.stdout:
            if line.strip() == "READY":
                break
            print(line, end="")
        else:
            print("writer exited before it was ready", file=sys.stderr)
            return w.wait() or 1
        rc = subprocess.run([*me, "reader", name, str(w.pid)], check=False).returncode
        w.stdin.close()
        for line in w.stdout:
            print(line, end="")
        rc = rc or w.wait(timeout=30)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
        unlink_segment(name)  # already gone on success; a no-op then
    print("== demo OK ==" if rc == 0 else f"== demo FAILED (exit {rc}) ==")
    return rc


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "writer":
        sys.exit(writer(sys.argv[2]))
    if len(sys.argv) >= 4 and sys.argv[1] == "reader":
        sys.exit(reader(sys.argv[2], int(sys.argv[3])))
    sys.exit(main())
