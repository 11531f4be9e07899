"""statefun_mesh._aio: timed waits that never lose a cancellation (CPython gh-86296)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, _aio, message_builder


async def _cancel_as_it_wakes(wait) -> str:
    """A task in a timed wait on an event is cancelled in the same loop iteration as the
    event is set: it must end cancelled, not go on."""
    event = asyncio.Event()
    rounds = 0

    async def waiter() -> None:
        nonlocal rounds
        while rounds < 3:
            rounds += 1
            try:
                await wait(event.wait(), 10.0)
            except (asyncio.TimeoutError, TimeoutError):
                pass
            event.clear()

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    event.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        return "went on waiting"
    return "cancelled" if task.cancelled() else "returned"


async def test_a_cancellation_as_the_event_is_set_is_never_lost() -> None:
    assert await _cancel_as_it_wakes(_aio.wait_for) == "cancelled"
    assert await _cancel_as_it_wakes(_aio._wait_for) == "cancelled"  # the < 3.12 implementation, on any Python


async def test_wait_for_returns_the_result_and_times_out() -> None:
    for impl in (_aio.wait_for, _aio._wait_for):
        assert await impl(asyncio.sleep(0, result=7), 1.0) == 7
        assert await impl(asyncio.sleep(0, result=8), None) == 8
        cancelled = []

        async def slow(cancelled: list[bool] = cancelled) -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await impl(slow(), 0.05)
        assert cancelled == [True]  # cancelled and finished before the timeout is raised
        with pytest.raises(ZeroDivisionError):
            await impl(_raises(), 1.0)
    assert await _aio.wait_event(asyncio.Event(), 0.01) is False
    ev = asyncio.Event()
    ev.set()
    assert await _aio.wait_event(ev, 0.01) is True


async def _raises() -> None:
    raise ZeroDivisionError


@pytest.mark.timeout(60)
async def test_a_peer_halted_as_frames_wake_its_loop_stops_it(tmp_path: Path) -> None:
    # The CI stall: a recovery cancelled the dispatch loop as a frame set its wake-up event;
    # the loop waited with a deadline (a timer pending), the cancellation was lost, and the
    # recovery waited for the loop for ever.
    functions = StatefulFunctions()

    @functions.bind(typename="aio/t", specs=[ValueSpec(name="n", type=IntType)])
    def t(context, message):
        context.send_after(timedelta(hours=1), message_builder(target_typename="aio/t", target_id="x", int_value=1))

    async with LocalMesh(functions, peers=1, state_dir=str(tmp_path / "s")) as mesh:
        peer = mesh.peers[0]
        await mesh.send(message_builder(target_typename="aio/t", target_id="x", int_value=1))
        for _ in range(200):
            if peer.batch_loop.next_due is not None and peer.is_idle():
                break
            await asyncio.sleep(0.01)
        assert peer.batch_loop.next_due is not None, "no timer pending: the loop would not wait with a deadline"
        loop_task = peer.dispatch_task
        assert loop_task is not None
        peer._wake.set()
        peer._halt()
        done, _ = await asyncio.wait({loop_task}, timeout=2.0)
        assert done, "the dispatch loop went on after it was cancelled"
        assert loop_task.cancelled()
