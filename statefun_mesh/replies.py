"""The requests a peer's clients wait on, and matching replies to them.

Owns: the request ids this peer hands out (from a random start, so a restarted peer
never reuses an id an old request chain may still carry), the callbacks and timeout
timers of the requests waiting for their reply, the ``max_pending_requests`` bound, and
turning a reply (or a function's failure) into a call of its callback. Called by ``Peer``
(a request is made; a batch commits replies; a ``REPLIES`` frame arrives; a recovery or
close fails what waits). Calls only the requesters' callbacks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

from .dispatch import REPLY_OK
from .errors import FunctionNotFoundError, InvocationError, MeshBusyError
from .messages import Message

__all__ = ["Answer", "PendingRequests"]

log = logging.getLogger("statefun_mesh.peer")


#: called with ``(reply, None)`` or ``(None, error)`` once a request ends
Answer = Callable[["Message | None", "BaseException | None"], None]


class _Waiter:
    __slots__ = ("on_done", "timer")

    def __init__(self, on_done: Answer, timer: asyncio.TimerHandle) -> None:
        self.on_done = on_done
        self.timer = timer


class PendingRequests:
    """Requests waiting for replies on one peer.

    A request is a callback and one timer on the loop (its timeout): no future, no task.
    The callback runs at once when the reply is resolved (in the batch or frame that
    brings it), so an answer leaves without another turn of the event loop.

    Args:
        peer_id: the peer's index (named in errors).
        max_pending: ``max_pending_requests``.
        table: the locally bound function types (named when a target type is unknown).
    """

    def __init__(self, peer_id: int, max_pending: int, table: Mapping[str, Any]) -> None:
        self.peer_id = peer_id
        self.max_pending = max_pending
        self.table = table
        self._waiting: dict[int, _Waiter] = {}
        # random start: a restarted peer never reuses an id an old request chain may carry
        self._ids = itertools.count(random.getrandbits(40) + 1)

    def __len__(self) -> int:
        return len(self._waiting)

    def next_id(self) -> int:
        """A request id not used before by this process."""
        return next(self._ids)

    def open(self, rid: int, timeout: float, expired: Callable[[], Exception], on_done: Answer) -> None:
        """Wait for the reply to request ``rid``: ``on_done`` is called once, with the reply,
        the function's failure, ``expired()`` after ``timeout`` seconds, or the error that
        fails every request (:meth:`fail_all`); never after :meth:`close`.

        Raises:
            MeshBusyError: ``max_pending_requests`` requests already wait here.
        """
        if len(self._waiting) >= self.max_pending:
            raise MeshBusyError(
                f"peer {self.peer_id} already holds {len(self._waiting)} requests waiting for replies "
                f"(max_pending_requests); retry once some are answered"
            )
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + timeout, self._expire, rid, expired)
        self._waiting[rid] = _Waiter(on_done, timer)

    def _expire(self, rid: int, expired: Callable[[], Exception]) -> None:
        self._finish(rid, None, expired())

    def _finish(self, rid: int, reply: Message | None, exc: BaseException | None) -> None:
        w = self._waiting.pop(rid, None)
        if w is None:
            return  # an answer after the first, or after the requester gave up
        w.timer.cancel()
        try:
            w.on_done(reply, exc)
        except Exception:  # the requester's problem: never the batch's or the frame's that resolved it
            log.exception("peer %d: answering request %d failed", self.peer_id, rid)

    def close(self, rid: int) -> None:
        """The requester of ``rid`` stopped waiting (cancelled): its callback is not called."""
        w = self._waiting.pop(rid, None)
        if w is not None:
            w.timer.cancel()

    def resolve(self, rid: int, status: int, kind: str, value: Any, r_type: str, r_id: str) -> None:
        """A reply to ``rid`` arrived: ``value`` of type ``kind`` from ``r_type/r_id``, or the
        function's failure (``status`` not OK)."""
        if rid not in self._waiting:
            return
        if status == REPLY_OK:
            self._finish(rid, Message(r_type, r_id, kind, value), None)
        elif kind == "FunctionNotFoundError":
            self._finish(rid, None, FunctionNotFoundError(value, list(self.table)))
        else:
            self._finish(rid, None, InvocationError(f"{r_type}/{r_id}", value))

    def fail_all(self, exc: Exception) -> None:
        """Fail every waiting request with ``exc`` (a recovery started, or the peer closes)."""
        for rid in list(self._waiting):
            self._finish(rid, None, exc)
