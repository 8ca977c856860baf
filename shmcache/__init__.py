"""shmcache: one cache for every worker process of a pre-fork Python server.

The L1 engine is :class:`shmcache.segment.Segment`, a cache of bytes inside one POSIX
shared-memory segment that every process on the host attaches by name.
"""

from __future__ import annotations

from .errors import (
    CounterOverflowError,
    ForeignSegmentError,
    IncompatibleSegmentError,
    KeyExistsError,
    KeyTooLongError,
    LockTimeoutError,
    NoSlotError,
    NotAnIntegerError,
    NotBytesError,
    SegmentClosedError,
    SegmentCorruptError,
    SegmentError,
    SegmentFullError,
    SegmentNotFoundError,
    SegmentNotReadyError,
    ShmCacheError,
    ValueTooLargeError,
    VersionMismatchError,
)
from .segment import ItemInfo, PinnedValue, Segment, SegmentStats, segment_exists, unlink_segment

__version__ = "0.1.0"

__all__ = [
    "Segment", "ItemInfo", "PinnedValue", "SegmentStats", "segment_exists", "unlink_segment",
    "ShmCacheError", "KeyTooLongError", "ValueTooLargeError", "NotBytesError",
    "SegmentFullError", "SegmentError", "SegmentCorruptError", "IncompatibleSegmentError",
    "ForeignSegmentError", "SegmentNotFoundError", "SegmentNotReadyError", "LockTimeoutError",
    "NoSlotError", "NotAnIntegerError", "CounterOverflowError", "VersionMismatchError",
    "KeyExistsError", "SegmentClosedError",
]

# The Python cache API (cache.py and its modules).
from .cache import (
    MISSING,
    BoundCachedFunction,
    Cache,
    CachedCallError,
    CachedClassMethod,
    CacheDecorator,
    CachedFunction,
    WarmReport,
)
from .config import CacheConfig, CacheLevel, TierNotAvailableError, default_segment_name
from .keys import UnkeyableArgumentError
from .serializers import Serializer, register_serializer
from .stats import CacheStatistics, FunctionStats, LevelStats

__all__ += [
    "Cache", "CacheConfig", "CacheLevel", "CachedFunction", "BoundCachedFunction",
    "WarmReport", "MISSING", "CachedCallError", "CacheDecorator", "CachedClassMethod",
    "TierNotAvailableError",
    "default_segment_name", "UnkeyableArgumentError", "Serializer", "register_serializer",
    "CacheStatistics", "FunctionStats", "LevelStats",
]
