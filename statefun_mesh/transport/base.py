"""The transport interface: FIFO frame channels between the peers of one mesh."""

from __future__ import annotations

import abc
from collections.abc import Callable

__all__ = ["FrameBuffer", "FrameHandler", "Transport"]

#: Called with (sender peer id, frame) for every frame received, in channel order.
FrameHandler = Callable[[int, bytes], None]
#: what ``send`` takes: any contiguous bytes (a peer sends a view of a frame it built in place)
FrameBuffer = bytes | bytearray | memoryview


class Transport(abc.ABC):
    """Frame channels from this peer to every other peer of the mesh.

    Requirements every implementation meets (and ``statefun_mesh.testing.check_transport``
    checks): frames from one sender to one receiver arrive in the order sent and
    none is dropped while both sides run; ``send`` never blocks the event loop (flow
    control is the peer's credit protocol, above the transport); frames sent to a
    peer that is not (yet, or any more) reachable are queued and delivered when it
    connects, up to the transport's own limits; a frame larger than ``max_frame``
    is refused by the receiver.
    """

    peer_id: int

    @abc.abstractmethod
    async def start(self, on_frame: FrameHandler) -> None:
        """Bind/connect and start delivering received frames to ``on_frame``."""

    @abc.abstractmethod
    def send(self, peer: int, frame: FrameBuffer) -> None:
        """Queue ``frame`` for ``peer`` (the caller does not change it afterwards).

        Raises:
            ClosedTransportError: the transport was closed.
            ValueError: ``peer`` is not a peer of this mesh (or is this peer).
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop receiving and release sockets (idempotent). Queued frames get a short
        grace period to leave."""
