"""The functions the mesh benchmarks run (``bench.perf_app:functions``).

``perf/counter``
    The keyed counter under test: one ``IntType`` state, adds the int it gets, and
    replies with the new count when the message is part of a request. It is the
    README's counter minus its second send: one state read, one write, nothing else.
``perf/driver``
    Load generation inside the mesh, so that no client is what gets measured. A
    trigger ``{"start": s, "end": e, "chunk": c, "keys": k}`` makes it send one
    increment to ``perf/counter`` ``k{i % k:05d}`` for each ``i`` in ``[s, e)``,
    ``c`` at a time: it sends the first chunk, then sends itself the rest, so one
    invocation never produces more than ``c`` messages and every batch stays
    bounded. The increments are prebuilt :class:`~statefun_mesh.Message` objects, so
    generating one costs a ``context.send`` and nothing more.
``perf/chain-start`` and ``perf/hop``
    Function-to-function chains. A trigger ``{"first": f, "chains": p, "length": l}``
    to ``perf/chain-start`` starts chains ``f .. f+p-1``; a chain is ``l`` messages
    ``perf/hop`` → ``perf/hop`` → …, each to another instance (hop ``h`` of chain
    ``c`` is instance ``str(c * 64 + h)``, so consecutive hops land on whichever
    peers own those ids). ``perf/hop`` is stateless and builds its next message with
    ``message_builder``, as user code does; the last hop of a chain replies when the
    chain was started by a request.

Ids that a given peer owns are what :func:`ids_owned_by` returns; the benchmark uses
them to put one driver (and one chain starter) on every peer.
"""

from __future__ import annotations

from typing import Any, Final

from statefun_mesh import IntType, Message, StatefulFunctions, ValueSpec, make_json_type, message_builder
from statefun_mesh._speedups import key_group

COUNTER: Final = "perf/counter"
DRIVER: Final = "perf/driver"
CHAIN_START: Final = "perf/chain-start"
HOP: Final = "perf/hop"
#: hop numbers live in the low 6 bits of a hop's value: chains are at most 64 long
MAX_CHAIN: Final = 64

#: value type of triggers (small JSON documents)
TRIGGER = make_json_type("perf/trigger")

functions = StatefulFunctions()

_INT_TYPENAME: Final = IntType.typename
_ONE: Final = IntType.serializer().serialize(1)
_increments: dict[int, list[Message]] = {}


def counter_id(i: int) -> str:
    """The id of counter instance ``i``."""
    return f"k{i:05d}"


def _increments_for(keys: int) -> list[Message]:
    msgs = _increments.get(keys)
    if msgs is None:
        msgs = _increments[keys] = [Message(COUNTER, counter_id(i), _INT_TYPENAME, _ONE) for i in range(keys)]
    return msgs


def trigger(typename: str, id: str, **doc: Any) -> Message:
    """A trigger message for ``perf/driver`` or ``perf/chain-start``."""
    return message_builder(target_typename=typename, target_id=id, value=doc, value_type=TRIGGER)


def ids_owned_by(peer: int, peers: int, max_parallelism: int, prefix: str, count: int = 1) -> list[str]:
    """``count`` ids ``prefix0``, ``prefix1``, … whose instances peer ``peer`` owns."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        cand = f"{prefix}{i}"
        if key_group(cand, max_parallelism) * peers // max_parallelism == peer:
            out.append(cand)
        i += 1
    return out


def owner(id: str, peers: int, max_parallelism: int) -> int:
    """The peer that owns the instances with id ``id``."""
    return key_group(id, max_parallelism) * peers // max_parallelism


@functions.bind(typename=COUNTER, specs=[ValueSpec(name="count", type=IntType)])
def counter(context: Any, message: Any) -> None:
    """Adds the int it gets to its count; replies with the new count inside a request."""
    count = (context.storage.count or 0) + message.as_int()
    context.storage.count = count
    if context.in_request:
        context.reply(int_value=count)


@functions.bind(typename=DRIVER)
def driver(context: Any, message: Any) -> None:
    """Sends the next chunk of increments, then the rest of the job to itself."""
    job = message.as_type(TRIGGER)
    start, end, chunk = job["start"], job["end"], job["chunk"]
    msgs = _increments_for(job["keys"])
    keys = len(msgs)
    stop = min(start + chunk, end)
    send = context.send
    for i in range(start, stop):
        send(msgs[i % keys])
    if stop < end:
        job["start"] = stop
        send(Message(DRIVER, context.address.id, TRIGGER.typename, TRIGGER.serializer().serialize(job)))


@functions.bind(typename=CHAIN_START)
def chain_start(context: Any, message: Any) -> None:
    """Starts ``chains`` chains of ``length`` hops."""
    job = message.as_type(TRIGGER)
    length = job["length"]
    if not 1 <= length <= MAX_CHAIN:
        raise ValueError(f"length must be in 1..{MAX_CHAIN}, got {length}")
    for c in range(job["first"], job["first"] + job["chains"]):
        v = c * MAX_CHAIN + (MAX_CHAIN - length)  # the hop number counts up to MAX_CHAIN - 1
        context.send(message_builder(target_typename=HOP, target_id=str(v), int_value=v))


@functions.bind(typename=HOP)
def hop(context: Any, message: Any) -> None:
    """Passes the chain on to the next hop's instance; the last hop replies (inside a request)."""
    v = message.as_int()
    if v % MAX_CHAIN == MAX_CHAIN - 1:
        if context.in_request:
            context.reply(int_value=v)
        return
    context.send(message_builder(target_typename=HOP, target_id=str(v + 1), int_value=v + 1))
