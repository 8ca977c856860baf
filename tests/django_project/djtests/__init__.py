"""The Django-side tests of shmcache.contrib.django (run by ``manage test djtests``)."""
