"""Client frames are checked before they are trusted: request timeouts, pending requests,
FETCH fields (issue 7 item 4). A real client endpoint over tcp, in-process peers."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from statefun_mesh import (
    IntType,
    LocalMesh,
    MeshBusyError,
    MeshClient,
    StatefulFunctions,
    ValueSpec,
    egress_message_builder,
    message_builder,
    simple_type,
)
from statefun_mesh.mesh import local_endpoints
from statefun_mesh.transport import codec

INT = IntType.typename
Raw = simple_type("test/raw", serialize_fn=bytes, deserialize_fn=bytes)


def app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="test/counter", specs=[ValueSpec(name="n", type=IntType)])
    def counter(context, message):
        context.storage.n = (context.storage.n or 0) + message.as_int()
        context.reply(int_value=context.storage.n)

    @functions.bind(typename="test/silent")
    def silent(context, message):
        pass  # never replies: a request to it waits until its timeout

    return functions


def int_bytes(n: int) -> bytes:
    return IntType.serializer().serialize(n)


def mesh(tmp_path: Path, **settings) -> LocalMesh:
    return LocalMesh(app(), state_dir=str(tmp_path), client_endpoints=local_endpoints("tcp", 1, ""), **settings)


def dealer(endpoint: str) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


async def answers(sock: zmq.asyncio.Socket, n: int, timeout: float = 10) -> dict[int, tuple[int, list]]:
    out = {}
    for _ in range(n):
        kind, items = codec.decode_control(await asyncio.wait_for(sock.recv(), timeout))
        out[items[0]] = (kind, items)
    return out


async def test_meshclient_refuses_bad_timeouts_locally(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m, MeshClient(m.config.client_endpoints[0], timeout=5) as client:
        msg = message_builder(target_typename="test/counter", target_id="x", int_value=1)
        for bad in (math.nan, math.inf, -math.inf, -1, 0, "1", True):
            t0 = time.monotonic()
            with pytest.raises(ValueError, match="timeout"):
                await client.request(msg, timeout=bad)
            assert time.monotonic() - t0 < 1
        with pytest.raises(ValueError, match="max_request_timeout"):
            await client.request(msg, timeout=10_000)  # the peer's maximum: 300 s by default
        for bad in (math.nan, 0, -1):
            with pytest.raises(ValueError):
                MeshClient(m.config.client_endpoints[0], timeout=bad)
        # nothing of the refused requests was applied
        assert (await client.request(msg, timeout=5)).as_int() == 1


@pytest.mark.timeout(60)
async def test_nan_timeouts_are_refused_and_the_peer_keeps_its_heartbeats(tmp_path: Path) -> None:
    """Twenty REQUEST frames with a NaN timeout stopped a peer's timers (heartbeats,
    checkpoints) for over a minute: asyncio's timer heap does not order NaN."""
    async with mesh(tmp_path) as m:
        sock = dealer(m.config.client_endpoints[0])
        try:
            bad = {i: t for i, t in enumerate([math.nan] * 20 + [math.inf, -1.0, 0, 0.0, 301, -math.inf], 1)}
            for corr, t in bad.items():
                await sock.send(codec.encode_control(codec.C_REQUEST, corr, "test/counter", "n", INT, int_bytes(1), t))
            got = await answers(sock, len(bad))
        finally:
            sock.close(0)
        for corr in bad:
            kind, items = got[corr]
            assert kind == codec.R_ERROR and items[1] == "ValueError", (bad[corr], items)
            assert "timeout" in items[2]
        # timers still run: a sleep wakes on time, and nothing was applied
        t0 = time.monotonic()
        await asyncio.sleep(0.2)
        assert time.monotonic() - t0 < 1
        r = await m.request(message_builder(target_typename="test/counter", target_id="n", int_value=0), timeout=5)
        assert r.as_int() == 0


@pytest.mark.timeout(60)
async def test_pending_requests_are_bounded_per_connection_and_in_total(tmp_path: Path) -> None:
    async with mesh(tmp_path, max_pending_requests=5, max_pending_requests_per_client=3) as m:
        ep = m.config.client_endpoints[0]
        a, b = dealer(ep), dealer(ep)
        try:
            for corr in (1, 2, 3, 4):  # 3 held for a, the 4th refused
                await a.send(codec.encode_control(codec.C_REQUEST, corr, "test/silent", "s", INT, int_bytes(0), 3.0))
            got = await answers(a, 1)
            assert got[4][0] == codec.R_ERROR and got[4][1][1] == "MeshBusyError", got
            assert "max_pending_requests_per_client" in got[4][1][2]
            for corr in (5, 6, 7):  # 2 more for b make 5 in total; the 3rd is refused
                await b.send(codec.encode_control(codec.C_REQUEST, corr, "test/silent", "s", INT, int_bytes(0), 3.0))
            got = await answers(b, 1)
            assert got[7][0] == codec.R_ERROR and got[7][1][1] == "MeshBusyError", got
            assert "max_pending_requests" in got[7][1][2]
            # MeshClient raises it
            async with MeshClient(ep, timeout=5) as client:
                with pytest.raises(MeshBusyError):
                    await client.request(
                        message_builder(target_typename="test/silent", target_id="s", int_value=0), timeout=1
                    )
            # the held ones end with their timeout, and the budget is back
            got = {**await answers(a, 3, timeout=10), **await answers(b, 2, timeout=10)}
            assert {k for k, (kind, _) in got.items() if kind == codec.R_ERROR} == {1, 2, 3, 5, 6}
            await a.send(codec.encode_control(codec.C_REQUEST, 9, "test/counter", "c", INT, int_bytes(2), 5.0))
            got = await answers(a, 1)
            assert got[9][0] == codec.R_REPLY
        finally:
            a.close(0)
            b.close(0)
        # an embedded peer bounds its pending requests too
        peer = m.peers[0]
        tasks = [
            asyncio.create_task(
                peer.request(message_builder(target_typename="test/silent", target_id="s", int_value=0), timeout=2)
            )
            for _ in range(5)
        ]
        await asyncio.sleep(0.1)
        with pytest.raises(MeshBusyError):
            await peer.request(message_builder(target_typename="test/silent", target_id="s", int_value=0), timeout=2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_fetch_fields_out_of_range_are_refused(tmp_path: Path) -> None:
    async with mesh(tmp_path) as m:
        sock = dealer(m.config.client_endpoints[0])
        try:
            frames = {
                1: ("it/out", "earliest", 0, 0, -1),  # max_records 0
                2: ("it/out", "earliest", 10**6, 0, -1),  # max_records over 10,000
                3: ("it/out", "earliest", 10, -1, -1),  # wait_ms < 0
                4: ("it/out", "earliest", 10, 10**9, -1),  # wait_ms over a minute
                5: ("it/out", "earliest", 10, 0, -2),  # generation < -1
                6: ("it/out", "earliest", 10, 0, 2**40),  # generation beyond u32
                7: ("it/out", 2**63, 10, 0, -1),  # offset beyond i64
                8: ("it/out", "earliest", 10, 0, -1),  # fine
            }
            for corr, items in frames.items():
                await sock.send(codec.encode_control(codec.C_FETCH, corr, *items))
            got = await answers(sock, len(frames))
        finally:
            sock.close(0)
        for corr in range(1, 8):
            assert got[corr][0] == codec.R_ERROR and got[corr][1][1] == "ValueError", (frames[corr], got[corr])
        assert got[8][0] == codec.R_RECORDS


async def test_a_fetch_answer_stays_within_a_frame(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/emit")
    def emit(context, message):
        for _ in range(5):
            context.send_egress(egress_message_builder(target_typename="test/out", value=bytes(30_000), value_type=Raw))

    async with LocalMesh(
        functions, state_dir=str(tmp_path), client_endpoints=local_endpoints("tcp", 1, ""), max_frame_bytes=65536
    ) as m:
        await m.send(message_builder(target_typename="test/emit", target_id="e", int_value=0))
        await m.idle()
        sock = dealer(m.config.client_endpoints[0])
        try:
            offsets, pos = [], 0
            for corr in range(1, 5):
                await sock.send(codec.encode_control(codec.C_FETCH, corr, "test/out", pos, 1000, 0, -1))
                kind, items = (await answers(sock, 1))[corr]
                assert kind == codec.R_RECORDS
                records = items[3]
                assert 1 <= len(records) <= 2  # 5 x 30 kB do not go in one 64 KiB answer
                offsets += [r[0] for r in records]
                pos = items[2]
                if pos == 5:
                    break
        finally:
            sock.close(0)
        assert offsets == [0, 1, 2, 3, 4]
