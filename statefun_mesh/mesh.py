"""LocalMesh: a whole mesh inside one asyncio program, for tests, notebooks and small services."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from typing import Any

from .clock import Clock
from .config import MeshConfig
from .functions import StatefulFunctions
from .messages import EgressRecord, Message
from .peer import Peer

__all__ = ["LocalMesh"]


class LocalMesh:
    """Run functions in this process: ``async with LocalMesh(functions, state_dir=...) as mesh:``.

    Args:
        *functions: one or more ``StatefulFunctions`` modules (or lists of them),
            multiplexed into one mesh.
        state_dir: where state lives; reopening the same directory finds it again.
            ``None``: a temporary directory, deleted on close.
        clock: time source for ``send_after`` (tests pass a ``ManualClock``).
        **settings: any :class:`~statefun_mesh.config.MeshConfig` field
            (``max_parallelism``, ``max_batch``, ``egress_retention``, ...).
    """

    def __init__(
        self,
        *functions: StatefulFunctions | Iterable[StatefulFunctions],
        state_dir: str | None = None,
        clock: Clock | None = None,
        **settings: Any,
    ) -> None:
        peers = settings.get("peers", 1)
        if peers != 1:
            raise ValueError("LocalMesh runs one peer in this version; multi-peer meshes are not available yet")
        self._functions: list[StatefulFunctions] = []
        for f in functions:
            if isinstance(f, StatefulFunctions):
                self._functions.append(f)
            else:
                self._functions.extend(f)
        self._tmp: str | None = None
        if state_dir is None:
            self._tmp = state_dir = tempfile.mkdtemp(prefix="statefun-mesh-")
        self.config = MeshConfig(state_dir=str(state_dir), **settings)
        self._peer = Peer(self.config, self._functions, peer_id=0, clock=clock)

    @property
    def peers(self) -> list[Peer]:
        """The mesh's peers."""
        return [self._peer]

    async def start(self) -> None:
        """Start the peers."""
        await self._peer.start()

    async def aclose(self) -> None:
        """Finish queued work, stop the peers, and delete a temporary state directory."""
        try:
            await self._peer.aclose()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None

    async def __aenter__(self) -> LocalMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, message: Message) -> None:
        """Send ``message`` to its target instance (see :meth:`Peer.send`)."""
        await self._peer.send(message)

    async def request(self, message: Message, timeout: float = 10.0) -> Message:
        """Send ``message`` and return the function's ``context.reply`` (see :meth:`Peer.request`)."""
        return await self._peer.request(message, timeout)

    def egress(self, typename: str, start: str | int = "earliest") -> AsyncIterator[EgressRecord]:
        """Iterate the records of an egress (see :meth:`Peer.egress`)."""
        return self._peer.egress(typename, start)

    async def idle(self) -> None:
        """Wait until all queued messages and due timers have been processed."""
        await self._peer.idle()
