"""A remote function of the Kafka tests, served in-process through ``python:`` (module.yaml's
``urlPathTemplate: python:tests.integration.kafka_remote:handler``): the request-reply
protocol of a StateFun remote function, without HTTP.

``kr/counter`` counts its messages (JSON ``{"inc": "<id>"}``) and writes one Kafka egress
record per message: egress ``kt/out``, topic ``kt-out``, value ``"r:<id>|<inc>|<count>"``, so
the egress topic shows both that each message was applied once and the count it made.
"""

from __future__ import annotations

import json
from typing import Any

from statefun_mesh import IntType, RequestReplyHandler, StatefulFunctions, ValueSpec, kafka_egress_message

functions = StatefulFunctions()


@functions.bind(typename="kr/counter", specs=[ValueSpec(name="count", type=IntType)])
def counter(context: Any, message: Any) -> None:
    doc = json.loads(message.raw_value().decode("utf-8"))
    count = (context.storage.count or 0) + 1
    context.storage.count = count
    me = context.address.id
    context.send_egress(
        kafka_egress_message(typename="kt/out", topic="kt-out", key=me, value=f"r:{me}|{doc['inc']}|{count}")
    )


handler = RequestReplyHandler(functions)
