"""MeshClient.egress ends when told to (stop_when_idle), every time."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from statefun_mesh import LocalMesh, MeshClient
from statefun_mesh.mesh import free_ports
from statefun_mesh.transport import codec
from tests.integration import app
from tests.integration.support import ids_on

pytestmark = pytest.mark.integration


@pytest.mark.timeout(90)
async def test_egress_reader_stops_when_idle() -> None:
    """``egress(stop_when_idle=1.0)`` must end about 1 s after the last record, on every call.

    The client's follower tasks long-poll each peer for 1 s (``wait_ms=1000``), so their
    answers arrive just when the reader's own 1 s idle timer cancels them; a follower that
    loses that cancellation loops forever and the reader never returns.
    """
    n = 6  # one follower per peer: each is a chance to hit the race
    ceps = tuple(f"tcp://127.0.0.1:{p}" for p in free_ports(n))
    async with (
        LocalMesh(app.functions, peers=n, transport="tcp", client_endpoints=ceps) as mesh,
        MeshClient(ceps[0], timeout=10) as client,
    ):
        for p in range(n):
            emitter = ids_on(p, "idle", 1, peers=n)[0]
            await mesh.request(app.json_message(app.EMIT, emitter, {"egress": "it/idle", "n": 3, "tag": "t"}))
        for attempt in range(5):
            got = 0
            started = time.monotonic()

            async def read() -> None:
                nonlocal got
                async for _ in client.egress("it/idle", stop_when_idle=1.0):
                    got += 1

            try:
                await asyncio.wait_for(read(), 6.0)
            except (asyncio.TimeoutError, TimeoutError):
                pytest.fail(
                    f"read #{attempt + 1}: egress(stop_when_idle=1.0) got all {got} records but had not "
                    f"returned {time.monotonic() - started:.1f} s later"
                )
            assert got == 3 * n


async def test_a_cancelled_client_call_raises_cancelled_error() -> None:
    """The root cause, deterministically: cancel a MeshClient call whose answer has just
    arrived but which has not resumed yet. It must raise CancelledError; under Python 3.11's
    ``asyncio.wait_for`` it returns the answer instead, so a loop around calls (the egress
    followers) never sees its cancellation."""
    ctx = zmq.asyncio.Context.instance()
    fake_peer = ctx.socket(zmq.ROUTER)
    fake_peer.setsockopt(zmq.LINGER, 0)
    port = fake_peer.bind_to_random_port("tcp://127.0.0.1")
    swallowed: list[int] = []
    try:
        async with MeshClient(f"tcp://127.0.0.1:{port}", timeout=5) as client:
            for spins in range(12):  # cancel 0, 1, 2, ... loop iterations after answering
                call = asyncio.create_task(client.info())
                ident, frame = await asyncio.wait_for(fake_peer.recv_multipart(), 5)
                _, items = codec.decode_control(frame)
                await fake_peer.send_multipart([ident, codec.encode_control(codec.R_INFO, items[0], {"peer": 0})])
                for _ in range(spins):
                    await asyncio.sleep(0)
                if call.done():
                    continue
                call.cancel()
                await asyncio.wait({call}, timeout=5)
                assert call.done()
                if not call.cancelled():
                    swallowed.append(spins)
    finally:
        fake_peer.close(0)
    assert not swallowed, (
        f"info() was cancelled (cancel() returned True) but returned its answer instead of raising "
        f"CancelledError, when cancelled {swallowed} loop iterations after the answer was sent"
    )
