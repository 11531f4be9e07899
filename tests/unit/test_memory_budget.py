"""memory_budget: the inbox spill, batch deferral, and the settings (issue 7 item 5)."""

from __future__ import annotations

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
