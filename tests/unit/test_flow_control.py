"""Credit-based flow control between peers, and admission of client messages.

Regression for a credit leak: a peer sends whole frames while its credit is positive,
so it can have more records outstanding than the credit window; the receiver then owes
(and grants) more than one window, and a sender that refused such a grant lost that
credit for good and stalled until a checkpoint forced its frames out.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, message_builder
from statefun_mesh._speedups import key_group
from statefun_mesh.transport import codec

pytestmark = pytest.mark.timeout(60)

MAX_PARALLELISM = 128


def app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="fc/counter", specs=[ValueSpec(name="count", type=IntType)])
    def counter(context, message):
        context.storage.count = (context.storage.count or 0) + message.as_int()
        if context.in_request:
            context.reply(int_value=context.storage.count)

    return functions


def ids_on(peer: int, peers: int, count: int, prefix: str) -> list[str]:
    out = [f"{prefix}-{i}" for i in range(count * peers * 8)]
    return [k for k in out if key_group(k, MAX_PARALLELISM) * peers // MAX_PARALLELISM == peer][:count]


@pytest.mark.parametrize("transport", ["memory", "inproc"])
async def test_frames_larger_than_the_credit_window_keep_flowing(tmp_path: Path, transport: str) -> None:
    # Frames of up to 64 records against a window of 10: every frame overdraws the
    # sender's credit, and every grant exceeds the window.
    settings = dict(
        credit_window=10, max_frame_records=64, inbox_limit=50, max_batch=16, max_parallelism=MAX_PARALLELISM
    )
    keys = ids_on(1, 2, 20, "fc")
    assert len(keys) == 20
    n = 2000
    async with LocalMesh(app(), state_dir=tmp_path, peers=2, transport=transport, **settings) as mesh:
        entry = mesh.peers[0]  # every target lives on peer 1: everything crosses the channel
        for i in range(n):
            await entry.send(message_builder(target_typename="fc/counter", target_id=keys[i % len(keys)], int_value=1))
        await asyncio.wait_for(mesh.idle(), 30)
        counts = [
            (await mesh.request(message_builder(target_typename="fc/counter", target_id=k, int_value=0))).as_int()
            for k in keys
        ]
        status = mesh.status()
    assert counts == [n // len(keys)] * len(keys)
    assert [s["bad_frames"] for s in status] == [0, 0], status
    # every record came back as credit: nothing is left outstanding
    assert status[0]["credit"][1] == 10, status


async def test_a_grant_beyond_what_is_outstanding_is_refused(tmp_path: Path) -> None:
    async with LocalMesh(app(), state_dir=tmp_path, peers=2, credit_window=10, max_parallelism=MAX_PARALLELISM) as mesh:
        peer = mesh.peers[0]
        peer.inbound.on_channel_frame(1, codec.encode_control(codec.CREDIT, 5))  # nothing is outstanding
        assert peer.status()["credit"][1] == 10
        assert peer.status()["bad_frames"] == 1


def slow_app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="fc/slow", specs=[ValueSpec(name="count", type=IntType)])
    async def slow(context, message):
        await asyncio.sleep(0.002)  # yields: the peer's client endpoint stays served meanwhile
        context.storage.count = (context.storage.count or 0) + message.as_int()
        if context.in_request:
            context.reply(int_value=context.storage.count)

    return functions


@pytest.mark.integration  # a MeshClient over tcp
async def test_an_overloaded_peer_answers_info_and_refuses_sends_past_its_parking_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from statefun_mesh import MeshClient, server
    from statefun_mesh.mesh import free_ports

    monkeypatch.setattr(server, "MAX_PARKED", 20)
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    n = 300
    async with LocalMesh(slow_app(), state_dir=tmp_path, inbox_limit=5, max_batch=5, client_endpoints=[endpoint]):  # noqa: SIM117
        async with MeshClient(endpoint, timeout=60) as sender, MeshClient(endpoint, timeout=5) as watcher:

            async def send(i: int) -> None:
                await sender.send(message_builder(target_typename="fc/slow", target_id=f"k{i % 10}", int_value=1))

            sends = asyncio.gather(*(send(i) for i in range(n)))
            seen: list[dict] = []
            try:
                for _ in range(200):  # bounded: at most ~10 s
                    seen.append((await watcher.info())["status"])  # answered although sends wait
                    if seen[-1]["parked_sends"] and seen[-1]["busy_refusals"]:
                        break
                    await asyncio.sleep(0.05)
            finally:
                await sends
            counts = [
                (
                    await sender.request(message_builder(target_typename="fc/slow", target_id=f"k{k}", int_value=0))
                ).as_int()
                for k in range(10)
            ]
            final = (await watcher.info())["status"]
    assert any(s["parked_sends"] for s in seen), seen[-3:]
    assert final["busy_refusals"] > 0, final
    # every send was acknowledged once, refusals included, and applied exactly once
    assert counts == [n // 10] * 10


def big_app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="fc/big", specs=[ValueSpec(name="count", type=IntType)])
    def big(context, message):
        context.storage.count = (context.storage.count or 0) + 1
        if context.in_request:
            context.reply(int_value=context.storage.count)

    return functions


@pytest.mark.parametrize("transport", ["memory", "inproc"])
async def test_bytes_in_flight_to_a_peer_are_bounded_not_only_records(tmp_path: Path, transport: str) -> None:
    """Credit counts records, so a peer could have 20,000 records of any size in flight to
    another (here 16 MiB, all of it); now at most its link window (a quarter of
    memory_budget, shared by the peers sending to one) plus one frame."""
    budget = 4 << 20  # 2 peers: a 1 MiB window per link, frames of at most 512 KiB
    keys = ids_on(1, 2, 20, "fb")
    n, value = 1000, "x" * (16 << 10)  # 16 MiB in all
    async with LocalMesh(
        big_app(),
        state_dir=tmp_path,
        peers=2,
        transport=transport,
        memory_budget=budget,
        max_parallelism=MAX_PARALLELISM,
    ) as mesh:
        sender, receiver = mesh.peers
        # the receiver holds batch frames unread, as while a checkpoint cut waits for a
        # batch: it grants no credit, so what it holds is all the sender has in flight
        receiver.checkpoint_host.hold_input()
        sends = [
            asyncio.ensure_future(
                sender.send(message_builder(target_typename="fc/big", target_id=keys[i % len(keys)], str_value=value))
            )
            for i in range(n)
        ]
        held = 0
        for _ in range(100):  # until the sender stops sending (0.5 s at most)
            await asyncio.sleep(0.005)
            now = sum(len(frame) for _, _, frame in receiver.inbound.held)
            if now == held and now:
                break
            held = now
        await asyncio.sleep(0.1)
        held = sum(len(frame) for _, _, frame in receiver.inbound.held)
        in_flight = sender.status()["memory"]["in_flight"]
        receiver.checkpoint_host.release_input()
        await asyncio.wait_for(asyncio.gather(*sends), 30)
        await asyncio.wait_for(mesh.idle(), 30)
        counts = [
            (await mesh.request(message_builder(target_typename="fc/big", target_id=k, str_value=""))).as_int()
            for k in keys
        ]
        status = mesh.status()
    assert held <= 1 << 20, f"the receiver holds {held >> 10} KiB from one sender"
    assert held == in_flight, (held, in_flight)
    # and nothing is lost or applied twice once it reads them
    assert sum(counts) == n + len(keys), counts
    assert [s["bad_frames"] for s in status] == [0, 0], status
    assert status[0]["memory"]["in_flight"] == 0, status


async def test_messages_larger_than_the_link_window_still_flow(tmp_path: Path) -> None:
    """A 1 MiB budget on 2 peers makes a 256 KiB link window: 400 KB messages each make a
    frame larger than it, which goes once under a quarter of the window is outstanding."""
    keys = ids_on(1, 2, 5, "fl")
    n, value = 30, "y" * 400_000
    async with LocalMesh(
        big_app(), state_dir=tmp_path, peers=2, memory_budget=1 << 20, max_parallelism=MAX_PARALLELISM
    ) as mesh:
        sender = mesh.peers[0]
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    sender.send(
                        message_builder(target_typename="fc/big", target_id=keys[i % len(keys)], str_value=value)
                    )
                    for i in range(n)
                )
            ),
            30,
        )
        await asyncio.wait_for(mesh.idle(), 30)
        counts = [
            (await mesh.request(message_builder(target_typename="fc/big", target_id=k, str_value=""))).as_int()
            for k in keys
        ]
        status = mesh.status()
    assert counts == [n // len(keys) + 1] * len(keys), counts
    assert status[0]["memory"]["in_flight"] == 0 and status[0]["memory"]["link_window"] == 256 << 10, status


async def test_a_message_larger_than_a_link_window_is_held_by_a_peer_still_in_an_older_generation(
    tmp_path: Path,
) -> None:
    """A receiver still in an older generation holds what peers already in the next one send
    it. It held a quarter of memory_budget in all, so a single message larger than a link
    window (which a sender sends alone once under a quarter of its window is outstanding)
    was refused, and lost, unless memory_budget >= 4 x (peers - 1) x max_message_bytes. Now
    it holds per sender what the sender's own rule lets it have in flight: such a message
    is held for any budget, and a sender past that rule is still refused."""
    from statefun_mesh import _speedups
    from statefun_mesh.routing import GEN

    async with LocalMesh(
        app(), peers=3, state_dir=tmp_path, memory_budget=1 << 20, max_parallelism=MAX_PARALLELISM
    ) as mesh:
        receiver = mesh.peers[0]
        window = receiver.router.link_bytes  # 128 KiB: a quarter of the budget, shared by 2 senders
        keys = ids_on(0, 3, 4, "big")

        def frame(key: str, size: int) -> bytes:
            enc = _speedups.BatchEncoder()
            rec = ("fc/counter", key, "", "", "t/v", b"x" * size, 0, 0)
            assert enc.fill([rec], 0, 1 << 30, 1) == 1
            return GEN.pack(receiver.generation + 1) + enc.flush()

        big = 3 * window  # one message over the window and over the quarter held in all
        refused = receiver.status()["bad_frames"]
        for src in (1, 2):
            receiver.inbound.on_frame(src, frame(keys[src], window // 8))  # under a quarter of the window
            receiver.inbound.on_frame(src, frame(keys[src], big))  # then the large one, alone
        assert receiver.status()["bad_frames"] == refused
        assert len(receiver.inbound.held) == 4 and receiver.inbound.held_bytes > 6 * window
        # a sender past its window with a quarter of it outstanding is no peer of this mesh
        receiver.inbound.on_frame(1, frame(keys[1], big))
        assert receiver.status()["bad_frames"] == refused + 1 and len(receiver.inbound.held) == 4
