"""The batch loop: one batch at a time, take input, dispatch, commit, route, answer.

Owns: the loop of one generation (``BatchLoop.run``, a task the peer starts on resume and
cancels on a recovery) and what it keeps between batches: when the earliest timer is due
(``next_due``), whether a batch runs now (``in_batch``: a checkpoint cut waits for the
batch boundary), whether the store has unsynced writes (``dirty``), the batch counters
(``batches``, ``batch_records``, ``batch_sizes``), the slices of the idempotency-key
purge, and the bounded retry of a failing batch (``INTERNAL_BATCH_ATTEMPTS``). Each turn
it takes a barrier's cut when one waits, refills the inbox from the spill, replays a
slice of the ingress log, routes the outbox, waits for credit while outgoing buffers are
full, runs the batch and the due timers through the dispatcher, commits, and routes the
sends, replies and egress records the batch produced (``_after_commit``).

Called by: ``Peer`` (``run`` as the dispatch task; ``now_ms``/``timer_due`` for
``idle()``; ``next_due`` when the store is opened or restored). Calls: the objects it is
given (the router, the replay, admission, pending requests, egress logs, inbound's bad
frame counter, the dispatcher and state store of its generation) and the participant's
``take_snapshot`` through the small :class:`CutTaker` protocol. Never the ``Peer``.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ._speedups import records_bytes
from .dispatch import BATCH_BUCKETS, BatchOutcome
from .errors import StateBackendError, StatefunMeshError

if TYPE_CHECKING:
    from .admission import Admission
    from .clock import Clock
    from .config import MeshConfig
    from .dispatch import Dispatcher
    from .egress import EgressLogs
    from .inbound import Inbound
    from .logutil import ThrottledLog
    from .replay import Replay
    from .replies import PendingRequests
    from .routing import Router
    from .state.lmdb_backend import LmdbStateBackend

__all__ = ["INTERNAL_BATCH_ATTEMPTS", "BatchLoop", "CutTaker"]

log = logging.getLogger("statefun_mesh.peer")

#: a batch failing this many times in a row with an internal error (not a state store or
#: function error) stops the dispatch loop, which /healthz reports (about 1.5 s of retries)
INTERNAL_BATCH_ATTEMPTS = 5


class CutTaker(Protocol):
    """What the loop needs of the snapshot participant: a barrier waiting for the batch
    boundary (``pending``), and taking its cut there."""

    @property
    def pending(self) -> int | None: ...

    def take_snapshot(self) -> None: ...


class BatchLoop:
    """The dispatch loop of one peer, and what it keeps between batches.

    Args:
        peer_id, n_peers, config, clock, tlog: the peer's.
        router, replay, admission, requests, egress_logs, inbound: the parts a batch's
            input comes from and its output goes to.
        wake: set when there is something to do (input, a timer, a barrier, closing).
        idle: set while the loop waits with nothing queued (``Peer.idle()`` waits for it).
        networked: whether the peer has other peers (a transport).
        closing: whether the peer is closing (the loop returns once nothing is left).
        participant: the snapshot participant, if checkpoints are on.
    """

    def __init__(
        self,
        peer_id: int,
        n_peers: int,
        config: MeshConfig,
        clock: Clock,
        tlog: ThrottledLog,
        router: Router,
        replay: Replay,
        admission: Admission,
        requests: PendingRequests,
        egress_logs: EgressLogs,
        inbound: Inbound,
        *,
        wake: asyncio.Event,
        idle: asyncio.Event,
        networked: bool,
        closing: Callable[[], bool],
        participant: Callable[[], CutTaker | None],
    ) -> None:
        self.peer_id = peer_id
        self.n_peers = n_peers
        self.config = config
        self.clock = clock
        self._tlog = tlog
        self.router = router
        self.replay = replay
        self.admission = admission
        self.requests = requests
        self.egress_logs = egress_logs
        self.inbound = inbound
        self._wake = wake
        self._idle = idle
        self._networked = networked
        self._closing = closing
        self._participant = participant
        #: when the earliest timer is due (ms), ``None``: no timer
        self.next_due: int | None = None
        #: a batch is being processed now (a checkpoint cut waits for the boundary)
        self.in_batch = False
        #: the state store has writes not yet synced to disk (the peer's sync loop)
        self.dirty = False
        self.batches = 0  #: batches processed
        self.batch_records = 0  #: messages in all batches
        self.batch_sizes = [0] * (len(BATCH_BUCKETS) + 1)  #: batches per size bucket (last: larger)
        self._next_purge = 0
        self._purge_from = b""

    def now_ms(self) -> int:
        """The clock's time in milliseconds (the unit of timers)."""
        return int(self.clock.now() * 1000)

    def timer_due(self, now_ms: int) -> bool:
        """Whether the earliest timer is due at ``now_ms`` (and timers are not held)."""
        return self.next_due is not None and self.next_due <= now_ms and not self.replay.timers_held

    def timer_deadline(self) -> float | None:
        """When the loop's wait must end for the next timer: never while timers are held (after
        a recovery, until every peer's REPLAYED marker came): an overdue timer's deadline is
        already past, the wait would return at once and the loop spin without yielding, so
        the marker that releases the timers could never be read (found by the soak test)."""
        return None if self.next_due is None or self.replay.timers_held else self.next_due / 1000

    async def run(self, backend: LmdbStateBackend | None, dispatcher: Dispatcher | None) -> None:
        """Process batches until cancelled (a recovery) or, once the peer closes, until
        nothing is left to do. Raises :class:`StatefunMeshError` when a batch failed
        ``INTERNAL_BATCH_ATTEMPTS`` times in a row with an internal error."""
        assert backend is not None and dispatcher is not None
        router = self.router
        replay = self.replay
        inbox = router.inbox
        max_batch = self.config.max_batch
        backoff = 0.05
        internal_failures = 0  # consecutive batches that failed with an internal error
        while True:
            participant = self._participant()
            if participant is not None and participant.pending is not None and replay.foreign_log is None:
                participant.take_snapshot()  # a barrier waited for the batch boundary
            if router.spill is not None and router.spill.count:
                router.refill()
            if replay.position is not None and router.out_bytes() < router.out_cap:
                replay.some()
            if router.outbox.count:
                router.route_outbox()
            now_ms = self.now_ms()
            out_bytes = router.out_bytes() if self._networked else 0
            if out_bytes >= router.out_cap and (inbox or self.timer_due(now_ms)):
                # Outgoing buffers are full: wait for credit before producing more. Safe,
                # because a peer that waits grants credit for all it receives (spilling
                # what does not fit in memory), so credit never waits on processing.
                if not router.blocked:
                    router.credit_waits += 1
                router.blocked = True
                router.flush_all()
                router.grant_credits()
                if self._closing():
                    return
                await self.clock.wait(self._wake, self.timer_deadline())
                self._wake.clear()
                continue
            router.blocked = False
            if (
                replay.timers_held
                and not inbox
                and len(replay.markers_from) >= self.n_peers - 1
                and not dispatcher.parked
                and replay.position is None
            ):
                replay.timers_held = False  # every replayed message is processed: timers may fire
            if not inbox and not self.timer_due(now_ms) and not dispatcher.ready:
                router.flush_all()
                router.grant_credits()
                if not dispatcher.parked:  # else a parked async invocation is still to commit
                    if self._closing():
                        return
                    if replay.position is None and not router.outbox.count:  # else still routing
                        self._idle.set()
                await self.clock.wait(self._wake, self.timer_deadline())
                self._wake.clear()
                continue
            self._idle.clear()
            n = len(inbox)
            if n <= max_batch:  # the whole inbox (the common case): no popleft per record
                batch = list(inbox)
                inbox.clear()
            else:
                n = max_batch
                batch = [inbox.popleft() for _ in range(n)]
            batch_bytes = records_bytes(batch)
            router.inbox_bytes = router.inbox_bytes - batch_bytes if inbox else 0
            fired: list[Any] = []
            timers_checked = self.timer_due(now_ms)
            if timers_checked:
                fired = backend.due_timers(now_ms, max(max_batch - n, 1))
            self.in_batch = True
            router.outbox.begin()
            try:
                # what the batch sends may fill the outgoing buffers' room, no more (one
                # address's invocations may overshoot it: they are never split)
                outcome = await dispatcher.run(batch, fired, now_ms, max(router.out_cap - out_bytes, 0))
                backend.commit(outcome.ops)
            except StateBackendError as exc:
                dispatcher.rollback()
                inbox.extendleft(reversed(batch))
                router.inbox_bytes += batch_bytes
                self._tlog.error(
                    "failed batch writes",
                    "peer %d could not write a batch of %d messages: %s; retrying in %.2f s",
                    self.peer_id,
                    len(batch),
                    exc,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception as exc:
                dispatcher.rollback()
                inbox.extendleft(reversed(batch))
                router.inbox_bytes += batch_bytes
                internal_failures += 1
                if internal_failures >= INTERNAL_BATCH_ATTEMPTS:
                    # a bug, not a passing fault (a failing disk is a StateBackendError, a failing
                    # function a dead letter): stop loudly rather than spin; /healthz says why
                    first = f"{batch[0][0]}/{batch[0][1]}" if batch else f"{len(fired)} due timers"
                    raise StatefunMeshError(
                        f"peer {self.peer_id}: a batch of {len(batch)} messages (the first for {first}) failed "
                        f"{internal_failures} times in a row with an internal error: {exc!r}; the dispatch loop "
                        "stops (nothing of the batch was applied): restart the peer, and report the traceback "
                        "above as a bug"
                    ) from exc
                self._tlog.log(
                    logging.ERROR,
                    "internal batch errors",
                    "peer %d: internal error in a batch of %d messages (attempt %d of %d); retrying in %.2f s",
                    self.peer_id,
                    len(batch),
                    internal_failures,
                    INTERNAL_BATCH_ATTEMPTS,
                    backoff,
                    exc_info=True,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self.in_batch = False
            backoff = 0.05
            internal_failures = 0
            self.batches += 1
            self.batch_records += n
            self.batch_sizes[bisect.bisect_left(BATCH_BUCKETS, n)] += 1
            self.dirty = True
            if self.config.sync_interval == 0 and not self.config.blob_store:  # checkpoints: see Peer._sync_loop
                backend.flush()
            if timers_checked or outcome.cancels:
                # a fired or cancelled timer may have been the earliest: without this the
                # loop would take a removed timer for due and spin on empty batches
                self.next_due = backend.next_timer_due()
            if outcome.deferred:
                inbox.extendleft(reversed(outcome.deferred))
                router.inbox_bytes += records_bytes(outcome.deferred)
            if outcome.requeue:  # they waited behind a parked address this batch committed
                inbox.extendleft(reversed(outcome.requeue))
                router.inbox_bytes += records_bytes(outcome.requeue)
            self._after_commit(outcome)
            if now_ms >= self._next_purge:
                # expired idempotency keys, a slice at a time between batches
                self._next_purge = now_ms + 1000
                try:
                    self._purge_from = backend.purge_dedup(now_ms, self._purge_from, 5000)
                except StateBackendError as exc:  # e.g. a full disk: purging waits, processing goes on
                    self._tlog.warning(
                        "failed purges", "peer %d: could not purge expired idempotency keys: %s", self.peer_id, exc
                    )
            router.flush_all()
            router.grant_credits()
            self.admission.check_space()
            # Let clients, receivers and other tasks run between batches, when the loop would
            # go straight into another one (a batch of sync functions never yields); with
            # nothing left to do, its idle wait yields, and a yield here was a loop turn more
            # per batch (a select call per request at light load).
            if (
                inbox
                or dispatcher.ready
                or router.outbox.count
                or replay.position is not None
                or self.timer_due(self.now_ms())
                or (router.spill is not None and router.spill.count)
            ):
                await asyncio.sleep(0)

    def _after_commit(self, out: BatchOutcome) -> None:
        if out.min_due is not None and (self.next_due is None or out.min_due < self.next_due):
            self.next_due = out.min_due
        router = self.router
        outbox = router.outbox
        try:
            queued = outbox.commit(out.sends)  # staged, or queued behind what waits there
        except StatefunMeshError as exc:  # a full disk: route it all now, in order (never lost)
            self._tlog.error(
                "failed outbox writes",
                "peer %d: cannot queue a batch's sends in the outbox: %s; routing them at once",
                self.peer_id,
                exc,
            )
            for piece in outbox.abandon(out.sends):
                router.route(piece)
            queued, out.sends = False, []
        if queued:
            router.route_outbox()
        elif out.sends:
            router.route(out.sends)
        if outbox.error is not None:
            self._tlog.error(
                "failed outbox writes",
                "peer %d: cannot write sends to the outbox: %s; keeping them in memory",
                self.peer_id,
                outbox.error,
            )
            outbox.error = None
        for reply in out.replies:
            if reply[0] == self.peer_id or self.n_peers == 1:
                self.requests.resolve(*reply[1:])
            elif 0 <= reply[0] < self.n_peers:
                router.out_replies[reply[0]].append(list(reply[1:]))
            else:
                self.inbound.bad_frames += 1
                self._tlog.error(
                    "bad reply addresses",
                    "peer %d: dropped a reply for peer %d, which is not in this mesh of %d peers",
                    self.peer_id,
                    reply[0],
                    self.n_peers,
                )
        if out.egress:
            self.egress_logs.committed(out.egress)
