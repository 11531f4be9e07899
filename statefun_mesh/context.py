"""The invocation context (StateFun's ``Context``) and the per-invocation storage view."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from . import _speedups
from ._speedups import record_size
from .address import Address, make_address
from .errors import MessageTooLargeError
from .messages import EgressMessage, Message, typed_value_from_kwargs

if TYPE_CHECKING:
    from .outbox import Stager
    from .valuetypes import Type

__all__ = ["Cell", "Context", "Storage"]

#: decoded values of these types are cached across the invocations of a batch; anything
#: else is decoded afresh each time, so an in-place change that was not assigned back
#: (or that belonged to a failed invocation) never leaks into the next invocation.
_IMMUTABLE: Final = frozenset({int, float, str, bool, bytes, type(None)})


class _Deleted:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<deleted>"


DELETED: Final = _Deleted()
#: ``reply()``'s "no positional value given" (``None`` is a value the builder rejects by name)
_NO_VALUE: Final[Any] = object()


class Cell:
    """One declared value of one instance during a batch: its stored bytes and decoded value."""

    __slots__ = ("data", "decoded", "dirty", "expire", "has_decoded", "key", "name", "type", "vt")

    def __init__(self, name: str, type: Type, key: bytes, vt: str | None, data: bytes | None, expire: int) -> None:
        self.name = name
        self.type = type
        self.key = key
        self.vt = vt
        self.data = data
        self.expire = expire
        self.decoded: Any = None
        self.has_decoded = False
        self.dirty = False

    def read(self, address: Address) -> Any:
        """Return the decoded value (``None`` when absent or expired)."""
        if self.has_decoded:
            return self.decoded
        if self.data is None:
            value = None
        else:
            if self.vt != self.type.typename:
                raise TypeError(
                    f"state {self.name!r} of {address} holds a value of type {self.vt!r}, but its "
                    f"ValueSpec declares type {self.type.typename!r}; migrate or delete the stored value"
                )
            value = self.type.serializer().deserialize(self.data)
        if type(value) in _IMMUTABLE:
            self.decoded = value
            self.has_decoded = True
        return value


class Storage:
    """``context.storage``: one attribute per declared ``ValueSpec``.

    Reading gives the value (``None`` if absent or expired); assigning stores it
    (assigning ``None`` deletes it); ``del`` deletes it. Writes become visible to later
    invocations only if this invocation returns without raising.

    Each function gets its own subclass at bind time (:func:`storage_class`) with a
    property per ``ValueSpec``, so a read is one property call, not a failed attribute
    lookup and ``__getattr__``. ``_writes`` is ``None`` until the first assignment.
    """

    __slots__ = ("_address", "_cells", "_writes")

    _address: Address
    _cells: dict[str, Cell]
    _writes: dict[str, Any] | None

    def __init__(self, address: Address, cells: dict[str, Cell]) -> None:
        _set_address(self, address)
        _set_cells(self, cells)
        _set_writes(self, None)

    def __getattr__(self, name: str) -> Any:
        # reached only for names without a property: the base class, or an undeclared name
        if name in ("_address", "_cells", "_writes"):
            raise AttributeError(name)
        cell = self._cells.get(name)
        if cell is None:
            raise AttributeError(
                f"{self._address.typename} has no state {name!r}; declare it with "
                f"ValueSpec(name={name!r}, type=...) in bind(specs=[...])"
            )
        return _read(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._cells:
            raise AttributeError(
                f"{self._address.typename} has no state {name!r}; declare it with "
                f"ValueSpec(name={name!r}, type=...) in bind(specs=[...])"
            )
        writes = self._writes
        if writes is None:
            _set_writes(self, {name: DELETED if value is None else value})
        else:
            writes[name] = DELETED if value is None else value

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    def __dir__(self) -> list[str]:
        return sorted(self._cells)


# the slots' own descriptors: Storage overrides __setattr__ for the function's writes
_set_address: Final[Any] = Storage.__dict__["_address"].__set__
_set_cells: Final[Any] = Storage.__dict__["_cells"].__set__
_set_writes: Final[Any] = Storage.__dict__["_writes"].__set__


def _read(storage: Storage, name: str) -> Any:
    writes = storage._writes
    if writes is not None and name in writes:
        value = writes[name]
        return None if value is DELETED else value
    return storage._cells[name].read(storage._address)


def _property(name: str) -> property:
    def get(self: Storage) -> Any:
        writes = self._writes
        if writes is not None and name in writes:
            value = writes[name]
            return None if value is DELETED else value
        cell = self._cells[name]
        if cell.has_decoded:  # Cell.read's first lines
            return cell.decoded
        return cell.read(self._address)

    get.__name__ = name
    return property(get, doc=f"the state {name!r}")


def storage_class(typename: str, names: list[str]) -> type[Storage]:
    """A :class:`Storage` subclass for one function: a read-only property per declared
    state (assignments go through ``Storage.__setattr__``)."""
    ns: dict[str, Any] = {"__slots__": (), "__qualname__": "Storage", "__module__": __name__}
    for name in names:
        ns[name] = _property(name)
    return type("Storage", (Storage,), ns)


class Context:
    """What a function gets besides its message: its address, its caller, its storage and
    the ways to send messages (StateFun's ``Context``, plus :meth:`reply`).

    Everything a function does through its context takes effect only if the invocation
    returns normally; if it raises, its sends, timers, egress records, reply and state
    changes are all discarded.
    """

    __slots__ = (
        "_delayed",
        "_egress",
        "_limit",
        "_outbox",
        "_rec",
        "_reply",
        "_room",
        "_sends",
        "address",
        "storage",
    )

    def __init__(
        self,
        address: Address,
        rec: tuple[str, str, str, str, str, bytes, int, int],
        storage: Storage,
        limit: int = 0,
    ) -> None:
        self.address = address
        #: the message's record: the caller (fields 2, 3) and the request (6: reply peer, 7: request id)
        self._rec = rec
        self.storage = storage
        self._sends: list[tuple[str, str, str, str, str, bytes, int, int]] | None = None
        #: (delay, record, cancellation token) in call order; cancellations interleave here too.
        self._delayed: list[tuple[Any, ...]] | None = None
        self._egress: list[tuple[str, str, bytes]] | None = None
        self._reply: tuple[str, bytes] | None = None
        #: the largest message the mesh admits (max_message_bytes; 0: unchecked)
        self._limit = limit
        #: where sends past their share of memory_budget go (outbox.py; None: kept in memory)
        self._outbox: Stager | None = None
        #: estimated bytes of sends left before those in _sends are staged (counted down while
        #: _outbox is set; whoever sets _outbox sets it to the outbox's stage_bytes)
        self._room = 0

    @property
    def caller(self) -> Address | None:
        """The address of the function that sent the message; ``None`` for a message from
        a client, an ingress or a timer the mesh itself fired."""
        rec = self._rec
        return make_address(Address, (rec[2], rec[3])) if rec[2] else None

    @property
    def _reply_peer(self) -> int:
        return self._rec[6]

    @property
    def _request_id(self) -> int:
        return self._rec[7]

    def _check_size(self, rec: tuple[str, str, str, str, str, bytes, int, int], kind: str) -> None:
        # Refused here, at the call, so the function may catch it; uncaught, the
        # invocation fails as a whole and its message is dead-lettered with the reason.
        limit = self._limit
        if not limit or len(rec[5]) + 4 * sum(len(f) for f in rec[:5]) + 49 <= limit:
            return
        size = record_size(rec)
        if size > limit:
            where = f"for {rec[0]}" if kind == "egress record" else f"to {rec[0]}/{rec[1]}"
            raise MessageTooLargeError(size, limit, f"{kind} {where}")

    @property
    def in_request(self) -> bool:
        """Whether the message being handled is part of a client request (see :meth:`reply`)."""
        return self._rec[7] != 0

    def send(self, message: Message) -> None:
        """Send ``message`` to its target instance.

        Raises:
            MessageTooLargeError: the message is over the mesh's ``max_message_bytes``.
        """
        # The Cython core runs its own copy of this method (csrc/objects.pxi, Context.send):
        # a change here goes there too (tests/unit/test_native_objects.py compares the two).
        if type(message) is not Message:
            raise TypeError(f"send() takes a Message (use message_builder), got {type(message).__name__}")
        a = self.address
        own = self._rec
        t, i, vt, v = message.target_typename, message.target_id, message._vt, message._v
        rec = (t, i, a[0], a[1], vt, v, own[6], own[7])
        limit = self._limit
        # _check_size's bound, inlined (a generator per send was most of a send's cost)
        if limit and len(v) + 4 * (len(t) + len(i) + len(a[0]) + len(a[1]) + len(vt)) + 49 > limit:
            self._check_size(rec, "message")
        sends = self._sends
        if sends is None:
            self._sends = [rec]
        else:
            sends.append(rec)
        outbox = self._outbox
        if outbox is not None:
            # counted down, with memory.RECORD_OVERHEAD (400) as a literal: a global lookup
            # and a count up against an attribute cost twice as much per send
            room = self._room - len(i) - len(v) - 400
            self._room = room
            if room <= 0:
                outbox.stage(self)  # to disk, part of the batch (outbox.py)

    def send_after(self, duration: timedelta, message: Message, cancellation_token: str = "") -> None:
        """Send ``message`` once ``duration`` has passed (StateFun's signature).

        Delayed messages are state: they survive restarts and are restored with
        checkpoints. ``cancellation_token`` names the message for
        :meth:`cancel_delayed_message`; tokens are scoped to the sending instance.
        """
        if not isinstance(duration, timedelta):
            raise TypeError(f"duration must be a datetime.timedelta, got {type(duration).__name__}")
        if duration < timedelta(0):
            raise ValueError(f"duration must not be negative, got {duration}")
        if type(message) is not Message:
            raise TypeError(f"send_after() takes a Message (use message_builder), got {type(message).__name__}")
        if not isinstance(cancellation_token, str):
            raise TypeError("cancellation_token must be a str")
        rec = (
            message.target_typename,
            message.target_id,
            self.address[0],
            self.address[1],
            message._vt,
            message._v,
            0,
            0,
        )
        self._check_size(rec, "delayed message")
        if self._delayed is None:
            self._delayed = []
        self._delayed.append(("after", duration, rec, cancellation_token))

    def cancel_delayed_message(self, cancellation_token: str) -> None:
        """Cancel every pending delayed message this instance sent with ``cancellation_token``.

        A message that has already fired is not affected.
        """
        if not isinstance(cancellation_token, str) or not cancellation_token:
            raise ValueError("cancellation_token must be a non-empty str")
        if self._delayed is None:
            self._delayed = []
        self._delayed.append(("cancel", cancellation_token))

    def send_egress(self, message: EgressMessage) -> None:
        """Emit a record to the egress named by ``message.typename``."""
        if type(message) is not EgressMessage:
            raise TypeError(
                f"send_egress() takes an EgressMessage (use egress_message_builder), got {type(message).__name__}"
            )
        self._check_size((message.typename, "", "", "", message._vt, message._v, 0, 0), "egress record")
        if self._egress is None:
            self._egress = []
        self._egress.append((message.typename, message._vt, message._v))

    def reply(self, value: Any = _NO_VALUE, value_type: Type | None = None, **kwargs: Any) -> None:
        """Answer the client request this message belongs to.

        Takes the value like :func:`message_builder` does: ``int_value=``, ``str_value=``,
        … or ``value`` with ``value_type``, positionally (``reply(5, IntType)``) or by
        keyword. A message sent while handling a request
        carries that request along, so any function down the chain may answer; the
        first answer wins and later ones are ignored. Outside a request (see
        :attr:`in_request`) the reply is dropped.
        """
        if value is not _NO_VALUE:
            kwargs["value"] = value
        if value_type is not None:
            kwargs["value_type"] = value_type
        encoded = typed_value_from_kwargs(kwargs, what="reply")
        own = self._rec
        if own[7]:
            a = self.address
            rec = (a[0], a[1], "", "", encoded[0], encoded[1], own[6], own[7])
            self._check_size(rec, "reply")
        if self._reply is None:
            self._reply = encoded


#: the twin's classes: the specification of the Cython core's extension types, which take
#: their place when that core is in use (one ``Context`` class per process); the cold
#: methods of those (``send_after``, ``reply``, ...) run these classes' code on their fields
PyCell, PyStorage, PyContext = Cell, Storage, Context
if not TYPE_CHECKING and _speedups.IMPLEMENTATION == "c":
    from . import _speedups_c

    _speedups_c.bind_context(DELETED, Address, Context, Storage)
    Cell, Storage, Context = _speedups_c.Cell, _speedups_c.Storage, _speedups_c.Context
    _property = _speedups_c.StateProperty
