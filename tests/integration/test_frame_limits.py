"""No frame exceeds max_frame_bytes; a message too large for one is refused where it is made
(issue 7 item 1). Peers talk over real ZeroMQ tcp sockets; clients use MeshClient."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio

from statefun_mesh import (
    DEAD_LETTERS,
    IntType,
    InvocationError,
    LocalMesh,
    LongType,
    MeshClient,
    MessageTooLargeError,
    MsgPackType,
    StatefulFunctions,
    ValueSpec,
    message_builder,
    simple_type,
)
from statefun_mesh._speedups import key_group, record_size
from statefun_mesh.config import FRAME_HEADROOM
from statefun_mesh.mesh import local_endpoints
from statefun_mesh.transport import codec

Raw = simple_type("test/raw", serialize_fn=bytes, deserialize_fn=bytes)
SINK = "test/sink"
RELAY = "test/relay"


def app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename=SINK, specs=[ValueSpec(name="n", type=IntType), ValueSpec(name="bytes", type=LongType)])
    def sink(context, message):
        if message.is_int():  # a read
            context.reply(int_value=context.storage.n or 0)
            return
        context.storage.n = (context.storage.n or 0) + 1
        context.storage.bytes = (context.storage.bytes or 0) + len(message.raw_value())

    @functions.bind(typename=RELAY)
    def relay(context, message):
        # [[target id, value length], ...]: sends each, in order
        for target, n in message.as_type(MsgPackType):
            context.send(message_builder(target_typename=SINK, target_id=target, value=bytes(n), value_type=Raw))

    return functions


def ids_on(peer: int, peers: int, n: int, prefix: str, maxp: int = 1024) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        id = f"{prefix}{i}"
        if key_group(id, maxp) * peers // maxp == peer:
            out.append(id)
        i += 1
    return out


def value_len(size: int, rec: tuple) -> int | None:
    """The value length that makes ``rec`` (with that value) encode to exactly ``size`` bytes."""
    lo, hi = 0, size
    while lo < hi:
        mid = (lo + hi) // 2
        if record_size((*rec[:5], bytes(mid), *rec[6:])) < size:
            lo = mid + 1
        else:
            hi = mid
    return lo if record_size((*rec[:5], bytes(lo), *rec[6:])) == size else None


def mesh_with_clients(tmp_path: Path, **settings) -> LocalMesh:
    return LocalMesh(
        app(),
        state_dir=str(tmp_path),
        peers=2,
        transport="tcp",
        client_endpoints=local_endpoints("tcp", 2, ""),
        **settings,
    )


async def counts(client: MeshClient, ids: list[str]) -> dict[str, int]:
    out = {}
    for id in ids:
        out[id] = (await client.request(message_builder(target_typename=SINK, target_id=id, int_value=0))).as_int()
    return out


def assert_channels_clean(mesh: LocalMesh) -> None:
    for p in mesh.peers:
        st = p.status()
        assert st["bad_frames"] == 0, st
        assert st["oversized_dropped"] == 0, st
        # every record sent was granted back: nothing dropped on the way
        assert st["credit"] == [mesh.config.credit_window] * mesh.config.peers, st
        assert p.router.sent_records == [q.router.received_records[p.peer_id] for q in mesh.peers], (
            p.peer_id,
            p.router.sent_records,
        )


async def settle(mesh: LocalMesh) -> None:
    await mesh.idle(timeout=60)
    for _ in range(50):  # credits travel after the last batch
        if all(p.status()["credit"] == [mesh.config.credit_window] * 2 for p in mesh.peers):
            return
        await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("clients", [1, 4])
async def test_400_one_mib_values_to_another_peers_counters_are_all_applied(tmp_path: Path, clients: int) -> None:
    """The issue's case: 400 x 1 MiB to counters owned by another peer, 32 in flight per
    client, checkpoints on (so sends are routed in group-commit batches). The old batcher
    put up to 64 records in a frame on top of what it held: over 64 MiB, dropped by the
    receiver (with 4 clients: 80 of 400 applied, credit 320 short)."""
    mesh = mesh_with_clients(tmp_path, blob_store=f"memory://frames-{uuid.uuid4().hex}", checkpoint_interval=0.5)
    async with mesh:
        targets = ids_on(1, 2, 8, "c")
        value = bytes(1 << 20)
        conns = [MeshClient(mesh.config.client_endpoints[0], timeout=60) for _ in range(clients)]
        gates = [asyncio.Semaphore(32) for _ in range(clients)]
        try:

            async def one(i: int) -> None:
                async with gates[i % clients]:
                    await conns[i % clients].send(
                        message_builder(target_typename=SINK, target_id=targets[i % 8], value=value, value_type=Raw)
                    )

            await asyncio.gather(*(one(i) for i in range(400)))
            # checkpoints were cut meanwhile: their barriers force out what is queued
            assert mesh.peers[0].participant.completed >= 1
            await settle(mesh)
            assert await counts(conns[0], targets) == {t: 50 for t in targets}
        finally:
            for c in conns:
                await c.aclose()
        assert_channels_clean(mesh)


@pytest.mark.timeout(120)
async def test_one_invocation_sending_100_one_mib_messages_to_another_peer(tmp_path: Path) -> None:
    """Sends of one batch are routed together: the old batcher put 64 of them in one frame
    over max_frame_bytes, which the receiver dropped (36 of 100 applied, credit 64 short)."""
    async with LocalMesh(app(), state_dir=str(tmp_path), peers=2, transport="tcp") as mesh:
        targets = ids_on(1, 2, 4, "f")
        (relay,) = ids_on(0, 2, 1, "r")
        await mesh.send(
            message_builder(
                target_typename=RELAY,
                target_id=relay,
                value=[[targets[i % 4], 1 << 20] for i in range(100)],
                value_type=MsgPackType,
            )
        )
        await settle(mesh)
        total = 0
        for t in targets:
            total += (await mesh.request(message_builder(target_typename=SINK, target_id=t, int_value=0))).as_int()
        assert total == 100
        assert_channels_clean(mesh)


@pytest.mark.timeout(180)
async def test_values_at_every_size_boundary_between_peers(tmp_path: Path) -> None:
    """Small frames (64 KiB) so that every boundary is cheap: the message limit, and record
    sizes that fill a frame exactly with 1, 2, 3 and 16 records, each a byte under and over."""
    mesh = mesh_with_clients(tmp_path, max_frame_bytes=65536)
    async with mesh:
        limit = mesh.config.message_limit
        assert limit == 65536 - FRAME_HEADROOM
        frame = 65536 - 8  # the envelope (generation, a credit grant) travels in the same ZeroMQ message
        targets = ids_on(1, 2, 4, "b")
        sizes = {limit - 1, limit, 100, 3072, 3073}
        for per_frame, head in ((2, 3), (3, 3), (16, 5)):
            fits = (frame - head) // per_frame
            sizes |= {fits - 1, fits, fits + 1}
        plan = []  # (target, value length) of a client record of each size
        for t in targets:
            vs = [value_len(n, (SINK, t, "", "", Raw.typename, b"", 0, 0)) for n in sorted(sizes)]
            assert sum(v is None for v in vs) <= 1, vs  # a bin8/bin16 header jump may skip one size
            plan += [(t, v) for v in vs if v is not None]
        template = (SINK, targets[0], "", "", Raw.typename, b"", 0, 0)
        expected = dict.fromkeys(targets, 0)
        gate = asyncio.Semaphore(32)
        async with MeshClient(mesh.config.client_endpoints[0], timeout=30) as client:

            async def one(target: str, v: int) -> None:
                async with gate:
                    await client.send(
                        message_builder(target_typename=SINK, target_id=target, value=bytes(v), value_type=Raw)
                    )

            jobs = []
            for _ in range(12):
                for t, v in plan:
                    jobs.append(one(t, v))
                    expected[t] += 1
            await asyncio.gather(*jobs)
            # one byte over the limit: refused before it is sent, nothing accepted
            over = value_len(limit + 1, template)
            with pytest.raises(MessageTooLargeError) as info:
                await client.send(
                    message_builder(target_typename=SINK, target_id=targets[0], value=bytes(over), value_type=Raw)
                )
            assert (info.value.size, info.value.limit) == (limit + 1, limit)
            assert str(limit) in str(info.value) and str(limit + 1) in str(info.value)
            with pytest.raises(MessageTooLargeError):
                await mesh.send(
                    message_builder(target_typename=SINK, target_id=targets[0], value=bytes(over), value_type=Raw)
                )
            # ... and the function-made messages of the same sizes, peer 0 to peer 1
            relays = ids_on(0, 2, 6, "r")
            for r in relays:
                # the relay's records carry its caller type and id: size them for that record
                batch = []
                for t in targets:
                    rtemplate = (SINK, t, RELAY, r, Raw.typename, b"", 0, 0)
                    for n in sorted(sizes):
                        v = value_len(n, rtemplate)
                        if v is not None:
                            batch.append([t, v])
                            expected[t] += 1
                await client.send(
                    message_builder(target_typename=RELAY, target_id=r, value=batch, value_type=MsgPackType)
                )
            await settle(mesh)
            assert await counts(client, targets) == expected
        assert_channels_clean(mesh)


@pytest.mark.timeout(120)
async def test_an_oversized_context_send_is_dead_lettered_and_the_batch_goes_on(tmp_path: Path) -> None:
    mesh = mesh_with_clients(tmp_path, max_frame_bytes=65536, max_batch=1000)
    async with mesh:
        limit = mesh.config.message_limit
        (target,) = ids_on(1, 2, 1, "d")
        relays = ids_on(0, 2, 3, "q")
        over = value_len(limit + 1, (SINK, target, RELAY, relays[1], Raw.typename, b"", 0, 0))
        # queued together, so they run in one batch on peer 0
        await asyncio.gather(
            mesh.send(
                message_builder(
                    target_typename=RELAY, target_id=relays[0], value=[[target, 10]], value_type=MsgPackType
                )
            ),
            mesh.send(
                message_builder(
                    target_typename=RELAY,
                    target_id=relays[1],
                    value=[[target, 10], [target, over]],
                    value_type=MsgPackType,
                )
            ),
            mesh.send(
                message_builder(
                    target_typename=RELAY, target_id=relays[2], value=[[target, 20]], value_type=MsgPackType
                )
            ),
        )
        await settle(mesh)
        async with MeshClient(mesh.config.client_endpoints[0], timeout=30) as client:
            assert await counts(client, [target]) == {target: 2}  # relays 0 and 2; nothing of relay 1
            (dead,) = [r async for r in client.egress(DEAD_LETTERS, stop_when_idle=1.0)]
        doc = json.loads(dead.raw_value())
        assert doc["target"] == f"{RELAY}/{relays[1]}"
        assert doc["reason"] == "message too large"
        assert "MessageTooLargeError" in doc["error"] and str(limit) in doc["error"]
        assert_channels_clean(mesh)


@pytest.mark.timeout(120)
async def test_a_100_mib_value_is_refused_at_once_not_timed_out(tmp_path: Path) -> None:
    mesh = mesh_with_clients(tmp_path)
    async with mesh:
        (target,) = ids_on(1, 2, 1, "h")
        huge = message_builder(target_typename=SINK, target_id=target, value=bytes(100 << 20), value_type=Raw)
        async with MeshClient(mesh.config.client_endpoints[0], timeout=30) as client:
            t0 = time.monotonic()
            with pytest.raises(MessageTooLargeError, match="over the limit"):
                await client.send(huge)
            with pytest.raises(MessageTooLargeError):
                await client.request(huge)
            assert time.monotonic() - t0 < 5
            with pytest.raises(MessageTooLargeError):
                await mesh.request(huge)
            # the connection still works
            await client.send(message_builder(target_typename=SINK, target_id=target, value=b"x", value_type=Raw))
            await settle(mesh)
            assert await counts(client, [target]) == {target: 1}


@pytest.mark.timeout(60)
async def test_the_client_endpoint_refuses_an_oversized_frame_it_receives(tmp_path: Path) -> None:
    """A client that does not check (not MeshClient) is told too, for any message that
    reaches the endpoint (up to max_frame_bytes)."""
    mesh = mesh_with_clients(tmp_path, max_frame_bytes=65536)
    async with mesh:
        limit = mesh.config.message_limit
        (target,) = ids_on(1, 2, 1, "z")
        template = (SINK, target, "", "", Raw.typename, b"", 0, 0)
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(mesh.config.client_endpoints[0])
        try:
            for corr, n in ((1, limit), (2, limit + 1)):
                v = value_len(n, template)
                await sock.send(codec.encode_control(codec.C_SEND, corr, SINK, target, Raw.typename, bytes(v), ""))
            await sock.send(
                codec.encode_control(
                    codec.C_REQUEST, 3, SINK, target, Raw.typename, bytes(value_len(limit + 1, template)), 5.0
                )
            )
            answers = {}
            for _ in range(3):
                kind, items = codec.decode_control(await asyncio.wait_for(sock.recv(), 10))
                answers[items[0]] = (kind, items)
        finally:
            sock.close(0)
        assert answers[1][0] == codec.R_ACK
        assert answers[2][0] == codec.R_ERROR and answers[2][1][1] == "MessageTooLargeError"
        assert answers[2][1][3][:2] == [limit + 1, limit]
        assert answers[3][0] == codec.R_ERROR and answers[3][1][1] == "MessageTooLargeError"
        await settle(mesh)
        async with MeshClient(mesh.config.client_endpoints[0], timeout=30) as client:
            assert await counts(client, [target]) == {target: 1}
        assert_channels_clean(mesh)


@pytest.mark.timeout(60)
async def test_an_oversized_reply_fails_the_invocation(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/echo")
    def echo(context, message):
        context.reply(value=bytes(message.as_int()), value_type=Raw)

    async with LocalMesh(functions, state_dir=str(tmp_path), peers=2, transport="tcp", max_frame_bytes=65536) as mesh:
        limit = mesh.config.message_limit
        ok = await mesh.peers[1].request(message_builder(target_typename="test/echo", target_id="e", int_value=1000))
        assert len(ok.raw_value()) == 1000
        with pytest.raises(InvocationError, match="MessageTooLargeError"):
            await mesh.peers[1].request(message_builder(target_typename="test/echo", target_id="e", int_value=limit))


def test_frames_to_the_msgpack_helper_are_consistent() -> None:
    # REPLIES frames are built by hand from packed parts: they decode as the codec's
    from statefun_mesh.transport.codec import encode_reply_frames as _reply_frames

    replies = [[i, 0, "t/v", bytes(i * 100), "a/b", str(i)] for i in range(60)]
    frames = _reply_frames(replies, 9000)
    assert max(len(f) for f in frames) <= 9000
    assert [r for f in frames for r in codec.decode_control(f)[1][0]] == replies
    assert _reply_frames(replies[:5], 1 << 20) == [codec.encode_control(codec.REPLIES, replies[:5])]
    assert msgpack.unpackb(frames[0][2:])[0][0] == replies[0]
