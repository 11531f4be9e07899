"""asyncio helpers that never swallow a cancellation.

Before Python 3.12, ``asyncio.wait_for`` has a race (CPython gh-86296): when the task
awaiting it is cancelled in the same loop iteration as the awaited thing completes, it
returns the result and the cancellation is lost. A peer cancels its dispatch loop to
start a recovery round at the very moment frames arrive and wake that loop; with the
cancellation lost, the loop ran on, the recovery waited for it for ever, and the whole
mesh stalled (a partition test in CI). Every timed wait in the package goes through
:func:`wait_for` here, which on 3.12 and later is ``asyncio.wait_for`` itself.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["wait_event", "wait_for"]

T = TypeVar("T")


async def _wait_for(aw: Awaitable[T], timeout: float | None) -> T:
    """``asyncio.wait_for`` without the lost-cancellation race of Python < 3.12."""
    if timeout is None:
        return await aw
    fut = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({fut}, timeout=max(timeout, 0.0))
    except BaseException:
        fut.cancel()  # we are cancelled: so is what we waited for, and we raise
        raise
    if done:
        return fut.result()
    fut.cancel()
    # as asyncio.wait_for does: let it finish cancelling before reporting the timeout
    # (asyncio.wait never swallows a cancellation of this task)
    await asyncio.wait({fut})
    if not fut.cancelled() and fut.exception() is None:
        return fut.result()  # it completed after all, just as the time ran out
    raise asyncio.TimeoutError


if sys.version_info >= (3, 12):
    wait_for = asyncio.wait_for
else:
    wait_for = _wait_for


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set (``True``) or ``timeout`` seconds pass (``False``)."""
    if event.is_set():
        return True
    try:
        await wait_for(event.wait(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return False
    return True
