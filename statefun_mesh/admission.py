"""Admission of client messages: whether a peer takes one more, and taking it in.

Owns: the size check every message from outside passes (``max_message_bytes``), the
gate clients wait at (``inbox_limit`` messages, a quarter of ``memory_budget`` queued,
anything spilled or waiting in the outbox, or the ingress log still being replayed after a recovery), the event
that wakes them when room comes back, and handing an admitted message to the ingress
writer (logged first, with checkpoints on) or straight to the router.

Called by: ``Peer`` (its client API ``send``/``request``, and on behalf of the client
endpoint and the connectors through ``client_host.ClientHost``); the router and the
ingress writer call :meth:`Admission.check_space` when what was queued left. Calls: the
router, the ingress writer, and the callables it is given. See docs/architecture.md §5.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _speedups
from .errors import ClosedTransportError, MessageTooLargeError

if TYPE_CHECKING:
    from .config import MeshConfig
    from .dispatch import Record
    from .ingress_writer import IngressWriter
    from .routing import Router

__all__ = ["Admission"]


class Admission:
    """Args:
    config: the peer's settings (``inbox_limit``, ``max_message_bytes``).
    router: routes admitted messages; its queues count against the limits.
    ingress_writer: logs durable messages (group commit) and then routes them.
    pressure: messages queued at the peer (router, ingress writer, parked backlog).
    replaying: whether the ingress log is being replayed after a recovery (clients wait).
    logged: whether durable messages are logged first (checkpoints on, ingress log open).
    resumed, closing: the peer's state (it processes in its generation; it shuts down).
    resumed_event: set when the peer resumes (or closes): clients waiting to be admitted wake.
    """

    def __init__(
        self,
        config: MeshConfig,
        router: Router,
        ingress_writer: IngressWriter,
        *,
        pressure: Callable[[], int],
        replaying: Callable[[], bool],
        logged: Callable[[], bool],
        resumed: Callable[[], bool],
        closing: Callable[[], bool],
        resumed_event: asyncio.Event,
    ) -> None:
        self.config = config
        self._router = router
        self._ingress_writer = ingress_writer
        self._pressure = pressure
        self._replaying = replaying
        self._logged = logged
        self._resumed = resumed
        self._closing = closing
        self._resumed_event = resumed_event
        self._message_limit = config.message_limit
        #: set while there is room: clients waiting in :meth:`admit` wake when it is
        self.space = asyncio.Event()
        self.space.set()

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

    def full(self) -> bool:
        """Over ``inbox_limit`` messages or a quarter of ``memory_budget``, spilling, or sends
        waiting in the outbox: clients wait."""
        router = self._router
        return (
            self._pressure() >= self.config.inbox_limit
            or router.inbox_bytes + router.out_bytes() >= router.out_cap
            or router.spilled() > 0
            or router.outbox.count > 0
            or self._replaying()
        )

    def check_space(self) -> None:
        """What was queued left: wake the clients waiting in :meth:`admit` if there is room."""
        if not self.full():
            self.space.set()

    def admits(self) -> bool:
        """Whether :meth:`admit` would return at once."""
        return self._resumed() and not self._closing() and not self.full()

    async def admit(self) -> None:
        """Wait until the peer admits client messages (running, and under ``inbox_limit``)."""
        while True:
            if self._closing():
                raise ClosedTransportError("the peer is closing")
            if not self._resumed():
                await self._resumed_event.wait()
                continue
            if self.full():
                self.space.clear()
                await self.space.wait()
                continue
            break

    def accept_nowait(self, rec: Record, *, durable: bool = True) -> asyncio.Future[None] | None:
        """Take an admitted message in now (it counts in the peer's pressure at once).

        Returns ``None`` when the message is routed already, else a future that is done
        once it is in the ingress log (and routed), or fails if it could not be logged.
        """
        self.check_message(rec)
        if durable and self._logged():
            return self._ingress_writer.add(rec)
        self._router.route([rec], from_client=True)
        return None
