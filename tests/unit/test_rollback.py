"""Rolling a surviving peer's store back to a checkpoint in place (no rebuild).

After random writes of every kind a store holds (state values set and deleted, timers
set and cancelled, egress records, idempotency keys), a recovery must leave each
surviving peer's store byte for byte equal to a fresh rebuild from the checkpoint's
objects, and must not have replaced the store's files. A restarted peer rebuilds."""

from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import (
    IntType,
    LocalMesh,
    Peer,
    StatefulFunctions,
    StringType,
    ValueSpec,
    egress_message_builder,
    message_builder,
)
from statefun_mesh.errors import StateBackendError
from statefun_mesh.snapshot.format import Manifest, open_object_file
from statefun_mesh.state.lmdb_backend import LmdbStateBackend

pytestmark = pytest.mark.timeout(120)


def app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="rb/cell", specs=[ValueSpec(name="a", type=IntType), ValueSpec(name="b", type=StringType)])
    def cell(context, message):
        m = message.as_int()
        op = m % 6
        if op == 0:
            del context.storage.a
        elif op in (1, 5):
            context.storage.a = m
            context.storage.b = "x" * (m % 97)
        elif op == 2:
            later = message_builder(target_typename="rb/cell", target_id=context.address.id, int_value=1)
            context.send_after(timedelta(hours=1), later, cancellation_token=f"t{m % 3}")
        elif op == 3:
            context.cancel_delayed_message(f"t{m % 3}")
        else:
            context.send_egress(egress_message_builder(target_typename="rb/out", value=m, value_type=IntType))
        if context.in_request:
            context.reply(int_value=context.storage.a or 0)

    return functions


def settings(tmp_path: Path) -> dict[str, Any]:
    # checkpoints only when the test triggers them
    return dict(
        state_dir=str(tmp_path / "state"),
        blob_store=f"file://{tmp_path / 'blobs'}",
        checkpoint_interval=3600,
        heartbeat_interval=0.1,
        heartbeat_timeout=1.0,
    )


async def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def drive(mesh: LocalMesh, rng: random.Random, n: int, tag: str) -> None:
    for i in range(n):
        msg = message_builder(
            target_typename="rb/cell", target_id=f"k{rng.randrange(60)}", int_value=rng.randrange(1000)
        )
        # every other message with an idempotency key: those write the dedup database
        await mesh.send(msg, idempotency_key=f"{tag}{i}" if i % 2 else None)
    await mesh.idle()


async def checkpoint(mesh: LocalMesh) -> int:
    coord = mesh.peers[0].coordinator
    n = coord.trigger()
    await wait_for(
        lambda: coord.last_complete is not None and coord.last_complete.checkpoint >= n, 30, f"checkpoint {n}"
    )
    return n


def rebuilt_dump(tmp_path: Path, manifest: Manifest, peer: int) -> list[tuple[str, bytes, bytes]]:
    """The store a fresh rebuild from ``manifest``'s objects for ``peer`` holds."""
    fresh = LmdbStateBackend(tmp_path / f"fresh-{manifest.checkpoint}-{peer}")
    try:
        for ref in manifest.parts[peer].chain:
            _, _, entries = open_object_file(str(tmp_path / "blobs" / ref.name), sha256=ref.sha256)
            fresh.load(entries)
        with fresh.read() as txn:
            return list(fresh.dump(txn))
    finally:
        fresh.close()


def watch_restores(peer: Peer, seen: list[tuple[str, list[tuple[str, bytes, bytes]]]]) -> None:
    """Record, for each restore of ``peer``, how it restored and its store right after
    (before the replay of the ingress log changes it again)."""
    participant = peer.participant
    assert participant is not None
    restore = participant.restore

    async def observed(manifest: Manifest | None) -> None:
        await restore(manifest)
        backend = peer.backend
        assert backend is not None
        with backend.read() as txn:
            seen.append((participant.last_restore, list(backend.dump(txn))))

    participant.restore = observed  # type: ignore[method-assign]


def store_inode(peer: Peer) -> int:
    return os.stat(os.path.join(peer.state_path, "data.mdb")).st_ino


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("when", ["idle", "cut", "racing"])
async def test_a_surviving_peer_rolls_back_in_place_to_exactly_the_checkpoint(
    tmp_path: Path, seed: int, when: str
) -> None:
    """``cut``: the round starts right after peer 0 cut a newer checkpoint (the keys
    written before that cut are then in the snapshot's change set, not the store's);
    ``racing``: a newer checkpoint runs (and may complete) while more is written."""
    rng = random.Random(seed)
    async with LocalMesh(app(), peers=2, **settings(tmp_path)) as mesh:
        await drive(mesh, rng, 400, "a")
        await checkpoint(mesh)  # a base
        await drive(mesh, rng, 200, "b")
        await checkpoint(mesh)  # a delta on it
        await drive(mesh, rng, 300, "c")  # past the checkpoint: to be undone
        seen: list[list[tuple[str, list[tuple[str, bytes, bytes]]]]] = [[] for _ in mesh.peers]
        for p, peer in enumerate(mesh.peers):
            watch_restores(peer, seen[p])
        inodes = [store_inode(p) for p in mesh.peers]
        coord = mesh.peers[0].coordinator
        rounds = coord.recoveries
        if when == "cut":
            n = coord.trigger()
            assert mesh.peers[0].participant.snap.n == n  # cut at once: no batch was running
        elif when == "racing":
            coord.trigger()
            await drive(mesh, rng, 50, "d")
        coord.request_recovery("test")
        await wait_for(
            lambda: coord.recoveries > rounds and all(seen) and all(p.resumed for p in mesh.peers),
            30,
            "the recovery round",
        )
        manifest = coord.last_complete
        assert manifest is not None
        for p, peer in enumerate(mesh.peers):
            how, dump = seen[p][-1]
            assert how == "rolled back", f"peer {p} {how} its store"
            assert store_inode(peer) == inodes[p], f"peer {p}'s store was replaced"
            expected = rebuilt_dump(tmp_path, manifest, p)
            assert len(expected) > 100
            assert dump == expected, (
                f"peer {p}'s rolled-back store differs from a rebuild of checkpoint {manifest.checkpoint}"
            )
        # the mesh goes on from there: the next checkpoint's delta on the rolled-back store
        # rebuilds to the live store again
        await drive(mesh, rng, 100, "e")
        await checkpoint(mesh)
        manifest = coord.last_complete
        for p, peer in enumerate(mesh.peers):
            backend = peer.backend
            assert backend is not None
            with backend.read() as txn:
                live = list(backend.dump(txn))
            assert live == rebuilt_dump(tmp_path, manifest, p)


async def test_a_store_whose_map_grew_since_the_cut_is_rebuilt_instead(tmp_path: Path) -> None:
    """Growing the LMDB map invalidates the read transaction kept at the cut: that peer
    must notice and rebuild (a rollback from it would fail or read nothing)."""
    rng = random.Random(3)
    kw = settings(tmp_path)
    kw["map_size"] = 1 << 18  # 256 KiB: grows while the test writes
    async with LocalMesh(app(), peers=2, **kw) as mesh:
        await drive(mesh, rng, 200, "a")
        await checkpoint(mesh)
        sizes = [p.backend.env.info()["map_size"] for p in mesh.peers]
        # long values, until both maps grew
        for i in range(400):
            if all(p.backend.env.info()["map_size"] > sizes[k] for k, p in enumerate(mesh.peers)):
                break
            await mesh.send(message_builder(target_typename="rb/cell", target_id=f"big{i}", int_value=6 * i + 1))
            await mesh.send(message_builder(target_typename="rb/cell", target_id=f"k{i % 60}", int_value=6 * i + 95))
            for p in mesh.peers:  # state reaches LMDB when the write-back cache is flushed (as at its bound)
                p.backend.flush_cache()
        else:
            raise AssertionError("the maps did not grow")
        await mesh.idle()
        seen: list[list[tuple[str, list[tuple[str, bytes, bytes]]]]] = [[] for _ in mesh.peers]
        for p, peer in enumerate(mesh.peers):
            watch_restores(peer, seen[p])
        coord = mesh.peers[0].coordinator
        rounds = coord.recoveries
        coord.request_recovery("test")
        await wait_for(
            lambda: coord.recoveries > rounds and all(seen) and all(p.resumed for p in mesh.peers),
            30,
            "the recovery round",
        )
        manifest = coord.last_complete
        for p in range(2):
            how, dump = seen[p][-1]
            assert how == "rebuilt", p
            assert dump == rebuilt_dump(tmp_path, manifest, p)


async def test_only_the_restarted_peer_rebuilds_and_every_count_is_exact(tmp_path: Path) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="rb/counter", specs=[ValueSpec(name="n", type=IntType)])
    def counter(context, message):
        context.storage.n = (context.storage.n or 0) + message.as_int()
        if context.in_request:
            context.reply(int_value=context.storage.n)

    kw = settings(tmp_path)
    kw["checkpoint_interval"] = 0.2
    async with LocalMesh(functions, peers=3, **kw) as mesh:
        sent = dict.fromkeys(range(30), 0)
        seq = 0

        async def send_some(n: int) -> None:
            nonlocal seq
            for _ in range(n):
                k = seq % 30
                msg = message_builder(target_typename="rb/counter", target_id=f"c{k}", int_value=1)
                for _attempt in range(50):  # a client retrying with its idempotency key
                    try:
                        await asyncio.wait_for(mesh.peers[seq % 2].send(msg, idempotency_key=f"m{seq}"), 5)
                        break
                    except Exception:
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError("send never accepted")
                sent[k] += 1
                seq += 1

        await send_some(300)
        coord = mesh.peers[0].coordinator
        await wait_for(lambda: coord.last_complete is not None, 30, "a checkpoint")
        await send_some(100)
        survivors = mesh.peers[:2]
        inodes = [store_inode(p) for p in survivors]
        victim = mesh._peers[2]
        await victim.abort()
        reborn = Peer(mesh.config, functions, peer_id=2)
        mesh._peers[2] = reborn
        await reborn.start()
        await send_some(100)
        await wait_for(lambda: all(p.resumed for p in mesh.peers), 30, "recovery")
        assert reborn.participant is not None and reborn.participant.last_restore == "rebuilt"
        for p, peer in enumerate(survivors):
            assert peer.participant is not None and peer.participant.last_restore == "rolled back", p
            assert store_inode(peer) == inodes[p]
        for k, n in sent.items():
            r = await mesh.request(message_builder(target_typename="rb/counter", target_id=f"c{k}", int_value=0))
            assert r.as_int() == n, k


@pytest.mark.parametrize("append", [False, True])
def test_load_applies_entries_in_order_whatever_their_key_order(tmp_path: Path, append: bool) -> None:
    rng = random.Random(7)
    entries: list[tuple[str, bytes, bytes | None]] = []
    for _ in range(3000):
        db = rng.choice(["state", "state", "dedup", "egress"])
        key = b"k%03d" % rng.randrange(400)
        entries.append((db, key, None if rng.random() < 0.2 else b"v%d" % rng.randrange(10**6)))
    expected: dict[tuple[str, bytes], bytes] = {}
    for db, key, value in entries:
        if value is None:
            expected.pop((db, key), None)
        else:
            expected[(db, key)] = value
    backend = LmdbStateBackend(tmp_path / "s")
    try:
        # small batches: runs of puts, deletes and database changes cross batch boundaries;
        # with append=True the out-of-order runs must still land (put again the ordinary way)
        assert backend.load(iter(entries), batch=97, append=append) == len(entries)
        with backend.read() as txn:
            got = {(db, key): value for db, key, value in backend.dump(txn)}
        assert got == expected
        # a batch of puts into one database only, out of key order (overwriting, too)
        puts = [("state", b"k%03d" % rng.randrange(400), b"w%d" % i) for i in range(300)]
        backend.load(puts, batch=1000, append=append)
        for _, key, value in puts:
            expected[("state", key)] = value
        with backend.read() as txn:
            got = {(db, key): value for db, key, value in backend.dump(txn)}
        assert got == expected
        # an unknown database: that batch is not applied at all, what came before stays
        with pytest.raises(StateBackendError, match="unknown database 'nope'"):
            backend.load([("state", b"zz1", b"1"), ("nope", b"x", b"1")], batch=1)
        with pytest.raises(StateBackendError, match="unknown database 'nope'"):
            backend.load([("state", b"zz2", b"1"), ("nope", b"x", b"1")], batch=10)
        with backend.read() as txn:
            assert txn.get(b"zz1", db=backend.db_state) == b"1"
            assert txn.get(b"zz2", db=backend.db_state) is None
    finally:
        backend.close()


async def test_a_recovery_during_a_checkpoints_build_waits_for_the_build_thread(tmp_path: Path) -> None:
    """Regression: a recovery round cancelled a checkpoint upload whose build thread was
    still reading the store through the cut's read transaction, and aborted that
    transaction under the thread (a SIGSEGV in a CI run). The thread must end first."""
    import threading
    import time

    import lmdb

    rng = random.Random(5)
    async with LocalMesh(app(), peers=2, **settings(tmp_path)) as mesh:
        await drive(mesh, rng, 300, "a")
        peer = mesh.peers[0]
        backend = peer.backend
        assert backend is not None and peer.coordinator is not None
        dump = backend.dump_packed
        entered, checked = threading.Event(), threading.Event()
        aborted_under_thread: list[str] = []

        def slow_dump(txn: Any, chunk: int = 1) -> Any:  # fault injection: a build slower than the recovery round
            for i, item in enumerate(dump(txn, chunk=1)):
                if i == 10:
                    entered.set()
                    time.sleep(1.0)  # the round resets the participant meanwhile
                    try:
                        txn.stat(backend.db_state)
                    except lmdb.Error as exc:
                        aborted_under_thread.append(str(exc))
                        return
                    finally:
                        checked.set()
                yield item

        backend.dump_packed = slow_dump  # type: ignore[method-assign]
        coord = peer.coordinator
        rounds = coord.recoveries
        coord.trigger()
        assert await asyncio.to_thread(entered.wait, 10), "the checkpoint's build did not start"
        coord.request_recovery("test")
        await wait_for(
            lambda: coord.recoveries > rounds and all(p.resumed for p in mesh.peers), 30, "the recovery round"
        )
        assert await asyncio.to_thread(checked.wait, 10), "the build thread did not go on"
        assert aborted_under_thread == [], "the cut's transaction was aborted while the build thread read it"
        await drive(mesh, rng, 50, "b")  # and the mesh goes on


def test_a_discarded_store_is_gone_at_once_and_deleted_in_the_background(tmp_path: Path) -> None:
    """A restarted peer's rebuild replaces its store: the old one is renamed aside at once (its
    path is free for the new store) and deleted by a thread, with what a crash left of earlier
    discards of the same store, and nothing of another peer's."""
    from statefun_mesh.state.lmdb_backend import discard_store

    path = tmp_path / "peer-1"
    backend = LmdbStateBackend(str(path))
    backend.load([("state", b"k%06d" % i, b"v" * 200) for i in range(2000)], append=True)
    backend.close()
    crashed = tmp_path / "peer-1.discarded-123-456"  # left by a process killed before its thread ran
    crashed.mkdir()
    (crashed / "data.mdb").write_bytes(b"x" * 1000)
    other = tmp_path / "peer-10.discarded-1-2"  # another peer's: not ours to delete
    other.mkdir()
    discard_store(str(path))
    assert not path.exists()
    fresh = LmdbStateBackend(str(path))
    try:
        txn = fresh.read()
        assert list(fresh.iter_state(txn)) == []
        txn.abort()
    finally:
        fresh.close()
    for _ in range(500):
        if not [f for f in os.listdir(tmp_path) if f.startswith("peer-1.discarded-")]:
            break
        time.sleep(0.02)
    assert sorted(os.listdir(tmp_path)) == ["peer-1", "peer-10.discarded-1-2"]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_delta_packed_encodes_exactly_the_delta_entries(tmp_path: Path, chunk: int) -> None:
    """The build thread writes a delta from ``delta_packed``: the same bytes, in the same
    order, as packing every ``delta`` entry one by one (deleted keys as nil, one key in
    several databases kept apart, runs split across chunks)."""
    import msgpack

    backend = LmdbStateBackend(str(tmp_path / "s"))
    rnd = random.Random(7)
    keys = [b"k%04d" % i for i in range(300)]
    backend.load([(db, k, rnd.randbytes(rnd.randrange(0, 40))) for db in ("dedup", "state") for k in keys[::2]])
    changed = {(db, k) for db in ("dedup", "egress", "state") for k in rnd.sample(keys, 60)}
    txn = backend.read()
    try:
        pack = msgpack.Packer(use_bin_type=True).pack
        expected = b"".join(pack([db, k, v]) for db, k, v in backend.delta(txn, changed))
        parts = list(backend.delta_packed(txn, changed, chunk=chunk))
    finally:
        txn.abort()
        backend.close()
    assert b"".join(data for _, data in parts) == expected
    assert sum(n for n, _ in parts) == len(changed)
    assert all(n <= chunk for n, _ in parts)


def test_every_write_is_in_the_change_set_whatever_op_wrote_it(tmp_path: Path) -> None:
    """Deltas and rollbacks rely on the change set naming every key written since the last
    ``take_changes``: ``putmulti`` keys (tracked per database) and single puts and deletes
    alike, each under its own database, and ``pending_changes`` does not start a new set."""
    backend = LmdbStateBackend(str(tmp_path / "s"))
    try:
        assert backend.pending_changes() is None  # not tracking until the first take_changes
        backend.take_changes()
        backend.commit(
            [("putmulti", "state", [(b"a", b"1"), (b"b", b"2")]), ("put", "dedup", b"a", b"x"), ("del", "state", b"zz")]
        )
        backend.commit([("putmulti", "dedup", [(b"b", b"y")]), ("putmulti", "state", [(b"a", b"3")])])
        want = {("state", b"a"), ("state", b"b"), ("state", b"zz"), ("dedup", b"a"), ("dedup", b"b")}
        assert backend.pending_changes() == want
        assert backend.pending_changes() == want
        assert backend.take_changes() == want
        assert backend.take_changes() == set()
        backend.commit([("putmulti", "state", [(b"c", b"4")])])
        assert backend.take_changes() == {("state", b"c")}
    finally:
        backend.close()


def test_a_change_log_folds_off_the_loop_into_what_take_changes_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint's cut takes the change log without deduplicating it (``take_change_log``:
    a batch's commit only lists its ``putmulti`` keys); folded later, in the build thread, it
    names exactly the keys ``take_changes`` would have, its delta is the same bytes, and the
    lists a long interval piles up are folded on the way (``FOLD_KEYS``: bounded memory)."""
    from statefun_mesh.state import lmdb_backend

    monkeypatch.setattr(lmdb_backend, "FOLD_KEYS", 5)
    backend = LmdbStateBackend(str(tmp_path / "s"))
    rnd = random.Random(3)
    keys = [b"k%03d" % i for i in range(40)]
    try:
        backend.take_change_log()  # tracking on
        want: set[tuple[str, bytes]] = set()
        for _ in range(20):
            batch = rnd.sample(keys, 3)
            ops: list[Any] = [("putmulti", "state", [(k, b"v") for k in batch])]
            want.update(("state", k) for k in batch)
            if rnd.random() < 0.3:
                k = rnd.choice(keys)
                ops.append(("del", "state", k))
                want.add(("state", k))
            backend.commit(ops)
            assert backend._run_keys <= 5 + 3  # folded once above FOLD_KEYS
        assert backend.pending_changes() == want
        txn = backend.read()
        log = backend.take_change_log()
        backend.commit([("putmulti", "state", [(b"later", b"x")])])  # after the cut: not in this log
        log.add({("dedup", b"carried")})
        want.add(("dedup", b"carried"))
        try:
            packed = b"".join(d for _, d in backend.delta_packed(txn, log, chunk=7))
            assert packed == b"".join(d for _, d in backend.delta_packed(txn, want, chunk=7))
        finally:
            txn.abort()
        assert log.as_set() == want
        assert backend.take_changes() == {("state", b"later")}
    finally:
        backend.close()


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_dump_packed_encodes_exactly_the_dump_entries(tmp_path: Path, chunk: int) -> None:
    """A base object is written from ``dump_packed``: the same bytes, in the same order, as
    packing every ``dump`` entry one by one (every database but meta, then timer_seq)."""
    import msgpack

    backend = LmdbStateBackend(str(tmp_path / "s"))
    rnd = random.Random(11)
    keys = [b"k%04d" % i for i in range(50)]
    backend.load([(db, k, rnd.randbytes(rnd.randrange(0, 40))) for db in ("dedup", "state", "timers") for k in keys])
    backend.load([("meta", b"timer_seq", b"\x00" * 8)])
    txn = backend.read()
    try:
        pack = msgpack.Packer(use_bin_type=True).pack
        expected = b"".join(pack([db, k, v]) for db, k, v in backend.dump(txn))
        parts = list(backend.dump_packed(txn, chunk=chunk))
    finally:
        txn.abort()
        backend.close()
    assert b"".join(data for _, data in parts) == expected
    assert sum(n for n, _ in parts) == 3 * 50 + 1
    assert all(n <= chunk for n, _ in parts)


# -- the write-back cache of state (checkpoints on: docs/architecture.md §6) -------------------------


def test_the_write_back_cache_holds_state_writes_until_a_flush_and_logs_each_key_once(tmp_path: Path) -> None:
    backend = LmdbStateBackend(tmp_path / "s", cache_bytes=1 << 20)
    try:
        backend.take_changes()  # tracking on, as with checkpoints
        backend.commit([("put", "state", b"k0", b"old"), ("put", "state", b"kx", b"x")])
        assert backend.flush_cache() == 2
        assert backend.take_changes() == {("state", b"k0"), ("state", b"kx")}
        # a batch: state puts and a delete to the cache, its other writes to LMDB at once
        for i in range(50):  # k1 written by 50 batches
            backend.commit(
                [
                    ("put", "dedup", b"d%d" % i, b"\0" * 8),
                    ("putmulti", "state", [(b"k1", b"v%d" % i), (b"k2", b"w")]),
                    ("del", "state", b"k0"),
                ]
            )
        with backend.read_unflushed() as txn:
            assert txn.get(b"k1", db=backend.db_state) is None  # not in LMDB yet
            assert txn.get(b"k0", db=backend.db_state) == b"old"
            assert txn.get(b"d49", db=backend.db_dedup) == b"\0" * 8
            # what a batch reads: the cache first
            assert backend.state_get(txn, b"k1") == b"v49"
            assert backend.state_get(txn, b"k0") is None  # deleted in the cache
            assert backend.state_get(txn, b"kx") == b"x"
        assert backend.cache == {b"k1": b"v49", b"k2": b"w", b"k0": None}
        assert backend.pending_changes() == {("dedup", b"d%d" % i) for i in range(50)}
        # any other reader's transaction sees it: read() flushes first
        with backend.read() as txn:
            assert dict(backend.iter_state(txn)) == {b"k1": b"v49", b"k2": b"w", b"kx": b"x"}
        assert backend.cache == {}
        log = backend.take_change_log()
        assert log.writes() == 50 + 3  # each cached key once, however often it was written
        assert log.as_set() == {("dedup", b"d%d" % i) for i in range(50)} | {
            ("state", b"k0"),
            ("state", b"k1"),
            ("state", b"k2"),
        }
    finally:
        backend.close()


def test_a_failed_commit_leaves_nothing_in_the_cache_and_a_failed_flush_loses_nothing(tmp_path: Path) -> None:
    backend = LmdbStateBackend(tmp_path / "s", map_size=1 << 20, max_map_size=1 << 20, cache_bytes=4 << 20)
    try:
        backend.take_changes()
        backend.commit([("put", "state", b"a", b"1")])
        # the batch's other write does not fit: nothing of it is applied, not its state either
        with pytest.raises(StateBackendError, match="full"):
            backend.commit([("put", "state", b"b", b"2"), ("put", "egress", b"e\0" + b"\0" * 8, b"x" * (2 << 20))])
        assert backend.cache == {b"a": b"1"}
        # a cache that does not fit into the store: the flush fails, the cache keeps all of it
        backend.commit([("putmulti", "state", [(b"big%d" % i, b"y" * 300_000) for i in range(5)])])
        cached = dict(backend.cache or {})
        with pytest.raises(StateBackendError, match="full"):
            backend.flush_cache()
        assert backend.cache == cached and backend.pending_changes() == set()
        # past its bound (4 MiB) the next commit flushes first, and fails before applying anything
        backend.commit([("putmulti", "state", [(b"more%d" % i, b"z" * 300_000) for i in range(10)])])
        cached = dict(backend.cache or {})
        with pytest.raises(StateBackendError, match="full"):
            backend.commit([("put", "state", b"c", b"3"), ("put", "dedup", b"d", b"\0" * 8)])
        assert backend.cache == cached
        with backend.read_unflushed() as txn:
            assert txn.get(b"d", db=backend.db_dedup) is None
        # a recovery discards it
        assert backend.discard_cache() == len(cached)
        assert backend.cache == {}
        backend.commit([("put", "state", b"c", b"3")])
        with backend.read() as txn:
            assert dict(backend.iter_state(txn)) == {b"c": b"3"}
    finally:
        backend.close()


def test_past_its_bound_the_cache_is_flushed_by_the_next_commit(tmp_path: Path) -> None:
    backend = LmdbStateBackend(tmp_path / "s", cache_bytes=10_000)
    try:
        backend.take_changes()
        for i in range(200):
            backend.commit([("putmulti", "state", [(b"k%d" % (i % 7), b"v%d" % i)])])
        assert backend.cache_flushes >= 2  # ~115 counted bytes a write: a flush every ~87 commits
        assert len(backend.cache or ()) <= 7
        with backend.read() as txn:
            assert dict(backend.iter_state(txn)) == {b"k%d" % (i % 7): b"v%d" % i for i in range(200)}
        assert backend.take_change_log().as_set() == {("state", b"k%d" % j) for j in range(7)}
    finally:
        backend.close()


async def test_a_rollback_in_place_discards_the_cache_and_the_bound_flushes_between_cuts(tmp_path: Path) -> None:
    """A surviving peer whose cache holds writes after the cut, and whose cache was flushed
    at its bound since the cut (an eighth of a 1 MiB memory_budget), rolls back to exactly
    the checkpoint: the flushed keys are rolled back in LMDB, the cached ones discarded."""
    rng = random.Random(7)
    kw = settings(tmp_path)
    kw["memory_budget"] = 1 << 20
    async with LocalMesh(app(), peers=2, **kw) as mesh:
        assert all(p.backend.cache == {} and p.backend.cache_bytes == (1 << 20) // 8 for p in mesh.peers)
        await drive(mesh, rng, 200, "a")
        await checkpoint(mesh)
        flushes = [p.backend.cache_flushes for p in mesh.peers]
        await drive(mesh, rng, 3600, "b")
        assert all(p.backend.cache_flushes > flushes[i] for i, p in enumerate(mesh.peers)), "no flush at the bound"
        assert all(p.backend.cache for p in mesh.peers), "nothing cached at the recovery"
        seen: list[list[tuple[str, list[tuple[str, bytes, bytes]]]]] = [[] for _ in mesh.peers]
        for p, peer in enumerate(mesh.peers):
            watch_restores(peer, seen[p])
        coord = mesh.peers[0].coordinator
        rounds = coord.recoveries
        coord.request_recovery("test")
        await wait_for(
            lambda: coord.recoveries > rounds and all(seen) and all(p.resumed for p in mesh.peers),
            30,
            "the recovery round",
        )
        manifest = coord.last_complete
        assert manifest is not None
        for p in range(2):
            how, dump = seen[p][-1]
            assert how == "rolled back", p
            assert dump == rebuilt_dump(tmp_path, manifest, p)


async def test_without_checkpoints_every_batch_commits_its_state_to_lmdb(tmp_path: Path) -> None:
    """guarantees.md: without checkpoints committed batches survive a process crash, so
    there is no write-back cache: a batch's state is in LMDB when it has committed."""
    async with LocalMesh(app(), peers=1, state_dir=str(tmp_path / "state")) as mesh:
        backend = mesh.peers[0].backend
        assert backend.cache is None
        await mesh.send(message_builder(target_typename="rb/cell", target_id="n", int_value=7))
        await mesh.idle()
        with backend.read_unflushed() as txn:
            assert sum(1 for _ in backend.iter_state(txn)) == 2  # a and b of rb/cell/n
