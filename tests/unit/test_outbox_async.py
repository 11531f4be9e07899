"""The sends of async and remote invocations inside memory_budget (issue 7 item 5): stages.

An async (or ``@in_thread``) invocation, or a remote function's answer, whose sends pass a
sixteenth of the budget writes them to a stage of its own in the outbox; the batch that
commits the invocation puts a reference to the stage in the FIFO in its place. Dropped
when the invocation raises, is cancelled or runs again after a rollback; routed in order
after the commit as room allows; in a checkpoint's cut once committed (never while
parked); read back into memory, never lost, when the disk is full.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, in_thread, message_builder
from statefun_mesh.address import Address
from statefun_mesh.context import Context, Storage
from statefun_mesh.errors import StatefunMeshError
from statefun_mesh.outbox import AsyncStage, Outbox
from statefun_mesh.remote.handler import RequestReplyHandler
from tests.meshes import checkpoint_then_recover


def rec(i: Any, size: int = 10) -> tuple[str, str, str, str, str, bytes, int, int]:
    return ("t/dst", f"d{i}", "", "", "t/v", b"x" * size, 0, 0)


def async_ctx(outbox: Outbox) -> Context:
    c = Context(Address("t/src", "a"), ("t/src", "a", "", "", "t/v", b"", 0, 0), Storage(Address("t/src", "a"), {}))
    outbox.attach(c)  # as Dispatcher._run_address does
    return c


def send(c: Context, i: Any, size: int = 10) -> None:
    c.send(message_builder(target_typename="t/dst", target_id=f"d{i}", str_value="x" * size))


def emit(c: Context, out: list[Any]) -> None:
    """What Dispatcher._emit does with an async context's sends."""
    if type(c._outbox) is AsyncStage:
        c._outbox.emitted(out)
    out.extend(c._sends or [])


def drain(outbox: Outbox) -> list[str]:
    out = []
    while True:
        chunk = outbox.pop()
        if not chunk:
            return out
        out.extend(r[1] for r in chunk)


def test_async_stages_interleave_on_disk_and_commit_in_emitted_order(tmp_path: Path) -> None:
    """Two async invocations stage at the same time (their chunks would interleave in one
    FIFO); a sync one stages too; the commit puts each in the order the batch emitted them."""
    outbox = Outbox(str(tmp_path / "ob"), stage_bytes=4096)
    try:
        outbox.begin()
        a, b = async_ctx(outbox), async_ctx(outbox)
        for i in range(60):  # ~420 estimated bytes each: a stage every ~10
            send(a, f"a{i}")
            send(b, f"b{i}")
        assert type(a._outbox) is AsyncStage and type(b._outbox) is AsyncStage and a._outbox is not b._outbox
        assert not outbox.staging  # async stages do not make the batch defer its sync addresses
        assert outbox.count == 0 and outbox.cut() is None  # nothing of theirs is committed
        s = Context(Address("t/src", "s"), ("t/src", "s", "", "", "t/v", b"", 0, 0), Storage(Address("t/src", "s"), {}))
        s._outbox, s._room = outbox, outbox.stage_bytes  # a sync context, as the dispatch loop sets it
        out: list[Any] = [rec("m0")]
        for i in range(30):
            send(s, f"s{i}")
        outbox.emitted(s, out)
        out.extend(s._sends or [])
        out.append(rec("m1"))
        emit(b, out)  # taken in in this order: b before a
        out.append(rec("m2"))
        emit(a, out)
        assert outbox.commit(out)
        want = ["dm0", *(f"ds{i}" for i in range(30)), "dm1", *(f"db{i}" for i in range(60)), "dm2"]
        want += [f"da{i}" for i in range(60)]
        txn = outbox.cut()
        assert txn is not None
        try:
            cut = [r[1] for r in Outbox.records(txn)]
            packed = sum(n for n, _ in Outbox.packed(txn))
        finally:
            txn.abort()
        assert cut == want and packed == len(want) == outbox.count
        first = outbox.pop()
        rest = drain(outbox)
        assert [r[1] for r in first] + rest == want and outbox.count == 0
    finally:
        outbox.close()


def test_a_stage_taken_in_by_a_batch_that_rolls_back_is_taken_in_again_and_a_dropped_one_is_deleted(
    tmp_path: Path,
) -> None:
    outbox = Outbox(str(tmp_path / "ob"), stage_bytes=4096)
    try:
        outbox.begin()
        parked = async_ctx(outbox)
        for i in range(40):
            send(parked, i)
        failed = async_ctx(outbox)
        for i in range(40):
            send(failed, f"f{i}")
        out: list[Any] = []
        emit(parked, out)  # the batch took it in ... and its state commit failed: no outbox commit
        outbox.begin()  # the next batch
        out = []
        emit(parked, out)  # takes it in again
        assert outbox.commit(out)
        stage = failed._outbox
        assert type(stage) is AsyncStage and stage.hi > 0
        sid = stage.id
        del failed, stage  # the invocation raised: its context is gone, never emitted
        gc.collect()
        outbox.begin()  # deletes what it staged
        env = outbox._env
        assert env is not None
        with env.begin() as txn, txn.cursor() as cur:
            stage_ids = {int.from_bytes(k[1:9], "big") for k, _ in cur if k[:1] == b"\xff"}
        assert sid not in stage_ids
        assert drain(outbox) == [f"d{i}" for i in range(40)]
    finally:
        outbox.close()


def test_a_full_disk_at_the_commit_reads_parked_stages_back_into_memory(tmp_path: Path) -> None:
    """The commit cannot be written: ``abandon`` routes this batch's sends (its stages'
    too) at once, and reads the stage of an invocation still parked back into memory first,
    so the fresh outbox loses nothing of it and it is routed when its own batch commits."""
    outbox = Outbox(str(tmp_path / "ob"), stage_bytes=16 << 10, map_size=256 << 10, max_size=256 << 10)
    try:
        outbox.begin()
        mine, parked = async_ctx(outbox), async_ctx(outbox)
        for i in range(50):
            send(mine, f"m{i}")
            send(parked, f"p{i}")
        out: list[Any] = [rec("first")]
        emit(mine, out)
        out.extend(rec(f"big{i}", 64 << 10) for i in range(8))  # 512 KiB: over the map
        with pytest.raises(StatefunMeshError):
            outbox.commit(out)
        got = [r[1] for piece in outbox.abandon(out) for r in piece]
        assert got == ["dfirst", *(f"dm{i}" for i in range(50)), *(f"dbig{i}" for i in range(8))]
        assert outbox.count == 0 and outbox._env is None
        outbox.begin()  # later, the parked one is taken in (it may stage more meanwhile)
        for i in range(50, 60):
            send(parked, f"p{i}")
        later: list[Any] = []
        emit(parked, later)  # what it staged before the abandon comes back from memory, first
        assert [r[1] for r in later] == [f"dp{i}" for i in range(60)]
        assert not outbox.commit(later)  # nothing on disk: the caller routes them
    finally:
        outbox.close()


# -- through a mesh --------------------------------------------------------------------------------


def seq_function(functions: StatefulFunctions) -> None:
    """``ob/seq``, ids ``s<j>-<k>``: counts its messages, and the ones that came out of order
    (sender ``j`` sends it ``k``, ``k + 10``, ``k + 20``, ...)."""

    @functions.bind(typename="ob/seq", specs=[ValueSpec(name="n", type=IntType), ValueSpec(name="bad", type=IntType)])
    def seq(context, message):  # type: ignore[no-untyped-def]
        if context.in_request:
            context.reply(int_value=(context.storage.n or 0) * 1000 + (context.storage.bad or 0))
            return
        i = int(message.as_string().rstrip("v"))
        if i != (context.storage.n or 0) * 10 + int(context.address.id.split("-")[1]):
            context.storage.bad = (context.storage.bad or 0) + 1
        context.storage.n = (context.storage.n or 0) + 1


def fan_out(context: Any, message: Any, n: int, pad: str, base: int = 0) -> None:
    j = context.address.id
    for i in range(base, base + n):
        context.send(message_builder(target_typename="ob/seq", target_id=f"s{j}-{i % 10}", str_value=f"{i}{pad}"))


def async_functions(n: int, pad: str, kind: str) -> StatefulFunctions:
    functions = StatefulFunctions()
    seq_function(functions)

    if kind == "async":

        @functions.bind(typename="ob/fan")
        async def fan(context, message):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0)
            fan_out(context, message, n, pad)
            await asyncio.sleep(0)
            if message.as_int() < 0:
                raise ValueError("this invocation fails after sending")

    else:

        @functions.bind(typename="ob/fan")
        @in_thread
        def fan_in_thread(context, message):  # type: ignore[no-untyped-def]
            fan_out(context, message, n, pad)

    return functions


async def totals(mesh: LocalMesh, senders: list[str]) -> tuple[int, int]:
    total = bad = 0
    for j in senders:
        for k in range(10):
            reply = await mesh.request(message_builder(target_typename="ob/seq", target_id=f"s{j}-{k}", int_value=0))
            total += reply.as_int() // 1000
            bad += reply.as_int() % 1000
    return total, bad


async def traced_peak(mesh: LocalMesh, start: Any, timeout: float) -> int:
    tracemalloc.start()
    try:
        await start()
        await asyncio.wait_for(mesh.idle(), timeout)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(("kind", "peers"), [("async", 1), ("async", 2), ("in_thread", 2)])
async def test_async_invocations_sending_many_messages_stay_inside_the_budget(
    tmp_path: Path, kind: str, peers: int
) -> None:
    """Four async invocations (parked, taken in by a later batch) send 10,000 messages each
    on a 1 MiB budget. Their sends used to stay in memory until that batch committed, and
    were then routed at once (traced peak 13-20 MiB); now each holds a sixteenth of the
    budget before its sends go to its stage, and they are routed from the outbox as room
    allows: every message arrives once, in order per sender and address."""
    n, budget, senders = 10_000, 1 << 20, ["a", "b", "c", "d"]
    async with LocalMesh(
        async_functions(n, "v" * 100, kind), peers=peers, state_dir=tmp_path, memory_budget=budget
    ) as mesh:

        async def start() -> None:
            for j in senders:
                await mesh.send(message_builder(target_typename="ob/fan", target_id=j, int_value=0))

        peak = await traced_peak(mesh, start, 300)
        assert await totals(mesh, senders) == (n * len(senders), 0)
        assert peak < 6 << 20, f"peak {peak / 2**20:.1f} MiB while 4 async invocations sent {n} messages each"
        assert all(p.status()["memory"]["outbox"] == 0 for p in mesh.peers)
        assert sum(p.status()["memory"]["outbox_staged_total"] for p in mesh.peers) > n * len(senders) // 2


async def test_an_async_invocation_that_raises_after_staging_sends_sends_nothing(tmp_path: Path) -> None:
    n = 10_000
    async with LocalMesh(async_functions(n, "", "async"), state_dir=tmp_path, memory_budget=1 << 20) as mesh:
        await mesh.send(message_builder(target_typename="ob/fan", target_id="bad", int_value=-1))
        await mesh.send(message_builder(target_typename="ob/fan", target_id="good", int_value=1))
        await asyncio.wait_for(mesh.idle(), 120)
        assert await totals(mesh, ["good"]) == (n, 0)
        assert await totals(mesh, ["bad"]) == (0, 0)
        assert mesh.peers[0].status()["memory"]["outbox_staged_total"] >= 2 * n * 9 // 10


# the remote function's program, served in the peer's process (module.yaml: python:<this module>:HANDLER)
REMOTE = StatefulFunctions()
REMOTE_SENDS, REMOTE_PAD, REMOTE_CALLS = 200, "v" * 4000, 20


@REMOTE.bind(typename="remote.example/fan")
def remote_fan(context, message):  # type: ignore[no-untyped-def]
    fan_out(context, message, REMOTE_SENDS, REMOTE_PAD, base=message.as_int() * REMOTE_SENDS)


HANDLER = RequestReplyHandler(REMOTE)


@pytest.mark.parametrize("peers", [1, 2])
async def test_remote_function_answers_with_many_messages_stay_inside_the_budget(tmp_path: Path, peers: int) -> None:
    """A remote address gets 20 messages in one batch and answers each (one request per
    message) with 200 messages of 4 KB (16 MB in all) on a 1 MiB budget. The answers'
    messages used to be held until the batch that commits the address (after its last
    answer), then routed at once (traced peak 26-36 MiB); now each answer past a sixteenth
    of the budget goes to a stage on disk as it comes, and they are routed from the outbox
    as room allows: every message once, in order."""
    module = tmp_path / "module.yaml"
    module.write_text(
        "kind: io.statefun.endpoints.v2/http\n"
        "spec:\n"
        "  functions: remote.example/*\n"
        f"  urlPathTemplate: python:{__name__}:HANDLER\n"
        "  maxNumBatchRequests: 1\n"
        "  transport: {timeouts: {call: 30 sec, connect: 1 sec, read: 30 sec, write: 1 sec}}\n"
    )
    functions = StatefulFunctions()
    seq_function(functions)

    @functions.bind(typename="ob/start")
    def start_calls(context, message):  # type: ignore[no-untyped-def]
        for m in range(REMOTE_CALLS):  # all in one batch of the remote address
            context.send(message_builder(target_typename="remote.example/fan", target_id="7", int_value=m))

    async with LocalMesh(
        functions, peers=peers, state_dir=tmp_path / "s", module=str(module), memory_budget=1 << 20
    ) as mesh:

        async def start() -> None:
            await mesh.send(message_builder(target_typename="ob/start", target_id="x", int_value=0))

        peak = await traced_peak(mesh, start, 300)
        n = REMOTE_SENDS * REMOTE_CALLS
        assert await totals(mesh, ["7"]) == (n, 0)
        assert peak < 10 << 20, f"peak {peak / 2**20:.1f} MiB while a remote function answered {n} messages of 4 KB"
        assert all(p.status()["memory"]["outbox"] == 0 for p in mesh.peers)
        assert sum(p.status()["memory"]["outbox_staged_total"] for p in mesh.peers) >= n


async def test_async_sends_waiting_in_the_outbox_at_a_cut_are_restored_by_a_recovery(tmp_path: Path) -> None:
    """A checkpoint cut while four async invocations' committed stages wait in the outbox
    writes them (read through the FIFO's references) in the inflight object; a recovery to
    that checkpoint routes them again: every message applied once, in order."""
    n, senders = 15_000, ["a", "b", "c", "d"]
    async with LocalMesh(
        async_functions(n, "v" * 200, "async"),
        peers=2,
        state_dir=tmp_path / "s",
        blob_store=f"file://{tmp_path / 'b'}",
        checkpoint_interval=3600,
        memory_budget=1 << 20,
    ) as mesh:
        for j in senders:
            await mesh.send(message_builder(target_typename="ob/fan", target_id=j, int_value=0))
        for _ in range(3000):
            if sum(p.router.outbox.count for p in mesh.peers) > n:
                break
            await asyncio.sleep(0.002)
        else:
            raise AssertionError("the fan-out never waited in an outbox")
        await checkpoint_then_recover(mesh, n // 4)
        assert await totals(mesh, senders) == (n * len(senders), 0)
