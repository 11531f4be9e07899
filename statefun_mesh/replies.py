"""The requests a peer's clients wait on, and matching replies to them.

Owns: the request ids this peer hands out (from a random start, so a restarted peer
never reuses an id an old request chain may still carry), the futures of the requests
waiting for their reply, the ``max_pending_requests`` bound, and turning a reply (or a
function's failure) into the result of its future. Called by ``Peer`` (a request is
made; a batch commits replies; a ``REPLIES`` frame arrives; a recovery or close fails
what waits). Calls nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable, Mapping
from typing import Any

from .dispatch import REPLY_OK
from .errors import FunctionNotFoundError, InvocationError, MeshBusyError
from .messages import Message

__all__ = ["PendingRequests"]


class PendingRequests:
    """Requests waiting for replies on one peer.

    Args:
        peer_id: the peer's index (named in errors).
        max_pending: ``max_pending_requests``.
        table: the locally bound function types (named when a target type is unknown).
    """

    def __init__(self, peer_id: int, max_pending: int, table: Mapping[str, Any]) -> None:
        self.peer_id = peer_id
        self.max_pending = max_pending
        self.table = table
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        # random start: a restarted peer never reuses an id an old request chain may carry
        self._ids = itertools.count(random.getrandbits(40) + 1)

    def __len__(self) -> int:
        return len(self._waiting)

    def next_id(self) -> int:
        """A request id not used before by this process."""
        return next(self._ids)

    def open(
        self, rid: int, timeout: float | None = None, expired: Callable[[], Exception] | None = None
    ) -> asyncio.Future[Message]:
        """Wait for the reply to request ``rid``.

        With ``timeout``, the future fails with ``expired()`` after ``timeout`` seconds (one
        timer on the loop, no task), and ``rid`` is closed when the future is done, however
        (answered, expired, cancelled or failed).

        Raises:
            MeshBusyError: ``max_pending_requests`` requests already wait here.
        """
        if len(self._waiting) >= self.max_pending:
            raise MeshBusyError(
                f"peer {self.peer_id} already holds {len(self._waiting)} requests waiting for replies "
                f"(max_pending_requests); retry once some are answered"
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        self._waiting[rid] = fut
        if timeout is not None:
            timer = loop.call_at(loop.time() + timeout, self._expire, rid, expired)
            waiting = self._waiting

            def done(_: asyncio.Future[Message]) -> None:
                timer.cancel()
                waiting.pop(rid, None)

            fut.add_done_callback(done)
        return fut

    def _expire(self, rid: int, expired: Callable[[], Exception] | None) -> None:
        fut = self._waiting.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(expired() if expired is not None else TimeoutError(f"request {rid} timed out"))

    def close(self, rid: int) -> None:
        """The requester of ``rid`` stopped waiting (answered, timed out or cancelled)."""
        self._waiting.pop(rid, None)

    def resolve(self, rid: int, status: int, kind: str, value: Any, r_type: str, r_id: str) -> None:
        """A reply to ``rid`` arrived: ``value`` of type ``kind`` from ``r_type/r_id``, or the
        function's failure (``status`` not OK)."""
        fut = self._waiting.get(rid)
        if fut is None or fut.done():
            return  # an answer after the first, or after the requester gave up
        if status == REPLY_OK:
            fut.set_result(Message(r_type, r_id, kind, value))
        elif kind == "FunctionNotFoundError":
            fut.set_exception(FunctionNotFoundError(value, list(self.table)))
        else:
            fut.set_exception(InvocationError(f"{r_type}/{r_id}", value))

    def fail_all(self, exc: Exception) -> None:
        """Fail every waiting request with ``exc`` (a recovery started, or the peer closes)."""
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiting.clear()
