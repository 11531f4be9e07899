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

Longer than ~500 lines because a cut, its build thread, the upload and a restore share
one store and one set of transactions: which thread may touch them when (a cancelled
upload's build thread finishes before anything closes the store) is only checkable in
one place.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final, TypeVar

from .._speedups import key_group
from ..errors import (
    BlobNotFoundError,
    BlobStoreError,
    IncompatibleSnapshotError,
    SnapshotError,
    StateBackendError,
)
from ..outbox import Outbox
from ..spill import Spill
from ..transport import codec
from .format import (
    Manifest,
    ObjectRef,
    PackedEntries,
    PeerPart,
    file_sha256,
    object_name,
    open_object_file,
    write_object,
)
from .rescale import inherited_peers, renumber_egress, split_entries

if TYPE_CHECKING:
    import lmdb

    from ..blobstore.base import BlobStore
    from ..state.lmdb_backend import ChangeLog, LmdbStateBackend
    from .host import CheckpointHost

__all__ = ["Participant"]

_T = TypeVar("_T")
#: a checkpoint writes a base instead of a delta once the keys written since the last cut
#: (duplicates counted) reach this many per entry of the store: deduplicating them (a set
#: insertion each, ~0.09 µs) would then cost more of the build thread's GIL time than
#: packing every entry of the store (~0.63 µs each, dump_packed)
BASE_WHEN_WRITES: Final = 8
log = logging.getLogger("statefun_mesh.snapshot")


class _Snap:
    """One checkpoint this peer has cut and not yet finished."""

    def __init__(
        self,
        n: int,
        txn: lmdb.Transaction,
        changes: ChangeLog,
        inbox: list[Any],
        ingress_pos: int,
        waiting: set[int],
        peers: int,
    ) -> None:
        self.n = n
        self.txn: lmdb.Transaction | None = txn
        self.changes = changes
        self.inbox = inbox
        #: the inbox's spilled tail at the cut (a read transaction of the spill), after ``inbox``
        self.spill_txn: lmdb.Transaction | None = None
        #: committed sends not yet routed at the cut (a read transaction of the outbox), after the spill
        self.outbox_txn: lmdb.Transaction | None = None
        self.ingress_pos = ingress_pos
        self.sources: dict[str, int] = {}
        self.waiting = waiting
        self.logs: dict[int, list[Any]] = {p: [] for p in range(peers)}
        self.finalizing = False
        self.part: PeerPart | None = None


class Participant:
    """Checkpoint and restore logic of one peer (the coordinator is peer 0's :class:`Coordinator`).

    It steers its peer only through ``host`` (:class:`~statefun_mesh.snapshot.host.CheckpointHost`).
    """

    def __init__(self, host: CheckpointHost, blobs: BlobStore) -> None:
        self.host = host
        self.blobs = blobs
        cfg = host.config
        assert cfg.state_dir is not None
        self.local_dir = os.path.join(cfg.state_dir, f"peer-{host.peer_id}.checkpoints")
        #: keep local copies of uploaded objects and restore from them (``local_recovery``)
        self.local_recovery = cfg.local_recovery
        if self.local_recovery:
            os.makedirs(self.local_dir, exist_ok=True)
        #: checkpoint objects being written or read (a file each, never all in memory)
        self.work_dir = os.path.join(cfg.state_dir, f"peer-{host.peer_id}.ckpt-work")
        shutil.rmtree(self.work_dir, ignore_errors=True)  # leftovers of a crash
        self.chain: list[ObjectRef] = []
        self.carry: set[tuple[str, bytes]] = set()
        self.snap: _Snap | None = None
        self.pending: int | None = None
        self.pending_last_complete = -1
        self.pending_srcs: set[int] = set()
        self.completed = -1
        #: wall-clock time (s) the last complete checkpoint was taken (for its age in ``status``)
        self.completed_at: float | None = None
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
        #: the state of the last completed checkpoint as this process's store saw it at the
        #: cut: (checkpoint, its chain's SHA-256s, a read transaction opened at the cut).
        #: Kept open until the next checkpoint completes, so a recovery to it can roll the
        #: live store back in place (docs/architecture.md §7 "Rolling back in place").
        self.view: tuple[int, tuple[str, ...], lmdb.Transaction] | None = None
        #: what reset() kept for restore(): checkpoint -> (chain SHA-256s, read transaction
        #: at its cut, keys written since the cut besides the store's live change set)
        self._points: dict[int, tuple[tuple[str, ...], lmdb.Transaction, set[tuple[str, bytes]]]] = {}
        #: how the last restore() got its state: "rolled back" (in place), "rebuilt" or "rescaled"
        self.last_restore = ""
        #: keys rewritten (rolled back) or entries loaded (rebuilt) by the last restore()
        self.last_restore_entries = 0

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
        self.host.hold_input()
        if not self.host.batch_running():
            self.take_snapshot()

    def take_snapshot(self) -> None:
        """Cut checkpoint ``self.pending`` now (called between batches)."""
        host = self.host
        n = self.pending
        if n is None:
            return
        self.pending = None
        backend = host.state_store()
        try:
            # the write-back cache into LMDB first: the cut's view and change log hold it
            backend.flush_cache()
        except StateBackendError as exc:
            # e.g. a full disk: nothing was written, the cache keeps every entry; this
            # checkpoint fails (the coordinator aborts it) and the next one retries
            host.tlog.error(
                "failed checkpoint cuts",
                "peer %d: checkpoint %d: cannot write the cached state into the store: %s; "
                "processing goes on and the coordinator retries with the next checkpoint",
                host.peer_id,
                n,
                exc,
            )
            self.pending_srcs = set()
            host.release_input()
            host.acknowledge_checkpoint(n, None, str(exc))
            return
        # the keys written since the last cut, deduplicated in the build thread, not here
        changes = backend.take_change_log()
        if self.carry:
            changes.add(self.carry)
        self.carry = set()
        txn = backend.read()
        # Unprocessed input: the inbox, and before it the messages of parked async
        # invocations (still running, or finished but not committed) and those queued
        # behind them. Their state in txn is from before them; their effects commit
        # after this cut and belong to the next checkpoint.
        inbox, spill_txn = host.cut_input()
        others = {p for p in range(host.n_peers) if p != host.peer_id}
        barrier = codec.encode_control(codec.BARRIER, n, max(self.completed, self.pending_last_complete))
        host.broadcast_barrier(barrier)
        # the log position of the last message routed into the mesh (one still being
        # appended, not yet routed, is not covered: recovery replays it)
        ingress_pos = host.routed_ingress_position()
        self.snap = _Snap(n, txn, changes, inbox, ingress_pos, others - self.pending_srcs, host.n_peers)
        self.snap.spill_txn = spill_txn
        self.snap.outbox_txn = host.cut_outbox()
        # Kafka positions at the cut: the records routed so far are covered by this checkpoint
        self.snap.sources = host.source_positions()
        self.pending_srcs = set()
        host.release_input()
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
        host = self.host
        loop = asyncio.get_running_loop()
        started = loop.time()
        written = False
        try:
            part = await self._write_objects(snap)
            written = True
        except (BlobStoreError, SnapshotError, OSError) as exc:
            host.tlog.error(
                "failed checkpoint uploads",
                "peer %d: checkpoint %d could not be written: %s; "
                "processing goes on and the coordinator retries with the next checkpoint",
                host.peer_id,
                snap.n,
                exc,
            )
            host.acknowledge_checkpoint(snap.n, None, str(exc))
            return
        finally:
            # a written snapshot keeps its cut's read transaction: it becomes the view a
            # rollback in place returns to once the checkpoint completes (on_done)
            if snap.txn is not None and (not written or self.snap is not snap):
                snap.txn.abort()
                snap.txn = None
            if snap.spill_txn is not None:
                snap.spill_txn.abort()
                snap.spill_txn = None
            if snap.outbox_txn is not None:
                snap.outbox_txn.abort()
                snap.outbox_txn = None
        snap.part = part
        self.last_duration = loop.time() - started
        host.acknowledge_checkpoint(snap.n, part, None)

    def _need_base(self) -> bool:
        cfg = self.host.config
        if not self.chain or len(self.chain) >= cfg.base_every:
            return True
        deltas = sum(r.size for r in self.chain[1:])
        return deltas > cfg.delta_ratio * max(self.chain[0].size, 1)

    async def _write_objects(self, snap: _Snap) -> PeerPart:
        peer = self.host
        backend = peer.state_store()
        txn = snap.txn
        assert txn is not None
        # A base also when deduplicating the change log would cost more than packing the
        # whole store: a few hot keys written over and over (docs/architecture.md §7)
        kind = (
            "base"
            if self._need_base() or snap.changes.writes() >= BASE_WHEN_WRITES * max(backend.entries(txn), 1)
            else "delta"
        )
        n, me = snap.n, peer.peer_id
        lo, hi = peer.key_group_range
        header = {"checkpoint": n, "peer": me, "key_groups": [lo, hi], "max_parallelism": peer.config.max_parallelism}

        def build() -> tuple[list[tuple[str, str, int, int, str]], dict[str, int]]:
            entries: Iterator[Any]
            if kind == "base":
                entries = (PackedEntries(n, data) for n, data in backend.dump_packed(txn))
            else:
                entries = (PackedEntries(n, data) for n, data in backend.delta_packed(txn, snap.changes))
            # one record at a time: a spilled tail is read from disk, never all in memory
            records = itertools.chain(
                (list(r) for r in snap.inbox),
                (PackedEntries(n, data) for n, data in Spill.packed(snap.spill_txn))
                if snap.spill_txn is not None
                else (),
                # committed sends not yet routed (for any peer: a restore routes the inflight)
                (PackedEntries(n, data) for n, data in Outbox.packed(snap.outbox_txn))
                if snap.outbox_txn is not None
                else (),
                *((list(r) for r in snap.logs[p]) for p in range(peer.n_peers)),
            )
            # each object is encoded into a file a chunk at a time and uploaded from it,
            # so a checkpoint holds about one chunk of it in memory, whatever its size
            path = self._work_path(object_name(me, n, kind))
            written = [(kind, path, *self._write_file(path, kind, header, entries))]
            egress = backend.egress_heads(txn)
            path = self._work_path(object_name(me, n, "inflight"))
            written.append(("inflight", path, *self._write_file(path, "inflight", header, records)))
            return written, egress

        try:
            written, egress = await _thread_to_its_end(build)
            refs = []
            for k, path, entries, size, sha256 in written:
                name = object_name(me, n, k)
                await self.blobs.put_file(name, path)
                if self.local_recovery:  # the file just uploaded becomes the local copy
                    os.replace(path, os.path.join(self.local_dir, name.replace("/", "__")))
                refs.append(ObjectRef(name=name, size=size, sha256=sha256, checkpoint=n, kind=k, entries=entries))
        finally:
            for k in (kind, "inflight"):
                try:
                    os.remove(self._work_path(object_name(me, n, k)))
                except OSError:
                    pass
        self.last_bytes = refs[0].size + refs[1].size
        chain = [refs[0]] if kind == "base" else [*self.chain, refs[0]]
        return PeerPart(
            peer=me,
            key_groups=(lo, hi),
            chain=tuple(chain),
            inflight=refs[1],
            ingress_position=snap.ingress_pos,
            egress=egress,
            sources=snap.sources,
        )

    def _work_path(self, name: str) -> str:
        return os.path.join(self.work_dir, name.replace("/", "__"))

    def _write_file(self, path: str, kind: str, header: dict[str, Any], entries: Iterator[Any]) -> tuple[int, int, str]:
        """Encode an object into ``path``: ``(entries, size, SHA-256)``."""
        try:
            os.makedirs(self.work_dir, exist_ok=True)
            with open(path, "wb") as fh:
                return write_object(fh, kind, header, entries)
        except OSError as exc:
            try:
                os.remove(path)  # a partial file would only take more of a full disk
            except OSError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                hint = "the disk holding state_dir is full: free space on it or move state_dir to a larger one"
            else:
                hint = "check that state_dir is writable"
            raise SnapshotError(f"cannot write checkpoint object {path}: {exc.strerror or exc}; {hint}") from exc

    def _local(self, ref: ObjectRef) -> str | None:
        """The path of this peer's intact local copy of ``ref``, if it keeps one."""
        if not self.local_recovery:
            return None
        path = os.path.join(self.local_dir, ref.name.replace("/", "__"))
        try:
            sha256 = file_sha256(path)
        except OSError:
            return None
        if sha256 != ref.sha256:
            log.warning(
                "peer %d: local copy of %s does not match the manifest; downloading it", self.host.peer_id, ref.name
            )
            return None
        return path

    async def _open(self, ref: ObjectRef) -> tuple[str, Iterator[Any]]:
        """``(kind, entries)`` of ``ref``, read from its local copy or downloaded to a file.

        The entries are decoded from the file as they are consumed (bounded memory); a
        downloaded file is checked against the manifest's SHA-256 first, then unlinked
        (it stays readable while open).
        """
        path = await asyncio.to_thread(self._local, ref)
        if path is not None:
            kind, _, entries = await asyncio.to_thread(open_object_file, path, name=ref.name)
            return kind, entries
        path = self._work_path(ref.name)
        try:
            await asyncio.to_thread(os.makedirs, self.work_dir, exist_ok=True)
            try:
                await self.blobs.get_file(ref.name, path)
            except BlobNotFoundError as exc:
                raise SnapshotError(f"checkpoint object {ref.name} is missing from the blob store") from exc
            kind, _, entries = await asyncio.to_thread(open_object_file, path, sha256=ref.sha256, name=ref.name)
        finally:
            try:
                os.remove(path)
            except OSError:
                pass
        return kind, entries

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
        if snap.txn is not None:
            self._set_view(n, snap.txn)
            snap.txn = None
        elif self.view is not None:  # no view of n: an older one would miss n's changes
            self.view[2].abort()
            self.view = None
        self.host.release_egress(snap.part.egress)
        self.host.sources_checkpointed(snap.part.sources)
        # Trim the ingress log only below the oldest retained checkpoint, so recovery can
        # still fall back to any retained checkpoint if a newer one turns out unreadable.
        self.positions.append(snap.ingress_pos)
        del self.positions[: -self.host.config.checkpoint_retention]
        ingress = self.host.ingress_log()
        if ingress is not None:
            ingress.trim(self.positions[0])
        # removed peers' ingress logs replayed after a rescale: this checkpoint covers them
        for path in self.replayed_foreign:
            shutil.rmtree(path, ignore_errors=True)
            log.info("peer %d: deleted %s (checkpoint %d covers its messages)", self.host.peer_id, path, n)
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
            self.host.release_input()
        if snap is None or snap.n != n:
            return
        self.snap = None
        self.carry |= snap.changes.as_set()
        if snap.txn is not None and (not snap.finalizing or snap.part is not None):
            snap.txn.abort()
            snap.txn = None
        if snap.spill_txn is not None and not snap.finalizing:
            snap.spill_txn.abort()
            snap.spill_txn = None
        if snap.outbox_txn is not None and not snap.finalizing:
            snap.outbox_txn.abort()
            snap.outbox_txn = None

    def _set_view(self, n: int, txn: lmdb.Transaction) -> None:
        """``txn`` (opened at checkpoint ``n``'s cut, or right after restoring it) is the new view."""
        old, self.view = self.view, (n, tuple(r.sha256 for r in self.chain), txn)
        if old is not None:
            old[2].abort()

    def _drop_points(self) -> None:
        for _, txn, _ in self._points.values():
            txn.abort()
        self._points = {}

    async def settled(self) -> None:
        """Wait until an upload :meth:`reset` cancelled has ended: its build thread may still
        read the store through the cut's transactions, so the store is rolled back, rebuilt
        or closed only after it."""
        upload = self._upload
        if upload is not None and not upload.done():
            await asyncio.wait([upload])

    def reset(self) -> None:
        """Forget every checkpoint in progress (recovery starts).

        What a rollback in place needs is kept for :meth:`restore`: the view of the last
        completed checkpoint, and that of a checkpoint this peer wrote whose completion it
        has not heard of yet (the coordinator may have published it), each with the keys
        written since its cut that the store's live change set does not hold.
        """
        if self._upload is not None and not self._upload.done():
            self._upload.cancel()
        snap, self.snap = self.snap, None
        self._drop_points()
        if self.view is not None:
            n, chain, txn = self.view
            self._points[n] = (chain, txn, self.carry | (snap.changes.as_set() if snap is not None else set()))
            self.view = None
        if snap is not None and snap.part is not None and snap.txn is not None:
            self._points[snap.n] = (tuple(r.sha256 for r in snap.part.chain), snap.txn, set(self.carry))
            snap.txn = None
        if snap is not None and snap.txn is not None and not snap.finalizing:
            snap.txn.abort()
        if snap is not None and snap.spill_txn is not None and not snap.finalizing:
            snap.spill_txn.abort()
        if snap is not None and snap.outbox_txn is not None and not snap.finalizing:
            snap.outbox_txn.abort()
        self.pending = None
        self.pending_srcs = set()
        self.carry = set()

    # -- restoring ------------------------------------------------------------------------

    def _rollback_point(self, manifest: Manifest | None) -> tuple[lmdb.Transaction, set[tuple[str, bytes]]] | None:
        """The view and changed keys to roll the live store back to ``manifest`` in place,
        or ``None`` when it must be rebuilt: this process did not see that checkpoint's cut
        (a restarted peer), wrote another chain than the manifest names, the peers or key
        groups changed, the store does not track its changes, or its map grew since the
        cut (which invalidates the read transaction)."""
        n = manifest.checkpoint if manifest is not None else -1
        point = self._points.pop(n, None)
        self._drop_points()
        if point is None:
            return None
        chain, txn, extra = point
        peer = self.host
        backend = peer.state_store()
        live = backend.pending_changes()
        usable = (
            live is not None
            and backend.usable_view(txn)
            and (
                manifest is None
                or (
                    manifest.peers == peer.n_peers
                    and manifest.parts[peer.peer_id].key_groups == peer.key_group_range
                    and tuple(r.sha256 for r in manifest.parts[peer.peer_id].chain) == chain
                )
            )
        )
        if not usable or live is None:
            txn.abort()
            return None
        return txn, extra | live

    async def restore(self, manifest: Manifest | None) -> None:
        """Restore ``manifest`` (``None``: empty state) into this peer's state store.

        A peer that kept running since that checkpoint's cut rolls its live store back in
        place: it rewrites only the keys written since the cut, with the values a read
        transaction opened at the cut still sees (:meth:`_rollback_point`). Otherwise the
        live store is not trusted: it is deleted and rebuilt from the checkpoint objects,
        read from the local copies this peer kept when they are intact (and
        ``local_recovery`` is on), else from the blob store.
        """
        peer = self.host
        cfg = peer.config
        started, cpu = time.monotonic(), time.process_time()
        await self.settled()
        phases = [("settle", time.monotonic())]
        if manifest is not None and manifest.max_parallelism != cfg.max_parallelism:
            self._drop_points()
            raise IncompatibleSnapshotError(
                f"checkpoint {manifest.checkpoint} was taken with max_parallelism {manifest.max_parallelism}, "
                f"this mesh has {cfg.max_parallelism}; max_parallelism is fixed for the life of the application"
            )
        point = self._rollback_point(manifest)
        if point is not None:
            view, keys = point
            backend = peer.reopen_state_store(keep=True)

            def roll() -> int:
                try:
                    return backend.rollback(view, keys)
                finally:  # in the thread: a cancelled restore must not abort it under a running rollback
                    view.abort()

            try:
                self.last_restore_entries = await asyncio.to_thread(roll)
                self.last_restore = "rolled back"
            except StateBackendError as exc:
                log.warning("peer %d: cannot roll the store back in place (%s); rebuilding it", peer.peer_id, exc)
                point = None
        if point is None:
            if self.view is not None:  # (reset() hands it over; this only guards its order)
                self.view[2].abort()
                self.view = None
            backend = peer.reopen_state_store()
            self.last_restore = "rebuilt"
            self.last_restore_entries = 0
        phases.append(("store", time.monotonic()))
        ingress = peer.ingress_log()
        self.chain = []
        self.inflight_restored = []
        self.completed = -1
        released: dict[str, int] = {}
        self.ingress_position = ingress.first_offset if ingress is not None else 0
        self.foreign_ingress = []
        self.sources = {k: v for p in manifest.parts for k, v in p.sources.items()} if manifest is not None else {}
        if manifest is not None and manifest.peers != peer.n_peers:
            released = await self._restore_rescaled(manifest, backend)
            self.last_restore = "rescaled"
        elif manifest is not None:
            part = manifest.parts[peer.peer_id]
            for ref in part.chain if point is None else ():
                kind, entries = await self._open(ref)
                if kind != ref.kind:
                    raise SnapshotError(f"{ref.name} is a {kind} object, the manifest says {ref.kind}")
                # a base (written in key order) goes into the empty store by appending
                self.last_restore_entries += await asyncio.to_thread(backend.load, entries, append=kind == "base")
            phases.append(("state", time.monotonic()))
            _, entries = await self._open(part.inflight)
            self.inflight_restored = await asyncio.to_thread(lambda: [tuple(e) for e in entries])
            phases.append(("inflight", time.monotonic()))
            self.chain = list(part.chain)
            self.completed = manifest.checkpoint
            self.ingress_position = part.ingress_position
            self.positions = [part.ingress_position]
            released = dict(part.egress)
        backend.take_changes()
        self.carry = set()
        self.completed_at = manifest.created_ms / 1000 if manifest is not None else None
        if manifest is None or manifest.peers == peer.n_peers:
            # the store now holds exactly this checkpoint: a later recovery to it, before
            # the next one completes, rolls back in place
            self._set_view(manifest.checkpoint if manifest is not None else -1, backend.read())
        if manifest is not None:
            steps, at = [], started
            for name, t in phases:
                steps.append(f"{name} {t - at:.3f}")
                at = t
            log.info(
                "peer %d: checkpoint %d restored (%s, %d %s) in %.3f s, %.3f CPU-s (%s s)",
                peer.peer_id,
                manifest.checkpoint,
                self.last_restore,
                self.last_restore_entries,
                "keys rewritten" if self.last_restore == "rolled back" else "entries loaded",
                time.monotonic() - started,
                time.process_time() - cpu,
                ", ".join(steps),
            )
        peer.state_restored(released)

    async def _restore_rescaled(self, manifest: Manifest, backend: LmdbStateBackend) -> dict[str, int]:
        """Restore a checkpoint taken on another number of peers (see snapshot/rescale.py)."""
        peer = self.host
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
                kind, entries = await self._open(ref)
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
            _, entries = await self._open(part.inflight)
            for e in await asyncio.to_thread(list, entries):
                if lo <= key_group(e[1], maxp) < hi:
                    if e[6] >= new_n:  # a request's reply address that no longer exists
                        e[6] = e[7] = 0
                    inflight.append(tuple(e))
        self.inflight_restored = inflight
        self.last_restore_entries = loaded
        self.chain = []  # the next checkpoint writes a base for the new key-group range
        self.completed = manifest.checkpoint
        if me < old_n:
            self.ingress_position = manifest.parts[me].ingress_position
        elif (ingress := peer.ingress_log()) is not None:
            self.ingress_position = ingress.next_offset  # a new peer: nothing of its own to replay
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
                log.error(
                    "peer %d: the ingress log of removed peer %d is not at %s: client messages it "
                    "acknowledged after checkpoint %d cannot be replayed; restore on the machine that "
                    "holds its state directory to keep them",
                    me,
                    r,
                    path,
                    manifest.checkpoint,
                )
        with backend.read() as txn:
            released = backend.egress_heads(txn)
        log.warning(
            "peer %d: restored checkpoint %d taken on %d peers onto %d: key groups %d..%d, %d entries, "
            "%d messages in flight, egress of old peers %s",
            me,
            manifest.checkpoint,
            old_n,
            new_n,
            lo,
            hi - 1,
            loaded,
            len(inflight),
            inherited,
        )
        return released

    def take_foreign_ingress(self) -> list[tuple[str, int]]:
        """Removed peers' ingress logs to replay after a rescale (path, position), handed over once."""
        logs, self.foreign_ingress = self.foreign_ingress, []
        return logs

    def take_inflight_restored(self) -> list[Any]:
        """The messages in flight at the restored cut, handed over once (the peer queues them)."""
        records, self.inflight_restored = self.inflight_restored, []
        return records

    def note_replayed_foreign(self, path: str) -> None:
        """The peer replayed the removed peer's ingress log at ``path``: delete it once a checkpoint covers it."""
        if path not in self.replayed_foreign:
            self.replayed_foreign.append(path)


def part_to_dict(part: PeerPart) -> dict[str, Any]:
    """A :class:`PeerPart` as a msgpack/JSON-able dict."""
    return asdict(part)


async def _thread_to_its_end(fn: Callable[[], _T]) -> _T:
    """``await asyncio.to_thread(fn)``, except that a cancellation ends the wait only once
    ``fn`` has returned: a thread cannot be stopped, and ``fn`` reads LMDB transactions the
    caller aborts (and a store a recovery closes) as soon as the wait ends. Without this, a
    recovery that cancelled an upload mid-build aborted the transaction under the thread
    (a segmentation fault)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller sees
        raise
