"""A peer's status: the counters of the ``status`` command, ``/status`` and the dashboard.

Owns: the shape of ``Peer.status()`` (one dict of plain values: queues and memory, credit,
batches and invocations, bad input, liveness, timers, checkpoints, state size, recovery,
per-function counters, the Kafka connectors), the state store's size in use, and the
checkpoint summary (the last complete one, this peer's failures, the newest error).

Called by: ``Peer.status()`` and ``Peer.state_bytes()`` (``metrics.py`` reads those).
Reads the peer only through the read-only :class:`StatusHost` protocol; changes nothing.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from . import _speedups
from .peer_view import PeerView

if TYPE_CHECKING:
    from .batchloop import BatchLoop
    from .checkpoint_host import PeerCheckpointHost
    from .dispatch import Dispatcher, TypeStats
    from .inbound import Inbound
    from .liveness import Liveness
    from .routing import Router
    from .snapshot.participant import Participant
    from .state.lmdb_backend import LmdbStateBackend

__all__ = ["StatusHost", "checkpoint_status", "peer_status", "state_bytes"]


class StatusHost(PeerView, Protocol):
    """What a peer's status is read from (read-only): its parts and counters."""

    @property
    def router(self) -> Router: ...

    @property
    def inbound(self) -> Inbound: ...

    @property
    def liveness(self) -> Liveness: ...

    @property
    def batch_loop(self) -> BatchLoop: ...

    @property
    def dispatcher(self) -> Dispatcher | None: ...

    @property
    def backend(self) -> LmdbStateBackend | None: ...

    @property
    def participant(self) -> Participant | None: ...

    @property
    def transport(self) -> object | None: ...

    @property
    def bad_frames(self) -> int: ...

    @property
    def key_group_range(self) -> tuple[int, int]: ...

    @property
    def checkpoint_host(self) -> PeerCheckpointHost: ...

    @property
    def resumed(self) -> bool: ...

    @property
    def generation(self) -> int: ...

    @property
    def recoveries(self) -> int: ...

    @property
    def function_stats(self) -> dict[str, TypeStats]: ...

    @property
    def kafka(self) -> Any: ...

    @property
    def kafka_egress(self) -> Any: ...


def peer_status(peer: StatusHost) -> dict[str, Any]:
    """A peer's counters for monitoring and the ``status`` command (``Peer.status()``)."""
    d = peer.dispatcher
    router = peer.router
    ck = peer.checkpoint_host
    return {
        "peer": peer.peer_id,
        "peers": peer.n_peers,
        "core": _speedups.IMPLEMENTATION,
        "queued": len(router.inbox) + router.spilled(),
        "spilled": router.spilled(),
        "memory": {
            "inbox": router.inbox_bytes,
            "outgoing": router.out_bytes(),
            "held": peer.inbound.held_bytes,
            "budget": peer.config.memory_budget,
            "spilled_total": router.spilled_total,
            "credit_waits": router.credit_waits,
            "in_flight": router.in_flight_bytes(),
            "link_window": router.link_bytes,
            "outbox": router.outbox.count,
            "outbox_staged_total": router.outbox.staged_total,
        },
        "outgoing": router.outgoing(),
        "credit": router.credit,
        "frames": router.frame_counts(),
        "batches": peer.batch_loop.batches,
        "invocations": d.invocations if d else 0,
        "failures": d.failures if d else 0,
        "duplicates": d.duplicates if d else 0,
        "parked": d.parked if d else 0,
        "bad_frames": peer.bad_frames + getattr(peer.transport, "foreign_frames", 0),
        "refused_connections": getattr(peer.transport, "refused_connections", 0),
        "refused_frames": peer.inbound.refused_frames,
        "unavailable_peers": peer.liveness.unavailable(),
        "next_timer_ms": peer.batch_loop.next_due,
        "oversized_dropped": router.oversized_dropped,
        "checkpoints": checkpoint_status(peer.participant, ck.checkpoint_failures, ck.checkpoint_error),
        "key_groups": list(peer.key_group_range),
        "state_bytes": state_bytes(peer.backend),
        # for the dashboard and scripts (metrics.py exports the same counters)
        "ready": peer.resumed,
        "generation": peer.generation,
        "recoveries": peer.recoveries,
        "functions": {
            t: {"invocations": st.invocations, "failures": st.failures} for t, st in sorted(peer.function_stats.items())
        },
        "messages_in": router.messages_in,
        "routed_local": router.routed_local,
        "routed_remote": sum(router.routed_remote),
        "egress_records": d.egress_records if d else 0,
        "dead_letters": d.dead_letters if d else 0,
        # the Kafka ingresses and egresses of the module file (connectors/kafka*.py), else None
        "kafka": None
        if peer.kafka is None and peer.kafka_egress is None
        else {
            "ingress": peer.kafka.status() if peer.kafka is not None else None,
            "egress": peer.kafka_egress.status() if peer.kafka_egress is not None else None,
        },
    }


def state_bytes(backend: LmdbStateBackend | None) -> int | None:
    """Bytes of the state store's file in use (pages up to the last one written); ``None``
    while it is closed."""
    import lmdb

    if backend is None:
        return None
    try:
        return (int(backend.env.info()["last_pgno"]) + 1) * int(backend.env.stat()["psize"])
    except lmdb.Error:  # closed meanwhile (a recovery reopens it)
        return None


def checkpoint_status(
    participant: Participant | None, failures: int, error: tuple[int, str] | None
) -> dict[str, Any] | None:
    """This peer's view of the checkpoints: the last complete one, how many this peer
    failed to write, and the newest failure if no checkpoint completed since."""
    if participant is None:
        return None
    err = error
    completed = participant.completed
    at = participant.completed_at
    failing = err is not None and err[0] > completed
    return {
        "last_complete": completed if completed >= 0 else None,
        "failed": failures,
        "failing": failing,
        "last_error": f"checkpoint {err[0]}: {err[1]}" if failing and err is not None else None,
        "last_complete_age_s": None if at is None else round(max(time.time() - at, 0.0), 3),
        # the newest completed checkpoints: [id, completed at (Unix s), seconds to write, bytes]
        "history": [[n, round(t, 3), round(dur, 4), size] for n, t, dur, size in participant.history[-10:]],
    }
