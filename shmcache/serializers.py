"""Serializers and compression codecs, and the 16-bit entry flags that name them.

Every entry a :class:`~shmcache.cache.Cache` writes records in the engine's per-entry
``flags`` field which serializer and which compression produced its bytes, so a reader
in another process (or another version of the application) never guesses.  An entry
with ``flags == 0`` is raw bytes written by plain :class:`~shmcache.segment.Segment`
users and reads back as ``bytes``.

Flags layout (bit 0 is the least significant)::

    bits 0-3   serializer id   (0 raw bytes, 1 pickle, 2 json, 3 msgpack, 8-15 user)
    bits 4-5   compression id  (0 none, 1 lz4, 2 zlib)
    bit  6     envelope        (a header with soft expiry and tag generations precedes
                                the payload; see cache.py)
    bit  7     negative entry  (the payload is a cached exception, always pickled)
    bits 8-15  reserved (0)

This module never touches the segment; it only turns objects into bytes and back.

Example::

    >>> s = get_serializer("json")
    >>> s.loads(s.dumps({"a": 1}))
    {'a': 1}
"""

from __future__ import annotations

import json
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

__all__ = [
    "Serializer",
    "Codec",
    "PickleSerializer",
    "JsonSerializer",
    "MsgpackSerializer",
    "RawSerializer",
    "register_serializer",
    "get_serializer",
    "get_codec",
    "default_codec",
    "SER_MASK",
    "COMP_SHIFT",
    "COMP_MASK",
    "F_ENVELOPE",
    "F_NEGATIVE",
]

SER_MASK: Final = 0x000F
COMP_SHIFT: Final = 4
COMP_MASK: Final = 0x0030
F_ENVELOPE: Final = 0x0040
F_NEGATIVE: Final = 0x0080


@runtime_checkable
class Serializer(Protocol):
    """Turns objects into bytes and back.  ``id`` (0-15) goes into the entry flags.

    Implement ``id``, ``name``, ``dumps`` and ``loads`` and pass the object to
    :func:`register_serializer` (ids 8-15 are free for applications)::

        >>> class Upper:
        ...     id, name = 9, "upper"
        ...     def dumps(self, obj): return str(obj).upper().encode()
        ...     def loads(self, data): return bytes(data).decode()
        >>> register_serializer(Upper()).name
        'upper'
    """

    id: int
    name: str

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class RawSerializer:
    """Values are already bytes-like; stored as they are, read back as ``bytes``."""

    id = 0
    name = "raw"

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, bytes):
            return obj
        if isinstance(obj, (bytearray, memoryview)):
            return bytes(obj)
        raise TypeError(f"the raw serializer stores bytes-like values only, "
                        f"not {type(obj).__name__}; choose serializer='pickle'")

    def loads(self, data: bytes) -> Any:
        return data


class PickleSerializer:
    """pickle protocol 5 (the default): any picklable object, exact round trip."""

    id = 1
    name = "pickle"

    def dumps(self, obj: Any) -> bytes:
        try:
            return pickle.dumps(obj, protocol=5)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TypeError(
                f"cannot cache a value of type {type(obj).__name__}: it is not picklable "
                f"({e}); return plain data, or choose another serializer") from e

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)


class JsonSerializer:
    """JSON (UTF-8, compact): readable by any language; tuples come back as lists."""

    id = 2
    name = "json"

    def dumps(self, obj: Any) -> bytes:
        try:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as e:
            raise TypeError(f"cannot cache a value of type {type(obj).__name__} as "
                            f"JSON: {e}") from e

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class MsgpackSerializer:
    """msgpack (needs the ``msgpack`` package, extra ``shmcache[fast]``)."""

    id = 3
    name = "msgpack"

    def __init__(self) -> None:
        try:
            import msgpack  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("serializer='msgpack' needs the msgpack package: "
                              "pip install 'shmcache[fast]'") from e
        self._packb: Callable[..., bytes] = msgpack.packb
        self._unpackb: Callable[..., Any] = msgpack.unpackb

    def dumps(self, obj: Any) -> bytes:
        try:
            return self._packb(obj, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise TypeError(f"cannot cache a value of type {type(obj).__name__} as "
                            f"msgpack: {e}") from e

    def loads(self, data: bytes) -> Any:
        return self._unpackb(data, raw=False, strict_map_key=False)


_SERIALIZERS: dict[int, Serializer] = {}
_BY_NAME: dict[str, Serializer] = {}
_LAZY: Final[dict[str, Callable[[], Serializer]]] = {"msgpack": MsgpackSerializer}


def register_serializer(ser: Serializer) -> Serializer:
    """Make ``ser`` known by its id and name, so entries flagged with its id can be
    read.  Every process that reads such entries must register it too."""
    if not isinstance(ser.id, int) or not 0 <= ser.id <= 15:
        raise ValueError(f"serializer id must be 0..15, got {ser.id!r}")
    old = _SERIALIZERS.get(ser.id)
    if old is not None and old.name != ser.name:
        raise ValueError(f"serializer id {ser.id} is taken by {old.name!r}")
    _SERIALIZERS[ser.id] = ser
    _BY_NAME[ser.name] = ser
    return ser


for _s in (RawSerializer(), PickleSerializer(), JsonSerializer()):
    register_serializer(_s)


def get_serializer(which: str | int | Serializer) -> Serializer:
    """A serializer by name (``"pickle"``, ``"json"``, ``"msgpack"``, ``"raw"``), by
    flags id, or the object itself (registered on the way)."""
    if isinstance(which, str):
        ser = _BY_NAME.get(which)
        if ser is None and which in _LAZY:
            ser = register_serializer(_LAZY[which]())
        if ser is None:
            raise ValueError(f"unknown serializer {which!r}; known: "
                             f"{sorted(set(_BY_NAME) | set(_LAZY))}")
        return ser
    if isinstance(which, int):
        ser = _SERIALIZERS.get(which)
        if ser is None and which == MsgpackSerializer.id:
            ser = register_serializer(MsgpackSerializer())
        if ser is None:
            raise ValueError(f"entry written with unknown serializer id {which}; "
                             f"register it with shmcache.register_serializer")
        return ser
    if isinstance(which, Serializer):
        return _SERIALIZERS.get(which.id) or register_serializer(which)
    raise TypeError(f"serializer must be a name, an id or a Serializer, not "
                    f"{type(which).__name__}")


# -- compression -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Codec:
    """A compression codec: its flags id (1-3), name and functions."""

    id: int
    name: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def _zlib_codec() -> Codec:
    return Codec(2, "zlib", lambda b: zlib.compress(b, 1), zlib.decompress)


def _lz4_codec() -> Codec | None:
    try:
        import lz4.block  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None
    comp: Callable[[bytes], bytes] = lz4.block.compress
    decomp: Callable[[bytes], bytes] = lz4.block.decompress
    return Codec(1, "lz4", comp, decomp)


_CODECS: dict[int, Codec | None] = {}


def get_codec(which: str | int) -> Codec:
    """A codec by name (``"lz4"``, ``"zlib"``) or flags id.  ``"lz4"`` needs the lz4
    package (extra ``shmcache[fast]``)."""
    cid = {"lz4": 1, "zlib": 2}.get(which, -1) if isinstance(which, str) else which
    if cid not in _CODECS:
        _CODECS[cid] = _lz4_codec() if cid == 1 else _zlib_codec() if cid == 2 else None
    codec = _CODECS[cid]
    if codec is None:
        if cid == 1:
            raise ImportError("entry or config uses lz4 compression but the lz4 package "
                              "is missing: pip install 'shmcache[fast]'")
        raise ValueError(f"unknown compression {which!r}; known: 'lz4', 'zlib'")
    return codec


def default_codec() -> Codec:
    """lz4 when installed, else zlib at its fastest level (always available)."""
    try:
        return get_codec(1)
    except ImportError:
        return get_codec(2)
