"""Every answer a client endpoint owes reaches its client, however slowly the client reads
(the ROUTER dropped them at its send high-water mark: acknowledgements lost under a long
overload), and one it cannot deliver (the client is gone) is counted, not lost silently.
A real client endpoint in process, real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import zmq
import zmq.asyncio

from statefun_mesh import IntType, LocalMesh, MeshClient, message_builder
from statefun_mesh.mesh import local_endpoints
from statefun_mesh.transport import codec
from tests.integration.test_client_limits import app, int_bytes  # the same two functions

INT = IntType.typename


def slow_dealer(endpoint: str) -> zmq.asyncio.Socket:
    """A client that does not read while it sends: its receive queue holds one message, so the
    peer's ROUTER reaches its send high-water mark after ~1,000 answers (inproc: no kernel buffers)."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    return sock


async def test_a_client_that_reads_slowly_gets_every_acknowledgement(tmp_path: Path) -> None:
    n = 5000
    async with LocalMesh(app(), state_dir=str(tmp_path), client_endpoints=local_endpoints("inproc", 1, "")) as m:
        sock = slow_dealer(m.config.client_endpoints[0])
        try:
            for corr in range(1, n + 1):
                await sock.send(codec.encode_control(codec.C_SEND, corr, "test/counter", "c", INT, int_bytes(1), ""))
            await m.idle()
            await asyncio.sleep(0.2)  # every send is applied and acknowledged (or dropped) by now
            got: dict[int, int] = {}
            deadline = time.monotonic() + 30
            while len(got) < n and time.monotonic() < deadline:
                try:
                    frame = await asyncio.wait_for(sock.recv(), 2.0)
                except (asyncio.TimeoutError, TimeoutError):
                    break
                kind, items = codec.decode_control(frame)
                got[items[0]] = kind
        finally:
            sock.close(0)
        missing = sorted(set(range(1, n + 1)) - set(got))
        assert not missing, f"{len(missing)} of {n} sends were never acknowledged (first: {missing[:5]})"
        assert set(got.values()) == {codec.R_ACK}
        async with MeshClient(m.config.client_endpoints[0], timeout=5) as client:
            reply = await client.request(message_builder(target_typename="test/counter", target_id="c", int_value=0))
            assert reply.as_int() == n  # each applied once
            status = (await client.info())["status"]
        assert status["replies_undeliverable"] == 0, status
        assert status["replies_queued"] == 0, status


async def test_an_answer_to_a_client_that_is_gone_is_counted(tmp_path: Path) -> None:
    async with LocalMesh(app(), state_dir=str(tmp_path), client_endpoints=local_endpoints("inproc", 1, "")) as m:
        ep = m.config.client_endpoints[0]
        sock = slow_dealer(ep)
        await sock.send(codec.encode_control(codec.C_REQUEST, 1, "test/silent", "s", INT, int_bytes(0), 0.3))
        await asyncio.sleep(0.1)  # the peer holds the request
        sock.close(0)  # and the client goes away before its timeout answer
        await asyncio.sleep(0.6)
        async with MeshClient(ep, timeout=5) as client:
            status = (await client.info())["status"]
        assert status["replies_undeliverable"] == 1, status
        assert status["replies_queued"] == 0, status
