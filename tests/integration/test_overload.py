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

INBOX_LIMIT = 200
CREDIT_WINDOW = 200
MAX_BATCH = 100
MAX_FRAME_RECORDS = 100
SENDERS = 200  # concurrent client sends
CONFIG = f"""
inbox_limit = {INBOX_LIMIT}
credit_window = {CREDIT_WINDOW}
max_batch = {MAX_BATCH}
max_frame_records = {MAX_FRAME_RECORDS}
"""
#: The most messages acknowledged to the client but not yet applied, by construction:
#: peer 0 takes sends in only while under its inbox limit (its ingress log append
#: included); each owner holds at most its inbox limit plus one credit window in flight
#: to it, overdrawn by at most one frame, plus the batch it is applying.
BACKLOG_BOUND = INBOX_LIMIT + 2 * (INBOX_LIMIT + CREDIT_WINDOW + MAX_FRAME_RECORDS + MAX_BATCH)
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
        endpoints = (await client.info())["client_endpoints"]
        owners = [MeshClient(endpoints[p], timeout=150) for p in (1, 2)]
        # peer 0 keeps answering while its client endpoint holds sends back
        watcher = MeshClient(cluster.endpoint, timeout=10)
        for c in [*owners, watcher]:
            await c.__aenter__()

        async def applied() -> int:
            # peers 1 and 2 answer between batches, not behind their inboxes
            return sum([(await c.info())["status"]["invocations"] for c in owners])

        try:
            # Warm up (imports, LMDB pages, buffers), then take the baseline.
            await gather_bounded((client.send(message(k)) for k in keys), 50)
            assert await gather_bounded((count(client, k) for k in keys), 50) == [1] * KEYS
            await asyncio.sleep(0.5)
            baseline = {p: memory_kib(pid) for p, pid in pids.items()}
            peak = {p: dict(m) for p, m in baseline.items()}
            applied_before = await applied()
            acked = 0
            backlog_peak = 0
            parked_peak = 0
            stop = asyncio.Event()

            async def sample() -> None:
                nonlocal backlog_peak, parked_peak
                while not stop.is_set():
                    for p, pid in pids.items():
                        for key, value in memory_kib(pid).items():
                            peak[p][key] = max(peak[p].get(key, 0), value)
                    # acked first: anything acknowledged before this read, and not yet
                    # counted as applied by the read after it, was queued somewhere
                    seen = acked
                    backlog_peak = max(backlog_peak, seen - (await applied() - applied_before))
                    parked_peak = max(parked_peak, (await watcher.info())["status"]["parked_sends"])
                    await asyncio.sleep(0.05)

            async def send(i: int) -> None:
                nonlocal acked
                await client.send(message(keys[i % KEYS]))
                acked += 1

            sampler = asyncio.create_task(sample())
            started = time.monotonic()
            try:
                # SENDERS concurrent senders, no pacing: the offered load is limited only by admission.
                await gather_bounded((send(i) for i in range(MESSAGES)), SENDERS)
                accepted = time.monotonic() - started
            finally:
                stop.set()
                await sampler

            async def all_applied() -> bool:
                counts = await gather_bounded((count(client, k) for k in keys), 50)
                return sum(counts) >= KEYS + MESSAGES

            await eventually(all_applied, timeout=120, interval=0.5, what="every accepted message applied")
            processed = time.monotonic() - started
            await asyncio.sleep(0.5)
            counts = await gather_bounded((count(client, k) for k in keys), 50)
        finally:
            for c in [*owners, watcher]:
                await c.__aexit__(None, None, None)
    expected = 1 + MESSAGES // KEYS
    wrong = {k: c for k, c in zip(keys, counts, strict=True) if c != expected}
    assert not wrong, f"{len(wrong)} instances with a count other than {expected}: {list(wrong.items())[:5]}"
    growth = {p: (peak[p]["RssAnon"] - baseline[p]["RssAnon"]) // 1024 for p in pids}
    report = (
        f"{MESSAGES} x {PAYLOAD} B accepted in {accepted:.1f} s, applied in {processed:.1f} s; "
        f"peak backlog {backlog_peak} messages acknowledged but not applied (bound {BACKLOG_BOUND}), "
        f"{parked_peak} sends held back at peer 0; "
        f"peak anonymous RSS growth per peer (MiB): {growth}; peak VmRSS (MiB): "
        f"{ {p: peak[p]['VmRSS'] // 1024 for p in pids} }"
    )
    print(report)
    # The mesh was overloaded (it needs this long just to sleep), and admission, not the
    # client, set the pace: what was acknowledged and not yet applied never exceeded what
    # the inbox limits and credit windows allow, whatever the machine's speed.
    assert processed > 0.8 * MESSAGES * SLOW_MS / 1000 / 2, report
    assert backlog_peak <= BACKLOG_BOUND, f"the client was not held back: {report}"
    assert backlog_peak > 0, f"the sampler never saw a backlog: {report}"
    assert parked_peak > 0, f"peer 0 never held a send back: {report}"
    assert max(growth.values()) < GROWTH_LIMIT_MIB, report
