"""Request latency at light load (issue 9): what a peer does per request besides the work.

- The batch loop yields to the event loop after a batch only when it would go straight into
  another one; after a batch that left nothing to do, its idle wait yields anyway, and the
  extra ``asyncio.sleep(0)`` was one more turn of the event loop (a ``select`` call) per request.
- A peer process freezes its start-up heap (``gc.freeze``), so no collection walks it again
  in the middle of a request.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, message_builder

pytestmark = pytest.mark.timeout(60)


def app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="rp/counter", specs=[ValueSpec(name="count", type=IntType)])
    def counter(context: Any, message: Any) -> None:
        context.storage.count = (context.storage.count or 0) + 1
        if context.in_request:
            context.reply(int_value=context.storage.count)

    return functions


async def test_a_batch_that_leaves_nothing_to_do_is_not_followed_by_an_extra_yield(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: one ``sleep(0)`` per batch, so 100 sequential requests made 100 of them."""
    n = 100
    zero = 0
    real = asyncio.sleep

    async def counted(delay: float, result: Any = None) -> Any:
        nonlocal zero
        zero += delay == 0
        return await real(delay, result)

    async with LocalMesh(app(), state_dir=tmp_path, peers=1) as mesh:
        await mesh.request(message_builder(target_typename="rp/counter", target_id="a", int_value=1))
        monkeypatch.setattr(asyncio, "sleep", counted)
        for i in range(n):
            reply = await mesh.request(message_builder(target_typename="rp/counter", target_id="a", int_value=1))
            assert reply.as_int() == i + 2
        monkeypatch.setattr(asyncio, "sleep", real)
        assert mesh.peers[0].batches >= n
    assert zero < n // 10, f"{zero} yields for {n} requests"


async def test_the_loop_still_yields_between_batches_while_records_wait(tmp_path: Path) -> None:
    """Fairness kept: while a stream of sync work keeps the inbox full, a request from outside
    is still answered (the loop yields between batches when another batch follows)."""

    functions = app()

    @functions.bind(typename="rp/spin")
    def spin(context: Any, message: Any) -> None:
        if message.as_int() > 0:
            context.send(
                message_builder(target_typename="rp/spin", target_id=context.address.id, int_value=message.as_int() - 1)
            )

    async with LocalMesh(functions, state_dir=tmp_path, peers=1, max_batch=10) as mesh:
        for i in range(20):
            await mesh.send(message_builder(target_typename="rp/spin", target_id=f"s{i}", int_value=5_000))
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await asyncio.wait_for(
            mesh.request(message_builder(target_typename="rp/counter", target_id="b", int_value=1)), 10
        )
        assert reply.as_int() == 1 and loop.time() - started < 5
        assert mesh.peers[0].router.inbox  # the spin was still going


def test_freeze_startup_objects_keeps_later_garbage_collectable() -> None:
    """In a process of its own (it freezes the whole heap): the start-up objects are frozen, a
    full collection no longer walks them, and cycles made afterwards are still collected."""
    code = textwrap.dedent(
        """
        import gc, time, weakref
        import statefun_mesh.peer  # a peer's modules
        from statefun_mesh.memory import freeze_startup_objects
        before = len(gc.get_objects())
        frozen = freeze_startup_objects()
        assert frozen >= before // 2, (frozen, before)
        assert len(gc.get_objects()) < 100, len(gc.get_objects())
        class Node: pass
        a, b = Node(), Node()
        a.other, b.other = b, a
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None
        print("ok", frozen)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


@pytest.mark.integration  # a MeshClient over tcp
async def test_the_client_endpoint_counts_each_answered_request_by_its_service_time(tmp_path: Path) -> None:
    """status()["request_service_us_log2"]: the time inside the peer, from the request frame's
    arrival to its answer's send, as a log2 histogram (what a client's latency is made of,
    without the client's own scheduling; bench/request_path.py reads it)."""
    from statefun_mesh import MeshClient
    from statefun_mesh.mesh import free_ports

    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    async with LocalMesh(app(), state_dir=tmp_path, client_endpoints=[endpoint]), MeshClient(endpoint) as client:
        for i in range(20):
            reply = await client.request(message_builder(target_typename="rp/counter", target_id="c", int_value=1))
            assert reply.as_int() == i + 1
        hist = (await client.info())["status"]["request_service_us_log2"]
    assert sum(hist) == 20 and len(hist) == 26
    assert sum(hist[4:]) == 20  # no answer in under 8 µs: the request went through a batch
