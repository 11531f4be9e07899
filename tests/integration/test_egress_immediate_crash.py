"""Immediate egress across a SIGKILL: a consumer following through MeshClient, which
deduplicates by record id, sees every increment's record exactly once.

The consumer reads while the mesh runs and a peer is killed; records produced after the
last checkpoint were already delivered, are rolled back and produced again with the
same ids, and the peer moves the reader back to the restored head so none is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import pytest

from statefun_mesh import MeshClient
from tests.integration import crash_app as app
from tests.integration.crash_util import Clients, CrashMesh, probe_ids, reply_json, wait_responsive
from tests.integration.support import gather_bounded

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

KEYS = 40
ROUNDS = 25


async def test_immediate_egress_is_exactly_once_after_dedup_across_a_sigkill(
    crash_meshes: Callable[..., CrashMesh],
) -> None:
    deadline = time.monotonic() + 130
    mesh = crash_meshes(checkpoint_interval=1.0, extra_config=f'egress_immediate = ["{app.INCREMENTS}"]\n')
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    clients = await Clients.connect(mesh.endpoint)
    keys = [f"e{i}" for i in range(KEYS)]
    records: list[Any] = []

    async def consume() -> None:
        # timeout 5: a fetch the killed peer took with it fails after timeout + 2 s (30 s spent 28 s of
        # the test waiting for it); a fetch long-polls 1 s, so 5 s is ample for one that is answered
        async with MeshClient(mesh.endpoint, timeout=5) as c:
            while True:  # a consumer reconnects when its peer goes away, as real ones do
                try:
                    async with contextlib.aclosing(c.egress(app.INCREMENTS)) as it:
                        async for rec in it:
                            records.append(rec)
                except Exception:
                    await asyncio.sleep(0.2)

    consumer = asyncio.create_task(consume())
    try:

        async def send_round(r: int) -> None:
            async def one(i: int, k: str) -> None:
                await clients.send(app.json_message(app.COUNTER, k, {"inc": r}), f"{k}-{r}", first=i, deadline=deadline)

            await gather_bounded((one(i, k) for i, k in enumerate(keys)), 16)

        for r in range(ROUNDS):
            await send_round(r)
            if r == ROUNDS // 2:
                old, _ = mesh.kill_peer(1)
                await asyncio.to_thread(mesh.wait_peer_restarted, 1, old)
                await wait_responsive(
                    mesh.endpoint, probe_ids("probe"), lambda k: app.query(app.COUNTER, k), timeout=60
                )
        counts = {}
        for i, k in enumerate(keys):
            counts[k] = reply_json(await clients.request(app.query(app.COUNTER, k), first=i, deadline=deadline))[
                "count"
            ]
        assert counts == dict.fromkeys(keys, ROUNDS), counts
        while True:
            ids = {rec.id for rec in records if rec.id is not None and rec.id.split("#")[0].endswith(tuple(keys))}
            if len(ids) >= KEYS * ROUNDS or time.monotonic() > deadline - 10:
                break
            await asyncio.sleep(0.2)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await clients.aclose()
    mine = [
        rec
        for rec in records
        if rec.id is not None and rec.id.rsplit("#", 1)[0] in {f"{app.COUNTER}/{k}" for k in keys}
    ]
    expected = {f"{app.COUNTER}/{k}#{n}" for k in keys for n in range(1, ROUNDS + 1)}
    got = {rec.id for rec in mine}
    assert got == expected, f"missing {sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"
    repeated = len(mine) - len(got)
    print(
        f"\n[egress-immediate] {len(mine)} records read, {len(got)} distinct ids, {repeated} re-produced after the kill"
    )
