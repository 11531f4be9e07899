"""A thread that notices when a function holds a peer's event loop, and names it.

A peer runs every function on its event loop (docs/concepts.md, "Sync functions and
blocking"). A synchronous function that blocks — ``time.sleep``, a blocking HTTP call,
a long computation — or an ``async`` one that blocks between two awaits, stops
everything else on that loop: messages, client calls, heartbeats, checkpoints. Python
cannot preempt it, so the peer does the next best thing: a daemon thread watches a
timestamp the loop refreshes a few times per ``threshold``, and when it goes stale it
logs which function and address hold the loop and for how long, at ``threshold``,
then at every doubling (1 s, 2 s, 4 s, ...), and once more when the loop runs again.

The thread only reads: the address a dispatcher marks as running its sync function
(``Dispatcher.current``), or the name of the asyncio task the loop is in (each async
invocation runs in a task named ``statefun-mesh <type>/<id>``). Several peers on one
event loop (``LocalMesh``) share one watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .logutil import ThrottledLog

__all__ = ["LoopWatchdog", "watch"]

log = logging.getLogger("statefun_mesh.peer")

_KIND = "blocked event loop"


class LoopWatchdog:
    """Watches one event loop on behalf of the peers that run on it.

    Args:
        loop: the event loop to watch.
        threshold: seconds the loop may be held before a warning.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float) -> None:
        self.loop = loop
        self.threshold = threshold
        self.interval = min(threshold / 4, 0.25)
        #: (peer id, function returning that peer's dispatcher or None)
        self.peers: list[tuple[int, Callable[[], Any]]] = []
        self._tlog = ThrottledLog(log)
        self._tick = time.monotonic()
        self._stop = threading.Event()
        self._handle: asyncio.TimerHandle | None = None
        # the episode in progress, written by the thread and ended by the loop
        self._culprit: str | None = None
        self._loud = False
        self._next = threshold
        self._thread = threading.Thread(target=self._watch, name="statefun-mesh loop watchdog", daemon=True)

    def start(self) -> None:
        """Start watching (call on the loop's thread)."""
        self._tick = time.monotonic()
        self._handle = self.loop.call_later(self.interval, self._beat)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and the loop-side timer (call on the loop's thread)."""
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    # -- on the event loop ------------------------------------------------------------

    def _beat(self) -> None:
        now = time.monotonic()
        held = now - self._tick
        self._tick = now
        culprit, loud = self._culprit, self._loud
        if culprit is not None:
            self._culprit = None
            self._loud = False
            self._next = self.threshold
            if loud:
                log.warning("%s held the event loop for %.1f s; the peer runs again", culprit, held)
        if not self._stop.is_set():
            self._handle = self.loop.call_later(self.interval, self._beat)

    # -- on the watchdog thread -------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            held = time.monotonic() - self._tick
            if held < self._next:
                continue
            first = self._culprit is None
            if first:
                self._culprit = self._find_culprit()
            if first:
                self._loud = self._tlog.warning(
                    _KIND,
                    "%s has held the event loop for %.1f s: this peer handles no other message, client call, "
                    "heartbeat or checkpoint until it returns (other peers may report it unavailable); "
                    "make it async, or run its blocking part with asyncio.to_thread or statefun_mesh.in_thread",
                    self._culprit,
                    held,
                )
            elif self._loud:
                log.warning("%s still holds the event loop, for %.1f s now", self._culprit, held)
            self._next *= 2
        self._tlog.flush()

    def _find_culprit(self) -> str:
        for peer_id, dispatcher in list(self.peers):
            d = dispatcher()
            address = getattr(d, "current", None) if d is not None else None
            if address is not None:
                return f"peer {peer_id}: sync function {address.typename} (address {address})"
        try:
            task = asyncio.current_task(self.loop)
        except RuntimeError:
            task = None
        name = task.get_name() if task is not None else ""
        ids = ", ".join(str(p) for p, _ in self.peers)
        if name.startswith("statefun-mesh ") and not name.startswith("statefun-mesh peer"):
            address = name[len("statefun-mesh ") :]
            typename = "/".join(address.split("/", 2)[:2])
            return f"peer {ids}: async function {typename} (address {address}), between two awaits,"
        return f"peer {ids}: {'task ' + repr(name) if name else 'code outside any function'}"


_watchdogs: dict[asyncio.AbstractEventLoop, LoopWatchdog] = {}


def watch(peer_id: int, dispatcher: Callable[[], Any], threshold: float) -> Callable[[], None]:
    """Watch the running loop for peer ``peer_id``; returns the function that stops it.

    Peers on one loop share one watchdog (the first peer's ``threshold`` applies); it
    stops when the last of them does.
    """
    loop = asyncio.get_running_loop()
    wd = _watchdogs.get(loop)
    if wd is None or wd._stop.is_set():
        wd = LoopWatchdog(loop, threshold)
        _watchdogs[loop] = wd
        wd.start()
    entry = (peer_id, dispatcher)
    wd.peers.append(entry)

    def unwatch() -> None:
        if entry in wd.peers:
            wd.peers.remove(entry)
        if not wd.peers:
            wd.stop()
            if _watchdogs.get(loop) is wd:
                del _watchdogs[loop]

    return unwatch
