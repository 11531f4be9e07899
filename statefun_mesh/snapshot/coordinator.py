"""The checkpoint coordinator (on peer 0): triggers checkpoints, publishes manifests,
deletes what no retained checkpoint needs, and runs recovery rounds.

Recovery round ``g`` (generation ``g``): the coordinator picks the latest complete
checkpoint, sends ``RECOVER [g, n]`` to every peer, restores its own part, waits for
``READY [g]`` from every peer (repeating ``RECOVER`` to the silent ones) and then sends
``RESUME [g]``. Every frame between peers carries its sender's generation; frames of
an older generation are dropped, so nothing from before the failure survives it. A
round starts when the coordinator starts, and whenever a peer restarts (it announces
a new incarnation in its heartbeats).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import _aio
from ..errors import (
    BlobNotFoundError,
    BlobStoreError,
    IncompatibleSnapshotError,
    SnapshotError,
    SnapshotNotFoundError,
)
from ..transport import codec
from .format import Manifest, PeerPart, manifest_name, parse_manifest_name
from .participant import part_to_dict

if TYPE_CHECKING:
    from ..blobstore.base import BlobStore
    from .host import RecoveryHost
    from .participant import Participant

__all__ = ["Coordinator", "latest_manifest", "list_checkpoints"]

log = logging.getLogger("statefun_mesh.snapshot")

GENERATION_BLOB = "coordinator/generation"
#: seconds a shutdown waits for a checkpoint being published (Coordinator.aclose)
PUBLISH_GRACE = 2.0
#: the reason of the first recovery round, which is a start, not a failure
STARTED = "the coordinator started"
#: while a rescale is in progress: ``{"checkpoint": n, "peers": m}``
RESCALE_BLOB = "coordinator/rescale"


async def list_checkpoints(blobs: BlobStore) -> list[int]:
    """Ids of the checkpoints that have a manifest, ascending."""
    ids = [parse_manifest_name(name) for name in await blobs.list("checkpoints/")]
    return sorted(i for i in ids if i is not None)


async def latest_manifest(blobs: BlobStore, exclude: set[int] | frozenset[int] = frozenset()) -> Manifest | None:
    """The newest checkpoint whose manifest parses and whose objects exist, or ``None``.

    A manifest that does not parse, or that names a missing object, is skipped with an
    error in the log: a partial or corrupted checkpoint is never restored.
    """
    for n in reversed(await list_checkpoints(blobs)):
        if n in exclude:
            continue
        name = manifest_name(n)
        try:
            m = Manifest.from_json(await blobs.get(name), name=name)
            for part in m.parts:
                for ref in (*part.chain, part.inflight):
                    if not await blobs.exists(ref.name):
                        raise SnapshotError(f"{name} names {ref.name}, which is missing")
            return m
        except (SnapshotError, BlobNotFoundError) as exc:
            # a corrupted or incomplete checkpoint: never restored. (Any other blob store
            # error propagates: the store failing says nothing about the checkpoint.)
            log.error("skipping checkpoint %d: %s", n, exc)
    return None


class Coordinator:
    """Runs on peer 0, beside that peer's own :class:`Participant`.

    It steers the peer only through ``host`` (:class:`~statefun_mesh.snapshot.host.RecoveryHost`)
    and the local participant directly; other peers only through control frames.
    """

    def __init__(self, host: RecoveryHost, participant: Participant, blobs: BlobStore) -> None:
        self.peer = host
        self.participant = participant
        self.blobs = blobs
        self.generation = 0
        self.next_id = 0
        self.in_progress: int | None = None
        self.started_at = 0.0
        self.acks: dict[int, PeerPart] = {}
        self.ready: set[int] = set()
        self.manifests: list[int] = []
        #: manifests this coordinator published, parsed (garbage collection reads the retained
        #: ones after every checkpoint: from here, not by a get and a parse each)
        self._published: dict[int, Manifest] = {}
        self.last_complete: Manifest | None = None
        self.recoveries = 0
        self._task: asyncio.Task[None] | None = None
        self._recovering: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()
        #: checkpoints a peer could not restore (a corrupted object): never tried again
        self.unrestorable: set[int] = set()
        #: the configured ``restore`` (``"latest"``, an id, or ``""``): used by the first round
        self.restore = host.config.restore
        #: for quiet logs: whether a completed checkpoint was logged at info level, and how
        #: many were aborted since the last one completed
        self.logged_complete = False
        self.aborted_since_complete = 0

    # -- recovery -------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the blob store and run the first recovery round (blocks until the mesh is up)."""
        pause = 0.5
        while True:
            try:
                try:
                    self.generation = int((await self.blobs.get(GENERATION_BLOB)).decode())
                except (BlobNotFoundError, ValueError):
                    self.generation = 0
                self.manifests = await list_checkpoints(self.blobs)
                break
            except BlobStoreError as exc:
                # generations must only grow: never guess 0 because the store failed
                self.peer.tlog.error(
                    "blob store retries",
                    "the coordinator cannot read the blob store: %s; retrying in %.1f s",
                    exc,
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)
        self.next_id = (self.manifests[-1] + 1) if self.manifests else 1
        self.request_recovery(STARTED)
        while self._recovering is not None and not self._recovering.done():
            await asyncio.wait({self._recovering})  # a round may be superseded by another
        if self._recovering is not None and not self._recovering.cancelled() and self._recovering.exception():
            raise self._recovering.exception()  # type: ignore[misc]  # e.g. an incompatible checkpoint
        self._task = asyncio.create_task(self._tick(), name="statefun-mesh checkpoint coordinator")

    def request_recovery(self, reason: str) -> None:
        """Start a recovery round (e.g. a peer restarted). A round in progress is abandoned:
        the peer that restarted during it may have reported READY in its former life."""
        old = self._recovering
        if old is not None and not old.done():
            self.generation += 1  # the round in progress sees this and gives up
            self._ready_event.set()

        async def run() -> None:
            if old is not None and not old.done():
                await asyncio.wait({old})
            pause = 0.5
            why = reason
            while True:
                try:
                    await self.recover(why)
                    return
                except BlobStoreError as exc:
                    # the store is down or failing (not a bad checkpoint): the mesh cannot
                    # restore anything until it answers, so try the round again
                    self.peer.tlog.error(
                        "blob store retries",
                        "recovery round %d: the blob store failed: %s; retrying the round in %.1f s",
                        self.generation,
                        exc,
                        pause,
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 10.0)
                    why = f"retry after a blob store failure ({reason})"

        self._recovering = asyncio.create_task(run(), name="statefun-mesh recovery")

    async def recover(self, reason: str) -> None:
        peer = self.peer
        self.generation += 1
        gen = self.generation
        self.recoveries += 1
        self.in_progress = None
        self.acks = {}
        t0 = time.monotonic()
        await self.blobs.put(GENERATION_BLOB, str(gen).encode())
        manifest = await self._choose()
        self.last_complete = manifest
        if manifest is not None:
            self.next_id = max(self.next_id, manifest.checkpoint + 1)
        n = manifest.checkpoint if manifest is not None else -1
        # A start is not a failure: a fresh mesh (nothing to restore) is logged at debug level,
        # a restart from a checkpoint at info; only a recovery after a failure warns.
        level = logging.WARNING if reason != STARTED else logging.INFO if n >= 0 else logging.DEBUG
        log.log(
            level,
            "recovery round %d (%s): restoring %s on %d peers",
            gen,
            reason,
            f"checkpoint {n}" if n >= 0 else "empty state (no checkpoint yet)",
            peer.n_peers,
        )
        self.ready = set()
        self._ready_event = asyncio.Event()
        frame = codec.encode_control(codec.RECOVER, gen, n)
        try:
            await peer.recover(gen, manifest)
        except IncompatibleSnapshotError:
            raise
        except SnapshotError as exc:
            if manifest is None:
                raise
            log.error(
                "recovery round %d: peer 0 cannot restore checkpoint %d: %s; falling back to an earlier one",
                gen,
                n,
                exc,
            )
            self.unrestorable.add(n)
            if self.generation == gen:
                self.generation += 1
                self._ready_event.set()
                # run the next round from here (this coroutine is the current round's task)
                await self.recover(f"checkpoint {n} is unreadable on peer 0")
            return
        self.on_ready(peer.peer_id, gen)
        while not self._ready_event.is_set():
            for p in range(peer.n_peers):
                if p != peer.peer_id and p not in self.ready:
                    peer.send_control(p, frame, generation=gen)
            try:
                await _aio.wait_for(self._ready_event.wait(), 2.0)
            except (asyncio.TimeoutError, TimeoutError):
                if self.generation != gen:
                    return
                log.info("recovery round %d: waiting for peers %s", gen, sorted(set(range(peer.n_peers)) - self.ready))
        if self.generation != gen:
            return
        resume = codec.encode_control(codec.RESUME, gen)
        for p in range(peer.n_peers):
            if p != peer.peer_id:
                peer.send_control(p, resume, generation=gen)
        peer.resume(gen)
        self.restore = ""  # an explicit restore is done once; later rounds take the latest
        log.log(level, "recovery round %d done in %.2f s", gen, time.monotonic() - t0)

    async def _choose(self) -> Manifest | None:
        """The checkpoint this round restores, after checking it fits this mesh."""
        n_peers = self.peer.n_peers
        spec = self.restore
        manifest: Manifest | None
        if spec.isdigit():
            n = int(spec)
            if n in self.unrestorable:
                raise SnapshotError(f"checkpoint {n} (restore = {spec!r}) cannot be restored; see the errors above")
            try:
                manifest = Manifest.from_json(await self.blobs.get(manifest_name(n)), name=manifest_name(n))
            except LookupError:
                ids = await list_checkpoints(self.blobs)
                raise SnapshotNotFoundError(
                    f"restore = {spec!r}: there is no checkpoint {n} in the blob store "
                    f"(complete checkpoints: {', '.join(map(str, ids[-10:])) or 'none'})"
                ) from None
            newer = [i for i in await list_checkpoints(self.blobs) if i > n]
            for i in newer:
                # restoring an older checkpoint rolls the application back: a later
                # recovery must never pick up a checkpoint from the abandoned future
                await self.blobs.delete(manifest_name(i))
            if newer:
                log.warning("restoring checkpoint %d: deleted the newer checkpoints %s", n, newer)
            self.manifests = [i for i in self.manifests if i <= n]
        else:
            manifest = await latest_manifest(self.blobs, self.unrestorable)
        if manifest is None or manifest.peers == n_peers:
            return manifest
        marker = await self._rescale_marker()
        if not spec and marker != (manifest.checkpoint, n_peers):
            raise IncompatibleSnapshotError(
                f"checkpoint {manifest.checkpoint} was taken on {manifest.peers} peers and this mesh has {n_peers}; "
                f"to restore it onto {n_peers} peers (moving key groups, state, timers and in-flight messages), "
                'start with --restore latest (restore = "latest" in the config), or start '
                f"{manifest.peers} peers"
            )
        # Until a checkpoint of the new shape completes, any recovery restores this one
        # again, onto the same new shape, even after peer 0 restarted without `restore`.
        await self.blobs.put(RESCALE_BLOB, json.dumps({"checkpoint": manifest.checkpoint, "peers": n_peers}).encode())
        log.warning(
            "rescaling: checkpoint %d was taken on %d peers; restoring it onto %d",
            manifest.checkpoint,
            manifest.peers,
            n_peers,
        )
        return manifest

    async def _rescale_marker(self) -> tuple[int, int] | None:
        try:
            doc = json.loads(await self.blobs.get(RESCALE_BLOB))
            return int(doc["checkpoint"]), int(doc["peers"])
        except (BlobStoreError, LookupError, ValueError, TypeError, KeyError):
            return None

    def on_restore_failed(self, src: int, gen: int, n: int, reason: str) -> None:
        """Peer ``src`` could not restore checkpoint ``n``: never use it again; start over."""
        if gen != self.generation or n < 0:
            return
        log.error(
            "recovery round %d: peer %d cannot restore checkpoint %d (%s); falling back to an earlier one",
            gen,
            src,
            n,
            reason,
        )
        self.unrestorable.add(n)
        self.request_recovery(f"checkpoint {n} is unreadable on peer {src}")

    def on_ready(self, src: int, gen: int) -> None:
        if gen != self.generation:
            return
        if src in self.ready and self.peer.resumed and (self._recovering is None or self._recovering.done()):
            # the round is over, yet the peer still waits: the RESUME it was sent was lost
            log.info("recovery round %d: peer %d did not get RESUME; sending it again", gen, src)
            self.peer.send_control(src, codec.encode_control(codec.RESUME, gen), generation=gen)
            return
        self.ready.add(src)
        if len(self.ready) == self.peer.n_peers:
            self._ready_event.set()

    # -- checkpoints ----------------------------------------------------------------------

    async def _tick(self) -> None:
        peer = self.peer
        cfg = peer.config
        while True:
            await asyncio.sleep(cfg.checkpoint_interval)
            if not peer.resumed or (self._recovering is not None and not self._recovering.done()):
                continue
            if self.in_progress is not None:
                if time.monotonic() - self.started_at > cfg.checkpoint_timeout:
                    self.abort(self.in_progress, f"not complete after {cfg.checkpoint_timeout} s")
                continue
            self.trigger()

    def trigger(self) -> int:
        """Start the next checkpoint now; return its id."""
        n = self.next_id
        self.next_id += 1
        self.in_progress = n
        self.started_at = time.monotonic()
        self.acks = {}
        last = self.last_complete.checkpoint if self.last_complete is not None else -1
        self.participant.on_barrier(None, n, last)
        return n

    def on_ack(self, src: int, n: int, part: dict[str, Any] | None, error: str | None) -> None:
        if n != self.in_progress:
            return
        if error is not None or part is None:
            self.abort(n, f"peer {src} failed: {error}")
            return
        try:
            self.acks[src] = _part_from_dict(part)
        except (KeyError, TypeError, ValueError) as exc:
            self.abort(n, f"peer {src} sent a malformed acknowledgement: {exc!r}")
            return
        if len(self.acks) == self.peer.n_peers:
            task = asyncio.create_task(self._publish(n), name=f"checkpoint {n} publish")
            self._publishing.add(task)  # keep a reference: the loop holds tasks only weakly
            task.add_done_callback(self._publishing.discard)

    async def _publish(self, n: int) -> None:
        peer = self.peer
        manifest = Manifest(
            checkpoint=n,
            generation=self.generation,
            peers=peer.n_peers,
            max_parallelism=peer.config.max_parallelism,
            created_ms=int(time.time() * 1000),
            parts=tuple(self.acks[p] for p in range(peer.n_peers)),
        )
        try:
            await self.blobs.put(manifest_name(n), manifest.to_json())
        except BlobStoreError as exc:
            self.abort(n, f"its manifest could not be written: {exc}")
            return
        if self.in_progress != n:
            return
        self.in_progress = None
        self.last_complete = manifest
        self.manifests.append(n)
        self._published[n] = manifest
        # Quiet while all is well: the first checkpoint, and the first after failures, at
        # info level; the steady stream (one every checkpoint_interval) at debug level.
        took = time.monotonic() - self.started_at
        if self.aborted_since_complete:
            log.info(
                "checkpoint %d complete in %.2f s: checkpoints work again after %d aborted",
                n,
                took,
                self.aborted_since_complete,
            )
        elif not self.logged_complete:
            log.info("checkpoint %d complete in %.2f s (later checkpoints are logged at debug level)", n, took)
        else:
            log.debug("checkpoint %d complete in %.2f s", n, took)
        self.logged_complete = True
        self.aborted_since_complete = 0
        done = codec.encode_control(codec.CK_DONE, n)
        for p in range(peer.n_peers):
            if p != peer.peer_id:
                peer.send_control(p, done)
        self.participant.on_done(n)
        await self._collect_garbage()

    def abort(self, n: int, why: str) -> None:
        if self.in_progress != n:
            return
        log.error("checkpoint %d aborted: %s; the last complete checkpoint stays in force", n, why)
        self.aborted_since_complete += 1
        self.in_progress = None
        frame = codec.encode_control(codec.CK_ABORT, n)
        for p in range(self.peer.n_peers):
            if p != self.peer.peer_id:
                self.peer.send_control(p, frame)
        self.participant.abort(n)

    async def _collect_garbage(self) -> None:
        """Delete manifests beyond the retention, and objects no retained manifest names."""
        keep_n = self.peer.config.checkpoint_retention
        try:
            ids = await list_checkpoints(self.blobs)
            retained = ids[-keep_n:]
            needed: set[str] = set()
            for n in retained:
                m = self._published.get(n)
                if m is None:
                    m = Manifest.from_json(await self.blobs.get(manifest_name(n)))
                for part in m.parts:
                    needed.update(r.name for r in (*part.chain, part.inflight))
            for n in [n for n in self._published if n not in retained]:
                del self._published[n]
            for n in ids[:-keep_n]:
                await self.blobs.delete(manifest_name(n))
            oldest = retained[0] if retained else 0
            for name in await self.blobs.list("objects/"):
                if name in needed:
                    continue
                try:  # never delete objects of a checkpoint that may still be in progress
                    ck = int(name.rsplit("/", 1)[1].split("-", 1)[0])
                except ValueError:
                    continue
                if ck < oldest:
                    await self.blobs.delete(name)
        except (BlobStoreError, SnapshotError) as exc:
            log.warning("checkpoint garbage collection failed (retried after the next checkpoint): %s", exc)

    async def aclose(self, grace: float = PUBLISH_GRACE) -> None:
        """Stop triggering checkpoints, let a checkpoint being published finish for up to
        ``grace`` s (0: cut it off, as an abort does), then stop everything else.

        The peer closes the blob store right after this: a publish cut off there (its
        manifest, then garbage collection) logged a failed garbage collection at every
        shutdown that caught one."""
        await _cancel(self._task)
        if self._publishing:
            _, late = (
                await asyncio.wait(set(self._publishing), timeout=grace) if grace > 0 else ((), set(self._publishing))
            )
            for t in late:
                await _cancel(t)
        await _cancel(self._recovering)


async def _cancel(t: asyncio.Task[Any] | None) -> None:
    if t is not None and not t.done():
        t.cancel()
        try:
            await t
        except (asyncio.CancelledError, Exception):
            pass


def _part_from_dict(d: dict[str, Any]) -> PeerPart:
    from .format import ObjectRef

    return PeerPart(
        peer=int(d["peer"]),
        key_groups=(int(d["key_groups"][0]), int(d["key_groups"][1])),
        chain=tuple(ObjectRef(**o) for o in d["chain"]),
        inflight=ObjectRef(**d["inflight"]),
        ingress_position=int(d["ingress_position"]),
        egress={str(k): int(v) for k, v in d["egress"].items()},
        sources={str(k): int(v) for k, v in d.get("sources", {}).items()},
    )


__all__ += ["part_to_dict"]
