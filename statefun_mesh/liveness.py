"""Liveness between peers: heartbeats, who is reachable, restarts, and lost links.

Owns: this process's incarnation (a random id its heartbeats carry: a new one means a
new process, or a peer that asks for a recovery), the incarnation last heard from every
other peer, when each was last heard, which are reachable, and the links ZeroMQ reported
lost. It decides *that* something happened — a peer restarted, a link was lost and made
again while the other side kept running — and tells the peer through callbacks; what to
do about it (reset credit, start a recovery round) is the peer's.

Called by: ``Peer`` (every frame from a peer: :meth:`Liveness.heard`; heartbeat frames;
the transport's lost-link report). Calls: only the callables it is given.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .transport import codec

if TYPE_CHECKING:
    from .clock import Clock
    from .config import MeshConfig

__all__ = ["Liveness"]

log = logging.getLogger("statefun_mesh.peer")


def new_incarnation() -> int:
    """A fresh incarnation id (odd, so never the 0 of "not heard yet")."""
    return random.getrandbits(48) | 1


class Liveness:
    """Heartbeats of one peer and what it knows of the others.

    Args:
        peer_id, n_peers, config, clock: the peer's.
        send: sends a control frame to a peer.
        queued_for: messages waiting to go to a peer (for the log line when it goes quiet).
        on_incarnation: ``(peer, restarted)``: a peer was heard with a new incarnation
            (``restarted``: it had another one before; else first contact).
        on_link_reset: a peer's link was lost and made again while it kept running.
        on_tick: called after each round of heartbeats (log flushes, housekeeping).
    """

    def __init__(
        self,
        peer_id: int,
        n_peers: int,
        config: MeshConfig,
        clock: Clock,
        *,
        send: Callable[[int, bytes], None],
        queued_for: Callable[[int], int],
        on_incarnation: Callable[[int, bool], None],
        on_link_reset: Callable[[int], None],
        on_tick: Callable[[float], None],
    ) -> None:
        self.peer_id = peer_id
        self.n_peers = n_peers
        self.config = config
        self.clock = clock
        self._send = send
        self._queued_for = queued_for
        self._on_incarnation = on_incarnation
        self._on_link_reset = on_link_reset
        self._on_tick = on_tick
        self.incarnation = new_incarnation()
        self.incarnations = [0] * n_peers
        #: per peer: (its incarnation, when) when our connection to it was lost; see on_link_lost
        self.link_lost: list[tuple[int, float] | None] = [None] * n_peers
        self.last_heard = [0.0] * n_peers
        #: per peer: heard within ``heartbeat_timeout`` (its messages wait while it is not)
        self.alive = [True] * n_peers

    def started(self) -> None:
        """The transport is up: count silence from now."""
        self.last_heard = [self.clock.now()] * self.n_peers

    def renew(self) -> None:
        """Take a new incarnation: the next heartbeat makes the coordinator start a recovery round."""
        self.incarnation = new_incarnation()

    def heard(self, src: int) -> None:
        """A frame from ``src`` arrived."""
        self.last_heard[src] = self.clock.now()

    def unavailable(self) -> list[int]:
        """The peers not heard from within ``heartbeat_timeout``."""
        return [p for p in range(self.n_peers) if not self.alive[p]]

    def on_heartbeat(self, src: int, items: list[Any]) -> bool:
        """A heartbeat from ``src``; ``False`` if it is malformed (claims another sender)."""
        if items[0] != src:
            return False
        inc = items[1]
        if inc != self.incarnations[src]:
            restarted = bool(self.incarnations[src])
            self.incarnations[src] = inc
            self._on_incarnation(src, restarted)
        if not self.alive[src]:
            self.alive[src] = True
            log.warning("peer %d: peer %d is reachable again", self.peer_id, src)
        lost = self.link_lost[src]
        if lost is not None:
            if inc != lost[0]:
                self.link_lost[src] = None  # it restarted: that restart's recovery covers the link
            elif self.clock.now() - lost[1] >= 2 * self.config.heartbeat_interval:
                self.link_lost[src] = None  # (a heartbeat sent before the loss is no proof)
                self._on_link_reset(src)
        return True

    def on_link_lost(self, p: int) -> None:
        """Our connection to peer ``p`` was lost; ZeroMQ makes it again. If ``p`` did not
        restart (it is heard again with the same incarnation), frames that were in flight
        on the lost connection may be gone for good: ``on_link_reset`` is told."""
        self.link_lost[p] = (self.incarnations[p], self.clock.now())

    async def run(self) -> None:
        """Send heartbeats every ``heartbeat_interval`` and mark the peers gone quiet."""
        cfg = self.config
        last = self.clock.now()
        while True:
            frame = codec.encode_control(codec.HEARTBEAT, self.peer_id, self.incarnation)
            now = self.clock.now()
            # after this peer's own loop was held (a blocking function), the silence is
            # ours: give the frames that waited one round to be read before judging others
            held, last = now - last > cfg.heartbeat_timeout, now
            for p in range(self.n_peers):
                if p == self.peer_id:
                    continue
                self._send(p, frame)
                if not held and self.alive[p] and now - self.last_heard[p] > cfg.heartbeat_timeout:
                    self.alive[p] = False
                    log.warning(
                        "peer %d: no word from peer %d for %.1f s; holding its %d outgoing messages until it is back",
                        self.peer_id,
                        p,
                        now - self.last_heard[p],
                        self._queued_for(p),
                    )
            self._on_tick(now)
            await asyncio.sleep(cfg.heartbeat_interval)
