"""Django's cache contract, checked against shmcache.contrib.django.ShmCache.

The cases follow what Django's own suite (``tests/cache/tests.py``, ``BaseCacheTests``)
demands of every backend -- timeouts, versions, prefixes, key functions, key warnings,
incr/decr, get_or_set, pickling errors, the cache middleware -- plus what this backend
promises beyond it (incr keeps the expiry, async without a thread hop, a value too large
degrades, fresh copies on every get, options checked).  Expiry is tested on a frozen
engine clock (``Segment.set_clock``, this process only) instead of sleeping.
"""

from __future__ import annotations

import os
import pickle
import threading
import zlib
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import CacheKeyWarning, cache, caches
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse
from django.middleware.cache import FetchFromCacheMiddleware, UpdateCacheMiddleware
from django.test import RequestFactory, SimpleTestCase, TestCase
from djproject import urls

import shmcache
from djtests.models import Poll, expensive_calculation
from shmcache.contrib.django import ShmCache
from shmcache.keys import shorten

MEMCACHED_CHARS_MSG = ("Cache key contains characters that will cause errors if used "
                       "with memcached: %r")


def tearDownModule() -> None:  # noqa: N802 - unittest's name
    if settings.OWN_SEGMENT:
        shmcache.unlink_segment(settings.SEGMENT)


def module_function() -> int:
    return 42


class Plain:
    def method(self) -> int:
        return 24


class Unpicklable:
    def __getstate__(self) -> Any:
        raise pickle.PickleError("not this one")


class RefusesPickling:
    def __reduce__(self) -> Any:
        raise pickle.PicklingError("nor this one")


class RecordsPicklingThread:
    """Notes the thread that pickles it: an async call that hops threads shows."""

    def __init__(self) -> None:
        self.thread: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        self.thread = threading.get_ident()
        return {}


class Clock:
    """The engine clock of this process, frozen and moved by hand (TTLs without sleep)."""

    def __init__(self) -> None:
        self.segment = cache.shmcache.segment
        self.now = self.segment.now()
        self.segment.set_clock(self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.segment.set_clock(self.now)

    def release(self) -> None:
        self.segment.set_clock(None)


class ShmCacheTestCase(SimpleTestCase):
    def setUp(self) -> None:
        self.clock: Clock | None = None

    def tearDown(self) -> None:
        if self.clock is not None:
            self.clock.release()
        cache.clear()

    def freeze(self) -> Clock:
        self.clock = Clock()
        return self.clock

    def expires_at(self, key: str, alias: str = "default") -> float | None:
        backend = caches[alias]
        info = backend.shmcache.segment.info(backend.make_key(key))
        self.assertIsNotNone(info, key)
        return info.expires_at  # type: ignore[no-any-return, union-attr]


class BasicOperationsTests(ShmCacheTestCase):
    def test_set_then_get(self) -> None:
        cache.set("key", "value")
        self.assertEqual(cache.get("key"), "value")
        self.assertIsInstance(caches["default"], ShmCache)

    def test_miss_returns_default(self) -> None:
        self.assertIsNone(cache.get("nowhere"))
        self.assertEqual(cache.get("nowhere", "fallback"), "fallback")

    def test_cached_none_is_a_hit(self) -> None:
        cache.set("none", None)
        self.assertIsNone(cache.get("none", default="fallback"))
        self.assertIs(cache.has_key("none"), True)
        self.assertIn("none", cache)
        self.assertEqual(cache.get_many(["none", "nowhere"]), {"none": None})

    def test_add_stores_only_when_absent(self) -> None:
        self.assertIs(cache.add("once", "first"), True)
        self.assertIs(cache.add("once", "second"), False)
        self.assertEqual(cache.get("once"), "first")

    def test_delete_says_whether_the_key_was_there(self) -> None:
        cache.set_many({"a": "spam", "b": "eggs"})
        self.assertIs(cache.delete("a"), True)
        self.assertIs(cache.delete("a"), False)
        self.assertIsNone(cache.get("a"))
        self.assertEqual(cache.get("b"), "eggs")

    def test_get_many_keeps_the_callers_keys(self) -> None:
        cache.set_many({"a": "a", "b": "b", "c": "c", "d": 4})
        self.assertEqual(cache.get_many(["a", "c", "d"]), {"a": "a", "c": "c", "d": 4})
        self.assertEqual(cache.get_many(iter(["a", "b", "e"])), {"a": "a", "b": "b"})
        self.assertEqual(cache.get_many([]), {})

    def test_set_many_and_delete_many(self) -> None:
        self.assertEqual(cache.set_many({"k1": "spam", "k2": "eggs", "k3": "ham"}), [])
        self.assertEqual(cache.set_many({}), [])
        self.assertIsNone(cache.delete_many(["k1", "k2"]))
        self.assertIsNone(cache.delete_many([]))
        self.assertEqual(cache.get_many(["k1", "k2", "k3"]), {"k3": "ham"})

    def test_has_key_and_in(self) -> None:
        cache.set("hello", "goodbye")
        cache.set("no_expiry", "here", None)
        self.assertIs(cache.has_key("hello"), True)
        self.assertIs(cache.has_key("goodbye"), False)
        self.assertIs(cache.has_key("no_expiry"), True)
        self.assertIn("hello", cache)
        self.assertNotIn("goodbye", cache)

    def test_data_types_round_trip(self) -> None:
        values = {
            "str": "a string", "int": 42, "bool": True, "float": 1.5,
            "list": [1, 2, 3], "tuple": (1, 2), "dict": {"A": 1}, "set": {1, 2},
            "decimal": Decimal("1.10"), "bytes": b"\x00\xff", "function": module_function,
            "class": Plain, "method": Plain.method,
        }
        for key, value in values.items():
            with self.subTest(key=key):
                cache.set(key, value)
                got = cache.get(key)
                self.assertEqual(got, value)
                self.assertIs(type(got), type(value))

    def test_unicode_keys_and_values(self) -> None:
        stuff = {"ascii": "ascii_value", "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
                 "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2", "ascii2": {"x": 1}}
        for key, value in stuff.items():
            cache.set(key, value)
            self.assertEqual(cache.get(key), value)
            self.assertIs(cache.delete(key), True)
            self.assertIs(cache.add(key, value), True)
            self.assertEqual(cache.get(key), value)
            self.assertIs(cache.delete(key), True)
        cache.set_many(stuff)
        self.assertEqual(cache.get_many(list(stuff)), stuff)

    def test_binary_values(self) -> None:
        packed = zlib.compress(b"value_to_be_compressed")
        cache.set("bin-set", packed)
        self.assertIs(cache.add("bin-add", packed), True)
        cache.set_many({"bin-many": packed})
        for key in ("bin-set", "bin-add", "bin-many"):
            self.assertEqual(zlib.decompress(cache.get(key)), b"value_to_be_compressed")

    def test_large_compressible_value(self) -> None:
        # Larger than the segment's largest item before compression.
        value = "0123456789" * 500_000
        cache.set("big", value)
        self.assertEqual(cache.get("big"), value)

    def test_get_returns_a_fresh_copy(self) -> None:
        # Sessions and views mutate what they got: that must not change the cache.
        cache.set("list", [1, 2])
        got = cache.get("list")
        got.append(3)
        self.assertEqual(cache.get("list"), [1, 2])
        self.assertIsNot(cache.get("list"), cache.get("list"))

    def test_object_cache_opt_in_returns_the_same_object(self) -> None:
        objects = caches["objects"]
        objects.set("list", [1, 2])
        self.assertIs(objects.get("list"), objects.get("list"))
        self.assertEqual(cache.get("list"), [1, 2])  # same segment, other alias

    def test_clear_empties_every_prefix_and_version(self) -> None:
        cache.set("k", 1)
        cache.set("k", 2, version=2)
        caches["prefix"].set("k", 3)
        cache.clear()
        self.assertIsNone(cache.get("k"))
        self.assertIsNone(cache.get("k", version=2))
        self.assertIsNone(caches["prefix"].get("k"))

    def test_close_keeps_the_cache_usable(self) -> None:
        # Django closes every cache at the end of every request.
        cache.set("k", "v")
        cache.close()
        self.assertEqual(cache.get("k"), "v")
        cache.set("k", "w")
        self.assertEqual(cache.get("k"), "w")

    def test_pickling_errors_raise(self) -> None:
        for call in (lambda: cache.set("u", Unpicklable()),
                     lambda: cache.add("u", Unpicklable()),
                     lambda: cache.set("u", Unpicklable(), 0),
                     lambda: cache.add("u", Unpicklable(), 0),
                     lambda: cache.set_many({"u": Unpicklable()})):
            with self.assertRaises(pickle.PickleError):
                call()
        for call in (lambda: cache.set("u", RefusesPickling()),
                     lambda: cache.add("u", RefusesPickling())):
            with self.assertRaisesMessage(pickle.PicklingError, "nor this one"):
                call()
        self.assertIs(cache.has_key("u"), False)


class KeyTests(ShmCacheTestCase):
    def test_key_prefix_separates_sites(self) -> None:
        cache.set("somekey", "value")
        self.assertIs(caches["prefix"].has_key("somekey"), False)
        caches["prefix"].set("somekey", "value2")
        self.assertEqual(cache.get("somekey"), "value")
        self.assertEqual(caches["prefix"].get("somekey"), "value2")

    def test_custom_key_function(self) -> None:
        cache.set("answer1", 42)
        self.assertIsNone(caches["custom_key"].get("answer1"))
        self.assertIsNone(caches["custom_key2"].get("answer1"))
        caches["custom_key"].set("answer2", 42)
        self.assertIsNone(cache.get("answer2"))
        self.assertEqual(caches["custom_key"].get("answer2"), 42)
        self.assertEqual(caches["custom_key2"].get("answer2"), 42)  # same function
        seg = cache.shmcache.segment
        self.assertIsNotNone(seg.info("CUSTOM--1-answer2"))

    def test_versions_are_separate_entries(self) -> None:
        v2 = caches["v2"]
        cache.set("answer", 42)
        self.assertEqual(cache.get("answer", version=1), 42)
        self.assertIsNone(cache.get("answer", version=2))
        self.assertIsNone(v2.get("answer"))
        self.assertEqual(v2.get("answer", version=1), 42)
        v2.set("answer3", 43)
        self.assertIsNone(cache.get("answer3"))
        self.assertEqual(cache.get("answer3", version=2), 43)
        v2.set("answer4", 44, version=1)
        self.assertEqual(cache.get("answer4"), 44)
        self.assertIsNone(v2.get("answer4"))

    def test_versions_with_add_has_key_and_delete(self) -> None:
        v2 = caches["v2"]
        self.assertIs(cache.add("a", 42, version=2), True)
        self.assertIs(cache.add("a", 37, version=2), False)
        self.assertIs(cache.add("a", 37, version=1), True)
        self.assertEqual((cache.get("a"), v2.get("a")), (37, 42))
        self.assertIs(v2.add("a", 1), False)
        self.assertIs(v2.has_key("a"), True)
        self.assertIs(v2.has_key("a", version=3), False)
        self.assertIs(v2.delete("a"), True)
        self.assertEqual((cache.get("a"), v2.get("a")), (37, None))
        self.assertIs(v2.delete("a", version=1), True)
        self.assertIsNone(cache.get("a"))

    def test_versions_with_incr_decr_and_many(self) -> None:
        v2 = caches["v2"]
        cache.set("n", 37, version=1)
        cache.set("n", 42, version=2)
        self.assertEqual(cache.incr("n"), 38)
        self.assertEqual(cache.incr("n", version=2), 43)
        self.assertEqual(v2.decr("n"), 42)
        self.assertEqual(v2.decr("n", version=1), 37)
        self.assertEqual((cache.get("n"), v2.get("n")), (37, 42))
        v2.set_many({"ford": 37, "arthur": 42}, version=1)
        self.assertEqual(cache.get_many(["ford", "arthur"]), {"ford": 37, "arthur": 42})
        self.assertEqual(v2.get_many(["ford", "arthur"]), {})
        v2.delete_many(["ford"], version=1)
        self.assertEqual(cache.get_many(["ford", "arthur"]), {"arthur": 42})

    def test_long_keys_are_stored_under_a_digest(self) -> None:
        long_key = "k" * 400
        with self.assertWarns(CacheKeyWarning):
            cache.set(long_key, 1)
        with self.assertWarns(CacheKeyWarning):
            self.assertEqual(cache.incr(long_key), 2)  # the same key on both paths
        with self.assertWarns(CacheKeyWarning):
            self.assertEqual(cache.get(long_key), 2)
        with self.assertWarns(CacheKeyWarning):
            self.assertIs(cache.has_key("k" * 399), False)
        seg = cache.shmcache.segment
        self.assertIsNotNone(seg.info(shorten(cache.make_key(long_key), 250)))

    def check_key_warnings(self, key: str, expected: str, key_func: Any = None) -> None:
        old = cache.key_func
        cache.key_func = key_func or (lambda key, *args: key)
        calls = [("add", (key, 1)), ("get", (key,)), ("set", (key, 1)), ("incr", (key,)),
                 ("decr", (key,)), ("touch", (key,)), ("has_key", (key,)),
                 ("delete", (key,)), ("get_many", ([key, "b"],)),
                 ("set_many", ({key: 1, "b": 2},)), ("delete_many", ([key, "b"],))]
        try:
            for name, args in calls:
                with self.subTest(operation=name), self.assertWarns(CacheKeyWarning) as cm:
                    getattr(cache, name)(*args)
                self.assertEqual(str(cm.warning), expected)
        finally:
            cache.key_func = old

    def test_warns_on_characters_memcached_refuses(self) -> None:
        key = "key with spaces and 清"
        self.check_key_warnings(key, MEMCACHED_CHARS_MSG % key)

    def test_warns_on_keys_memcached_finds_too_long(self) -> None:
        key = "a" * 250 + "清"
        self.check_key_warnings(
            key, f"Cache key will cause errors if used with memcached: {key!r} "
                 f"(longer than 250)")

    def test_warns_when_the_version_makes_the_key_too_long(self) -> None:
        key = "a" * 249
        self.check_key_warnings(
            key, f"Cache key will cause errors if used with memcached: {key + ':1'!r} "
                 f"(longer than 250)", key_func=lambda key, *args: key + ":1")


class TimeoutTests(ShmCacheTestCase):
    def test_entries_expire(self) -> None:
        clock = self.freeze()
        for key in ("expire1", "expire2", "expire3"):
            cache.set(key, "very quickly", 1)
        clock.advance(0.9)
        self.assertEqual(cache.get("expire1"), "very quickly")
        clock.advance(0.2)
        self.assertIsNone(cache.get("expire1"))
        self.assertIs(cache.add("expire2", "newvalue"), True)
        self.assertEqual(cache.get("expire2"), "newvalue")
        self.assertIs(cache.has_key("expire3"), False)

    def test_default_timeout_comes_from_settings(self) -> None:
        clock = self.freeze()
        cache.set("default", 1)  # TIMEOUT not set: Django's 300 seconds
        self.assertAlmostEqual(self.expires_at("default"), clock.now + 300, delta=0.01)
        caches["forever"].set("forever", 1)  # TIMEOUT None
        self.assertIsNone(self.expires_at("forever", "forever"))
        clock.advance(301)
        self.assertIsNone(cache.get("default"))
        self.assertEqual(caches["forever"].get("forever"), 1)

    def test_zero_timeout_does_not_store(self) -> None:
        cache.set("key1", "old")
        cache.set("key1", "eggs", 0)  # deletes what was there
        self.assertIsNone(cache.get("key1"))
        self.assertIs(cache.add("key2", "ham", 0), True)
        self.assertIsNone(cache.get("key2"))
        cache.set("key6", "present")
        self.assertIs(cache.add("key6", "ham", 0), False)
        self.assertEqual(cache.get("key6"), "present")
        self.assertEqual(cache.set_many({"key3": "sausage", "key4": "lobster"}, 0), [])
        self.assertEqual(cache.get_many(["key3", "key4"]), {})
        cache.set("key5", "belgian fries", timeout=5)
        self.assertIs(cache.touch("key5", timeout=0), True)
        self.assertIsNone(cache.get("key5"))
        self.assertIs(cache.touch("key5", timeout=0), False)

    def test_negative_timeout_means_expired(self) -> None:
        cache.set("k", "v")
        cache.set("k", "w", -1)
        self.assertIs(cache.has_key("k"), False)
        self.assertIs(cache.add("k", "w", -5), True)
        self.assertIs(cache.has_key("k"), False)

    def test_none_timeout_is_forever(self) -> None:
        clock = self.freeze()
        cache.set("key1", "eggs", None)
        self.assertIs(cache.add("key2", "ham", None), True)
        self.assertIs(cache.add("key1", "new eggs", None), False)
        cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
        cache.set("key5", "belgian fries", timeout=1)
        self.assertIs(cache.touch("key5", timeout=None), True)
        clock.advance(10 * 365 * 86400)
        self.assertEqual(
            cache.get_many(["key1", "key2", "key3", "key4", "key5"]),
            {"key1": "eggs", "key2": "ham", "key3": "sausage", "key4": "lobster bisque",
             "key5": "belgian fries"})

    def test_long_and_float_timeouts(self) -> None:
        month = 60 * 60 * 24 * 30 + 1  # memcached would read this as a date
        cache.set("key1", "eggs", month)
        self.assertIs(cache.add("key2", "ham", month), True)
        cache.set_many({"key3": "sausage"}, month)
        cache.set("key4", "spam", 100.2)
        self.assertEqual(cache.get_many(["key1", "key2", "key3", "key4"]),
                         {"key1": "eggs", "key2": "ham", "key3": "sausage", "key4": "spam"})

    def test_touch_sets_a_new_expiry(self) -> None:
        clock = self.freeze()
        cache.set("expire1", "very quickly", timeout=1)
        self.assertIs(cache.touch("expire1", timeout=4), True)
        clock.advance(2)
        self.assertIs(cache.has_key("expire1"), True)
        clock.advance(3)
        self.assertIs(cache.has_key("expire1"), False)
        cache.set("expire1", "very quickly", timeout=1)
        self.assertIs(cache.touch("expire1"), True)  # the default: 300 s
        clock.advance(2)
        self.assertIs(cache.has_key("expire1"), True)
        self.assertIs(cache.touch("nonexistent"), False)

    def test_set_many_expiry(self) -> None:
        clock = self.freeze()
        cache.set_many({"key1": "spam", "key2": "eggs"}, 1)
        clock.advance(2)
        self.assertEqual(cache.get_many(["key1", "key2"]), {})


class IncrDecrTests(ShmCacheTestCase):
    def test_incr_and_decr(self) -> None:
        cache.set("answer", 41)
        self.assertEqual(cache.incr("answer"), 42)
        self.assertEqual(cache.get("answer"), 42)
        self.assertEqual(cache.incr("answer", 10), 52)
        self.assertEqual(cache.incr("answer", -10), 42)
        self.assertEqual(cache.decr("answer"), 41)
        self.assertEqual(cache.decr("answer", -1), 42)
        cache.set("float", 1.5)
        self.assertEqual(cache.incr("float"), 2.5)

    def test_missing_key_is_a_value_error(self) -> None:
        for call in (lambda: cache.incr("does_not_exist"),
                     lambda: cache.incr("does_not_exist", -1),
                     lambda: cache.decr("does_not_exist")):
            with self.assertRaisesMessage(ValueError, "Key 'does_not_exist' not found"):
                call()
        self.assertIs(cache.has_key("does_not_exist"), False)

    def test_not_a_number_is_a_type_error(self) -> None:
        cache.set("null", None)
        with self.assertRaises(TypeError):
            cache.incr("null")
        with self.assertRaises(TypeError):
            cache.decr("null")
        self.assertIsNone(cache.get("null", "untouched"))

    def test_incr_keeps_the_expiry(self) -> None:
        clock = self.freeze()
        cache.set("counter", 1, timeout=100)
        expires = self.expires_at("counter")
        clock.advance(50)
        self.assertEqual(cache.incr("counter"), 2)
        self.assertAlmostEqual(self.expires_at("counter"), expires, delta=0.01)
        self.assertEqual(cache.decr("counter"), 1)
        self.assertAlmostEqual(self.expires_at("counter"), expires, delta=0.01)
        clock.advance(51)
        self.assertIs(cache.has_key("counter"), False)
        with self.assertRaises(ValueError):
            cache.incr("counter")

    def test_incr_keeps_no_expiry(self) -> None:
        cache.set("counter", 1, None)
        cache.incr("counter", 5)
        self.assertIsNone(self.expires_at("counter"))

    def test_concurrent_incr_loses_nothing(self) -> None:
        cache.set("hits", 0)

        def bump() -> None:
            for _ in range(300):
                caches["default"].incr("hits")  # each thread gets its own backend object

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(cache.get("hits"), 1200)

    def test_incr_version(self) -> None:
        v2 = caches["v2"]
        cache.set("answer", 42, version=2)
        self.assertEqual(cache.incr_version("answer", version=2), 3)
        self.assertEqual([cache.get("answer", version=v) for v in (1, 2, 3)],
                         [None, None, 42])
        v2.set("answer2", 42)
        self.assertEqual(v2.incr_version("answer2"), 3)
        self.assertEqual(v2.get("answer2", version=3), 42)
        self.assertIsNone(v2.get("answer2"))
        with self.assertRaises(ValueError):
            cache.incr_version("does_not_exist")
        cache.set("null", None)
        self.assertEqual(cache.incr_version("null"), 2)
        self.assertIs(cache.has_key("null", version=2), True)

    def test_decr_version(self) -> None:
        v2 = caches["v2"]
        cache.set("answer", 42, version=2)
        self.assertEqual(cache.decr_version("answer", version=2), 1)
        self.assertEqual(cache.get("answer"), 42)
        self.assertIsNone(cache.get("answer", version=2))
        v2.set("answer2", 42)
        self.assertEqual(v2.decr_version("answer2"), 1)
        self.assertEqual(v2.get("answer2", version=1), 42)
        with self.assertRaises(ValueError):
            cache.decr_version("does_not_exist", version=2)


class GetOrSetTests(ShmCacheTestCase):
    def test_stores_and_returns_the_default(self) -> None:
        self.assertIsNone(cache.get("projector"))
        self.assertEqual(cache.get_or_set("projector", 42), 42)
        self.assertEqual(cache.get("projector"), 42)
        self.assertEqual(cache.get_or_set("projector", 43), 42)
        self.assertIsNone(cache.get_or_set("null", None))
        self.assertIsNone(cache.get("null", "default"))  # None was stored

    def test_callable_default(self) -> None:
        calls: list[int] = []

        def compute() -> str:
            calls.append(1)
            return "value"

        self.assertEqual(cache.get_or_set("mykey", compute), "value")
        self.assertEqual(cache.get_or_set("mykey", compute), "value")
        self.assertEqual(len(calls), 1)
        self.assertIsNone(cache.get_or_set("null", lambda: None))
        self.assertIsNone(cache.get("null", "default"))

    def test_versions(self) -> None:
        msg = "get_or_set() missing 1 required positional argument: 'default'"
        self.assertEqual(cache.get_or_set("brian", 1979, version=2), 1979)
        with self.assertRaisesMessage(TypeError, msg):
            cache.get_or_set("brian")  # type: ignore[call-arg]
        self.assertIsNone(cache.get("brian", version=1))
        self.assertEqual(cache.get_or_set("brian", 42, version=1), 42)
        self.assertEqual(cache.get_or_set("brian", 1979, version=2), 1979)
        self.assertIsNone(cache.get("brian", version=3))

    def test_a_racing_writer_wins(self) -> None:
        # The default is computed between get() and add(); another writer stores the
        # key meanwhile, so add() fails and everybody gets the writer's value.
        def compute() -> str:
            caches["v2"].set("raced", "the other writer's", version=1)
            return "mine"

        self.assertEqual(cache.get_or_set("raced", compute), "the other writer's")
        self.assertEqual(cache.get("raced"), "the other writer's")


class DegradedStoreTests(ShmCacheTestCase):
    TOO_BIG = 3 << 20  # the 16 MiB test segment's largest item is ~1.9 MiB

    def test_value_too_large_is_dropped_with_a_warning(self) -> None:
        big = os.urandom(self.TOO_BIG)  # incompressible
        cache.set("k", "old value")
        with self.assertLogs("shmcache.contrib.django", "WARNING") as logs:
            cache.set("k", big)
        self.assertIs(cache.has_key("k"), False)  # never the value it replaced
        self.assertNotIn(cache.make_key("k"), "\n".join(logs.output))
        with self.assertLogs("shmcache.contrib.django", "WARNING"):
            self.assertIs(cache.add("k", big), False)

    def test_set_many_lists_the_keys_it_could_not_store(self) -> None:
        big = os.urandom(self.TOO_BIG)
        with self.assertLogs("shmcache.contrib.django", "WARNING"):
            failed = cache.set_many({"small": 1, "big": big, "other": 2})
        self.assertEqual(failed, ["big"])
        self.assertEqual(cache.get_many(["small", "big", "other"]), {"small": 1, "other": 2})


class ConfigurationTests(SimpleTestCase):
    def test_backends_of_a_process_share_one_segment_handle(self) -> None:
        self.assertIs(caches["default"].shmcache, caches["v2"].shmcache)
        self.assertIs(caches["default"].shmcache, caches["culled"].shmcache)
        self.assertIsNot(caches["default"].shmcache, caches["objects"].shmcache)
        other: dict[str, Any] = {}
        t = threading.Thread(target=lambda: other.update(b=caches["default"]))
        t.start()
        t.join()
        self.assertIsNot(other["b"], caches["default"])  # Django: one per thread
        self.assertIs(other["b"].shmcache, caches["default"].shmcache)
        self.assertEqual(cache.shmcache.segment.name, settings.SEGMENT)

    def test_options_are_cacheconfig_fields(self) -> None:
        b = ShmCache(settings.SEGMENT, {"OPTIONS": {"C_MEMORY_SIZE_MB": 16,
                                                    "compression": False}})
        self.assertEqual(b.shmcache.config.c_memory_size_mb, 16)
        self.assertIs(b.shmcache.config.compression, False)
        self.assertIs(b.shmcache.config.object_cache, False)
        b.set("x", 1)
        self.assertEqual(cache.get("x"), 1)
        cache.delete("x")

    def test_bad_options_are_improperly_configured(self) -> None:
        for options, needle in (({"no_such_field": 1}, "unknown OPTIONS key"),
                                ({"name": "other"}, "LOCATION"),
                                ({"default_ttl": 5}, "TIMEOUT"),
                                ({"c_memory_size_mb": 0}, "c_memory_size_mb")):
            with self.subTest(options=options), self.assertRaisesMessage(
                    ImproperlyConfigured, needle):
                ShmCache(settings.SEGMENT, {"OPTIONS": options})

    def test_cull_options_are_ignored(self) -> None:
        culled = caches["culled"]
        for i in range(50):
            culled.set(f"cull{i}", "value", 1000)
        self.assertEqual(sum(culled.has_key(f"cull{i}") for i in range(50)), 50)
        culled.clear()


class AsyncTests(ShmCacheTestCase):
    async def test_the_async_api(self) -> None:
        await cache.aset("k", "v")
        self.assertEqual(await cache.aget("k"), "v")
        self.assertEqual(await cache.aget("missing", "d"), "d")
        self.assertIs(await cache.aadd("k", "w"), False)
        self.assertIs(await cache.aadd("k2", None), True)
        self.assertIs(await cache.ahas_key("k2"), True)
        self.assertIs(await cache.atouch("k", 60), True)
        self.assertEqual(await cache.aset_many({"a": 1, "b": 2}), [])
        self.assertEqual(await cache.aget_many(["a", "b", "c"]), {"a": 1, "b": 2})
        self.assertEqual(await cache.aincr("a", 5), 6)
        self.assertEqual(await cache.adecr("a"), 5)
        with self.assertRaises(ValueError):
            await cache.aincr("nope")
        self.assertEqual(await cache.aincr_version("a"), 2)
        self.assertEqual(await cache.aget("a", version=2), 5)
        self.assertEqual(await cache.adecr_version("a", version=2), 1)
        self.assertEqual(await cache.aget_or_set("gos", lambda: "computed"), "computed")
        self.assertIs(await cache.adelete("k"), True)
        self.assertIs(await cache.adelete("k"), False)
        await cache.adelete_many(["a", "b"])
        self.assertEqual(await cache.aget_many(["a", "b"]), {})
        await cache.aclose()
        await cache.aclear()
        self.assertIs(await cache.ahas_key("k2"), False)

    async def test_async_calls_stay_on_the_loop_thread(self) -> None:
        value = RecordsPicklingThread()
        await cache.aset("where", value)
        self.assertEqual(value.thread, threading.get_ident())
        value.thread = None
        await cache.aset_many({"where": value})
        self.assertEqual(value.thread, threading.get_ident())


class FrameworkTests(ShmCacheTestCase):
    def test_cache_middleware_round_trip_with_cookies(self) -> None:
        request = RequestFactory().get("/cache/test")
        request._cache_update_cache = True  # type: ignore[attr-defined]
        fetch = FetchFromCacheMiddleware(lambda req: HttpResponse())
        self.assertIsNone(fetch.process_request(request))

        def respond(req: Any) -> HttpResponse:
            response = HttpResponse("Testing cookie serialization.")
            response.set_cookie("foo", "bar")
            return response

        response = UpdateCacheMiddleware(respond)(request)
        cached = fetch.process_request(request)
        self.assertIsNotNone(cached)
        self.assertEqual(cached.content, b"Testing cookie serialization.")
        self.assertEqual(cached.cookies, response.cookies)

    def test_cache_page_serves_the_second_request_from_the_cache(self) -> None:
        before = urls.calls["n"]
        first = self.client.get("/counted/")
        second = self.client.get("/counted/")
        self.assertEqual(urls.calls["n"], before + 1)
        self.assertEqual(first.content, second.content)
        cache.clear()
        self.client.get("/counted/")
        self.assertEqual(urls.calls["n"], before + 2)

    def test_cache_sessions(self) -> None:
        from django.contrib.sessions.backends.cache import SessionStore

        s = SessionStore()
        s["cart"] = ["apple"]
        s.save()
        loaded = SessionStore(session_key=s.session_key)
        self.assertEqual(loaded["cart"], ["apple"])
        loaded["cart"].append("pear")  # mutated, never saved
        again = SessionStore(session_key=s.session_key)
        self.assertEqual(again["cart"], ["apple"])
        s.delete()
        self.assertIs(SessionStore().exists(s.session_key), False)


class ModelInstanceTests(TestCase):
    def tearDown(self) -> None:
        cache.clear()

    def test_reading_an_instance_does_not_rerun_defaults(self) -> None:
        expensive_calculation.num_runs = 0  # type: ignore[attr-defined]
        poll = Poll.objects.create(question="Well?")
        cache.set("question", poll)
        got = cache.get("question")
        self.assertEqual((got.pk, got.question, got.answer), (poll.pk, "Well?", 42))
        self.assertEqual(expensive_calculation.num_runs, 1)  # type: ignore[attr-defined]

    def test_deferred_querysets(self) -> None:
        expensive_calculation.num_runs = 0  # type: ignore[attr-defined]
        Poll.objects.create(question="What?")
        deferred = Poll.objects.defer("question")
        self.assertEqual(deferred.count(), 1)
        cache.set("deferred_queryset", deferred)
        self.assertEqual(expensive_calculation.num_runs, 1)  # type: ignore[attr-defined]
        got = cache.get("deferred_queryset")
        self.assertEqual(expensive_calculation.num_runs, 1)  # type: ignore[attr-defined]
        self.assertEqual([p.answer for p in got], [42])
