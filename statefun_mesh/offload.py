"""``in_thread``: run a blocking synchronous function off the peer's event loop."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["in_thread"]


def in_thread(fun: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
    """Make a blocking ``def`` function run in a worker thread, one invocation at a time per address.

    Put it under ``bind``::

        @functions.bind(typename="example/report", specs=[...])
        @in_thread
        def report(context, message):
            data = requests.get(url, timeout=30).json()  # blocks, but not the peer
            context.storage.last = data

    The result is an ``async`` function to the peer: its invocation runs in asyncio's
    default thread pool (``asyncio.to_thread``), and while it runs, the address is
    parked like any async invocation that awaits (docs/concepts.md, "Slow functions"):
    its later messages wait behind it, every other address goes on. Everything the
    function does through ``context`` (storage, ``send``, ``send_after``, egress,
    ``reply``) is private to this invocation, so it is safe from the thread; the
    function must not touch the event loop or objects shared with other functions.

    The pool has ``min(32, cores + 4)`` threads: beyond that many blocked addresses at
    once, the next ones wait for a thread. An invocation of a recovery that is rolled
    back cannot be stopped: its thread runs to the end, and its effects are discarded.

    Raises:
        TypeError: ``fun`` is already ``async``.
    """
    if inspect.iscoroutinefunction(fun):
        raise TypeError(f"in_thread takes a def function; {fun.__qualname__} is async already")

    @functools.wraps(fun)
    async def run(context: Any, message: Any) -> Any:
        return await asyncio.to_thread(fun, context, message)

    return run
