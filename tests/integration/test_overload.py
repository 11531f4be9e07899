"""Overload: a client offering far more than the mesh can process; memory stays bounded, nothing is lost."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from statefun_mesh import MeshClient, message_builder
from statefun_mesh.errors import RequestTimeoutError, StatefunMeshError
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


# -- 10x overload, with fan-out, on a memory budget (issue 12 item 5) -------------------------

BUDGET_MIB = 16
TEN_X_PAYLOAD = 1_000  # bytes per client message
FANOUT_EVERY = 10  # every 10th client message is an it/tree root ...
FANOUT_K = 100  # ... making 100 messages (of TEN_X_PAYLOAD bytes) spread over the peers, each one more
TEN_X_CONFIG = f"""
memory_budget = {BUDGET_MIB << 20}
inbox_limit = 1000
credit_window = 500
max_frame_records = 100
checkpoint_interval = 600.0
"""
#: What a peer may hold, from its settings: queued and in-flight messages within
#: memory_budget; client sends parked at its client endpoint, waiting for admission
#: (at most server.MAX_PARKED of them); one credit window in flight on each channel;
#: plus the interpreter's and allocator's own overhead on all that (Python objects per
#: message, freed-but-kept arenas): OVERHEAD_MIB. Measured: peer 0 grew 23-26 MiB in all
#: (10,000 parked sends included), the others 8-9 MiB; the bound is 76 MiB.
OVERHEAD_MIB = 48


def ten_x_bound_mib() -> int:
    from statefun_mesh.server import MAX_PARKED

    message = TEN_X_PAYLOAD + 200  # payload, ids, type names, framing
    parked = MAX_PARKED * message
    in_flight = 2 * 500 * message  # credit_window on each of 2 incoming channels
    return BUDGET_MIB + (parked + in_flight) // (1 << 20) + OVERHEAD_MIB


async def run_ten_x(
    start_cluster: Callable[..., Cluster],
    *,
    total: int,
    slow_ms: float,
    drain_timeout: float,
    client_timeout: float = 90.0,
) -> None:
    """Offer ``total`` client messages at 10x what peers 1 and 2 can apply at best (``it/slow``
    blocks them ``slow_ms`` per message), every 10th one fanning out; then check memory,
    backpressure and exactly-once (see the constants above)."""
    cluster = start_cluster("ipc", config=TEN_X_CONFIG, env={"STATEFUN_MESH_IT_SLOW_MS": str(slow_ms)})
    pids = cluster.peer_pids()
    run = uuid.uuid4().hex[:8]
    keys = ids_on(1, run, 100) + ids_on(2, run, 100)
    capacity = 2 * 1000 / slow_ms  # it/slow messages a second, at best (peers 1 and 2 sleeping only)
    rate = 10 * capacity
    payload = "x" * TEN_X_PAYLOAD
    doc = {"depth": 1, "k": FANOUT_K, "pad": payload}

    def message(i: int) -> Any:
        if i % FANOUT_EVERY == 0:
            return app.json_message(app.TREE, f"{run}-t{i}", dict(doc, root=f"{run}-t{i}"))
        return message_builder(target_typename=app.SLOW, target_id=keys[i % len(keys)], str_value=payload)

    async def slow_count(client: MeshClient, k: str) -> int:
        reply = await client.request(message_builder(target_typename=app.SLOW, target_id=k, int_value=0), timeout=30)
        return reply.as_int()  # type: ignore[no-any-return]

    async def tree_count(client: MeshClient, root: str) -> int:
        reply = await client.request(
            message_builder(target_typename=app.COUNTER, target_id=f"tree:{root}", int_value=0), timeout=30
        )
        return reply.as_int()  # type: ignore[no-any-return]

    # A send waits (parked) while the peer is over its limits, and MeshClient retries a
    # MeshBusyError within its timeout: client_timeout is longer than the backlog takes to
    # drain (the last sends wait that long: that is backpressure), so a timeout here means
    # a send was stuck, not slow.
    async with MeshClient(cluster.endpoint, timeout=client_timeout) as client:
        endpoints = (await client.info())["client_endpoints"]
        watchers = [MeshClient(ep, timeout=10) for ep in endpoints]
        for w in watchers:
            await w.__aenter__()
        try:
            # warm up: imports, LMDB pages, buffers
            await gather_bounded((client.send(message(i)) for i in range(1, 50) if i % FANOUT_EVERY), 16)
            await client.send(app.json_message(app.TREE, f"{run}-warm", dict(doc, root="warm", k=10)))
            await asyncio.sleep(1.0)
            baseline = {p: memory_kib(pid) for p, pid in pids.items()}
            peak = {p: dict(m) for p, m in baseline.items()}
            warm = sum([(await w.info())["status"]["busy_refusals"] for w in watchers])
            stop = asyncio.Event()
            parked_peak = 0
            spilled_peak = 0

            async def sample() -> None:
                nonlocal parked_peak, spilled_peak
                while not stop.is_set():
                    for p, pid in pids.items():
                        for key, value in memory_kib(pid).items():
                            peak[p][key] = max(peak[p].get(key, 0), value)
                    try:
                        sts = [(await w.info())["status"] for w in watchers]
                    except StatefunMeshError:
                        sts = []  # a peer too busy to answer in time: sample memory anyway
                    if sts:
                        parked_peak = max(parked_peak, sts[0]["parked_sends"])
                        spilled_peak = max(spilled_peak, max(st["spilled"] for st in sts))
                    await asyncio.sleep(0.05)

            timeouts = 0
            acked: list[float] = []

            async def send(i: int) -> None:
                nonlocal timeouts
                try:
                    await client.send(message(i), idempotency_key=f"{run}-{i}")
                except RequestTimeoutError:
                    timeouts += 1
                    raise
                acked.append(time.monotonic())

            sampler = asyncio.create_task(sample())
            started = time.monotonic()
            tasks: list[asyncio.Task[None]] = []
            try:
                # open loop: issue at 10x the mesh's best rate, whatever the acknowledgements do
                for i in range(total):
                    tasks.append(asyncio.create_task(send(i)))
                    ahead = started + (i + 1) / rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                    elif i % 200 == 0:
                        await asyncio.sleep(0)
                issued = time.monotonic() - started
                results = await asyncio.gather(*tasks, return_exceptions=True)
                accepted = time.monotonic() - started
                failures = [r for r in results if isinstance(r, BaseException)]
                assert not failures, f"{len(failures)} sends failed ({timeouts} timeouts), e.g. {failures[:3]!r}"

                want_slow = Counter(keys[i % len(keys)] for i in range(total) if i % FANOUT_EVERY)
                want_slow.update(keys[i % len(keys)] for i in range(1, 50) if i % FANOUT_EVERY)
                roots = [f"{run}-t{i}" for i in range(0, total, FANOUT_EVERY)]

                async def all_applied() -> bool:
                    counts = await gather_bounded((slow_count(client, k) for k in keys), 50)
                    trees = await gather_bounded((tree_count(client, r) for r in roots), 50)
                    return sum(counts) >= sum(want_slow.values()) and sum(trees) >= FANOUT_K * len(roots)

                await eventually(
                    all_applied, timeout=drain_timeout, interval=0.5, what="every accepted message applied"
                )
                processed = time.monotonic() - started
            finally:
                stop.set()
                await sampler
            await asyncio.sleep(1.0)
            counts = dict(zip(keys, await gather_bounded((slow_count(client, k) for k in keys), 50), strict=True))
            trees = dict(zip(roots, await gather_bounded((tree_count(client, r) for r in roots), 50), strict=True))
            busy = sum([(await w.info())["status"]["busy_refusals"] for w in watchers]) - warm
        finally:
            for w in watchers:
                await w.__aexit__(None, None, None)
    wrong = {k: (counts[k], want_slow[k]) for k in keys if counts[k] != want_slow[k]}
    wrong_trees = {r: c for r, c in trees.items() if c != FANOUT_K}
    growth = {p: (peak[p]["RssAnon"] - baseline[p]["RssAnon"]) // 1024 for p in pids}
    bound = ten_x_bound_mib()
    # offered: new messages issued a second; with a long backlog the client itself is held
    # back (tens of thousands of sends waiting, refused ones retried), so also count the
    # attempts it made, refused ones included, over the time until all were acknowledged
    offered = max(total / issued, (total + busy) / accepted)
    served = total / processed
    lat = sorted(b - started for b in acked)
    measured = {
        "messages": total,
        "fanned_out": FANOUT_K * len(roots) * 2,
        "offered_per_s": round(offered),
        "issued_per_s": round(total / issued),
        "attempts_per_s": round((total + busy) / accepted),
        "applied_per_s": round(served),
        "overload_x": round(offered / served, 1),
        "issued_s": round(issued, 1),
        "all_acked_s": round(accepted, 1),
        "all_applied_s": round(processed, 1),
        "busy_refusals": busy,
        "parked_peak": parked_peak,
        "spilled_peak": spilled_peak,
        "timeouts": timeouts,
        "rss_anon_growth_mib": growth,
        "bound_mib": bound,
        "peak_vmrss_mib": {p: peak[p]["VmRSS"] // 1024 for p in pids},
        "ack_p50_s": round(lat[len(lat) // 2], 2) if lat else -1,
    }
    print(f"MEASURED overload-10x: {json.dumps(measured)}")
    assert not wrong, f"{len(wrong)} it/slow instances counted other than sent (got, sent): {list(wrong.items())[:5]}"
    assert not wrong_trees, f"{len(wrong_trees)} fan-outs not applied {FANOUT_K} times: {list(wrong_trees.items())[:5]}"
    # the clients really offered far more than the mesh could take, and were held back, not failed
    assert offered / served >= 5, measured
    assert parked_peak > 0, f"no client send was ever held back: {measured}"
    # more than a peer parks (server.MAX_PARKED) were offered: the rest got MeshBusyError, retried by MeshClient
    assert busy > 0, f"no client send was refused with MeshBusyError: {measured}"
    assert max(growth.values()) < bound, f"a peer's memory grew past {bound} MiB: {measured}"


@pytest.mark.timeout(150)
async def test_ten_times_overload_with_fan_out_stays_under_the_memory_bound(
    start_cluster: Callable[..., Cluster],
) -> None:
    """13,000 client messages (more than a peer parks: some get MeshBusyError) in about 40 s."""
    await run_ten_x(start_cluster, total=13_000, slow_ms=3, drain_timeout=100)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_ten_times_overload_60k_messages(start_cluster: Callable[..., Cluster]) -> None:
    """60,000 client messages, each it/slow one blocking its peer 6 ms: some 4-6 minutes of
    backlog, which the last sends wait out (a client offering this much for this long needs a
    send timeout longer than the backlog; with 90 s, 6,735 of them timed out). FAILS NOW AND
    THEN: in one run 84 sends never got an answer although the mesh was idle, nothing parked
    (acknowledgements lost; suspected: the client endpoint's ROUTER drops replies at its send
    high-water mark, ROUTER_MANDATORY being off)."""
    await run_ten_x(start_cluster, total=60_000, slow_ms=6, drain_timeout=700, client_timeout=700)
