"""Deterministic cache keys for decorated functions.

A key must be the same in every worker process and after a restart, so it is built from
the function's qualified name and a canonical text encoding of its arguments -- never
from Python's ``hash()``, which is salted per process.  Only values whose encoding is
stable are accepted: ``None``, bools, ints, floats, str, bytes, Enum members, classes and
functions (by qualified name), ``datetime``/``date``/``time``/``UUID``/``Decimal``,
tuples, lists, dicts, sets and frozensets of those, and any object with a
``__cache_key__()`` method returning one of those.  Anything else (a request, a DB
session) raises :class:`UnkeyableArgumentError` naming the argument, so a cache key
never silently depends on an object's ``id()``.

Keys longer than ``max_len`` keep their readable prefix and end with a BLAKE2b digest of
the whole encoding.

Example::

    >>> def get_user(user_id, *, full=False): ...
    >>> function_key(get_user, (42,), {"full": True})
    'shmcache.keys.get_user|42|full=True'
"""

from __future__ import annotations

import datetime
import decimal
import enum
import hashlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["UnkeyableArgumentError", "encode_arg", "function_key", "qualified_name",
           "shorten", "KEY_HINT"]

KEY_HINT: Final = ("pass key_builder=... to cached(), or give the type a "
                   "__cache_key__() method")

_REPR_TYPES: Final = (datetime.datetime, datetime.date, datetime.time,
                      datetime.timedelta, uuid.UUID, decimal.Decimal)


class UnkeyableArgumentError(TypeError):
    """An argument of a cached call has no stable, process-independent encoding."""


def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a function or class (stable across processes)."""
    mod = getattr(obj, "__module__", None) or "?"
    return f"{mod}.{getattr(obj, '__qualname__', None) or obj.__name__}"


def _encode(v: Any, depth: int = 0) -> str:
    t = type(v)
    # Exact types first (the common case), then subclasses and containers.
    if t is int or t is bool or v is None:
        return repr(v)
    if t is str or t is bytes:
        return repr(v)
    if t is float:
        return repr(v)
    if depth > 32:
        raise UnkeyableArgumentError("argument nests deeper than 32 levels")
    if isinstance(v, enum.Enum):
        return f"{qualified_name(t)}.{v.name}"
    if t is tuple or t is list:
        inner = ",".join([_encode(x, depth + 1) for x in v])
        return f"({inner})" if t is tuple else f"[{inner}]"
    if t is dict or isinstance(v, Mapping):
        items = sorted(f"{_encode(k, depth + 1)}:{_encode(x, depth + 1)}"
                       for k, x in v.items())
        return "{" + ",".join(items) + "}"
    if t is set or t is frozenset:
        return "set{" + ",".join(sorted(_encode(x, depth + 1) for x in v)) + "}"
    ck = getattr(v, "__cache_key__", None)
    if ck is not None and callable(ck) and not isinstance(v, type):
        return f"{qualified_name(t)}<{_encode(ck(), depth + 1)}>"
    if isinstance(v, _REPR_TYPES):
        return repr(v)
    if isinstance(v, type) or (callable(v) and hasattr(v, "__qualname__")
                               and hasattr(v, "__module__") and not hasattr(v, "__self__")):
        return "<" + qualified_name(v) + ">"
    if isinstance(v, (int, float, str, bytes)):  # subclasses: encode as the base value
        base: Any = next(b for b in (bool, int, float, str, bytes) if isinstance(v, b))
        return _encode(base(v), depth + 1)
    if isinstance(v, (tuple, list)):
        return _encode(list(v) if isinstance(v, list) else tuple(v), depth + 1)
    if isinstance(v, (set, frozenset)):
        return _encode(frozenset(v), depth + 1)
    raise UnkeyableArgumentError(type(v).__name__)


def encode_arg(v: Any) -> str:
    """The canonical encoding of one argument value.

    >>> encode_arg((1, "a", None))
    "(1,'a',None)"
    """
    return _encode(v)


def shorten(key: str, max_len: int) -> str:
    """``key`` itself if it fits in ``max_len`` UTF-8 bytes, else its prefix plus a
    BLAKE2b-128 digest of the whole (still deterministic and collision-resistant)."""
    raw = key.encode("utf-8")
    if len(raw) <= max_len:
        return key
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    keep = max(0, max_len - len(digest) - 1)
    prefix = raw[:keep].decode("utf-8", "ignore")
    return f"{prefix}#{digest}"


def function_key(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 *, prefix: str | None = None, skip_first: bool = False,
                 param_names: tuple[str, ...] = ()) -> str:
    """The default key of the call ``fn(*args, **kwargs)``:
    ``module.qualname|arg|arg|name=value``.

    Positional and keyword spellings of one call give different keys (binding every
    call to the signature would cost more than the rest of a cache hit); keyword
    arguments are sorted.  ``skip_first`` leaves out ``self``/``cls`` of methods that
    asked for it.  Raises :class:`UnkeyableArgumentError` naming the argument.
    """
    parts = [prefix if prefix is not None else qualified_name(fn)]
    start = 1 if skip_first else 0
    for i in range(start, len(args)):
        try:
            parts.append(_encode(args[i]))
        except UnkeyableArgumentError as e:
            name = param_names[i] if i < len(param_names) else f"#{i}"
            raise UnkeyableArgumentError(
                f"cannot build a cache key for {qualified_name(fn)}(): argument "
                f"{name!r} of type {type(args[i]).__name__} has no stable encoding "
                f"({e}); {KEY_HINT}") from None
    if kwargs:
        for k in sorted(kwargs):
            try:
                parts.append(f"{k}={_encode(kwargs[k])}")
            except UnkeyableArgumentError as e:
                raise UnkeyableArgumentError(
                    f"cannot build a cache key for {qualified_name(fn)}(): argument "
                    f"{k!r} of type {type(kwargs[k]).__name__} has no stable encoding "
                    f"({e}); {KEY_HINT}") from None
    return "|".join(parts)
