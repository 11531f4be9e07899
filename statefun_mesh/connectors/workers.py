"""The worker lifecycle the Kafka ingress and egress share: their tasks, and the client calls
those tasks run in worker threads.

confluent-kafka's calls block, so they run in worker threads (``asyncio.to_thread``).
Cancelling the task that awaits one does not stop the thread (nothing can), and librdkafka
must not destroy a handle another thread is using: so every call is tracked, and a
connector closes its clients only when :meth:`ClientTasks._stop_tasks` says none runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["ClientTasks"]


class ClientTasks:
    """A base for a connector that runs tasks which call a blocking client in worker threads."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        #: set by :meth:`_stop_tasks`: the tasks' loops end
        self._closing = False
        #: client calls running in worker threads: a client is closed only when none runs
        self._busy: set[asyncio.Future[Any]] = set()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, tracked so :meth:`_stop_tasks` can wait for it."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._busy.add(fut)
        fut.add_done_callback(self._busy.discard)
        return await asyncio.shield(fut)

    def _start_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _stop_tasks(self, timeout: float) -> bool:
        """Cancel the tasks and await them, then wait up to ``timeout`` s for the client calls
        still running in worker threads. True when none runs, so the clients may be closed."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        if self._busy:
            await asyncio.wait(set(self._busy), timeout=timeout)
        return not self._busy
