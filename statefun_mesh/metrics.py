"""A peer's HTTP server: Prometheus metrics, health, readiness and the web dashboard.

Served from the peer's own event loop (aiohttp.web), on ``config.metrics_endpoints``.
The metrics are read from the peer's counters when Prometheus scrapes (a custom
collector), so the hot path only bumps plain integers, once per batch or routed group
of messages, never a library metric object per message. See docs/operations.md for the
list of metrics and what each means.

Paths:
    ``/metrics``: Prometheus text format.
    ``/healthz``: 200 while the process and its dispatch loop are alive (liveness).
    ``/readyz``: 200 once the peer has recovered and is processing (its generation has
        resumed); 503 while starting, recovering or stopping (readiness).
    ``/api/status``: this peer's status as JSON (as in ``statefun-mesh status --json``).
    ``/`` and ``/api/mesh`` (with ``dashboard``): the dashboard page, and every peer's
        status gathered through the peers' client endpoints, which the page polls.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .config import parse_http_endpoint
from .errors import ConfigError, StatefunMeshError, TransportError

if TYPE_CHECKING:
    from .peer import Peer

__all__ = ["HttpServer", "PeerCollector"]

log = logging.getLogger("statefun_mesh.metrics")

PREFIX = "statefun_mesh_"
#: /api/mesh answers from a sample at most this old (several dashboards share one sample)
MESH_SAMPLE_TTL = 0.5


def _import_deps() -> Any:
    try:
        from aiohttp import web
        from prometheus_client import core
    except ImportError as exc:  # pragma: no cover - both are dependencies of the package
        raise ConfigError(
            f"serving metrics needs aiohttp and prometheus-client ({exc}), dependencies of statefun-mesh: "
            "reinstall it, or drop metrics_endpoints from the config",
            key="metrics_endpoints",
        ) from None
    return web, core


def _cumulative(bounds: tuple[float | int, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for le, c in zip(bounds, counts, strict=False):
        total += c
        out.append((repr(float(le)) if isinstance(le, float) else str(le), total))
    out.append(("+Inf", total + counts[-1]))
    return out


class PeerCollector:
    """A prometheus_client collector reading one peer's counters at scrape time."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        from . import _speedups
        from .dispatch import BATCH_BUCKETS, LATENCY_BUCKETS

        peer = self.peer
        d = peer.dispatcher
        router = peer.router
        me = peer.peer_id
        others = [str(p) for p in range(peer.n_peers) if p != me]

        def counter(name: str, doc: str, value: float) -> Any:
            return CounterMetricFamily(PREFIX + name, doc, value=value)

        def gauge(name: str, doc: str, value: float) -> Any:
            return GaugeMetricFamily(PREFIX + name, doc, value=value)

        def per_peer(family: Any, values: list[int] | list[float]) -> Any:
            for p in others:
                family.add_metric([p], values[int(p)])
            return family

        yield InfoMetricFamily(
            PREFIX + "peer",
            "This peer: its id, the mesh's size, the hot-path core",
            value={"peer": str(me), "peers": str(peer.n_peers), "core": _speedups.IMPLEMENTATION},
        )
        yield gauge(
            "ready",
            "1 when the peer has recovered and is processing (what /readyz reports)",
            1 if _ready(peer) is None else 0,
        )
        yield gauge("generation", "Recovery generation the peer is in", peer.generation)
        yield counter("recoveries", "Recoveries: restores of this peer's state after its start's own", peer.recoveries)
        yield gauge("last_recovery_seconds", "How long this peer's last restore took", peer.last_recovery_seconds)

        # invocations
        inv = CounterMetricFamily(
            PREFIX + "invocations", "Invocations that returned, per function type", labels=["function_type"]
        )
        fail = CounterMetricFamily(
            PREFIX + "invocation_failures",
            "Invocations that raised (the message went to the dead letters), per function type",
            labels=["function_type"],
        )
        lat = HistogramMetricFamily(
            PREFIX + "invocation_duration_seconds",
            "Time in the function per invocation (a batch's invocations of one address are "
            "timed together and counted with their mean)",
            labels=["function_type"],
        )
        for t, st in sorted(peer.function_stats.items()):
            inv.add_metric([t], st.invocations)
            fail.add_metric([t], st.failures)
            lat.add_metric([t], _cumulative(LATENCY_BUCKETS, st.buckets), st.seconds)
        yield inv
        yield fail
        yield lat
        yield counter(
            "unknown_type_messages", "Messages to a type no function is bound to (dead-lettered)", d.unknown if d else 0
        )
        yield counter(
            "duplicates", "Client messages skipped as duplicates of an idempotency key", d.duplicates if d else 0
        )
        yield counter("dead_letters", "Messages moved to the dead-letter egress", d.dead_letters if d else 0)

        # messages
        yield counter(
            "messages_in", "Messages from clients and ingresses routed into the mesh by this peer", router.messages_in
        )
        yield counter("messages_routed_local", "Messages routed to this peer's own inbox", router.routed_local)
        yield per_peer(
            CounterMetricFamily(
                PREFIX + "messages_routed_remote", "Messages routed to another peer", labels=["to_peer"]
            ),
            router.routed_remote,
        )
        yield counter("messages_received_from_peers", "Messages received from other peers", router.from_peers)
        yield counter(
            "egress_records", "Records appended to egresses (dead letters included)", d.egress_records if d else 0
        )
        yield gauge("inbox_messages", "Messages queued in this peer's inbox", len(router.inbox))
        yield gauge("parked_addresses", "Addresses whose async invocation outlived its batch", d.parked if d else 0)
        yield gauge("parked_queued_messages", "Messages waiting behind parked addresses", d.queued if d else 0)
        yield per_peer(
            GaugeMetricFamily(
                PREFIX + "outgoing_messages", "Messages waiting to be sent to another peer", labels=["to_peer"]
            ),
            router.outgoing(),
        )
        yield per_peer(
            GaugeMetricFamily(
                PREFIX + "credit_messages",
                "Messages this peer may still send another peer before it grants more",
                labels=["to_peer"],
            ),
            router.credit,
        )
        yield per_peer(
            CounterMetricFamily(
                PREFIX + "credit_stalls",
                "Times messages to another peer waited for its credit (backpressure)",
                labels=["to_peer"],
            ),
            router.credit_stalls,
        )
        yield per_peer(
            GaugeMetricFamily(
                PREFIX + "peer_up", "1 while this peer hears another peer's heartbeats", labels=["to_peer"]
            ),
            [1 if a else 0 for a in peer.liveness.alive],
        )
        frames = router.frame_counts()
        yield counter("peer_frames_sent", "Frames sent to other peers (CREDIT frames included)", frames["sent"])
        yield counter("credit_frames", "CREDIT frames sent: grants no other frame could carry", frames["credit_frames"])
        yield counter(
            "credits_carried",
            "Credit grants carried in the envelope of another frame (each a CREDIT frame saved)",
            frames["credits_carried"],
        )
        batches = HistogramMetricFamily(PREFIX + "batch_size_messages", "Messages per batch (one state-store commit)")
        batches.add_metric([], _cumulative(BATCH_BUCKETS, peer.batch_sizes), peer.batch_records)
        yield batches
        state = peer.state_bytes()
        if state is not None:
            yield gauge("state_bytes", "Bytes of the state store in use", state)

        # checkpoints
        part = peer.participant
        if part is not None:
            yield counter("checkpoints", "Checkpoints this peer wrote that completed", part.written)
            yield counter("checkpoint_write_seconds", "Time spent writing completed checkpoints", part.written_seconds)
            yield counter("checkpoint_written_bytes", "Bytes uploaded for completed checkpoints", part.written_bytes)
            failures = peer.checkpoint_host.checkpoint_failures
            yield counter("checkpoint_failures", "Checkpoints this peer could not write", failures)
            if part.completed >= 0:
                yield gauge("checkpoint_last_complete", "Id of the last complete checkpoint", part.completed)
            if part.completed_at is not None:
                yield gauge(
                    "checkpoint_last_complete_timestamp_seconds",
                    "When the last checkpoint completed (Unix time; alert on time() minus this)",
                    part.completed_at,
                )
                yield gauge(
                    "checkpoint_age_seconds",
                    "Seconds since the last checkpoint completed",
                    max(time.time() - part.completed_at, 0.0),
                )
            if part.history:
                yield gauge(
                    "checkpoint_last_duration_seconds",
                    "How long this peer took to write the last checkpoint",
                    part.history[-1][2],
                )
                yield gauge(
                    "checkpoint_last_size_bytes",
                    "Bytes this peer uploaded for the last checkpoint",
                    part.history[-1][3],
                )

        # clients, egress readers, bad input
        cs = peer.client_server
        if cs is not None:
            req = CounterMetricFamily(PREFIX + "client_requests", "Client frames by kind", labels=["kind"])
            for kind, n in cs.requests.items():
                req.add_metric([kind], n)
            yield req
            yield counter("client_errors", "Client frames answered with an error", cs.errors)
            service = HistogramMetricFamily(
                PREFIX + "client_request_service_seconds",
                "Requests answered, by the time from their frame's arrival to the answer's send",
            )
            # bucket i of the endpoint's counts holds [2**(i-1), 2**i) µs; its last, the rest
            bounds = tuple(2**i / 1e6 for i in range(len(cs.service_us) - 1))
            service.add_metric([], _cumulative(bounds, cs.service_us), cs.service_us_sum / 1e6)
            yield service
            yield counter("client_busy_refusals", "Client frames refused because the peer was over its limits", cs.busy)
            yield gauge("client_pending_requests", "Client requests waiting for their reply", cs.pending_requests)
            yield gauge("client_parked_sends", "Client sends waiting for admission", cs.parked_sends)
            yield gauge(
                "client_replies_queued", "Answers held for clients that do not read them fast enough", cs.replies_queued
            )
            yield counter(
                "client_replies_undeliverable", "Answers dropped because their client was gone", cs.undeliverable
            )
            yield counter(
                "client_frames_refused_unread",
                "Client frames not acted on while their client did not read its answers",
                cs.refused_unread,
            )
            lag = GaugeMetricFamily(
                PREFIX + "egress_reader_lag_records",
                "Released records a recent egress reader (a client connection) has not fetched",
                labels=["reader", "egress"],
            )
            for reader, egress, behind in cs.reader_lags():
                lag.add_metric([reader, egress], behind)
            yield lag
        bad = CounterMetricFamily(
            PREFIX + "bad_frames", "Frames dropped as malformed or refused, by their source", labels=["source"]
        )
        client_bad = cs.bad_frames if cs is not None else 0
        bad.add_metric(["peers"], peer.bad_frames - client_bad)
        bad.add_metric(["clients"], client_bad)
        bad.add_metric(["foreign"], getattr(peer.transport, "foreign_frames", 0))
        yield bad
        yield counter("oversized_dropped", "Messages dropped because no frame can hold them", router.oversized_dropped)
        # CURVE (docs/security.md): what the links and client endpoints refused
        yield counter(
            "refused_frames", "Peer frames refused for what their link may not send", peer.inbound.refused_frames
        )
        yield counter(
            "refused_connections",
            "Peer-link connections refused (unknown key, no CURVE)",
            getattr(peer.transport, "refused_connections", 0),
        )
        if cs is not None:
            yield counter(
                "client_refused_connections",
                "Client connections refused for a key not admitted",
                getattr(cs, "refused_clients", 0),
            )


def _ready(peer: Peer) -> str | None:
    """None when the peer is ready; else why not."""
    if peer.closing:
        return "stopping"
    if not peer.started:
        return "not started"
    task = peer.dispatch_task
    if not peer.resumed or task is None:
        if not peer.resumed_once:
            return "starting: waiting for every peer to restore the last checkpoint"
        return f"recovering (generation {peer.generation})"
    if task.done():
        return "the dispatch loop ended"
    return None


def _alive(peer: Peer) -> str | None:
    failure = peer.dispatch_failure()
    return None if failure is None else f"the dispatch loop died: {failure!r}"


def peer_status(peer: Peer) -> dict[str, Any]:
    """This peer's status as clients see it (the INFO answer's status), plus what the dashboard shows."""
    cs = peer.client_server
    st: dict[str, Any] = cs.info()["status"] if cs is not None else peer.status()
    return st


class HttpServer:
    """Serves one peer's ``/metrics``, ``/healthz``, ``/readyz`` and optionally the dashboard."""

    def __init__(self, peer: Peer, endpoint: str, *, dashboard: bool = False) -> None:
        web, _ = _import_deps()
        from prometheus_client import CollectorRegistry

        self.peer = peer
        self.endpoint = endpoint
        self.host, self.port = parse_http_endpoint(endpoint)
        self.dashboard = dashboard
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PeerCollector(peer))
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=self.registry)  # CPU, memory, start time (a restart shows there)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/api/status", self._status)
        if dashboard:
            app.router.add_get("/", self._page)
            app.router.add_get("/api/mesh", self._mesh)
        self._app = app
        self._runner: Any = None
        self._client: Any = None
        self._sample: tuple[float, dict[str, Any]] | None = None
        self._sampling: asyncio.Future[dict[str, Any]] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        web, _ = _import_deps()
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise TransportError(
                f"peer {self.peer.peer_id} cannot bind its metrics endpoint {self.endpoint}: {exc.strerror or exc}; "
                "is another program using it? Choose another port (metrics_endpoints, --metrics-port)"
            ) from None
        self._runner = runner
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.debug("peer %d serving metrics at %s/metrics", self.peer.peer_id, self.url)

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- handlers ---------------------------------------------------------------------

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: Any) -> Any:
        from aiohttp import web

        why = _alive(self.peer)
        if why is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=why + "\n")

    async def _readyz(self, request: Any) -> Any:
        from aiohttp import web

        why = _ready(self.peer)
        if why is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=why + "\n")

    async def _status(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(peer_status(self.peer))

    async def _page(self, request: Any) -> Any:
        from aiohttp import web

        html = importlib.resources.files("statefun_mesh").joinpath("dashboard.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def _mesh(self, request: Any) -> Any:
        from aiohttp import web

        now = time.monotonic()
        sample = self._sample
        if sample is None or now - sample[0] > MESH_SAMPLE_TTL:
            if self._sampling is None or self._sampling.done():
                self._sampling = asyncio.ensure_future(self._gather())
            doc = await asyncio.shield(self._sampling)
            self._sample = (time.monotonic(), doc)
        else:
            doc = sample[1]
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    async def _gather(self) -> dict[str, Any]:
        """Every peer's status: this one's directly, the others' through their client endpoints."""
        from .client import MeshClient
        from .transport import codec

        peer = self.peer
        cfg = peer.config
        endpoints = list(cfg.client_endpoints) or [""] * peer.n_peers
        if self._client is None:
            keys = None
            if cfg.curve:  # this peer's own key pair: the other peers' client endpoints admit it
                from .security import ClientKeys

                pair = cfg.keypair(peer.peer_id)
                servers = {ep: k for ep, k in zip(endpoints, cfg.peer_public_keys(), strict=True) if ep}
                keys = ClientKeys(pair.public, pair.secret, servers)
            self._client = MeshClient(endpoints[peer.peer_id] or "inproc://unused", timeout=1.0, keys=keys)
        client = self._client

        async def one(i: int, ep: str) -> dict[str, Any]:
            if i == peer.peer_id:
                return peer_status(peer)
            if not ep:
                return {"peer": i, "status": "no client endpoint"}
            try:
                _, items = await client._conn(ep).call(codec.C_INFO, timeout=1.0)
                return items[1]["status"]  # type: ignore[no-any-return]
            except (StatefunMeshError, asyncio.TimeoutError, OSError) as exc:
                return {"peer": i, "status": f"unreachable: {exc}"}

        statuses = await asyncio.gather(*(one(i, ep) for i, ep in enumerate(endpoints)))
        return {
            "time": time.time(),
            "peers": peer.n_peers,
            "functions": sorted(peer.table),
            "checkpoint_interval": cfg.checkpoint_interval if peer.checkpointing else None,
            "served_by": peer.peer_id,
            "status": list(statuses),
        }
