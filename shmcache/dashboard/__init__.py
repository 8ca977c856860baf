"""The live dashboard: a page of charts fed by the segment's statistics.

``shmcache dashboard`` serves it on 127.0.0.1; an application can mount it too::

    from shmcache.dashboard import make_asgi_app, make_wsgi_app
    fastapi_app.mount("/cache", make_asgi_app("myapp-cache"))          # ASGI
    DispatcherMiddleware(flask_app.wsgi_app, {"/cache": make_wsgi_app("myapp-cache")})

The page and its charts are files of this package (``static/``, plain JavaScript
drawing on canvas): nothing is loaded from the network at run time.  Put it behind the
application's own access control when mounted: it shows function names and figures
(never keys' values).
"""

from __future__ import annotations

from .server import Dashboard, Response, make_asgi_app, make_server_for, make_wsgi_app, serve

__all__ = ["Dashboard", "Response", "make_wsgi_app", "make_asgi_app", "make_server_for",
           "serve"]
