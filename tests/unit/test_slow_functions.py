"""Slow functions: an async invocation that awaits for seconds stalls only its own address
(it is parked, later messages to it queue behind it, everything else flows), and a sync
function that blocks the event loop is reported by the watchdog, naming it."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from statefun_mesh import IntType, LocalMesh, MsgPackType, StatefulFunctions, ValueSpec, message_builder

SLOW = 5.0  # seconds the slow invocation awaits


def slow_app(log: list[tuple[str, int]]) -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="t/acc", specs=[ValueSpec(name="seen", type=MsgPackType)])
    async def acc(context, message):
        n = message.as_int()
        log.append((context.address.id, n))
        if n < 0:  # the slow one
            await asyncio.sleep(SLOW)
        elif n % 3 == 0:
            await asyncio.sleep(0)  # a real (short) await
        seen = (context.storage.seen or []) + [n]
        context.storage.seen = seen
        context.send(message_builder(target_typename="t/count", target_id=context.address.id, int_value=1))
        if context.in_request:
            context.reply(value=seen, value_type=MsgPackType)

    @functions.bind(typename="t/count", specs=[ValueSpec(name="n", type=IntType)])
    def count(context, message):
        context.storage.n = (context.storage.n or 0) + message.as_int()
        if context.in_request:
            context.reply(int_value=context.storage.n)

    return functions


def msg(typename: str, id: str, n: int):
    return message_builder(target_typename=typename, target_id=id, int_value=n)


@pytest.mark.parametrize("peers", [1, 2])
@pytest.mark.timeout(60)
async def test_a_slow_async_address_stalls_only_itself(tmp_path: Path, peers: int) -> None:
    calls: list[tuple[str, int]] = []
    async with LocalMesh(slow_app(calls), state_dir=str(tmp_path), peers=peers) as mesh:
        t0 = time.monotonic()
        await mesh.send(msg("t/acc", "slow", -1))
        while ("slow", -1) not in calls:  # the slow invocation is under way
            await asyncio.sleep(0.01)
        # later messages to the slow address queue behind it, in order
        for i in range(1, 6):
            await mesh.send(msg("t/acc", "slow", i))
        slow_reply = asyncio.ensure_future(mesh.request(msg("t/acc", "slow", 6), timeout=30))
        # meanwhile every other address is served promptly (same peer and the other one)
        latencies = []
        for round_ in range(3):
            for k in range(20):
                t = time.monotonic()
                r = await mesh.request(msg("t/acc", f"k{k}", round_ * 20 + k + 1), timeout=10)
                latencies.append(time.monotonic() - t)
                assert r.as_type(MsgPackType)[-1] == round_ * 20 + k + 1
        assert time.monotonic() - t0 < SLOW - 0.5, "the slow invocation ended before the fast ones were checked"
        assert max(latencies) < 1.0, f"requests to other addresses waited up to {max(latencies):.2f} s"
        assert not slow_reply.done()
        assert [n for a, n in calls if a == "slow"] == [-1]  # nothing overtook the parked invocation
        assert sum(p.status()["parked"] for p in mesh.peers) == 1
        # the slow address, once its invocation returns: every message once, in order
        seen = (await slow_reply).as_type(MsgPackType)
        assert time.monotonic() - t0 >= SLOW
        assert seen == [-1, 1, 2, 3, 4, 5, 6]
        assert [n for a, n in calls if a == "slow"] == [-1, 1, 2, 3, 4, 5, 6]
        await mesh.idle()
        for k in ("slow", "k0", "k19"):
            n = (await mesh.request(message_builder(target_typename="t/count", target_id=k, int_value=0))).as_int()
            assert n == (7 if k == "slow" else 3)
        assert sum(p.status()["parked"] for p in mesh.peers) == 0
        assert sum(p.status()["failures"] for p in mesh.peers) == 0


@pytest.mark.timeout(60)
async def test_close_waits_for_a_parked_invocation(tmp_path: Path) -> None:
    calls: list[tuple[str, int]] = []
    functions = slow_app(calls)
    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        await mesh.send(msg("t/acc", "slow", -1))
        await mesh.send(msg("t/acc", "slow", 1))
        while ("slow", -1) not in calls:
            await asyncio.sleep(0.01)
    # the state survives the close: the parked invocation and the one behind it committed
    async with LocalMesh(functions, state_dir=str(tmp_path)) as mesh:
        r = await mesh.request(msg("t/acc", "slow", 2))
        assert r.as_type(MsgPackType) == [-1, 1, 2]


@pytest.mark.timeout(60)
async def test_sync_function_blocking_the_loop_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="t/blocker")
    def blocker(context, message):
        time.sleep(message.as_int() / 1000)
        context.reply(int_value=message.as_int())

    caplog.set_level(logging.WARNING, logger="statefun_mesh")
    async with LocalMesh(functions, state_dir=str(tmp_path), block_warning=0.3) as mesh:
        await mesh.request(message_builder(target_typename="t/blocker", target_id="fast", int_value=1))
        assert not [r for r in caplog.records if "event loop" in r.getMessage()]
        await mesh.request(message_builder(target_typename="t/blocker", target_id="b-7", int_value=1500))
        await asyncio.sleep(0.3)  # the loop runs again: the closing line
    lines = [r.getMessage() for r in caplog.records if "event loop" in r.getMessage()]
    assert any("sync function t/blocker (address t/blocker/b-7) has held the event loop for" in m for m in lines), lines
    assert any("still holds the event loop" in m for m in lines), lines  # at 0.6 s and 1.2 s
    held = [m for m in lines if "held the event loop for" in m and "runs again" in m]
    assert held, lines
    seconds = float(held[-1].split("held the event loop for ")[1].split(" s")[0])
    assert 1.3 <= seconds <= 3.0, held


@pytest.mark.timeout(60)
async def test_async_function_blocking_between_awaits_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="t/ablocker")
    async def ablocker(context, message):
        await asyncio.sleep(0)
        time.sleep(0.8)  # blocking call in an async function
        context.reply(int_value=1)

    caplog.set_level(logging.WARNING, logger="statefun_mesh")
    async with LocalMesh(functions, state_dir=str(tmp_path), block_warning=0.3) as mesh:
        await mesh.request(message_builder(target_typename="t/ablocker", target_id="x", int_value=1))
    lines = [r.getMessage() for r in caplog.records if "event loop" in r.getMessage()]
    assert any("async function t/ablocker (address t/ablocker/x)" in m for m in lines), lines


@pytest.mark.timeout(60)
async def test_in_thread_sync_function_blocks_only_its_address(tmp_path: Path) -> None:
    from statefun_mesh import in_thread

    functions = StatefulFunctions()
    threads: set[str] = set()

    @functions.bind(typename="t/report", specs=[ValueSpec(name="seen", type=MsgPackType)])
    @in_thread
    def report(context, message):
        import threading

        threads.add(threading.current_thread().name)
        if message.as_int() < 0:
            time.sleep(3)  # blocking, but in a worker thread
        context.storage.seen = (context.storage.seen or []) + [message.as_int()]
        context.send(message_builder(target_typename="t/count", target_id="all", int_value=1))
        if context.in_request:
            context.reply(value=context.storage.seen, value_type=MsgPackType)

    @functions.bind(typename="t/count", specs=[ValueSpec(name="n", type=IntType)])
    def count(context, message):
        context.storage.n = (context.storage.n or 0) + message.as_int()
        if context.in_request:
            context.reply(int_value=context.storage.n)

    with pytest.raises(TypeError, match="async already"):
        in_thread(report)
    async with LocalMesh(functions, state_dir=str(tmp_path), block_warning=0.5) as mesh:
        t0 = time.monotonic()
        await mesh.send(msg("t/report", "slow", -1))
        await mesh.send(msg("t/report", "slow", 1))
        slow = asyncio.ensure_future(mesh.request(msg("t/report", "slow", 2), timeout=20))
        for k in range(10):
            t = time.monotonic()
            r = await mesh.request(msg("t/report", f"k{k}", k))
            assert time.monotonic() - t < 1.0
            assert r.as_type(MsgPackType) == [k]
        assert time.monotonic() - t0 < 2.5 and not slow.done()
        assert (await slow).as_type(MsgPackType) == [-1, 1, 2]
        await mesh.idle()
        assert (await mesh.request(msg("t/count", "all", 0))).as_int() == 13
    assert "MainThread" not in threads


@pytest.mark.timeout(60)
async def test_async_function_may_await_a_request_to_another_address(tmp_path: Path) -> None:
    functions = StatefulFunctions()
    mesh_ref: list[LocalMesh] = []

    @functions.bind(typename="t/asker")
    async def asker(context, message):
        answer = await mesh_ref[0].request(msg("t/answerer", "x", message.as_int()), timeout=5)
        context.reply(int_value=answer.as_int() + 1)

    @functions.bind(typename="t/answerer")
    def answerer(context, message):
        context.reply(int_value=message.as_int() * 10)

    async with LocalMesh(functions, state_dir=str(tmp_path), peers=2) as mesh:
        mesh_ref.append(mesh)
        for i in range(5):
            r = await mesh.request(msg("t/asker", f"a{i}", i), timeout=10)
            assert r.as_int() == i * 10 + 1


@pytest.mark.timeout(60)
async def test_failed_commits_around_parked_invocations_apply_everything_once(tmp_path: Path) -> None:
    """Commits fail (as on a full disk) while a parked invocation finishes and while
    another one is being parked: the batches are retried, and every message is applied
    once, in order per address."""
    from statefun_mesh.errors import StateCapacityError

    calls: list[tuple[str, int]] = []
    async with LocalMesh(slow_app(calls), state_dir=str(tmp_path)) as mesh:
        peer = mesh.peers[0]
        backend = peer.backend
        real_commit = backend.commit
        window = [float("inf"), float("inf")]
        failed = [0]

        def commit(ops):
            if window[0] <= time.monotonic() < window[1]:
                failed[0] += 1
                raise StateCapacityError("injected: the disk is full")
            return real_commit(ops)

        backend.commit = commit
        global SLOW
        old_slow, SLOW = SLOW, 0.6
        try:
            await mesh.send(msg("t/acc", "slow", -1))
            while ("slow", -1) not in calls:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            window[:] = [t0 + 0.3, t0 + 1.2]  # covers the slow invocation's end (0.6 s)
            for i in range(1, 4):
                await mesh.send(msg("t/acc", "slow", i))
            for k in range(5):
                await mesh.send(msg("t/acc", f"k{k}", k + 1))
            await asyncio.sleep(0.35)
            await mesh.send(msg("t/acc", "slow", 4))  # queued by a batch whose commit fails
            await mesh.send(msg("t/acc", "slow2", -1))  # parked by a batch whose commit fails
            await mesh.send(msg("t/acc", "slow2", 7))
            for k in range(5):
                await mesh.send(msg("t/acc", f"k{k}", k + 10))
            await mesh.idle(timeout=30)
        finally:
            SLOW = old_slow
        assert failed[0] >= 2
        expected = [("slow", [-1, 1, 2, 3, 4]), ("slow2", [-1, 7])] + [(f"k{k}", [k + 1, k + 10]) for k in range(5)]
        for key, want in expected:
            r = await mesh.request(msg("t/count", key, 0))
            assert r.as_int() == len(want), (key, r.as_int())
        seen = {}
        for key in ("slow", "slow2"):
            calls_before = len(calls)
            seen[key] = (await mesh.request(msg("t/acc", key, 100))).as_type(MsgPackType)
            assert len(calls) == calls_before + 1
        assert seen["slow"] == [-1, 1, 2, 3, 4, 100]
        assert seen["slow2"] == [-1, 7, 100]
