"""ZeroMQ transport (tcp://, ipc://, inproc://): a ROUTER per peer, a DEALER to every other peer."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any, Final

import zmq
import zmq.asyncio

from ..errors import ClosedTransportError, TransportError
from ..logutil import ThrottledLog
from ..security import Keypair, ZapPolicy, curve_client, curve_server, register_zap, watch_handshakes
from .base import FrameBuffer, FrameHandler, Transport
from .loopsock import LoopSocket

__all__ = ["DEFAULT_MAX_FRAME", "ZmqTransport", "peer_identity"]

log = logging.getLogger("statefun_mesh.transport")

DEFAULT_MAX_FRAME: Final = 64 << 20
_IDENTITY_PREFIX: Final = b"statefun-mesh-peer:"
_PREFIX_LEN: Final = len(_IDENTITY_PREFIX)
#: retry a send that met EAGAIN (not expected: the links have no send high-water mark) after this
_SEND_RETRY: Final = 0.01


def _no_handler(src: int, frame: bytes) -> None:  # pragma: no cover - before start()
    pass


def peer_identity(peer_id: int) -> bytes:
    """The ZeroMQ routing id a peer's DEALER sockets announce."""
    return _IDENTITY_PREFIX + str(peer_id).encode()


class ZmqTransport(Transport):
    """Frame channels over ZeroMQ.

    Each peer binds one ROUTER socket at its own endpoint and connects one DEALER to
    every other peer; a DEALER-ROUTER pair over one connection is FIFO. ``send`` never
    blocks (unlimited send high-water mark: the peers' credit protocol bounds what is
    queued). A frame from a connection that does not announce a peer identity of
    this mesh is logged, naming the sender, and dropped. ``ROUTER_HANDOVER`` lets a
    restarted peer take its channel over at once.

    Args:
        peer_id: this peer.
        endpoints: every peer's endpoint, indexed by peer id.
        max_frame: frames above this size are refused by ZeroMQ (the connection that
            sent one is dropped and reconnects).
        context: the ZeroMQ context; ``inproc://`` peers must share one (the default
            is the process-wide instance).
        heartbeat: ``(interval, timeout)`` in seconds for ZMTP heartbeats on the links to
            the other peers: a connection that answers no ping within ``timeout`` is
            dropped and made again, resolving the peer's host name anew (a peer that
            vanished without closing its connections, or moved to another address); a
            connection attempt is given up after a third of ``timeout`` and tried again.
            ``None``: none; a dead connection then lasts until TCP gives up on it.
        keys: this peer's CURVE key pair; with ``peer_keys``, every link runs over
            CURVE: the ROUTER admits only the other peers' keys (through the ZAP
            handler, see :mod:`statefun_mesh.security`) and takes a frame's sender from
            the key its connection authenticated with, never from the routing id the
            connection announces (so no routing id can be claimed, and
            ``ROUTER_HANDOVER`` is off: a restarted peer simply makes a new connection).
        peer_keys: every peer's public key, indexed by peer id.

    A connection to another peer that was lost (and is made again by ZeroMQ) is
    reported to ``on_link_lost(peer)``, if set: frames in flight on it may be lost.
    """

    def __init__(
        self,
        peer_id: int,
        endpoints: list[str],
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        context: zmq.asyncio.Context | None = None,
        heartbeat: tuple[float, float] | None = None,
        keys: Keypair | None = None,
        peer_keys: list[str] | None = None,
    ) -> None:
        if (keys is None) != (not peer_keys):
            raise ValueError("give both keys and peer_keys (CURVE) or neither")
        if all(ep.startswith("inproc://") for ep in endpoints):
            # inproc never leaves the process and ZeroMQ runs no security handshake on it
            keys, peer_keys = None, None
        if peer_keys and len(peer_keys) != len(endpoints):
            raise ValueError(f"expected one public key per endpoint ({len(endpoints)}), got {len(peer_keys)}")
        self.keys = keys
        self.peer_keys = list(peer_keys or ())
        self.peer_id = peer_id
        self.endpoints = list(endpoints)
        self.max_frame = max_frame
        self._ctx = context or zmq.asyncio.Context.instance()
        self._router: zmq.Socket[Any] | None = None
        self._rx: LoopSocket | None = None
        self._on_frame: FrameHandler = _no_handler
        self._dealers: dict[int, zmq.Socket[Any]] = {}
        #: frames a DEALER did not take at once, per peer, sent in order before any newer one
        self._backlog: dict[int, collections.deque[FrameBuffer]] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self.foreign_frames = 0
        self.heartbeat = heartbeat
        #: called with a peer id when the connection to it was lost (see the class docstring)
        self.on_link_lost: Callable[[int], None] | None = None
        self._monitors: list[tuple[zmq.Socket[Any], zmq.asyncio.Socket, asyncio.Task[None]]] = []
        self._zap: ZapPolicy | None = None
        self._unregister: Any = None
        self._handshakes: asyncio.Task[None] | None = None
        #: frames from non-peers log one line per window (the peer flushes the summaries)
        self.tlog = ThrottledLog(log)

    @property
    def refused_connections(self) -> int:
        """Connections to this peer's endpoint refused for an unknown key (CURVE only)."""
        return self._zap.refused if self._zap is not None else 0

    async def start(self, on_frame: FrameHandler) -> None:
        # plain sockets, read from the loop's reader callback (loopsock.py): zmq.asyncio's
        # future per message was a large part of a peer's CPU per request
        router: zmq.Socket[Any] = zmq.Socket(self._ctx, zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        endpoint = self.endpoints[self.peer_id]
        if self.keys is not None:
            self._zap = ZapPolicy(
                f"peer {self.peer_id}'s peer endpoint {endpoint}",
                {k: f"peer:{p}" for p, k in enumerate(self.peer_keys) if p != self.peer_id},
            )
            domain = f"statefun-mesh-peer-{self.peer_id}-{id(self):x}"
            self._unregister = await register_zap(self._ctx, domain, self._zap)
            curve_server(router, self.keys.secret, domain)
        else:
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            if not endpoint.startswith("inproc://"):
                log.warning(
                    "peer %d: the peer links (%s) are NOT authenticated: anyone who can reach them can "
                    "forge messages and control frames; set peer_keys and secret_key (docs/security.md)",
                    self.peer_id,
                    endpoint,
                )
        try:
            router.bind(endpoint)
        except zmq.ZMQError as exc:
            router.close(0)
            if self._unregister is not None:
                self._unregister()
                self._unregister = None
            raise TransportError(
                f"peer {self.peer_id} cannot bind {endpoint}: {exc}; is another peer or program using it?"
            ) from exc
        self._router = router
        if self._zap is not None:
            self._handshakes = watch_handshakes(router, self._zap)
        for p, ep in enumerate(self.endpoints):
            if p == self.peer_id:
                continue
            dealer: zmq.Socket[Any] = zmq.Socket(self._ctx, zmq.DEALER)
            if self.keys is not None:
                curve_client(dealer, self.keys, self.peer_keys[p])
            else:
                dealer.setsockopt(zmq.IDENTITY, peer_identity(self.peer_id))
            dealer.setsockopt(zmq.SNDHWM, 0)
            dealer.setsockopt(zmq.LINGER, 1000)
            dealer.setsockopt(zmq.RECONNECT_IVL, 100)
            # at most 0.2 s between attempts: a restarted peer binds ~0.7 s after its death, and
            # with a 1 s cap the link to it (which carries the coordinator's RECOVER) waited up to
            # 0.4 s more after the bind (issue 9, recovery time); an attempt costs a connect()
            dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 200)
            if self.heartbeat is not None:
                dealer.setsockopt(zmq.HEARTBEAT_IVL, max(int(self.heartbeat[0] * 1000), 1))
                dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(int(self.heartbeat[1] * 1000), 1))
                # A connect attempt made while the peer is cut off would otherwise wait out the
                # kernel's SYN retries (seconds apart, up to two minutes) after the link is back.
                dealer.setsockopt(zmq.CONNECT_TIMEOUT, max(int(self.heartbeat[1] * 1000 / 3), 100))
            # a zmq.asyncio PAIR: the socket's context is the asyncio one
            monitor: zmq.asyncio.Socket = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # type: ignore[assignment]
            task = asyncio.create_task(self._watch_link(p, monitor), name=f"statefun-mesh peer {self.peer_id} link {p}")
            self._monitors.append((dealer, monitor, task))
            dealer.connect(ep)
            self._dealers[p] = dealer
        self._on_frame = on_frame
        if self.keys is not None:
            self._rx = LoopSocket(
                router, self._receive_curve, copy=False, name=f"peer {self.peer_id}'s peer endpoint", tlog=self.tlog
            )
        else:
            self._rx = LoopSocket(router, self._receive, name=f"peer {self.peer_id}'s peer endpoint", tlog=self.tlog)

    def _receive_curve(self, parts: list[Any]) -> None:
        # The sender is the peer whose key the connection authenticated with (the ZAP
        # handler's user id, carried by every message), whatever routing id it announced.
        src = -1
        try:
            user = parts[-1].get("User-Id")
        except zmq.ZMQError:
            user = ""
        if isinstance(user, str) and user.startswith("peer:") and user[5:].isdigit():
            src = int(user[5:])
        if not 0 <= src < len(self.endpoints) or src == self.peer_id or len(parts) != 2:
            self.foreign_frames += 1
            self.tlog.error(
                "foreign frames",
                "peer %d: dropped a frame from a connection that did not "
                "authenticate as another peer of this mesh (user %r, %d parts)",
                self.peer_id,
                user,
                len(parts),
            )
            return
        try:
            self._on_frame(src, parts[1].bytes)
        except Exception:  # the handler logs bad frames itself; never let one kill the loop
            log.exception("peer %d: handling a frame from peer %d failed", self.peer_id, src)

    async def _watch_link(self, peer: int, monitor: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())
            except zmq.ZMQError:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and not self._closed:
                # debug: a peer stopping cleanly closes its links too; the peer logs a loss
                # that matters (a connection made again while both kept running)
                log.debug("peer %d: the connection to peer %d at %s was lost", self.peer_id, peer, self.endpoints[peer])
                if self.on_link_lost is not None:
                    try:
                        self.on_link_lost(peer)
                    except Exception:
                        log.exception("peer %d: on_link_lost(%d) failed", self.peer_id, peer)

    def _receive(self, parts: list[Any]) -> None:
        ident = parts[0]
        src = -1
        if ident.startswith(_IDENTITY_PREFIX) and ident[_PREFIX_LEN:].isdigit():
            src = int(ident[_PREFIX_LEN:])
        if not 0 <= src < len(self.endpoints) or src == self.peer_id or len(parts) != 2:
            self.foreign_frames += 1
            self.tlog.error(
                "frames from non-peers",
                "peer %d: dropped a frame from a sender that is not a peer of this mesh (routing id %r, %d parts)",
                self.peer_id,
                ident[:64],
                len(parts),
            )
            return
        try:
            self._on_frame(src, parts[1])
        except Exception:  # the handler logs bad frames itself; never let one kill the loop
            self.tlog.log(
                logging.ERROR,
                "frame handler errors",
                "peer %d: handling a frame from peer %d failed",
                self.peer_id,
                src,
                exc_info=True,
            )

    def flush_logs(self) -> None:
        """Write the summaries of throttled log lines (the peer's heartbeat loop calls it)."""
        from ..security import flush_zap_logs

        self.tlog.flush()
        flush_zap_logs(self._ctx)

    def send(self, peer: int, frame: FrameBuffer) -> None:
        if self._closed:
            raise ClosedTransportError("the ZeroMQ transport is closed")
        dealer = self._dealers.get(peer)
        if dealer is None:
            raise ValueError(f"no peer {peer} to send to from peer {self.peer_id}")
        if self._backlog:
            backlog = self._backlog.get(peer)
            if backlog is not None:
                backlog.append(frame)
                return
        try:
            dealer.send(frame, zmq.NOBLOCK, copy=len(frame) < 65536)
        except zmq.Again:
            # not expected (no send high-water mark, frames queue before a connection is
            # made); kept in order and sent as soon as the socket takes it, never dropped
            self._backlog[peer] = collections.deque((frame,))
            if self._retry is None:
                self._retry = asyncio.get_running_loop().call_later(_SEND_RETRY, self._send_backlog)

    def _send_backlog(self) -> None:
        self._retry = None
        if self._closed:
            return
        for peer, backlog in list(self._backlog.items()):
            dealer = self._dealers[peer]
            while backlog:
                try:
                    dealer.send(backlog[0], zmq.NOBLOCK, copy=len(backlog[0]) < 65536)
                except zmq.Again:
                    break
                backlog.popleft()
            if not backlog:
                del self._backlog[peer]
        if self._backlog:
            self._retry = asyncio.get_running_loop().call_later(_SEND_RETRY, self._send_backlog)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self._rx is not None:
            self._rx.stop()  # no frame is delivered once closing starts
        for dealer, monitor, task in self._monitors:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            try:
                dealer.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(0)
        self._monitors.clear()
        if self._handshakes is not None:
            self._handshakes.cancel()
            await asyncio.gather(self._handshakes, return_exceptions=True)
        for d in self._dealers.values():
            d.close()
        if self._rx is not None:
            self._rx.close(0)  # stops reading, then closes the ROUTER
        elif self._router is not None:
            self._router.close(0)
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
