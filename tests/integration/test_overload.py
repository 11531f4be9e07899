"""Overload: a client offering far more than the mesh can process; memory stays bounded, nothing is lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest

from statefun_mesh import MeshClient, message_builder
from tests.integration import app
from tests.integration.support import Cluster, eventually, gather_bounded, ids_on, memory_kib

pytestmark = pytest.mark.integration

INBOX_LIMIT = 500
CREDIT_WINDOW = 500
CONFIG = f"""
inbox_limit = {INBOX_LIMIT}
credit_window = {CREDIT_WINDOW}
max_batch = 100
max_frame_records = 100
"""
SLOW_MS = 3  # per message: peers 1 and 2 process about 650 messages (13 MB) a second
MESSAGES = 6000
PAYLOAD = 20_000  # bytes per message: 120 MB offered in all
KEYS = 400
GROWTH_LIMIT_MIB = 60


@pytest.mark.timeout(170)
async def test_overload_keeps_peer_memory_bounded_and_applies_every_accepted_message_once(
    start_cluster: Callable[..., Cluster],
) -> None:
    cluster = start_cluster("tcp", config=CONFIG, env={"STATEFUN_MESH_IT_SLOW_MS": str(SLOW_MS)})
    pids = cluster.peer_pids()
    assert sorted(pids) == [0, 1, 2]
    run = uuid.uuid4().hex[:8]
    # Every target lives on peer 1 or 2: peer 0, where the client enters, only admits and
    # forwards, so it could take messages in far faster than the others can apply them.
    keys = ids_on(1, run, KEYS // 2) + ids_on(2, run, KEYS // 2)
    payload = "x" * PAYLOAD

    def message(k: str):
        return message_builder(target_typename=app.SLOW, target_id=k, str_value=payload)

    async def count(client: MeshClient, k: str) -> int:
        reply = await client.request(message_builder(target_typename=app.SLOW, target_id=k, int_value=0), timeout=60)
        return reply.as_int()  # type: ignore[no-any-return]

    async with MeshClient(cluster.endpoint, timeout=150) as client:
        # Warm up (imports, LMDB pages, buffers), then take the baseline.
        await gather_bounded((client.send(message(k)) for k in keys), 50)
        assert await gather_bounded((count(client, k) for k in keys), 50) == [1] * KEYS
        await asyncio.sleep(0.5)
        baseline = {p: memory_kib(pid) for p, pid in pids.items()}
        peak = {p: dict(m) for p, m in baseline.items()}
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                for p, pid in pids.items():
                    for key, value in memory_kib(pid).items():
                        peak[p][key] = max(peak[p].get(key, 0), value)
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        try:
            # 200 concurrent senders, no pacing: the offered load is limited only by admission.
            await gather_bounded((client.send(message(keys[i % KEYS])) for i in range(MESSAGES)), 200)
            accepted = time.monotonic() - started

            async def all_applied() -> bool:
                counts = await gather_bounded((count(client, k) for k in keys), 50)
                return sum(counts) >= KEYS + MESSAGES

            await eventually(all_applied, timeout=120, interval=0.5, what="every accepted message applied")
            processed = time.monotonic() - started
        finally:
            stop.set()
            await sampler
        await asyncio.sleep(0.5)
        counts = await gather_bounded((count(client, k) for k in keys), 50)
    expected = 1 + MESSAGES // KEYS
    wrong = {k: c for k, c in zip(keys, counts, strict=True) if c != expected}
    assert not wrong, f"{len(wrong)} instances with a count other than {expected}: {list(wrong.items())[:5]}"
    growth = {p: (peak[p]["RssAnon"] - baseline[p]["RssAnon"]) // 1024 for p in pids}
    report = (
        f"{MESSAGES} x {PAYLOAD} B accepted in {accepted:.1f} s, applied in {processed:.1f} s; "
        f"peak anonymous RSS growth per peer (MiB): {growth}; peak VmRSS (MiB): "
        f"{ {p: peak[p]['VmRSS'] // 1024 for p in pids} }"
    )
    print(report)
    # The mesh was overloaded: admission, not the client, set the pace.
    assert processed > 0.8 * MESSAGES * SLOW_MS / 1000 / 2, report
    assert accepted > 0.5 * processed, f"the client was not held back: {report}"
    assert max(growth.values()) < GROWTH_LIMIT_MIB, report
