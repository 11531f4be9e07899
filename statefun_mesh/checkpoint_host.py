"""The peer as the snapshot participant sees it: the one object it is handed.

Owns: :class:`PeerCheckpointHost`, which implements ``snapshot/host.py``'s
``CheckpointHost`` over the peer's parts (hold and release input, whether a batch runs,
the input and outbox at the cut, broadcast a barrier, acknowledge, release egress, the
ingress and source positions, reopen and mark restored the state store), and the count
of checkpoints this peer failed to write with the newest failure (for ``status``).

Called by: ``snapshot.Participant`` (only through ``CheckpointHost``); ``Peer`` builds
it and hands it to the participant, and ``peer_status`` reads its failure counters.
Calls: the parts it is given and a few callables for what the peer alone owns (the open
state store and its dispatcher, reopening the store, the coordinator, the ingress log).
Never the ``Peer``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .transport import codec

if TYPE_CHECKING:
    import lmdb

    from .batchloop import BatchLoop
    from .config import MeshConfig
    from .dispatch import Dispatcher, Record
    from .egress import EgressLogs
    from .inbound import Inbound
    from .ingress import IngressLog
    from .ingress_writer import IngressWriter
    from .logutil import ThrottledLog
    from .replay import Replay
    from .routing import Router
    from .snapshot.coordinator import Coordinator
    from .snapshot.format import PeerPart
    from .state.lmdb_backend import LmdbStateBackend

__all__ = ["PeerCheckpointHost"]


class PeerCheckpointHost:
    """A peer's side of checkpoints, as ``snapshot/host.py``'s ``CheckpointHost``.

    Args:
        peer_id, n_peers, config, key_group_range, tlog: the peer's.
        router, inbound, replay, batch_loop, egress_logs, ingress_writer: its parts.
        wake: the batch loop's wake-up (a cut waits for the batch boundary).
        store: the open state store (``None`` while closed).
        dispatcher: the dispatcher of the open store.
        reopen_store: ``(keep)``: reopen the state store (see :meth:`reopen_state_store`).
        coordinator: peer 0's coordinator (``None`` elsewhere, or before it starts).
        ingress: the peer's ingress log (``None`` without checkpoints, or once closed).
        kafka: the Kafka ingresses of the module file, if any (connectors/kafka.py).
    """

    def __init__(
        self,
        peer_id: int,
        n_peers: int,
        config: MeshConfig,
        key_group_range: tuple[int, int],
        tlog: ThrottledLog,
        router: Router,
        inbound: Inbound,
        replay: Replay,
        batch_loop: BatchLoop,
        egress_logs: EgressLogs,
        ingress_writer: IngressWriter,
        *,
        wake: asyncio.Event,
        store: Callable[[], LmdbStateBackend | None],
        dispatcher: Callable[[], Dispatcher | None],
        reopen_store: Callable[[bool], LmdbStateBackend],
        coordinator: Callable[[], Coordinator | None],
        ingress: Callable[[], IngressLog | None],
        kafka: Any,
    ) -> None:
        self.peer_id = peer_id
        self.n_peers = n_peers
        self.config = config
        self.key_group_range = key_group_range
        self.tlog = tlog
        self.router = router
        self.inbound = inbound
        self.replay = replay
        self.batch_loop = batch_loop
        self.egress_logs = egress_logs
        self.ingress_writer = ingress_writer
        self._wake = wake
        self._store = store
        self._dispatcher = dispatcher
        self._reopen_store = reopen_store
        self._coordinator = coordinator
        self._ingress = ingress
        self.kafka = kafka
        #: checkpoints this peer could not write (its upload failed), and the newest failure
        self.checkpoint_failures = 0
        self.checkpoint_error: tuple[int, str] | None = None

    def acknowledge_checkpoint(self, n: int, part: PeerPart | None, error: str | None) -> None:
        """Tell the coordinator checkpoint ``n`` is written (``part``) or failed (``error``)."""
        from .snapshot.participant import part_to_dict

        body = part_to_dict(part) if part is not None else None
        if error is not None:
            self.checkpoint_failures += 1
            self.checkpoint_error = (n, error)
        if self.peer_id == 0:
            coordinator = self._coordinator()
            if coordinator is not None:
                coordinator.on_ack(0, n, body, error)
        else:
            self.router.send(0, codec.encode_control(codec.CK_ACK, n, body, error))

    def release_egress(self, heads: dict[str, int]) -> None:
        """A checkpoint completed: egress consumers may read each log up to ``heads``."""
        self.egress_logs.release(heads)

    def source_positions(self) -> dict[str, int]:
        """The Kafka ingresses' next offsets per partition routed so far (connectors/kafka.py)."""
        return self.kafka.snapshot_positions() if self.kafka is not None else {}

    def sources_checkpointed(self, positions: dict[str, int]) -> None:
        """A checkpoint covering ``positions`` completed (the Kafka ingress commits them for monitoring)."""
        if self.kafka is not None:
            self.kafka.on_checkpoint(positions)

    def release_input(self) -> None:
        """Process what :meth:`hold_input` held, in arrival order."""
        self.inbound.release()

    def batch_running(self) -> bool:
        """Whether a batch is being processed now (or a removed peer's ingress log replayed:
        a checkpoint cut waits for either)."""
        return self.batch_loop.in_batch or self.replay.foreign_log is not None

    def hold_input(self) -> None:
        """Hold batch frames and barriers until :meth:`release_input`; wake the loop for the cut."""
        self.inbound.hold_batches = True
        self._wake.set()

    def state_store(self) -> LmdbStateBackend:
        """The open state store."""
        backend = self._store()
        assert backend is not None, "the state store is not open"
        return backend

    def reopen_state_store(self, *, keep: bool = False) -> LmdbStateBackend:
        """Close and delete the state store and open an empty one (a restore starts);
        ``keep``: keep the open store (it is rolled back in place), with a new dispatcher."""
        return self._reopen_store(keep)

    def state_restored(self, egress_heads: dict[str, int]) -> None:
        """The state store holds a restored checkpoint whose egress logs stood at ``egress_heads``."""
        self.egress_logs.restored(egress_heads)
        dispatcher, backend = self._dispatcher(), self._store()
        assert dispatcher is not None and backend is not None
        dispatcher.reload_counters()  # the restored timer sequence, not the empty store's
        self.batch_loop.next_due = backend.next_timer_due()

    def cut_input(self) -> tuple[list[Record], lmdb.Transaction | None]:
        """What was received and not processed: parked invocations' records, then the
        inbox; and a read transaction over the spilled tail (see snapshot/host.py)."""
        dispatcher = self._dispatcher()
        parked = dispatcher.parked_records() if dispatcher is not None else []
        spill = self.router.spill
        return parked + list(self.router.inbox), (spill.cut() if spill is not None else None)

    def cut_outbox(self) -> lmdb.Transaction | None:
        """A read transaction over the outbox: committed sends not yet routed (see snapshot/host.py)."""
        return self.router.outbox.cut()

    def broadcast_barrier(self, frame: bytes) -> None:
        """Send every other peer all that waits for it (regardless of credit), then ``frame``."""
        for p in range(self.n_peers):
            if p != self.peer_id:
                self.router.flush_peer(p, force=True)
                self.router.send(p, frame)

    def routed_ingress_position(self) -> int:
        """The ingress log offset up to which client messages are routed (0: no ingress log)."""
        return self.ingress_writer.routed if self._ingress() is not None else 0

    def ingress_log(self) -> IngressLog | None:
        """This peer's ingress log (``None`` without checkpoints, or once closed)."""
        return self._ingress()
