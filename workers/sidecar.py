"""Run the host's shmcache sidecar as its own process (instead of a thread in the
gunicorn master): it drains the segment's write journal to Redis/disk, applies other
hosts' invalidations, sweeps expired entries and reaps dead workers' slots.

    SHMCACHE_NAME=myapp-cache SHMCACHE_LEVELS=c_memory,redis,disk \
    SHMCACHE_REDIS_URL=redis://10.0.0.5:6379/0 SHMCACHE_SECRET=... \
        python workers/sidecar.py

Options (``--name``, ``--levels``, ``--redis-url``, ``--redis-cluster-nodes``,
``--disk-path``, ``--log-level``) override the environment; see ``--help``.  A second
one on the same segment stands by and takes over when the first exits.  Under systemd,
``Restart=always``; SIGTERM stops it after a last flush.  With this process running,
set ``SHMCACHE_SIDECAR=off`` for the application so it does not start its own thread
(it would only stand by).

The logic lives in :mod:`shmcache.sidecar` (also ``shmcache sidecar`` and
``python -m shmcache.sidecar``); this file is its command line.
"""

from shmcache.sidecar import main

if __name__ == "__main__":
    raise SystemExit(main())
