"""A ready gunicorn configuration: one shmcache segment shared by every worker.

    gunicorn -c workers/gunicorn_conf.py --workers 4 myapp:app
    gunicorn -c workers/gunicorn_conf.py -k gthread --threads 8 myapp:app
    gunicorn -c workers/gunicorn_conf.py -k uvicorn.workers.UvicornWorker myapp:asgi_app

The segment is configured from the environment, read by the master when it starts
(``-e NAME=VALUE`` on gunicorn's command line works too):

    SHMCACHE_NAME=myapp-cache      the POSIX shared-memory name (default shmcache-<app>-<uid>)
    SHMCACHE_SIZE_MB=256           its size (default 64)
    SHMCACHE_KEEP_ON_EXIT=1        keep it, with its entries, when the master exits
                                   (a warm restart); default: unlink it
    SHMCACHE_GUNICORN_SIDECAR=1    the hooks start a sidecar in the master (a cache with
                                   levels below L1 and SHMCACHE_SIDECAR=auto, the
                                   default, starts its own there anyway)
    ... and every other SHMCACHE_* field of shmcache.CacheConfig.from_env.

In the application, ``shmcache.gunicorn.get_cache()`` returns the shared cache (the one
the master opened).  The hooks work with sync, gthread and uvicorn workers, with and
without --preload, with --max-requests recycling and across ``kill -HUP`` reloads.

To configure in code instead, replace the last line with e.g.::

    from shmcache import CacheConfig
    globals().update(shmcache.gunicorn.hooks(
        config=CacheConfig(name="myapp-cache", c_memory_size_mb=256), keep_on_exit=True))

Other gunicorn settings may be added here as usual; the command line overrides them.
"""

import shmcache.gunicorn

# on_starting, post_fork, child_exit, on_reload and on_exit.
globals().update(shmcache.gunicorn.hooks())
