"""memory_budget: the inbox spill, batch deferral, and the settings (issue 7 item 5)."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from pathlib import Path

import pytest

from statefun_mesh import IntType, LocalMesh, MeshConfig, StatefulFunctions, ValueSpec, message_builder
from statefun_mesh.errors import ConfigError
from statefun_mesh.memory import malloc_trim, records_bytes
from statefun_mesh.snapshot.format import PackedEntries, decode_object, encode_object
from statefun_mesh.spill import Spill


def rec(i: int, size: int = 10) -> tuple:
    return ("t/f", f"id-{i}", "", "", "t/v", bytes([i % 256]) * size, 0, 0)


def test_spill_is_a_fifo_of_chunks_and_clears(tmp_path: Path) -> None:
    spill = Spill(str(tmp_path / "spill"))
    try:
        spill.push([rec(i) for i in range(5)])
        spill.push([rec(i) for i in range(5, 8)])
        assert spill.count == 8
        assert spill.pop() == [rec(i) for i in range(5)]
        spill.push([rec(8)])
        assert spill.pop() == [rec(i) for i in range(5, 8)]
        assert spill.pop() == [rec(8)]
        assert spill.pop() == [] and spill.count == 0
        spill.push([rec(9)])
        spill.clear()
        assert spill.count == 0 and spill.pop() == [] and spill.cut() is None
    finally:
        spill.close()


@pytest.mark.parametrize("n", [1, 15, 16, 1000, 70_000])
def test_spilled_chunks_copy_into_a_checkpoint_object_as_if_packed_one_by_one(tmp_path: Path, n: int) -> None:
    """The checkpoint copies spilled chunks without decoding them (every msgpack array header size)."""
    spill = Spill(str(tmp_path / "spill"))
    try:
        records = [rec(i, 3) for i in range(n)]
        spill.push(records)
        txn = spill.cut()
        assert txn is not None
        try:
            packed = [PackedEntries(k, data) for k, data in Spill.packed(txn)]
            assert list(Spill.records(txn)) == records
        finally:
            txn.abort()
        data, count = encode_object("inflight", {"x": 1}, [list(rec(-1)), *packed])
        expected, _ = encode_object("inflight", {"x": 1}, [list(r) for r in [rec(-1), *records]])
        assert count == n + 1 and data == expected
        _, _, entries = decode_object(data)
        assert [tuple(e) for e in entries][1:] == records
    finally:
        spill.close()


def test_memory_budget_setting_is_checked() -> None:
    assert MeshConfig().memory_budget == 256 << 20
    with pytest.raises(ConfigError, match="memory_budget"):
        MeshConfig(memory_budget=1000)


def test_records_bytes_counts_ids_values_and_overhead() -> None:
    assert records_bytes([rec(0, 100), rec(1, 0)]) == 100 + 4 + 4 + 2 * 400
    assert isinstance(malloc_trim(), bool)


def fan_out_functions(k: int) -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="mb/root")
    def root(context, message):  # type: ignore[no-untyped-def]
        for i in range(k):
            context.send(
                message_builder(target_typename="mb/leaf", target_id=f"{context.address.id}.{i}", str_value="x" * 2000)
            )

    @functions.bind(typename="mb/leaf")
    def leaf(context, message):  # type: ignore[no-untyped-def]
        context.send(
            message_builder(target_typename="mb/count", target_id=context.address.id.split(".")[0], int_value=1)
        )

    @functions.bind(typename="mb/count", specs=[ValueSpec(name="n", type=IntType)])
    def count(context, message):  # type: ignore[no-untyped-def]
        context.storage.n = (context.storage.n or 0) + message.as_int()
        if context.in_request and context.caller is None:
            context.reply(int_value=context.storage.n)

    return functions


async def test_a_single_peer_over_its_budget_spills_defers_and_applies_everything_once(tmp_path: Path) -> None:
    k = 3000  # one root makes 6 MB of sends: over the 1 MiB budget
    async with LocalMesh(fan_out_functions(k), state_dir=tmp_path, memory_budget=1 << 20) as mesh:
        for r in range(4):
            await mesh.send(message_builder(target_typename="mb/root", target_id=f"r{r}", int_value=0))
        await mesh.idle(timeout=60)
        peer = mesh.peers[0]
        st = peer.status()
        assert st["memory"]["spilled_total"] > 0, st
        assert st["spilled"] == 0 and st["memory"]["inbox"] == 0
        for r in range(4):
            reply = await mesh.request(message_builder(target_typename="mb/count", target_id=f"r{r}", int_value=0))
            assert reply.as_int() == k


async def test_a_checkpoint_of_a_large_spill_is_written_and_read_back_in_bounded_memory(tmp_path: Path) -> None:
    """The inflight object of a cut with 48 MiB spilled is encoded to a file and uploaded
    from it, and restore decodes it from a file: neither holds the object in memory."""
    from statefun_mesh.snapshot.participant import _Snap

    spilled = 48 << 20
    chunk = [rec(i, 32 << 10) for i in range(32)]  # 1 MiB a chunk
    async with LocalMesh(
        fan_out_functions(1),
        state_dir=tmp_path / "state",
        blob_store=f"file://{tmp_path / 'b'}",
        checkpoint_interval=3600,
    ) as mesh:
        peer = mesh.peers[0]
        participant = peer.participant
        spill = Spill(str(tmp_path / "spill"))
        try:
            for _ in range(spilled >> 20):
                spill.push(chunk)
            del chunk
            snap = _Snap(10**6, peer.backend.read(), set(), [rec(-1)], 0, set(), peer.n_peers)
            snap.spill_txn = spill.cut()
            tracemalloc.start()
            try:
                part = await participant._write_objects(snap)
                _, write_peak = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                kind, entries = await participant._open(part.inflight)
                count = size = 0
                for e in entries:
                    count += 1
                    size += len(e[5])
                _, read_peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                snap.txn.abort()
                snap.spill_txn.abort()
        finally:
            spill.close()
        assert part.inflight.size > spilled and part.inflight.entries == (spilled >> 15) + 1
        assert kind == "inflight" and count == part.inflight.entries and size == spilled + 10
        # about one 1 MiB chunk (twice while a buffer grows) besides the mesh's own allocations
        assert write_peak < 8 << 20, f"writing a {spilled >> 20} MiB inflight object took {write_peak >> 20} MiB"
        assert read_peak < 8 << 20, f"reading a {spilled >> 20} MiB inflight object took {read_peak >> 20} MiB"
        assert os.listdir(participant.work_dir) == []  # no temporary files left


async def test_the_replay_after_a_recovery_routes_the_ingress_log_as_outgoing_room_allows(tmp_path: Path) -> None:
    """A recovery replays every client message logged since the checkpoint. It used to route
    the whole log at once (here 16 MiB for another peer, on a 4 MiB budget); now in slices
    while the outgoing buffers are under their quarter of the budget, the rest as credit
    comes back, and still every message is applied exactly once."""
    from statefun_mesh._speedups import key_group

    budget, n, value = 4 << 20, 2000, "v" * (8 << 10)
    keys = [k for k in (f"rp-{i}" for i in range(400)) if key_group(k, 128) * 2 // 128 == 1][:20]
    functions = StatefulFunctions()

    @functions.bind(typename="rp/count", specs=[ValueSpec(name="n", type=IntType)])
    def count(context, message):  # type: ignore[no-untyped-def]
        context.storage.n = (context.storage.n or 0) + 1
        if context.in_request:
            context.reply(int_value=context.storage.n)

    async with LocalMesh(
        functions,
        peers=2,
        state_dir=tmp_path / "state",
        blob_store=f"file://{tmp_path / 'b'}",
        checkpoint_interval=3600,
        memory_budget=budget,
        max_parallelism=128,
    ) as mesh:
        sender, receiver = mesh.peers
        for i in range(n):  # logged by peer 0, every target on peer 1
            await sender.send(message_builder(target_typename="rp/count", target_id=keys[i % 20], str_value=value))
        await mesh.idle()
        # what peer 0 holds for peer 1 at any moment: its outgoing buffers plus frames sent
        # and not yet delivered (the in-memory transport delivers on the next loop turn)
        pending = {"sent": 0, "delivered": 0, "max": 0}
        send, deliver, route = sender.transport.send, receiver.transport._deliver, sender.router.route

        def counted_send(p: int, frame: bytes) -> None:
            pending["sent"] += len(frame)
            send(p, frame)

        def counted_deliver(src: int, frame: bytes) -> None:
            pending["delivered"] += len(frame)
            deliver(src, frame)

        def measured_route(records: list, from_client: bool = False) -> None:
            route(records, from_client)
            held = sender.router.out_bytes() + pending["sent"] - pending["delivered"]
            pending["max"] = max(pending["max"], held)

        sender.transport.send, receiver.transport._deliver = counted_send, counted_deliver
        sender.router.route = measured_route  # type: ignore[method-assign]
        coord = sender.coordinator
        rounds = coord.recoveries
        coord.request_recovery("a test")
        for _ in range(600):
            if coord.recoveries > rounds and all(p.resumed for p in mesh.peers):
                break
            await asyncio.sleep(0.05)
        await asyncio.wait_for(mesh.idle(), 60)
        assert sender.recoveries >= 1
        counts = [
            (await mesh.request(message_builder(target_typename="rp/count", target_id=k, str_value=""))).as_int()
            for k in keys
        ]
    # no checkpoint completed: the state restarts empty and the whole log is replayed, once
    assert sum(counts) == n + len(keys), counts
    # the outgoing quarter (1 MiB), one slice of 100 messages, the link window (1 MiB) and a frame
    assert pending["max"] < 4 << 20, f"peer 0 held {pending['max'] >> 20} MiB for peer 1 during the replay"
