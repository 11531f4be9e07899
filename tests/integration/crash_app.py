"""Functions of the crash-recovery tests (``tests.integration.crash_app:functions``).

Every message is JSON (type ``cr/json``); a message ``{"query": true}`` sent as a
request is answered with the instance's state, so tests read state through
``MeshClient.request``. A query never changes state.

- ``cr/counter``: ``{"inc": "<increment id>"}`` adds 1 and emits one egress record
  ``cr/increments`` = ``"<key>|<increment id>"`` (the exactly-once check of egress).
- ``cr/ping`` / ``cr/pong``: ``{"chain": c, "left": n, "hops": h, "partner": id}``
  bounce between two instances until ``left`` runs out, then tell ``cr/done/<c>``.
- ``cr/done``: counts the chains that finished (``done``) and keeps the last hop count.
- ``cr/timer-setter``: ``{"set": [[target, delay_ms, token], ...]}`` schedules one
  delayed message per entry to ``cr/timer-target/<target>``; ``{"cancel": [token, ...]}``
  cancels them.
- ``cr/timer-target``: counts how often a delayed message arrived (``fired``).
- ``cr/slow-counter`` (``async``): ``{"inc": id, "seq": n, "sleep_ms": ms}`` awaits ``ms``,
  then adds 1, appends ``seq`` to its ``order`` and emits ``"<key>|<inc>"`` to
  ``cr/increments``, like ``cr/counter`` (a long await parks the invocation).
- ``cr/blocker`` (sync): ``{"block_ms": ms}`` blocks the peer's event loop for ``ms``
  (``time.sleep``), then adds 1 to ``count``.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
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

COUNTER: Final = "cr/counter"
PING: Final = "cr/ping"
PONG: Final = "cr/pong"
DONE: Final = "cr/done"
TIMER_SETTER: Final = "cr/timer-setter"
TIMER_TARGET: Final = "cr/timer-target"
INCREMENTS: Final = "cr/increments"
SLOW_COUNTER: Final = "cr/slow-counter"
BLOCKER: Final = "cr/blocker"

JSON = make_json_type("cr/json")
_DONE_STATE = make_json_type("cr/done-state")

functions = StatefulFunctions()


def as_json(message: Any) -> Any:
    return json.loads(message.raw_value().decode("utf-8"))


def json_message(typename: str, id: str, doc: Any) -> Any:
    return message_builder(target_typename=typename, target_id=id, value=doc, value_type=JSON)


def query(typename: str, id: str) -> Any:
    return json_message(typename, id, {"query": True})


@functions.bind(typename=COUNTER, specs=[ValueSpec(name="count", type=IntType)])
def counter(context, message):
    doc = as_json(message)
    count = context.storage.count or 0
    if not doc.get("query"):
        count += 1
        context.storage.count = count
        record = f"{context.address.id}|{doc['inc']}"
        context.send_egress(egress_message_builder(INCREMENTS, record, StringType))
    if context.in_request:
        context.reply(value={"count": count}, value_type=JSON)


def _bounce(other: str):
    def bounce(context, message):
        doc = as_json(message)
        visits = context.storage.visits or 0
        if doc.get("query"):
            context.reply(value={"visits": visits}, value_type=JSON)
            return
        context.storage.visits = visits + 1
        hops = doc["hops"] + 1
        if doc["left"] <= 1:
            context.send(json_message(DONE, doc["chain"], {"hops": hops}))
            return
        nxt = dict(doc, left=doc["left"] - 1, hops=hops, partner=context.address.id)
        context.send(json_message(other, doc["partner"], nxt))

    return bounce


functions.bind(typename=PING, specs=[ValueSpec(name="visits", type=IntType)])(_bounce(PONG))
functions.bind(typename=PONG, specs=[ValueSpec(name="visits", type=IntType)])(_bounce(PING))


@functions.bind(typename=DONE, specs=[ValueSpec(name="state", type=_DONE_STATE)])
def done(context, message):
    doc = as_json(message)
    state = context.storage.state or {"done": 0, "hops": []}
    if doc.get("query"):
        context.reply(value=state, value_type=JSON)
        return
    state["done"] += 1
    state["hops"].append(doc["hops"])
    context.storage.state = state


@functions.bind(typename=TIMER_SETTER, specs=[ValueSpec(name="set", type=IntType)])
def timer_setter(context, message):
    doc = as_json(message)
    if doc.get("query"):
        context.reply(value={"set": context.storage.set or 0}, value_type=JSON)
        return
    for target, delay_ms, token in doc.get("set", []):
        msg = json_message(TIMER_TARGET, target, {"from": context.address.id})
        context.send_after(timedelta(milliseconds=delay_ms), msg, cancellation_token=token)
        context.storage.set = (context.storage.set or 0) + 1
    for token in doc.get("cancel", []):
        context.cancel_delayed_message(token)


@functions.bind(typename=TIMER_TARGET, specs=[ValueSpec(name="fired", type=IntType)])
def timer_target(context, message):
    doc = as_json(message)
    fired = context.storage.fired or 0
    if not doc.get("query"):
        fired += 1
        context.storage.fired = fired
    if context.in_request:
        context.reply(value={"fired": fired}, value_type=JSON)


_ORDER = make_json_type("cr/order")


@functions.bind(
    typename=SLOW_COUNTER, specs=[ValueSpec(name="count", type=IntType), ValueSpec(name="order", type=_ORDER)]
)
async def slow_counter(context, message):
    doc = as_json(message)
    if doc.get("query"):
        context.reply(
            value={"count": context.storage.count or 0, "order": context.storage.order or []}, value_type=JSON
        )
        return
    await asyncio.sleep(doc.get("sleep_ms", 0) / 1000)
    context.storage.count = (context.storage.count or 0) + 1
    context.storage.order = (context.storage.order or []) + [doc["seq"]]
    context.send_egress(egress_message_builder(INCREMENTS, f"{context.address.id}|{doc['inc']}", StringType))


@functions.bind(typename=BLOCKER, specs=[ValueSpec(name="count", type=IntType)])
def blocker(context, message):
    doc = as_json(message)
    if not doc.get("query"):
        time.sleep(doc.get("block_ms", 0) / 1000)
        context.storage.count = (context.storage.count or 0) + 1
    if context.in_request:
        context.reply(value={"count": context.storage.count or 0}, value_type=JSON)
