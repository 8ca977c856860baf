"""The host's sidecar report (lag, drained, published, ...) reaches every place an
operator looks: ``get_statistics().sidecar``, Prometheus and ``shmcache stats``."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis_servers import (
    RedisProc,
    fx_hosts,  # noqa: F401 - fixture "hosts"
    fx_prefix,  # noqa: F401 - fixture "prefix"
    fx_redis_server,  # noqa: F401 - fixture "redis_server"
    wait_until,
)

from shmcache.metrics import register_collector


def test_sidecar_figures_in_statistics_prometheus_and_the_cli(redis_server: RedisProc,
                                                              hosts: Any) -> None:
    a = hosts.new(url=redis_server.url)
    for i in range(20):
        a.set(f"k{i}", i, ttl=60)
    assert wait_until(lambda: a.get_statistics().sidecar.get("drained", 0) >= 20, 15)
    report = a.get_statistics().sidecar
    assert report["leader"] == 1 and report["pid"] == os.getpid()

    reg = CollectorRegistry()
    register_collector(a.segment.name, registry=reg)
    samples = {s.name: s.value
               for fam in text_string_to_metric_families(generate_latest(reg).decode())
               for s in fam.samples}
    assert samples["shmcache_sidecar_drained_total"] >= 20
    assert "shmcache_sidecar_lag_ms" in samples and "shmcache_sidecar_age_s" in samples

    out = subprocess.run([sys.executable, "-m", "shmcache", "stats", "-n", a.segment.name],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("sidecar"))
    assert f"pid {os.getpid()}" in line and "lag" in line
