"""Settings of the test project: every cache alias is the shmcache backend.

All aliases name one segment (``$SHMCACHE_NAME``, set by tests/test_contrib_django.py,
which unlinks it afterwards), as several Django sites share one memcached: the tests
of KEY_PREFIX, VERSION and KEY_FUNCTION only mean something when the stores are shared.
"""

import os

from djproject.keyfuncs import custom_key_func

#: Run without the pytest wrapper, the project names (and djtests unlinks) its own.
SEGMENT = os.environ.get("SHMCACHE_NAME") or f"shmtest-{os.getpid()}-django"
OWN_SEGMENT = "SHMCACHE_NAME" not in os.environ

SECRET_KEY = "shmcache-django-tests-only"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["testserver", "127.0.0.1"]
INSTALLED_APPS = ["django.contrib.sessions", "djtests"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "djproject.urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
SESSION_ENGINE = "django.contrib.sessions.backends.cache"

_BASE = {
    "BACKEND": "shmcache.contrib.django.ShmCache",
    "LOCATION": SEGMENT,
    "OPTIONS": {"c_memory_size_mb": 16},
}
CACHES = {
    "default": dict(_BASE),
    "prefix": dict(_BASE, KEY_PREFIX=f"cacheprefix{os.getpid()}"),
    "v2": dict(_BASE, VERSION=2),
    "custom_key": dict(_BASE, KEY_FUNCTION=custom_key_func),
    "custom_key2": dict(_BASE, KEY_FUNCTION="djproject.keyfuncs.custom_key_func"),
    "forever": dict(_BASE, TIMEOUT=None),
    "culled": dict(_BASE, OPTIONS={"c_memory_size_mb": 16, "MAX_ENTRIES": 30,
                                   "CULL_FREQUENCY": 0}),
    "objects": dict(_BASE, OPTIONS={"c_memory_size_mb": 16, "object_cache": True}),
}
CACHE_MIDDLEWARE_ALIAS = "default"
CACHE_MIDDLEWARE_SECONDS = 60
CACHE_MIDDLEWARE_KEY_PREFIX = ""
