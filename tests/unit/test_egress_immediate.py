"""Immediate egress (``egress_immediate``): records visible at commit, with deterministic ids.

A recovery rolls the producing instances back with their checkpoint; the client
messages replayed from the ingress log produce the records again under the same ids,
so a consumer that deduplicates by id sees each record exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, egress_message_builder, message_builder
from tests.meshes import mesh_settings

pytestmark = pytest.mark.timeout(60)


def app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="ei/counter", specs=[ValueSpec(name="count", type=IntType)])
    def counter(context, message):
        count = (context.storage.count or 0) + message.as_int()
        context.storage.count = count
        context.send_egress(egress_message_builder(target_typename="ei/now", value=count, value_type=IntType))
        context.send_egress(egress_message_builder(target_typename="ei/later", value=count, value_type=IntType))
        if context.in_request:
            context.reply(int_value=count)

    return functions


def settings(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    return mesh_settings(tmp_path, **{"egress_immediate": ["ei/now"], "checkpoint_interval": 3600.0, **kw})


async def take(it, n: int, timeout: float = 10.0) -> list:
    out = []
    while len(out) < n:
        out.append(await asyncio.wait_for(it.__anext__(), timeout))
    return out


async def test_immediate_records_are_visible_at_once_with_ids(tmp_path: Path) -> None:
    async with LocalMesh(app(), peers=2, **settings(tmp_path)) as mesh:
        for _ in range(3):
            await mesh.send(message_builder(target_typename="ei/counter", target_id="x", int_value=1))
        await mesh.idle()
        it = mesh.egress("ei/now")
        recs = await take(it, 3)
        await it.aclose()
        assert [r.as_int() for r in recs] == [1, 2, 3]
        assert [r.id for r in recs] == ["ei/counter/x#1", "ei/counter/x#2", "ei/counter/x#3"]
        # the transactional egress waits for a checkpoint (none completes within the hour)
        owner = next(p for p in mesh.peers if p.dispatcher.invocations)
        assert owner.egress_read("ei/later", 0, 10) == []
        assert owner.egress_read("ei/now", 0, 10)[0].id == "ei/counter/x#1"


async def test_ids_count_on_across_batches_from_the_write_back_cache(tmp_path: Path) -> None:
    """The per-instance counter of the ids is state: between two cuts it is in the store's
    write-back cache, not in LMDB, and each batch must read it from there."""
    async with LocalMesh(app(), peers=1, **settings(tmp_path)) as mesh:
        for _ in range(4):  # a batch each
            await mesh.send(message_builder(target_typename="ei/counter", target_id="y", int_value=1))
            await mesh.idle()
        backend = mesh.peers[0].backend
        assert backend.cache  # no cut since: the counter is only in the cache
        it = mesh.egress("ei/now")
        recs = await take(it, 4)
        await it.aclose()
        assert [r.id for r in recs] == [f"ei/counter/y#{i}" for i in (1, 2, 3, 4)]


async def test_a_recovery_reproduces_records_under_the_same_ids(tmp_path: Path) -> None:
    async with LocalMesh(app(), peers=2, **settings(tmp_path)) as mesh:
        coord = mesh.peers[0].coordinator
        keys = [f"k{i}" for i in range(8)]
        for k in keys:
            await mesh.send(message_builder(target_typename="ei/counter", target_id=k, int_value=1))
        await mesh.idle()
        n = coord.trigger()
        deadline = asyncio.get_running_loop().time() + 20
        while coord.last_complete is None or coord.last_complete.checkpoint < n:
            assert asyncio.get_running_loop().time() < deadline, "checkpoint did not complete"
            await asyncio.sleep(0.02)
        it = mesh.egress("ei/now")
        seen = await take(it, len(keys))
        # after the checkpoint: acknowledged (in the ingress log) and emitted at once
        for k in keys:
            await mesh.send(message_builder(target_typename="ei/counter", target_id=k, int_value=1))
        seen += await take(it, len(keys))
        # a recovery rolls back to the checkpoint and replays the second round of sends
        coord.request_recovery("test")
        deadline = asyncio.get_running_loop().time() + 20
        while coord.recoveries < 2 or not all(p.resumed for p in mesh.peers):
            assert asyncio.get_running_loop().time() < deadline, "recovery did not finish"
            await asyncio.sleep(0.02)
        await mesh.idle()
        seen += await take(it, len(keys))  # produced again, read again from the restored head
        await it.aclose()
        for k in keys:
            r = await mesh.request(message_builder(target_typename="ei/counter", target_id=k, int_value=0))
            assert r.as_int() == 2
    ids = [r.id for r in seen]
    assert len(ids) == 3 * len(keys)
    # exactly the ids of two increments per key: the replayed ones repeat, none is new
    assert set(ids) == {f"ei/counter/{k}#{i}" for k in keys for i in (1, 2)}
    by_id: dict[str, set[int]] = {}
    for r in seen:
        by_id.setdefault(r.id, set()).add(r.as_int())
    assert all(len(v) == 1 for v in by_id.values()), by_id  # a repeated id repeats its record
