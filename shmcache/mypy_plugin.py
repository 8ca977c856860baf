"""A mypy plugin for ``@cache.cached()`` on static methods.

mypy passes every attribute whose type defines ``__get__`` through that ``__get__``,
even when the attribute is a ``@staticmethod``.  A :class:`~shmcache.cache.CachedFunction`
binds its first parameter on instance access (that is how methods get ``self``), so
without this plugin ``Tools().parse(x)`` on a cached static method is reported as "too
many arguments" although it works at run time.  The plugin gives static methods back
their unbound type, which is exactly what ``staticmethod`` does at run time.

Enable it in the project's mypy configuration::

    [tool.mypy]
    plugins = ["shmcache.mypy_plugin"]

Nothing else changes: functions, methods and class methods are typed without it.
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.nodes import Decorator, Var
from mypy.plugin import AttributeContext, Plugin
from mypy.types import Instance, Type, get_proper_type

_CACHED = "shmcache.cache.CachedFunction"


def _static_cached_type(ctx: AttributeContext, name: str) -> Type:
    owner = get_proper_type(ctx.type)
    if isinstance(owner, Instance):
        sym = owner.type.get(name)
        node = sym.node if sym is not None else None
        var = node.var if isinstance(node, Decorator) else node
        if isinstance(var, Var) and var.is_staticmethod and var.type is not None:
            declared = get_proper_type(var.type)
            if isinstance(declared, Instance) and declared.type.fullname == _CACHED:
                return declared
    return ctx.default_attr_type


class ShmcachePlugin(Plugin):
    """Keeps ``@staticmethod`` + ``@cache.cached()`` unbound on instance access."""

    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        name = fullname.rpartition(".")[2]
        return lambda ctx: _static_cached_type(ctx, name)


def plugin(version: str) -> type[Plugin]:
    """mypy's entry point."""
    return ShmcachePlugin
