"""Peer: wires config, transport, routing, state, dispatch, timers and egress; one loop, one core.

The one place that wires a peer's parts (docs/architecture.md §2a). It owns the peer's
lifecycle (start, close, abort), what a restore does to the peer (halt the generation,
stop the loop, restore, resume), the state store's opening, and the public API (client
sends and requests, egress reads, status). Everything else is a part it builds and hands
only what that part needs:
:class:`~statefun_mesh.batchloop.BatchLoop` (one batch at a time: take input, dispatch,
commit, route, answer),
:class:`~statefun_mesh.routing.Router` (the inbox and spill, outgoing frames, credit),
:class:`~statefun_mesh.admission.Admission` (the gate clients wait at),
:class:`~statefun_mesh.inbound.Inbound` (frames from other peers),
:class:`~statefun_mesh.replay.Replay` (the replay after a recovery),
:class:`~statefun_mesh.recovery.Recovery` (this peer's side of a recovery round),
:class:`~statefun_mesh.egress.EgressLogs` (egress readers),
:class:`~statefun_mesh.liveness.Liveness` (heartbeats),
:class:`~statefun_mesh.checkpoint_host.PeerCheckpointHost` (what the snapshot participant
is handed), the ingress writer, the pending requests, the dispatcher and the state store.
``peer_status.py`` builds :meth:`Peer.status`. The coordinator sees the peer through
``snapshot/host.py``'s ``RecoveryHost``; the client endpoint through ``client_host.ClientHost``.

Why this module is still above ~500 lines (about 1,100): what is left is the wiring
(``__init__``, ~170 lines), the lifecycle (``start``/``aclose``/``abort``, ~180: they
build the participant, coordinator and servers from the peer and close every part in
order, so moving them out would hand a module the whole peer), restore and resume (they
touch the loop task, the generation and every part), and the public API, whose methods
are mostly one-line calls into a part but carry the docstrings users read. Each piece
left is either a step only the wiring place can take or the API surface itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _speedups
from .admission import Admission
from .batchloop import BatchLoop
from .checkpoint_host import PeerCheckpointHost
from .client_host import check_request_timeout
from .clock import Clock, SystemClock
from .config import MeshConfig
from .dispatch import Dispatcher, Record, TypeStats
from .egress import EgressLogs
from .errors import (
    BrokenTransportError,
    ClosedTransportError,
    ConfigError,
    FunctionNotFoundError,
    RequestTimeoutError,
)
from .functions import StatefulFunctions, merge_functions
from .inbound import Inbound
from .ingress_writer import IngressWriter
from .liveness import Liveness
from .logutil import ThrottledLog, format_seconds
from .memory import malloc_trim
from .messages import EgressRecord, Message
from .peer_status import peer_status, state_bytes
from .recovery import Recovery
from .replay import Replay
from .replies import Answer, PendingRequests
from .routing import Router
from .state.lmdb_backend import CACHE_SHARE, LmdbStateBackend, discard_store
from .transport import codec
from .transport.base import Transport
from .transport.factory import open_transport

if TYPE_CHECKING:
    from .blobstore.base import BlobStore
    from .connectors.kafka import KafkaIngress
    from .connectors.kafka_egress import KafkaEgress
    from .ingress import IngressLog
    from .metrics import HttpServer
    from .remote.invoker import RemoteFunctions
    from .server import ClientServer
    from .snapshot.coordinator import Coordinator
    from .snapshot.format import Manifest
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
        self.remote: RemoteFunctions | None = None
        if config.module:
            from .remote.invoker import RemoteFunctions
            from .remote.module_yaml import load_module_yaml

            self.remote = RemoteFunctions(load_module_yaml(config.module))
            local = [ep.pattern for ep in self.remote.module.endpoints if ep.name and ep.pattern in self.table]
            if local:
                raise ConfigError(f"{', '.join(local)} bound both locally and in the module file", key="module")
        #: the Kafka ingresses of the module file, read by this peer (connectors/kafka.py)
        self.kafka: KafkaIngress | None = None
        #: the Kafka egresses of the module file, produced by this peer (connectors/kafka_egress.py)
        self.kafka_egress: KafkaEgress | None = None
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
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        # memory_budget (docs/architecture.md §5): the inbox keeps up to half in memory and
        # spills the rest; the loop takes no batch while outgoing bytes exceed a quarter;
        # clients are admitted while inbox plus outgoing stay under a quarter (routing.py);
        # frames of later generations are held up to a quarter (inbound.py)
        self._trimmed_at = 0
        #: repeated problems (bad frames, a failing disk) log one line per kind and window
        self._tlog = ThrottledLog(log)
        #: the inbox and spill, outgoing frames per peer, and credit (routing.py)
        self.router = Router(
            peer_id,
            n,
            config,
            self._tlog,
            self.transport,
            self.state_path + ".spill",
            self.state_path + ".outbox",
            wake=self._wake,
            idle=self._idle,
            generation=lambda: self.generation,
            output_held=lambda: not self.resumed and self.checkpointing,
            parked_queued=lambda: self.dispatcher.queued if self.dispatcher is not None else 0,
            on_sent=lambda: self.admission.check_space(),
        )
        #: heartbeats, reachability, restarts and lost links (liveness.py)
        self.liveness = Liveness(
            peer_id,
            n,
            config,
            self.clock,
            send=lambda p, f: self.router.send(p, f),
            queued_for=self.router.queued_for,
            on_incarnation=self._on_incarnation,
            on_link_reset=self._link_reset,
            on_tick=self._heartbeat_tick,
        )
        self._closed_event = asyncio.Event()
        #: requests waiting for their replies (replies.py)
        self.requests = PendingRequests(peer_id, config.max_pending_requests, self.table)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        #: set when the dispatch loop died (see :meth:`dispatch_failure`): ``statefun-mesh peer``
        #: then exits with status 1, so that its supervisor restarts it and the mesh recovers
        self.dispatch_died = asyncio.Event()
        self._started = False
        self._flush: asyncio.Future[None] | None = None
        self.client_server: ClientServer | None = None
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
        #: released heads, readers and their wake-ups (egress.py)
        self.egress_logs = EgressLogs(
            peer_id,
            bool(config.blob_store),
            config.egress_immediate,
            store=lambda: self.backend,
            generation=lambda: self.generation,
            closing=lambda: self._closing,
        )
        #: group commit of client messages into the ingress log (ingress_writer.py)
        self.ingress_writer = IngressWriter(
            peer_id,
            lambda: self.ingress,
            lambda: self.generation,
            lambda: self.resumed and self.replay.position is None,
            lambda recs: self.router.route(recs, from_client=True),
            lambda: self.admission.check_space(),
            self._tlog,
        )
        #: the gate clients wait at, and taking their messages in (admission.py)
        self.admission = Admission(
            config,
            self.router,
            self.ingress_writer,
            pressure=self.pressure,
            replaying=lambda: self.replay.position is not None,
            logged=lambda: self.ingress is not None,
            resumed=lambda: self.resumed,
            closing=lambda: self._closing,
            resumed_event=self._resumed_event,
        )
        self._unwatch: Callable[[], None] | None = None  # stops the blocked-loop watchdog (watchdog.py)
        # Counters for metrics (metrics.py) and status. Monotonic for the process's life
        # (a recovery does not reset them); updated per routed batch of records, not per record.
        #: per function type: invocations, failures, latency (kept across restores)
        self.function_stats: dict[str, TypeStats] = {}
        self.recoveries = 0  #: recovery rounds this peer restored state in
        self._restored_once = False
        self._resumed_once = False  # /readyz: "starting" until then, "recovering" after
        self.http: HttpServer | None = None  #: the metrics/health/dashboard HTTP server (metrics.py), if configured
        #: the replay of the ingress log after a recovery, and the timers held meanwhile (replay.py)
        self.replay = Replay(
            peer_id,
            n,
            self.router,
            self.ingress_writer,
            ingress=lambda: self.ingress,
            generation=lambda: self.generation,
            take_foreign=self._take_foreign_ingress,
            foreign_replayed=self._foreign_ingress_replayed,
            on_done=lambda: self.admission.check_space(),
        )
        #: this peer's side of a recovery round: restore, READY, RESUME (recovery.py)
        self.recovery = Recovery(
            peer_id,
            config,
            self.clock,
            self._tlog,
            send=lambda p, f, g: self.router.send(p, f, g),
            incarnation=lambda: self.liveness.incarnation,
            blobs=lambda: self.blobs,
            generation=lambda: self.generation,
            begin=self._begin_generation,
            restore=self.recover,
            resume=self.resume,
        )
        #: frames from other peers: checked, held for later, or handed on (inbound.py)
        self.inbound = Inbound(
            peer_id,
            self._tlog,
            config.memory_budget // 4,
            self.checkpointing,
            self.router,
            self.liveness,
            self.requests,
            wake=self._wake,
            generation=lambda: self.generation,
            resumed=lambda: self.resumed,
            replaying=lambda: self.replay.position is not None,
            coordinator_generation=lambda: self.coordinator.generation if self.coordinator is not None else None,
            on_records=self._cut_records,
            on_control=self._on_control,
        )
        #: one batch at a time: take input, dispatch, commit, route, answer (batchloop.py)
        self.batch_loop = BatchLoop(
            peer_id,
            n,
            config,
            self.clock,
            self._tlog,
            self.router,
            self.replay,
            self.admission,
            self.requests,
            self.egress_logs,
            self.inbound,
            wake=self._wake,
            idle=self._idle,
            networked=self.transport is not None,
            closing=lambda: self._closing,
            participant=lambda: self.participant,
        )
        #: the peer as the snapshot participant sees it (checkpoint_host.py)
        self.checkpoint_host = PeerCheckpointHost(
            peer_id,
            n,
            config,
            self.key_group_range,
            self._tlog,
            self.router,
            self.inbound,
            self.replay,
            self.batch_loop,
            self.egress_logs,
            self.ingress_writer,
            wake=self._wake,
            store=lambda: self.backend,
            dispatcher=lambda: self.dispatcher,
            reopen_store=self._reopen_state_store,
            coordinator=lambda: self.coordinator,
            ingress=lambda: self.ingress,
            kafka=self.kafka,
        )

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

    def _open_backend(self, backend: LmdbStateBackend | None = None) -> LmdbStateBackend:
        cfg = self.config
        if backend is None:
            backend = LmdbStateBackend(
                self.state_path,
                map_size=cfg.map_size,
                max_map_size=cfg.max_map_size,
                # with checkpoints only: the live store after the last cut is never what a recovery uses
                cache_bytes=cfg.memory_budget // CACHE_SHARE if self.checkpointing else 0,
            )
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
        self.dispatcher.outbox = self.router.outbox
        self.batch_loop.next_due = backend.next_timer_due()
        return backend

    def _reopen_state_store(self, keep: bool) -> LmdbStateBackend:
        """Close and delete the state store and open an empty one (a restore starts);
        ``keep``: keep the open store (it is rolled back in place), with a new dispatcher.
        Either way the write-back cache is discarded first: it holds writes after the cut
        being restored (not written into a store about to be deleted either)."""
        if self.backend is not None:
            self.backend.discard_cache()
        if keep and self.backend is not None:
            return self._open_backend(self.backend)
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        discard_store(self.state_path)  # renamed aside now, deleted in the background
        return self._open_backend()

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
                self.participant = Participant(self.checkpoint_host, self.blobs)
            else:
                self._open_backend()
            if self.transport is not None:
                if hasattr(self.transport, "on_link_lost"):
                    self.transport.on_link_lost = self.liveness.on_link_lost
                await self.transport.start(self.inbound.on_frame)
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
            self.peer_id,
            self.n_peers,
            self.state_path,
            len(self.table),
            _speedups.IMPLEMENTATION,
            f"every {cfg.checkpoint_interval} s to {cfg.blob_store}" if self.checkpointing else "off",
        )
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
            self.router.flush_all()
            if self.participant is not None:
                self.participant.reset()
                await self.participant.settled()
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
            self.admission.space.set()
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
        tasks = [
            t for t in (self._loop_task, self.ingress_writer.task, self.recovery.task, *self._tasks) if t is not None
        ]
        try:
            if self.coordinator is not None:
                await self.coordinator.aclose(grace=0)
            if self.participant is not None:
                self.participant.reset()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.participant is not None:
                await self.participant.settled()
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
        self.router.close()
        self.replay.close()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.ingress is not None:
            self.ingress.close()
            self.ingress = None
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
        self.router.drop_queues()  # again: requests may have queued output while the loop stopped
        self.router.reset_credit()
        self.inbound.drop_before(gen)
        self.batch_loop.in_batch = False
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
        self.router.route(self.participant.take_inflight_restored())
        self.replay.start(self.participant.ingress_position if self.ingress is not None else None)

    def _take_foreign_ingress(self) -> list[tuple[str, int]]:
        """After a rescale: the removed peers' ingress logs this peer replays (replay.py)."""
        assert self.participant is not None
        return self.participant.take_foreign_ingress()

    def _foreign_ingress_replayed(self, path: str) -> None:
        assert self.participant is not None
        self.participant.note_replayed_foreign(path)

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
                self._tlog.error(
                    "dispatch loop not stopping",
                    "peer %d: recovery round %d: the dispatch loop has "
                    "not stopped %.0f s after it was cancelled; still waiting (it is at: %s)",
                    self.peer_id,
                    gen,
                    waited,
                    " <- ".join(repr(f) for f in task.get_stack(limit=3)),
                )
                task.cancel()

    def resume(self, gen: int) -> None:
        """Start processing in generation ``gen`` (what :meth:`recover` queued first)."""
        if self.generation != gen or self._closing:
            return
        if self._loop_task is not None and not self._loop_task.done():
            return
        assert self.backend is not None
        self.batch_loop.next_due = self.backend.next_timer_due()
        self.replay.timers_held = self.checkpointing
        self._loop_task = asyncio.create_task(
            self.batch_loop.run(self.backend, self.dispatcher), name=f"statefun-mesh peer {self.peer_id} dispatch"
        )
        self._loop_task.add_done_callback(self._loop_ended)
        self.resumed = True
        self._resumed_once = True
        self.inbound.resume(gen)
        self._resumed_event.set()
        self._wake.set()
        self.router.flush_all()
        log.debug("peer %d processing (generation %d)", self.peer_id, gen)  # `ready` (or a recovery round) says it

    def dispatch_failure(self) -> BaseException | None:
        """Why the dispatch loop died (``None``: it runs, was stopped, or has not started)."""
        task = self._loop_task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical(
                "peer %d: the dispatch loop died; this peer processes nothing more: restart it",
                self.peer_id,
                exc_info=task.exception(),
            )
            self.dispatch_died.set()

    # -- the coordinator's view of this peer (snapshot/host.py RecoveryHost) --------------

    @property
    def tlog(self) -> ThrottledLog:
        """This peer's throttled log (flushed from its heartbeat loop)."""
        return self._tlog

    def send_control(self, p: int, frame: bytes, generation: int | None = None) -> None:
        """Send a control frame to peer ``p`` (stamped with ``generation``, default this peer's)."""
        self.router.send(p, frame, generation)

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

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._started

    @property
    def resumed_once(self) -> bool:
        """Whether the peer has processed in some generation (``/readyz``: "starting" until then)."""
        return self._resumed_once

    @property
    def batches(self) -> int:
        """Batches processed (for metrics and status)."""
        return self.batch_loop.batches

    @property
    def batch_records(self) -> int:
        """Messages in all batches."""
        return self.batch_loop.batch_records

    @property
    def batch_sizes(self) -> list[int]:
        """Batches per size bucket (``dispatch.BATCH_BUCKETS``; the last: larger)."""
        return self.batch_loop.batch_sizes

    @property
    def dispatch_task(self) -> asyncio.Task[None] | None:
        """The running (or ended) dispatch loop of the current generation, ``None`` between them."""
        return self._loop_task

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
            self.router.queued()
            + self.ingress_writer.queued
            + (self.dispatcher.queued if self.dispatcher is not None else 0)
        )

    def queued_bytes(self) -> int:
        """Estimated memory of the queued messages: the inbox in memory plus what waits to go out."""
        return self.router.inbox_bytes + self.router.out_bytes()

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

    def route_admitted(self, records: list[Record]) -> None:
        """Route messages an ingress admitted itself (its own backpressure through
        :meth:`admits`, checked with :meth:`check_message`), counted as messages in."""
        self.router.route(records, from_client=True)

    def accept_nowait(self, rec: Record, *, durable: bool = True) -> asyncio.Future[None] | None:
        """Take an admitted message in now (it counts in :meth:`pressure` at once).

        Returns ``None`` when the message is routed already, else a future that is done
        once it is in the ingress log (and routed), or fails if it could not be logged.
        """
        return self.admission.accept_nowait(rec, durable=durable)

    def check_message(self, rec: Record, what: str = "message") -> None:
        """Refuse a record larger than the mesh admits (``max_message_bytes``).

        Raises:
            MessageTooLargeError: naming the record's size and the limit.
        """
        self.admission.check_message(rec, what)

    def admits(self) -> bool:
        """Whether :meth:`admit` would return at once."""
        return self.admission.admits()

    async def admit(self) -> None:
        """Wait until this peer admits client messages (running, and under ``inbox_limit``)."""
        await self.admission.admit()

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
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        def answer(reply: Message | None, exc: BaseException | None) -> None:
            if not fut.done():
                if exc is not None:
                    fut.set_exception(exc)
                else:
                    fut.set_result(reply)  # type: ignore[arg-type]

        while True:
            rid = self.request_nowait(typename, id, vt, value, timeout, answer)
            if rid is not None:
                break
            await self.admit()  # raises once the peer closes
        try:
            return await fut
        finally:
            self.requests.close(rid)  # cancelled: stop waiting (a no-op once answered)

    def request_nowait(
        self, typename: str, id: str, vt: str, value: bytes, timeout: float, on_done: Answer
    ) -> int | None:
        """Start a request now, if this peer admits client messages; else return ``None``
        (nothing was started: :meth:`admit`, then call again). ``on_done(reply, error)`` is
        called once, as soon as the request ends (with what :meth:`request` returns or
        raises); its timeout is one timer on the loop, no task. Returns the request id
        (``self.requests.close(rid)`` gives up on it)."""
        self._check(typename)
        check_request_timeout(timeout, self.config.max_request_timeout)
        rid = self.requests.next_id()
        rec = (typename, id, "", "", vt, value, self.peer_id, rid)
        self.check_message(rec)
        if not self.admits():
            return None

        def expired() -> RequestTimeoutError:
            return RequestTimeoutError(
                f"no reply from {typename}/{id} within {format_seconds(timeout)} s; "
                "does the function call context.reply()?"
            )

        self.requests.open(rid, timeout, expired, on_done)
        try:
            self.accept_nowait(rec, durable=False)
        except BaseException:
            self.requests.close(rid)
            raise
        return rid

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
            if (
                self.router.inbox
                or self.router.spilled()
                or self.batch_loop.timer_due(self.batch_loop.now_ms())
                or self.replay.position is not None
                or self.router.outbox.count
            ):
                self._idle.clear()
                self._wake.set()
            elif self._idle.is_set() or self._closing:
                return
            await self._idle.wait()

    def is_idle(self) -> bool:
        """Whether nothing is queued here, nothing waits to be sent, and the loop is waiting."""
        return (
            not self.router.inbox
            and not self.router.spilled()
            and self.replay.position is None
            and not self.router.outbox.count
            and self._idle.is_set()
            and not self.router.has_outgoing()
            and not self.batch_loop.timer_due(self.batch_loop.now_ms())
        )

    def status(self) -> dict[str, Any]:
        """Counters for monitoring and the ``status`` command (peer_status.py)."""
        return peer_status(self)

    def state_bytes(self) -> int | None:
        """Bytes of the state store's file in use (pages up to the last one written)."""
        return state_bytes(self.backend)

    # -- frames from other peers (inbound.py checks them and hands these on) ----------

    @property
    def bad_frames(self) -> int:
        """Frames dropped as malformed: from peers, and (counted in by it) the client endpoint."""
        return self.inbound.bad_frames

    @bad_frames.setter
    def bad_frames(self, n: int) -> None:
        self.inbound.bad_frames = n

    def _cut_records(self, src: int, records: list[Record]) -> None:
        """Batch records arrived from ``src``: a cut under way logs those in flight across it."""
        participant = self.participant
        if participant is not None and participant.snap is not None:
            participant.on_records(src, records)

    def _on_control(self, src: int, kind: int, items: list[Any], gen: int | None) -> None:
        """A checkpoint or recovery frame from peer ``src`` (``gen``: its generation, if stamped)."""
        if self.participant is None:
            self.bad_frames += 1
            self._tlog.error(
                "unexpected checkpoint frames",
                "peer %d: checkpoint frame 0x%02x from peer %d, but this "
                "peer takes no checkpoints; do all peers have the same blob_store setting?",
                self.peer_id,
                kind,
                src,
            )
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
            if src == 0:
                self.recovery.on_recover(gen, items[1])
        elif kind == codec.READY:
            if self.coordinator is not None:
                self.coordinator.on_ready(src, items[0])
        elif kind == codec.REPLAYED:
            if self.replay.on_marker(src, items[0]):
                self._wake.set()
        elif kind == codec.RESTORE_FAILED:
            if self.coordinator is not None:
                self.coordinator.on_restore_failed(src, items[0], items[1], items[2])
        elif kind == codec.RESUME and src == 0:
            self.recovery.on_resume(items[0])

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
        self.router.cancel_flush()
        self.router.drop_queues()

    def _begin_generation(self, gen: int) -> None:
        """A recovery round to generation ``gen`` starts (recovery.py): halt, then take the number."""
        self._halt()
        self.generation = gen

    def _on_incarnation(self, src: int, restarted: bool) -> None:
        """Peer ``src`` was heard with a new incarnation (``restarted``: not first contact)."""
        if restarted:
            # what the old process had not granted back is gone with it; on first
            # contact, by contrast, what was already sent is owed by this very process
            self.router.peer_restarted(src)
            log.warning("peer %d: peer %d restarted", self.peer_id, src)
            if self.coordinator is not None:
                self.coordinator.request_recovery(f"peer {src} restarted")
        self.router.flush_if_queued(src)

    def _link_reset(self, p: int) -> None:
        """The connection to peer ``p`` was lost and made again while ``p`` kept running
        (a partition longer than TCP retransmits, a peer that moved): what was in flight on
        it may be lost, batches and credits alike. Only a recovery round makes that good."""
        if not self.checkpointing:
            log.error(
                "peer %d: the connection to peer %d was lost and made again; messages in flight on it may "
                "be lost (checkpoints are off, so nothing recovers them)",
                self.peer_id,
                p,
            )
            return
        log.warning(
            "peer %d: the connection to peer %d was lost and made again while it kept running; frames in "
            "flight on it may be lost: recovering from the last checkpoint",
            self.peer_id,
            p,
        )
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
        if self.batch_loop.batches - self._trimmed_at >= 100 and self.is_idle():
            self._trimmed_at = self.batch_loop.batches
            malloc_trim()

    def _heartbeat_tick(self, now: float) -> None:
        """After each round of heartbeats (liveness.py): repeat READY if need be, flush logs, trim."""
        if self.transport is not None and hasattr(self.transport, "flush_logs"):
            self.transport.flush_logs()
        self.recovery.tick(now, not self.resumed and self.coordinator is None and not self._closing)
        self.flush_logs()
        self._maybe_trim()

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync_interval)
            if self.transport is None:
                self.flush_logs()  # no heartbeat loop to do it
                self._maybe_trim()
            backend = self.backend
            # with checkpoints a restarted peer rebuilds its store from the checkpoint's
            # objects, never from the live store: an fsync of it buys nothing (architecture.md §6)
            if self.batch_loop.dirty and backend is not None and not self.checkpointing:
                self.batch_loop.dirty = False
                # fsync off the loop; aclose() and recovery wait for it before closing the store.
                self._flush = asyncio.ensure_future(asyncio.to_thread(backend.flush))
                try:
                    await asyncio.shield(self._flush)
                except Exception as exc:  # keep syncing: one failed fsync must not end the loop
                    self.batch_loop.dirty = True
                    self._tlog.error(
                        "failed syncs",
                        "peer %d: syncing the state store to disk failed: %s; retrying in %s s",
                        self.peer_id,
                        exc,
                        self.config.sync_interval,
                    )
