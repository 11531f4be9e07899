"""A 3-peer cluster under ``statefun-mesh run`` (tcp and ipc): delivery, order, cycles, fan-out, egress."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import uuid

import pytest

from statefun_mesh import (
    FunctionNotFoundError,
    MeshClient,
    RequestTimeoutError,
    message_builder,
)
from tests.integration import app
from tests.integration.support import eventually, gather_bounded, ids_on, owner, read_egress

pytestmark = pytest.mark.integration


def run_id() -> str:
    return uuid.uuid4().hex[:8]


async def count_of(client: MeshClient, id: str, typename: str = app.COUNTER) -> int:
    reply = await client.request(message_builder(target_typename=typename, target_id=id, int_value=0), timeout=20)
    assert (reply.target_typename, reply.target_id) == (typename, id), "the reply came from another instance"
    return reply.as_int()  # type: ignore[no-any-return]


async def query(client: MeshClient, typename: str, id: str) -> dict:
    reply = await client.request(app.json_message(typename, id, {"query": True}), timeout=20)
    return json.loads(reply.raw_value())  # type: ignore[no-any-return]


@pytest.mark.timeout(120)
async def test_every_message_reaches_its_instance_exactly_once(cluster_endpoint: str) -> None:
    run = run_id()
    keys = [f"{run}-k{i}" for i in range(300)]
    expected = {k: 8 + i % 5 for i, k in enumerate(keys)}  # 3,000 increments in all
    assert sum(expected.values()) == 3000
    assert {owner(k) for k in keys} == {0, 1, 2}
    sends = [k for k in keys for _ in range(expected[k])]
    random.Random(run).shuffle(sends)
    async with MeshClient(cluster_endpoint, timeout=30) as client:
        await gather_bounded(
            (client.send(message_builder(target_typename=app.COUNTER, target_id=k, int_value=1)) for k in sends), 64
        )
        # A request entering after the acknowledged sends is processed after them (FIFO channels).
        counts = await gather_bounded((count_of(client, k) for k in keys), 64)
    wrong = {k: (c, expected[k]) for k, c in zip(keys, counts, strict=True) if c != expected[k]}
    assert not wrong, f"{len(wrong)} instances have wrong counts (got, expected), e.g. {list(wrong.items())[:5]}"


@pytest.mark.timeout(120)
async def test_order_per_sender_and_target_holds(cluster_endpoint: str) -> None:
    """Six sender instances (two per peer) each send 300 numbered messages to six targets
    (two per peer); every target sees every sender's numbers as 1, 2, 3, … with no gap."""
    run = run_id()
    senders = [i for p in range(3) for i in ids_on(p, f"{run}-s", 2)]
    targets = [i for p in range(3) for i in ids_on(p, f"{run}-t", 2)]
    rounds = 300
    async with MeshClient(cluster_endpoint, timeout=30) as client:
        for s in senders:
            await client.send(app.json_message(app.SEQ_SENDER, s, {"left": rounds, "targets": targets}))

        async def all_received() -> bool:
            states = [await query(client, app.SEQ, t) for t in targets]
            return all(st.get("received") == rounds * len(senders) for st in states)

        await eventually(all_received, timeout=90, interval=0.5, what="every numbered message arrived")
        for t in targets:
            st = await query(client, app.SEQ, t)
            assert st["bad"] == [], f"target {t} saw out-of-order numbers [sender, expected, got]: {st['bad'][:10]}"
            assert st["last"] == {f"{app.SEQ_SENDER}/{s}": rounds for s in senders}


async def _chain(client: MeshClient, a: str, b: str, rounds: int, chain: str) -> dict:
    reply = await client.request(
        app.json_message(app.PING, a, {"left": rounds, "hops": 0, "partner": b, "chain": chain}), timeout=100
    )
    return json.loads(reply.raw_value())  # type: ignore[no-any-return]


@pytest.mark.timeout(150)
async def test_ping_pong_across_peers(cluster_endpoint: str, request: pytest.FixtureRequest) -> None:
    """One chain of 3,000 hops between two peers, then three chains at once on other pairs
    (10,000 hops with --run-slow: the same checks, a longer run)."""
    run = run_id()
    rounds = 10_000 if request.config.getoption("--run-slow") else 3_000
    a, b = ids_on(0, f"{run}-a", 1)[0], ids_on(1, f"{run}-b", 1)[0]
    async with MeshClient(cluster_endpoint, timeout=30) as client:
        result = await _chain(client, a, b, rounds, f"{run}-solo")
        assert result == {"chain": f"{run}-solo", "hops": rounds, "last": f"{app.PONG}/{b}"}
        assert (await query(client, app.PING, a))["count"] == rounds // 2
        assert (await query(client, app.PONG, b))["count"] == rounds // 2

        pairs = [(1, 2), (2, 0), (2, 1)]
        chains = [
            (ids_on(p, f"{run}-p{k}", 1)[0], ids_on(q, f"{run}-q{k}", 1)[0], f"{run}-c{k}")
            for k, (p, q) in enumerate(pairs)
        ]
        results = await asyncio.gather(*(_chain(client, x, y, rounds, c) for x, y, c in chains))
        for (x, y, c), res in zip(chains, results, strict=True):
            assert res == {"chain": c, "hops": rounds, "last": f"{app.PONG}/{y}"}
            assert (await query(client, app.PING, x))["count"] == rounds // 2
            assert (await query(client, app.PONG, y))["count"] == rounds // 2
        # every chain announced its end on the egress, exactly once
        ours = await read_egress(
            client, app.PINGPONG_EGRESS, count=1 + len(chains), keep=lambda r: r.as_string().find(run) >= 0
        )
        await asyncio.sleep(0.5)
        ours = await read_egress(client, app.PINGPONG_EGRESS, keep=lambda r: r.as_string().find(run) >= 0, idle=1.5)
        mine = collections.Counter(json.loads(r.as_string())["chain"] for r in ours)
        assert mine == {f"{run}-solo": 1, **{c: 1 for _, _, c in chains}}


@pytest.mark.timeout(120)
async def test_fan_out_to_ten_thousand_instances(cluster_endpoint: str) -> None:
    run = run_id()
    k = 10_000
    async with MeshClient(cluster_endpoint, timeout=30) as client:
        await client.send(app.json_message(app.FANOUT, f"{run}-src", {"k": k, "prefix": run}))

        async def tallied() -> bool:
            return await count_of(client, f"tally:{run}") == k

        await eventually(tallied, timeout=90, interval=0.3, what=f"{k} fan-out targets counted")
        await asyncio.sleep(0.5)  # a late duplicate would show now
        assert await count_of(client, f"tally:{run}") == k
        assert await count_of(client, f"dups:{run}") == 0
        sample = random.Random(run).sample(range(k), 60)
        counts = await gather_bounded((count_of(client, f"{run}-{i}", app.FANOUT_TARGET) for i in sample), 20)
        # the request itself is one more message to the instance
        assert counts == [2] * len(sample)


@pytest.mark.timeout(90)
async def test_request_reply_and_egress_from_every_peer(cluster_endpoint: str) -> None:
    run = run_id()
    egress = f"it/out-{run}"
    per_peer = {p: ids_on(p, f"{run}-e", 2) for p in range(3)}
    n = 5
    async with MeshClient(cluster_endpoint, timeout=30) as client:
        info = await client.info()
        assert info["peers"] == 3 and len(info["client_endpoints"]) == 3
        assert app.COUNTER in info["functions"]

        reply = await client.request(message_builder(target_typename=app.COUNTER, target_id=f"{run}-r", int_value=41))
        assert (reply.target_typename, reply.target_id, reply.as_int()) == (app.COUNTER, f"{run}-r", 41)

        for ids in per_peer.values():
            for i in ids:
                got = await client.request(app.json_message(app.EMIT, i, {"egress": egress, "n": n, "tag": run}))
                assert got.as_int() == n

        records = await read_egress(client, egress, count=6 * n)
        keys = [(r.peer, r.offset) for r in records]
        assert len(set(keys)) == len(keys) == 6 * n, f"(peer, offset) not unique: {sorted(keys)}"
        assert {r.peer for r in records} == {0, 1, 2}
        assert {r.as_string() for r in records} == {
            f"{run}:{i}:{j}" for ids in per_peer.values() for i in ids for j in range(n)
        }
        for r in records:  # each record sits on the peer of the instance that emitted it
            assert owner(r.as_string().split(":")[1]) == r.peer
        for p in range(3):
            offsets = [r.offset for r in records if r.peer == p]
            assert offsets == sorted(offsets)

        # the same records again, from a second reader
        await asyncio.sleep(0.3)
        second = await read_egress(client, egress, count=6 * n + 1, idle=1.5)
        again = sorted((r.peer, r.offset, r.as_string()) for r in second)
        assert again == sorted((r.peer, r.offset, r.as_string()) for r in records), "a second reader saw other records"


async def test_request_errors(cluster_endpoint: str) -> None:
    async with MeshClient(cluster_endpoint, timeout=10) as client:
        with pytest.raises(FunctionNotFoundError, match="it/nope"):
            await client.request(message_builder(target_typename="it/nope", target_id="x", int_value=1))
        with pytest.raises(FunctionNotFoundError):
            await client.send(message_builder(target_typename="it/nope", target_id="x", int_value=1))
        # a function that never replies: the request times out, the mesh goes on
        with pytest.raises(RequestTimeoutError):
            quiet = app.json_message(app.FANOUT, f"{run_id()}-quiet", {"k": 0, "prefix": "q"})
            await client.request(quiet, timeout=0.5)
        reply = await client.request(message_builder(target_typename=app.COUNTER, target_id=run_id(), int_value=3))
        assert reply.as_int() == 3
