"""A StateFun program written with the official SDK, served by aiohttp: the remote end of
tests/integration/test_remote_crash.py. Run as ``python remote_app.py PORT``.

Nothing here imports statefun_mesh: this is the program a StateFun user already has.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

from aiohttp import web
from statefun import (  # type: ignore[import-not-found,unused-ignore]
    Context,
    IntType,
    Message,
    RequestReplyHandler,
    StatefulFunctions,
    StringType,
    ValueSpec,
    egress_message_builder,
    message_builder,
)

functions = StatefulFunctions()


@functions.bind(typename="remote.example/counter", specs=[ValueSpec(name="count", type=IntType)])
async def counter(context: Context, message: Message) -> None:
    me = context.address.id
    if message.is_string():  # a delayed message fired
        record = json.dumps({"id": me, "n": int(message.as_string())})
        context.send_egress(egress_message_builder(target_typename="e/ticks", value=record, value_type=StringType))
        return
    count = (context.storage.count or 0) + message.as_int()
    context.storage.count = count
    record = json.dumps({"id": me, "count": count})
    context.send_egress(egress_message_builder(target_typename="e/counts", value=record, value_type=StringType))
    tick = message_builder(target_typename="remote.example/counter", target_id=me, str_value=str(count))
    context.send_after(timedelta(milliseconds=100), tick, cancellation_token=f"t{count}")
    if count % 2 == 0:
        context.cancel_delayed_message(f"t{count}")


handler = RequestReplyHandler(functions)


async def handle(request: web.Request) -> web.Response:
    body = await handler.handle_async(await request.read())
    return web.Response(body=body, content_type="application/octet-stream")


if __name__ == "__main__":
    app = web.Application()
    app.add_routes([web.post("/{name}", handle)])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=lambda *a: print(*a, flush=True))
