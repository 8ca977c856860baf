"""Settings of the example project: Django's cache is one shmcache segment per host.

``LOCATION`` names the segment; every worker process of the server attaches the same
one, so a page cached by one worker (``cache_page`` in views.py) is a hit in all of
them.  Under gunicorn with ``workers/gunicorn_conf.py`` the master creates the segment
from the same ``SHMCACHE_NAME`` and unlinks it when it exits.
"""

import os

SEGMENT = os.environ.get("SHMCACHE_NAME", "django-example")

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "shmcache-example-not-for-production")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "exampleproject.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

CACHES = {
    "default": {
        "BACKEND": "shmcache.contrib.django.ShmCache",
        "LOCATION": SEGMENT,
        "TIMEOUT": 300,
        "OPTIONS": {"c_memory_size_mb": 64},
    }
}
