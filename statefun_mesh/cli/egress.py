"""The ``egress`` command: read a peer's egress records."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ..logutil import format_seconds
from .common import DEFAULT_IDLE, _add_client_args, _count, _non_negative_seconds, _with_client, decode_for_display


def cmd_egress(args: argparse.Namespace) -> int:
    """Print an egress's records as JSON lines."""

    async def go(client: Any) -> int:
        count = 0
        idle = None if args.follow else args.idle
        interval = None
        if not args.follow:
            # Records are released when the checkpoint after them completes, so a record sent
            # just now may be one checkpoint interval away even when older ones came at once:
            # by default wait that long for each further record.
            info = await client.info()
            if args.typename not in info.get("egress_immediate", ()):
                interval = info.get("checkpoint_interval")
            if idle is None:
                idle = DEFAULT_IDLE if interval is None else interval + DEFAULT_IDLE
        async for rec in client.egress(args.typename, start=args.start, stop_when_idle=idle):
            doc = {
                "peer": rec.peer,
                "offset": rec.offset,
                "type": rec.value_typename(),
                "value": decode_for_display(rec.value_typename(), rec.raw_value()),
            }
            if rec.id is not None:
                doc["id"] = rec.id
            print(json.dumps(doc, ensure_ascii=False), flush=True)
            count += 1
            if args.limit and count >= args.limit:
                break
        if count == 0 and not args.follow:
            hint = (
                f"; records appear when the checkpoint after them completes (every {format_seconds(interval)} s)"
                if interval
                else ""
            )
            print(
                f"statefun-mesh egress: no records in {args.typename} within {format_seconds(idle or 0)} s{hint}",
                file=sys.stderr,
            )
        return 0

    return asyncio.run(_with_client(args, go))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's command(s) to the ``statefun-mesh`` parser."""
    p = sub.add_parser(
        "egress",
        help="print an egress's records as JSON lines",
        description="Print the records of an egress, from every peer, as JSON lines.",
    )
    p.add_argument("typename", help="egress name, e.g. example/greetings")
    p.add_argument(
        "--from",
        dest="start",
        choices=["earliest", "latest"],
        default="earliest",
        help="start at the oldest retained record or at new ones (default: earliest)",
    )
    p.add_argument("--follow", action="store_true", help="keep waiting for new records")
    p.add_argument(
        "--idle",
        type=_non_negative_seconds,
        metavar="SECONDS",
        help="without --follow, stop after this many quiet seconds (default: 2 more than the mesh's "
        "checkpoint interval, since records appear when a checkpoint completes; 2 without checkpoints)",
    )
    p.add_argument("--limit", type=_count, default=0, help="stop after this many records (default: 0, no limit)")
    _add_client_args(p)
    p.set_defaults(func=cmd_egress)
