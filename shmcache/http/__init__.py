"""HTTP response caching in the shared segment: WSGI and ASGI middleware.

Both store the final bytes of a response (status, headers, body) in a
:class:`~shmcache.Cache` and serve later requests for it -- from any worker process on
the host -- without entering the application, following RFC 9111 for a *shared* cache.
The rules are in :mod:`shmcache.http.policy`, the entries in :mod:`shmcache.http.store`;
``docs/http.md`` describes the behaviour and every choice.

Example::

    from shmcache import Cache
    from shmcache.http import CacheMiddleware, ASGICacheMiddleware

    wsgi_app = CacheMiddleware(wsgi_app, Cache(), default_ttl=30,
                               route_ttls={"/static/": 3600, "/api/": None})
    asgi_app = ASGICacheMiddleware(asgi_app, Cache(), single_flight=True)
"""

from __future__ import annotations

from .asgi import ASGICacheMiddleware
from .store import HttpStats
from .wsgi import CacheMiddleware

__all__ = ["CacheMiddleware", "ASGICacheMiddleware", "HttpStats"]
