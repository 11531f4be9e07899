"""A peer's part in checkpoints: barriers, the consistent cut, uploads, and restoring.

The algorithm (ARCHITECTURE §7, unaligned barriers as in Chandy-Lamport): at the
first barrier ``n`` a peer sees — from the coordinator for itself, or in-band from
another peer — it waits for the batch in progress to commit, then, between batches:

1. opens an LMDB read transaction (the consistent view of its state, timers, egress
   and idempotency keys at the cut),
2. keeps the messages queued in its inbox (received, not yet processed: in flight),
   and those of parked async invocations (see dispatch.py), which have not committed,
3. sends every message its earlier batches produced and then barrier ``n`` on every
   outgoing channel,
4. records its ingress log position,

and from then on copies every message that arrives on channel ``c`` until barrier
``n`` arrives on ``c`` (in flight across the cut). Processing never stops. When every
channel has delivered barrier ``n`` the peer writes its objects — a state ``base`` or
``delta`` (only the keys written since the last complete checkpoint) and the
``inflight`` messages — to the blob store, off the event loop, and acknowledges to
the coordinator, which publishes the manifest once all peers have.

While a barrier waits for the batch in progress, batch frames are held (not
processed) so that nothing received after a channel's barrier is mistaken for
something received before the cut.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from .._speedups import key_group
from ..errors import BlobNotFoundError, BlobStoreError, IncompatibleSnapshotError, SnapshotError
from ..spill import Spill
from ..transport import codec
from .format import Manifest, ObjectRef, PackedEntries, PeerPart, decode_object, encode_object, object_name
from .rescale import inherited_peers, renumber_egress, split_entries

if TYPE_CHECKING:
    import lmdb

    from ..blobstore.base import BlobStore
    from ..peer import Peer

__all__ = ["Participant"]

log = logging.getLogger("statefun_mesh.snapshot")


class _Snap:
    """One checkpoint this peer has cut and not yet finished."""

    def __init__(self, n: int, txn: lmdb.Transaction, changes: set[tuple[str, bytes]], inbox: list[Any],
                 ingress_pos: int, waiting: set[int], peers: int) -> None:  # fmt: skip
        self.n = n
        self.txn: lmdb.Transaction | None = txn
        self.changes = changes
        self.inbox = inbox
        #: the inbox's spilled tail at the cut (a read transaction of the spill), after ``inbox``
        self.spill_txn: lmdb.Transaction | None = None
        self.ingress_pos = ingress_pos
        self.sources: dict[str, int] = {}
        self.waiting = waiting
        self.logs: dict[int, list[Any]] = {p: [] for p in range(peers)}
        self.finalizing = False
        self.part: PeerPart | None = None


class Participant:
    """Checkpoint and restore logic of one peer (the coordinator is peer 0's :class:`Coordinator`)."""

    def __init__(self, peer: Peer, blobs: BlobStore) -> None:
        self.peer = peer
        self.blobs = blobs
        cfg = peer.config
        assert cfg.state_dir is not None
        self.local_dir = os.path.join(cfg.state_dir, f"peer-{peer.peer_id}.checkpoints")
        #: keep local copies of uploaded objects and restore from them (``local_recovery``)
        self.local_recovery = cfg.local_recovery
        if self.local_recovery:
            os.makedirs(self.local_dir, exist_ok=True)
        self.chain: list[ObjectRef] = []
        self.carry: set[tuple[str, bytes]] = set()
        self.snap: _Snap | None = None
        self.pending: int | None = None
        self.pending_last_complete = -1
        self.pending_srcs: set[int] = set()
        self.completed = -1
        #: wall-clock time (s) the last complete checkpoint was taken (for its age in ``status``)
        self.completed_at: float | None = None
        self.restored_from: int | None = None
        self.inflight_restored: list[Any] = []
        self.ingress_position = 0
        #: external source positions restored (every part's: partitions move on a rescale)
        self.sources: dict[str, int] = {}
        #: (path, position) of removed peers' ingress logs to replay after a rescale
        self.foreign_ingress: list[tuple[str, int]] = []
        #: foreign ingress logs replayed since the last completed checkpoint (deleted then)
        self.replayed_foreign: list[str] = []
        #: ingress positions of the retained complete checkpoints, oldest first
        self.positions: list[int] = []
        self.last_duration = 0.0
        self.last_bytes = 0
        #: the newest completed checkpoints: (id, completed at (epoch s), seconds to write, bytes written)
        self.history: list[tuple[int, float, float, int]] = []
        #: totals over this process's completed checkpoints (metrics.py)
        self.written = 0
        self.written_seconds = 0.0
        self.written_bytes = 0
        self._upload: asyncio.Task[None] | None = None

    # -- barriers -------------------------------------------------------------------------

    def on_barrier(self, src: int | None, n: int, last_complete: int = -1) -> None:
        """Barrier ``n`` arrived from peer ``src`` (``None``: the coordinator, for this peer).

        ``last_complete`` is the coordinator's last complete checkpoint when it started
        ``n``: the barrier can overtake that checkpoint's ``CK_DONE`` (they travel on
        different channels), and a finished snapshot must not be taken for an aborted one.
        """
        snap = self.snap
        if snap is not None and snap.n == last_complete and snap.part is not None:
            self.on_done(last_complete)
            snap = self.snap
        if n <= self.completed or (snap is not None and n < snap.n):
            return  # a stale barrier
        if snap is not None and snap.n == n:
            if src is not None:
                snap.waiting.discard(src)
                self._maybe_finalize()
            return
        if snap is not None:  # a newer checkpoint overtook one we never finished
            self.abort(snap.n)
        if self.pending == n:
            if src is not None:
                self.pending_srcs.add(src)
            return
        self.pending = n
        self.pending_last_complete = last_complete
        self.pending_srcs = {src} if src is not None else set()
        self.peer._hold_batches = True
        if not self.peer._in_batch:
            self.take_snapshot()
        else:
            self.peer._wake.set()

    def take_snapshot(self) -> None:
        """Cut checkpoint ``self.pending`` now (called between batches)."""
        peer = self.peer
        n = self.pending
        if n is None:
            return
        self.pending = None
        assert peer.backend is not None
        backend = peer.backend
        changes = self.carry | backend.take_changes()
        self.carry = set()
        txn = backend.read()
        # Unprocessed input: the inbox, and before it the messages of parked async
        # invocations (still running, or finished but not committed) and those queued
        # behind them. Their state in txn is from before them; their effects commit
        # after this cut and belong to the next checkpoint.
        inbox = (peer.dispatcher.parked_records() if peer.dispatcher is not None else []) + list(peer._inbox)
        spill_txn = peer._spill.cut() if peer._spill is not None else None
        others = {p for p in range(peer.n_peers) if p != peer.peer_id}
        barrier = codec.encode_control(codec.BARRIER, n, max(self.completed, self.pending_last_complete))
        for p in others:
            peer._flush_peer(p, force=True)
            peer._send(p, barrier)
        # the log position of the last message routed into the mesh (one still being
        # appended, not yet routed, is not covered: recovery replays it)
        ingress_pos = peer.ingress_routed if peer.ingress is not None else 0
        self.snap = _Snap(n, txn, changes, inbox, ingress_pos, others - self.pending_srcs, peer.n_peers)
        self.snap.spill_txn = spill_txn
        # Kafka positions at the cut: the records routed so far are covered by this checkpoint
        self.snap.sources = peer.kafka.snapshot_positions() if getattr(peer, "kafka", None) is not None else {}
        self.pending_srcs = set()
        peer._release_held()
        self._maybe_finalize()

    def on_records(self, src: int, records: list[Any]) -> None:
        """Batch records arrived from ``src``: log them if they cross the current cut."""
        snap = self.snap
        if snap is not None and src in snap.waiting:
            snap.logs[src].extend(records)

    def _maybe_finalize(self) -> None:
        snap = self.snap
        if snap is None or snap.waiting or snap.finalizing:
            return
        snap.finalizing = True
        self._upload = asyncio.create_task(self._finalize(snap), name=f"checkpoint {snap.n} upload")

    async def _finalize(self, snap: _Snap) -> None:
        peer = self.peer
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            part = await self._write_objects(snap)
        except (BlobStoreError, SnapshotError, OSError) as exc:
            peer._tlog.error("failed checkpoint uploads", "peer %d: checkpoint %d could not be written: %s; "
                             "processing goes on and the coordinator retries with the next checkpoint",
                             peer.peer_id, snap.n, exc)  # fmt: skip
            peer._checkpoint_ack(snap.n, None, str(exc))
            return
        finally:
            if snap.txn is not None:
                snap.txn.abort()
                snap.txn = None
            if snap.spill_txn is not None:
                snap.spill_txn.abort()
                snap.spill_txn = None
        snap.part = part
        self.last_duration = loop.time() - started
        peer._checkpoint_ack(snap.n, part, None)

    def _need_base(self) -> bool:
        cfg = self.peer.config
        if not self.chain or len(self.chain) >= cfg.base_every:
            return True
        deltas = sum(r.size for r in self.chain[1:])
        return deltas > cfg.delta_ratio * max(self.chain[0].size, 1)

    async def _write_objects(self, snap: _Snap) -> PeerPart:
        peer = self.peer
        assert peer.backend is not None
        backend = peer.backend
        kind = "base" if self._need_base() else "delta"
        n, me = snap.n, peer.peer_id
        lo, hi = peer.key_group_range
        header = {"checkpoint": n, "peer": me, "key_groups": [lo, hi], "max_parallelism": peer.config.max_parallelism}
        txn = snap.txn
        assert txn is not None

        def build() -> tuple[bytes, int, bytes, int, dict[str, int]]:
            entries: Iterator[Any]
            if kind == "base":
                entries = ([db, k, v] for db, k, v in backend.dump(txn))
            else:
                entries = ([db, k, v] for db, k, v in backend.delta(txn, snap.changes))
            state, count = encode_object(kind, header, entries)
            egress = backend.egress_heads(txn)
            # one record at a time: a spilled tail is read from disk, never all in memory
            records = itertools.chain(
                (list(r) for r in snap.inbox),
                (PackedEntries(n, data) for n, data in Spill.packed(snap.spill_txn))
                if snap.spill_txn is not None
                else (),
                *((list(r) for r in snap.logs[p]) for p in range(peer.n_peers)),
            )
            inflight, icount = encode_object("inflight", header, records)
            return state, count, inflight, icount, egress

        state, count, inflight, icount, egress = await asyncio.to_thread(build)
        refs = []
        for k, data, entries in ((kind, state, count), ("inflight", inflight, icount)):
            name = object_name(me, n, k)
            ref = ObjectRef(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest(), checkpoint=n, kind=k,
                            entries=entries)  # fmt: skip
            await self.blobs.put(name, data)
            if self.local_recovery:
                await asyncio.to_thread(self._keep_local, name, data)
            refs.append(ref)
        self.last_bytes = refs[0].size + refs[1].size
        chain = [refs[0]] if kind == "base" else [*self.chain, refs[0]]
        return PeerPart(peer=me, key_groups=(lo, hi), chain=tuple(chain), inflight=refs[1],
                        ingress_position=snap.ingress_pos, egress=egress, sources=snap.sources)  # fmt: skip

    def _keep_local(self, name: str, data: bytes) -> None:
        path = os.path.join(self.local_dir, name.replace("/", "__"))
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.remove(tmp)  # a partial file would only take more of a full disk
            except OSError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                hint = "the disk holding state_dir is full: free space on it or move state_dir to a larger one"
            else:
                hint = "check that state_dir is writable"
            raise SnapshotError(f"cannot write the local copy {tmp} of {name}: {exc.strerror or exc}; {hint}") from exc

    def _local(self, ref: ObjectRef) -> bytes | None:
        if not self.local_recovery:
            return None
        path = os.path.join(self.local_dir, ref.name.replace("/", "__"))
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            log.warning("peer %d: local copy of %s does not match the manifest; downloading it", self.peer.peer_id,
                        ref.name)  # fmt: skip
            return None
        return data

    # -- completion -----------------------------------------------------------------------

    def on_done(self, n: int) -> None:
        """The coordinator published checkpoint ``n``."""
        snap = self.snap
        if snap is None or snap.n != n or snap.part is None:
            return
        self.snap = None
        self.completed = n
        self.completed_at = time.time()
        self.written += 1
        self.written_seconds += self.last_duration
        self.written_bytes += self.last_bytes
        self.history.append((n, self.completed_at, self.last_duration, self.last_bytes))
        del self.history[:-20]
        self.chain = list(snap.part.chain)
        self.peer._release_egress(snap.part.egress)
        if getattr(self.peer, "kafka", None) is not None:
            self.peer.kafka.on_checkpoint(snap.part.sources)
        # Trim the ingress log only below the oldest retained checkpoint, so recovery can
        # still fall back to any retained checkpoint if a newer one turns out unreadable.
        self.positions.append(snap.ingress_pos)
        del self.positions[: -self.peer.config.checkpoint_retention]
        if self.peer.ingress is not None:
            self.peer.ingress.trim(self.positions[0])
        # removed peers' ingress logs replayed after a rescale: this checkpoint covers them
        for path in self.replayed_foreign:
            shutil.rmtree(path, ignore_errors=True)
            log.info("peer %d: deleted %s (checkpoint %d covers its messages)", self.peer.peer_id, path, n)
        self.replayed_foreign = []
        if not self.local_recovery:
            return
        keep = {r.name.replace("/", "__") for r in [*self.chain, snap.part.inflight]}
        for f in os.listdir(self.local_dir):
            if f not in keep:
                try:
                    os.remove(os.path.join(self.local_dir, f))
                except OSError:
                    pass

    def abort(self, n: int) -> None:
        """Checkpoint ``n`` will not complete: keep its changes for the next delta."""
        snap = self.snap
        if self.pending == n:
            self.pending = None
            self.pending_srcs = set()
            self.peer._release_held()
        if snap is None or snap.n != n:
            return
        self.snap = None
        self.carry |= snap.changes
        if snap.txn is not None and not snap.finalizing:
            snap.txn.abort()
            snap.txn = None
        if snap.spill_txn is not None and not snap.finalizing:
            snap.spill_txn.abort()
            snap.spill_txn = None

    def reset(self) -> None:
        """Forget every checkpoint in progress (recovery starts)."""
        if self._upload is not None and not self._upload.done():
            self._upload.cancel()
        snap, self.snap = self.snap, None
        if snap is not None and snap.txn is not None and not snap.finalizing:
            snap.txn.abort()
        if snap is not None and snap.spill_txn is not None and not snap.finalizing:
            snap.spill_txn.abort()
        self.pending = None
        self.pending_srcs = set()
        self.carry = set()

    # -- restoring ------------------------------------------------------------------------

    async def restore(self, manifest: Manifest | None) -> None:
        """Rebuild this peer's state store from ``manifest`` (``None``: empty state).

        The live store is not trusted after a failure: it is deleted and rebuilt from
        the checkpoint objects, read from the local copies this peer kept when they are
        intact (and ``local_recovery`` is on), else from the blob store.
        """
        peer = self.peer
        cfg = peer.config
        if manifest is not None and manifest.max_parallelism != cfg.max_parallelism:
            raise IncompatibleSnapshotError(
                f"checkpoint {manifest.checkpoint} was taken with max_parallelism {manifest.max_parallelism}, "
                f"this mesh has {cfg.max_parallelism}; max_parallelism is fixed for the life of the application"
            )
        if peer.backend is not None:
            peer.backend.close()
            peer.backend = None
        if os.path.exists(peer.state_path):
            shutil.rmtree(peer.state_path)
        backend = peer._open_backend()
        self.chain = []
        self.inflight_restored = []
        self.completed = -1
        released: dict[str, int] = {}
        self.ingress_position = peer.ingress.first_offset if peer.ingress is not None else 0
        self.foreign_ingress = []
        self.sources = {k: v for p in manifest.parts for k, v in p.sources.items()} if manifest is not None else {}
        if manifest is not None and manifest.peers != peer.n_peers:
            released = await self._restore_rescaled(manifest, backend)
        elif manifest is not None:
            part = manifest.parts[peer.peer_id]
            for ref in part.chain:
                data = await self._fetch(ref)
                kind, _, entries = decode_object(data, sha256=ref.sha256, name=ref.name)
                if kind != ref.kind:
                    raise SnapshotError(f"{ref.name} is a {kind} object, the manifest says {ref.kind}")
                await asyncio.to_thread(backend.load, ((e[0], e[1], e[2]) for e in entries))
            data = await self._fetch(part.inflight)
            _, _, entries = decode_object(data, sha256=part.inflight.sha256, name=part.inflight.name)
            self.inflight_restored = [tuple(e) for e in entries]
            self.chain = list(part.chain)
            self.completed = manifest.checkpoint
            self.ingress_position = part.ingress_position
            self.positions = [part.ingress_position]
            released = dict(part.egress)
        backend.take_changes()
        self.carry = set()
        self.restored_from = manifest.checkpoint if manifest is not None else None
        self.completed_at = manifest.created_ms / 1000 if manifest is not None else None
        peer._released = released
        peer._restored_heads = dict(released)
        assert peer.dispatcher is not None
        peer.dispatcher.reload_counters()  # the restored timer sequence, not the empty store's
        peer._next_due = backend.next_timer_due()

    async def _restore_rescaled(self, manifest: Manifest, backend: Any) -> dict[str, int]:
        """Restore a checkpoint taken on another number of peers (see snapshot/rescale.py)."""
        peer = self.peer
        me, new_n, old_n = peer.peer_id, peer.n_peers, manifest.peers
        lo, hi = peer.key_group_range
        inherited = inherited_peers(me, old_n, new_n)
        timer_seq = 0
        appended: list[dict[bytes, bytes]] = []
        loaded = 0
        # the old peer with this index first: its egress keeps its offsets
        parts = sorted(manifest.parts, key=lambda p: p.peer != me)
        for part in parts:
            a, b = part.key_groups
            keep_egress = part.peer in inherited
            if not (a < hi and lo < b) and not keep_egress:
                continue
            egress: dict[bytes, bytes] = {}
            for ref in part.chain:
                data = await self._fetch(ref)
                kind, _, entries = decode_object(data, sha256=ref.sha256, name=ref.name)
                if kind != ref.kind:
                    raise SnapshotError(f"{ref.name} is a {kind} object, the manifest says {ref.kind}")
                split = split_entries(entries, lo, hi, keep_egress=keep_egress)
                split.egress = egress  # deltas apply on top of the base
                loaded += await asyncio.to_thread(backend.load, split)
                timer_seq = max(timer_seq, split.timer_seq)
            if part.peer == me:
                await asyncio.to_thread(backend.load, ((("egress", k, v) for k, v in egress.items())))
            elif keep_egress:
                appended.append(egress)
        if appended:
            with backend.read() as txn:
                heads = backend.egress_heads(txn)
            for egress in appended:
                await asyncio.to_thread(backend.load, renumber_egress(egress, heads))
        await asyncio.to_thread(backend.load, [("meta", b"timer_seq", struct.pack(">Q", timer_seq))])
        # in flight at the cut: every old part's messages whose target this peer now owns
        maxp = peer.config.max_parallelism
        inflight: list[tuple[Any, ...]] = []
        for part in manifest.parts:
            data = await self._fetch(part.inflight)
            _, _, entries = decode_object(data, sha256=part.inflight.sha256, name=part.inflight.name)
            for e in entries:
                if lo <= key_group(e[1], maxp) < hi:
                    if e[6] >= new_n:  # a request's reply address that no longer exists
                        e[6] = e[7] = 0
                    inflight.append(tuple(e))
        self.inflight_restored = inflight
        self.chain = []  # the next checkpoint writes a base for the new key-group range
        self.completed = manifest.checkpoint
        if me < old_n:
            self.ingress_position = manifest.parts[me].ingress_position
        elif peer.ingress is not None:
            self.ingress_position = peer.ingress.next_offset  # a new peer: nothing of its own to replay
        self.positions = [self.ingress_position]
        cfg = peer.config
        assert cfg.state_dir is not None
        for r in inherited:
            if r == me:
                continue
            path = os.path.join(cfg.state_dir, f"peer-{r}.ingress")
            if os.path.isdir(path):
                self.foreign_ingress.append((path, manifest.parts[r].ingress_position))
            else:
                log.error("peer %d: the ingress log of removed peer %d is not at %s: client messages it "
                          "acknowledged after checkpoint %d cannot be replayed; restore on the machine that "
                          "holds its state directory to keep them", me, r, path, manifest.checkpoint)  # fmt: skip
        with backend.read() as txn:
            released = backend.egress_heads(txn)
        log.warning("peer %d: restored checkpoint %d taken on %d peers onto %d: key groups %d..%d, %d entries, "
                    "%d messages in flight, egress of old peers %s", me, manifest.checkpoint, old_n, new_n,
                    lo, hi - 1, loaded, len(inflight), inherited)  # fmt: skip
        return released

    async def _fetch(self, ref: ObjectRef) -> bytes:
        data = await asyncio.to_thread(self._local, ref)
        if data is not None:
            return data
        try:
            return await self.blobs.get(ref.name)
        except BlobNotFoundError as exc:
            raise SnapshotError(f"checkpoint object {ref.name} is missing from the blob store") from exc


def part_to_dict(part: PeerPart) -> dict[str, Any]:
    """A :class:`PeerPart` as a msgpack/JSON-able dict."""
    return asdict(part)
