"""Fraud detection: accounts, merchants, velocity windows and alerts, with a load generator.

Three function types cooperate on every card transaction:

- ``fraud/account`` (id: account number) keeps the account's profile (transactions,
  total spent, alerts raised) and a velocity counter for the current window. A
  transaction opens a window with a delayed message to itself (``send_after``) if none
  is open, and asks the merchant how risky it is.
- ``fraud/merchant`` (id: merchant) keeps its volume and chargebacks, and answers every
  check with its chargeback ratio (to ``context.caller``, the account).
- With the merchant's answer the account scores the transaction: too many transactions
  in the window, an amount far above the account's average, or a risky merchant each
  raise an alert, written to the egress ``fraud/alerts``.
- Clients send ``fraud/Chargeback`` to merchants, and ask an account for its profile
  with a request (``fraud/Report``).

Run the demo on an in-process mesh (embedded defaults), printing the alerts::

    python -m examples.fraud_detection

or start a mesh of processes and drive it with the load generator::

    statefun-mesh run examples.fraud_detection:functions --peers 2
    python -m examples.fraud_detection --endpoint tcp://127.0.0.1:7700 --seconds 60 --rate 2000
    statefun-mesh egress fraud/alerts
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

from statefun_mesh import (
    IntType,
    LocalMesh,
    StatefulFunctions,
    ValueSpec,
    egress_message_builder,
    make_json_type,
    message_builder,
)

TRANSACTION = make_json_type("fraud/Transaction")
MERCHANT_CHECK = make_json_type("fraud/MerchantCheck")
MERCHANT_VERDICT = make_json_type("fraud/MerchantVerdict")
WINDOW_CLOSED = make_json_type("fraud/WindowClosed")
CHARGEBACK = make_json_type("fraud/Chargeback")
REPORT = make_json_type("fraud/Report")
PROFILE = make_json_type("fraud/AccountProfile")
MERCHANT_STATS = make_json_type("fraud/MerchantStats")
ALERT = make_json_type("fraud/Alert")
ALERTS = "fraud/alerts"

#: Length of a velocity window, and how many transactions in one raise an alert.
WINDOW = timedelta(seconds=10)
VELOCITY_LIMIT = 5
#: An amount this many times the account's average (after a few transactions) is suspicious.
AMOUNT_FACTOR = 5
MIN_HISTORY = 5
#: Merchants whose chargebacks exceed this share of their transactions are risky.
MERCHANT_RISK = 0.2

functions = StatefulFunctions()


@functions.bind(
    typename="fraud/account",
    specs=[ValueSpec(name="profile", type=PROFILE), ValueSpec(name="recent", type=IntType)],
)
def account(context, message):
    """Tracks an account's history and velocity and scores its transactions."""
    profile = context.storage.profile or {"count": 0, "total": 0, "alerts": 0}
    if message.is_type(TRANSACTION):
        txn = message.as_type(TRANSACTION)
        recent = context.storage.recent
        if recent is None:  # no window open: open one, closed by a message to ourselves
            recent = 0
            context.send_after(
                WINDOW,
                message_builder(
                    target_typename="fraud/account", target_id=context.address.id, value={}, value_type=WINDOW_CLOSED
                ),
            )
        context.storage.recent = recent + 1
        context.send(
            message_builder(
                target_typename="fraud/merchant",
                target_id=txn["merchant"],
                value={"txn": txn["txn"], "amount": txn["amount"], "recent": recent + 1},
                value_type=MERCHANT_CHECK,
            )
        )
    elif message.is_type(MERCHANT_VERDICT):
        verdict = message.as_type(MERCHANT_VERDICT)
        reasons = score(profile, verdict)
        profile["count"] += 1
        profile["total"] += verdict["amount"]
        if reasons:
            profile["alerts"] += 1
            alert = {
                "account": context.address.id,
                "txn": verdict["txn"],
                "amount": verdict["amount"],
                "merchant": verdict["merchant"],
                "reasons": reasons,
            }
            context.send_egress(egress_message_builder(target_typename=ALERTS, value=alert, value_type=ALERT))
        context.storage.profile = profile
    elif message.is_type(WINDOW_CLOSED):
        del context.storage.recent
    elif message.is_type(REPORT):
        context.reply(value=profile, value_type=PROFILE)
    else:
        raise TypeError(f"fraud/account does not understand {message.value_typename()}")


def score(profile: dict[str, int], verdict: dict[str, Any]) -> list[str]:
    """The reasons to raise an alert for one transaction (empty: it looks fine)."""
    reasons = []
    if verdict["recent"] > VELOCITY_LIMIT:
        reasons.append(f"{verdict['recent']} transactions within {WINDOW.total_seconds():g} s")
    if profile["count"] >= MIN_HISTORY and verdict["amount"] > AMOUNT_FACTOR * profile["total"] / profile["count"]:
        reasons.append("amount far above the account's average")
    if verdict["risk"] > MERCHANT_RISK:
        reasons.append(f"merchant {verdict['merchant']} has {verdict['risk']:.0%} chargebacks")
    return reasons


@functions.bind(typename="fraud/merchant", specs=[ValueSpec(name="stats", type=MERCHANT_STATS)])
def merchant(context, message):
    """Keeps a merchant's volume and chargebacks and answers risk checks."""
    stats = context.storage.stats or {"txns": 0, "volume": 0, "chargebacks": 0}
    if message.is_type(MERCHANT_CHECK):
        check = message.as_type(MERCHANT_CHECK)
        stats["txns"] += 1
        stats["volume"] += check["amount"]
        risk = stats["chargebacks"] / stats["txns"]
        caller = context.caller
        context.send(
            message_builder(
                target_typename=caller.typename,
                target_id=caller.id,
                value={**check, "merchant": context.address.id, "risk": risk},
                value_type=MERCHANT_VERDICT,
            )
        )
    elif message.is_type(CHARGEBACK):
        stats["chargebacks"] += 1
    elif message.is_type(REPORT):
        context.reply(value=stats, value_type=MERCHANT_STATS)
        return
    else:
        raise TypeError(f"fraud/merchant does not understand {message.value_typename()}")
    context.storage.stats = stats


# -- the load generator ------------------------------------------------------------------


def traffic(seed: int, accounts: int, merchants: int) -> Iterator[Any]:
    """An endless, reproducible stream of messages: mostly ordinary card use, with a few
    fraudsters (bursts of large amounts) and a few bad merchants (chargebacks)."""
    rng = random.Random(seed)
    fraudsters = {f"acct-{i}" for i in range(0, accounts, 50)}
    bad_merchants = [f"shop-{i}" for i in range(0, merchants, 10)]
    n = 0
    while True:
        n += 1
        acct = f"acct-{rng.randrange(accounts)}"
        shop = f"shop-{rng.randrange(merchants)}"
        amount = rng.randrange(100, 10_000)
        if acct in fraudsters and rng.random() < 0.3:
            amount *= 20
        yield message_builder(
            target_typename="fraud/account",
            target_id=acct,
            value={"txn": f"t{n}", "merchant": shop, "amount": amount},
            value_type=TRANSACTION,
        )
        if rng.random() < 0.02:
            yield message_builder(
                target_typename="fraud/merchant",
                target_id=rng.choice(bad_merchants),
                value={},
                value_type=CHARGEBACK,
            )


async def generate(
    send: Callable[[Any], Awaitable[None]],
    *,
    seconds: float,
    rate: float,
    accounts: int = 1000,
    merchants: int = 100,
    seed: int = 7,
    concurrency: int = 64,
) -> int:
    """Send the traffic at about ``rate`` messages/s for ``seconds``; returns how many were sent."""
    stream = traffic(seed, accounts, merchants)
    sent = 0
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        chunk = [next(stream) for _ in range(concurrency)]
        await asyncio.gather(*(send(m) for m in chunk))
        sent += len(chunk)
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            await asyncio.sleep(min(ahead, deadline - time.monotonic()))
    return sent


async def demo(seconds: float = 2.0, rate: float = 2000.0) -> None:
    """Run the functions on an in-process mesh for a short while and print what they found."""
    async with LocalMesh(functions) as mesh:
        sent = await generate(mesh.send, seconds=seconds, rate=rate, accounts=200, merchants=20)
        await mesh.idle()
        alerts = []
        async for record in mesh.egress(ALERTS):
            alerts.append(record.as_type(ALERT))
            if len(alerts) >= 5:
                break
        report = await mesh.request(
            message_builder(target_typename="fraud/account", target_id="acct-0", value={}, value_type=REPORT)
        )
        print(f"sent {sent} messages; first alerts:")
        for alert in alerts:
            print(f"  {alert}")
        print(f"acct-0: {report.as_type(PROFILE)}")


async def drive(endpoint: str, seconds: float, rate: float, accounts: int, merchants: int) -> None:
    """Drive a running mesh (``statefun-mesh run examples.fraud_detection:functions``)."""
    from statefun_mesh import MeshClient

    async with MeshClient(endpoint) as client:
        sent = await generate(client.send, seconds=seconds, rate=rate, accounts=accounts, merchants=merchants)
    print(f"sent {sent} messages in {seconds:g} s to {endpoint}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.fraud_detection", description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", help="drive the mesh at this client endpoint instead of an in-process demo")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to send (default: 2)")
    parser.add_argument("--rate", type=float, default=2000.0, help="messages per second (default: 2000)")
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--merchants", type=int, default=100)
    args = parser.parse_args(argv)
    if args.endpoint:
        asyncio.run(drive(args.endpoint, args.seconds, args.rate, args.accounts, args.merchants))
    else:
        asyncio.run(demo(args.seconds, args.rate))


if __name__ == "__main__":
    main()
