"""This peer's side of a recovery round: RECOVER, restore, READY (repeated), RESUME.

Owns: the task restoring the checkpoint a round names (reading its manifest from the
blob store, retried while the store is unreachable and the round stands; a checkpoint
that cannot be restored is reported to the coordinator, which falls back to an earlier
one), whether this generation's restore is done, and READY: sent after a heartbeat
naming this process, and repeated while no RESUME comes (a READY or a RESUME lost with
a link that dropped again must not leave the round waiting for ever).

What a restore does to the peer (halt the generation, stop the loop, restore the state,
replay) is the peer's: it is handed in as ``begin`` and ``restore``. Called by: ``Peer``
(the coordinator's RECOVER and RESUME frames, its heartbeat tick). Calls: the blob store
and the callables it is given. The coordinator's side is snapshot/coordinator.py; see
docs/architecture.md §7.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import BlobNotFoundError, BlobStoreError
from .transport import codec

if TYPE_CHECKING:
    from .blobstore.base import BlobStore
    from .clock import Clock
    from .config import MeshConfig
    from .logutil import ThrottledLog
    from .snapshot.format import Manifest

__all__ = ["Recovery"]

log = logging.getLogger("statefun_mesh.peer")


class Recovery:
    """Args:
    peer_id, config, clock, tlog: the peer's.
    send: sends a control frame to a peer, stamped with a generation (``None``: the current one).
    incarnation: this process's incarnation (the heartbeat before READY names it).
    blobs: the peer's blob store (``None`` without checkpoints, or once closed).
    generation: the peer's current generation.
    begin: ``(gen)``: stop the current generation at once and take ``gen`` (before the restore).
    restore: ``(gen, manifest)``: restore ``manifest`` (``None``: empty state) in generation ``gen``.
    resume: ``(gen)``: start processing in generation ``gen``.
    """

    def __init__(
        self,
        peer_id: int,
        config: MeshConfig,
        clock: Clock,
        tlog: ThrottledLog,
        *,
        send: Callable[[int, bytes, int | None], None],
        incarnation: Callable[[], int],
        blobs: Callable[[], BlobStore | None],
        generation: Callable[[], int],
        begin: Callable[[int], None],
        restore: Callable[[int, Manifest | None], Awaitable[None]],
        resume: Callable[[int], None],
    ) -> None:
        self.peer_id = peer_id
        self.config = config
        self.clock = clock
        self._tlog = tlog
        self._send = send
        self._incarnation = incarnation
        self._blobs = blobs
        self._generation = generation
        self._begin = begin
        self._restore = restore
        self._resume = resume
        self.task: asyncio.Task[None] | None = None
        #: this generation's restore is done and READY was sent
        self.done = False
        #: when this peer last sent READY for its generation (it repeats it until RESUME)
        self._ready_sent = 0.0

    def on_recover(self, gen: int | None, n: int) -> None:
        """The coordinator's RECOVER for generation ``gen`` from checkpoint ``n`` (-1: none)."""
        if gen is not None and gen > self._generation():
            self.start(gen, n)
        elif gen == self._generation() and self.done:
            # the coordinator asks again: our READY was lost or is late; say it again
            self.send_ready(gen)

    def on_resume(self, gen: int) -> None:
        """The coordinator's RESUME for generation ``gen``: process, if it is this restored one."""
        if gen == self._generation() and self.done:
            self._resume(gen)

    def start(self, gen: int, n: int) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.done = False
        self._begin(gen)
        self.task = asyncio.create_task(self._recover_from(gen, n), name=f"peer {self.peer_id} recovery")

    async def _recover_from(self, gen: int, n: int) -> None:
        from .snapshot.format import Manifest, manifest_name

        pause = 0.5
        try:
            while True:
                try:
                    manifest = None
                    if n >= 0:
                        blobs = self._blobs()
                        assert blobs is not None
                        name = manifest_name(n)
                        manifest = Manifest.from_json(await blobs.get(name), name=name)
                    await self._restore(gen, manifest)
                    break
                except BlobStoreError as exc:
                    if isinstance(exc, BlobNotFoundError) or self._generation() != gen:
                        raise
                    # the store is unreachable or failing: not the checkpoint's fault, so
                    # do not report it unrestorable; try again while this round stands
                    self._tlog.error(
                        "blob store read retries",
                        "peer %d: cannot read checkpoint %d from the blob "
                        "store in recovery round %d: %s; retrying in %.1f s",
                        self.peer_id,
                        n,
                        gen,
                        exc,
                        pause,
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 10.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "peer %d: cannot restore checkpoint %d in recovery round %d: %s; asking the coordinator "
                "to fall back to an earlier checkpoint",
                self.peer_id,
                n,
                gen,
                exc,
            )
            self._send(0, codec.encode_control(codec.RESTORE_FAILED, gen, n, str(exc)[:500]), gen)
            return
        if self._generation() == gen:
            self.done = True
            self.send_ready(gen)

    def send_ready(self, gen: int) -> None:
        """Tell the coordinator this peer restored generation ``gen``. Said again while no
        RESUME comes (see :meth:`tick`): a READY or a RESUME lost with a link that
        dropped again during the round must not leave the round waiting for ever.

        A heartbeat goes just before it, on the same channel: the coordinator knows which
        process (incarnation) is ready before it counts it, so a later restart of that
        process is a restart to it, never a first contact (a coordinator that restarted
        itself had heard nothing of the others yet)."""
        self._ready_sent = self.clock.now()
        self._send(0, codec.encode_control(codec.HEARTBEAT, self.peer_id, self._incarnation()), None)
        self._send(0, codec.encode_control(codec.READY, gen), gen)

    def tick(self, now: float, waiting: bool) -> None:
        """After a round of heartbeats: repeat READY if this peer is ``waiting`` for RESUME (restored,
        not resumed, not the coordinator, not closing) and said READY long enough ago."""
        cfg = self.config
        if self.done and waiting and now - self._ready_sent >= max(cfg.heartbeat_timeout, 4 * cfg.heartbeat_interval):
            # restored, READY sent, and still no RESUME: the coordinator answers a repeated
            # READY of a round it finished with the RESUME this peer missed
            self.send_ready(self._generation())
