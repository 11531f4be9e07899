"""A cancelled timer must not stay "due": an idle peer uses no CPU and closes at once (issue 7 item 2)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

from statefun_mesh import LocalMesh, StatefulFunctions, message_builder


def scheduler() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="test/sched")
    def sched(context, message):
        op = message.as_string()
        if op.startswith("schedule"):
            context.send_after(
                timedelta(milliseconds=200),
                message_builder(target_typename="test/sink", target_id="s", str_value="fired"),
                cancellation_token=op,
            )
        else:
            context.cancel_delayed_message(op.split(":", 1)[1])

    @functions.bind(typename="test/sink")
    def sink(context, message):
        raise AssertionError("a cancelled timer fired")

    return functions


def msg(id: str, text: str) -> object:
    return message_builder(target_typename="test/sched", target_id=id, str_value=text)


async def test_idle_peer_with_cancelled_timers_uses_no_cpu_and_closes_fast(tmp_path: Path) -> None:
    mesh = LocalMesh(scheduler(), state_dir=str(tmp_path))
    await mesh.start()
    try:
        for i in range(3):  # the earliest, a middle and the last timer, all cancelled
            await mesh.send(msg(f"a{i}", f"schedule{i}"))
            await mesh.send(msg(f"a{i}", f"cancel:schedule{i}"))
        await mesh.idle(timeout=5)
        await asyncio.sleep(0.4)  # past every due time
        peer = mesh.peers[0]
        batches = peer.batches
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(1.5)
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        # spinning on a cancelled timer ran ~100,000 empty batches a second at 100 % CPU
        assert peer.batches - batches <= 1, peer.batches - batches
        assert cpu < 0.25 * wall, f"idle peer used {cpu:.2f} s CPU in {wall:.2f} s"
        assert peer.status()["next_timer_ms"] is None
        assert peer.dispatcher.failures == 0
    finally:
        t0 = time.monotonic()
        await asyncio.wait_for(mesh.aclose(), 10)
        closed_in = time.monotonic() - t0
    assert closed_in < 1.0, f"closing took {closed_in:.2f} s"


async def test_next_due_follows_a_cancel_of_the_earliest_timer(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="test/sched")
    def sched(context, message):
        op = message.as_string()
        if op == "schedule":
            context.send_after(
                timedelta(seconds=30),
                message_builder(target_typename="test/sched", target_id="x", str_value="late"),
                cancellation_token="early",
            )
            context.send_after(
                timedelta(seconds=60),
                message_builder(target_typename="test/sched", target_id="x", str_value="later"),
                cancellation_token="late",
            )
        elif op == "cancel":
            context.cancel_delayed_message("early")

    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        peer = mesh.peers[0]
        await mesh.send(message_builder(target_typename="test/sched", target_id="x", str_value="schedule"))
        await mesh.idle(timeout=5)
        first = peer.status()["next_timer_ms"]
        await mesh.send(message_builder(target_typename="test/sched", target_id="x", str_value="cancel"))
        await mesh.idle(timeout=5)
        assert peer.status()["next_timer_ms"] == first + 30_000
