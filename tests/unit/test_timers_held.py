"""Timers held after a recovery must not starve the peer's event loop.

After a recovery round a peer fires no timer until every other peer's REPLAYED marker has
come (a replayed cancellation must not be overtaken by its timer). The soak test
(tests/integration/test_soak.py, 100 SIGKILLs) found a peer whose loop, idle with an overdue
timer held, waited with that timer's deadline: already past, so the wait returned at once,
and the loop went round without ever yielding. It never read the marker that would have
released the timer: the peer answered nothing, for minutes, and the whole mesh stalled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from pathlib import Path

from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, message_builder


def timer_functions() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="test/setter")
    def setter(context, message):
        later = message_builder(target_typename="test/target", target_id=context.address.id, int_value=1)
        context.send_after(timedelta(milliseconds=1), later)

    @functions.bind(typename="test/target", specs=[ValueSpec(name="fired", type=IntType)])
    def target(context, message):
        if not context.in_request:
            context.storage.fired = (context.storage.fired or 0) + 1
        else:
            context.reply(int_value=context.storage.fired or 0)

    return functions


async def test_an_overdue_timer_held_after_a_recovery_does_not_starve_the_event_loop(tmp_path: Path) -> None:
    async with LocalMesh(timer_functions(), state_dir=str(tmp_path), peers=2) as mesh:
        peers = mesh.peers
        # as right after a recovery round, before any other peer's REPLAYED marker came
        for p in peers:
            p.replay.timers_held = True
            p.replay.markers_from = set()
        await mesh.send(message_builder(target_typename="test/setter", target_id="a", int_value=0))
        loop = asyncio.get_running_loop()
        turned = threading.Event()
        starved: list[bool] = []

        def probe() -> None:
            time.sleep(0.5)  # the timer is overdue and held by now; the peers are otherwise idle
            loop.call_soon_threadsafe(turned.set)
            starved.append(not turned.wait(2.0))
            # the markers come: this releases the timers, also from a loop that never yields
            for p in peers:
                p.replay.markers_from.update(range(len(peers)))
            loop.call_soon_threadsafe(lambda: [p._wake.set() for p in peers])

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        await asyncio.sleep(3.0)
        thread.join(10)
        assert starved == [False], "the event loop did not turn for 2 s while a held timer was overdue"

        async def fired() -> int:
            reply = await mesh.request(message_builder(target_typename="test/target", target_id="a", int_value=0))
            return reply.as_int()  # type: ignore[no-any-return]

        deadline = time.monotonic() + 10
        while await fired() == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert await fired() == 1, "the released timer did not fire exactly once"
