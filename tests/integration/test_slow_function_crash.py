"""Exactly-once with a parked async invocation: ``statefun-mesh run`` with 3 peer
processes; an ``async`` function awaits 6 s on one address while other addresses keep
flowing and checkpoints keep completing; the checkpoint cut while it is parked holds
its message as unprocessed input; its peer is SIGKILLed before it returns, and after the
recovery every message (the parked one, those queued behind it, the others) is applied
exactly once, in order per address."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from statefun_mesh import MeshClient
from statefun_mesh.snapshot.format import decode_object
from tests.integration import crash_app as app
from tests.integration.crash_util import Clients, CrashMesh, probe_ids, reply_json, wait_log, wait_responsive
from tests.integration.support import read_egress

pytestmark = pytest.mark.integration

SLEEP_MS = 6000
SLOW_PEER = 1


@pytest.fixture
def mesh(crash_meshes: Callable[..., CrashMesh]) -> CrashMesh:
    return crash_meshes()


async def wait_new_manifests(mesh: CrashMesh, base: int, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ids = [n for n in mesh.manifests() if n > base]
        if len(ids) >= count or time.monotonic() > deadline:
            return ids
        await asyncio.sleep(0.05)


@pytest.mark.timeout(150)
async def test_checkpoint_and_sigkill_while_an_invocation_is_parked(mesh: CrashMesh) -> None:
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    clients = await Clients.connect(mesh.endpoint)
    deadline = time.monotonic() + 120
    slow_id = probe_ids("slow")[SLOW_PEER]  # owned by peer 1
    fast_ids = [f"f{j}" for j in range(12)]
    try:
        # a first checkpoint, so that the mesh is steady
        first = await wait_new_manifests(mesh, -1, 1, 30)
        assert first, mesh.log()[-3000:]
        base = mesh.manifests()[-1]

        def slow(seq: int, sleep_ms: int = 0) -> Any:
            return app.json_message(app.SLOW_COUNTER, slow_id, {"inc": f"s{seq}", "seq": seq, "sleep_ms": sleep_ms})

        await clients.send(slow(0, SLEEP_MS), "s0", deadline=deadline)
        t_slow = time.monotonic()
        for seq in range(1, 6):  # queue behind the parked invocation, in order
            await clients.send(slow(seq), f"s{seq}", deadline=deadline)

        # other addresses flow meanwhile, also those of the slow address's peer
        sent: Counter[str] = Counter()
        latencies: list[float] = []
        async with MeshClient(mesh.endpoint, timeout=10) as c:
            for i in range(60):
                key = fast_ids[i % len(fast_ids)]
                await clients.send(app.json_message(app.COUNTER, key, {"inc": f"c{i}"}), f"c{i}", deadline=deadline)
                sent[key] += 1
                if i % 10 == 0:
                    for pid in probe_ids("fastprobe"):
                        t = time.monotonic()
                        await c.request(app.query(app.COUNTER, pid), timeout=10)
                        latencies.append(time.monotonic() - t)
        assert max(latencies) < 1.0, f"requests waited up to {max(latencies):.2f} s behind a slow address"

        # checkpoints keep completing while the invocation awaits (they waited for it before)
        new = await wait_new_manifests(mesh, base, 2, SLEEP_MS / 1000 - 2.5)
        elapsed = time.monotonic() - t_slow
        assert len(new) >= 2 and elapsed < SLEEP_MS / 1000 - 1.0, (
            f"{len(new)} checkpoints completed in {elapsed:.1f} s while an invocation was parked"
        )
        # the newest cut holds the parked message, and those behind it, as unprocessed input
        part = mesh.manifest(new[-1])["parts"][SLOW_PEER]
        _, _, entries = decode_object(mesh.blobs.read(part["inflight"]["name"]))
        held = [json.loads(e[5])["seq"] for e in entries if e[0] == app.SLOW_COUNTER and e[1] == slow_id]
        assert held == [0, 1, 2, 3, 4, 5], held

        # SIGKILL the slow address's peer while the invocation is still parked
        assert time.monotonic() - t_slow < SLEEP_MS / 1000 - 0.5
        old, _ = mesh.kill_peer(SLOW_PEER)
        await asyncio.to_thread(mesh.wait_peer_restarted, SLOW_PEER, old)
        await wait_responsive(mesh.endpoint, probe_ids("probe"), lambda i: app.query(app.COUNTER, i), timeout=60)

        # after the recovery (and the replayed 6 s await): each message exactly once, in order
        state: dict[str, Any] = {}
        settle = time.monotonic() + 40
        while time.monotonic() < settle:
            r = await clients.request(app.query(app.SLOW_COUNTER, slow_id), deadline=deadline)
            state = reply_json(r)
            if state["count"] >= 6:
                break
            await asyncio.sleep(0.5)
        assert state == {"count": 6, "order": [0, 1, 2, 3, 4, 5]}, state
        for key in fast_ids:
            r = await clients.request(app.query(app.COUNTER, key), deadline=deadline)
            assert reply_json(r)["count"] == sent[key], (key, reply_json(r), sent[key])

        # egress: every increment exactly once, once a checkpoint covers them
        await wait_new_manifests(mesh, mesh.manifests()[-1], 2, 30)
        async with MeshClient(mesh.endpoint, timeout=10) as c:
            records = await read_egress(c, app.INCREMENTS, idle=3.0, timeout=40)
        seen = Counter(r.as_string() for r in records)
        expected = {f"{slow_id}|s{s}" for s in range(6)} | {f"f{i % 12}|c{i}" for i in range(60)}
        assert {v for v, n in seen.items() if n > 1} == set()
        assert set(seen) == expected, (expected - set(seen), set(seen) - expected)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- launcher log (tail) ---\n{mesh.log()[-4000:]}") from None
    finally:
        await clients.aclose()


@pytest.mark.timeout(120)
async def test_a_blocked_peer_is_named_and_not_recovered(mesh: CrashMesh) -> None:
    """A sync function blocks peer 1's event loop for 8 s (past heartbeat_timeout, 5 s):
    the watchdog names it in the log, the other peers report peer 1 unavailable but start
    no recovery round, peer 1 does not accuse the others afterwards, and every message
    is applied once."""
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    clients = await Clients.connect(mesh.endpoint)
    deadline = time.monotonic() + 100
    blocked_id = probe_ids("blocked")[SLOW_PEER]
    try:
        await wait_new_manifests(mesh, -1, 1, 30)
        rounds_before = mesh.log().count("recovery round")
        await clients.send(app.json_message(app.BLOCKER, blocked_id, {"block_ms": 8000}), "b0", deadline=deadline)
        line = await asyncio.to_thread(
            wait_log,
            mesh,
            r"peer 1: sync function cr/blocker \(address cr/blocker/[^)]*\) has held the event loop",
            timeout=10,
        )
        assert blocked_id in line
        await asyncio.to_thread(wait_log, mesh, r"no word from peer 1 for", timeout=15)
        await asyncio.to_thread(wait_log, mesh, r"cr/blocker/[^)]*\) held the event loop for [0-9.]+ s", timeout=15)
        await clients.send(app.json_message(app.BLOCKER, blocked_id, {"block_ms": 0}), "b1", deadline=deadline)
        for _ in range(100):
            r = await clients.request(app.query(app.BLOCKER, blocked_id), deadline=deadline)
            if reply_json(r)["count"] == 2:
                break
            await asyncio.sleep(0.1)
        assert reply_json(r)["count"] == 2
        await asyncio.to_thread(wait_log, mesh, r"peer 1 is reachable again", timeout=10)
        log = mesh.log()
        assert log.count("recovery round") == rounds_before, "a blocked peer started a recovery round"
        assert not re.search(r"peer 1: no word from peer", log), "the blocked peer accused the others"
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- launcher log (tail) ---\n{mesh.log()[-4000:]}") from None
    finally:
        await clients.aclose()
