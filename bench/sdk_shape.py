"""A StateFun-shaped Python dispatch with no I/O: issue 9's ceiling for a faithful implementation.

What the official StateFun Python SDK (``apache-flink-statefun`` 3.3.0, files
``statefun/request_reply_v3.py``, ``storage.py``, ``context.py``, ``messages.py``,
``core.py``, ``statefun_builder.py``, ``utils.py``) does for one ``ToFunction`` request, i.e.
one address and the batch of invocations the runtime collected for it, written for this
project (no SDK code copied) with the protobuf and the sockets taken out:

1. look the function up by its type name (``StatefulFunctions.for_typename``);
2. build the target's address (``SdkAddress``: namespace, name, id, typename);
3. index the state values that came with the request by name, check that every registered
   ``ValueSpec`` is among them (a set difference, per request), and wrap each in a ``Cell``
   (type, typed value, dirty flag), all in a dict handed to an instance of the storage
   class generated at bind time (one ``property`` per ``ValueSpec``);
4. build one context (address, storage, caller, three outgoing lists) for the request;
5. per invocation: a ``Message`` (with the SDK's three non-empty checks) wrapping the
   argument's ``TypedValue``, the caller's address (``None`` when the invocation has no
   caller), then the user's function;
6. collect the results: the outgoing messages, delayed messages and egress records of the
   context, and one mutation per dirty cell (its ``TypedValue``, serialized when it was set).

Reading ``storage.<name>`` goes property -> ``Cell.get`` -> type check -> the type's
serializer's ``deserialize``, on every read, as the SDK does (it keeps no decoded value);
setting it goes property -> ``Cell.set`` -> a new ``TypedValue`` with the serialized value;
``message.as_int()`` goes through ``as_type`` -> ``serializer().deserialize``.

Not done, and why this is a ceiling rather than a model of the SDK's speed:

* No protobuf: the SDK parses a ``ToFunction`` and builds a ``FromFunction`` (a
  ``CopyFrom`` per mutation); here the requests are the mesh's msgpack record frames
  (``msgpack.unpackb``, as the trivial baseline) and the result is a list of mutations.
  The value codec is the one the mesh's ``IntType`` uses (pure Python), not the SDK's
  protobuf ``IntWrapper`` (a new serializer and a new protobuf message per call).
* No I/O: the "runtime" side is a dict standing for the state store. The request's state
  values are read from it and the mutations written back to it; no socket, no HTTP, no
  disk, no batching across the network, no checkpoint, no exactly-once bookkeeping.
* Construction is the efficient equivalent of the SDK's: plain ``__slots__`` classes where
  the SDK uses a frozen dataclass (``SdkAddress``, whose ``__init__`` goes through
  ``object.__setattr__``), a function's namespace and name split once at bind time where
  the SDK formats them per request, and no ``asyncio.run`` per request (the SDK's
  ``handle_sync``).

So it does the object work any faithful Python implementation of this API must do per
request and per invocation (the objects a function sees, the lazy typed state, the
mutation collection), and nothing else: a faithful implementation that also moves the
records between processes and keeps state durably can approach it, not pass it.
The mesh's own dispatch is measured against it (``bench/mesh_perf.py``, "x base").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from statefun_mesh import BoolType, DoubleType, FloatType, IntType, LongType, StringType, Type, ValueSpec

#: the store: (function typename, id, state name) -> (value typename, value bytes)
Store = dict[tuple[str, str, str], tuple[str, bytes]]


class TypedValue:
    """The protocol's ``TypedValue``: a type name, whether there is a value, and its bytes."""

    __slots__ = ("has_value", "typename", "value")

    def __init__(self, typename: str, has_value: bool, value: bytes) -> None:
        self.typename = typename
        self.has_value = has_value
        self.value = value


class SdkAddress:
    """``statefun.core.SdkAddress``: namespace, name, id and the typename ``namespace/name``."""

    __slots__ = ("id", "name", "namespace", "typename")

    def __init__(self, namespace: str, name: str, id: str, typename: str) -> None:
        self.namespace = namespace
        self.name = name
        self.id = id
        self.typename = typename


def address_of(typename: str, id: str) -> SdkAddress | None:
    """An invocation's caller: ``None`` when it has none (an ingress), as ``sdk_address_from_pb``."""
    if not typename and not id:
        return None
    namespace, _, name = typename.rpartition("/")
    return SdkAddress(namespace, name, id, typename)


def to_typed_value(tpe: Type, value: Any) -> TypedValue:
    if value is None:
        return TypedValue(tpe.typename, False, b"")
    return TypedValue(tpe.typename, True, tpe.serializer().serialize(value))


def from_typed_value(tpe: Type, tv: TypedValue | None) -> Any:
    if not tv or not tv.has_value:
        return None
    if tpe.typename != tv.typename:
        raise TypeError(f"type mismatch: the value is a {tv.typename}, the ValueSpec says {tpe.typename}")
    return tpe.serializer().deserialize(tv.value)


class Cell:
    """One state value of one address: its type, its typed value and whether it was changed."""

    __slots__ = ("dirty", "tpe", "typed_value")

    def __init__(self, tpe: Type, typed_value: TypedValue | None) -> None:
        self.tpe = tpe
        self.typed_value = typed_value
        self.dirty = False

    def get(self) -> Any:
        return from_typed_value(self.tpe, self.typed_value)

    def set(self, value: Any) -> None:
        if value is None:
            raise ValueError("a state value must not be None; use del to delete it")
        self.typed_value = to_typed_value(self.tpe, value)
        self.dirty = True

    def delete(self) -> None:
        self.typed_value = None
        self.dirty = True


def _state_property(name: str) -> property:
    def fget(self: Any) -> Any:
        cell = self._cells.get(name)
        if not cell:
            raise AttributeError(name)
        return cell.get()

    def fset(self: Any, value: Any) -> None:
        cell = self._cells.get(name)
        if not cell:
            raise AttributeError(name)
        cell.set(value)

    def fdel(self: Any) -> None:
        cell = self._cells.get(name)
        if not cell:
            raise AttributeError(name)
        cell.delete()

    return property(fget, fset, fdel)


def _storage_init(self: Any, cells: dict[str, Cell], typename: str) -> None:
    self._cells = cells
    self._typename = typename


def _storage_missing(self: Any, attr: str) -> Any:
    raise AttributeError(f"{attr!r} is not a registered ValueSpec of the function {self._typename!r}")


class StorageSpec:
    """A function's state: the storage class generated at bind time, the spec names and the specs."""

    __slots__ = ("make_instance", "names", "specs")

    def __init__(self, specs: list[ValueSpec]) -> None:
        attrs: dict[str, Any] = {
            "__init__": _storage_init,
            "__getattr__": _storage_missing,
            "__slots__": ("_cells", "_typename"),
        }
        for spec in specs:
            if spec.name in attrs:
                raise ValueError(f"duplicate ValueSpec name {spec.name!r}")
            attrs[spec.name] = _state_property(spec.name)
        self.make_instance: Callable[[dict[str, Cell], str], Any] = type("AddressScopedStorage", (), attrs)
        self.names = frozenset(s.name for s in specs)
        self.specs = specs


class StatefulFunction:
    __slots__ = ("fun", "name", "namespace", "storage_spec")

    def __init__(self, typename: str, fun: Callable[[Any, Any], None], specs: list[ValueSpec]) -> None:
        self.fun = fun
        self.storage_spec = StorageSpec(specs)
        self.namespace, _, self.name = typename.rpartition("/")


class StatefulFunctions:
    """The registry: type name -> function (sync functions only; no ``asyncio`` here)."""

    def __init__(self) -> None:
        self._functions: dict[str, StatefulFunction] = {}

    def register(self, typename: str, fun: Callable[[Any, Any], None], specs: list[ValueSpec] | None = None) -> None:
        self._functions[typename] = StatefulFunction(typename, fun, specs or [])

    def for_typename(self, typename: str) -> StatefulFunction:
        return self._functions[typename]


_PRIMITIVES: dict[str, Type] = {
    "int_value": IntType,
    "long_value": LongType,
    "float_value": FloatType,
    "double_value": DoubleType,
    "str_value": StringType,
    "bool_value": BoolType,
}


class Message:
    """``statefun.messages.Message``: a target and a ``TypedValue``, read through typed getters."""

    __slots__ = ("target_id", "target_typename", "typed_value")

    def __init__(self, target_typename: str, target_id: str, typed_value: TypedValue) -> None:
        if not target_typename:
            raise ValueError("target_typename can not be missing")
        if not target_id:
            raise ValueError("target_id can not be missing")
        if not typed_value:
            raise ValueError("typed_value can not be missing")
        self.target_typename = target_typename
        self.target_id = target_id
        self.typed_value = typed_value

    def is_int(self) -> bool:
        return self.is_type(IntType)

    def as_int(self) -> int | None:
        return self.as_type(IntType)  # type: ignore[no-any-return]

    def is_type(self, tpe: Type) -> bool:
        return self.typed_value.typename == tpe.typename

    def as_type(self, tpe: Type) -> Any:
        tv = self.typed_value
        if tv.has_value:
            return tpe.serializer().deserialize(tv.value)
        return None


class Context:
    """``UserFacingContext``, plus what the perf app's counter reads (``in_request``, ``reply``),
    which the SDK has no counterpart of: an invocation's request id, and a reply kept like a send."""

    __slots__ = ("_address", "_caller", "_delayed", "_egress", "_outgoing", "_replies", "_request", "_storage")

    def __init__(self, address: SdkAddress, storage: Any) -> None:
        self._address = address
        self._storage = storage
        self._caller: SdkAddress | None = None
        self._request = 0
        self._outgoing: list[Message] = []
        self._delayed: list[Any] = []
        self._egress: list[Any] = []
        self._replies: list[tuple[int, TypedValue]] = []

    @property
    def address(self) -> SdkAddress:
        return self._address

    @property
    def storage(self) -> Any:
        return self._storage

    @property
    def caller(self) -> SdkAddress | None:
        return self._caller

    @property
    def in_request(self) -> bool:
        return self._request != 0

    def send(self, message: Message) -> None:
        self._outgoing.append(message)

    def reply(self, **kwargs: Any) -> None:
        ((kw, value),) = kwargs.items()
        self._replies.append((self._request, to_typed_value(_PRIMITIVES[kw], value)))


#: one state change of one address: (state name, the new value or None for a delete)
Mutation = tuple[str, TypedValue | None]


def handle(
    functions: StatefulFunctions, typename: str, id: str, invocations: list[list[Any]], store: Store
) -> tuple[list[Any], list[Mutation]]:
    """One request: the invocations of one address, with its state read from ``store``; returns what the
    SDK's ``collect_success`` puts in the response: the outgoing records and the mutations.

    ``invocations`` are records of the mesh's shape: ``[typename, id, caller_typename,
    caller_id, value_typename, value, reply_peer, request_id]``.
    """
    fn = functions.for_typename(typename)
    address = SdkAddress(fn.namespace, fn.name, id, typename)
    spec = fn.storage_spec
    # the state values the runtime sends with the request, indexed by name
    received: dict[str, TypedValue] = {}
    for vs in spec.specs:
        stored = store.get((typename, id, vs.name))
        received[vs.name] = (
            TypedValue(vs.type.typename, False, b"") if stored is None else TypedValue(stored[0], True, stored[1])
        )
    missing = spec.names - received.keys()
    if missing:
        raise KeyError(f"state values missing from the request: {sorted(missing)}")
    cells = {vs.name: Cell(vs.type, received[vs.name]) for vs in spec.specs}
    ctx = Context(address, spec.make_instance(cells, typename))
    fun = fn.fun
    for rec in invocations:
        msg = Message(typename, id, TypedValue(rec[4], True, rec[5]))
        ctx._caller = address_of(rec[2], rec[3])
        ctx._request = rec[7]
        fun(ctx, msg)
    # collect the results, as collect_success does (outgoing lists, then the mutations)
    out: list[Any] = []
    for m in ctx._outgoing:
        out.append((m.target_typename, m.target_id, m.typed_value))
    out.extend(ctx._delayed)
    out.extend(ctx._egress)
    mutations: list[Mutation] = [(name, cell.typed_value) for name, cell in cells.items() if cell.dirty]
    return out, mutations


def dispatch_frame(functions: StatefulFunctions, frame: bytes, store: Store) -> int:
    """Unpack one frame of records, group them by address (as the runtime batches a request per
    address), handle each group and apply its mutations to ``store``; returns the invocations done."""
    groups: dict[tuple[str, str], list[list[Any]]] = {}
    for rec in msgpack.unpackb(frame):
        key = (rec[0], rec[1])
        group = groups.get(key)
        if group is None:
            groups[key] = [rec]
        else:
            group.append(rec)
    n = 0
    for (typename, id), recs in groups.items():
        _, mutations = handle(functions, typename, id, recs, store)  # no sends: the counter's are empty
        for name, tv in mutations:
            if tv is None or not tv.has_value:
                store.pop((typename, id, name), None)
            else:
                store[(typename, id, name)] = (tv.typename, tv.value)
        n += len(recs)
    return n


def registry(bindings: Iterable[tuple[str, Callable[[Any, Any], None], list[ValueSpec]]]) -> StatefulFunctions:
    """A registry of ``(typename, function, specs)``."""
    functions = StatefulFunctions()
    for typename, fun, specs in bindings:
        functions.register(typename, fun, specs)
    return functions
