"""A peer's egress logs as consumers see them: what is released, reading, waiting, resuming.

Owns: the released head of every egress (with checkpoints, consumers see a record once a
complete checkpoint covers it — transactional egress — unless the egress is immediate),
the heads the last restore left (readers are moved back to them after a recovery, since
offsets past them are reused), and the events readers wait on. The records themselves
are in the state store (lmdb_backend.py owns their layout); the dispatcher writes them.

Called by: ``Peer`` (its public ``egress*`` methods delegate here; it reports commits,
completed checkpoints, restores, recoveries and closing). Calls: nothing but the state
store and the three callables it is given.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING

from . import _aio
from .errors import ClosedTransportError
from .messages import EgressRecord

if TYPE_CHECKING:
    from .state.lmdb_backend import LmdbStateBackend

__all__ = ["EgressLogs"]

log = logging.getLogger("statefun_mesh.peer")


class EgressLogs:
    """The egress side of one peer.

    Args:
        peer_id: the peer's index (stamped on every record read).
        checkpointing: whether consumers wait for checkpoints (transactional egress).
        immediate: egresses whose records are readable at commit (``egress_immediate``).
        store: the peer's open state store, or ``None`` (closed, or reopening).
        generation: the peer's current generation.
        closing: whether the peer is closing (readers stop).
    """

    def __init__(
        self,
        peer_id: int,
        checkpointing: bool,
        immediate: Iterable[str],
        store: Callable[[], LmdbStateBackend | None],
        generation: Callable[[], int],
        closing: Callable[[], bool],
    ) -> None:
        self.peer_id = peer_id
        self.checkpointing = checkpointing
        self.immediate = frozenset(immediate)
        self._store = store
        self._generation = generation
        self._closing = closing
        #: per egress: the offset after the last record a complete checkpoint covers
        self.released: dict[str, int] = {}
        #: per egress: where its log stood in the checkpoint the last restore loaded
        self.restored_heads: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}

    # -- reading ------------------------------------------------------------------------

    def position(self, typename: str, start: str | int) -> int:
        """Resolve ``"earliest"``, ``"latest"`` or an offset to an offset of this peer's egress log."""
        backend = self._store()
        if backend is None or self._closing():
            raise ClosedTransportError("the peer is not running")
        first, _ = backend.egress_bounds(typename)
        if start == "earliest":
            return first
        if start == "latest":
            return self.head(typename)
        if isinstance(start, int) and not isinstance(start, bool) and start >= 0:
            return start
        raise ValueError(f"start must be 'earliest', 'latest' or an offset >= 0, got {start!r}")

    def head(self, typename: str) -> int:
        """The offset after the last record consumers may see: with checkpoints, the last
        record a complete checkpoint covers (transactional egress); else the last one."""
        if self.checkpointing and typename not in self.immediate:
            return self.released.get(typename, 0)
        backend = self._store()
        if backend is None:
            return 0
        return backend.egress_bounds(typename)[1]

    def restored_head(self, typename: str) -> int:
        """Where ``typename``'s log stood in the checkpoint the last recovery restored."""
        return self.restored_heads.get(typename, 0)

    def resume(self, typename: str, pos: int, generation: int) -> int:
        """Where a reader at ``pos``, read in ``generation`` (-1: none), continues: after a
        recovery since, offsets past the restored head are reused, so from there."""
        if 0 <= generation != self._generation():
            return min(pos, self.restored_head(typename))
        return pos

    def read(self, typename: str, pos: int, limit: int) -> list[EgressRecord]:
        """Return up to ``limit`` released records from offset ``pos`` on, without waiting."""
        backend = self._store()
        if backend is None:
            return []
        head = self.head(typename)
        if pos >= head:
            return []
        return [
            EgressRecord(typename, self.peer_id, off, vt, data, rid)
            for off, vt, data, rid in backend.egress_range(typename, pos, min(limit, head - pos))
            if off < head
        ]

    async def wait(self, typename: str, pos: int, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a record at or after ``pos`` (or the peer closing)."""
        event = self._events.get(typename)
        if event is None:
            event = self._events[typename] = asyncio.Event()
        if self.head(typename) > pos or self._closing():
            return
        try:
            await _aio.wait_for(event.wait(), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            pass

    async def iterate(self, typename: str, pos: int) -> AsyncIterator[EgressRecord]:
        """Every record from ``pos`` on, waiting for new ones, until the peer closes."""
        gen = self._generation()
        while True:
            pos, gen = self.resume(typename, pos, gen), self._generation()
            records = self.read(typename, pos, 1000)
            if records:
                if records[0].offset > pos:
                    log.warning(
                        "egress %r consumer fell behind retention: records %d..%d were trimmed",
                        typename,
                        pos,
                        records[0].offset - 1,
                    )
                for rec in records:
                    yield rec
                pos = records[-1].offset + 1
                continue
            if self._closing():
                return
            await self.wait(typename, pos, 3600.0)

    # -- what the peer reports ---------------------------------------------------------

    def committed(self, typenames: Iterable[str]) -> None:
        """A batch committed records of ``typenames``: wake the readers of those visible at once."""
        for typename in typenames:
            if not self.checkpointing or typename in self.immediate:
                self._wake(typename)

    def release(self, heads: dict[str, int]) -> None:
        """A checkpoint completed: consumers may read each log up to ``heads``."""
        for typename, head in heads.items():
            if head > self.released.get(typename, 0):
                self.released[typename] = head
                self._wake(typename)

    def restored(self, heads: dict[str, int]) -> None:
        """A restore loaded a checkpoint whose logs stood at ``heads``."""
        self.released = heads
        self.restored_heads = dict(heads)

    def wake_all(self) -> None:
        """Wake every reader (a recovery moved the heads, or the peer closes)."""
        for typename in list(self._events):
            self._wake(typename)

    def _wake(self, typename: str) -> None:
        ev = self._events.get(typename)
        if ev is not None:
            ev.set()
            self._events[typename] = asyncio.Event()
