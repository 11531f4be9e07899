"""Functions of the Kafka egress tests: ``functions`` = [crash_app's functions, ``kt/counter``].

``kt/counter`` counts its messages like ``cr/counter`` (JSON ``{"inc": "<id>"}``; a
``{"query": true}`` request is answered with ``{"count": n}``) and writes one Kafka egress
record per increment: egress ``kt/out``, topic ``kt-out``, key = the instance id, value =
``"<id>|<inc>"``.
"""

from __future__ import annotations

from typing import Final

from statefun_mesh import IntType, StatefulFunctions, ValueSpec, kafka_egress_message
from tests.integration import crash_app
from tests.integration.crash_app import JSON, as_json

__all__ = ["EGRESS", "KT_COUNTER", "OUT_TOPIC", "functions"]

KT_COUNTER: Final = "kt/counter"
EGRESS: Final = "kt/out"
OUT_TOPIC: Final = "kt-out"

own = StatefulFunctions()


@own.bind(typename=KT_COUNTER, specs=[ValueSpec(name="count", type=IntType)])
def kt_counter(context, message):  # type: ignore[no-untyped-def]
    doc = as_json(message)
    count = context.storage.count or 0
    if not doc.get("query"):
        count += 1
        context.storage.count = count
        context.send_egress(
            kafka_egress_message(
                typename=EGRESS, topic=OUT_TOPIC, key=context.address.id, value=f"{context.address.id}|{doc['inc']}"
            )
        )
    if context.in_request:
        context.reply(value={"count": count}, value_type=JSON)


#: crash_app's functions (left unchanged: other tests use them) and kt/counter
functions = [crash_app.functions, own]
