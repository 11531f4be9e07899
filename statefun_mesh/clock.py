"""Time sources for peers: the wall clock, and a manual clock for tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from . import _aio

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock:
    """What a peer asks of time: the current time, and a wait that a newer event cuts short."""

    def now(self) -> float:
        """Seconds since the epoch."""
        raise NotImplementedError

    async def wait(self, event: asyncio.Event, deadline: float | None) -> None:
        """Return when ``event`` is set or the clock reaches ``deadline`` (``None``: never)."""
        raise NotImplementedError


class SystemClock(Clock):
    """The wall clock (``time.time``) with asyncio's timers."""

    def now(self) -> float:
        return time.time()

    async def wait(self, event: asyncio.Event, deadline: float | None) -> None:
        if deadline is None:
            await event.wait()
            return
        delay = deadline - time.time()
        if delay <= 0:
            return
        try:
            await _aio.wait_for(event.wait(), delay)
        except (asyncio.TimeoutError, TimeoutError):
            pass


class ManualClock(Clock):
    """A clock that moves only when a test calls :meth:`advance` (for ``send_after`` tests)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every waiter whose deadline has passed."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds
        while self._waiters and self._waiters[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    async def wait(self, event: asyncio.Event, deadline: float | None) -> None:
        if deadline is not None and deadline <= self._now:
            return
        waiter = asyncio.ensure_future(event.wait())
        waits: set[asyncio.Future[object]] = {waiter}  # type: ignore[arg-type]
        if deadline is not None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (deadline, next(self._seq), fut))
            waits.add(fut)  # type: ignore[arg-type]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
