"""What the client endpoint (server.py) and other front doors may ask of a peer.

:class:`ClientHost` is the typed interface ``Peer`` offers to code that admits client
messages and serves egress reads; ``server.py`` depends on it, not on ``Peer``, so the
peer can import its front doors without an import cycle. Also here: the request-timeout
check both sides apply.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .peer_view import PeerView

if TYPE_CHECKING:
    from .dispatch import Record
    from .messages import EgressRecord, Message
    from .replies import Answer

__all__ = ["ClientHost", "check_request_timeout"]


def check_request_timeout(timeout: object, maximum: float) -> float:
    """Return ``timeout`` if it is a finite number of seconds in (0, ``maximum``].

    Raises:
        ValueError: it is not (NaN, infinite, negative, zero, too long, not a number).
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"a request timeout must be a number of seconds, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and 0 < timeout <= maximum):
        raise ValueError(
            f"a request timeout must be a finite number of seconds > 0 and at most {maximum:g} "
            f"(max_request_timeout), got {timeout!r}"
        )
    return float(timeout)


class ClientHost(PeerView, Protocol):
    """The peer as its client endpoint sees it (and, from :class:`PeerView`, its
    ``config``, ``peer_id`` and ``n_peers``)."""

    #: frames refused as malformed (the endpoint counts its own in too)
    bad_frames: int

    @property
    def generation(self) -> int: ...

    @property
    def table(self) -> Mapping[str, Any]:
        """The locally bound function types."""
        ...

    @property
    def running(self) -> bool: ...

    @property
    def checkpointing(self) -> bool: ...

    def is_remote(self, typename: str) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def check_message(self, rec: Record, what: str = "message") -> None: ...

    def admits(self) -> bool: ...

    async def admit(self) -> None: ...

    def accept_nowait(self, rec: Record, *, durable: bool = True) -> asyncio.Future[None] | None: ...

    async def request_raw(self, typename: str, id: str, vt: str, value: bytes, timeout: float) -> Message: ...

    def request_nowait(
        self, typename: str, id: str, vt: str, value: bytes, timeout: float, on_done: Answer
    ) -> int | None: ...

    def egress_position(self, typename: str, start: str | int) -> int: ...

    def egress_head(self, typename: str) -> int: ...

    def egress_resume(self, typename: str, pos: int, generation: int) -> int: ...

    def egress_read(self, typename: str, pos: int, limit: int) -> list[EgressRecord]: ...

    async def egress_wait(self, typename: str, pos: int, timeout: float) -> None: ...
