"""A money-conserving transfer workload for the many-hosts tests (``tests.integration.netns_app:functions``).

``hx/account``: ``{"xfer": tid, "to": other, "amount": a}`` takes ``a`` off this account
and sends ``{"credit": tid, "amount": a}`` to account ``other``, which adds it. Both
count what they applied. Every account starts at 0, so the balances of all accounts
always add up to 0 once no credit is in flight, and each balance equals the sum of the
accepted transfers' effects on it: a transfer applied twice or lost shows up in both.
``{"query": true}`` as a request answers ``{"balance": b, "debits": n, "credits": m}``.
"""

from __future__ import annotations

import json
from typing import Any

from statefun_mesh import IntType, StatefulFunctions, ValueSpec, make_json_type, message_builder

ACCOUNT = "hx/account"
JSON = make_json_type("cr/json")  # the same type crash_app uses, so one client helper serves both

functions = StatefulFunctions()


def json_message(typename: str, id: str, doc: Any) -> Any:
    return message_builder(target_typename=typename, target_id=id, value=doc, value_type=JSON)


@functions.bind(
    typename=ACCOUNT,
    specs=[
        ValueSpec(name="balance", type=IntType),
        ValueSpec(name="debits", type=IntType),
        ValueSpec(name="credits", type=IntType),
    ],
)
def account(context, message):
    doc = json.loads(message.raw_value().decode("utf-8"))
    s = context.storage
    if "xfer" in doc:
        s.balance = (s.balance or 0) - doc["amount"]
        s.debits = (s.debits or 0) + 1
        context.send(json_message(ACCOUNT, doc["to"], {"credit": doc["xfer"], "amount": doc["amount"]}))
    elif "credit" in doc:
        s.balance = (s.balance or 0) + doc["amount"]
        s.credits = (s.credits or 0) + 1
    if context.in_request:
        context.reply(
            value={"balance": s.balance or 0, "debits": s.debits or 0, "credits": s.credits or 0}, value_type=JSON
        )
