"""Routing and credit: where a record goes, and how much may be in flight to each peer.

Owns: the inbox (records to process here: in memory up to half of ``memory_budget``,
the rest in the :class:`~statefun_mesh.spill.Spill`), the
:class:`~statefun_mesh.outbox.Outbox` (a sync invocation's sends past a sixteenth of
the budget, routed from disk after their batch commits as room allows), the outgoing side per other peer
(its ``BatchEncoder``, the sealed frames waiting for credit, replies to send), the
credit each peer granted this one (records, and bytes within the link window), the
credit this peer owes the others for what it received, and the counters of all that.
It decides *whether* a frame may go now; it never processes a record.

Called by: ``Peer`` (its batch loop, admission, incoming frames, the recovery
timeline), the ingress writer through the peer. Calls: the transport, and only the
callables it is given (the peer's generation, whether output is held before RESUME,
the dispatcher's parked backlog, the admission check after frames left).
See docs/architecture.md §5 (memory budget) and §2a.

Longer than ~500 lines because records, bytes and credit are one account per peer: the
frame queues, the link window, the grants carried on envelopes and the spill/outbox
refills all move the same numbers, and keeping them in one class keeps that invariant
in one place.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _speedups
from ._speedups import records_bytes
from .errors import ClosedTransportError, StatefunMeshError
from .memory import RECORD_OVERHEAD
from .outbox import Outbox
from .records import TARGET_ID, TARGET_TYPE
from .spill import Spill
from .transport import codec

if TYPE_CHECKING:
    from .config import MeshConfig
    from .dispatch import Record
    from .logutil import ThrottledLog
    from .transport.base import Transport

__all__ = ["GEN", "Router"]

log = logging.getLogger("statefun_mesh.peer")

#: every frame between peers is preceded by the sender's generation (u32 BE), and possibly a
#: piggybacked credit grant (transport/codec.py, the envelope)
GEN = struct.Struct(">I")
_ROOM = codec.ENVELOPE_MAX
_MAX_GRANT = 0xFFFFFFFF  # a grant in an envelope is a u32 (larger ones: a CREDIT frame)


def _size(frame: bytes | bytearray) -> int:
    """A queued frame's size (a batch frame, a bytearray, starts with room for its envelope's head)."""
    return len(frame) - _ROOM if type(frame) is bytearray else len(frame)


#: seconds between tries to remove a chunk routed from the outbox or read back from the
#: spill while the disk is full (the chunk stays on disk meanwhile)
DISK_RETRY = 0.5


class Router:
    """One peer's routing, inbox, outgoing frames and credit.

    Args:
        peer_id, n_peers, config, tlog: the peer's.
        transport: frame channels to the other peers (``None``: a single peer).
        spill_path: where the inbox spills beyond its half of ``memory_budget``.
        outbox_path: where a sync invocation's sends past their share of the budget wait (outbox.py).
        wake, idle: the batch loop's events (set / cleared when records arrive).
        generation: the peer's current generation (stamped on every frame).
        output_held: whether frames of the generation being restored must wait (before RESUME).
        parked_queued: records waiting behind parked addresses (the dispatcher's).
        on_sent: frames left (admission may have room again).
    """

    def __init__(
        self,
        peer_id: int,
        n_peers: int,
        config: MeshConfig,
        tlog: ThrottledLog,
        transport: Transport | None,
        spill_path: str,
        outbox_path: str,
        *,
        wake: asyncio.Event,
        idle: asyncio.Event,
        generation: Callable[[], int],
        output_held: Callable[[], bool],
        parked_queued: Callable[[], int],
        on_sent: Callable[[], None],
    ) -> None:
        self.peer_id = peer_id
        self.n_peers = n = n_peers
        self.config = config
        self._tlog = tlog
        self.transport = transport
        self._spill_path = spill_path
        self._wake = wake
        self._idle = idle
        self._generation = generation
        self._output_held = output_held
        self._parked_queued = parked_queued
        self._check_space = on_sent
        self.inbox: collections.deque[Record] = collections.deque()
        self._out = [_speedups.BatchEncoder() for _ in range(n)]
        #: sealed frames waiting for credit, per peer: (records, frame); a batch frame is a
        #: bytearray with room for its envelope's head (:meth:`send`)
        self._frames: list[collections.deque[tuple[int, bytes | bytearray]]] = [collections.deque() for _ in range(n)]
        self._framed = [0] * n  # records in _frames[p]
        #: bytes this peer may have in flight to each other peer (sent, not yet credited):
        #: the receiver's quarter of memory_budget for them, shared by the peers sending to
        #: it, so credit bounds bytes as well as records (credit_window x max_message_bytes
        #: could be GBs); frames are at most half of it, so a window holds a few
        self.link_bytes = max(config.memory_budget // 4 // max(n - 1, 1), 8192)
        self._frame_cap = max(min(config.max_frame_bytes // 2, self.link_bytes // 2), 4096)
        self._sent_bytes = [0] * n  # bytes sent to each peer and not yet credited back
        #: per peer, the frames sent and not yet credited back: [records, bytes], oldest first
        self._sent_frames: list[collections.deque[list[int]]] = [collections.deque() for _ in range(n)]
        self._owed_bytes = [0] * n  # bytes received from each peer and not yet credited
        #: the largest batch frame: what the receiver admits, less the envelope's head
        #: (generation and a piggybacked credit grant)
        self.frame_limit = config.max_frame_bytes - codec.ENVELOPE_MAX
        #: records that fit no frame (refused at admission, so only from an older release's logs)
        self.oversized_dropped = 0
        # memory_budget (docs/architecture.md §5): the inbox keeps up to half in memory and
        # spills the rest; the loop takes no batch while outgoing bytes exceed a quarter;
        # clients are admitted while inbox plus outgoing stay under a quarter
        budget = config.memory_budget
        self.inbox_cap = budget // 2
        self.out_cap = budget // 4
        self.inbox_bytes = 0  # estimated memory of the records in inbox
        self._framed_bytes = [0] * n  # bytes in _frames[p]
        self.spill: Spill | None = None
        #: an invocation's sends past a sixteenth of the budget go to disk, and so does
        #: every batch's output while anything waits there (outbox.py); routed from it as
        #: outgoing room and the inbox allow (:meth:`route_outbox`)
        self.outbox = Outbox(outbox_path, max(budget // 16, 64 << 10))
        #: the loop's wake-up after a chunk could not be removed from the outbox or the spill
        self._retry_handle: asyncio.TimerHandle | None = None
        #: the loop waits for outgoing credit: grant credit for what arrives, spilling beyond memory
        self.blocked = False
        self.spilled_total = 0  # records ever spilled
        self.credit_waits = 0  # times the loop waited for outgoing credit
        #: replies to requests of other peers, per peer, sent with the next flush
        self.out_replies: list[list[Any]] = [[] for _ in range(n)]
        self._credit = [config.credit_window] * n
        self._owed = [0] * n
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self.sent_records = [0] * n
        self.received_records = [0] * n
        # Counters for metrics (metrics.py) and status; updated per routed batch of records.
        self.messages_in = 0  #: messages from clients and ingresses, routed into the mesh
        self.routed_local = 0  #: messages routed to this peer's own inbox
        self.routed_remote = [0] * n  #: messages routed to each other peer
        self.from_peers = 0  #: messages received from other peers
        self.credit_stalls = [0] * n  #: times messages to a peer waited for credit
        #: credit grants sent in the envelope of a frame going to that peer anyway (each a
        #: CREDIT frame saved), and grants sent as CREDIT frames of their own
        self.credits_piggybacked = 0
        self.credit_frames = 0
        self.frames_sent = 0  #: frames sent to other peers, of every kind

    # -- read-only views (status, metrics) ------------------------------------------

    @property
    def credit(self) -> list[int]:
        """Records this peer may still send each peer before it grants more (a copy)."""
        return list(self._credit)

    def outgoing(self) -> list[int]:
        """Records waiting to be sent to each peer."""
        return [len(e) + f for e, f in zip(self._out, self._framed, strict=True)]

    def frame_counts(self) -> dict[str, int]:
        """Frames sent to other peers, CREDIT frames among them, and grants carried in the
        envelope of another frame instead (each a CREDIT frame saved)."""
        return {
            "sent": self.frames_sent,
            "credit_frames": self.credit_frames,
            "credits_carried": self.credits_piggybacked,
        }

    def in_flight_bytes(self) -> int:
        """Bytes sent to other peers and not yet credited back."""
        return sum(self._sent_bytes)

    def spilled(self) -> int:
        """Records in the spill now."""
        return self.spill.count if self.spill is not None else 0

    def queued(self) -> int:
        """Records queued here: the inbox, the spill, the outbox and what waits to go to other peers."""
        return (
            len(self.inbox)
            + sum(len(e) for e in self._out)
            + sum(self._framed)
            + (self.spill.count if self.spill else 0)
            + self.outbox.count
        )

    def queued_for(self, p: int) -> int:
        """Messages waiting to go to peer ``p``."""
        return len(self._out[p]) + self._framed[p]

    def out_bytes(self) -> int:
        return sum(e.nbytes for e in self._out) + sum(self._framed_bytes)

    def has_outgoing(self) -> bool:
        """Whether anything waits to be sent to another peer."""
        return any(len(e) for e in self._out) or any(self._frames)

    # -- routing ------------------------------------------------------------------------

    def route(self, records: list[Record], from_client: bool = False) -> None:
        if from_client:
            self.messages_in += len(records)
        if self.n_peers == 1:
            self.routed_local += len(records)
            self.enqueue(records)
        else:
            me = self.peer_id
            for p, part in enumerate(_speedups.partition(records, self.config.max_parallelism, self.n_peers)):
                if not part:
                    continue
                if p == me:
                    self.routed_local += len(part)
                    self.enqueue(part)
                    continue
                self.routed_remote[p] += len(part)
                enc = self._out[p]
                # Frames split by count and by bytes: none exceeds max_frame_bytes, which
                # the receiver enforces by dropping the frame (and the messages in it).
                max_records, limit, cap = self.config.max_frame_records, self.frame_limit, self._frame_cap
                i, n = 0, len(part)
                while i < n:
                    j = enc.fill(part, i, min(cap, limit), max_records)
                    if j == i and not len(enc):
                        j = enc.fill(part, i, limit, 1)  # a record over the frame cap: a frame of its own
                        if j == i:
                            self._drop_oversized(p, part[i])
                            j += 1
                        else:
                            self._seal(p)
                    elif j < n or len(enc) >= max_records or enc.nbytes >= cap:
                        self._seal(p)
                    i = j
                if self._framed[p]:
                    self.flush_peer(p)
            if from_client:
                self.schedule_flush()
        self._idle.clear()
        self._wake.set()

    def _drop_oversized(self, p: int, rec: Record) -> None:
        # Admission refuses such records (MessageTooLargeError), so this is a record an
        # older release accepted (an ingress log or a timer from before): it can reach
        # peer p in no frame. Dropped and counted, never sent to be dropped silently there.
        self.oversized_dropped += 1
        size = _speedups.record_size(rec)
        self._tlog.error(
            "oversized records",
            "peer %d: dropped a message to %s/%s for peer %d: %d bytes fits no frame (max_frame_bytes %d); "
            "raise max_frame_bytes on every peer to deliver such messages",
            self.peer_id,
            rec[TARGET_TYPE],
            rec[TARGET_ID],
            p,
            size,
            self.config.max_frame_bytes,
        )

    def enqueue(self, records: list[Record]) -> None:
        """Queue ``records`` for processing here: in memory up to half of ``memory_budget``,
        the rest (and everything while anything is spilled, to keep the order) to the spill."""
        if not records:
            return
        size = records_bytes(records)
        spill = self.spill
        if (spill is None or not spill.count) and self.inbox_bytes + size <= self.inbox_cap:
            self.inbox.extend(records)
            self.inbox_bytes += size
            return
        i = 0
        if spill is None or not spill.count:
            room = self.inbox_cap - self.inbox_bytes
            while i < len(records) and room > 0:
                room -= len(records[i][1]) + len(records[i][5]) + RECORD_OVERHEAD
                i += 1
            head = records[:i]
            self.inbox.extend(head)
            self.inbox_bytes += records_bytes(head)
        try:
            if spill is None:
                spill = self.spill = Spill(self._spill_path)
            for j in range(i, len(records), 1000):
                spill.push(records[j : j + 1000])
                self.spilled_total += len(records[j : j + 1000])
        except StatefunMeshError as exc:
            # a full disk: keep them in memory (never drop what was received)
            self._tlog.error(
                "failed spills", "peer %d: cannot spill messages to disk: %s; keeping them in memory", self.peer_id, exc
            )
            rest = records[i:] if spill is None else records[j:]
            self.inbox.extend(rest)
            self.inbox_bytes += records_bytes(rest)

    def route_outbox(self) -> None:
        """Route committed sends from the outbox while outgoing buffers and the inbox have room."""
        outbox = self.outbox
        while outbox.count and self.out_bytes() < self.out_cap and self.inbox_bytes < self.inbox_cap:
            try:
                records = outbox.pop()
            except StatefunMeshError as exc:  # a full disk: the chunk stays there (nothing lost, nothing twice)
                self._disk_retry("failed outbox reads", "the outbox", exc)
                return
            self.route(records)

    def refill(self) -> None:
        """Read spilled records back while the inbox is under a quarter of the budget."""
        spill = self.spill
        while spill is not None and spill.count and self.inbox_bytes < self.inbox_cap // 2:
            try:
                records = spill.pop()
            except StatefunMeshError as exc:  # a full disk: the chunk stays spilled (nothing lost, nothing twice)
                self._disk_retry("failed spill reads", "the inbox spill", exc)
                return
            self.inbox.extend(records)
            self.inbox_bytes += records_bytes(records)

    def _disk_retry(self, kind: str, what: str, exc: Exception) -> None:
        """A chunk could not be removed from ``what`` after it was read (a full disk): log
        (throttled) and wake the loop again in a while to retry (it may have nothing else
        to wake it)."""
        self._tlog.error(
            kind,
            "peer %d: cannot remove a chunk from %s: %s; retrying every %.1f s",
            self.peer_id,
            what,
            exc,
            DISK_RETRY,
        )
        if self._retry_handle is None or self._retry_handle.cancelled():
            self._retry_handle = asyncio.get_running_loop().call_later(DISK_RETRY, self._retry_wake)

    def _retry_wake(self) -> None:
        self._retry_handle = None
        self._wake.set()

    def received(self, src: int, records: list[Record], nbytes: int) -> None:
        """A batch frame of ``nbytes`` from peer ``src`` was decoded into ``records``: owe
        credit for it and queue them here."""
        self.received_records[src] += len(records)
        self.from_peers += len(records)
        self._owed[src] += len(records)
        self._owed_bytes[src] += nbytes
        self.enqueue(records)
        self._idle.clear()
        self._wake.set()
        if self.blocked:
            self.grant_credits()

    # -- sending ------------------------------------------------------------------------

    def schedule_flush(self) -> None:
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            linger = self.config.linger
            if linger > 0:
                self._flush_handle = loop.call_later(linger, self.flush_all)
            else:
                self._flush_handle = loop.call_soon(self.flush_all)

    def cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def send(self, p: int, frame: bytes | bytearray, generation: int | None = None) -> None:
        """Send a frame to peer ``p`` in its envelope: our generation (``generation``, default
        the current one) and, in the current generation, the credit owed to ``p`` if this
        peer may grant now (a CREDIT frame saved). A ``bytearray`` frame starts with
        ``ENVELOPE_MAX`` free bytes, where the envelope's head is written in place (no copy
        of the frame); a ``bytes`` frame (control frames, small) is copied behind it."""
        if self.transport is None:
            return
        current = self._generation()
        gen = current if generation is None else generation
        credit = self._owed[p]
        if credit and (gen != current or credit > _MAX_GRANT or not self._may_grant()):
            credit = 0
        if credit:
            self._owed[p] = 0
            self._owed_bytes[p] = 0
            self.credits_piggybacked += 1
        self.frames_sent += 1
        try:
            if type(frame) is bytearray:
                self.transport.send(p, codec.seal_envelope(frame, gen, credit))
            else:
                self.transport.send(p, codec.envelope(gen, credit) + frame)
        except ClosedTransportError:
            log.debug("peer %d: transport closed; frame for peer %d dropped", self.peer_id, p)

    def _seal(self, p: int) -> None:
        """Close the records waiting for peer ``p`` into a frame (``route`` fills the
        encoder only up to ``max_frame_bytes`` with the envelope's head, which the
        receiver enforces)."""
        enc = self._out[p]
        n = len(enc)
        if n:
            frame = enc.flush_room(_ROOM)  # room for the envelope's head, written in place at send
            if len(frame) - _ROOM > self.frame_limit:  # never: a bug if it shows
                log.error(
                    "peer %d: a message to peer %d makes a %d-byte frame, over max_frame_bytes (%d); "
                    "the receiver will refuse it: raise max_frame_bytes on every peer",
                    self.peer_id,
                    p,
                    len(frame) - _ROOM,
                    self.config.max_frame_bytes,
                )
            self._frames[p].append((n, frame))
            self._framed[p] += n
            self._framed_bytes[p] += len(frame) - _ROOM

    def queue_marker(self, p: int, frame: bytes) -> None:
        """Queue a control ``frame`` for peer ``p`` behind everything routed to it so far."""
        self._seal(p)
        self._frames[p].append((0, frame))
        self._framed_bytes[p] += len(frame)

    def flush_peer(self, p: int, force: bool = False) -> None:
        """Send peer ``p`` what waits for it, as far as its credit goes (``force``: all of it)."""
        if self.transport is None:
            return
        if self._output_held():
            # A generation being restored sends nothing (replayed messages, markers) before
            # RESUME: by then every peer has said READY, after a heartbeat naming its process,
            # so a process that dies with frames of this generation is seen to restart by the
            # coordinator, which starts another round. Sent earlier, they could go to a
            # process that died before its READY, unseen by a coordinator that had just
            # restarted itself, and be lost (found by the 100-SIGKILL soak).
            return
        self._seal(p)
        frames = self._frames[p]
        sent = False
        # within the credit (records) and the link window (bytes), so a receiver still in an
        # older generation can hold it all; a frame larger than the window (one large
        # message) goes once under a quarter of it is outstanding, and a sender stopped
        # by the window always has a quarter outstanding, which the receiver grants back
        window, quarter = self.link_bytes, self.link_bytes // 4
        while frames and (
            force
            or (
                self._credit[p] > 0
                and (self._sent_bytes[p] < quarter or self._sent_bytes[p] + _size(frames[0][1]) <= window)
            )
        ):
            n, frame = frames.popleft()
            size = _size(frame)
            self._framed[p] -= n
            self._framed_bytes[p] -= size
            self._credit[p] -= n
            if n:  # a batch (a marker has no records, and no grant would return its bytes)
                self._sent_bytes[p] += size
                self._sent_frames[p].append([n, size])
            self.sent_records[p] += n
            self.send(p, frame)
            sent = True
        if frames and not force:
            self.credit_stalls[p] += 1
        if sent:
            # what left frees admission: wake clients waiting in admit(), wherever this
            # flush came from (the loop, a credit, a timer, the idle path)
            self._check_space()

    def flush_all(self) -> None:
        self._flush_handle = None
        if self.transport is None:
            return
        for p in range(self.n_peers):
            if p == self.peer_id:
                continue
            if len(self._out[p]) or self._frames[p]:
                self.flush_peer(p)
            replies = self.out_replies[p]
            if replies:
                self.out_replies[p] = []
                for frame in codec.encode_reply_frames(replies, self.frame_limit, room=True):
                    self.send(p, frame)

    def flush_if_queued(self, p: int) -> None:
        """Send peer ``p`` what waits for it, if anything does (it may have room now)."""
        if len(self._out[p]) or self._frames[p]:
            self.flush_peer(p)

    # -- credit ---------------------------------------------------------------------------

    def _may_grant(self) -> bool:
        """Whether this peer grants credit now: while it has room in memory, or whenever its
        loop waits for credit itself. A peer whose loop waits grants for all it receives
        (what does not fit in memory spills): if it did not, two peers waiting for each
        other's credit would wedge the mesh (docs/architecture.md §5)."""
        return self.blocked or not (
            len(self.inbox) + self._parked_queued() >= self.config.inbox_limit  # + behind parked addresses
            or self.inbox_bytes >= self.inbox_cap
            or (self.spill is not None and self.spill.count)
        )

    def grant_credits(self) -> None:
        """Send the credit owed that is due as CREDIT frames of their own: what frames sent
        to a peer since it was owed did not carry (:meth:`send`), once it is due (a quarter
        of the window owed, the inbox empty, or this peer's loop waiting for credit). The
        loop calls it after flushing a batch's frames, so a grant rides a frame going that
        way when there is one."""
        if self.transport is None:
            return
        if not self._may_grant():
            return  # the sender keeps the rest until this peer has room in memory
        quarter = max(self.config.credit_window // 4, 1)
        quarter_bytes = self.link_bytes // 4
        empty = not self.inbox
        for p in range(self.n_peers):
            owed = self._owed[p]
            if owed and (owed >= quarter or self._owed_bytes[p] >= quarter_bytes or empty or self.blocked):
                self._owed[p] = 0
                self._owed_bytes[p] = 0
                self.credit_frames += 1
                self.send(p, codec.encode_control(codec.CREDIT, owed))

    def on_credit(self, src: int, n: int) -> int | None:
        """Peer ``src`` granted ``n`` records back; sends what now fits. Returns ``None``, or,
        for a grant of more than is outstanding (refused, nothing changes), what is."""
        # A grant returns records this peer sent and the other has since taken in:
        # never more than are outstanding. (That can exceed the window: whole frames
        # go while credit > 0, and a checkpoint barrier forces out what is queued.)
        outstanding = self.config.credit_window - self._credit[src]
        if not 0 < n <= outstanding:
            return outstanding
        self._credit[src] += n
        self._credited(src, n)
        if len(self._out[src]) or self._frames[src]:
            self.flush_peer(src)
        self._check_space()
        return None

    def _credited(self, p: int, n: int) -> None:
        """Peer ``p`` granted ``n`` records back: they and their bytes are no longer in flight.
        Grants come in the order the frames were sent (one channel, one receiver)."""
        frames = self._sent_frames[p]
        while n > 0 and frames:
            head = frames[0]
            if head[0] <= n:
                frames.popleft()
                n -= head[0]
                self._sent_bytes[p] -= head[1]
            else:  # part of a frame (only after a reset of the counts): its share of the bytes
                part = head[1] * n // head[0]
                head[0] -= n
                head[1] -= part
                self._sent_bytes[p] -= part
                n = 0
        if not frames:
            self._sent_bytes[p] = 0

    def _reset_sent(self, p: int) -> None:
        self._sent_bytes[p] = 0
        self._sent_frames[p].clear()
        self._owed_bytes[p] = 0

    def peer_restarted(self, p: int) -> None:
        """Peer ``p`` is a new process: what the old one had not granted back is gone with it."""
        self._credit[p] = self.config.credit_window
        self._owed[p] = 0
        self._reset_sent(p)

    def reset_credit(self) -> None:
        """A new generation: every window full again, nothing owed, nothing in flight."""
        self._credit = [self.config.credit_window] * self.n_peers
        self._owed = [0] * self.n_peers
        for p in range(self.n_peers):
            self._reset_sent(p)
        self.sent_records = [0] * self.n_peers
        self.received_records = [0] * self.n_peers

    def drop_queues(self) -> None:
        self.inbox.clear()
        self.inbox_bytes = 0
        self._framed_bytes = [0] * self.n_peers
        self.blocked = False
        if self.spill is not None:
            self.spill.clear()
        self.outbox.clear()
        self._out = [_speedups.BatchEncoder() for _ in range(self.n_peers)]
        self._frames = [collections.deque() for _ in range(self.n_peers)]
        self._framed = [0] * self.n_peers
        self.out_replies = [[] for _ in range(self.n_peers)]

    def close(self) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self.spill is not None:
            self.spill.close()
            self.spill = None
        self.outbox.close()
