"""Exception types raised by shmcache.

Every engine status code maps to exactly one class here, so callers can catch the
precise failure (a key that is too long is a ``ValueError``, a value that is not
bytes-like is a ``TypeError``, a lock that could not be taken in time is a
``TimeoutError``) or everything at once with :class:`ShmCacheError`.
"""

from __future__ import annotations


class ShmCacheError(Exception):
    """Base class of every error raised by shmcache."""


class KeyTooLongError(ShmCacheError, ValueError):
    """The key is empty or longer than the segment's ``max_key_len``."""


class ValueTooLargeError(ShmCacheError, ValueError):
    """The value is longer than the segment's ``max_value_len``."""


class NotBytesError(ShmCacheError, TypeError):
    """A key or value is not ``str``/bytes-like where bytes are required."""


class SegmentFullError(ShmCacheError, MemoryError):
    """No room for the value even after evicting what could be evicted."""


class SegmentError(ShmCacheError, OSError):
    """Base class of errors about the segment itself (attach, layout, damage)."""


class SegmentCorruptError(SegmentError):
    """The segment's header or structures are damaged; nothing was served from it."""


class IncompatibleSegmentError(SegmentError):
    """The segment was made by another layout version or configuration."""


class ForeignSegmentError(SegmentError):
    """The name holds something that is not a shmcache segment we may use
    (wrong magic, another owner, or permissions wider than owner-only)."""


class SegmentNotFoundError(SegmentError, FileNotFoundError):
    """Attach was asked for a segment name that does not exist."""


class SegmentNotReadyError(SegmentError):
    """The segment exists but its creator never finished initialising it."""


class LockTimeoutError(ShmCacheError, TimeoutError):
    """A segment lock could not be taken within ``lock_timeout``."""


class NoSlotError(ShmCacheError):
    """Every process slot of the segment is held by a live process."""


class NotAnIntegerError(ShmCacheError, ValueError):
    """``incr``/``decr`` on a value that is not a decimal integer."""


class CounterOverflowError(ShmCacheError, OverflowError):
    """``incr``/``decr`` would leave the signed 64-bit range."""


class VersionMismatchError(ShmCacheError):
    """A compare-and-set found another version of the entry than expected."""


class KeyExistsError(ShmCacheError, KeyError):
    """``add`` found the key already present (only raised where asked for)."""


class SegmentClosedError(ShmCacheError, ValueError):
    """The segment handle was closed."""
