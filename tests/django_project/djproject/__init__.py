"""Settings and URLs of the Django project that tests shmcache's Django cache backend."""
