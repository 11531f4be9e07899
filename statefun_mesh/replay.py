"""The replay after a recovery: the ingress log routed again, then the markers behind it.

Owns: the ingress log position the replay continues from (``None``: not replaying), the
slices it routes (only while the outgoing buffers have room, never all at once, so a
receiver still in an older generation can hold what comes), the removed peers' logs
replayed after a rescale (in slices too, one log after another), the REPLAYED marker
sent behind the replayed messages on every channel, the markers received, and holding
due timers until every other peer's marker came and what came before it is processed
(a replayed cancellation is never overtaken by its timer).

Called by: ``Peer`` (a recovery starts it once the state is restored; the batch loop
routes more as credit frees room and releases the timers; a REPLAYED frame). Calls: the
ingress logs, the router, the ingress writer's routed offset, and the callables it is
given. See docs/architecture.md §7 and docs/guarantees.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .transport import codec

if TYPE_CHECKING:
    from .ingress import IngressLog
    from .ingress_writer import IngressWriter
    from .routing import Router

__all__ = ["REPLAY_SLICE", "Replay"]

log = logging.getLogger("statefun_mesh.peer")

#: ingress log entries replayed at a time after a recovery (while outgoing buffers have room)
REPLAY_SLICE = 100


class Replay:
    """Args:
    peer_id, n_peers: the peer's.
    router: routes the replayed messages and queues the markers.
    ingress_writer: its routed offset follows the replay (a cut records it as covered).
    ingress: the peer's ingress log (``None`` without checkpoints, or once closed).
    generation: the peer's current generation (stamped on the markers).
    take_foreign: the removed peers' ingress logs to replay after a rescale: (path, position).
    foreign_replayed: a removed peer's log was replayed (it is deleted after the next checkpoint).
    on_done: the replay ended (clients waiting to be admitted may come in).
    """

    def __init__(
        self,
        peer_id: int,
        n_peers: int,
        router: Router,
        ingress_writer: IngressWriter,
        *,
        ingress: Callable[[], IngressLog | None],
        generation: Callable[[], int],
        take_foreign: Callable[[], list[tuple[str, int]]],
        foreign_replayed: Callable[[str], None],
        on_done: Callable[[], None],
    ) -> None:
        self.peer_id = peer_id
        self.n_peers = n_peers
        self._router = router
        self._ingress_writer = ingress_writer
        self._ingress = ingress
        self._generation = generation
        self._take_foreign = take_foreign
        self._foreign_replayed = foreign_replayed
        self._on_done = on_done
        #: the ingress log position the replay after a recovery continues from (None: not replaying)
        self.position: int | None = None
        self._replayed = 0
        #: after a rescale: the removed peer's ingress log being replayed (from ``position``),
        #: its path, and those still to replay (path, position)
        self.foreign_log: IngressLog | None = None
        self._foreign_path = ""
        self._foreign_logs: list[tuple[str, int]] = []
        #: after a recovery, due timers wait until the replayed messages are processed
        self.timers_held = False
        #: the peers whose REPLAYED marker of this generation came
        self.markers_from: set[int] = set()

    def start(self, position: int | None) -> None:
        """The state is restored: replay the ingress log from ``position`` (``None``: no log),
        as far as the outgoing buffers have room; the loop routes the rest (:meth:`some`)."""
        self.markers_from = set()
        if self.foreign_log is not None:  # a newer round: the restore hands the logs over again
            self._end_foreign(replayed=False)
        self._foreign_logs = []
        if position is not None:
            # The ingress log is replayed in slices while the outgoing buffers have room
            # (the rest by the loop as credit frees them, never all at once); meanwhile
            # clients wait (Admission.full) and a cut records the replay position as routed.
            self.position = self._ingress_writer.routed = position
            self._replayed = 0
            self.some()
        else:
            self._done()

    def some(self) -> None:
        """Route more of the ingress log being replayed (this peer's, then removed peers'
        after a rescale), while outgoing buffers have room."""
        router = self._router
        pos = self.position
        while pos is not None and router.out_bytes() < router.out_cap:
            foreign = self.foreign_log
            log_ = foreign if foreign is not None else self._ingress()
            assert log_ is not None
            entries = log_.read(pos, REPLAY_SLICE)
            if not entries:
                self._done()  # on to the next log, or done
                pos = self.position
                continue
            router.route([tuple(rec) for _, rec in entries])
            self._replayed += len(entries)
            pos = self.position = entries[-1][0] + 1
            if foreign is None:
                self._ingress_writer.routed = pos

    def _done(self) -> None:
        """A log is replayed: this peer's ingress log, then each removed peer's (after a
        rescale, in slices too: :meth:`some` goes on with the next), then the markers."""
        self.position = None
        ingress = self._ingress()
        if self.foreign_log is not None:
            self._end_foreign(replayed=True)
        elif ingress is not None:
            self._ingress_writer.routed = ingress.next_offset
            if self._replayed:
                log.info("peer %d: replayed %d messages from its ingress log", self.peer_id, self._replayed)
            self._foreign_logs = self._take_foreign()
        if self._foreign_logs:
            from .ingress import IngressLog

            path, self.position = self._foreign_logs.pop(0)
            # a checkpoint cut waits until this log is replayed (the peer's loop checks
            # foreign_log): its position is in no manifest, so a cut in the middle could
            # neither replay the rest nor skip it
            self.foreign_log = IngressLog(path, sync=False)
            self._foreign_path = path
            self._replayed = 0
            return
        # Behind the replayed messages on every channel: a marker. A peer fires no timer
        # after a recovery until it has the marker from every other peer and has processed
        # what came before it, so a replayed cancellation is never overtaken by its timer.
        marker = codec.encode_control(codec.REPLAYED, self._generation())
        for p in range(self.n_peers):
            if p != self.peer_id:
                self._router.queue_marker(p, marker)
        self._router.flush_all()
        self._on_done()

    def _end_foreign(self, replayed: bool) -> None:
        """Close the removed peer's ingress log being replayed (``replayed``: all of it)."""
        assert self.foreign_log is not None
        self.foreign_log.close()
        self.foreign_log = None
        if replayed:
            self._foreign_replayed(self._foreign_path)
            log.warning(
                "peer %d: replayed %d messages from the ingress log of a removed peer (%s); it is "
                "deleted once the next checkpoint completes",
                self.peer_id,
                self._replayed,
                self._foreign_path,
            )

    def close(self) -> None:
        """The peer closes: a removed peer's log being replayed is closed (not counted as replayed)."""
        if self.foreign_log is not None:
            self._end_foreign(replayed=False)

    def on_marker(self, src: int, gen: int) -> bool:
        """Peer ``src``'s REPLAYED marker of generation ``gen`` came; whether it counts (this generation)."""
        if gen != self._generation():
            return False
        self.markers_from.add(src)
        return True
