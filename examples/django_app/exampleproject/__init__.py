"""A minimal Django project whose cache is the shmcache backend (see settings.py)."""
