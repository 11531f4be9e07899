"""Group commit of client messages into a peer's ingress log, then routing them.

Owns: the client messages admitted and not yet logged, the one append in flight (every
message admitted meanwhile goes into the next append, so one fsync covers many
acknowledgements), and the log offset up to which messages are routed into the mesh —
what a checkpoint cut records as covered. Called by ``Peer`` (``accept_nowait`` with
checkpoints on; a recovery waits for the append in flight; the replay moves the routed
offset). Calls: the ingress log, and the callables it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import StatefunMeshError

if TYPE_CHECKING:
    from .dispatch import Record
    from .ingress import IngressLog
    from .logutil import ThrottledLog

__all__ = ["IngressWriter"]


class IngressWriter:
    """Args:
    peer_id: the peer's index (in log lines).
    log: the peer's ingress log (``None`` once closed).
    generation, resumed: the peer's current generation, and whether it routes client messages in it
        (it processes, and replays no ingress log after a recovery).
    route: routes client messages into the mesh (once logged).
    check_space: wakes clients waiting for admission (what was queued here left).
    tlog: the peer's throttled log.
    """

    def __init__(
        self,
        peer_id: int,
        log: Callable[[], IngressLog | None],
        generation: Callable[[], int],
        resumed: Callable[[], bool],
        route: Callable[[list[Record]], None],
        check_space: Callable[[], None],
        tlog: ThrottledLog,
    ) -> None:
        self.peer_id = peer_id
        self._log = log
        self._generation = generation
        self._resumed = resumed
        self._route = route
        self._check_space = check_space
        self._tlog = tlog
        self._batch: list[tuple[Record, asyncio.Future[None]]] = []
        self.task: asyncio.Task[None] | None = None
        self._writing = 0  # messages in the append under way
        #: ingress log offset up to which messages have been routed into the mesh
        self.routed = 0

    @property
    def queued(self) -> int:
        """Messages taken in and not yet routed (waiting, or in the append under way)."""
        return len(self._batch) + self._writing

    def add(self, rec: Record) -> asyncio.Future[None]:
        """Log ``rec`` with the next append; the future is done once it is logged and routed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.append((rec, fut))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return fut

    async def settle(self) -> None:
        """Wait for the append in flight (a recovery starts: its replay must see it in the log)."""
        if self.task is not None and not self.task.done():
            await asyncio.wait({self.task})

    async def _run(self) -> None:
        while self._batch and (log := self._log()) is not None:
            batch, self._batch = self._batch, []
            gen = self._generation()
            records = [r for r, _ in batch]
            self._writing = len(records)
            try:
                await asyncio.to_thread(log.append, records)
            except StatefunMeshError as exc:
                self._writing = 0
                self._check_space()
                self._tlog.error(
                    "failed ingress appends",
                    "peer %d: could not log %d client messages: %s",
                    self.peer_id,
                    len(records),
                    exc,
                )
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self._writing = 0
            if self._generation() == gen and self._resumed():
                self._route(records)
                # only now are these messages in the mesh: a snapshot cut from here on covers them
                self.routed = log.next_offset
            else:
                self._check_space()  # a recovery began meanwhile: its replay of the log delivers them
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
