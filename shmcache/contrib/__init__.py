"""Framework integrations: Django and Flask-Caching backends, the Catzilla middleware pair.

Each module imports its framework lazily at use, so ``import shmcache`` never needs
Django, Flask or Catzilla installed.
"""
