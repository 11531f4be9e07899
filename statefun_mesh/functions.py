"""Function registration: ``StatefulFunctions`` and ``ValueSpec`` (StateFun SDK names)."""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Final

from .address import parse_typename
from .context import storage_class
from .state.lmdb_backend import state_key_parts, value_header
from .valuetypes import BoolType, DoubleType, FloatType, IntType, LongType, StringType, Type

#: value types the dispatcher decodes as it reads them: their values are immutable and cached
_EAGER: Final = (IntType, LongType, FloatType, DoubleType, BoolType, StringType)

__all__ = ["FunctionSpec", "StatefulFunctions", "StorageSpec", "ValueSpec", "merge_functions"]


class ValueSpec:
    """Declares one persisted value of a function: its name, type and optional TTL.

    Args:
        name: a lower-case Python identifier that is not a keyword; it becomes the
            attribute ``context.storage.<name>``.
        type: the value's :class:`~statefun_mesh.valuetypes.Type`.
        expire_after_call: the value expires this long after the instance was last
            invoked (any message refreshes it).
        expire_after_write: the value expires this long after it was last written.

    Only one of ``expire_after_call`` and ``expire_after_write`` may be set; a zero
    ``timedelta`` means no expiry. An expired value reads as ``None``.

    As in StateFun, ``duration`` is the TTL in whole milliseconds (0 without one) and
    ``after_call``/``after_write`` say which kind it is.
    """

    __slots__ = ("after_call", "after_write", "duration", "name", "type")

    def __init__(
        self,
        name: str,
        type: Type,
        expire_after_call: timedelta | None = None,
        expire_after_write: timedelta | None = None,
    ) -> None:
        if not name:
            raise ValueError("name can not be missing.")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name.__class__.__name__}")
        if not name.isidentifier():
            raise ValueError(
                f"invalid name {name!r}: a spec name can only contain alphanumeric characters and "
                "underscores, and must not start with a digit"
            )
        if keyword.iskeyword(name):
            raise ValueError(f"invalid name {name!r}: a spec name can not be a Python keyword")
        if not name.islower():
            raise ValueError(f"invalid name {name!r}: a spec name must be lower case (and hold a letter)")
        if name in _RESERVED_NAMES:
            raise ValueError(f"invalid name {name!r}: the storage object uses this attribute itself")
        if not type:
            raise ValueError("type can not be missing.")
        if not isinstance(type, Type):
            raise TypeError(f"type of ValueSpec {name!r} is not a statefun_mesh Type: {type!r}")
        for label, ttl in (("expire_after_call", expire_after_call), ("expire_after_write", expire_after_write)):
            if ttl is not None:
                if not isinstance(ttl, timedelta):
                    raise TypeError(f"{label} must be a datetime.timedelta, got {ttl.__class__.__name__}")
                if ttl < timedelta(0):
                    raise ValueError(f"{label} must not be negative, got {ttl}")
        if expire_after_call and expire_after_write:
            raise ValueError("Only one of expire_after_call or expire_after_write can be set.")
        self.name = name
        self.type = type
        ttl = expire_after_call or expire_after_write
        #: the TTL in milliseconds, 0 for none (StateFun's ``ValueSpec.duration``)
        self.duration: int = int(ttl.total_seconds() * 1000.0) if ttl else 0
        if ttl and self.duration == 0:
            raise ValueError(f"a TTL of {ttl} is shorter than a millisecond; use at least timedelta(milliseconds=1)")
        self.after_call = bool(expire_after_call)
        self.after_write = bool(expire_after_write)

    def __repr__(self) -> str:
        ttl = ""
        if self.after_call:
            ttl = f", expire_after_call={timedelta(milliseconds=self.duration)!r}"
        elif self.after_write:
            ttl = f", expire_after_write={timedelta(milliseconds=self.duration)!r}"
        return f"ValueSpec({self.name!r}, {self.type.typename!r}{ttl})"


#: attributes of ``context.storage`` itself: no spec may take these names
_RESERVED_NAMES: Final = frozenset({"_address", "_cells", "_writes"})


class StorageSpec:
    """A function's declared values (StateFun's ``StorageSpec``: ``names`` and ``specs``)."""

    __slots__ = ("names", "specs")

    def __init__(self, specs: list[ValueSpec]) -> None:
        self.specs = specs
        self.names = frozenset(s.name for s in specs)

    def __repr__(self) -> str:
        return f"StorageSpec({self.specs!r})"


class FunctionSpec:
    """A bound function: its type name, the callable, its value specs and whether it is async."""

    __slots__ = ("fun", "is_async", "key_parts", "specs", "storage_class", "storage_spec", "ttl_ms", "typename")

    def __init__(self, typename: str, fun: Callable[..., Any], specs: list[ValueSpec]) -> None:
        self.typename = typename
        self.fun = fun
        self.specs = specs
        #: StateFun's view of the specs (``fun.storage_spec.specs``)
        self.storage_spec = StorageSpec(specs)
        self.is_async = inspect.iscoroutinefunction(fun)
        #: (name, milliseconds, after_call) for every spec with a TTL.
        self.ttl_ms = [(s.name, s.duration, s.after_call) for s in specs if s.duration]
        #: (name, type, type part, name part, stored-value header, eager decoder): the parts of
        #: each state key (state_key_parts); the bytes a stored value of the spec's type without
        #: expiry starts with (value_header), so the dispatcher decodes it with a prefix check;
        #: and for the built-in primitive types (whose values are immutable) their decoder, which
        #: the dispatcher calls when it reads the value (else the value is decoded when first read)
        self.key_parts = [
            (
                s.name,
                s.type,
                *state_key_parts(typename, s.name),
                value_header(s.type.typename),
                s.type.serializer().deserialize if s.type in _EAGER else None,
            )
            for s in specs
        ]
        #: ``context.storage``'s class for this function: a property per spec
        self.storage_class = storage_class(typename, [s.name for s in specs if not s.name.startswith("__")])


def _check_signature(typename: str, fun: Callable[..., Any]) -> None:
    """Raise ``ValueError`` unless ``fun`` can be called as ``fun(context, message)``."""
    try:
        sig = inspect.signature(fun)
    except (TypeError, ValueError):
        return  # a builtin or extension callable without a signature: trust it
    try:
        sig.bind(None, None)
    except TypeError:
        params = list(sig.parameters)
        raise ValueError(
            f"The registered function {typename} does not expect a context and a message but rather {params}; "
            "define it as def fn(context, message)"
        ) from None


class StatefulFunctions:
    """A module of functions, bound by type name (StateFun's ``StatefulFunctions``)."""

    __slots__ = ("_functions",)

    def __init__(self) -> None:
        self._functions: dict[str, FunctionSpec] = {}

    def register(self, typename: str, fun: Callable[..., Any], specs: Iterable[ValueSpec] | None = None) -> None:
        """Bind ``fun(context, message)`` (``def`` or ``async def``) to ``typename``.

        Raises:
            ValueError: a malformed type name, a type name bound twice, two specs with
                the same name, a missing function, or one that cannot be called with
                ``(context, message)`` (as in StateFun).
            TypeError: ``fun`` is not callable, or a spec is not a ``ValueSpec``.
        """
        parse_typename(typename)
        if fun is None:
            raise ValueError(f"function instance must be provided for {typename!r}")
        if not callable(fun):
            raise TypeError(f"function bound to {typename!r} is not callable: {fun!r}")
        _check_signature(typename, fun)
        if typename in self._functions:
            raise ValueError(f"a function is already bound to {typename!r}")
        spec_list = list(specs or ())
        seen: set[str] = set()
        for s in spec_list:
            if not isinstance(s, ValueSpec):
                raise TypeError(f"specs of {typename!r} must be ValueSpec instances, got {s!r}")
            if s.name in seen:
                raise ValueError(f"{typename!r} declares the state {s.name!r} twice")
            seen.add(s.name)
        self._functions[typename] = FunctionSpec(typename, fun, spec_list)

    def bind(
        self, typename: str, specs: Iterable[ValueSpec] | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of :meth:`register`: ``@functions.bind(typename=..., specs=[...])``."""

        def wrapper(fun: Callable[..., Any]) -> Callable[..., Any]:
            self.register(typename, fun, specs)
            return fun

        return wrapper

    def for_typename(self, typename: str) -> FunctionSpec:
        """Return the bound function for ``typename``; ``KeyError`` if none."""
        return self._functions[typename]

    def __contains__(self, typename: object) -> bool:
        return typename in self._functions

    def __iter__(self) -> Any:
        return iter(self._functions.values())

    def __len__(self) -> int:
        return len(self._functions)

    @property
    def typenames(self) -> list[str]:
        """The bound type names."""
        return list(self._functions)


def merge_functions(*modules: StatefulFunctions | Iterable[StatefulFunctions]) -> dict[str, FunctionSpec]:
    """Multiplex several modules into one table; a type bound in two modules is a ``ValueError``."""
    table: dict[str, FunctionSpec] = {}
    flat: list[StatefulFunctions] = []
    for m in modules:
        if isinstance(m, StatefulFunctions):
            flat.append(m)
        else:
            flat.extend(m)
    if not flat:
        raise ValueError("no functions given: pass at least one StatefulFunctions")
    for m in flat:
        if not isinstance(m, StatefulFunctions):
            raise TypeError(f"expected StatefulFunctions, got {type(m).__name__}")
        for spec in m:
            if spec.typename in table:
                raise ValueError(f"{spec.typename!r} is bound in two of the given function modules")
            table[spec.typename] = spec
    return table
