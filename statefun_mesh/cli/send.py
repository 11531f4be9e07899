"""The ``send`` and ``request`` commands: send one message (and wait for its reply)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ..errors import ConfigError
from .common import _add_client_args, _with_client, decode_for_display


def _message_from_args(args: argparse.Namespace) -> Any:
    from .. import valuetypes as vt
    from ..messages import message_builder

    given = [k for k in ("int", "long", "float", "double", "bool", "str", "json") if getattr(args, k) is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one value: --int, --long, --float, --double, --bool, --str or --json")
    kind = given[0]
    raw = getattr(args, kind)
    try:
        if kind == "json":
            typename = args.value_type or "statefun-mesh.types/json"
            return message_builder(
                args.typename, args.id, value=json.loads(raw), value_type=vt.make_json_type(typename)
            )
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--bool takes true or false, got {raw!r}")
            return message_builder(args.typename, args.id, bool_value=raw.lower() in ("true", "1"))
        conv = {"int": int, "long": int, "float": float, "double": float, "str": str}[kind]
        key = {"str": "str_value"}.get(kind, f"{kind}_value")
        return message_builder(args.typename, args.id, **{key: conv(raw)})
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--json is not valid JSON: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad message: {exc}") from exc


def cmd_send(args: argparse.Namespace) -> int:
    """Send one message."""
    message = _message_from_args(args)

    async def go(client: Any) -> int:
        await client.send(message, idempotency_key=args.idempotency_key)
        print(f"sent to {args.typename}/{args.id}", file=sys.stderr)
        return 0

    return asyncio.run(_with_client(args, go))


def cmd_request(args: argparse.Namespace) -> int:
    """Send one message and print the function's reply."""
    message = _message_from_args(args)

    async def go(client: Any) -> int:
        reply = await client.request(message, timeout=args.timeout)
        print(
            json.dumps(
                {
                    "from": f"{reply.target_typename}/{reply.target_id}",
                    "type": reply.value_typename(),
                    "value": decode_for_display(reply.value_typename(), reply.raw_value()),
                },
                ensure_ascii=False,
            )
        )
        return 0

    return asyncio.run(_with_client(args, go))


def _add_value_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("typename", help="target function type, e.g. example/person")
    p.add_argument("id", help="target instance id")
    g = p.add_argument_group("value (exactly one)")
    g.add_argument("--int", metavar="N", help="a 32-bit int (io.statefun.types/int)")
    g.add_argument("--long", metavar="N", help="a 64-bit int (io.statefun.types/long)")
    g.add_argument("--float", metavar="X", help="a float (io.statefun.types/float)")
    g.add_argument("--double", metavar="X", help="a double (io.statefun.types/double)")
    g.add_argument("--bool", metavar="true|false", help="a bool (io.statefun.types/bool)")
    g.add_argument("--str", metavar="TEXT", help="a string (io.statefun.types/string)")
    g.add_argument("--json", metavar="JSON", help="a JSON document, typed by --value-type")
    g.add_argument("--value-type", metavar="NS/NAME", help="type name of a --json value (as in make_json_type)")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's command(s) to the ``statefun-mesh`` parser."""
    p = sub.add_parser("send", help="send one message", description="Send one message into the mesh.")
    _add_value_args(p)
    p.add_argument(
        "--idempotency-key", metavar="KEY", help="resending with the same key does not apply the message twice"
    )
    _add_client_args(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "request",
        help="send a message and print the reply",
        description="Send a message and print the function's context.reply as JSON.",
    )
    _add_value_args(p)
    _add_client_args(p)
    p.set_defaults(func=cmd_request)
