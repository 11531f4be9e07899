"""Functions the integration tests run on real clusters (``tests.integration.app:functions``).

Every function takes JSON (``it/...`` JSON types) or ints, and answers a query when a
message carries ``{"query": true}``, so tests can read state through ``request``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Final

from statefun_mesh import (
    IntType,
    StatefulFunctions,
    StringType,
    ValueSpec,
    egress_message_builder,
    make_json_type,
    message_builder,
)

COUNTER: Final = "it/counter"
PING: Final = "it/ping"
PONG: Final = "it/pong"
FANOUT: Final = "it/fanout"
FANOUT_TARGET: Final = "it/fanout-target"
SEQ_SENDER: Final = "it/seq-sender"
SEQ: Final = "it/seq"
EMIT: Final = "it/emit"
SLOW: Final = "it/slow"
PINGPONG_EGRESS: Final = "it/pingpong-done"
TALLY: Final = "it/tally"
TREE: Final = "it/tree"

#: the value type of every JSON message of this module
JSON = make_json_type("it/json")
_SEQ_STATE = make_json_type("it/seq-state")
_TALLY_STATE = make_json_type("it/tally-state")
#: per-message delay of ``it/slow`` (milliseconds), read when the peer imports this module
SLOW_MS: Final = float(os.environ.get("STATEFUN_MESH_IT_SLOW_MS", "2"))

functions = StatefulFunctions()


def as_json(message: Any) -> Any:
    """The JSON document a message carries (whatever its JSON type name)."""
    return json.loads(message.raw_value().decode("utf-8"))


def json_message(typename: str, id: str, doc: Any) -> Any:
    """A message to ``typename/id`` carrying the JSON document ``doc``."""
    return message_builder(target_typename=typename, target_id=id, value=doc, value_type=JSON)


@functions.bind(typename=COUNTER, specs=[ValueSpec(name="count", type=IntType)])
def counter(context, message):
    """Adds the int it gets; replies with the new count to a client's request.

    Only to a client's own message (no caller): a message another function sends while
    handling a request carries that request along, and that function's answer and ours
    would race ("the first answer wins" is the first to reach the requester's peer).
    """
    count = (context.storage.count or 0) + message.as_int()
    context.storage.count = count
    if context.in_request and context.caller is None:
        context.reply(int_value=count)


def _bounce(other: str):
    def bounce(context, message):
        """Ping-pong: ``{"left": n, "hops": h, "partner": id, "chain": name}`` bounces n times."""
        doc = as_json(message)
        count = context.storage.count or 0
        if doc.get("query"):
            context.reply(value={"count": count}, value_type=JSON)
            return
        context.storage.count = count + 1
        hops = doc["hops"] + 1
        if doc["left"] <= 1:
            result = {"chain": doc["chain"], "hops": hops, "last": f"{context.address.typename}/{context.address.id}"}
            context.reply(value=result, value_type=JSON)
            context.send_egress(egress_message_builder(PINGPONG_EGRESS, json.dumps(result), StringType))
            return
        nxt = dict(doc, left=doc["left"] - 1, hops=hops, partner=context.address.id)
        context.send(json_message(other, doc["partner"], nxt))

    return bounce


functions.bind(typename=PING, specs=[ValueSpec(name="count", type=IntType)])(_bounce(PONG))
functions.bind(typename=PONG, specs=[ValueSpec(name="count", type=IntType)])(_bounce(PING))


@functions.bind(typename=FANOUT)
def fanout(context, message):
    """``{"k": K, "prefix": p}``: one message to each of ``it/fanout-target/p-0`` … ``p-(K-1)``."""
    doc = as_json(message)
    for i in range(doc["k"]):
        context.send(message_builder(target_typename=FANOUT_TARGET, target_id=f"{doc['prefix']}-{i}", int_value=1))


@functions.bind(typename=FANOUT_TARGET, specs=[ValueSpec(name="count", type=IntType)])
def fanout_target(context, message):
    """Counts; tells ``it/counter/tally:<prefix>`` about a first message, ``dups:<prefix>`` about others."""
    count = (context.storage.count or 0) + 1
    context.storage.count = count
    prefix = context.address.id.rsplit("-", 1)[0]
    tally = f"tally:{prefix}" if count == 1 else f"dups:{prefix}"
    context.send(message_builder(target_typename=COUNTER, target_id=tally, int_value=1))
    if context.in_request:
        context.reply(int_value=count)


@functions.bind(typename=SEQ_SENDER, specs=[ValueSpec(name="next", type=IntType)])
def seq_sender(context, message):
    """``{"left": n, "targets": [ids]}``: sends its next sequence number to every target,
    then to itself with ``left - 1``, so its sends spread over many batches and frames."""
    doc = as_json(message)
    seq = (context.storage.next or 0) + 1
    context.storage.next = seq
    for target in doc["targets"]:
        context.send(json_message(SEQ, target, {"seq": seq}))
    if doc["left"] > 1:
        context.send(json_message(SEQ_SENDER, context.address.id, dict(doc, left=doc["left"] - 1)))


@functions.bind(typename=SEQ, specs=[ValueSpec(name="state", type=_SEQ_STATE)])
def sequence(context, message):
    """Records, per caller, the last sequence number seen; flags any that is not last + 1."""
    doc = as_json(message)
    state = context.storage.state or {"last": {}, "bad": [], "received": 0}
    if doc.get("query"):
        context.reply(value=state, value_type=JSON)
        return
    caller = context.caller
    key = f"{caller.typename}/{caller.id}" if caller is not None else "<client>"
    expected = state["last"].get(key, 0) + 1
    if doc["seq"] != expected and len(state["bad"]) < 100:
        state["bad"].append([key, expected, doc["seq"]])
    state["last"][key] = doc["seq"]
    state["received"] += 1
    context.storage.state = state


@functions.bind(typename=EMIT)
def emit(context, message):
    """``{"egress": name, "n": n, "tag": t}``: n string records ``"t:<id>:i"`` to egress ``name``."""
    doc = as_json(message)
    for i in range(doc["n"]):
        value = f"{doc['tag']}:{context.address.id}:{i}"
        context.send_egress(egress_message_builder(doc["egress"], value, StringType))
    if context.in_request:
        context.reply(int_value=doc["n"])


@functions.bind(typename=SLOW, specs=[ValueSpec(name="count", type=IntType)])
def slow(context, message):
    """Takes ``SLOW_MS`` of CPU-free time per message (blocking the peer), and counts."""
    if message.is_string():
        time.sleep(SLOW_MS / 1000)
        context.storage.count = (context.storage.count or 0) + 1
    if context.in_request:
        context.reply(int_value=context.storage.count or 0)


@functions.bind(typename=TALLY, specs=[ValueSpec(name="state", type=_TALLY_STATE)])
def tally(context, message):
    """Counts the messages it gets, each carrying a number (as a string, an int or ``{"n": n}``):
    ``{"count": messages, "sum": of the numbers, "out_of_order": times a number was not above
    the one before}``. A ``{"query": true}`` JSON message is answered with that state instead."""
    state = context.storage.state or {"count": 0, "sum": 0, "last": None, "out_of_order": 0}
    if message.is_string():
        n = int(message.as_string())
    elif message.is_int():
        n = message.as_int()
    else:
        doc = as_json(message)
        if doc.get("query"):
            context.reply(value=state, value_type=JSON)
            return
        n = int(doc["n"])
    if state["last"] is not None and n <= state["last"]:
        state["out_of_order"] += 1
    state["count"] += 1
    state["sum"] += n
    state["last"] = n
    context.storage.state = state


@functions.bind(typename=TREE)
def tree(context, message):
    """``{"depth": d, "k": k, "root": r, "pad": s}``: at depth 0, +1 to ``it/counter/tree:<r>``;
    else one message (padded with ``s``) to each of ``k`` children ``<id>.<i>`` at depth ``d - 1``.
    Children land on every peer, so messages cross between peers both ways (a cycle with fan-out)."""
    doc = as_json(message)
    if doc["depth"] == 0:
        context.send(message_builder(target_typename=COUNTER, target_id=f"tree:{doc['root']}", int_value=1))
        return
    child = dict(doc, depth=doc["depth"] - 1)
    for i in range(doc["k"]):
        context.send(json_message(TREE, f"{context.address.id}.{i}", child))
