"""Peer: wires config, transport, routing, state, dispatch, timers and egress; one loop, one core.

The one place that wires a peer's parts (docs/architecture.md §2a): it owns the batch
loop, routing and credit (the inbox and spill, the outgoing encoders and frames per
peer), admission of client messages (the ingress log writer, requests), and the
recovery timeline (halt, restore, replay, resume); it hands the other parts only what
they need: :class:`~statefun_mesh.egress.EgressLogs` (egress readers),
:class:`~statefun_mesh.liveness.Liveness` (heartbeats), the dispatcher (one batch), the
state store, and the snapshot code, which sees it through the protocols of
``snapshot/host.py``; the client endpoint sees it through ``client_host.ClientHost``.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import os
import shutil
import struct
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from . import _aio, _speedups
from .client_host import check_request_timeout
from .clock import Clock, SystemClock
from .config import MeshConfig
from .dispatch import BATCH_BUCKETS, BatchOutcome, Dispatcher, Record, TypeStats
from .egress import EgressLogs
from .errors import (
    BlobNotFoundError,
    BlobStoreError,
    BrokenTransportError,
    ClosedTransportError,
    ConfigError,
    FrameDecodeError,
    FunctionNotFoundError,
    MessageTooLargeError,
    RequestTimeoutError,
    StateBackendError,
    StatefunMeshError,
)
from .functions import StatefulFunctions, merge_functions
from .ingress_writer import IngressWriter
from .liveness import Liveness
from .logutil import ThrottledLog, format_seconds
from .memory import RECORD_OVERHEAD, malloc_trim, records_bytes
from .messages import EgressRecord, Message
from .outbox import Outbox
from .replies import PendingRequests
from .spill import Spill
from .state.lmdb_backend import LmdbStateBackend
from .transport import codec
from .transport.base import Transport
from .transport.factory import open_transport

if TYPE_CHECKING:
    import lmdb

    from .blobstore.base import BlobStore
    from .ingress import IngressLog
    from .snapshot.coordinator import Coordinator
    from .snapshot.format import Manifest, PeerPart
    from .snapshot.participant import Participant

__all__ = ["Peer", "check_request_timeout", "open_transport"]

log = logging.getLogger("statefun_mesh.peer")


class Peer:
    """One peer of a mesh: a state store, a dispatch loop, timers, egress logs, and
    channels to the other peers.

    Use it as an async context manager (``async with Peer(config, functions) as peer:``)
    inside any asyncio program, or through :class:`~statefun_mesh.LocalMesh` and the
    ``statefun-mesh`` command.

    Args:
        config: the mesh's settings; ``config.state_dir`` must be set, and with more
            than one peer ``config.endpoints`` too.
        functions: one or more ``StatefulFunctions`` modules, multiplexed.
        peer_id: this peer's index in ``range(config.peers)``.
        clock: time source (tests pass a :class:`~statefun_mesh.clock.ManualClock`).
        transport: frame channels to the other peers (default: chosen from
            ``config.endpoints``).
    """

    def __init__(
        self,
        config: MeshConfig,
        functions: StatefulFunctions | Iterable[StatefulFunctions],
        *,
        peer_id: int = 0,
        clock: Clock | None = None,
        transport: Transport | None = None,
    ) -> None:
        if config.state_dir is None:
            raise ConfigError("Peer needs config.state_dir; LocalMesh makes a temporary one for you", key="state_dir")
        if not 0 <= peer_id < config.peers:
            raise ValueError(f"peer_id must be in range({config.peers}), got {peer_id}")
        self.config = config
        self.peer_id = peer_id
        self.n_peers = config.peers
        self.table = merge_functions(functions)
        #: remote functions (config.module), loaded here so a bad module file fails at construction
        self.remote: Any = None
        if config.module:
            from .remote.invoker import RemoteFunctions
            from .remote.module_yaml import load_module_yaml

            self.remote = RemoteFunctions(load_module_yaml(config.module))
            local = [ep.pattern for ep in self.remote.module.endpoints if ep.name and ep.pattern in self.table]
            if local:
                raise ConfigError(f"{', '.join(local)} bound both locally and in the module file", key="module")
        #: the Kafka ingresses of the module file, read by this peer (connectors/kafka.py)
        self.kafka: Any = None
        #: the Kafka egresses of the module file, produced by this peer (connectors/kafka_egress.py)
        self.kafka_egress: Any = None
        if self.remote is not None and self.remote.module.kafka_egresses:
            from .connectors.kafka_egress import KafkaEgress

            self.kafka_egress = KafkaEgress(self, self.remote.module.kafka_egresses)
        if self.remote is not None and self.remote.module.kafka_ingresses:
            from .connectors.kafka import KafkaIngress

            self.kafka = KafkaIngress(self, self.remote.module.kafka_ingresses)
        self.clock = clock or SystemClock()
        self.state_path = os.path.join(config.state_dir, f"peer-{peer_id}")
        self.backend: LmdbStateBackend | None = None
        self.dispatcher: Dispatcher | None = None
        self.transport = transport if transport is not None or config.peers == 1 else open_transport(config, peer_id)
        n = self.n_peers
        self._inbox: collections.deque[Record] = collections.deque()
        self._out = [_speedups.BatchEncoder() for _ in range(n)]
        #: sealed frames waiting for credit, per peer: (records, frame)
        self._frames: list[collections.deque[tuple[int, bytes]]] = [collections.deque() for _ in range(n)]
        self._framed = [0] * n  # records in _frames[p]
        #: bytes this peer may have in flight to each other peer (sent, not yet credited):
        #: the receiver's quarter of memory_budget for them, shared by the peers sending to
        #: it, so credit bounds bytes as well as records (credit_window x max_message_bytes
        #: could be GBs); frames are at most half of it, so a window holds a few
        self._link_bytes = max(config.memory_budget // 4 // max(n - 1, 1), 8192)
        self._frame_cap = max(min(config.max_frame_bytes // 2, self._link_bytes // 2), 4096)
        self._sent_bytes = [0] * n  # bytes sent to each peer and not yet credited back
        #: per peer, the frames sent and not yet credited back: [records, bytes], oldest first
        self._sent_frames: list[collections.deque[list[int]]] = [collections.deque() for _ in range(n)]
        self._owed_bytes = [0] * n  # bytes received from each peer and not yet credited
        #: the largest batch frame: what the receiver admits, less the generation prefix
        self._frame_limit = config.max_frame_bytes - _GEN.size
        self._message_limit = config.message_limit
        #: records that fit no frame (refused at admission, so only from an older release's logs)
        self.oversized_dropped = 0
        # memory_budget (docs/architecture.md §5): the inbox keeps up to half in memory and
        # spills the rest; the loop takes no batch while outgoing bytes exceed a quarter;
        # clients are admitted while inbox plus outgoing stay under a quarter
        budget = config.memory_budget
        self._inbox_cap = budget // 2
        self._out_cap = budget // 4
        self._held_cap = budget // 4
        self._inbox_bytes = 0  # estimated memory of the records in _inbox
        self._framed_bytes = [0] * n  # bytes in _frames[p]
        self._held_bytes = 0
        self._spill: Spill | None = None
        #: a sync invocation's sends past a sixteenth of the budget go to disk, and so does
        #: every batch's output while anything waits there (outbox.py); routed from it as
        #: outgoing room and the inbox allow
        self._outbox = Outbox(self.state_path + ".outbox", max(budget // 16, 64 << 10))
        #: the loop waits for outgoing credit: grant credit for what arrives, spilling beyond memory
        self._blocked = False
        self._trimmed_at = 0
        self.spilled_total = 0  # records ever spilled
        self.credit_waits = 0  # times the loop waited for outgoing credit
        self._out_replies: list[list[Any]] = [[] for _ in range(n)]
        self._credit = [config.credit_window] * n
        self._owed = [0] * n
        self.sent_records = [0] * n
        self.received_records = [0] * n
        self.bad_frames = 0
        #: repeated problems (bad frames, a failing disk) log one line per kind and window
        self._tlog = ThrottledLog(log)
        #: heartbeats, reachability, restarts and lost links (liveness.py)
        self.liveness = Liveness(peer_id, n, config, self.clock, send=lambda p, f: self._send(p, f),
                                 queued_for=self._queued_for,
                                 on_incarnation=self._on_incarnation, on_link_reset=self._link_reset,
                                 on_tick=self._heartbeat_tick)  # fmt: skip
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._closed_event = asyncio.Event()
        #: requests waiting for their replies (replies.py)
        self.requests = PendingRequests(peer_id, config.max_pending_requests, self.table)
        self._next_due: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        #: set when the dispatch loop died (see :meth:`dispatch_failure`): ``statefun-mesh peer``
        #: then exits with status 1, so that its supervisor restarts it and the mesh recovers
        self.dispatch_died = asyncio.Event()
        self._started = False
        self._dirty = False
        self._flush: asyncio.Future[None] | None = None
        self.batches = 0
        self.client_server: Any = None
        # checkpoints and recovery
        self.blobs: BlobStore | None = None
        self.ingress: IngressLog | None = None
        self.participant: Participant | None = None
        self.coordinator: Coordinator | None = None
        self.generation = 0
        self.resumed = False
        self.last_recovery_seconds = 0.0
        self._resumed_event = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._in_batch = False
        self._hold_batches = False
        self._held: list[tuple[int, int, bytes]] = []
        #: bytes of batch frames of later generations held, per (sender, generation), and in all
        self._held_from: dict[tuple[int, int], int] = {}
        self._held_batch_bytes = 0
        #: released heads, readers and their wake-ups (egress.py)
        self.egress_logs = EgressLogs(peer_id, bool(config.blob_store), config.egress_immediate,
                                      store=lambda: self.backend, generation=lambda: self.generation,
                                      closing=lambda: self._closing)  # fmt: skip
        #: group commit of client messages into the ingress log (ingress_writer.py)
        self.ingress_writer = IngressWriter(peer_id, lambda: self.ingress, lambda: self.generation,
                                            lambda: self.resumed and self._replay_pos is None,
                                            lambda recs: self._route(recs, from_client=True),
                                            self._check_space, self._tlog)  # fmt: skip
        self._recovery_task: asyncio.Task[None] | None = None
        self._recovery_done = False
        #: when this peer last sent READY for its generation (it repeats it until RESUME)
        self._ready_sent = 0.0
        self._next_purge = 0
        self._purge_from = b""
        #: the ingress log position the replay after a recovery continues from (None: not replaying)
        self._replay_pos: int | None = None
        #: after a rescale: the removed peer's ingress log being replayed (from _replay_pos),
        #: and those still to replay (path, position)
        self._foreign_log: IngressLog | None = None
        self._foreign_path = ""
        self._foreign_logs: list[tuple[str, int]] = []
        self._replayed = 0
        #: checkpoints this peer could not write (its upload failed), and the newest failure
        self.checkpoint_failures = 0
        self._checkpoint_error: tuple[int, str] | None = None
        #: after a recovery, due timers wait until the replayed messages are processed
        self._timers_held = False
        self._replayed_from: set[int] = set()
        self._unwatch: Any = None  # stops the blocked-loop watchdog (watchdog.py)
        # Counters for metrics (metrics.py) and status. Monotonic for the process's life
        # (a recovery does not reset them); updated per routed batch of records, not per record.
        #: per function type: invocations, failures, latency (kept across restores)
        self.function_stats: dict[str, TypeStats] = {}
        self.messages_in = 0  #: messages from clients and ingresses, routed into the mesh
        self.routed_local = 0  #: messages routed to this peer's own inbox
        self.routed_remote = [0] * n  #: messages routed to each other peer
        self.from_peers = 0  #: messages received from other peers
        self.credit_stalls = [0] * n  #: times messages to a peer waited for credit
        self.recoveries = 0  #: recovery rounds this peer restored state in
        self._restored_once = False
        self._resumed_once = False  # /readyz: "starting" until then, "recovering" after
        self.batch_sizes = [0] * (len(BATCH_BUCKETS) + 1)  #: batches per size bucket (last: larger)
        self.batch_records = 0  #: messages in all batches
        self.http: Any = None  #: the metrics/health/dashboard HTTP server (metrics.py), if configured
        #: frames refused for what their link may not send (docs/security.md): control
        #: frames off the coordinator's link, generations far ahead of the mesh's
        self.refused_frames = 0
        self._coordinator_generation = -1  # newest generation seen on peer 0's link

    # -- lifecycle ------------------------------------------------------------------

    @property
    def checkpointing(self) -> bool:
        """Whether this mesh takes checkpoints (``config.blob_store`` is set)."""
        return bool(self.config.blob_store)

    @property
    def key_group_range(self) -> tuple[int, int]:
        """The key groups ``[lo, hi)`` this peer owns."""
        maxp, n, p = self.config.max_parallelism, self.n_peers, self.peer_id
        lo = -(-p * maxp // n)  # first kg with kg * n // maxp == p
        hi = -(-(p + 1) * maxp // n)
        return lo, hi

    def _open_backend(self) -> LmdbStateBackend:
        cfg = self.config
        backend = LmdbStateBackend(self.state_path, map_size=cfg.map_size, max_map_size=cfg.max_map_size)
        self.backend = backend
        self.dispatcher = Dispatcher(
            self.table,
            backend,
            max_parallelism=cfg.max_parallelism,
            egress_retention=cfg.egress_retention,
            dedup_retention=cfg.dedup_retention,
            egress_immediate=cfg.egress_immediate,
            park_after=cfg.park_after,
            remote=self.remote,
            max_message_bytes=cfg.message_limit,
            stats=self.function_stats,
        )
        self.dispatcher.on_ready = self._wake.set  # a parked async invocation finished
        self.dispatcher.outbox = self._outbox
        self._next_due = backend.next_timer_due()
        return backend

    async def start(self) -> None:
        """Open the state store, connect to the other peers and start processing.

        With checkpoints on, this waits until the coordinator's first recovery round
        has restored the last complete checkpoint on every peer.
        """
        if self._started:
            raise RuntimeError("peer already started")
        self._started = True
        cfg = self.config
        try:
            if self.checkpointing:
                from .blobstore import open_blob_store
                from .ingress import IngressLog
                from .snapshot.participant import Participant

                self.blobs = open_blob_store(cfg.blob_store)
                self.ingress = IngressLog(self.state_path + ".ingress", sync=cfg.ingress_sync)
                self.participant = Participant(self, self.blobs)
            else:
                self._open_backend()
            if self.transport is not None:
                if hasattr(self.transport, "on_link_lost"):
                    self.transport.on_link_lost = self.liveness.on_link_lost
                await self.transport.start(self._on_frame)
            # before the client endpoint: importing aiohttp and prometheus_client holds the
            # loop for a moment, which a client's CURVE handshake must not wait behind
            http = cfg.metrics_endpoints[self.peer_id] if cfg.metrics_endpoints else ""
            if http:
                from .metrics import HttpServer

                self.http = HttpServer(self, http, dashboard=cfg.dashboard)
                await self.http.start()
            endpoint = cfg.client_endpoints[self.peer_id] if cfg.client_endpoints else ""
            if endpoint:
                from .server import ClientServer

                self.client_server = ClientServer(self, endpoint, list(cfg.client_endpoints))
                await self.client_server.start()
        except BaseException:
            await self._release_resources()
            raise
        self.liveness.started()
        if cfg.sync_interval > 0:
            self._tasks.append(asyncio.create_task(self._sync_loop(), name=f"statefun-mesh peer {self.peer_id} sync"))
        if self.transport is not None:
            self._tasks.append(
                asyncio.create_task(self.liveness.run(), name=f"statefun-mesh peer {self.peer_id} heartbeat")
            )
        if cfg.block_warning > 0:
            from .watchdog import watch

            self._unwatch = watch(self.peer_id, lambda: self.dispatcher, cfg.block_warning)
        log.info(
            "peer %d/%d starting: state at %s, %d functions, %s core, checkpoints %s",
            self.peer_id, self.n_peers, self.state_path, len(self.table), _speedups.IMPLEMENTATION,
            f"every {cfg.checkpoint_interval} s to {cfg.blob_store}" if self.checkpointing else "off",
        )  # fmt: skip
        if self.kafka is not None:
            self.kafka.start()
        if self.kafka_egress is not None:
            self.kafka_egress.start()
        if not self.checkpointing:
            self.resume(0)
            return
        try:
            if self.peer_id == 0:
                from .snapshot.coordinator import Coordinator

                assert self.participant is not None and self.blobs is not None
                self.coordinator = Coordinator(self, self.participant, self.blobs)
                await self.coordinator.start()
            else:
                await self._resumed_event.wait()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Finish the queued messages, stop, and close the state store (idempotent).

        Timers that are not yet due stay in the state store and fire after a restart.
        """
        if self._closing:
            await self._closed_event.wait()
            return
        self._closing = True
        self._wake.set()
        self._resumed_event.set()
        try:
            if self.kafka is not None:
                await self.kafka.aclose()
            if self.kafka_egress is not None:
                await self.kafka_egress.aclose()
            # the HTTP server stays up until _release_resources: /readyz says "stopping" meanwhile
            if self.client_server is not None:
                await self.client_server.aclose()
            if self.coordinator is not None:
                await self.coordinator.aclose()
            if self._loop_task is not None:
                await asyncio.wait({self._loop_task})
            self._flush_all()
            if self.participant is not None:
                self.participant.reset()
            for t in self._tasks:
                t.cancel()
            if self._flush is not None:
                try:
                    await self._flush
                except Exception:
                    log.exception("peer %d: final background sync failed", self.peer_id)
            for t in [*self._tasks, *([self._loop_task] if self._loop_task else [])]:
                try:
                    await t
                except asyncio.CancelledError:
                    pass
                except Exception:  # already logged by the loop
                    pass
            self._fail_requests(ClosedTransportError("the peer closed before the request was answered"))
            if self.remote is not None:
                await self.remote.aclose()
            self.egress_logs.wake_all()
            self._space.set()
        finally:
            if self._unwatch is not None:
                self._unwatch()
                self._unwatch = None
            await self._release_resources()
            self._closed_event.set()
            log.info("peer %d stopped", self.peer_id)

    async def abort(self) -> None:
        """Stop at once, as if the process were killed (a test hook): nothing queued is
        processed, flushed or synced; tasks are cancelled and the state store, ingress log,
        transport and blob store are closed as they stand. What the peer held in memory is
        lost, as after a SIGKILL: a recovery from the last checkpoint makes it good.
        (A later :meth:`aclose` returns at once.)"""
        if self._closing:
            await self._closed_event.wait()
            return
        self._closing = True
        tasks = [t for t in (self._loop_task, self.ingress_writer.task, self._recovery_task, *self._tasks)
                 if t is not None]
        try:
            if self.coordinator is not None:
                await self.coordinator.aclose()
            if self.participant is not None:
                self.participant.reset()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._fail_requests(ClosedTransportError("the peer was aborted before the request was answered"))
        finally:
            if self._unwatch is not None:
                self._unwatch()
                self._unwatch = None
            await self._release_resources()
            self._closed_event.set()

    async def _release_resources(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.transport is not None:
            await self.transport.aclose()
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        self._outbox.close()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.ingress is not None:
            self.ingress.close()
            self.ingress = None
        if self._foreign_log is not None:
            self._end_foreign_replay(replayed=False)
        if self.blobs is not None:
            await self.blobs.aclose()
            self.blobs = None

    def _fail_requests(self, exc: Exception) -> None:
        self.requests.fail_all(exc)

    # -- recovery (driven by the coordinator, see snapshot/coordinator.py) -------------

    async def recover(self, gen: int, manifest: Manifest | None) -> None:
        """Drop everything in memory and restore ``manifest`` (``None``: empty state)."""
        assert self.participant is not None
        self._halt()
        self.generation = gen
        if self._restored_once:  # the first restore is the start, not a recovery
            self.recoveries += 1
        self._restored_once = True
        if self._loop_task is not None:
            await self._stop_loop(self._loop_task, gen)
            self._loop_task = None
        if self._flush is not None and not self._flush.done():
            try:
                await self._flush
            except Exception:
                pass
        self.participant.reset()
        self._drop_queues()  # again: requests may have queued output while the loop stopped
        self._credit = [self.config.credit_window] * self.n_peers
        self._owed = [0] * self.n_peers
        for p in range(self.n_peers):
            self._reset_sent(p)
        self.sent_records = [0] * self.n_peers
        self.received_records = [0] * self.n_peers
        self._hold_batches = False
        self._held = [(g, src, f) for g, src, f in self._held if g >= gen]
        self._count_held()
        self._in_batch = False
        self._fail_requests(
            BrokenTransportError(
                "the mesh is recovering from a failure; the request may not have been applied: retry it"
            )
        )
        # an append in progress ends unrouted (the generation changed); the replay
        # below must see it in the log
        await self.ingress_writer.settle()
        t0 = self.clock.now()
        await self.participant.restore(manifest)
        if self.kafka is not None:
            self.kafka.restore(self.participant.sources)
        self.last_recovery_seconds = self.clock.now() - t0
        self.egress_logs.wake_all()
        # What was in flight at the cut comes first, then the ingress log from the cut's
        # position; both are queued before this peer reports READY, so when the mesh
        # resumes every replayed message is already on its way, ahead of new input.
        # routed, not queued here: the outbox part of it is for any peer
        self._route(self.participant.take_inflight_restored())
        self._replayed_from = set()
        if self._foreign_log is not None:  # a newer round: the restore hands the logs over again
            self._end_foreign_replay(replayed=False)
        self._foreign_logs = []
        if self.ingress is not None:
            # The ingress log is replayed in slices while the outgoing buffers have room
            # (the rest by the loop as credit frees them, never all at once); meanwhile
            # clients wait (_full) and a cut records the replay position as routed.
            self._replay_pos = self.ingress_writer.routed = self.participant.ingress_position
            self._replayed = 0
            self._replay_some()
        else:
            self._replay_done()

    def _replay_some(self) -> None:
        """Route more of the ingress log being replayed (this peer's, then removed peers'
        after a rescale), while outgoing buffers have room."""
        assert self.ingress is not None
        pos = self._replay_pos
        while pos is not None and self._out_bytes() < self._out_cap:
            foreign = self._foreign_log
            entries = (foreign or self.ingress).read(pos, _REPLAY_SLICE)
            if not entries:
                self._replay_done()  # on to the next log, or done
                pos = self._replay_pos
                continue
            self._route([tuple(rec) for _, rec in entries])
            self._replayed += len(entries)
            pos = self._replay_pos = entries[-1][0] + 1
            if foreign is None:
                self.ingress_writer.routed = pos

    def _replay_done(self) -> None:
        """A log is replayed: this peer's ingress log, then each removed peer's (after a
        rescale, in slices too: :meth:`_replay_some` goes on with the next), then the markers."""
        self._replay_pos = None
        if self._foreign_log is not None:
            self._end_foreign_replay(replayed=True)
        elif self.ingress is not None:
            self.ingress_writer.routed = self.ingress.next_offset
            if self._replayed:
                log.info("peer %d: replayed %d messages from its ingress log", self.peer_id, self._replayed)
            assert self.participant is not None
            self._foreign_logs = self.participant.take_foreign_ingress()
        if self._foreign_logs:
            from .ingress import IngressLog

            path, self._replay_pos = self._foreign_logs.pop(0)
            # a checkpoint cut waits until this log is replayed (batch_running): its position
            # is in no manifest, so a cut in the middle could neither replay the rest nor skip it
            self._foreign_log = IngressLog(path, sync=False)
            self._foreign_path = path
            self._replayed = 0
            return
        # Behind the replayed messages on every channel: a marker. A peer fires no timer
        # after a recovery until it has the marker from every other peer and has processed
        # what came before it, so a replayed cancellation is never overtaken by its timer.
        marker = codec.encode_control(codec.REPLAYED, self.generation)
        for p in range(self.n_peers):
            if p != self.peer_id:
                self._seal(p)
                self._frames[p].append((0, marker))
                self._framed_bytes[p] += len(marker)
        self._flush_all()
        self._check_space()

    async def _stop_loop(self, task: asyncio.Task[None], gen: int) -> None:
        """Cancel the dispatch loop and wait until it has stopped. ``asyncio.wait`` neither
        raises the loop's own error nor swallows a cancellation of this recovery (a newer
        round cancels it: two restores must never run at once)."""
        task.cancel()
        waited = 0.0
        while not task.done():
            await asyncio.wait({task}, timeout=5.0)
            if not task.done():
                waited += 5.0
                self._tlog.error("dispatch loop not stopping", "peer %d: recovery round %d: the dispatch loop has "
                                 "not stopped %.0f s after it was cancelled; still waiting (it is at: %s)",
                                 self.peer_id, gen, waited, " <- ".join(repr(f) for f in task.get_stack(limit=3)))
                task.cancel()

    def resume(self, gen: int) -> None:
        """Start processing in generation ``gen`` (what :meth:`recover` queued first)."""
        if self.generation != gen or self._closing:
            return
        if self._loop_task is not None and not self._loop_task.done():
            return
        assert self.backend is not None
        self._next_due = self.backend.next_timer_due()
        self._timers_held = self.checkpointing
        self._loop_task = asyncio.create_task(self._loop(), name=f"statefun-mesh peer {self.peer_id} dispatch")
        self._loop_task.add_done_callback(self._loop_ended)
        self.resumed = True
        self._resumed_once = True
        held, self._held = self._held, []
        self._count_held()
        for g, src, frame in held:
            if g == gen:
                self._on_channel_frame(src, frame)
        self._resumed_event.set()
        self._wake.set()
        self._flush_all()
        log.debug("peer %d processing (generation %d)", self.peer_id, gen)  # `ready` (or a recovery round) says it

    def _end_foreign_replay(self, replayed: bool) -> None:
        """Close the removed peer's ingress log being replayed (``replayed``: all of it)."""
        assert self._foreign_log is not None
        self._foreign_log.close()
        self._foreign_log = None
        if replayed:
            assert self.participant is not None
            self.participant.note_replayed_foreign(self._foreign_path)
            log.warning("peer %d: replayed %d messages from the ingress log of a removed peer (%s); it is "
                        "deleted once the next checkpoint completes", self.peer_id, self._replayed,
                        self._foreign_path)  # fmt: skip

    def dispatch_failure(self) -> BaseException | None:
        """Why the dispatch loop died (``None``: it runs, was stopped, or has not started)."""
        task = self._loop_task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("peer %d: the dispatch loop died; this peer processes nothing more: restart it",
                         self.peer_id, exc_info=task.exception())  # fmt: skip
            self.dispatch_died.set()

    def acknowledge_checkpoint(self, n: int, part: PeerPart | None, error: str | None) -> None:
        from .snapshot.participant import part_to_dict

        body = part_to_dict(part) if part is not None else None
        if error is not None:
            self.checkpoint_failures += 1
            self._checkpoint_error = (n, error)
        if self.peer_id == 0:
            if self.coordinator is not None:
                self.coordinator.on_ack(0, n, body, error)
        else:
            self._send(0, codec.encode_control(codec.CK_ACK, n, body, error))

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
        self._hold_batches = False
        held, self._held = self._held, []
        keep: list[tuple[int, int, bytes]] = []
        for i, (g, src, frame) in enumerate(held):
            if self._hold_batches:
                # a released barrier started the next cut, which waits for a batch to
                # end: what came after it waits too, in order
                self._held = keep + held[i:] + self._held
                self._count_held()
                return
            if g == self.generation:
                self._on_channel_frame(src, frame)
            elif g > self.generation:
                keep.append((g, src, frame))
        self._held = keep + self._held
        self._count_held()

    # -- the snapshot code's view of this peer (snapshot/host.py) -----------------------

    @property
    def tlog(self) -> ThrottledLog:
        """This peer's throttled log (flushed from its heartbeat loop)."""
        return self._tlog

    def batch_running(self) -> bool:
        """Whether a batch is being processed now (or a removed peer's ingress log replayed:
        a checkpoint cut waits for either)."""
        return self._in_batch or self._foreign_log is not None

    def hold_input(self) -> None:
        """Hold batch frames and barriers until :meth:`release_input`; wake the loop for the cut."""
        self._hold_batches = True
        self._wake.set()

    def state_store(self) -> LmdbStateBackend:
        """The open state store."""
        assert self.backend is not None, "the state store is not open"
        return self.backend

    def reopen_state_store(self) -> LmdbStateBackend:
        """Close and delete the state store and open an empty one (a restore starts)."""
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if os.path.exists(self.state_path):
            shutil.rmtree(self.state_path)
        return self._open_backend()

    def state_restored(self, egress_heads: dict[str, int]) -> None:
        """The state store holds a restored checkpoint whose egress logs stood at ``egress_heads``."""
        self.egress_logs.restored(egress_heads)
        assert self.dispatcher is not None and self.backend is not None
        self.dispatcher.reload_counters()  # the restored timer sequence, not the empty store's
        self._next_due = self.backend.next_timer_due()

    def cut_input(self) -> tuple[list[Record], lmdb.Transaction | None]:
        """What was received and not processed: parked invocations' records, then the
        inbox; and a read transaction over the spilled tail (see snapshot/host.py)."""
        parked = self.dispatcher.parked_records() if self.dispatcher is not None else []
        return parked + list(self._inbox), (self._spill.cut() if self._spill is not None else None)

    def cut_outbox(self) -> lmdb.Transaction | None:
        """A read transaction over the outbox: committed sends not yet routed (see snapshot/host.py)."""
        return self._outbox.cut()

    def broadcast_barrier(self, frame: bytes) -> None:
        """Send every other peer all that waits for it (regardless of credit), then ``frame``."""
        for p in range(self.n_peers):
            if p != self.peer_id:
                self._flush_peer(p, force=True)
                self._send(p, frame)

    def routed_ingress_position(self) -> int:
        """The ingress log offset up to which client messages are routed (0: no ingress log)."""
        return self.ingress_writer.routed if self.ingress is not None else 0

    def ingress_log(self) -> IngressLog | None:
        """This peer's ingress log (``None`` without checkpoints, or once closed)."""
        return self.ingress

    def send_control(self, p: int, frame: bytes, generation: int | None = None) -> None:
        """Send a control frame to peer ``p`` (stamped with ``generation``, default this peer's)."""
        self._send(p, frame, generation)

    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closing(self) -> bool:
        """Whether the peer is shutting down (connectors stop taking work)."""
        return self._closing

    @property
    def running(self) -> bool:
        """Whether the peer has started and is not closing."""
        return self._started and not self._closing

    # -- client API -----------------------------------------------------------------

    def _check(self, typename: str) -> None:
        if not self.running:
            raise ClosedTransportError("the peer is not running")
        if typename not in self.table and not self.is_remote(typename):
            raise FunctionNotFoundError(typename, list(self.table))

    def is_remote(self, typename: str) -> bool:
        """Whether ``typename`` is a remote function of the module file."""
        return self.remote is not None and self.remote.endpoint_for(typename) is not None

    def pressure(self) -> int:
        """Messages queued here: the local inbox plus what waits to go to other peers."""
        return (
            len(self._inbox) + sum(len(e) for e in self._out) + sum(self._framed)
            + self.ingress_writer.queued + (self._spill.count if self._spill else 0) + self._outbox.count
            + (self.dispatcher.queued if self.dispatcher is not None else 0)
        )  # fmt: skip

    def queued_bytes(self) -> int:
        """Estimated memory of the queued messages: the inbox in memory plus what waits to go out."""
        return self._inbox_bytes + self._out_bytes()

    def _out_bytes(self) -> int:
        return sum(e.nbytes for e in self._out) + sum(self._framed_bytes)

    def _full(self) -> bool:
        """Over ``inbox_limit`` messages or a quarter of ``memory_budget``, or spilling: clients wait."""
        return (
            self.pressure() >= self.config.inbox_limit
            or self.queued_bytes() >= self._out_cap
            or (self._spill is not None and self._spill.count > 0)
            or self._replay_pos is not None
            or self._outbox.count > 0
        )

    async def submit(self, rec: Record, *, durable: bool = True) -> None:
        """Admit one message from a client.

        Waits while the peer is over ``inbox_limit``, recovering, or replaying its
        ingress log. With checkpoints on and ``durable``, returns only once the message
        is in the ingress log (it will be applied, after any crash); requests are not
        logged (their caller waits for the answer and retries on failure).
        """
        await self.admit()
        await self.accept(rec, durable=durable)

    async def accept(self, rec: Record, *, durable: bool = True) -> None:
        """Log (when ``durable`` and checkpoints are on) and route an admitted message."""
        fut = self.accept_nowait(rec, durable=durable)
        if fut is not None:
            await fut

    def accept_nowait(self, rec: Record, *, durable: bool = True) -> asyncio.Future[None] | None:
        """Take an admitted message in now (it counts in :meth:`pressure` at once).

        Returns ``None`` when the message is routed already, else a future that is done
        once it is in the ingress log (and routed), or fails if it could not be logged.
        """
        self.check_message(rec)
        if durable and self.ingress is not None:
            return self.ingress_writer.add(rec)
        self._route([rec], from_client=True)
        return None

    def admits(self) -> bool:
        """Whether :meth:`admit` would return at once."""
        return self.resumed and not self._closing and not self._full()

    async def admit(self) -> None:
        """Wait until this peer admits client messages (running, and under ``inbox_limit``)."""
        while True:
            if self._closing:
                raise ClosedTransportError("the peer is closing")
            if not self.resumed:
                await self._resumed_event.wait()
                continue
            if self._full():
                self._space.clear()
                await self._space.wait()
                continue
            break

    async def send(self, message: Message, idempotency_key: str | None = None) -> None:
        """Send ``message`` to its target instance, on whichever peer owns it.

        Waits while the peer is over its ``inbox_limit`` (backpressure). A message sent
        again with the same ``idempotency_key`` (to the same instance, within
        ``dedup_retention`` seconds) is not applied again.

        Raises:
            FunctionNotFoundError: no function is bound to the target type.
            ClosedTransportError: the peer is not running.
        """
        if type(message) is not Message:
            raise TypeError(f"expected a Message (use message_builder), got {type(message).__name__}")
        self._check(message.target_typename)
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key):
            raise ValueError("idempotency_key must be a non-empty str")
        rec = (message.target_typename, message.target_id, "", idempotency_key or "", message._vt, message._v, 0, 0)
        self.check_message(rec)
        await self.submit(rec)

    async def request(self, message: Message, timeout: float = 10.0) -> Message:
        """Send ``message`` and wait for the function's ``context.reply``.

        Returns:
            The reply as a :class:`Message` whose ``target_typename``/``target_id`` name
            the instance that replied.

        Raises:
            RequestTimeoutError: no reply within ``timeout`` seconds.
            InvocationError: the function raised.
            FunctionNotFoundError: no function is bound to the target type.
            MessageTooLargeError: the message is over ``max_message_bytes``.
            MeshBusyError: ``max_pending_requests`` requests already wait for replies here.
            ValueError: ``timeout`` is not a number of seconds in (0, ``max_request_timeout``].
        """
        if type(message) is not Message:
            raise TypeError(f"expected a Message (use message_builder), got {type(message).__name__}")
        return await self.request_raw(message.target_typename, message.target_id, message._vt, message._v, timeout)

    async def request_raw(self, typename: str, id: str, vt: str, value: bytes, timeout: float) -> Message:
        """:meth:`request` for a message given as its parts (used by the client server)."""
        self._check(typename)
        check_request_timeout(timeout, self.config.max_request_timeout)
        rid = self.requests.next_id()
        rec = (typename, id, "", "", vt, value, self.peer_id, rid)
        self.check_message(rec)
        fut = self.requests.open(rid)
        try:
            await self.submit(rec, durable=False)
            try:
                return await _aio.wait_for(fut, timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise RequestTimeoutError(
                    f"no reply from {typename}/{id} within {format_seconds(timeout)} s; "
                    "does the function call context.reply()?"
                ) from None
        finally:
            self.requests.close(rid)

    # -- egress (egress.py) ---------------------------------------------------------------

    def egress_position(self, typename: str, start: str | int) -> int:
        """Resolve ``"earliest"``, ``"latest"`` or an offset to an offset of this peer's egress log."""
        return self.egress_logs.position(typename, start)

    def egress(self, typename: str, start: str | int = "earliest") -> AsyncIterator[EgressRecord]:
        """Iterate this peer's records of the egress ``typename``, waiting for new ones.

        Args:
            typename: the egress name used in ``egress_message_builder``.
            start: ``"earliest"`` (the oldest retained record), ``"latest"`` (only records
                produced after this call) or an offset.

        The iteration ends when the peer closes.
        """
        return self.egress_logs.iterate(typename, self.egress_logs.position(typename, start))

    def egress_head(self, typename: str) -> int:
        """The offset after the last record consumers may see: with checkpoints, the last
        record a complete checkpoint covers (transactional egress); else the last one."""
        return self.egress_logs.head(typename)

    def egress_restored_head(self, typename: str) -> int:
        """Where ``typename``'s log stood in the checkpoint the last recovery restored."""
        return self.egress_logs.restored_head(typename)

    def egress_resume(self, typename: str, pos: int, generation: int) -> int:
        """Where a reader at ``pos``, read in ``generation`` (-1: none), continues: after a
        recovery since, offsets past the restored head are reused, so from there."""
        return self.egress_logs.resume(typename, pos, generation)

    def egress_read(self, typename: str, pos: int, limit: int) -> list[EgressRecord]:
        """Return up to ``limit`` released records from offset ``pos`` on, without waiting."""
        return self.egress_logs.read(typename, pos, limit)

    async def egress_wait(self, typename: str, pos: int, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a record at or after ``pos`` (or the peer closing)."""
        await self.egress_logs.wait(typename, pos, timeout)

    async def idle(self) -> None:
        """Wait until this peer has processed everything queued here (and every due timer)."""
        while True:
            if (self._inbox or (self._spill and self._spill.count) or self._timer_due(self._now_ms())
                    or self._replay_pos is not None or self._outbox.count):  # fmt: skip
                self._idle.clear()
                self._wake.set()
            elif self._idle.is_set() or self._closing:
                return
            await self._idle.wait()

    def is_idle(self) -> bool:
        """Whether nothing is queued here, nothing waits to be sent, and the loop is waiting."""
        return (
            not self._inbox
            and not (self._spill and self._spill.count)
            and self._replay_pos is None
            and not self._outbox.count
            and self._idle.is_set()
            and not any(len(e) for e in self._out)
            and not any(self._frames)
            and not self._timer_due(self._now_ms())
        )

    def status(self) -> dict[str, Any]:
        """Counters for monitoring and the ``status`` command."""
        d = self.dispatcher
        return {
            "peer": self.peer_id,
            "peers": self.n_peers,
            "core": _speedups.IMPLEMENTATION,
            "queued": len(self._inbox) + (self._spill.count if self._spill else 0),
            "spilled": self._spill.count if self._spill else 0,
            "memory": {"inbox": self._inbox_bytes, "outgoing": self._out_bytes(), "held": self._held_bytes,
                       "budget": self.config.memory_budget, "spilled_total": self.spilled_total,
                       "credit_waits": self.credit_waits, "in_flight": sum(self._sent_bytes),
                       "link_window": self._link_bytes, "outbox": self._outbox.count,
                       "outbox_staged_total": self._outbox.staged_total},
            "outgoing": [len(e) + f for e, f in zip(self._out, self._framed, strict=True)],
            "credit": list(self._credit),
            "batches": self.batches,
            "invocations": d.invocations if d else 0,
            "failures": d.failures if d else 0,
            "duplicates": d.duplicates if d else 0,
            "parked": d.parked if d else 0,
            "bad_frames": self.bad_frames + getattr(self.transport, "foreign_frames", 0),
            "refused_connections": getattr(self.transport, "refused_connections", 0),
            "refused_frames": self.refused_frames,
            "unavailable_peers": self.liveness.unavailable(),
            "next_timer_ms": self._next_due,
            "oversized_dropped": self.oversized_dropped,
            "checkpoints": self._checkpoint_status(),
            "key_groups": list(self.key_group_range),
            "state_bytes": self._state_bytes(),
            # for the dashboard and scripts (metrics.py exports the same counters)
            "ready": self.resumed,
            "generation": self.generation,
            "recoveries": self.recoveries,
            "functions": {t: {"invocations": st.invocations, "failures": st.failures}
                          for t, st in sorted(self.function_stats.items())},
            "messages_in": self.messages_in,
            "routed_local": self.routed_local,
            "routed_remote": sum(self.routed_remote),
            "egress_records": d.egress_records if d else 0,
            "dead_letters": d.dead_letters if d else 0,
            # the Kafka ingresses and egresses of the module file (connectors/kafka*.py), else None
            "kafka": None if self.kafka is None and self.kafka_egress is None else {
                "ingress": self.kafka.status() if self.kafka is not None else None,
                "egress": self.kafka_egress.status() if self.kafka_egress is not None else None},
        }

    def _state_bytes(self) -> int | None:
        """Bytes of the state store's file in use (pages up to the last one written)."""
        import lmdb

        backend = self.backend
        if backend is None:
            return None
        try:
            return (int(backend.env.info()["last_pgno"]) + 1) * int(backend.env.stat()["psize"])
        except lmdb.Error:  # closed meanwhile (a recovery reopens it)
            return None

    def _checkpoint_status(self) -> dict[str, Any] | None:
        """This peer's view of the checkpoints: the last complete one, how many this peer
        failed to write, and the newest failure if no checkpoint completed since."""
        participant = self.participant
        if participant is None:
            return None
        err = self._checkpoint_error
        completed = participant.completed
        at = participant.completed_at
        failing = err is not None and err[0] > completed
        return {
            "last_complete": completed if completed >= 0 else None,
            "failed": self.checkpoint_failures,
            "failing": failing,
            "last_error": f"checkpoint {err[0]}: {err[1]}" if failing and err is not None else None,
            "last_complete_age_s": None if at is None else round(max(time.time() - at, 0.0), 3),
            # the newest completed checkpoints: [id, completed at (Unix s), seconds to write, bytes]
            "history": [[n, round(t, 3), round(dur, 4), size] for n, t, dur, size in participant.history[-10:]],
        }

    # -- routing ------------------------------------------------------------------------

    def _route(self, records: list[Record], from_client: bool = False) -> None:
        if from_client:
            self.messages_in += len(records)
        if self.n_peers == 1:
            self.routed_local += len(records)
            self._enqueue(records)
        else:
            me = self.peer_id
            for p, part in enumerate(_speedups.partition(records, self.config.max_parallelism, self.n_peers)):
                if not part:
                    continue
                if p == me:
                    self.routed_local += len(part)
                    self._enqueue(part)
                    continue
                self.routed_remote[p] += len(part)
                enc = self._out[p]
                # Frames split by count and by bytes: none exceeds max_frame_bytes, which
                # the receiver enforces by dropping the frame (and the messages in it).
                max_records, limit, cap = self.config.max_frame_records, self._frame_limit, self._frame_cap
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
                    self._flush_peer(p)
            if from_client:
                self._schedule_flush()
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
            self.peer_id, rec[0], rec[1], p, size, self.config.max_frame_bytes,
        )  # fmt: skip

    def check_message(self, rec: Record, what: str = "message") -> None:
        """Refuse a record larger than the mesh admits (``max_message_bytes``).

        Raises:
            MessageTooLargeError: naming the record's size and the limit.
        """
        limit = self._message_limit
        # at most 49 bytes of msgpack headers, at most 4 UTF-8 bytes per character
        if len(rec[5]) + 4 * (len(rec[0]) + len(rec[1]) + len(rec[2]) + len(rec[3]) + len(rec[4])) + 49 <= limit:
            return
        size = _speedups.record_size(rec)
        if size > limit:
            raise MessageTooLargeError(size, limit, what)

    def _enqueue(self, records: list[Record]) -> None:
        """Queue ``records`` for processing here: in memory up to half of ``memory_budget``,
        the rest (and everything while anything is spilled, to keep the order) to the spill."""
        if not records:
            return
        size = records_bytes(records)
        spill = self._spill
        if (spill is None or not spill.count) and self._inbox_bytes + size <= self._inbox_cap:
            self._inbox.extend(records)
            self._inbox_bytes += size
            return
        i = 0
        if spill is None or not spill.count:
            room = self._inbox_cap - self._inbox_bytes
            while i < len(records) and room > 0:
                room -= len(records[i][1]) + len(records[i][5]) + RECORD_OVERHEAD
                i += 1
            head = records[:i]
            self._inbox.extend(head)
            self._inbox_bytes += records_bytes(head)
        try:
            if spill is None:
                spill = self._spill = Spill(self.state_path + ".spill")
            for j in range(i, len(records), 1000):
                spill.push(records[j : j + 1000])
                self.spilled_total += len(records[j : j + 1000])
        except StatefunMeshError as exc:
            # a full disk: keep them in memory (never drop what was received)
            self._tlog.error("failed spills", "peer %d: cannot spill messages to disk: %s; keeping them in memory",
                             self.peer_id, exc)  # fmt: skip
            rest = records[i:] if spill is None else records[j:]
            self._inbox.extend(rest)
            self._inbox_bytes += records_bytes(rest)

    def _refill(self) -> None:
        """Read spilled records back while the inbox is under a quarter of the budget."""
        spill = self._spill
        while spill is not None and spill.count and self._inbox_bytes < self._inbox_cap // 2:
            records = spill.pop()
            self._inbox.extend(records)
            self._inbox_bytes += records_bytes(records)

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            linger = self.config.linger
            if linger > 0:
                self._flush_handle = loop.call_later(linger, self._flush_all)
            else:
                self._flush_handle = loop.call_soon(self._flush_all)

    def _send(self, p: int, frame: bytes, generation: int | None = None) -> None:
        """Send a frame to peer ``p``, preceded by our generation (u32 BE)."""
        if self.transport is None:
            return
        gen = self.generation if generation is None else generation
        try:
            self.transport.send(p, _GEN.pack(gen) + frame)
        except ClosedTransportError:
            log.debug("peer %d: transport closed; frame for peer %d dropped", self.peer_id, p)

    def _seal(self, p: int) -> None:
        """Close the records waiting for peer ``p`` into a frame (``_route`` fills the
        encoder only up to ``max_frame_bytes`` with the generation prefix, which the
        receiver enforces)."""
        enc = self._out[p]
        n = len(enc)
        if n:
            frame = enc.flush()
            if len(frame) > self._frame_limit:  # never: a bug if it shows
                log.error("peer %d: a message to peer %d makes a %d-byte frame, over max_frame_bytes (%d); "
                          "the receiver will refuse it: raise max_frame_bytes on every peer",
                          self.peer_id, p, len(frame), self.config.max_frame_bytes)  # fmt: skip
            self._frames[p].append((n, frame))
            self._framed[p] += n
            self._framed_bytes[p] += len(frame)

    def _flush_peer(self, p: int, force: bool = False) -> None:
        """Send peer ``p`` what waits for it, as far as its credit goes (``force``: all of it)."""
        if self.transport is None:
            return
        if not self.resumed and self.checkpointing:
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
        window, quarter = self._link_bytes, self._link_bytes // 4
        while frames and (force or (self._credit[p] > 0 and (
                self._sent_bytes[p] < quarter or self._sent_bytes[p] + len(frames[0][1]) <= window))):  # fmt: skip
            n, frame = frames.popleft()
            self._framed[p] -= n
            self._framed_bytes[p] -= len(frame)
            self._credit[p] -= n
            if n:  # a batch (a marker has no records, and no grant would return its bytes)
                self._sent_bytes[p] += len(frame)
                self._sent_frames[p].append([n, len(frame)])
            self.sent_records[p] += n
            self._send(p, frame)
            sent = True
        if frames and not force:
            self.credit_stalls[p] += 1
        if sent:
            # what left frees admission: wake clients waiting in admit(), wherever this
            # flush came from (the loop, a credit, a timer, the idle path)
            self._check_space()

    def _flush_all(self) -> None:
        self._flush_handle = None
        if self.transport is None:
            return
        for p in range(self.n_peers):
            if p == self.peer_id:
                continue
            if len(self._out[p]) or self._frames[p]:
                self._flush_peer(p)
            replies = self._out_replies[p]
            if replies:
                self._out_replies[p] = []
                for frame in codec.encode_reply_frames(replies, self._frame_limit):
                    self._send(p, frame)

    def _grant_credits(self) -> None:
        # A peer whose loop waits for credit grants for all it receives (what does not fit
        # in memory spills): if it did not, two peers waiting for each other's credit would
        # wedge the mesh (docs/architecture.md §5).
        if self.transport is None:
            return
        queued = self.dispatcher.queued if self.dispatcher is not None else 0  # behind parked addresses
        if not self._blocked and (
            len(self._inbox) + queued >= self.config.inbox_limit
            or self._inbox_bytes >= self._inbox_cap
            or (self._spill is not None and self._spill.count)
        ):
            return  # the sender keeps the rest until this peer has room in memory
        quarter = max(self.config.credit_window // 4, 1)
        quarter_bytes = self._link_bytes // 4
        empty = not self._inbox
        for p in range(self.n_peers):
            owed = self._owed[p]
            if owed and (owed >= quarter or self._owed_bytes[p] >= quarter_bytes or empty or self._blocked):
                self._owed[p] = 0
                self._owed_bytes[p] = 0
                self._send(p, codec.encode_control(codec.CREDIT, owed))

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

    # -- frames from other peers ---------------------------------------------------

    def _on_frame(self, src: int, frame: bytes) -> None:
        if len(frame) < 6:
            self.bad_frames += 1
            self._tlog.error("bad frames", "peer %d: rejected a frame from peer %d: %d bytes is too short",
                             self.peer_id, src, len(frame))
            return
        gen = _GEN.unpack_from(frame)[0]
        body = frame[4:]
        if body[0] != _speedups.FRAME_VERSION:
            self.bad_frames += 1
            self._tlog.error("bad frames", "peer %d: rejected a frame from peer %d: not a generation-prefixed frame of "
                             "version %d; do all peers run the same statefun_mesh release?", self.peer_id, src,
                             _speedups.FRAME_VERSION)  # fmt: skip
            return
        kind = body[1]
        if src == 0:
            self._coordinator_generation = max(self._coordinator_generation, gen)
        self.liveness.heard(src)
        if kind in (codec.HEARTBEAT, codec.RECOVER, codec.READY, codec.RESUME, codec.RESTORE_FAILED):
            self._on_channel_frame(src, body, gen)
            return
        if gen < self.generation:
            return  # from before a recovery: its effects were rolled back
        if gen > self.generation and src != 0 and not self._generation_plausible(gen):
            self._refuse_frame(src, "far-ahead generation", f"generation {gen}, more than {GENERATION_WINDOW} above "
                               f"the newest this peer knows ({max(self.generation, self._coordinator_generation)})")
            return
        # While a cut waits for the batch in progress, batch frames wait, and so do
        # barriers: a barrier must not overtake the frames its sender sent before it
        # (they are in flight across the cut and must be logged as such).
        if gen > self.generation or not self.resumed or (
            self._hold_batches and (kind == codec.KIND_BATCH or kind == codec.BARRIER)
        ):
            if gen > self.generation and not self._may_hold(src, gen, kind, len(body)):
                # a peer of this mesh sends a later generation only after a RECOVER this
                # peer is about to get, and at most its link window: beyond that it is no peer
                self.bad_frames += 1
                self._tlog.error("refused future frames", "peer %d: refused a %d-byte frame of generation %d from "
                                 "peer %d: over what this peer holds of later generations (a link window of "
                                 "%d bytes per peer, %d bytes of other frames in all)", self.peer_id, len(body), gen,
                                 src, self._link_bytes, self._held_cap)  # fmt: skip
                return
            self._held.append((gen, src, body))
            self._held_bytes += len(body)
            return
        self._on_channel_frame(src, body, gen)

    def _may_hold(self, src: int, gen: int, kind: int, size: int) -> bool:
        """Whether a frame of a later generation may be held until this peer is in it.

        A batch frame: within its sender's link window for that generation, by the rule
        the sender keeps for what it has in flight (:meth:`_flush_peer`: up to the window,
        and one frame of any size while under a quarter of it is outstanding), so what an
        honest sender sends is always held, a message larger than the window included,
        whatever ``memory_budget`` is. Any other frame (markers, barriers, credits,
        replies): within a quarter of ``memory_budget`` in all.
        """
        if kind != codec.KIND_BATCH:
            return self._held_bytes - self._held_batch_bytes + size <= self._held_cap
        held = self._held_from.get((src, gen), 0)
        if held + size > self._link_bytes and held >= self._link_bytes // 4:
            return False
        self._held_from[(src, gen)] = held + size
        self._held_batch_bytes += size
        return True

    def _count_held(self) -> None:
        """Recount what ``_held`` holds (after it was filtered or released)."""
        self._held_bytes = sum(len(f) for _, _, f in self._held)
        held_from: dict[tuple[int, int], int] = {}
        for g, src, f in self._held:
            if g > self.generation and f[1] == codec.KIND_BATCH:
                held_from[(src, g)] = held_from.get((src, g), 0) + len(f)
        self._held_from = held_from
        self._held_batch_bytes = sum(held_from.values())

    def _generation_plausible(self, gen: int) -> bool:
        """Whether a frame stamped ``gen`` may be held for later: generations only come from
        the coordinator (peer 0), so none is more than a few rounds ahead of what it last said."""
        if not self.checkpointing:
            known = self.generation
        elif self.coordinator is not None:
            # -1 until its first round: a restarted coordinator has not read the generation yet
            known = self.coordinator.generation if self.generation > 0 else -1
        else:
            known = self._coordinator_generation  # -1: not heard from peer 0 yet (just started): hold
        return known < 0 or gen <= max(known, self.generation) + GENERATION_WINDOW

    def _refuse_frame(self, src: int, kind: str, why: str) -> None:
        self.refused_frames += 1
        self._tlog.error(f"refused frames ({kind})", "peer %d: refused a frame from peer %d: %s (refused so "
                              "far: %d)", self.peer_id, src, why, self.refused_frames)  # fmt: skip

    def _on_channel_frame(self, src: int, frame: bytes, gen: int | None = None) -> None:
        try:
            kind = codec.frame_kind(frame)
            if kind == codec.KIND_BATCH:
                records = _speedups.decode_batch(frame)
                self.received_records[src] += len(records)
                self.from_peers += len(records)
                self._owed[src] += len(records)
                self._owed_bytes[src] += len(frame)
                if self.participant is not None and self.participant.snap is not None:
                    self.participant.on_records(src, records)
                self._enqueue(records)
                self._idle.clear()
                self._wake.set()
                if self._blocked:
                    self._grant_credits()
                return
            kind, items = codec.decode_control(frame, _PEER_KINDS)
        except FrameDecodeError as exc:
            self.bad_frames += 1
            self._tlog.error("bad frames", "peer %d: rejected a frame from peer %d: %s", self.peer_id, src, exc)
            return
        if kind == codec.CREDIT:
            # A grant returns records this peer sent and the other has since taken in:
            # never more than are outstanding. (That can exceed the window: whole frames
            # go while credit > 0, and a checkpoint barrier forces out what is queued.)
            outstanding = self.config.credit_window - self._credit[src]
            if not 0 < items[0] <= outstanding:
                self.bad_frames += 1
                self._tlog.error("bad credits", "peer %d: rejected a credit of %d from peer %d, which has only "
                                 "%d records of this peer's outstanding", self.peer_id, items[0], src,
                                 outstanding)  # fmt: skip
                return
            self._credit[src] += items[0]
            self._credited(src, items[0])
            if len(self._out[src]) or self._frames[src]:
                self._flush_peer(src)
            self._check_space()
            if self._blocked or self._replay_pos is not None or self._outbox.count:
                self._wake.set()  # the loop waits for this credit
        elif kind == codec.HEARTBEAT:
            self._on_heartbeat(src, items)
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
                self._resolve(*item)
        elif kind in _COORDINATOR_KINDS and src != 0:
            self._refuse_frame(src, "control frames off the coordinator's link",
                               f"control frame 0x{kind:02x} can only come from the coordinator (peer 0)")
        elif self.participant is None:
            self.bad_frames += 1
            self._tlog.error("unexpected checkpoint frames", "peer %d: checkpoint frame 0x%02x from peer %d, but this "
                             "peer takes no checkpoints; do all peers have the same blob_store setting?",
                             self.peer_id, kind, src)  # fmt: skip
        elif kind == codec.BARRIER:
            self.participant.on_barrier(src, items[0], items[1])
        elif kind == codec.CK_DONE:
            self.participant.on_done(items[0])
        elif kind == codec.CK_ABORT:
            self.participant.abort(items[0])
        elif kind == codec.CK_ACK:
            if self.coordinator is not None:
                self.coordinator.on_ack(src, items[0], items[1], items[2])
        elif kind == codec.RECOVER:
            if src == 0 and gen is not None and gen > self.generation:
                self._start_recovery_task(gen, items[1])
            elif src == 0 and gen == self.generation and self._recovery_done:
                # the coordinator asks again: our READY was lost or is late; say it again
                self._send_ready(gen)
        elif kind == codec.READY:
            if self.coordinator is not None:
                self.coordinator.on_ready(src, items[0])
        elif kind == codec.REPLAYED:
            if items[0] == self.generation:
                self._replayed_from.add(src)
                self._wake.set()
        elif kind == codec.RESTORE_FAILED:
            if self.coordinator is not None:
                self.coordinator.on_restore_failed(src, items[0], items[1], items[2])
        elif kind == codec.RESUME and src == 0 and items[0] == self.generation and self._recovery_done:
            self.resume(items[0])

    def _halt(self) -> None:
        """Stop the current generation at once, before the generation number changes.

        Everything queued or produced from here on belongs to the timeline being rolled
        back; stamped with the new generation it would be taken for new work by peers
        that already moved on, and applied a second time after the replay.
        """
        self.resumed = False
        self._resumed_event.clear()
        if self._loop_task is not None and not self._loop_task.done():
            self._loop_task.cancel()  # it stops at its next await; recover() waits for it
        if self.dispatcher is not None:
            self.dispatcher.cancel_all()  # parked async invocations: the checkpoint has their messages
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._drop_queues()

    def _drop_queues(self) -> None:
        self._inbox.clear()
        self._inbox_bytes = 0
        self._framed_bytes = [0] * self.n_peers
        self._blocked = False
        if self._spill is not None:
            self._spill.clear()
        self._outbox.clear()
        self._out = [_speedups.BatchEncoder() for _ in range(self.n_peers)]
        self._frames = [collections.deque() for _ in range(self.n_peers)]
        self._framed = [0] * self.n_peers
        self._out_replies = [[] for _ in range(self.n_peers)]

    def _start_recovery_task(self, gen: int, n: int) -> None:
        if self._recovery_task is not None and not self._recovery_task.done():
            self._recovery_task.cancel()
        self._recovery_done = False
        self._halt()
        self.generation = gen
        self._recovery_task = asyncio.create_task(self._recover_from(gen, n), name=f"peer {self.peer_id} recovery")

    async def _recover_from(self, gen: int, n: int) -> None:
        from .snapshot.format import Manifest, manifest_name

        pause = 0.5
        try:
            while True:
                try:
                    manifest = None
                    if n >= 0:
                        assert self.blobs is not None
                        name = manifest_name(n)
                        manifest = Manifest.from_json(await self.blobs.get(name), name=name)
                    await self.recover(gen, manifest)
                    break
                except BlobStoreError as exc:
                    if isinstance(exc, BlobNotFoundError) or self.generation != gen:
                        raise
                    # the store is unreachable or failing: not the checkpoint's fault, so
                    # do not report it unrestorable; try again while this round stands
                    self._tlog.error("blob store read retries", "peer %d: cannot read checkpoint %d from the blob "
                                     "store in recovery round %d: %s; retrying in %.1f s", self.peer_id, n, gen, exc,
                                     pause)  # fmt: skip
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 10.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("peer %d: cannot restore checkpoint %d in recovery round %d: %s; asking the coordinator "
                      "to fall back to an earlier checkpoint", self.peer_id, n, gen, exc)  # fmt: skip
            self._send(0, codec.encode_control(codec.RESTORE_FAILED, gen, n, str(exc)[:500]), generation=gen)
            return
        if self.generation == gen:
            self._recovery_done = True
            self._send_ready(gen)

    def _send_ready(self, gen: int) -> None:
        """Tell the coordinator this peer restored generation ``gen``. Said again while no
        RESUME comes (see :meth:`_heartbeat_loop`): a READY or a RESUME lost with a link that
        dropped again during the round must not leave the round waiting for ever.

        A heartbeat goes just before it, on the same channel: the coordinator knows which
        process (incarnation) is ready before it counts it, so a later restart of that
        process is a restart to it, never a first contact (a coordinator that restarted
        itself had heard nothing of the others yet)."""
        self._ready_sent = self.clock.now()
        self._send(0, codec.encode_control(codec.HEARTBEAT, self.peer_id, self.liveness.incarnation))
        self._send(0, codec.encode_control(codec.READY, gen), generation=gen)

    def _on_heartbeat(self, src: int, items: list[Any]) -> None:
        if not self.liveness.on_heartbeat(src, items):
            self.bad_frames += 1
            self._tlog.error("bad heartbeats", "peer %d: heartbeat on peer %d's channel claims to be from peer %s",
                             self.peer_id, src, items[0])

    def _on_incarnation(self, src: int, restarted: bool) -> None:
        """Peer ``src`` was heard with a new incarnation (``restarted``: not first contact)."""
        if restarted:
            # what the old process had not granted back is gone with it; on first
            # contact, by contrast, what was already sent is owed by this very process
            self._credit[src] = self.config.credit_window
            self._owed[src] = 0
            self._reset_sent(src)
            log.warning("peer %d: peer %d restarted", self.peer_id, src)
            if self.coordinator is not None:
                self.coordinator.request_recovery(f"peer {src} restarted")
        if len(self._out[src]) or self._frames[src]:
            self._flush_peer(src)

    def _link_reset(self, p: int) -> None:
        """The connection to peer ``p`` was lost and made again while ``p`` kept running
        (a partition longer than TCP retransmits, a peer that moved): what was in flight on
        it may be lost, batches and credits alike. Only a recovery round makes that good."""
        if not self.checkpointing:
            log.error("peer %d: the connection to peer %d was lost and made again; messages in flight on it may "
                      "be lost (checkpoints are off, so nothing recovers them)", self.peer_id, p)  # fmt: skip
            return
        log.warning("peer %d: the connection to peer %d was lost and made again while it kept running; frames in "
                    "flight on it may be lost: recovering from the last checkpoint", self.peer_id, p)  # fmt: skip
        if self.coordinator is not None:
            self.coordinator.request_recovery(f"peer {self.peer_id}'s connection to peer {p} was lost")
        else:
            # A new incarnation, announced by the next heartbeat, makes the coordinator
            # start a recovery round, as for a restart.
            self.liveness.renew()

    def flush_logs(self) -> None:
        """Write the summaries of throttled log lines whose window closed (this peer's, its
        dispatcher's and its client endpoint's)."""
        self._tlog.flush()
        if self.dispatcher is not None:
            self.dispatcher.tlog.flush()
        tlog = getattr(self.client_server, "tlog", None)
        if tlog is not None:
            tlog.flush()
        tlog = getattr(self.transport, "tlog", None)
        if tlog is not None:
            tlog.flush()

    def _maybe_trim(self) -> None:
        """After a busy spell, once idle: give the freed heap back to the system."""
        if self.batches - self._trimmed_at >= 100 and self.is_idle():
            self._trimmed_at = self.batches
            malloc_trim()

    def _queued_for(self, p: int) -> int:
        """Messages waiting to go to peer ``p``."""
        return len(self._out[p]) + self._framed[p]

    def _check_space(self) -> None:
        if not self._full():
            self._space.set()

    def _heartbeat_tick(self, now: float) -> None:
        """After each round of heartbeats (liveness.py): repeat READY if need be, flush logs, trim."""
        cfg = self.config
        if self.transport is not None and hasattr(self.transport, "flush_logs"):
            self.transport.flush_logs()
        if (self._recovery_done and not self.resumed and self.coordinator is None and not self._closing
                and now - self._ready_sent >= max(cfg.heartbeat_timeout, 4 * cfg.heartbeat_interval)):
            # restored, READY sent, and still no RESUME: the coordinator answers a repeated
            # READY of a round it finished with the RESUME this peer missed
            self._send_ready(self.generation)
        self.flush_logs()
        self._maybe_trim()

    # -- the loop -------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    def _timer_due(self, now_ms: int) -> bool:
        return self._next_due is not None and self._next_due <= now_ms and not self._timers_held

    def _timer_deadline(self) -> float | None:
        """When the loop's wait must end for the next timer: never while timers are held (after
        a recovery, until every peer's REPLAYED marker came): an overdue timer's deadline is
        already past, the wait would return at once and the loop spin without yielding, so
        the marker that releases the timers could never be read (found by the soak test)."""
        return None if self._next_due is None or self._timers_held else self._next_due / 1000

    async def _loop(self) -> None:
        assert self.backend is not None and self.dispatcher is not None
        inbox = self._inbox
        backend = self.backend
        dispatcher = self.dispatcher
        max_batch = self.config.max_batch
        backoff = 0.05
        internal_failures = 0  # consecutive batches that failed with an internal error
        while True:
            participant = self.participant
            if participant is not None and participant.pending is not None and self._foreign_log is None:
                participant.take_snapshot()  # a barrier waited for the batch boundary
            if self._spill is not None and self._spill.count:
                self._refill()
            if self._replay_pos is not None and self._out_bytes() < self._out_cap:
                self._replay_some()
            if self._outbox.count:
                self._route_outbox()
            now_ms = self._now_ms()
            out_bytes = self._out_bytes() if self.transport is not None else 0
            if out_bytes >= self._out_cap and (inbox or self._timer_due(now_ms)):
                # Outgoing buffers are full: wait for credit before producing more. Safe,
                # because a peer that waits grants credit for all it receives (spilling
                # what does not fit in memory), so credit never waits on processing.
                if not self._blocked:
                    self.credit_waits += 1
                self._blocked = True
                self._flush_all()
                self._grant_credits()
                if self._closing:
                    return
                await self.clock.wait(self._wake, self._timer_deadline())
                self._wake.clear()
                continue
            self._blocked = False
            if (self._timers_held and not inbox and len(self._replayed_from) >= self.n_peers - 1
                    and not dispatcher.parked and self._replay_pos is None):  # fmt: skip
                self._timers_held = False  # every replayed message is processed: timers may fire
            if not inbox and not self._timer_due(now_ms) and not dispatcher.ready:
                self._flush_all()
                self._grant_credits()
                if not dispatcher.parked:  # else a parked async invocation is still to commit
                    if self._closing:
                        return
                    if self._replay_pos is None and not self._outbox.count:  # else still routing
                        self._idle.set()
                await self.clock.wait(self._wake, self._timer_deadline())
                self._wake.clear()
                continue
            self._idle.clear()
            n = min(len(inbox), max_batch)
            batch = [inbox.popleft() for _ in range(n)]
            batch_bytes = records_bytes(batch)
            self._inbox_bytes = self._inbox_bytes - batch_bytes if inbox else 0
            fired: list[Any] = []
            timers_checked = self._timer_due(now_ms)
            if timers_checked:
                fired = backend.due_timers(now_ms, max(max_batch - n, 1))
            self._in_batch = True
            self._outbox.begin()
            try:
                # what the batch sends may fill the outgoing buffers' room, no more (one
                # address's invocations may overshoot it: they are never split)
                outcome = await dispatcher.run(batch, fired, now_ms, max(self._out_cap - out_bytes, 0))
                backend.commit(outcome.ops)
            except StateBackendError as exc:
                dispatcher.rollback()
                inbox.extendleft(reversed(batch))
                self._inbox_bytes += batch_bytes
                self._tlog.error("failed batch writes", "peer %d could not write a batch of %d messages: %s; "
                                 "retrying in %.2f s", self.peer_id, len(batch), exc, backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception as exc:
                dispatcher.rollback()
                inbox.extendleft(reversed(batch))
                self._inbox_bytes += batch_bytes
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
                self._tlog.log(logging.ERROR, "internal batch errors", "peer %d: internal error in a batch of %d "
                               "messages (attempt %d of %d); retrying in %.2f s", self.peer_id, len(batch),
                               internal_failures, INTERNAL_BATCH_ATTEMPTS, backoff, exc_info=True)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self._in_batch = False
            backoff = 0.05
            internal_failures = 0
            self.batches += 1
            self.batch_records += n
            self.batch_sizes[bisect.bisect_left(BATCH_BUCKETS, n)] += 1
            self._dirty = True
            if self.config.sync_interval == 0:
                backend.flush()
            if timers_checked or outcome.cancels:
                # a fired or cancelled timer may have been the earliest: without this the
                # loop would take a removed timer for due and spin on empty batches
                self._next_due = backend.next_timer_due()
            if outcome.deferred:
                inbox.extendleft(reversed(outcome.deferred))
                self._inbox_bytes += records_bytes(outcome.deferred)
            if outcome.requeue:  # they waited behind a parked address this batch committed
                inbox.extendleft(reversed(outcome.requeue))
                self._inbox_bytes += records_bytes(outcome.requeue)
            self._after_commit(outcome)
            if now_ms >= self._next_purge:
                # expired idempotency keys, a slice at a time between batches
                self._next_purge = now_ms + 1000
                try:
                    self._purge_from = backend.purge_dedup(now_ms, self._purge_from, 5000)
                except StateBackendError as exc:  # e.g. a full disk: purging waits, processing goes on
                    self._tlog.warning("failed purges", "peer %d: could not purge expired idempotency keys: %s",
                                       self.peer_id, exc)
            self._flush_all()
            self._grant_credits()
            self._check_space()
            # Let clients, receivers and other tasks run between batches.
            await asyncio.sleep(0)

    def _after_commit(self, out: BatchOutcome) -> None:
        if out.min_due is not None and (self._next_due is None or out.min_due < self._next_due):
            self._next_due = out.min_due
        try:
            queued = self._outbox.commit(out.sends)  # staged, or queued behind what waits there
        except StatefunMeshError as exc:  # a full disk: route it all now, in order (never lost)
            self._tlog.error("failed outbox writes", "peer %d: cannot queue a batch's sends in the outbox: %s; "
                             "routing them at once", self.peer_id, exc)  # fmt: skip
            for piece in self._outbox.abandon(out.sends):
                self._route(piece)
            queued, out.sends = False, []
        if queued:
            self._route_outbox()
        elif out.sends:
            self._route(out.sends)
        if self._outbox.error is not None:
            self._tlog.error("failed outbox writes", "peer %d: cannot write sends to the outbox: %s; keeping them "
                             "in memory", self.peer_id, self._outbox.error)  # fmt: skip
            self._outbox.error = None
        for reply in out.replies:
            if reply[0] == self.peer_id or self.n_peers == 1:
                self._resolve(*reply[1:])
            elif 0 <= reply[0] < self.n_peers:
                self._out_replies[reply[0]].append(list(reply[1:]))
            else:
                self.bad_frames += 1
                self._tlog.error("bad reply addresses", "peer %d: dropped a reply for peer %d, which is not in this "
                                 "mesh of %d peers", self.peer_id, reply[0], self.n_peers)  # fmt: skip
        if out.egress:
            self.egress_logs.committed(out.egress)

    def _route_outbox(self) -> None:
        """Route committed sends from the outbox while outgoing buffers and the inbox have room."""
        outbox = self._outbox
        while outbox.count and self._out_bytes() < self._out_cap and self._inbox_bytes < self._inbox_cap:
            self._route(outbox.pop())

    def _resolve(self, rid: int, status: int, kind: str, value: Any, r_type: str, r_id: str) -> None:
        self.requests.resolve(rid, status, kind, value, r_type, r_id)

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync_interval)
            if self.transport is None:
                self.flush_logs()  # no heartbeat loop to do it
                self._maybe_trim()
            backend = self.backend
            if self._dirty and backend is not None:
                self._dirty = False
                # fsync off the loop; aclose() and recovery wait for it before closing the store.
                self._flush = asyncio.ensure_future(asyncio.to_thread(backend.flush))
                try:
                    await asyncio.shield(self._flush)
                except Exception as exc:  # keep syncing: one failed fsync must not end the loop
                    self._dirty = True
                    self._tlog.error("failed syncs", "peer %d: syncing the state store to disk failed: %s; retrying "
                                     "in %s s", self.peer_id, exc, self.config.sync_interval)  # fmt: skip


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
_GEN = struct.Struct(">I")
#: ingress log entries replayed at a time after a recovery (while outgoing buffers have room)
_REPLAY_SLICE = 100


#: frames only the coordinator (peer 0) sends
_COORDINATOR_KINDS = frozenset({codec.CK_DONE, codec.CK_ABORT, codec.RECOVER, codec.RESUME})
#: a frame whose generation is more than this above the newest the peer knows is refused
GENERATION_WINDOW = 16
#: a batch failing this many times in a row with an internal error (not a state store or
#: function error) stops the dispatch loop, which /healthz reports (about 1.5 s of retries)
INTERNAL_BATCH_ATTEMPTS = 5
