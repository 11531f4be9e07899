"""The client endpoint of a peer: a ZeroMQ ROUTER serving MeshClient and the CLI.

Owns: the client socket, decoding and answering client frames, the sends parked while the
peer is full, and the egress readers' positions. It reaches its peer only through
:class:`~statefun_mesh.client_host.ClientHost` (not ``Peer``: no import cycle).

Longer than ~500 lines because the client protocol is one state machine: every frame
kind's checks, the per-connection and total bounds, parked sends and held answers share
the same counters; split, each part would reach into the others' state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import zmq
import zmq.asyncio

from .address import parse_typename
from .client_host import ClientHost, check_request_timeout
from .errors import (
    FrameDecodeError,
    FunctionNotFoundError,
    InvocationError,
    MeshBusyError,
    MessageTooLargeError,
    StatefunMeshError,
    TransportError,
    TypeNameError,
)
from .logutil import ThrottledLog
from .transport import codec
from .transport.loopsock import LoopSocket

if TYPE_CHECKING:
    from .messages import Message

__all__ = ["ClientServer", "error_args"]

log = logging.getLogger("statefun_mesh.server")

_CLIENT_KINDS: Final = frozenset({codec.C_SEND, codec.C_REQUEST, codec.C_FETCH, codec.C_INFO})
MAX_FETCH: Final = 10_000
#: buckets of the request service-time histogram: up to 2**24 µs (16.8 s), then one for the rest
SERVICE_BUCKETS: Final = 26
_KIND_NAMES: Final = {codec.C_SEND: "send", codec.C_REQUEST: "request", codec.C_FETCH: "fetch", codec.C_INFO: "info"}
#: egress readers remembered for their lag (metrics): at most this many, forgotten after quiet seconds
MAX_READERS: Final = 64
READER_EXPIRY: Final = 60.0
MAX_WAIT_MS: Final = 60_000
#: client sends a peer holds while it admits none (beyond them: MeshBusyError, retried)
MAX_PARKED: Final = 10_000
MAX_PARKED_BYTES: Final = 64 << 20
#: answers held for one client connection that does not read them (its socket's queue is
#: full); while it holds this many, its new frames are not acted on (see ClientServer)
MAX_QUEUED_ANSWERS: Final = 10_000
#: ... and for all connections together, in bytes
MAX_QUEUED_ANSWER_BYTES: Final = 64 << 20
#: how often held answers are offered to their sockets again (besides every socket event)
ANSWER_RETRY: Final = 0.05


def _check_range(what: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{what} must be between {lo} and {hi}, got {value}")


def error_args(exc: BaseException) -> list[Any]:
    """The constructor arguments that rebuild ``exc`` on the client side."""
    if isinstance(exc, FunctionNotFoundError):
        return [exc.typename]
    if isinstance(exc, InvocationError):
        return [exc.address, exc.error]
    if isinstance(exc, MessageTooLargeError):
        return [exc.size, exc.limit, exc.what]
    return [str(exc)]


class ClientServer:
    """Serves clients on one endpoint for one peer.

    Every request is checked before it is acted on; a malformed frame is answered
    with an ``ERROR`` naming what was wrong (when it carries a correlation id) and
    logged with the client's routing id, and the server keeps running.

    No answer is dropped silently. The ROUTER runs with ``ROUTER_MANDATORY``: an answer
    its connection's queue has no room for (a client that reads slower than it sends) is
    held here, in order, and offered again on every socket event and every
    ``ANSWER_RETRY`` s; an answer to a connection that is gone is dropped and counted
    (``replies_undeliverable``). Held answers are bounded: while a connection holds
    ``MAX_QUEUED_ANSWERS`` (or all together ``MAX_QUEUED_ANSWER_BYTES``), the frames it
    sends are not acted on (nothing is accepted, so a retry cannot apply anything twice)
    and are counted (``frames_refused_unread``).
    """

    def __init__(self, peer: ClientHost, endpoint: str, client_endpoints: list[str]) -> None:
        self.peer = peer
        self.endpoint = endpoint
        self.client_endpoints = client_endpoints
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: LoopSocket | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        # sends waiting for admission, in arrival order; the loop keeps reading meanwhile,
        # so info, fetches and requests are answered while the peer is over its limits
        self._parked: deque[tuple[bytes, int, Any, int]] = deque()
        self._parked_bytes = 0
        self._admitter: asyncio.Task[None] | None = None
        self.bad_frames = 0
        self.busy = 0
        # requests waiting for their reply, per client routing id
        self._pending: dict[bytes, int] = {}
        self._pending_total = 0
        # for metrics (metrics.py): client frames by kind, errors answered, and egress readers
        self.requests = {"send": 0, "request": 0, "fetch": 0, "info": 0}
        #: requests answered, by the time from their frame's arrival to their answer's send:
        #: bucket i counts those of [2**(i-1), 2**i) µs (bucket 0: under 1 µs), the last one
        #: also everything longer (status "request_service_us_log2", bench/request_path.py)
        self.service_us = [0] * SERVICE_BUCKETS
        #: their service times added up, µs (the histogram's sum in metrics.py)
        self.service_us_sum = 0
        self.errors = 0
        #: (client routing id, egress) -> (next offset it asked for, when): the newest readers
        self.readers: dict[tuple[bytes, str], tuple[int, float]] = {}
        self._zap: Any = None
        self._peer_keys: list[str] = []  #: every peer's public key (Z85), read at start (CURVE only)
        self._unregister: Any = None
        self._watch: asyncio.Task[None] | None = None
        # answers the ROUTER had no room for, per client routing id, in order
        self._held: dict[bytes, deque[bytes]] = {}
        self._held_bytes = 0
        self._held_count = 0
        self._retry: asyncio.TimerHandle | None = None
        #: answers dropped because their client was gone; frames not acted on while their
        #: client did not read its answers
        self.undeliverable = 0
        self.refused_unread = 0
        #: bad client frames log one line per kind and window (the peer flushes the summaries)
        self.tlog = ThrottledLog(log)

    @property
    def replies_queued(self) -> int:
        """Answers held because their client's connection had no room for them (yet)."""
        return self._held_count

    @property
    def refused_clients(self) -> int:
        """Client connections refused for a key not in ``client_keys`` (CURVE only)."""
        return self._zap.refused if self._zap is not None else 0

    @property
    def pending_requests(self) -> int:
        """Client requests waiting for their reply, all clients together."""
        return self._pending_total

    @property
    def parked_sends(self) -> int:
        """Client sends waiting for the peer to admit them."""
        return len(self._parked)

    async def start(self) -> None:
        # a plain socket read from the loop's reader callback (transport/loopsock.py)
        sock: zmq.Socket[Any] = zmq.Socket(self._ctx, zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.MAXMSGSIZE, self.peer.config.max_frame_bytes)
        # a send the connection has no room for fails (EAGAIN: held here), one to a
        # connection that is gone fails (EHOSTUNREACH: counted); never dropped silently
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        config = self.peer.config
        if config.curve:
            from .security import CLIENT_USER, ZapPolicy, curve_server, register_zap

            keys = config.keypair(self.peer.peer_id)
            users = dict.fromkeys(config.client_public_keys(), CLIENT_USER)
            # the mesh's own peers may ask each other for status as clients (the dashboard's
            # /api/mesh, metrics.py); a peer's key already lets it do anything in the mesh
            # read once: info() hands them to every status call (the key files, read per
            # call, were ~0.5 % of a busy peer's loop under a 5 ms status poll)
            self._peer_keys = config.peer_public_keys()
            users.update(dict.fromkeys(self._peer_keys, CLIENT_USER))
            self._zap = ZapPolicy(
                f"peer {self.peer.peer_id}'s client endpoint {self.endpoint}",
                users,
                config.any_client_key,
            )
            domain = f"statefun-mesh-clients-{self.peer.peer_id}-{id(self):x}"
            self._unregister = await register_zap(self._ctx, domain, self._zap)
            curve_server(sock, keys.secret, domain)
        elif not self.endpoint.startswith("inproc://"):
            log.warning(
                "peer %d: the client endpoint %s is NOT authenticated: anyone who can reach it can send "
                "messages and read egress; set peer_keys, secret_key and client_keys (docs/security.md)",
                self.peer.peer_id,
                self.endpoint,
            )
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            if self._unregister is not None:
                self._unregister()
                self._unregister = None
            raise TransportError(
                f"peer {self.peer.peer_id} cannot bind its client endpoint {self.endpoint}: {exc}; "
                "is another mesh or program using it?"
            ) from exc
        if self._zap is not None:
            from .security import watch_handshakes

            self._watch = watch_handshakes(sock, self._zap)
        self._sock = LoopSocket(
            sock,
            self._frame,
            on_writable=self._offer_held,
            name=f"peer {self.peer.peer_id}'s client endpoint",
            tlog=self.tlog,
        )

    async def aclose(self) -> None:
        if self._admitter is not None:
            self._admitter.cancel()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._sock is not None:
            self._sock.stop()  # no frame is acted on once closing starts
        for job in list(self._jobs):
            job.cancel()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(None)  # with the socket's LINGER: answers sent get a moment to leave
        if self._unregister is not None:
            self._unregister()
            self._unregister = None

    def _reply(self, ident: bytes, kind: int, *items: Any) -> None:
        sock = self._sock
        if sock is None or sock.sock.closed:
            return
        frame = codec.encode_control(kind, *items)
        if self._held:
            held = self._held.get(ident)
            if held is not None:  # after the ones already waiting
                self._hold(held, frame)
                return
        try:
            sock.sock.send_multipart((ident, frame), zmq.NOBLOCK)
        except zmq.Again:
            self._hold(self._held.setdefault(ident, deque()), frame)
        except zmq.ZMQError as exc:
            self._undeliverable(ident, exc, 1)
        sock.sent()

    def _hold(self, held: deque[bytes], frame: bytes) -> None:
        held.append(frame)
        self._held_count += 1
        self._held_bytes += len(frame) + 64
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(ANSWER_RETRY, self._retry_held)
        assert self._sock is not None
        self._sock.want_write()

    def _undeliverable(self, ident: bytes, exc: zmq.ZMQError, n: int) -> None:
        self.undeliverable += n
        self.tlog.warning(
            "undeliverable answers",
            "peer %d: dropped %d answer(s) to client %r: %s (the client is gone; %d so far)",
            self.peer.peer_id,
            n,
            ident[:64],
            exc,
            self.undeliverable,
        )

    def _retry_held(self) -> None:
        self._retry = None
        self._offer_held()
        if self._held and self._sock is not None and not self._sock.sock.closed:
            self._retry = asyncio.get_running_loop().call_later(ANSWER_RETRY, self._retry_held)

    def _offer_held(self) -> None:
        """Send held answers, oldest first, as far as each connection takes them."""
        sock = self._sock
        if sock is None or sock.sock.closed:
            return
        send = sock.sock.send_multipart
        sent = 0
        for ident, held in list(self._held.items()):
            while held:
                frame = held[0]
                try:
                    send((ident, frame), zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    self._undeliverable(ident, exc, len(held))
                    self._held_count -= len(held)
                    self._held_bytes -= sum(len(f) + 64 for f in held)
                    held.clear()
                    break
                held.popleft()
                sent += 1
                self._held_count -= 1
                self._held_bytes -= len(frame) + 64
            if not held:
                del self._held[ident]
        if sent:
            sock.sent()
        if self._held:
            sock.want_write()

    def _answers_unread(self, ident: bytes) -> bool:
        """Whether ``ident`` (or every client together) holds as many unread answers as allowed."""
        held = self._held.get(ident)
        return held is not None and (len(held) >= MAX_QUEUED_ANSWERS or self._held_bytes >= MAX_QUEUED_ANSWER_BYTES)

    def _error(self, ident: bytes, corr: int, exc: BaseException) -> None:
        self.errors += 1
        self._reply(ident, codec.R_ERROR, corr, type(exc).__name__, str(exc), error_args(exc))

    def _spawn(self, coro: Any) -> None:
        job = asyncio.create_task(coro)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _frame(self, parts: list[bytes]) -> None:
        """One client frame, from the socket's reader callback."""
        peer = self.peer
        ident = parts[0]
        if len(parts) != 2:
            self.bad_frames += 1
            peer.bad_frames += 1
            self.tlog.error(
                "bad client frames",
                "peer %d: dropped a %d-part client message from %r",
                peer.peer_id,
                len(parts),
                ident[:64],
            )
            return
        if self._held:
            self._offer_held()  # the client reads again, maybe
            if self._answers_unread(ident):
                self.refused_unread += 1
                self.tlog.warning(
                    "frames refused unread",
                    "peer %d: client %r does not read its answers (%d held "
                    "for it): its frames are not acted on until it does (%d so far)",
                    peer.peer_id,
                    ident[:64],
                    len(self._held[ident]),
                    self.refused_unread,
                )
                return
        frame = parts[1]
        arrived = time.perf_counter_ns()
        try:
            kind, items = codec.decode_control(frame, _CLIENT_KINDS)
        except FrameDecodeError as exc:
            self.bad_frames += 1
            peer.bad_frames += 1
            self.tlog.error(
                "bad client frames", "peer %d: rejected a frame from client %r: %s", peer.peer_id, ident[:64], exc
            )
            self._error(ident, 0, exc)
            return
        corr = items[0]
        self.requests[_KIND_NAMES.get(kind, "info")] += 1
        try:
            if kind == codec.C_SEND:
                _, typename, id, vt, value, idem = items
                self._check_target(typename, id, vt)
                rec = (typename, id, "", idem, vt, value, 0, 0)
                peer.check_message(rec)
                if not self._parked and peer.admits():
                    self._accept(ident, corr, rec)
                else:
                    self._park(ident, corr, rec, len(frame))
            elif kind == codec.C_REQUEST:
                _, typename, id, vt, value, timeout = items
                self._check_target(typename, id, vt)
                timeout = check_request_timeout(timeout, peer.config.max_request_timeout)
                # the record as the peer frames it has a reply peer and a request id:
                # at most 16 bytes more than with zeros (the peer checks it exactly)
                peer.check_message((typename, id, "", "", vt, value, 0, 0), "request")
                self._check_pending(ident)
                # counted from here (so the next frame sees it) until it is answered
                self._pending[ident] = self._pending.get(ident, 0) + 1
                self._pending_total += 1
                try:
                    rid = peer.request_nowait(
                        typename, id, vt, value, timeout, functools.partial(self._answered, ident, corr, arrived)
                    )
                except BaseException:
                    self._done_pending(ident)
                    raise
                if rid is None:  # not admitted now: a task waits for admission
                    self._spawn(self._request(ident, corr, typename, id, vt, value, timeout))
            elif kind == codec.C_FETCH:
                _, egress, start, limit, wait_ms, gen = items
                parse_typename(egress)
                _check_range("FETCH max_records", limit, 1, MAX_FETCH)
                _check_range("FETCH wait_ms", wait_ms, 0, MAX_WAIT_MS)
                _check_range("FETCH generation", gen, -1, 2**32 - 1)
                if isinstance(start, int):
                    _check_range("FETCH start offset", start, 0, 2**63 - 1)
                pos = peer.egress_resume(egress, peer.egress_position(egress, start), gen)
                self._spawn(self._fetch(ident, corr, egress, pos, limit, wait_ms))
            else:  # C_INFO
                self._reply(ident, codec.R_INFO, corr, self.info())
        except StatefunMeshError as exc:
            self._error(ident, corr, exc)
        except (ValueError, TypeError) as exc:
            self._error(ident, corr, exc)

    def _track_reader(self, ident: bytes, egress: str, nxt: int) -> None:
        """Remember where a reader is (for its lag); readers quiet for READER_EXPIRY are forgotten."""
        readers = self.readers
        now = time.monotonic()
        readers[(ident, egress)] = (nxt, now)
        if len(readers) > MAX_READERS:
            for key, (_, seen) in list(readers.items()):
                if now - seen > READER_EXPIRY:
                    del readers[key]
            while len(readers) > MAX_READERS:
                del readers[min(readers, key=lambda k: readers[k][1])]

    def reader_lags(self) -> list[tuple[str, str, int]]:
        """(reader, egress, records behind this peer's released head) of every recent reader."""
        now = time.monotonic()
        out = []
        for (ident, egress), (nxt, seen) in list(self.readers.items()):
            if now - seen > READER_EXPIRY:
                del self.readers[(ident, egress)]
                continue
            out.append((ident.hex()[:16], egress, max(self.peer.egress_head(egress) - nxt, 0)))
        return out

    def _check_pending(self, ident: bytes) -> None:
        cfg = self.peer.config
        mine = self._pending.get(ident, 0)
        if mine >= cfg.max_pending_requests_per_client:
            self.busy += 1
            raise MeshBusyError(
                f"this client already has {mine} requests waiting for replies at peer {self.peer.peer_id} "
                "(max_pending_requests_per_client); wait for some to be answered, or use more connections"
            )
        total = self._pending_total
        if total >= cfg.max_pending_requests:
            self.busy += 1
            raise MeshBusyError(
                f"peer {self.peer.peer_id} already holds {total} client requests waiting for replies "
                "(max_pending_requests); retry once some are answered"
            )

    def _park(self, ident: bytes, corr: int, rec: Any, size: int) -> None:
        # Backpressure: the client's acknowledgement waits until the peer admits the
        # message. Past the parking limits the send is refused (not accepted, so a retry
        # cannot apply it twice) rather than blocking this loop.
        if len(self._parked) >= MAX_PARKED or self._parked_bytes + size > MAX_PARKED_BYTES:
            self.busy += 1
            self._error(
                ident,
                corr,
                MeshBusyError(
                    f"peer {self.peer.peer_id} is over its inbox_limit and holds {len(self._parked)} more client "
                    "messages waiting for admission; retry later (MeshClient does, within its timeout)"
                ),
            )
            return
        self._parked.append((ident, corr, rec, size))
        self._parked_bytes += size
        if self._admitter is None or self._admitter.done():
            self._admitter = asyncio.create_task(self._admit_parked())

    async def _admit_parked(self) -> None:
        parked = self._parked
        while parked:
            try:
                await self.peer.admit()
            except StatefunMeshError as exc:
                while parked:
                    ident, corr, _, size = parked.popleft()
                    self._parked_bytes -= size
                    self._error(ident, corr, exc)
                return
            while parked and self.peer.admits():
                ident, corr, rec, size = parked.popleft()
                self._parked_bytes -= size
                self._accept(ident, corr, rec)

    def _check_target(self, typename: str, id: str, vt: str) -> None:
        parse_typename(typename)
        parse_typename(vt)
        if not id:
            raise TypeNameError("target id can not be empty")
        if typename not in self.peer.table and not self.peer.is_remote(typename):
            raise FunctionNotFoundError(typename, list(self.peer.table))

    def info(self) -> dict[str, Any]:
        """What a client learns on connecting: the mesh's shape and every peer's client endpoint."""
        peer = self.peer
        status: dict[str, Any] = {
            **peer.status(),
            "parked_sends": len(self._parked),
            "busy_refusals": self.busy,
            "client_requests": sum(self.requests.values()),
            "client_errors": self.errors,
            "replies_queued": self._held_count,
            "replies_undeliverable": self.undeliverable,
            "frames_refused_unread": self.refused_unread,
            "request_service_us_log2": list(self.service_us),
            "egress_readers": [list(r) for r in self.reader_lags()],
        }
        info: dict[str, Any] = {
            "peer": peer.peer_id,
            "peers": peer.n_peers,
            "max_parallelism": peer.config.max_parallelism,
            "client_endpoints": self.client_endpoints,
            "functions": sorted(peer.table),
            "max_message_bytes": peer.config.message_limit,
            "max_request_timeout": peer.config.max_request_timeout,
            # what `statefun-mesh egress` and `run` need to know: when records appear, whose answer this is
            "checkpoint_interval": peer.config.checkpoint_interval if peer.checkpointing else None,
            "egress_immediate": list(peer.config.egress_immediate),
            "pid": os.getpid(),
            "status": status,
        }
        if self._zap is not None:
            # public keys: a client that authenticated with this peer learns the others' (egress, status)
            info["peer_keys"] = list(self._peer_keys)
            status["refused_clients"] = self._zap.refused
        return info

    def _accept(self, ident: bytes, corr: int, rec: Any) -> None:
        # Taken in at once (so it counts against the inbox limit before the next frame
        # is read); acknowledged when logged. Logging runs apart from this loop, so the
        # sends that arrive meanwhile share one fsync.
        try:
            fut = self.peer.accept_nowait(rec)
        except StatefunMeshError as exc:
            self._error(ident, corr, exc)
            return
        if fut is None:
            self._reply(ident, codec.R_ACK, corr)
        else:
            fut.add_done_callback(lambda f: self._logged(ident, corr, f))

    def _logged(self, ident: bytes, corr: int, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            self._error(ident, corr, TransportError("the peer closed before the message was logged"))
        elif fut.exception() is not None:
            self._error(ident, corr, fut.exception())  # type: ignore[arg-type]
        else:
            self._reply(ident, codec.R_ACK, corr)

    def _done_pending(self, ident: bytes) -> None:
        self._pending_total -= 1
        left = self._pending[ident] - 1
        if left:
            self._pending[ident] = left
        else:
            del self._pending[ident]

    def _answered(
        self, ident: bytes, corr: int, arrived: int, reply: Message | None, exc: BaseException | None
    ) -> None:
        # called by the peer the moment the request ends (in the batch or frame that answers it)
        self._done_pending(ident)
        if exc is not None:
            self._error(ident, corr, exc)
        elif reply is not None:
            self._reply(ident, codec.R_REPLY, corr, reply.target_typename, reply.target_id, reply._vt, reply._v)
            us = (time.perf_counter_ns() - arrived) // 1000
            self.service_us[min(us.bit_length(), SERVICE_BUCKETS - 1)] += 1
            self.service_us_sum += us

    async def _request(
        self, ident: bytes, corr: int, typename: str, id: str, vt: str, value: bytes, timeout: float
    ) -> None:
        try:
            reply = await self.peer.request_raw(typename, id, vt, value, timeout)
        except (StatefunMeshError, ValueError) as exc:
            self._error(ident, corr, exc)
            return
        finally:
            self._done_pending(ident)
        self._reply(ident, codec.R_REPLY, corr, reply.target_typename, reply.target_id, reply._vt, reply._v)

    async def _fetch(self, ident: bytes, corr: int, egress: str, pos: int, limit: int, wait_ms: int) -> None:
        peer = self.peer
        records = peer.egress_read(egress, pos, limit)
        if not records and wait_ms:
            await peer.egress_wait(egress, pos, wait_ms / 1000)
            if peer.running:
                records = peer.egress_read(egress, pos, limit)
        # one answer frame stays near max_frame_bytes: stop before the record that passes it
        budget, size = peer.config.max_frame_bytes - 1024, 0
        for i, r in enumerate(records):
            size += len(r._v) + len(r._vt) + 32 + (len(r.id) if r.id else 0)
            if size > budget and i:
                records = records[:i]
                break
        nxt = records[-1].offset + 1 if records else pos
        self._track_reader(ident, egress, nxt)
        items = [[r.offset, r._vt, r._v] if r.id is None else [r.offset, r._vt, r._v, r.id] for r in records]
        self._reply(ident, codec.R_RECORDS, corr, peer.peer_id, nxt, items, peer.generation)
