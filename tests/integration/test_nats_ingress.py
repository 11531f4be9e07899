"""The NATS JetStream ingress (``statefun-mesh nats-ingress``) against a real nats-server.

A real ``nats-server -js`` on 127.0.0.1 (a free port, a temp store), a real 3-peer mesh
(``statefun-mesh run`` with checkpoints), and the bridge as a process of its own, so it can
be SIGKILLed. Functions: ``it/tally`` of tests/integration/app.py counts messages per
instance, sums their numbers and notes any number that was not above the one before.

Without the nats-server binary (or nats-py) these tests skip, except under CI (``CI``
set), where they fail: install it with ``bash .ci/install-nats-server.sh``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # tests.natsserver lives at the repository root's tests/
    sys.path.insert(0, _ROOT)

from statefun_mesh import MeshClient, message_builder  # noqa: E402
from tests.integration.app import JSON, TALLY  # noqa: E402
from tests.integration.support import BridgeProcess, Cluster, running_cluster  # noqa: E402
from tests.natsserver import NatsServer  # noqa: E402

pytestmark = [pytest.mark.integration]

if os.environ.get("CI") is None:
    nats = pytest.importorskip("nats", reason="the NATS ingress needs nats-py: pip install 'statefun-mesh[nats]'")
else:
    import nats  # CI must have it: these tests may not skip there
from nats.js.api import StreamConfig  # noqa: E402

# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-peer mesh with checkpoints (``statefun-mesh run``'s default), shared by the tests."""
    with running_cluster(tmp_path_factory.mktemp("nats-mesh")) as c:
        yield c


class Bridge(BridgeProcess):
    """``python -m statefun_mesh nats-ingress ...`` in a session of its own, logging to a file."""

    def __init__(self, workdir: Path, server: NatsServer, mesh: Cluster, *args: str) -> None:
        super().__init__("nats-ingress", workdir, server.url, mesh, *args)

    def final_counts(self, run: int) -> dict[str, int]:
        """The counters of the ``stopped:`` line of run ``run``."""
        m = re.search(
            r"stopped: bridged (\d+) .*?redelivered (\d+), rejected (\d+) \(dead-lettered (\d+)\)", self.log(run)
        )
        assert m, f"no final counters in the bridge log:\n{self.log(run)[-3000:]}"
        return dict(zip(("bridged", "redelivered", "rejected", "dead_lettered"), map(int, m.groups()), strict=True))


@pytest.fixture
def bridge(tmp_path: Path, nats_server: NatsServer, mesh: Cluster) -> Iterator[Any]:
    """``bridge(*args)`` makes a :class:`Bridge`; every process is killed at teardown."""
    made: list[Bridge] = []

    def make(*args: str) -> Bridge:
        b = Bridge(tmp_path, nats_server, mesh, *args)
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()


# -- helpers -------------------------------------------------------------------------------------


async def tallies(endpoint: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The ``it/tally`` state of every id (``count`` 0 for one that got nothing)."""
    out = {}
    async with MeshClient(endpoint, timeout=5.0) as c:
        for id in ids:
            reply = await c.request(message_builder(TALLY, id, value={"query": True}, value_type=JSON), timeout=5.0)
            out[id] = json.loads(reply.raw_value())
    return out


async def wait_tallies(endpoint: str, expected: dict[str, int], *, timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until every id has at least its expected count (acknowledged sends are applied a
    little later); return the states, read again once more so a late duplicate would show."""
    deadline = time.monotonic() + timeout
    while True:
        states = await tallies(endpoint, list(expected))
        if all(states[i]["count"] >= n for i, n in expected.items()):
            await asyncio.sleep(0.3)
            return await tallies(endpoint, list(expected))
        if time.monotonic() > deadline:
            got = {i: s["count"] for i, s in states.items()}
            raise AssertionError(f"tallies not reached within {timeout} s: expected {expected}, got {got}")
        await asyncio.sleep(0.2)


async def settled_total(endpoint: str, ids: list[str], *, timeout: float = 10.0) -> int:
    """The sum of the ids' counts once it stops changing (the mesh applied what it acknowledged)."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        total = sum(s["count"] for s in (await tallies(endpoint, ids)).values())
        if total == last or time.monotonic() > deadline:
            return total
        last = total
        await asyncio.sleep(0.3)


async def wait_consumed(js: Any, stream: str, durable: str, bridge: Bridge, *, timeout: float) -> Any:
    """Wait until the consumer has nothing pending and nothing unacked; return its info."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ci = await js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            ci = None  # the bridge has not created it yet
        if ci is not None and ci.num_pending == 0 and ci.num_ack_pending == 0:
            return ci
        if bridge.proc.poll() is not None:
            raise AssertionError(f"the bridge exited with {bridge.proc.returncode}:\n{bridge.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"consumer {durable} not done within {timeout} s: {ci}\n{bridge.log()[-3000:]}")
        await asyncio.sleep(0.1)


def expect(counts: dict[str, dict[str, Any]], id: str, n: int) -> None:
    """``id`` got the numbers 1..n, each once, in order."""
    state = counts[id]
    assert (state["count"], state["sum"], state["last"], state["out_of_order"]) == (n, n * (n + 1) // 2, n, 0), (
        id,
        state,
    )


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_messages_reach_functions_and_publisher_duplicates_apply_once(
    nats_server: NatsServer, mesh: Cluster, bridge: Any
) -> None:
    """Subject- and header-mapped messages update state in stream order; a publisher's retry
    with the same Nats-Msg-Id is applied once, whether JetStream dropped it (inside its
    duplicate window) or stored it again (after the window): then the mesh drops it."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="A", subjects=["a.>"], duplicate_window=1.0))
        keys = [f"a-{k}" for k in range(4)]
        n = 40
        for i in range(1, n + 1):
            for k in keys:
                await js.publish(f"a.it.tally.{k}", str(i).encode(), headers={"Nats-Msg-Id": f"{k}/{i}"})
        # header mapping, int values written as text, a dotted id, subject ignored
        for i in range(1, 21):
            await js.publish(
                "a.anything",
                str(i).encode(),
                headers={
                    "Statefun-Target-Type": TALLY,
                    "Statefun-Target-Id": "a.hdr",
                    "Statefun-Value-Type": "io.statefun.types/int",
                },
            )
        # a function type the mesh does not know: terminated and logged, nothing else stops
        await js.publish("a.it.no-such-function.x", b"1")
        # publisher retries inside the duplicate window: JetStream itself drops them
        for i in (1, 7, 40):
            ack = await js.publish(f"a.it.tally.{keys[0]}", str(i).encode(), headers={"Nats-Msg-Id": f"{keys[0]}/{i}"})
            assert ack.duplicate, ack
        await asyncio.sleep(1.2)
        # ... and after it: stored again, so only the mesh's idempotency keys keep them out
        for k in keys[:2]:
            for i in (1, 2, 39, 40):
                ack = await js.publish(f"a.it.tally.{k}", str(i).encode(), headers={"Nats-Msg-Id": f"{k}/{i}"})
                assert not ack.duplicate, ack
        assert (await js.stream_info("A")).state.messages == len(keys) * n + 20 + 1 + 8

        b = bridge("--stream", "A", "--subject", "a.>", "--durable", "mesh-a")
        b.start()
        await wait_consumed(js, "A", "mesh-a", b, timeout=20)
        counts = await wait_tallies(mesh.endpoint, {**dict.fromkeys(keys, n), "a.hdr": 20}, timeout=10)
        for k in keys:
            expect(counts, k, n)
        expect(counts, "a.hdr", 20)
        assert b.stop() == 0
        final = b.final_counts(1)
        assert final == {"bridged": len(keys) * n + 20 + 8, "redelivered": 0, "rejected": 1, "dead_lettered": 0}
        assert re.search(
            r"A message \d+ \(subject a\.it\.no-such-function\.x\) terminated, not bridged: "
            r"the mesh has no function it/no-such-function",
            b.log(),
        ), b.log()[-3000:]
    finally:
        await nc.close()


@pytest.mark.timeout(40)
async def test_bridge_sigkilled_mid_stream_applies_every_message_once(
    nats_server: NatsServer, mesh: Cluster, bridge: Any
) -> None:
    """SIGKILL the bridge twice while it has messages in flight, restart it: messages it had
    sent but not acked come again (after ack_wait) and the mesh drops them; every message is
    applied exactly once. No Nats-Msg-Id here: the keys are <stream>:<sequence>@<created>."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="B", subjects=["b.>"]))
        keys = [f"b-{k}" for k in range(12)]
        n = 120
        for i in range(1, n + 1):
            for k in keys:
                await js.publish(f"b.it.tally.{k}", str(i).encode())
        total = len(keys) * n

        b = bridge(
            "--stream",
            "B",
            "--subject",
            "b.>",
            "--durable",
            "mesh-b",
            "--ack-wait",
            "3",
            "--max-in-flight",
            "64",
            "--fetch-batch",
            "16",
        )
        applied_unacked = []
        for kill_at in (total // 4, total // 2):
            b.start()
            deadline = time.monotonic() + 20
            while True:  # until the bridge has got this far, then kill it with messages in flight
                try:
                    ci = await js.consumer_info("B", "mesh-b")
                except nats.js.errors.NotFoundError:
                    ci = None  # not created yet
                if ci is not None and ci.delivered.stream_seq >= kill_at and ci.num_ack_pending > 0:
                    break
                assert b.proc.poll() is None, b.log()[-3000:]
                assert time.monotonic() < deadline, f"the bridge did not get to {kill_at}: {ci}\n{b.log()[-3000:]}"
                await asyncio.sleep(0.02)
            b.kill()
            # what the mesh holds beyond what JetStream saw acked: applied, acks lost in the kill
            ci = await js.consumer_info("B", "mesh-b")
            acked = ci.delivered.stream_seq - ci.num_ack_pending
            applied = await settled_total(mesh.endpoint, keys)
            applied_unacked.append(applied - acked)
            assert applied >= acked, (applied, acked)
        b.start()
        await wait_consumed(js, "B", "mesh-b", b, timeout=25)
        counts = await wait_tallies(mesh.endpoint, dict.fromkeys(keys, n), timeout=10)
        assert {k: s["count"] for k, s in counts.items()} == dict.fromkeys(keys, n)
        assert all(s["sum"] == n * (n + 1) // 2 for s in counts.values()), counts
        assert b.stop() == 0
        final = b.final_counts(3)
        assert final["redelivered"] > 0, final  # the killed runs' messages in flight came again
        # at least one kill left messages applied by the mesh but not acked to JetStream
        assert max(applied_unacked) > 0, applied_unacked
    finally:
        await nc.close()


@pytest.mark.timeout(40)
async def test_unmappable_messages_are_dead_lettered_and_do_not_block(
    nats_server: NatsServer, mesh: Cluster, bridge: Any
) -> None:
    """Every kind of unmappable message goes to the dead-letter subject with its reason and
    is terminated; the good messages around them, to the same instance, all arrive in order."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="C", subjects=["c.>"]))
        await js.add_stream(StreamConfig(name="CDLQ", subjects=["dlq.c"]))
        bad = [
            ("c.too-short", b"1", None, "does not spell <namespace>.<name>.<id>"),
            ("c.it.no-such-function.x", b"1", None, "the mesh has no function it/no-such-function"),
            ("c.it.tally.c-good", b"abc", {"Statefun-Value-Type": "io.statefun.types/int"}, "is not a valid"),
            ("c.x", b"1", {"Statefun-Target-Type": "no-namespace", "Statefun-Target-Id": "x"}, "bad target"),
            ("c.it.tally.c-good", b"\xff\xfe", None, "must be UTF-8 text"),
            ("c.it.tally.c-good", b"1", {"Statefun-Value-Type": "not a type"}, "bad Statefun-Value-Type"),
        ]
        n = 30
        seqs = {}
        for i in range(1, n + 1):
            await js.publish("c.it.tally.c-good", str(i).encode())
            if i % 5 == 0:
                subject, data, headers, reason = bad[i // 5 - 1]
                ack = await js.publish(subject, data, headers=headers)
                seqs[ack.seq] = reason

        b = bridge("--stream", "C", "--subject", "c.>", "--durable", "mesh-c", "--dead-letter-subject", "dlq.c")
        b.start()
        ci = await wait_consumed(js, "C", "mesh-c", b, timeout=20)
        assert ci.num_redelivered == 0, ci
        counts = await wait_tallies(mesh.endpoint, {"c-good": n}, timeout=10)
        expect(counts, "c-good", n)

        dead = await js.pull_subscribe("dlq.c", durable="check", stream="CDLQ")
        letters = await dead.fetch(len(bad) + 1, timeout=2.0)
        assert len(letters) == len(bad), [m.headers for m in letters]
        for m in letters:
            seq = int(m.headers["Statefun-Source-Sequence"])
            assert seqs[seq] in m.headers["Statefun-Error"], (seqs[seq], m.headers)
            assert m.headers["Statefun-Source-Subject"].startswith("c.")
        assert b.stop() == 0
        assert b.final_counts(1) == {"bridged": n, "redelivered": 0, "rejected": len(bad), "dead_lettered": len(bad)}
        assert b.log().count("dead-lettered to dlq.c") == len(bad)
    finally:
        await nc.close()


@pytest.mark.timeout(40)
async def test_an_idle_bridge_is_quiet(nats_server: NatsServer, mesh: Cluster, bridge: Any) -> None:
    """Progress lines (every --status-interval 1 s here) only while something moves."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="Q", subjects=["q.>"]))
        await js.publish("q.it.tally.quiet", b"1")
        b = bridge("--stream", "Q", "--subject", "q.>", "--durable", "mesh-q")
        b.start()
        await wait_consumed(js, "Q", "mesh-q", b, timeout=20)
        await asyncio.sleep(4.5)  # four more status intervals with nothing to report
        assert b.stop() == 0
        progress = [line for line in b.log().splitlines() if "nats-ingress: bridged" in line]
        assert len(progress) <= 2, progress  # the message's line (and one still in flight), not one a second
    finally:
        await nc.close()
