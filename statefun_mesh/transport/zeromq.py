"""ZeroMQ transport (tcp://, ipc://, inproc://): a ROUTER per peer, a DEALER to every other peer."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import zmq
import zmq.asyncio

from ..errors import ClosedTransportError, TransportError
from ..logutil import ThrottledLog
from .base import FrameHandler, Transport

__all__ = ["DEFAULT_MAX_FRAME", "ZmqTransport", "peer_identity"]

log = logging.getLogger("statefun_mesh.transport")

DEFAULT_MAX_FRAME: Final = 64 << 20
_IDENTITY_PREFIX: Final = b"statefun-mesh-peer:"


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
    """

    def __init__(
        self,
        peer_id: int,
        endpoints: list[str],
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.endpoints = list(endpoints)
        self.max_frame = max_frame
        self._ctx = context or zmq.asyncio.Context.instance()
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: dict[int, zmq.asyncio.Socket] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.foreign_frames = 0
        #: frames from non-peers log one line per window (the peer flushes the summaries)
        self.tlog = ThrottledLog(log)

    async def start(self, on_frame: FrameHandler) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        router.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        endpoint = self.endpoints[self.peer_id]
        try:
            router.bind(endpoint)
        except zmq.ZMQError as exc:
            router.close(0)
            raise TransportError(
                f"peer {self.peer_id} cannot bind {endpoint}: {exc}; is another peer or program using it?"
            ) from exc
        self._router = router
        for p, ep in enumerate(self.endpoints):
            if p == self.peer_id:
                continue
            dealer = self._ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, peer_identity(self.peer_id))
            dealer.setsockopt(zmq.SNDHWM, 0)
            dealer.setsockopt(zmq.LINGER, 1000)
            dealer.setsockopt(zmq.RECONNECT_IVL, 100)
            dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            dealer.connect(ep)
            self._dealers[p] = dealer
        self._task = asyncio.create_task(self._receive(on_frame), name=f"statefun-mesh peer {self.peer_id} zmq rx")

    async def _receive(self, on_frame: FrameHandler) -> None:
        assert self._router is not None
        router = self._router
        n = len(self.endpoints)
        prefix_len = len(_IDENTITY_PREFIX)
        while True:
            try:
                parts = await router.recv_multipart(copy=True)
            except zmq.ZMQError as exc:
                if self._closed:
                    return
                self.tlog.error("receive failures", "peer %d: receive failed: %s", self.peer_id, exc)
                await asyncio.sleep(0.1)
                continue
            ident = parts[0]
            src = -1
            if ident.startswith(_IDENTITY_PREFIX) and ident[prefix_len:].isdigit():
                src = int(ident[prefix_len:])
            if not 0 <= src < n or src == self.peer_id or len(parts) != 2:
                self.foreign_frames += 1
                self.tlog.error(
                    "frames from non-peers",
                    "peer %d: dropped a frame from a sender that is not a peer of this mesh "
                    "(routing id %r, %d parts)", self.peer_id, ident[:64], len(parts),
                )  # fmt: skip
                continue
            try:
                on_frame(src, parts[1])
            except Exception:  # the handler logs bad frames itself; never let one kill the loop
                self.tlog.log(logging.ERROR, "frame handler errors", "peer %d: handling a frame from peer %d failed",
                              self.peer_id, src, exc_info=True)

    def send(self, peer: int, frame: bytes) -> None:
        if self._closed:
            raise ClosedTransportError("the ZeroMQ transport is closed")
        dealer = self._dealers.get(peer)
        if dealer is None:
            raise ValueError(f"no peer {peer} to send to from peer {self.peer_id}")
        dealer.send(frame, flags=zmq.NOBLOCK, copy=len(frame) < 65536)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for d in self._dealers.values():
            d.close()
        if self._router is not None:
            self._router.close(0)
