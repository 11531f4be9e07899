"""The client side of the many-hosts tests, run as a process in the clients' namespace.

``python -m tests.integration.netns_workload load --endpoints A,B,C --seconds S --tag T --out F``
issues, for ``S`` seconds, counter increments (``cr/counter``, one egress record each),
transfers between accounts (``hx/account``) and one-shot timers (``cr/timer-setter``),
each with an idempotency key, at most ``--parallel`` at once; a send that fails is sent
again with the same key through the next peer until ``--deadline`` seconds after the
start. It writes what was accepted, with the monotonic times of each attempt, to ``F``.

``python -m tests.integration.netns_workload check --endpoints ... --load F --out G``
waits (at most ``--timeout`` s) until every counter, account and timer target holds
exactly what the accepted operations imply, reads the increments egress, and writes
what it found to ``G``; the test asserts on it (exactly once: no loss, no duplicate).

CLOCK_MONOTONIC is the same in every network namespace, so the test compares these
times with the moments it injected and healed its faults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from typing import Any

from statefun_mesh import MeshClient
from statefun_mesh.errors import StatefunMeshError
from tests.integration.crash_app import COUNTER, INCREMENTS, TIMER_SETTER, TIMER_TARGET, json_message, query
from tests.integration.netns_app import ACCOUNT

COUNTERS = 12
ACCOUNTS = 8
TIMER_DELAY_MS = (1500, 6000)


async def _send(clients: list[MeshClient], msg: Any, key: str, first: int, deadline: float) -> dict[str, Any]:
    t0 = time.monotonic()
    attempt = 0
    errors: list[str] = []
    while True:
        c = clients[(first + attempt) % len(clients)]
        attempt += 1
        try:
            await c.send(msg, idempotency_key=key)
            return {
                "t0": t0,
                "t1": time.monotonic(),
                "attempts": attempt,
                "errors": errors[-3:],
                "via": (first + attempt - 1) % len(clients),
            }
        except (StatefunMeshError, OSError) as exc:
            errors.append(type(exc).__name__)
            if time.monotonic() > deadline:
                return {"t0": t0, "t1": None, "attempts": attempt, "errors": errors[-3:]}
            await asyncio.sleep(0.05)


async def load(args: argparse.Namespace) -> dict[str, Any]:
    endpoints = args.endpoints.split(",")
    clients = [MeshClient(ep, timeout=args.send_timeout) for ep in endpoints]
    start = time.monotonic()
    deadline = start + args.deadline
    sem = asyncio.Semaphore(args.parallel)
    ops: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    rng = random.Random(args.tag)

    async def one(op: dict[str, Any], msg: Any, key: str, first: int) -> None:
        async with sem:
            op.update(await _send(clients, msg, key, first, deadline))

    i = 0
    try:
        while time.monotonic() - start < args.seconds:
            await sem.acquire()  # issue no faster than the mesh accepts
            sem.release()
            tag = f"{args.tag}-{i}"
            c = f"c{i % COUNTERS}"
            op: dict[str, Any] = {"kind": "inc", "id": c, "inc": tag}
            ops.append(op)
            tasks.append(asyncio.create_task(one(op, json_message(COUNTER, c, {"inc": tag}), f"inc-{tag}", i)))
            a, b = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(1, 100)
            op = {"kind": "xfer", "from": f"a{a}", "to": f"a{b}", "amount": amount}
            ops.append(op)
            doc = {"xfer": tag, "to": f"a{b}", "amount": amount}
            tasks.append(asyncio.create_task(one(op, json_message(ACCOUNT, f"a{a}", doc), f"xfer-{tag}", i + 1)))
            if i % 10 == 0:
                target = f"t-{tag}"
                delay = rng.randint(*TIMER_DELAY_MS)
                op = {"kind": "timer", "target": target, "delay_ms": delay}
                ops.append(op)
                msg = json_message(TIMER_SETTER, f"s{i % 5}", {"set": [[target, delay, f"tok-{tag}"]]})
                tasks.append(asyncio.create_task(one(op, msg, f"timer-{tag}", i + 2)))
            i += 1
            await asyncio.sleep(args.pause)
        await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.aclose()
    return {"start": start, "end": time.monotonic(), "ops": ops}


async def _query(clients: list[MeshClient], msg: Any, first: int) -> Any:
    c = clients[first % len(clients)]
    reply = await c.request(msg, timeout=3.0)
    return json.loads(reply.raw_value().decode("utf-8"))


async def check(args: argparse.Namespace) -> dict[str, Any]:
    with open(args.load) as fh:
        done = json.load(fh)
    accepted = [op for op in done["ops"] if op.get("t1") is not None]
    lost_sends = [op for op in done["ops"] if op.get("t1") is None]
    # Messages a peer acknowledged and that no complete checkpoint covers yet are only in
    # its ingress log, on its own disk: with --at-most-once K,T (a host lost with its disk at
    # T) those accepted through peer K before T may be lost, never applied twice.
    maybe: list[dict[str, Any]] = []
    if args.at_most_once:
        k, t = args.at_most_once.split(",")
        maybe = [op for op in accepted if op["via"] == int(k) and op["t1"] <= float(t)]
    ops = [op for op in accepted if op not in maybe]
    slack: dict[str, int] = {}
    maybe_incs: set[str] = set()
    maybe_accounts: set[str] = set()
    for op in maybe:
        if op["kind"] == "inc":
            slack[op["id"]] = slack.get(op["id"], 0) + 1
            maybe_incs.add(f"{op['id']}|{op['inc']}")
        elif op["kind"] == "xfer":
            maybe_accounts |= {op["from"], op["to"]}
        else:
            slack[op["target"]] = 1
    counters: dict[str, int] = {}
    balances: dict[str, int] = {}
    timers: dict[str, int] = {}
    incs: set[str] = set()
    for op in ops:
        if op["kind"] == "inc":
            counters[op["id"]] = counters.get(op["id"], 0) + 1
            incs.add(f"{op['id']}|{op['inc']}")
        elif op["kind"] == "xfer":
            balances[op["from"]] = balances.get(op["from"], 0) - op["amount"]
            balances[op["to"]] = balances.get(op["to"], 0) + op["amount"]
        else:
            timers[op["target"]] = 1
    for op in maybe:  # queried too; each counts 0 or 1 more
        if op["kind"] == "inc":
            counters.setdefault(op["id"], 0)
        elif op["kind"] == "xfer":
            balances.setdefault(op["from"], 0)
            balances.setdefault(op["to"], 0)
        else:
            timers.setdefault(op["target"], 0)

    def within(found: dict[str, int], want: dict[str, int], loose: set[str] | None = None) -> bool:
        if set(found) != set(want):
            return False
        return all((loose is not None and k in loose) or want[k] <= found[k] <= want[k] + slack.get(k, 0) for k in want)

    endpoints = args.endpoints.split(",")
    clients = [MeshClient(ep, timeout=3.0) for ep in endpoints]
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    # Timers fire at most TIMER_DELAY_MS after they were set (plus the mesh's own delay).
    found: dict[str, Any] = {}
    try:
        while True:
            found = {"counters": {}, "balances": {}, "timers": {}}
            try:
                for n, (cid, _) in enumerate(sorted(counters.items())):
                    found["counters"][cid] = (await _query(clients, query(COUNTER, cid), n))["count"]
                for n, acc in enumerate(sorted(balances)):
                    found["balances"][acc] = (await _query(clients, query(ACCOUNT, acc), n))["balance"]
                for n, t in enumerate(sorted(timers)):
                    found["timers"][t] = (await _query(clients, query(TIMER_TARGET, t), n))["fired"]
            except (StatefunMeshError, OSError) as exc:
                found["error"] = repr(exc)
            ok = (
                within(found["counters"], counters)
                and within(found["timers"], timers)
                and within(found["balances"], balances, maybe_accounts)
            )
            if ok and sum(found["balances"].values()) == 0:
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        settled = time.monotonic()
        records: list[str] = []
        egress_error = None
        try:

            async def read() -> None:
                async for rec in clients[0].egress(INCREMENTS, stop_when_idle=args.egress_idle):
                    records.append(rec.as_string())

            await asyncio.wait_for(read(), max(deadline - time.monotonic(), 5.0) + args.egress_idle)
        except (StatefunMeshError, OSError, asyncio.TimeoutError, TimeoutError) as exc:
            egress_error = repr(exc)
    finally:
        for c in clients:
            await c.aclose()
    dup = sorted({r for r in records if records.count(r) > 1})
    return {
        "expected": {"counters": counters, "balances": balances, "timers": timers},
        "found": found,
        "ok_state": within(found.get("counters", {}), counters)
        and within(found.get("timers", {}), timers)
        and within(found.get("balances", {}), balances, maybe_accounts),
        "at_most_once_ops": len(maybe),
        "lost_at_most_once": sum(
            counters[k] + slack.get(k, 0) - v for k, v in found.get("counters", {}).items() if k in counters
        )
        + sum(timers[k] + slack.get(k, 0) - v for k, v in found.get("timers", {}).items() if k in timers),
        "balance_sum": sum(found.get("balances", {}).values()),
        "accepted_ops": len(ops),
        "unaccepted_ops": len(lost_sends),
        "egress_records": len(records),
        "egress_missing": sorted(incs - set(records))[:20],
        "egress_missing_count": len(incs - set(records)),
        "egress_lost_at_most_once": len(maybe_incs - set(records)),
        "egress_duplicates": dup[:20],
        "egress_unexpected": sorted(set(records) - incs - maybe_incs)[:20],
        "egress_error": egress_error,
        "settle_seconds": settled - t_start,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="netns_workload")
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("load")
    lp.add_argument("--endpoints", required=True)
    lp.add_argument("--seconds", type=float, required=True)
    lp.add_argument("--deadline", type=float, default=90.0)
    lp.add_argument("--tag", required=True)
    lp.add_argument("--parallel", type=int, default=8)
    lp.add_argument("--pause", type=float, default=0.01)
    lp.add_argument("--send-timeout", type=float, default=2.0)
    lp.add_argument("--out", required=True)
    cp = sub.add_parser("check")
    cp.add_argument("--endpoints", required=True)
    cp.add_argument("--load", required=True)
    cp.add_argument("--timeout", type=float, default=60.0)
    cp.add_argument("--egress-idle", type=float, default=2.0)
    cp.add_argument("--at-most-once", metavar="K,T", help="ops accepted through peer K before monotonic T may be lost")
    cp.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = asyncio.run(load(args) if args.cmd == "load" else check(args))
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
