"""LocalMesh on one peer: functions, state in LMDB, requests, egress, timers, failures."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest

from statefun_mesh import (
    DEAD_LETTERS,
    EgressRecord,
    FunctionNotFoundError,
    IntType,
    InvocationError,
    LocalMesh,
    ManualClock,
    MsgPackType,
    RequestTimeoutError,
    StatefulFunctions,
    StringType,
    ValueSpec,
    _aio,
    egress_message_builder,
    make_json_type,
    message_builder,
)
from statefun_mesh._speedups import key_group
from statefun_mesh.state.lmdb_backend import LmdbStateBackend, encode_state_value, state_key


def counter_functions() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="test/counter", specs=[ValueSpec(name="count", type=IntType)])
    def counter(context, message):
        count = (context.storage.count or 0) + message.as_int()
        context.storage.count = count
        if context.in_request:
            context.reply(int_value=count)

    return functions


async def take(it, n: int, timeout: float = 5.0) -> list[EgressRecord]:
    out: list[EgressRecord] = []

    async def run() -> None:
        async for rec in it:
            out.append(rec)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_counter_counts_and_replies(tmp_path: Path) -> None:
    async with LocalMesh(counter_functions(), state_dir=str(tmp_path)) as mesh:
        for i in range(100):
            await mesh.send(message_builder(target_typename="test/counter", target_id=f"k{i % 10}", int_value=1))
        reply = await mesh.request(message_builder(target_typename="test/counter", target_id="k3", int_value=0))
        assert reply.as_int() == 10
        assert (reply.target_typename, reply.target_id) == ("test/counter", "k3")


async def test_state_persists_across_reopen(tmp_path: Path) -> None:
    async with LocalMesh(counter_functions(), state_dir=str(tmp_path)) as mesh:
        for _ in range(5):
            await mesh.send(message_builder(target_typename="test/counter", target_id="a", int_value=2))
    async with LocalMesh(counter_functions(), state_dir=str(tmp_path)) as mesh:
        reply = await mesh.request(message_builder(target_typename="test/counter", target_id="a", int_value=1))
        assert reply.as_int() == 11


async def test_several_modules_are_multiplexed(tmp_path: Path) -> None:
    other = StatefulFunctions()

    @other.bind(typename="test/echo")
    def echo(context, message):
        context.reply(str_value=message.as_string().upper())

    async with LocalMesh(counter_functions(), other, state_dir=str(tmp_path)) as mesh:
        r = await mesh.request(message_builder(target_typename="test/echo", target_id="x", str_value="hi"))
        assert r.as_string() == "HI"
        r = await mesh.request(message_builder(target_typename="test/counter", target_id="x", int_value=4))
        assert r.as_int() == 4


def test_same_type_in_two_modules_is_rejected() -> None:
    with pytest.raises(ValueError, match="test/counter"):
        LocalMesh(counter_functions(), counter_functions())


async def test_function_chain_caller_and_reply_propagation(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/ping", specs=[ValueSpec(name="seen", type=IntType)])
    def ping(context, message):
        n = message.as_int()
        context.storage.seen = (context.storage.seen or 0) + 1
        if n == 0:
            context.reply(str_value=f"done by {context.address.id}, caller {context.caller}")
            return
        context.send(message_builder(target_typename="test/pong", target_id=context.address.id, int_value=n - 1))

    @functions.bind(typename="test/pong", specs=[ValueSpec(name="seen", type=IntType)])
    def pong(context, message):
        assert context.caller is not None and context.caller.typename == "test/ping"
        context.storage.seen = (context.storage.seen or 0) + 1
        context.send(
            message_builder(
                target_typename=context.caller.typename, target_id=context.caller.id, int_value=message.as_int()
            )
        )

    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        reply = await mesh.request(message_builder(target_typename="test/ping", target_id="p", int_value=1000))
        assert reply.as_string() == "done by p, caller test/pong/p"


async def test_egress_records_and_offsets(tmp_path: Path) -> None:
    functions = StatefulFunctions()
    Doc = make_json_type("test/doc")

    @functions.bind(typename="test/greeter", specs=[ValueSpec(name="seen", type=IntType)])
    def greeter(context, message):
        seen = (context.storage.seen or 0) + 1
        context.storage.seen = seen
        context.send_egress(
            egress_message_builder(
                target_typename="test/greetings", value={"who": context.address.id, "seen": seen}, value_type=Doc
            )
        )

    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        for name in ["ann", "bob", "ann"]:
            await mesh.send(message_builder(target_typename="test/greeter", target_id=name, str_value=""))
        records = await take(mesh.egress("test/greetings"), 3)
        assert [r.offset for r in records] == [0, 1, 2]
        # one batch groups messages by address: order holds per instance, not across instances
        docs = [r.as_type(Doc) for r in records]
        assert [d for d in docs if d["who"] == "ann"] == [{"who": "ann", "seen": 1}, {"who": "ann", "seen": 2}]
        assert {"who": "bob", "seen": 1} in docs
        assert records[0].value_typename() == "test/doc"
        # "latest" sees only new records
        it = mesh.egress("test/greetings", start="latest")
        await mesh.send(message_builder(target_typename="test/greeter", target_id="cy", str_value=""))
        (rec,) = await take(it, 1)
        assert rec.offset == 3 and rec.as_type(Doc)["who"] == "cy"
    # egress is durable: a new mesh on the same directory still has it
    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        records = await take(mesh.egress("test/greetings", start=2), 2)
        assert [r.offset for r in records] == [2, 3]


async def test_egress_retention_trims_oldest(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/e")
    def e(context, message):
        context.send_egress(
            egress_message_builder(target_typename="test/out", value=message.as_int(), value_type=IntType)
        )

    async with LocalMesh(functions, state_dir=str(tmp_path), egress_retention=10) as mesh:
        for i in range(50):
            await mesh.send(message_builder(target_typename="test/e", target_id="x", int_value=i))
        await mesh.idle()
        first, nxt = mesh.peers[0].backend.egress_bounds("test/out")
        assert nxt == 50
        assert 50 - first <= 11
        records = await take(mesh.egress("test/out"), nxt - first)
        assert records[-1].as_int() == 49


async def test_async_functions_never_overlap_per_address(tmp_path: Path) -> None:
    functions = StatefulFunctions()
    active: dict[str, int] = {}
    max_active: dict[str, int] = {}
    concurrent_addresses: list[int] = []

    @functions.bind(typename="test/slow", specs=[ValueSpec(name="log", type=MsgPackType)])
    async def slow(context, message):
        key = context.address.id
        active[key] = active.get(key, 0) + 1
        max_active[key] = max(max_active.get(key, 0), active[key])
        concurrent_addresses.append(sum(1 for v in active.values() if v))
        await asyncio.sleep(0.001)
        context.storage.log = (context.storage.log or []) + [message.as_int()]
        active[key] -= 1
        if message.as_int() == 9 and context.in_request:
            context.reply(value=context.storage.log, value_type=MsgPackType)

    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        for i in range(9):
            for k in ("a", "b", "c"):
                await mesh.send(message_builder(target_typename="test/slow", target_id=k, int_value=i))
        replies = [
            await mesh.request(message_builder(target_typename="test/slow", target_id=k, int_value=9))
            for k in ("a", "b", "c")
        ]
    assert all(v == 1 for v in max_active.values())
    assert max(concurrent_addresses) > 1  # different addresses did interleave
    for r in replies:
        assert r.as_type(MsgPackType) == list(range(10))


async def test_raising_function_is_isolated_and_dead_lettered(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/fragile", specs=[ValueSpec(name="total", type=IntType)])
    def fragile(context, message):
        n = message.as_int()
        context.storage.total = (context.storage.total or 0) + n
        context.send_egress(egress_message_builder(target_typename="test/out", value=n, value_type=IntType))
        if n < 0:
            raise ValueError(f"negative amount {n}")
        if context.in_request:
            context.reply(int_value=context.storage.total)

    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        await mesh.send(message_builder(target_typename="test/fragile", target_id="x", int_value=5))
        await mesh.send(message_builder(target_typename="test/fragile", target_id="x", int_value=-100))
        with pytest.raises(InvocationError, match="negative amount -7") as info:
            await mesh.request(message_builder(target_typename="test/fragile", target_id="x", int_value=-7))
        assert info.value.address == "test/fragile/x"
        r = await mesh.request(message_builder(target_typename="test/fragile", target_id="x", int_value=1))
        assert r.as_int() == 6  # neither failed increment was applied
        out = await take(mesh.egress("test/out"), 2)
        assert [o.as_int() for o in out] == [5, 1]  # nor their egress
        dead = await take(mesh.egress(DEAD_LETTERS), 2)
        docs = [json.loads(d.raw_value()) for d in dead]
        assert [d["target"] for d in docs] == ["test/fragile/x"] * 2
        assert docs[0]["error"] == "ValueError: negative amount -100"
        assert docs[0]["reason"] == "function raised"
        assert docs[0]["value_typename"] == "io.statefun.types/int"
        assert "negative amount" in docs[0]["traceback"]


async def test_unknown_function_type(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/forward")
    def forward(context, message):
        context.send(message_builder(target_typename="test/missing", target_id="1", str_value="lost?"))

    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        with pytest.raises(FunctionNotFoundError, match="test/nope"):
            await mesh.send(message_builder(target_typename="test/nope", target_id="1", int_value=1))
        with pytest.raises(FunctionNotFoundError, match="test/missing"):
            await mesh.request(message_builder(target_typename="test/forward", target_id="1", int_value=1))
        (dead,) = await take(mesh.egress(DEAD_LETTERS), 1)
        doc = json.loads(dead.raw_value())
        assert doc["reason"] == "unknown function type"
        assert doc["target"] == "test/missing/1" and doc["caller"] == "test/forward/1"
    assert "test/missing" in caplog.text


async def test_request_timeout_when_no_reply(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/silent")
    def silent(context, message):
        pass

    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        with pytest.raises(RequestTimeoutError, match=r"context\.reply"):
            await mesh.request(message_builder(target_typename="test/silent", target_id="1", int_value=1), timeout=0.2)


async def test_stored_type_mismatch_is_a_type_error(tmp_path: Path) -> None:
    # Write a string into the state of a function that declares an int.
    backend = LmdbStateBackend(tmp_path / "peer-0")
    kg = key_group("x", 1024)
    backend.commit(
        [
            (
                "put",
                "state",
                state_key(kg, "test/counter", "x", "count"),
                encode_state_value("io.statefun.types/string", StringType.serializer().serialize("hi"), 0),
            )
        ]
    )
    backend.close()
    async with LocalMesh(counter_functions(), state_dir=str(tmp_path)) as mesh:
        with pytest.raises(InvocationError) as info:
            await mesh.request(message_builder(target_typename="test/counter", target_id="x", int_value=1))
    msg = str(info.value)
    assert "'count'" in msg and "io.statefun.types/string" in msg and "io.statefun.types/int" in msg


async def test_storage_delete_and_undeclared(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/kv", specs=[ValueSpec(name="v", type=StringType)])
    def kv(context, message):
        cmd = message.as_string()
        if cmd == "set":
            context.storage.v = "value"
        elif cmd == "del":
            del context.storage.v
        elif cmd == "undeclared":
            context.storage.nope = 1
        context.reply(str_value=repr(context.storage.v))

    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:

        async def call(cmd: str) -> str:
            reply = await mesh.request(message_builder(target_typename="test/kv", target_id="1", str_value=cmd))
            return reply.as_string()

        assert await call("get") == "None"
        assert await call("set") == "'value'"
        assert await call("get") == "'value'"
        assert await call("del") == "None"
        assert await call("get") == "None"
        with pytest.raises(InvocationError, match="has no state 'nope'"):
            await call("undeclared")


async def test_ttl_expire_after_write_and_call(tmp_path: Path) -> None:
    clock = ManualClock()
    functions = StatefulFunctions()

    @functions.bind(
        typename="test/ttl",
        specs=[
            ValueSpec(name="w", type=IntType, expire_after_write=timedelta(seconds=10)),
            ValueSpec(name="c", type=IntType, expire_after_call=timedelta(seconds=10)),
        ],
    )
    def ttl(context, message):
        cmd = message.as_string()
        if cmd == "write":
            context.storage.w = 1
            context.storage.c = 1
        context.reply(str_value=f"{context.storage.w},{context.storage.c}")

    async with LocalMesh(functions, state_dir=str(tmp_path), clock=clock) as mesh:

        async def call(cmd: str) -> str:
            reply = await mesh.request(message_builder(target_typename="test/ttl", target_id="1", str_value=cmd))
            return reply.as_string()

        assert await call("write") == "1,1"
        clock.advance(6)
        assert await call("read") == "1,1"  # the call refreshes c, not w
        clock.advance(6)
        assert await call("read") == "None,1"  # w expired 10 s after its write
        clock.advance(11)
        assert await call("read") == "None,None"  # c expired 10 s after the last call


async def test_send_after_fires_on_time_and_cancel(tmp_path: Path) -> None:
    clock = ManualClock()
    functions = StatefulFunctions()
    Delayed = make_json_type("test/delayed")

    @functions.bind(typename="test/sched")
    def sched(context, message):
        cmd = message.as_type(Delayed)
        if cmd["op"] == "schedule":
            context.send_after(
                timedelta(seconds=cmd["delay"]),
                message_builder(target_typename="test/sink", target_id="s", str_value=cmd["tag"]),
                cancellation_token=cmd.get("token", ""),
            )
        elif cmd["op"] == "cancel":
            context.cancel_delayed_message(cmd["token"])

    @functions.bind(typename="test/sink")
    def sink(context, message):
        context.send_egress(
            egress_message_builder(target_typename="test/fired", value=message.as_string(), value_type=StringType)
        )

    def cmd(**kw) -> object:
        return message_builder(target_typename="test/sched", target_id="1", value=kw, value_type=Delayed)

    async with LocalMesh(functions, state_dir=str(tmp_path), clock=clock) as mesh:
        await mesh.send(cmd(op="schedule", delay=5, tag="five"))
        await mesh.send(cmd(op="schedule", delay=10, tag="ten", token="t10"))
        await mesh.send(cmd(op="schedule", delay=20, tag="twenty", token="keep"))
        await mesh.send(cmd(op="cancel", token="t10"))
        await mesh.idle()
        clock.advance(4.9)
        await mesh.idle()
        assert mesh.peers[0].backend.egress_bounds("test/fired") == (0, 0)
        clock.advance(0.2)
        (rec,) = await take(mesh.egress("test/fired"), 1)
        assert rec.as_string() == "five"
        clock.advance(10)
        await mesh.idle()
        assert mesh.peers[0].backend.egress_bounds("test/fired") == (0, 1)  # "ten" was cancelled
    # the 20 s timer is state: it survives the restart and fires once
    async with LocalMesh(functions, state_dir=str(tmp_path), clock=clock) as mesh:
        clock.advance(10)
        recs = await take(mesh.egress("test/fired"), 2)
        assert [r.as_string() for r in recs] == ["five", "twenty"]
        await mesh.idle()
        assert mesh.peers[0].backend.next_timer_due() is None


async def test_long_ids_and_unicode(tmp_path: Path) -> None:
    async with LocalMesh(counter_functions(), state_dir=str(tmp_path)) as mesh:
        for ident in ["x" * 2000, "ünïcødé ✓", "a\x00b", "a"]:
            for _ in range(3):
                await mesh.send(message_builder(target_typename="test/counter", target_id=ident, int_value=1))
            r = await mesh.request(message_builder(target_typename="test/counter", target_id=ident, int_value=0))
            assert r.as_int() == 3, ident


async def test_map_full_grows_the_map(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/blob", specs=[ValueSpec(name="b", type=StringType)])
    def blob(context, message):
        context.storage.b = "x" * 100_000

    async with LocalMesh(functions, state_dir=str(tmp_path), map_size=1 << 20) as mesh:
        for i in range(100):  # ~10 MB into a 1 MiB map
            await mesh.send(message_builder(target_typename="test/blob", target_id=str(i), int_value=1))
        await mesh.idle()
        assert mesh.peers[0].status()["failures"] == 0
        assert mesh.peers[0].backend.env.info()["map_size"] >= 8 << 20


async def test_state_full_fails_cleanly_and_keeps_accepted(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/blob", specs=[ValueSpec(name="b", type=StringType)])
    def blob(context, message):
        context.storage.b = "x" * 300_000

    async with LocalMesh(
        functions, state_dir=str(tmp_path), map_size=1 << 20, max_map_size=2 << 20, max_batch=1
    ) as mesh:
        peer = mesh.peers[0]
        for i in range(10):
            await mesh.send(message_builder(target_typename="test/blob", target_id=str(i), int_value=1))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if peer.status()["queued"] and peer.batches:
                break
        queued = peer.status()["queued"]
        assert queued > 0  # the batches that do not fit wait; none is dropped or half-written
        committed = peer.batches
        # what was committed is intact
        with peer.backend.read() as txn:
            n = sum(1 for _ in peer.backend.iter_state(txn))
        assert n == committed
        mesh.peers[0].router.inbox.clear()  # let the mesh close without retrying forever


def _anon_kib() -> int:
    """Anonymous resident memory of this process (KiB): the heap, not LMDB's file pages."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("total", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_memory_stays_bounded_with_many_idle_addresses(tmp_path: Path, total: int) -> None:
    """Many instances with state, then idle: the peer keeps no per-instance memory."""
    import gc

    async def run() -> tuple[int, int]:
        async with LocalMesh(counter_functions(), state_dir=str(tmp_path), max_batch=5000) as mesh:
            peer = mesh.peers[0]
            one = IntType.serializer().serialize(1)

            async def load(lo: int, hi: int) -> None:
                for start in range(lo, hi, 10_000):  # straight into the peer, in bounded chunks
                    for i in range(start, min(start + 10_000, hi)):
                        await peer.submit(("test/counter", f"id-{i}", "", "", "io.statefun.types/int", one, 0, 0))
                    await mesh.idle()

            await load(0, 20_000)
            gc.collect()
            before = _anon_kib()
            await load(20_000, total)
            gc.collect()
            after = _anon_kib()
            r = await mesh.request(
                message_builder(target_typename="test/counter", target_id=f"id-{total - 7}", int_value=0)
            )
            assert r.as_int() == 1
            return before, after

    before, after = asyncio.run(run())
    # the instances live in LMDB; the process heap must not grow with their number
    assert after - before < 30_000, (before, after)  # KiB


def test_public_api_exports() -> None:
    import statefun_mesh

    for name in statefun_mesh.__all__:
        assert hasattr(statefun_mesh, name), name
    assert os.environ.get("STATEFUN_MESH_NO_EXTENSIONS") is None or statefun_mesh.IMPLEMENTATION == "python"


async def test_idempotency_key_applies_a_resend_once(tmp_path: Path) -> None:
    async with LocalMesh(counter_functions(), state_dir=str(tmp_path), peers=3) as mesh:
        msg = message_builder(target_typename="test/counter", target_id="x", int_value=5)
        for _ in range(3):  # three resends through three different peers
            for peer in mesh.peers:
                await peer.send(msg, idempotency_key="order-17")
        await mesh.send(msg, idempotency_key="order-18")
        await mesh.send(msg)  # no key: always applied
        await mesh.idle()
        r = await mesh.request(message_builder(target_typename="test/counter", target_id="x", int_value=0))
        assert r.as_int() == 15
        assert sum(s["duplicates"] for s in mesh.status()) == 8
    # remembered across restarts, but only for the same target instance
    async with LocalMesh(counter_functions(), state_dir=str(tmp_path), peers=3) as mesh:
        await mesh.send(msg, idempotency_key="order-17")
        await mesh.send(
            message_builder(target_typename="test/counter", target_id="y", int_value=1), idempotency_key="order-17"
        )
        await mesh.idle()
        r = await mesh.request(message_builder(target_typename="test/counter", target_id="x", int_value=0))
        assert r.as_int() == 15
        r = await mesh.request(message_builder(target_typename="test/counter", target_id="y", int_value=0))
        assert r.as_int() == 1


async def test_delayed_message_reaches_a_target_on_another_peer(tmp_path: Path) -> None:
    clock = ManualClock()
    functions = counter_functions()

    @functions.bind(typename="test/later")
    def later(context, message):
        for i in range(20):  # targets spread over every peer
            context.send_after(
                timedelta(seconds=1), message_builder(target_typename="test/counter", target_id=f"t{i}", int_value=1)
            )

    async with LocalMesh(functions, state_dir=str(tmp_path), peers=3, clock=clock) as mesh:
        await mesh.send(message_builder(target_typename="test/later", target_id="s", int_value=0))
        await mesh.idle()
        clock.advance(2)
        await mesh.idle()
        counts = [
            (
                await mesh.request(message_builder(target_typename="test/counter", target_id=f"t{i}", int_value=0))
            ).as_int()
            for i in range(20)
        ]
        assert counts == [1] * 20


@pytest.mark.integration  # peers over tcp
async def test_outgoing_frames_stay_under_max_frame_bytes(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/fan", specs=[ValueSpec(name="n", type=IntType)])
    def fan(context, message):
        if message.is_string():  # the fan-out: 500 messages of ~1 KB
            for i in range(500):
                context.send(
                    message_builder(
                        target_typename="test/fan", target_id=f"f{i}", value="x" * 1000, value_type=MsgPackType
                    )
                )
            return
        context.storage.n = (context.storage.n or 0) + 1

    async with LocalMesh(functions, state_dir=str(tmp_path), peers=2, transport="tcp", max_frame_bytes=100_000) as mesh:
        await mesh.send(message_builder(target_typename="test/fan", target_id="root", str_value="go"))
        await mesh.idle(timeout=20)
        assert sum(p.dispatcher.invocations for p in mesh.peers) == 501
        assert sum(p.bad_frames for p in mesh.peers) == 0


def test_ids_must_be_valid_unicode() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        message_builder(target_typename="test/counter", target_id="a\udc80", int_value=1)


async def test_expired_idempotency_keys_are_purged(tmp_path: Path) -> None:
    clock = ManualClock()
    async with LocalMesh(counter_functions(), state_dir=str(tmp_path), clock=clock, dedup_retention=60) as mesh:
        for i in range(50):
            await mesh.send(
                message_builder(target_typename="test/counter", target_id=f"k{i}", int_value=1),
                idempotency_key=f"key-{i}",
            )
        await mesh.idle()
        backend = mesh.peers[0].backend
        with backend.read() as txn:
            assert sum(1 for _ in txn.cursor(db=backend.db_dedup)) == 50
        clock.advance(120)
        # the purge runs between batches: give the peer one batch to run
        await mesh.send(message_builder(target_typename="test/counter", target_id="other", int_value=1))
        await mesh.idle()
        with backend.read() as txn:
            assert sum(1 for _ in txn.cursor(db=backend.db_dedup)) == 0
        # an expired key no longer deduplicates
        await mesh.send(
            message_builder(target_typename="test/counter", target_id="k1", int_value=1), idempotency_key="key-1"
        )
        r = await mesh.request(message_builder(target_typename="test/counter", target_id="k1", int_value=0))
        assert r.as_int() == 2


async def test_a_batch_failing_internally_again_and_again_stops_the_loop_and_says_why(tmp_path: Path) -> None:
    # Regression (issue 11): an internal error in a batch (a bug, not a failing disk or
    # function) was retried for ever, every 5 s, with the peer looking healthy. Now a few
    # attempts, then the loop stops with an error naming the batch, and /healthz says so.
    from statefun_mesh.batchloop import INTERNAL_BATCH_ATTEMPTS
    from statefun_mesh.errors import StatefunMeshError
    from statefun_mesh.metrics import _alive

    async with LocalMesh(counter_functions(), state_dir=str(tmp_path)) as mesh:
        peer = mesh.peers[0]
        await mesh.send(message_builder(target_typename="test/counter", target_id="ok", int_value=1))
        await mesh.idle()
        assert peer.dispatch_failure() is None and _alive(peer) is None
        calls = 0

        async def broken(*args: object, **kwargs: object) -> None:  # fault injection: a dispatcher bug
            nonlocal calls
            calls += 1
            raise RuntimeError("a bug in the dispatcher")

        assert peer.dispatcher is not None
        peer.dispatcher.run = broken  # type: ignore[method-assign]
        await mesh.send(message_builder(target_typename="test/counter", target_id="poison", int_value=1))
        for _ in range(200):  # bounded: the attempts back off 0.05 + 0.1 + 0.2 + 0.4 s
            if peer.dispatch_failure() is not None:
                break
            await asyncio.sleep(0.05)
        failure = peer.dispatch_failure()
        assert isinstance(failure, StatefunMeshError), f"the loop still retries after {calls} attempts"
        assert calls == INTERNAL_BATCH_ATTEMPTS
        text = str(failure)
        assert "test/counter/poison" in text and "a bug in the dispatcher" in text and "restart the peer" in text
        assert "the dispatch loop died" in (_alive(peer) or "")
        # set by the loop task's done-callback, which runs a loop turn after the task ends
        await _aio.wait_event(peer.dispatch_died, 5)
        assert peer.dispatch_died.is_set()  # `statefun-mesh peer` exits on it, for its supervisor to restart it
        with pytest.raises(StatefunMeshError, match="dispatch loop died"):  # not a wait that never ends
            await mesh.idle(timeout=10)
