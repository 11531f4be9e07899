"""What the checkpoint code may ask of its peer: the whole interface, typed.

:class:`~statefun_mesh.snapshot.participant.Participant` and
:class:`~statefun_mesh.snapshot.coordinator.Coordinator` reach the peer they belong to
only through these protocols (``Peer`` implements both); they read or write nothing
else of it. The exactly-once argument of a checkpoint (docs/architecture.md §7) rests
on the few steps named here — hold input at a barrier, cut between batches, send the
barrier behind everything sent before it, release egress once a checkpoint completes —
so they are kept in one short list rather than spread over the peer's fields.

This module imports nothing of the package at run time but the base protocol
(``peer_view.py``): it sits below ``peer.py`` and the snapshot code alike, so neither
imports the other to type it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..peer_view import PeerView

if TYPE_CHECKING:
    import lmdb

    from ..ingress import IngressLog
    from ..logutil import ThrottledLog
    from ..state.lmdb_backend import LmdbStateBackend
    from .format import Manifest, PeerPart

__all__ = ["CheckpointHost", "RecoveryHost"]


class CheckpointHost(PeerView, Protocol):
    """The peer as a checkpoint participant sees it (and, from :class:`PeerView`, its
    ``config``, ``peer_id`` and ``n_peers``)."""

    @property
    def key_group_range(self) -> tuple[int, int]: ...

    @property
    def tlog(self) -> ThrottledLog:
        """The peer's throttled log (flushed from its heartbeat loop)."""
        ...

    def batch_running(self) -> bool:
        """Whether a batch is being processed now (a cut waits for its end)."""
        ...

    def hold_input(self) -> None:
        """Hold incoming batch frames and barriers (not processed, kept in order) and wake
        the loop so that it takes the pending cut at the next batch boundary."""
        ...

    def release_input(self) -> None:
        """Process what :meth:`hold_input` held, in arrival order."""
        ...

    def state_store(self) -> LmdbStateBackend:
        """The open state store (only between :meth:`reopen_state_store` and close)."""
        ...

    def cut_input(self) -> tuple[list[Any], lmdb.Transaction | None]:
        """The received, unprocessed records at this instant, oldest first: the records of
        parked invocations, then the inbox; and a read transaction over the spilled tail
        of the inbox behind them (``None``: nothing spilled). Called between batches."""
        ...

    def cut_outbox(self) -> lmdb.Transaction | None:
        """A read transaction over the committed sends not yet routed (the outbox, written
        after the inbox's spill in the inflight object; ``None``: none). Called at the cut."""
        ...

    def broadcast_barrier(self, frame: bytes) -> None:
        """Send every other peer all that was produced for it (credit or not), then ``frame``."""
        ...

    def routed_ingress_position(self) -> int:
        """The ingress log offset up to which client messages are routed into the mesh (0: no log)."""
        ...

    def source_positions(self) -> dict[str, int]:
        """Positions in external sources (Kafka partitions: next offset) routed so far ({}: none)."""
        ...

    def ingress_log(self) -> IngressLog | None:
        """This peer's ingress log of client messages (``None``: not open)."""
        ...

    def acknowledge_checkpoint(self, n: int, part: PeerPart | None, error: str | None) -> None:
        """Tell the coordinator this peer wrote its part of checkpoint ``n`` (or why not)."""
        ...

    def release_egress(self, heads: dict[str, int]) -> None:
        """Let egress consumers read each log up to ``heads`` (a checkpoint completed)."""
        ...

    def sources_checkpointed(self, positions: dict[str, int]) -> None:
        """A checkpoint covering ``positions`` (see :meth:`source_positions`) completed."""
        ...

    def reopen_state_store(self, *, keep: bool = False) -> LmdbStateBackend:
        """Close the state store, delete it, and open an empty one (restoring starts).
        ``keep``: keep the open store as it is (it is rolled back in place); everything
        else the peer derived from it in memory is started afresh all the same."""
        ...

    def state_restored(self, egress_heads: dict[str, int]) -> None:
        """The state store holds a restored checkpoint whose egress logs stood at ``egress_heads``."""
        ...


class RecoveryHost(PeerView, Protocol):
    """The peer as the checkpoint coordinator (on peer 0) sees it (and its ``config``,
    ``peer_id`` and ``n_peers``)."""

    @property
    def tlog(self) -> ThrottledLog: ...

    @property
    def resumed(self) -> bool:
        """Whether the peer processes in the current generation."""
        ...

    def send_control(self, p: int, frame: bytes, generation: int | None = None) -> None:
        """Send a control frame to peer ``p``, stamped with ``generation`` (default: the peer's)."""
        ...

    async def recover(self, gen: int, manifest: Manifest | None) -> None:
        """Drop everything in memory and restore ``manifest`` (``None``: empty state) for ``gen``."""
        ...

    def resume(self, gen: int) -> None:
        """Start processing in generation ``gen``."""
        ...
