"""A plain ZeroMQ socket served by the event loop's reader callback, not pyzmq's asyncio layer.

Owns: reading a socket from ``loop.add_reader`` on its ``FD``, draining it with non-blocking
receives, and the wake-ups ZeroMQ's edge-triggered FD needs. Used by the peer links
(``zeromq.py``), the client endpoint (``server.py``) and ``MeshClient`` (``client.py``).

Why: ``zmq.asyncio`` makes a future and schedules callbacks for every message sent or
received; on a request's path that was a quarter of a peer's CPU (bench/RESULTS.md,
"What bounds it"). Here a message costs one non-blocking ``recv`` and one ``send``.

ZeroMQ's ``FD`` is not the socket's readiness: it signals that the socket's state may have
changed, and it is reset by *any* call that processes the socket's pending commands,
``send`` included. So: the reader callback receives until ``EAGAIN`` and then checks
``EVENTS``; and whoever sends on the socket outside that callback calls
:meth:`LoopSocket.sent`, which checks ``EVENTS`` and schedules a drain when a message
waits (else a message that arrived during the send would wait for the next one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

import zmq

from ..logutil import ThrottledLog

__all__ = ["LoopSocket"]

log = logging.getLogger("statefun_mesh.transport")

#: messages handled per reader callback before the loop runs others (then it continues)
DRAIN_BUDGET: Final = 512


class LoopSocket:
    """Calls ``on_message(parts)`` for every message ``sock`` receives, from the running loop.

    Args:
        sock: a plain (not ``zmq.asyncio``) socket; this object owns it from now on.
        on_message: called with the message's parts (``bytes``, or ``zmq.Frame`` with
            ``copy=False``); an exception it raises is logged and the next message read.
        copy: receive ``bytes`` (``True``) or frames (``False``, e.g. to read ``User-Id``).
        on_writable: called when the socket may take sends again (after a send met
            ``EAGAIN``, the owner calls :meth:`want_write`).
        name: names the socket in log lines.
        tlog: where repeated problems are logged (the owner flushes it); default: a new one.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        on_message: Callable[[list[Any]], None],
        *,
        copy: bool = True,
        on_writable: Callable[[], None] | None = None,
        name: str = "socket",
        tlog: ThrottledLog | None = None,
    ) -> None:
        self.sock = sock
        self.on_message = on_message
        self.on_writable = on_writable
        self.copy = copy
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._scheduled: asyncio.Handle | None = None
        self._want_write = False
        self._draining = False
        self._sent_in_drain = False
        self._closed = False
        self.tlog = tlog if tlog is not None else ThrottledLog(log)
        self._loop.add_reader(self._fd, self._ready)
        # messages may be waiting already, and the FD only signals a change
        self._schedule()

    @property
    def closed(self) -> bool:
        return self._closed

    def _schedule(self) -> None:
        if self._scheduled is None and not self._closed:
            self._scheduled = self._loop.call_soon(self._ready)

    def want_write(self) -> None:
        """A send met ``EAGAIN``: call ``on_writable`` at the socket's next event that finds it
        writable. (Not at once: a ROUTER is "writable" when *any* connection has room, so
        that would spin while one connection stays full; its owner retries on a timer too.)"""
        self._want_write = True

    def sent(self) -> None:
        """Call after sending on the socket: the send may have consumed the FD's signal of a
        message that arrived meanwhile. (Inside ``on_message``/``on_writable`` it costs
        nothing: the drain checks once at its end.)"""
        if self._draining:
            self._sent_in_drain = True
        elif self._scheduled is None and not self._closed:
            events: int = self.sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
            if events & zmq.POLLIN:
                self._scheduled = self._loop.call_soon(self._ready)

    def _ready(self) -> None:
        self._scheduled = None
        if self._closed:
            return
        self._draining = True
        try:
            self._drain()
        finally:
            self._draining = False

    def _drain(self) -> None:
        sock = self.sock
        recv = sock.recv_multipart
        copy = self.copy
        on_message = self.on_message
        self._sent_in_drain = False
        for _ in range(DRAIN_BUDGET):
            try:
                parts = recv(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                # The EAGAIN processed every pending command, so the FD signals the next
                # change; only a send since then (here, or a writable callback) can have
                # consumed such a signal: then ask EVENTS. (Each of these calls is a system
                # call or two: skipped when it cannot matter.)
                if self._want_write and self.on_writable is not None:
                    events: int = sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
                    if events & zmq.POLLOUT:
                        self._want_write = False
                        self._call(self.on_writable)
                        if self._closed:
                            return
                        self._sent_in_drain = True
                if not self._sent_in_drain:
                    return
                self._sent_in_drain = False
                events = sock.getsockopt(zmq.EVENTS)  # type: ignore[assignment]
                if events & zmq.POLLIN:
                    continue  # arrived while we sent: the FD will not say so again
                return
            except zmq.ZMQError as exc:
                if self._closed or exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                    return
                # not expected from a live socket: say so, and try again a little later
                # (calling back at once would spin if it persists)
                self.tlog.error(f"receive failures on {self.name}", "%s: receive failed: %s", self.name, exc)
                self._scheduled = self._loop.call_later(0.1, self._ready)
                return
            try:
                on_message(parts)
            except Exception:
                self.tlog.log(
                    logging.ERROR,
                    f"handler errors on {self.name}",
                    "%s: handling a message failed",
                    self.name,
                    exc_info=True,
                )
            if self._closed:
                return
        # more may wait: go on after the other callbacks had their turn (the scheduled
        # drain ends with its own checks)
        self._schedule()

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            self.tlog.log(
                logging.ERROR,
                f"handler errors on {self.name}",
                "%s: a writable callback failed",
                self.name,
                exc_info=True,
            )

    def stop(self) -> None:
        """Stop reading (idempotent); the socket stays open until :meth:`close`."""
        if self._closed:
            return
        self._closed = True
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        try:
            self._loop.remove_reader(self._fd)
        except (RuntimeError, ValueError):  # the loop is closed already
            pass

    def close(self, linger: int | None = 0) -> None:
        """Stop reading and close the socket (idempotent)."""
        self.stop()
        if not self.sock.closed:
            self.sock.close(linger)
