"""In-memory transport: the peers of a single-process mesh hand frames over in the event loop."""

from __future__ import annotations

import asyncio
import collections

from ..errors import ClosedTransportError
from .base import FrameBuffer, FrameHandler, Transport

__all__ = ["InMemoryTransport"]

#: hub name -> peer id -> transport
_HUBS: dict[str, dict[int, InMemoryTransport]] = {}


class InMemoryTransport(Transport):
    """Frames between peers of one process and one event loop, by ``call_soon``.

    Frames are still encoded bytes, so every peer sees exactly what a socket would
    carry. Peers of one mesh share a ``hub`` name (``memory://<hub>/<peer>`` endpoints).
    """

    def __init__(self, hub: str, peer_id: int, n_peers: int) -> None:
        self.hub = hub
        self.peer_id = peer_id
        self.n_peers = n_peers
        self._on_frame: FrameHandler | None = None
        self._pending: collections.defaultdict[int, list[bytes]] = collections.defaultdict(list)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, on_frame: FrameHandler) -> None:
        peers = _HUBS.setdefault(self.hub, {})
        if self.peer_id in peers:
            raise ValueError(f"peer {self.peer_id} is already attached to in-memory hub {self.hub!r}")
        self._loop = asyncio.get_running_loop()
        self._on_frame = on_frame
        peers[self.peer_id] = self
        # deliver what others queued for us before we started
        for other in peers.values():
            queued = other._pending.pop(self.peer_id, None)
            if queued:
                for frame in queued:
                    self._loop.call_soon(self._deliver, other.peer_id, frame)

    def send(self, peer: int, frame: FrameBuffer) -> None:
        if self._closed:
            raise ClosedTransportError("the in-memory transport is closed")
        if not 0 <= peer < self.n_peers or peer == self.peer_id:
            raise ValueError(f"no peer {peer} to send to from peer {self.peer_id}")
        if type(frame) is not bytes:
            frame = bytes(frame)  # what a socket would deliver
        target = _HUBS.get(self.hub, {}).get(peer)
        if target is None or target._loop is None:
            self._pending[peer].append(frame)
            return
        target._loop.call_soon(target._deliver, self.peer_id, frame)

    def _deliver(self, src: int, frame: bytes) -> None:
        if not self._closed and self._on_frame is not None:
            self._on_frame(src, frame)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        peers = _HUBS.get(self.hub)
        if peers is not None and peers.get(self.peer_id) is self:
            del peers[self.peer_id]
            if not peers:
                del _HUBS[self.hub]
