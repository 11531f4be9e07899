"""One invocation's own sends inside memory_budget (issue 7 item 5): the outbox.

A synchronous invocation's sends past a sixteenth of the budget go to disk as part of
its batch: dropped if it raises or the batch rolls back, routed in order after the
commit as outgoing room and the inbox allow, and included in a checkpoint's cut.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, message_builder
from statefun_mesh.context import Context, Storage
from statefun_mesh.outbox import Outbox
from statefun_mesh.spill import Spill
from tests.meshes import checkpoint_then_recover


def ctx(outbox: Outbox) -> Context:
    from statefun_mesh.address import Address

    c = Context(Address("t/src", "a"), ("t/src", "a", "", "", "t/v", b"", 0, 0), Storage(Address("t/src", "a"), {}))
    c._outbox = outbox
    c._room = outbox.stage_bytes  # as the dispatch loop sets it
    return c


def send(c: Context, i: int, size: int = 10) -> None:
    c.send(message_builder(target_typename="t/dst", target_id=f"d{i}", str_value="x" * size))


def drain(outbox: Outbox) -> list[str]:
    out = []
    while True:
        chunk = outbox.pop()
        if not chunk:
            return out
        out.extend(r[1] for r in chunk)


def test_staged_sends_commit_in_emitted_order_and_a_failed_invocation_leaves_nothing(tmp_path: Path) -> None:
    outbox = Outbox(str(tmp_path / "ob"), stage_bytes=4096)
    try:
        outbox.begin()
        mem: list[Any] = [("t/dst", "m0", "", "", "t/v", b"", 0, 0)]  # emitted by an earlier invocation
        a = ctx(outbox)
        for i in range(105):  # ~ 105 x 420 bytes: staged every 10
            send(a, i)
        assert outbox.staging and a._sends is not None and len(a._sends) == 5
        outbox.emitted(a, mem)
        mem.extend(a._sends or [])
        failed = ctx(outbox)
        for i in range(1000, 1100):
            send(failed, i)
        assert outbox.staged_total > 105  # it staged too, and then "raised": never emitted
        b = ctx(outbox)
        for i in range(200, 230):
            send(b, i)
        outbox.emitted(b, mem)
        mem.extend(b._sends or [])
        mem.append(("t/dst", "last", "", "", "t/v", b"", 0, 0))
        assert outbox.commit(mem)
        assert outbox.count == 1 + 105 + 30 + 1
        assert drain(outbox) == ["m0", *(f"d{i}" for i in range(105)), *(f"d{i}" for i in range(200, 230)), "last"]
        assert outbox.count == 0
        # nothing staged and nothing waiting: the caller routes the sends itself
        outbox.begin()
        assert not outbox.commit([("t/dst", "x", "", "", "t/v", b"", 0, 0)])
        # a batch that rolls back (the next begin()) leaves nothing behind
        c = ctx(outbox)
        for i in range(100):
            send(c, i)
        outbox.emitted(c, [])
        outbox.begin()
        assert not outbox.staging and not outbox.commit([]) and outbox.count == 0
    finally:
        outbox.close()


def test_while_sends_wait_in_the_outbox_later_batches_queue_behind_them_and_a_cut_sees_them(tmp_path: Path) -> None:
    outbox = Outbox(str(tmp_path / "ob"), stage_bytes=4096)
    try:
        outbox.begin()
        a = ctx(outbox)
        for i in range(50):
            send(a, i)
        outbox.emitted(a, [])
        assert outbox.commit(list(a._sends or []))
        first = outbox.pop()
        outbox.begin()
        later = [("t/dst", "later", "", "", "t/v", b"", 0, 0)]
        assert outbox.commit(later)  # behind what waits, not routed around it
        txn = outbox.cut()
        assert txn is not None
        try:
            cut = [r[1] for r in Outbox.records(txn)]
            packed = sum(n for n, _ in Spill.packed(txn))
        finally:
            txn.abort()
        rest = drain(outbox)
        assert [r[1] for r in first] + rest == [*(f"d{i}" for i in range(50)), "later"]
        assert cut == rest and packed == len(rest)
        assert outbox.cut() is None
    finally:
        outbox.close()


def burst_functions(n: int, value: str = "") -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="ob/burst")
    def burst(context, message):  # type: ignore[no-untyped-def]
        for i in range(n):
            context.send(message_builder(target_typename="ob/seq", target_id=f"s{i % 10}", str_value=f"{i}{value}"))
        if message.as_int() < 0:
            raise ValueError("this invocation fails after sending")

    @functions.bind(typename="ob/seq", specs=[ValueSpec(name="n", type=IntType), ValueSpec(name="bad", type=IntType)])
    def seq(context, message):  # type: ignore[no-untyped-def]
        if context.in_request:
            context.reply(int_value=(context.storage.n or 0) * 1000 + (context.storage.bad or 0))
            return
        i = int(message.as_string().rstrip("v"))
        # every sender's messages to one address arrive in the order sent: i, i + 10, ...
        expected = (context.storage.n or 0) * 10 + int(context.address.id[1:])
        if i != expected:
            context.storage.bad = (context.storage.bad or 0) + 1
        context.storage.n = (context.storage.n or 0) + 1

    return functions


async def seq_totals(mesh: LocalMesh) -> tuple[int, int]:
    total = bad = 0
    for k in range(10):
        reply = await mesh.request(message_builder(target_typename="ob/seq", target_id=f"s{k}", int_value=0))
        total += reply.as_int() // 1000
        bad += reply.as_int() % 1000
    return total, bad


@pytest.mark.parametrize("peers", [1, 2])
async def test_one_invocation_sending_many_messages_stays_inside_the_budget(tmp_path: Path, peers: int) -> None:
    """A sync invocation's sends used to stay in memory (tuples, then frames) until they were
    routed: 40,000 sends held ~12 MB of Python objects on a 1 MiB budget. Now it holds a
    sixteenth of the budget before they go to the outbox, and the peer routes them from
    there as room allows: every message arrives once, in order per address. (The issue's
    200,000: ``python bench/outbox_rss.py``.)"""
    n, budget = 40_000, 1 << 20
    async with LocalMesh(burst_functions(n, "v" * 100), peers=peers, state_dir=tmp_path, memory_budget=budget) as mesh:
        tracemalloc.start()
        try:
            await mesh.send(message_builder(target_typename="ob/burst", target_id="b", int_value=0))
            await asyncio.wait_for(mesh.idle(), 300)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert await seq_totals(mesh) == (n, 0)
        assert all(p.status()["memory"]["outbox"] == 0 for p in mesh.peers)
        assert sum(p.status()["memory"]["outbox_staged_total"] for p in mesh.peers) > n // 2
    assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB while one invocation sent {n} messages"


async def test_an_invocation_that_raises_after_staging_sends_sends_nothing(tmp_path: Path) -> None:
    n = 20_000
    async with LocalMesh(burst_functions(n), state_dir=tmp_path, memory_budget=1 << 20) as mesh:
        await mesh.send(message_builder(target_typename="ob/burst", target_id="bad", int_value=-1))
        await mesh.send(message_builder(target_typename="ob/burst", target_id="good", int_value=1))
        await asyncio.wait_for(mesh.idle(), 120)
        assert await seq_totals(mesh) == (n, 0)
        assert mesh.peers[0].status()["memory"]["outbox_staged_total"] >= n


async def test_sends_waiting_in_the_outbox_at_a_cut_are_restored_by_a_recovery(tmp_path: Path) -> None:
    """A checkpoint cut while committed sends wait in the outbox writes them in the inflight
    object (they are for any peer); a recovery to that checkpoint routes them again, and
    every message is applied once, in order per address."""
    n = 60_000
    async with LocalMesh(
        burst_functions(n, "v" * 200),
        peers=2,
        state_dir=tmp_path / "s",
        blob_store=f"file://{tmp_path / 'b'}",
        checkpoint_interval=3600,
        memory_budget=1 << 20,
    ) as mesh:
        await mesh.send(message_builder(target_typename="ob/burst", target_id="b", int_value=0))
        for _ in range(3000):
            if any(p.router.outbox.count > n // 4 for p in mesh.peers):
                break
            await asyncio.sleep(0.002)
        else:
            raise AssertionError("the burst never waited in an outbox")
        await checkpoint_then_recover(mesh, n // 8)
        assert await seq_totals(mesh) == (n, 0)


def test_a_commit_the_disk_cannot_take_hands_everything_back_in_order(tmp_path: Path) -> None:
    """The outbox's map cannot grow (standing in for a full disk): the commit fails, and
    :meth:`Outbox.abandon` gives back what waited, what was staged and the batch's sends,
    in order, to route at once; the outbox then starts afresh."""
    from statefun_mesh.errors import StatefunMeshError

    outbox = Outbox(str(tmp_path / "ob"), stage_bytes=16 << 10, map_size=256 << 10, max_size=256 << 10)
    try:
        outbox.begin()
        a = ctx(outbox)
        for i in range(50):
            send(a, i)
        mem: list[Any] = [("t/dst", "m0", "", "", "t/v", b"", 0, 0)]
        outbox.emitted(a, mem)
        mem.extend(a._sends or [])
        mem.extend(("t/dst", f"big{i}", "", "", "t/v", b"x" * (64 << 10), 0, 0) for i in range(8))  # 512 KiB
        with pytest.raises(StatefunMeshError):
            outbox.commit(mem)
        got = [r[1] for piece in outbox.abandon(mem) for r in piece]
        assert got == ["m0", *(f"d{i}" for i in range(50)), *(f"big{i}" for i in range(8))]
        assert outbox.count == 0 and not outbox.staging and outbox.cut() is None
        outbox.begin()
        b = ctx(outbox)
        for i in range(50):
            send(b, i)
        outbox.emitted(b, [])
        assert outbox.commit(list(b._sends or [])) and drain(outbox) == [f"d{i}" for i in range(50)]
    finally:
        outbox.close()
