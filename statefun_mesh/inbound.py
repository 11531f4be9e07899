"""Frames from other peers: checked, held for later, or handed on.

Owns: the checks every frame from a peer passes (length, frame version, the generation
prefix: older generations dropped, far-ahead ones refused), the frames held for later
(of a later generation, before RESUME, or batch frames and barriers while a cut waits
for the batch in progress; of a later generation, batch frames within their sender's
link window, other frames up to a quarter of ``memory_budget``), the newest generation
heard on the coordinator's link, and the counters of bad and refused frames. It handles
the data-path frames itself: batches and credits (to the router), heartbeats (to
liveness), replies (to the pending requests); every checkpoint and recovery frame goes
to the one callable it is given, after the check that only the coordinator sends the
coordinator's kinds (docs/security.md).

Called by: the transport (every frame, :meth:`Inbound.on_frame`) and ``Peer`` (hold
and release at a cut, a recovery dropping or a resume releasing held frames). Calls:
the router, liveness, the pending requests, and the callables it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _speedups
from .errors import FrameDecodeError
from .transport import codec

if TYPE_CHECKING:
    from .dispatch import Record
    from .liveness import Liveness
    from .logutil import ThrottledLog
    from .replies import PendingRequests
    from .routing import Router

__all__ = ["GENERATION_WINDOW", "Inbound"]

_PEER_KINDS = frozenset(
    {
        codec.CREDIT,
        codec.HEARTBEAT,
        codec.REPLIES,
        codec.BARRIER,
        codec.CK_ACK,
        codec.CK_DONE,
        codec.CK_ABORT,
        codec.RECOVER,
        codec.READY,
        codec.RESUME,
        codec.RESTORE_FAILED,
        codec.REPLAYED,
    }
)
#: frames only the coordinator (peer 0) sends
_COORDINATOR_KINDS = frozenset({codec.CK_DONE, codec.CK_ABORT, codec.RECOVER, codec.RESUME})
#: a frame whose generation is more than this above the newest the peer knows is refused
GENERATION_WINDOW = 16


class Inbound:
    """Args:
    peer_id, tlog: the peer's.
    held_cap: bytes of frames of later generations other than batch frames held at most (a
        quarter of ``memory_budget``; batch frames: within their sender's link window, see :meth:`_may_hold`).
    checkpointing: whether the mesh takes checkpoints.
    router, liveness, requests: where batches and credits, heartbeats, and replies go.
    wake: the batch loop's wake-up (a credit it waits for came).
    generation: the peer's current generation.
    resumed: whether the peer processes in its generation (else frames of it are held).
    replaying: whether the peer replays its ingress log (credit lets it route more).
    coordinator_generation: on peer 0, the coordinator's own generation (``None`` elsewhere).
    on_records: batch records from a peer, before they are queued (a cut logs those in flight).
    on_control: ``(src, kind, items, generation)``: a checkpoint or recovery frame.
    """

    def __init__(
        self,
        peer_id: int,
        tlog: ThrottledLog,
        held_cap: int,
        checkpointing: bool,
        router: Router,
        liveness: Liveness,
        requests: PendingRequests,
        *,
        wake: asyncio.Event,
        generation: Callable[[], int],
        resumed: Callable[[], bool],
        replaying: Callable[[], bool],
        coordinator_generation: Callable[[], int | None],
        on_records: Callable[[int, list[Record]], None],
        on_control: Callable[[int, int, list[Any], int | None], None],
    ) -> None:
        self.peer_id = peer_id
        self._tlog = tlog
        self._held_cap = held_cap
        self.checkpointing = checkpointing
        self._router = router
        self._liveness = liveness
        self._requests = requests
        self._wake = wake
        self._generation = generation
        self._resumed = resumed
        self._replaying = replaying
        self._coordinator_gen = coordinator_generation
        self._on_records = on_records
        self._on_control = on_control
        #: frames held for later, in arrival order: (generation, source, frame)
        self.held: list[tuple[int, int, bytes | memoryview]] = []
        self.held_bytes = 0
        #: bytes of batch frames of later generations held, per (sender, generation), and in all
        self._held_from: dict[tuple[int, int], int] = {}
        self._held_batch_bytes = 0
        #: a cut waits for the batch in progress: batch frames and barriers are held
        self.hold_batches = False
        self.coordinator_generation = -1  # newest generation seen on peer 0's link
        #: frames dropped as malformed (the client endpoint counts its own in too)
        self.bad_frames = 0
        #: frames refused for what their link may not send (docs/security.md): control
        #: frames off the coordinator's link, generations far ahead of the mesh's
        self.refused_frames = 0

    def on_frame(self, src: int, frame: bytes) -> None:
        """Handle a frame's envelope from peer ``src``: its generation, a credit grant it
        carries (handled first, as a ``CREDIT`` frame sent just before the frame would be),
        then the frame."""
        try:
            gen, granted, body = codec.open_envelope(frame)
        except FrameDecodeError as exc:
            self.bad_frames += 1
            self._tlog.error("bad frames", "peer %d: rejected a frame from peer %d: %s", self.peer_id, src, exc)
            return
        if body[0] != _speedups.FRAME_VERSION:
            self.bad_frames += 1
            self._tlog.error(
                "bad frames",
                "peer %d: rejected a frame from peer %d: not a generation-prefixed frame of "
                "version %d; do all peers run the same statefun_mesh release?",
                self.peer_id,
                src,
                _speedups.FRAME_VERSION,
            )
            return
        kind = body[1]
        if src == 0:
            self.coordinator_generation = max(self.coordinator_generation, gen)
        self._liveness.heard(src)
        if granted is not None:
            if gen == self._generation() and self._resumed():
                self._credit(src, granted)  # what on_channel_frame does with a CREDIT frame
            else:  # rare: as a CREDIT frame in its own envelope (dropped, held or refused by its generation)
                self.on_frame(src, codec.envelope(gen) + codec.encode_control(codec.CREDIT, granted))
        if kind in (codec.HEARTBEAT, codec.RECOVER, codec.READY, codec.RESUME, codec.RESTORE_FAILED):
            self.on_channel_frame(src, body, gen)
            return
        generation = self._generation()
        if gen < generation:
            return  # from before a recovery: its effects were rolled back
        if gen > generation and src != 0 and not self._generation_plausible(gen):
            self._refuse_frame(
                src,
                "far-ahead generation",
                f"generation {gen}, more than {GENERATION_WINDOW} above "
                f"the newest this peer knows ({max(generation, self.coordinator_generation)})",
            )
            return
        # While a cut waits for the batch in progress, batch frames wait, and so do
        # barriers: a barrier must not overtake the frames its sender sent before it
        # (they are in flight across the cut and must be logged as such).
        if (
            gen > generation
            or not self._resumed()
            or (self.hold_batches and (kind == codec.KIND_BATCH or kind == codec.BARRIER))
        ):
            if gen > generation and not self._may_hold(src, gen, kind, len(body)):
                # a peer of this mesh sends a later generation only after a RECOVER this
                # peer is about to get, and at most its link window: beyond that it is no peer
                self.bad_frames += 1
                self._tlog.error(
                    "refused future frames",
                    "peer %d: refused a %d-byte frame of generation %d from "
                    "peer %d: over what this peer holds of later generations (a link window of "
                    "%d bytes per peer, %d bytes of other frames in all)",
                    self.peer_id,
                    len(body),
                    gen,
                    src,
                    self._router.link_bytes,
                    self._held_cap,
                )
                return
            self.held.append((gen, src, body))
            self.held_bytes += len(body)
            return
        self.on_channel_frame(src, body, gen)

    def _may_hold(self, src: int, gen: int, kind: int, size: int) -> bool:
        """Whether a frame of a later generation may be held until this peer is in it.

        A batch frame: within its sender's link window for that generation, by the rule
        the sender keeps for what it has in flight (:meth:`Router.flush_peer
        <statefun_mesh.routing.Router.flush_peer>`: up to the window, and one frame of any
        size while under a quarter of it is outstanding), so what an honest sender sends
        is always held, a message larger than the window included, whatever
        ``memory_budget`` is. Any other frame (markers, barriers, credits, replies): within
        a quarter of ``memory_budget`` in all.
        """
        if kind != codec.KIND_BATCH:
            return self.held_bytes - self._held_batch_bytes + size <= self._held_cap
        window = self._router.link_bytes
        held = self._held_from.get((src, gen), 0)
        if held + size > window and held >= window // 4:
            return False
        self._held_from[(src, gen)] = held + size
        self._held_batch_bytes += size
        return True

    def _count_held(self) -> None:
        """Recount what ``held`` holds (after it was filtered or released)."""
        self.held_bytes = sum(len(f) for _, _, f in self.held)
        generation = self._generation()
        held_from: dict[tuple[int, int], int] = {}
        for g, src, f in self.held:
            if g > generation and f[1] == codec.KIND_BATCH:
                held_from[(src, g)] = held_from.get((src, g), 0) + len(f)
        self._held_from = held_from
        self._held_batch_bytes = sum(held_from.values())

    def _generation_plausible(self, gen: int) -> bool:
        """Whether a frame stamped ``gen`` may be held for later: generations only come from
        the coordinator (peer 0), so none is more than a few rounds ahead of what it last said."""
        generation = self._generation()
        coordinator = self._coordinator_gen()
        if not self.checkpointing:
            known = generation
        elif coordinator is not None:
            # -1 until its first round: a restarted coordinator has not read the generation yet
            known = coordinator if generation > 0 else -1
        else:
            known = self.coordinator_generation  # -1: not heard from peer 0 yet (just started): hold
        return known < 0 or gen <= max(known, generation) + GENERATION_WINDOW

    def _refuse_frame(self, src: int, kind: str, why: str) -> None:
        self.refused_frames += 1
        self._tlog.error(
            f"refused frames ({kind})",
            "peer %d: refused a frame from peer %d: %s (refused so far: %d)",
            self.peer_id,
            src,
            why,
            self.refused_frames,
        )

    def on_channel_frame(self, src: int, frame: bytes | memoryview, gen: int | None = None) -> None:
        """Handle a frame of the current generation (its prefix already checked and removed)."""
        try:
            kind = codec.frame_kind(frame)
            if kind == codec.KIND_BATCH:
                records = _speedups.decode_batch(frame)
                self._on_records(src, records)
                self._router.received(src, records, len(frame))
                return
            kind, items = codec.decode_control(frame, _PEER_KINDS)
        except FrameDecodeError as exc:
            self.bad_frames += 1
            self._tlog.error("bad frames", "peer %d: rejected a frame from peer %d: %s", self.peer_id, src, exc)
            return
        if kind == codec.CREDIT:
            self._credit(src, items[0])
        elif kind == codec.HEARTBEAT:
            if not self._liveness.on_heartbeat(src, items):
                self.bad_frames += 1
                self._tlog.error(
                    "bad heartbeats",
                    "peer %d: heartbeat on peer %d's channel claims to be from peer %s",
                    self.peer_id,
                    src,
                    items[0],
                )
        elif kind == codec.REPLIES:
            for item in items[0]:
                if not (
                    isinstance(item, list)
                    and len(item) == 6
                    and type(item[0]) is int
                    and type(item[1]) is int
                    and all(type(item[i]) is str for i in (2, 4, 5))
                ):
                    self.bad_frames += 1
                    self._tlog.error("bad replies", "peer %d: malformed reply from peer %d", self.peer_id, src)
                    continue
                self._requests.resolve(*item)
        elif kind in _COORDINATOR_KINDS and src != 0:
            self._refuse_frame(
                src,
                "control frames off the coordinator's link",
                f"control frame 0x{kind:02x} can only come from the coordinator (peer 0)",
            )
        else:
            self._on_control(src, kind, items, gen)

    def _credit(self, src: int, n: int) -> None:
        """Peer ``src`` granted ``n`` records back (a CREDIT frame, or carried in an envelope)."""
        outstanding = self._router.on_credit(src, n)
        if outstanding is not None:
            self.bad_frames += 1
            self._tlog.error(
                "bad credits",
                "peer %d: rejected a credit of %d from peer %d, which has only %d records of this peer's outstanding",
                self.peer_id,
                n,
                src,
                outstanding,
            )
            return
        if self._router.blocked or self._replaying() or self._router.outbox.count:
            self._wake.set()  # the loop waits for this credit

    # -- held frames ------------------------------------------------------------------------

    def release(self) -> None:
        """A cut is taken: handle the held frames of this generation in arrival order, keep later ones."""
        self.hold_batches = False
        held, self.held = self.held, []
        keep: list[tuple[int, int, bytes | memoryview]] = []
        for i, (g, src, frame) in enumerate(held):
            if self.hold_batches:
                # a released barrier started the next cut, which waits for a batch to
                # end: what came after it waits too, in order
                self.held = keep + held[i:] + self.held
                self._count_held()
                return
            generation = self._generation()
            if g == generation:
                self.on_channel_frame(src, frame)
            elif g > generation:
                keep.append((g, src, frame))
        self.held = keep + self.held
        self._count_held()

    def drop_before(self, gen: int) -> None:
        """A recovery to generation ``gen``: no cut waits; frames of older generations go."""
        self.hold_batches = False
        self.held = [(g, src, f) for g, src, f in self.held if g >= gen]
        self._count_held()

    def resume(self, gen: int) -> None:
        """The peer resumed in generation ``gen``: handle what was held of it (the rest goes)."""
        held, self.held = self.held, []
        self._count_held()
        for g, src, frame in held:
            if g == gen:
                self.on_channel_frame(src, frame)
