"""The ``status`` command: a running mesh's counters, as a table or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Final

from ..errors import StatefunMeshError
from ..logutil import format_seconds
from .common import _add_client_args, _count, _positive_seconds, _with_client


def cmd_status(args: argparse.Namespace) -> int:
    """Print every peer's status: a table, or JSON with --json; --watch refreshes it."""
    from ..client import MeshClient

    async def sample(client: Any) -> dict[str, Any]:
        info = await client.info()

        async def one(i: int, ep: str) -> dict[str, Any]:
            if not ep:
                return {"peer": i, "status": "no client endpoint"}
            try:
                async with MeshClient(ep, timeout=args.timeout, keys=client.keys) as c:
                    return (await c.info())["status"]  # type: ignore[no-any-return]
            except StatefunMeshError as exc:
                return {"peer": i, "status": f"unreachable: {exc}"}

        endpoints = info["client_endpoints"] or [args.endpoint]
        out = await asyncio.gather(*(one(i, ep) for i, ep in enumerate(endpoints)))
        return {
            "peers": info["peers"],
            "max_parallelism": info["max_parallelism"],
            "functions": info["functions"],
            "checkpoint_interval": info.get("checkpoint_interval"),
            "status": list(out),
        }

    def show(doc: dict[str, Any], before: dict[str, Any] | None, seconds: float) -> None:
        if args.json:
            print(json.dumps(doc) if args.watch is not None else json.dumps(doc, indent=2), flush=True)
            return
        if args.watch is not None and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # clear the terminal: the table replaces the last one
        elif args.watch is not None and before is not None:
            print()  # a log or a pipe: a blank line between tables
        print(status_table(doc, before, seconds), flush=True)

    async def go(client: Any) -> int:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        doc = await sample(client)
        if args.watch is None:
            before = None
            if not args.json:  # a rate needs two samples: take the second a second later
                await asyncio.sleep(RATE_SAMPLE)
                before, doc, t1 = doc, await sample(client), loop.time()
            show(doc, before, loop.time() - t0 if before is None else t1 - t0)
            return 0
        shown = 0
        before, t_before = None, t0
        while True:
            now = loop.time()
            show(doc, before, now - t_before)
            shown += 1
            if args.count and shown >= args.count:
                return 0
            before, t_before = doc, now
            await asyncio.sleep(args.watch)
            while True:
                try:
                    doc = await sample(client)
                    break
                except StatefunMeshError as exc:  # keep watching: the mesh may be restarting
                    print(f"statefun-mesh status: {exc}; retrying", file=sys.stderr, flush=True)
                    before = None
                    await asyncio.sleep(args.watch)

    try:
        return asyncio.run(_with_client(args, go))
    except KeyboardInterrupt:  # Ctrl-C ends --watch: a normal way to stop it
        return 0


RATE_SAMPLE: Final = 1.0


_UNITS: Final = ("B", "kB", "MB", "GB", "TB")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size, unit = float(n), 0
    while size >= 1000 and unit < len(_UNITS) - 1:
        size, unit = size / 1000, unit + 1
    return f"{size:.0f} {_UNITS[unit]}" if unit == 0 else f"{size:.1f} {_UNITS[unit]}"


def status_table(doc: dict[str, Any], before: dict[str, Any] | None = None, seconds: float = 0.0) -> str:
    """The ``status`` table: one row per peer.

    Args:
        doc: what ``status --json`` prints.
        before: an earlier ``doc``, for invocations per second over ``seconds``.
    """
    interval = doc.get("checkpoint_interval")
    lines = [
        f"mesh: {doc['peers']} peer{'s' if doc['peers'] != 1 else ''}, {doc['max_parallelism']} key groups, "
        f"checkpoints {'every ' + format_seconds(interval) + ' s' if interval else 'off'}; "
        f"functions: {', '.join(doc['functions'])}"
    ]
    prev = {s.get("peer"): s for s in (before or {}).get("status", []) if isinstance(s.get("invocations"), int)}
    down_seen = {p for s in doc["status"] for p in s.get("unavailable_peers", ())}
    header = ("PEER", "ALIVE", "KEY GROUPS", "INVOCATIONS", "INV/S", "FAILED", "BACKLOG", "STATE", "CHECKPOINT", "AGE")
    rows: list[tuple[str, ...]] = []
    for s in doc["status"]:
        peer = s.get("peer", "?")
        if not isinstance(s.get("invocations"), int):  # unreachable, or no client endpoint
            rows.append((str(peer), "NO", "-", "-", "-", "-", "-", "-", "-", "-"))
            continue
        kg = s.get("key_groups")
        rate = "-"
        if peer in prev and seconds > 0:
            rate = f"{max(s['invocations'] - prev[peer]['invocations'], 0) / seconds:,.0f}"
        backlog = s.get("queued", 0) + sum(s.get("outgoing", ())) + s.get("parked_sends", 0)
        ck = s.get("checkpoints") or {}
        if not ck:
            last, age = "off", "-"
        else:
            last = "-" if ck.get("last_complete") is None else str(ck["last_complete"])
            if ck.get("failing"):
                last += " (FAILING)"
            a = ck.get("last_complete_age_s")
            age = "-" if a is None else f"{format_seconds(round(a, 1))} s"
        alive = "yes" if peer not in down_seen else "yes (others lost it)"
        rows.append(
            (
                str(peer),
                alive,
                f"{kg[0]}-{kg[1] - 1}" if kg else "-",
                f"{s['invocations']:,}",
                rate,
                f"{s.get('failures', 0):,}",
                f"{backlog:,}",
                _size(s.get("state_bytes")),
                last,
                age,
            )
        )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        cells = (c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines.append("  ".join(cells).rstrip())
    for s in doc["status"]:
        if not isinstance(s.get("invocations"), int):
            lines.append(f"peer {s.get('peer', '?')}: {s.get('status')}")
        elif (s.get("checkpoints") or {}).get("last_error"):
            lines.append(f"peer {s['peer']}: {s['checkpoints']['last_error']}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's command(s) to the ``statefun-mesh`` parser."""
    p = sub.add_parser(
        "status",
        help="print every peer's status as a table",
        description="Print a table of every peer: alive, key groups, invocations (and per second, "
        "measured over 1 s), backlog, state size, last checkpoint and its age.",
    )
    p.add_argument("--json", action="store_true", help="print the counters as JSON (the machine form)")
    p.add_argument(
        "--watch",
        nargs="?",
        type=_positive_seconds,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    p.add_argument(
        "--count",
        type=_count,
        default=0,
        metavar="N",
        help="with --watch: stop after N refreshes (default: 0, until Ctrl-C)",
    )
    _add_client_args(p)
    p.set_defaults(func=cmd_status)
