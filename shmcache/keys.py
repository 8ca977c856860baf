"""Deterministic cache keys for decorated functions.

A key must be the same in every worker process and after a restart, so it is built from
the function's qualified name and a canonical text encoding of its arguments -- never
from Python's ``hash()``, which is salted per process.  Only values whose encoding is
stable are accepted: ``None``, bools, ints, floats, str, bytes, Enum members, classes,
module-level functions and builtins (by qualified name), methods bound to a class,
``datetime``/``date``/``time``/``UUID``/``Decimal``, tuples, lists, dicts, sets and
frozensets of those (a subclass such as a namedtuple is keyed with its type's qualified
name, so it never collides with a plain tuple), and any object with a
``__cache_key__()`` method returning one of those.  Anything else (a request, a DB
session, a lambda, a closure, a method bound to an object, a ``functools.partial``)
raises :class:`UnkeyableArgumentError` naming the argument, so a cache key never
silently depends on an object's ``id()`` or collides with another object of one name.
Classes are keyed by qualified name, so two classes a factory makes under one name
share keys: give them a ``key_builder``.

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
import types
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Final, overload

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
    if isinstance(v, type):
        return "<" + qualified_name(v) + ">"
    if callable(v):
        return "<" + qualified_name(_keyable_callable(v)) + ">"
    if isinstance(v, (int, float, str, bytes)):  # subclasses: encode as the base value
        base: Any = next(b for b in (bool, int, float, str, bytes) if isinstance(v, b))
        return _encode(base(v), depth + 1)
    # Subclasses of containers (namedtuples, ...) carry their type's name: A(1, 2),
    # B(1, 2) and (1, 2) compare equal but a function may well tell them apart.
    if isinstance(v, tuple):
        return qualified_name(t) + _encode(tuple(v), depth + 1)
    if isinstance(v, list):
        return qualified_name(t) + _encode(list(v), depth + 1)
    if isinstance(v, (set, frozenset)):
        return qualified_name(t) + _encode(frozenset(v), depth + 1)
    raise UnkeyableArgumentError(type(v).__name__)


def _keyable_callable(v: Any) -> Any:
    """``v`` if it is a function that its qualified name identifies (a module-level
    ``def`` or builtin, or a method bound to a class); else raise: two lambdas, two
    closures of one factory or the same method bound to two objects share a qualified
    name but not a behaviour, so keying them by name would return wrong results."""
    self_ = getattr(v, "__self__", None)
    if isinstance(v, types.MethodType):
        if not isinstance(self_, type):
            raise UnkeyableArgumentError("a method bound to an object (its result may "
                                         "depend on the object)")
        _keyable_callable(v.__func__)
        return v
    if isinstance(v, types.BuiltinFunctionType):
        if self_ is None or isinstance(self_, (types.ModuleType, type)):
            return v
        raise UnkeyableArgumentError("a builtin method bound to an object")
    if not isinstance(v, types.FunctionType):
        raise UnkeyableArgumentError("a callable object without a stable identity")
    qn = v.__qualname__
    if "<lambda>" in qn:
        raise UnkeyableArgumentError("a lambda (every lambda has the same name)")
    if v.__closure__ is not None or "<locals>" in qn:
        raise UnkeyableArgumentError("a closure or local function (functions made by "
                                     "one factory share their name)")
    return v


def encode_arg(v: Any) -> str:
    """The canonical encoding of one argument value.

    >>> encode_arg((1, "a", None))
    "(1,'a',None)"
    """
    return _encode(v)


@overload
def shorten(key: str, max_len: int) -> str: ...


@overload
def shorten(key: str | bytes, max_len: int) -> str | bytes: ...


def shorten(key: str | bytes, max_len: int) -> str | bytes:
    """``key`` itself if it fits in ``max_len`` UTF-8 bytes, else its prefix plus a
    BLAKE2b-128 digest of the whole (still deterministic and collision-resistant).
    A bytes key (not UTF-8) is digested as it is; its shortened form is a str."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
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
