"""Run N Catzilla processes on N ports, all sharing one shmcache segment.

Catzilla has no pre-fork mode: each process is started on its own and attaches the
segment by name.  This launcher creates the segment first, starts one process per port
with ``SHMCACHE_NAME`` naming it, restarts a process that dies (after reaping its
process slot), and on SIGTERM or Ctrl-C stops them all and unlinks the segment
(``--keep`` keeps it, with its entries, for a warm restart).

    python workers/catzilla_launcher.py myapp:app --ports 8001,8002
    python workers/catzilla_launcher.py myapp:app --processes 4 --port 8000 --host 0.0.0.0
    SHMCACHE_NAME=myapp-cache SHMCACHE_SIZE_MB=256 python workers/catzilla_launcher.py ...

The application installs the response cache itself, and ``Cache()`` there attaches
the launcher's segment from the environment::

    from catzilla import Catzilla
    from shmcache.contrib.catzilla import install

    app = Catzilla(production=True)
    install(app)

The logic lives in :func:`shmcache.contrib.catzilla.run_processes` (also
``python -m shmcache.contrib.catzilla``); this file is its command line.
"""

from shmcache.contrib.catzilla import main

if __name__ == "__main__":
    raise SystemExit(main())
