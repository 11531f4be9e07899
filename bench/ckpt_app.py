"""The functions the checkpoint benchmark runs (``bench.ckpt_app:functions``).

``ckpt/fill``
    The state under test. Each instance ``f0000000``, ``f0000001``, … holds ``SPECS``
    string values (``v0`` … ``v9``) of ``VALUE_BYTES`` characters each, so an instance
    is ``SPECS`` keys in the peer's LMDB store and one message writes all of them. The
    int it gets is a *round*: a round ``r >= 0`` rewrites every value with text that
    contains the round (so every round changes every key it touches); ``-1`` writes
    nothing. Inside a request it replies with ``v0``, so a reply shows which round
    the state holds.
``ckpt/loader``
    Load generation inside the mesh (as ``perf/driver`` in ``perf_app``): a trigger
    ``{"start": s, "end": e, "chunk": c, "round": r}`` sends round ``r`` to the fill
    instances ``s .. e-1``, ``c`` at a time; it sends itself the rest, so one
    invocation never produces more than ``c`` messages and batches stay bounded.
"""

from __future__ import annotations

from typing import Any, Final

from statefun_mesh import IntType, Message, StatefulFunctions, StringType, ValueSpec, make_json_type, message_builder

FILL: Final = "ckpt/fill"
LOADER: Final = "ckpt/loader"
#: string values per fill instance (LMDB keys per instance)
SPECS: Final = 10
#: characters per value (the stored value is this plus the string wrapper and a header)
VALUE_BYTES: Final = 100

TRIGGER = make_json_type("ckpt/trigger")

functions = StatefulFunctions()

_INT: Final = IntType.typename
_SER = IntType.serializer()
_NAMES: Final = tuple(f"v{i}" for i in range(SPECS))


def fill_id(i: int) -> str:
    """The id of fill instance ``i``."""
    return f"f{i:07d}"


def value_for(id: str, round: int) -> str:
    """What round ``round`` writes into every value of instance ``id``."""
    head = f"{id}:{round}:"
    return head + "x" * (VALUE_BYTES - len(head))


def trigger(id: str, **doc: Any) -> Message:
    """A trigger message for ``ckpt/loader``."""
    return message_builder(target_typename=LOADER, target_id=id, value=doc, value_type=TRIGGER)


def probe(id: str) -> Message:
    """A message to fill instance ``id`` that changes nothing (send it as a request to read ``v0``)."""
    return message_builder(target_typename=FILL, target_id=id, int_value=-1)


@functions.bind(typename=FILL, specs=[ValueSpec(name=n, type=StringType) for n in _NAMES])
def fill(context: Any, message: Any) -> None:
    """Writes round ``r`` into every value (``r >= 0``); replies with ``v0`` inside a request."""
    r = message.as_int()
    storage = context.storage
    if r >= 0:
        value = value_for(context.address.id, r)
        for name in _NAMES:
            setattr(storage, name, value)
    if context.in_request:
        context.reply(str_value=storage.v0 or "")


@functions.bind(typename=LOADER)
def loader(context: Any, message: Any) -> None:
    """Sends the next chunk of rounds to fill instances, then the rest of the job to itself."""
    job = message.as_type(TRIGGER)
    start, end, chunk = job["start"], job["end"], job["chunk"]
    value = _SER.serialize(job["round"])
    stop = min(start + chunk, end)
    send = context.send
    for i in range(start, stop):
        send(Message(FILL, fill_id(i), _INT, value))
    if stop < end:
        job["start"] = stop
        send(Message(LOADER, context.address.id, TRIGGER.typename, TRIGGER.serializer().serialize(job)))
