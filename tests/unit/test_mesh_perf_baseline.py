"""bench/mesh_perf.py's baselines and targets (issue 9).

- The StateFun-shaped no-I/O dispatch (bench/sdk_shape.py) that every "x base" ratio divides
  by really does the counter's work: it ends with the same count per key as a mesh that got
  the same increments, and a round that skips work fails its own check.
- The targets printed are issue 9's: 250,000/s per peer, 0.40 of that baseline, the Cython
  core 2.5x the twin, p99 < 1 ms to the owner and < 2 ms through another peer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import msgpack
import pytest

from bench import mesh_perf as mp
from bench import perf_app as app
from bench import sdk_shape
from statefun_mesh import IntType, LocalMesh, Message, message_builder

KEYS = 37
MESSAGES = KEYS * 13


def increment(i: int) -> int:
    """Mixed signs and zeros, so a count can pass through 0 (encoded as b"")."""
    return i % 7 - 2


def expected_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in range(MESSAGES):
        k = app.counter_id(i % KEYS)
        counts[k] = counts.get(k, 0) + increment(i)
    return counts


async def test_the_statefun_shaped_baseline_applies_the_counts_a_mesh_applies(tmp_path: Path) -> None:
    """Old code: no such baseline (mesh_perf divided by msgpack + a dict increment)."""
    base = mp.StatefunShapedBaseline(MESSAGES, KEYS, increment)
    base.run(1)
    shaped = base.counts()
    assert shaped == expected_counts()

    ser = IntType.serializer()
    async with LocalMesh(app.functions, state_dir=tmp_path, peers=2) as mesh:
        for i in range(MESSAGES):
            await mesh.send(
                Message(app.COUNTER, app.counter_id(i % KEYS), IntType.typename, ser.serialize(increment(i)))
            )
        await mesh.idle(30)
        in_mesh = {}
        for k in shaped:
            reply = await mesh.request(message_builder(target_typename=app.COUNTER, target_id=k, int_value=0))
            in_mesh[k] = reply.as_int()
    assert in_mesh == shaped

    base.run(2)  # the store persists across rounds, as a peer's state does
    assert base.counts() == {k: 3 * v for k, v in shaped.items()}


def test_a_round_that_skips_the_work_fails_its_own_check() -> None:
    base = mp.StatefunShapedBaseline(MESSAGES, KEYS, increment)
    base.functions = sdk_shape.registry([(app.COUNTER, lambda context, message: None, [])])
    with pytest.raises(RuntimeError, match="increments"):
        base.run(1)


def test_the_shaped_dispatch_builds_what_the_sdk_builds_per_request_and_invocation() -> None:
    """One address, two invocations (one from a caller): one storage and context, a Message per
    invocation, the state deserialized on each read, one mutation with the serialized value."""
    seen: list[tuple[Any, Any, Any, int]] = []

    def fn(context: Any, message: Any) -> None:
        seen.append((context.address, context.caller, message, context.storage.count))
        context.storage.count = (context.storage.count or 0) + message.as_int()

    functions = sdk_shape.registry([("ns/fn", fn, [mp.ValueSpec(name="count", type=IntType)])])
    ser = IntType.serializer()
    store: sdk_shape.Store = {("ns/fn", "a", "count"): (IntType.typename, ser.serialize(5))}
    recs = [
        ["ns/fn", "a", "", "", IntType.typename, ser.serialize(2), 0, 0],
        ["ns/other", "b", "", "", IntType.typename, ser.serialize(1), 0, 0],
        ["ns/fn", "a", "ns/caller", "c1", IntType.typename, ser.serialize(3), 0, 0],
    ]
    functions.register("ns/other", fn, [mp.ValueSpec(name="count", type=IntType)])
    assert sdk_shape.dispatch_frame(functions, msgpack.packb(recs), store) == 3
    (a1, c1, m1, v1), (a2, c2, m2, v2), (_, _, _, vb) = seen  # grouped by address, in first-seen order
    assert a1 is a2 and (a1.namespace, a1.name, a1.id, a1.typename) == ("ns", "fn", "a", "ns/fn")
    assert c1 is None and (c2.typename, c2.id, c2.namespace, c2.name) == ("ns/caller", "c1", "ns", "caller")
    assert m1 is not m2 and (v1, v2, vb) == (5, 7, None)
    assert store[("ns/fn", "a", "count")] == (IntType.typename, ser.serialize(10))
    assert store[("ns/other", "b", "count")] == (IntType.typename, ser.serialize(1))
    store[("ns/fn", "a", "count")] = ("io.statefun.types/long", ser.serialize(1))
    with pytest.raises(TypeError, match="type mismatch"):
        sdk_shape.dispatch_frame(functions, msgpack.packb(recs[:1]), store)


def _result(core: str, peers: int, per_peer: float, cpu_ratio: float, p99_owner: float, p99_fwd: float) -> dict:
    counter = {
        "median_rate_per_peer": per_peer,
        "median_rate_per_cpu_s": per_peer * 1.1,
        "cpu_ratio_to_baseline": cpu_ratio,
        "ratio_to_baseline": cpu_ratio,
    }
    r: dict[str, Any] = {"core": core, "peers": peers, "counter": counter, "latency_owner": {"p99_us": p99_owner}}
    if peers > 1:
        r["latency_forwarded"] = {"p99_us": p99_fwd}
    return r


def test_the_printed_targets_are_issue_9s() -> None:
    """Old code printed '>= 200,000/s' and 'p99 < 2 ms' for the owner."""
    args = argparse.Namespace(checkpoint_interval=1.0, peers=[2])
    lines = mp.target_lines(
        [_result("c", 2, 260_000, 0.41, 999, 2_100), _result("python", 2, 100_000, 0.16, 800, 900)], args
    )
    text = "\n".join(lines)
    assert ">= 250,000 counter invocations/s per peer, 2 peer(s): MET" in text
    assert ">= 0.40 of the StateFun-shaped no-I/O dispatch (cpu), 2 peer(s): MET (0.410" in text
    assert "p99 < 1 ms to the owner peer, 2 peer(s): MET (999 us)" in text
    assert "p99 < 2 ms through another peer, 2 peer(s): MISSED (2,100 us)" in text
    assert "Cython core >= 2.5x the twin, counter, 2 peer(s): MET: 2.56x" in text
    assert "200,000" not in text and "checkpoints every 1 s; this run" not in text

    lines = mp.target_lines(
        [_result("c", 1, 249_999, 0.39, 1_000, 0)], argparse.Namespace(checkpoint_interval=None, peers=[1])
    )
    text = "\n".join(lines)
    assert "this run: checkpoints off" in text
    assert "per peer, 1 peer(s): MISSED" in text and "(cpu), 1 peer(s): MISSED" in text
    assert "p99 < 1 ms to the owner peer, 1 peer(s): MISSED (1,000 us)" in text
