"""Rescaling: a checkpoint taken on N peers restored onto M peers (3 -> 2 -> 4 -> 3).

State, pending timers, idempotency keys, egress records and client messages
acknowledged after the checkpoint (in the ingress logs, removed peers' included) all
survive; the mesh refuses a peer count change that was not asked for.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import (
    IncompatibleSnapshotError,
    IntType,
    LocalMesh,
    SnapshotNotFoundError,
    StatefulFunctions,
    ValueSpec,
    egress_message_builder,
    message_builder,
)
from statefun_mesh.snapshot.coordinator import list_checkpoints
from statefun_mesh.snapshot.rescale import entry_key_group, inherited_peers, renumber_egress, split_entries
from tests.meshes import mesh_settings, wait_for

pytestmark = pytest.mark.timeout(120)

KEYS = 60
CHAINS = 20
HOPS = 400


def app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="rs/counter", specs=[ValueSpec(name="count", type=IntType)])
    def counter(context, message):
        count = (context.storage.count or 0) + message.as_int()
        context.storage.count = count
        if message.as_int():
            context.send_egress(egress_message_builder(target_typename="rs/out", value=count, value_type=IntType))
        if context.in_request:
            context.reply(int_value=count)

    @functions.bind(typename="rs/alarm", specs=[ValueSpec(name="armed", type=IntType)])
    def alarm(context, message):
        # arm: schedule +1 to a counter after the given number of seconds
        if message.as_int() > 0:
            context.send_after(
                timedelta(seconds=message.as_int()),
                message_builder(target_typename="rs/counter", target_id=f"fired-{context.address.id}", int_value=1),
            )

    @functions.bind(typename="rs/ping", specs=[ValueSpec(name="hops", type=IntType)])
    def ping(context, message):
        # bounce between "<chain>a" and "<chain>b" (different peers, mostly) n times
        n = message.as_int()
        context.storage.hops = (context.storage.hops or 0) + 1
        if n > 0:
            other = context.address.id[:-1] + ("b" if context.address.id.endswith("a") else "a")
            context.send(message_builder(target_typename="rs/ping", target_id=other, int_value=n - 1))
        else:
            context.send(message_builder(target_typename="rs/counter", target_id="chains-done", int_value=1))

    return functions


def settings(tmp_path: Path, peers: int, **kw: Any) -> dict[str, Any]:
    return mesh_settings(tmp_path, **{"peers": peers, "max_parallelism": 64, **kw})


async def checkpoint_after_now(mesh: LocalMesh) -> int:
    coord = mesh.peers[0].coordinator
    last = coord.last_complete.checkpoint if coord.last_complete else -1
    # the next checkpoint to start covers everything acknowledged so far
    await wait_for(lambda: coord.next_id > last + 1 and coord.in_progress is None, 10, "the checkpoint in progress")
    start = coord.next_id
    await wait_for(
        lambda: coord.last_complete is not None and coord.last_complete.checkpoint >= start, 30, f"checkpoint {start}"
    )
    return coord.last_complete.checkpoint


async def count(mesh: LocalMesh, key: str) -> int:
    return (await mesh.request(message_builder(target_typename="rs/counter", target_id=key, int_value=0))).as_int()


async def add(mesh: LocalMesh, key: str, n: int = 1, idem: str | None = None) -> None:
    await mesh.send(message_builder(target_typename="rs/counter", target_id=key, int_value=n), idem)


async def egress_values(mesh: LocalMesh, expected: int) -> list[int]:
    out: list[int] = []
    it = mesh.egress("rs/out")
    try:
        while len(out) < expected:
            rec = await asyncio.wait_for(it.__anext__(), 10)
            out.append(rec.as_int())
    finally:
        await it.aclose()
    return out


async def test_rescale_3_to_2_to_4_to_3_keeps_everything(tmp_path: Path) -> None:
    expected = {f"k{i}": 0 for i in range(KEYS)}
    egress_total = 0
    async with LocalMesh(app(), **settings(tmp_path, 3)) as mesh:
        for i in range(KEYS * 3):
            await add(mesh, f"k{i % KEYS}", idem=f"first-{i}")
            expected[f"k{i % KEYS}"] += 1
        egress_total += KEYS * 3
        # timers pending across every rescale: they fire 3 s from now, whatever the shape
        for i in range(10):
            await mesh.send(message_builder(target_typename="rs/alarm", target_id=f"a{i}", int_value=3))
        # chains bouncing between peers while the checkpoint is cut: in flight at the cut
        for c in range(CHAINS):
            await mesh.send(message_builder(target_typename="rs/ping", target_id=f"c{c}a", int_value=HOPS))
        await checkpoint_after_now(mesh)
        await mesh.idle()
        # acknowledged after the last checkpoint: only the ingress logs have these
        await mesh.peers[0].coordinator.aclose()  # no further checkpoint covers them
        for i in range(KEYS):
            await add(mesh, f"k{i}", idem=f"late-{i}")
            expected[f"k{i}"] += 1
        egress_total += KEYS
        await mesh.idle()

    # 3 -> 2 without asking: refused, with the way out in the message
    with pytest.raises(IncompatibleSnapshotError, match="--restore latest"):
        async with LocalMesh(app(), **settings(tmp_path, 2)):
            pass

    for shape in (2, 4, 3):
        async with LocalMesh(app(), **settings(tmp_path, shape, restore="latest")) as mesh:
            for key, n in expected.items():
                assert await count(mesh, key) == n, (shape, key)
            # an idempotency key remembered before the rescale still deduplicates
            await add(mesh, "k1", idem="first-1")
            await add(mesh, "k1", idem="late-1")
            assert await count(mesh, "k1") == expected["k1"]
            # every egress record produced so far, from every old peer, still readable
            values = await egress_values(mesh, egress_total)
            assert len(values) == egress_total  # (chains finishing later add theirs)
            # new work, then a checkpoint of the new shape
            for i in range(KEYS):
                await add(mesh, f"k{i}", idem=f"shape{shape}-{i}")
                expected[f"k{i}"] += 1
            egress_total += KEYS
            await mesh.idle()
            await checkpoint_after_now(mesh)
            manifest = mesh.peers[0].coordinator.last_complete
            assert manifest.peers == shape

    # the timers armed on 3 peers fire exactly once, on whatever peer owns them now
    async with LocalMesh(app(), **settings(tmp_path, 3)) as mesh:
        for i in range(10):
            key = f"fired-a{i}"
            await wait_for(lambda: True, 0, "")
            deadline = asyncio.get_running_loop().time() + 15
            while await count(mesh, key) < 1 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
            assert await count(mesh, key) == 1, key
        await asyncio.sleep(0.5)
        assert [await count(mesh, f"fired-a{i}") for i in range(10)] == [1] * 10
        # every chain finished exactly once, across the cut and three rescales
        assert await count(mesh, "chains-done") == CHAINS
        expected["chains-done"] = CHAINS
        for key, n in expected.items():
            assert await count(mesh, key) == n, key
        # egress: 1 record per +1 on a counter (chains-done included), none lost or doubled
        assert len(await egress_values(mesh, egress_total + CHAINS)) == egress_total + CHAINS


async def test_removed_peers_ingress_logs_are_replayed_and_then_deleted(tmp_path: Path) -> None:
    async with LocalMesh(app(), **settings(tmp_path, 3)) as mesh:
        await add(mesh, "warm")
        await mesh.idle()
        await checkpoint_after_now(mesh)
        await mesh.peers[0].coordinator.aclose()
        owner_of = {}
        for i in range(KEYS):
            await add(mesh, f"late{i}", 5)
        await mesh.idle()
        owner_of = {
            f"late{i}": mesh._entry(
                message_builder(target_typename="rs/counter", target_id=f"late{i}", int_value=0)
            ).peer_id
            for i in range(KEYS)
        }
    assert 2 in owner_of.values()  # some were acknowledged (and logged) by peer 2
    removed_log = tmp_path / "state" / "peer-2.ingress"
    assert removed_log.is_dir()
    async with LocalMesh(app(), **settings(tmp_path, 2, restore="latest")) as mesh:
        assert [await count(mesh, f"late{i}") for i in range(KEYS)] == [5] * KEYS
        await checkpoint_after_now(mesh)
        await wait_for(lambda: not removed_log.exists(), 10, "the removed peer's ingress log to be deleted")


async def test_a_removed_peers_ingress_log_is_replayed_in_slices_as_outgoing_room_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removed peer's ingress log (here 16 MiB of messages for the other peer, on a 4 MiB
    budget) used to be routed all at once after the rescale; now in slices while the
    outgoing buffers are under their quarter of the budget, like the peer's own log, and a
    checkpoint cut waits until it is all routed. Every message is still applied once."""
    from statefun_mesh._speedups import key_group
    from statefun_mesh.routing import Router

    n, value = 2000, "v" * (8 << 10)
    functions = app()

    @functions.bind(typename="rs/padded", specs=[ValueSpec(name="count", type=IntType)])
    def padded(context, message):  # type: ignore[no-untyped-def]
        context.storage.count = (context.storage.count or 0) + 1
        if context.in_request:
            context.reply(int_value=context.storage.count)

    # keys that peer 1 owns on 2 peers (and peer 0 does not inherit peer 2's log for them)
    keys = [k for k in (f"fl-{i}" for i in range(400)) if key_group(k, 64) * 2 // 64 == 1][:20]
    async with LocalMesh(functions, **settings(tmp_path, 3)) as mesh:
        await add(mesh, "warm")
        await mesh.idle()
        await checkpoint_after_now(mesh)
        await mesh.peers[0].coordinator.aclose()
        for i in range(n):  # logged by peer 2, which the rescale removes
            await mesh.peers[2].send(
                message_builder(target_typename="rs/padded", target_id=keys[i % 20], str_value=value)
            )
        await mesh.idle()
    held = {"max": 0}
    route = Router.route

    def measured_route(self: Router, records: list, from_client: bool = False) -> None:
        route(self, records, from_client)
        held["max"] = max(held["max"], self.out_bytes())

    monkeypatch.setattr(Router, "route", measured_route)
    async with LocalMesh(functions, **settings(tmp_path, 2, restore="latest", memory_budget=4 << 20)) as mesh:
        await asyncio.wait_for(mesh.idle(), 60)
        counts = [
            (await mesh.request(message_builder(target_typename="rs/padded", target_id=k, str_value=""))).as_int()
            for k in keys
        ]
    assert sum(counts) == n + len(keys), counts  # once each, plus the requests
    # the outgoing quarter (1 MiB), one slice of 100 messages (0.8 MiB) and a frame
    assert held["max"] < 3 << 20, f"{held['max'] >> 20} MiB waited to go out during the replay"


async def test_restore_an_older_checkpoint_rolls_back_and_drops_newer_ones(tmp_path: Path) -> None:
    async with LocalMesh(app(), **settings(tmp_path, 2)) as mesh:
        await add(mesh, "x", 1)
        await mesh.idle()
        first = await checkpoint_after_now(mesh)
        await add(mesh, "x", 10)
        await mesh.idle()
        await checkpoint_after_now(mesh)
        blobs = mesh.peers[0].blobs
        assert max(await list_checkpoints(blobs)) > first
        await mesh.peers[0].coordinator.aclose()
    with pytest.raises(SnapshotNotFoundError, match="no checkpoint 999999"):
        async with LocalMesh(app(), **settings(tmp_path, 2, restore="999999")):
            pass
    async with LocalMesh(app(), **settings(tmp_path, 2, restore=str(first))) as mesh:
        # the ingress log from the first checkpoint's cut on replays the +10 too: a
        # rollback restores state, it does not forget acknowledged messages
        assert await count(mesh, "x") == 11
        assert max(await list_checkpoints(mesh.peers[0].blobs)) == first or mesh.peers[0].coordinator.manifests


# -- the pure parts --------------------------------------------------------------------------


def test_inherited_peers() -> None:
    assert inherited_peers(0, 3, 2) == [0, 2]
    assert inherited_peers(1, 3, 2) == [1]
    assert inherited_peers(3, 2, 4) == []
    assert inherited_peers(0, 5, 2) == [0, 2, 4]
    assert inherited_peers(1, 5, 2) == [1, 3]


def test_entry_key_groups_and_split() -> None:
    import struct

    kg7 = struct.pack(">H", 7)
    assert entry_key_group("state", kg7 + b"t/f\x00id\x00count") == 7
    assert entry_key_group("timer_due", struct.pack(">QHQ", 123, 9, 1)) == 9
    assert entry_key_group("egress", b"x/y\x00" + bytes(8)) is None
    entries = [
        ("state", kg7 + b"a", b"1"),
        ("state", struct.pack(">H", 40) + b"b", b"2"),
        ("meta", b"timer_seq", struct.pack(">Q", 17)),
        ("egress", b"x/y\x00" + struct.pack(">Q", 0), b"e0"),
        ("egress", b"x/y\x00" + struct.pack(">Q", 1), b"e1"),
        ("egress", b"x/y\x00" + struct.pack(">Q", 0), None),  # trimmed in a later delta
    ]
    split = split_entries(entries, 0, 32, keep_egress=True)
    assert list(split) == [("state", kg7 + b"a", b"1")]
    assert split.timer_seq == 17
    assert split.egress == {b"x/y\x00" + struct.pack(">Q", 1): b"e1"}
    heads = {"x/y": 5}
    assert renumber_egress(split.egress, heads) == [("egress", b"x/y\x00" + struct.pack(">Q", 5), b"e1")]
    assert heads == {"x/y": 6}


async def test_timers_scheduled_after_a_restore_do_not_replace_restored_ones(tmp_path: Path) -> None:
    # Regression: the dispatcher kept the empty store's timer sequence after a restore, so
    # the first timer scheduled afterwards reused the key of a restored pending timer.
    async with LocalMesh(app(), **settings(tmp_path, 1)) as mesh:
        await mesh.send(message_builder(target_typename="rs/alarm", target_id="t", int_value=2))
        await mesh.idle()
        await checkpoint_after_now(mesh)
    async with LocalMesh(app(), **settings(tmp_path, 1)) as mesh:
        await mesh.send(message_builder(target_typename="rs/alarm", target_id="t", int_value=1))
        deadline = asyncio.get_running_loop().time() + 10
        while await count(mesh, "fired-t") < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert await count(mesh, "fired-t") == 2
