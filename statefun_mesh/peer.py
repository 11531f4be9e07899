"""Peer: wires state, dispatch, timers, egress and (later) the transport; one event loop, one core."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

from .clock import Clock, SystemClock
from .config import MeshConfig
from .dispatch import REPLY_OK, BatchOutcome, Dispatcher, Record
from .errors import (
    ClosedTransportError,
    FunctionNotFoundError,
    InvocationError,
    RequestTimeoutError,
    StateBackendError,
    StatefunMeshError,
)
from .functions import StatefulFunctions, merge_functions
from .messages import EgressRecord, Message
from .state.lmdb_backend import LmdbStateBackend

__all__ = ["Peer"]

log = logging.getLogger("statefun_mesh.peer")


class Peer:
    """One peer of a mesh: a state store, a dispatch loop, timers and egress logs.

    Use it as an async context manager (``async with Peer(config, functions) as peer:``)
    inside any asyncio program, or through :class:`~statefun_mesh.LocalMesh`.

    Args:
        config: the mesh's settings; ``config.state_dir`` must be set.
        functions: one or more ``StatefulFunctions`` modules, multiplexed.
        peer_id: this peer's index in ``range(config.peers)``.
        clock: time source (tests pass a :class:`~statefun_mesh.clock.ManualClock`).
    """

    def __init__(
        self,
        config: MeshConfig,
        functions: StatefulFunctions | Iterable[StatefulFunctions],
        *,
        peer_id: int = 0,
        clock: Clock | None = None,
    ) -> None:
        if config.state_dir is None:
            raise StatefunMeshError("Peer needs config.state_dir; LocalMesh makes a temporary one for you")
        if not 0 <= peer_id < config.peers:
            raise ValueError(f"peer_id must be in range({config.peers}), got {peer_id}")
        self.config = config
        self.peer_id = peer_id
        self.table = merge_functions(functions)
        self.clock = clock or SystemClock()
        self.state_path = os.path.join(config.state_dir, f"peer-{peer_id}")
        self.backend: LmdbStateBackend | None = None
        self.dispatcher: Dispatcher | None = None
        self._inbox: collections.deque[Record] = collections.deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._closed_event = asyncio.Event()
        self._requests: dict[int, asyncio.Future[Message]] = {}
        self._request_ids = itertools.count(1)
        self._egress_events: dict[str, asyncio.Event] = {}
        self._next_due: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._started = False
        self._dirty = False
        self._flush: asyncio.Future[None] | None = None
        self.batches = 0

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state store and start the dispatch loop."""
        if self._started:
            raise RuntimeError("peer already started")
        self._started = True
        cfg = self.config
        self.backend = LmdbStateBackend(self.state_path, map_size=cfg.map_size, max_map_size=cfg.max_map_size)
        self.dispatcher = Dispatcher(
            self.table, self.backend, max_parallelism=cfg.max_parallelism, egress_retention=cfg.egress_retention
        )
        self._next_due = self.backend.next_timer_due()
        self._tasks.append(asyncio.create_task(self._loop(), name=f"statefun-mesh peer {self.peer_id} dispatch"))
        if cfg.sync_interval > 0:
            self._tasks.append(asyncio.create_task(self._sync_loop(), name=f"statefun-mesh peer {self.peer_id} sync"))
        log.info("peer %d started: state at %s, %d functions", self.peer_id, self.state_path, len(self.table))

    async def aclose(self) -> None:
        """Finish the queued messages, stop, and close the state store (idempotent).

        Timers that are not yet due stay in the state store and fire after a restart.
        """
        if self._closing:
            await self._closed_event.wait()
            return
        self._closing = True
        self._wake.set()
        try:
            if self._tasks:
                await asyncio.wait({self._tasks[0]}, timeout=None)
            for t in self._tasks[1:]:
                t.cancel()
            if self._flush is not None:
                try:
                    await self._flush
                except Exception:
                    log.exception("peer %d: final background sync failed", self.peer_id)
            for t in self._tasks:
                try:
                    await t
                except asyncio.CancelledError:
                    pass
                except Exception:  # already logged by the loop
                    pass
            for fut in self._requests.values():
                if not fut.done():
                    fut.set_exception(ClosedTransportError("the peer closed before the request was answered"))
            self._requests.clear()
            for ev in self._egress_events.values():
                ev.set()
        finally:
            if self.backend is not None:
                self.backend.close()
            self._closed_event.set()
            log.info("peer %d stopped", self.peer_id)

    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- client API -----------------------------------------------------------------

    def _check(self, message: Message) -> None:
        if self._closing or not self._started:
            raise ClosedTransportError("the peer is not running")
        if type(message) is not Message:
            raise TypeError(f"expected a Message (use message_builder), got {type(message).__name__}")
        if message.target_typename not in self.table:
            raise FunctionNotFoundError(message.target_typename, list(self.table))

    async def _submit(self, rec: Record) -> None:
        while len(self._inbox) >= self.config.inbox_limit:
            self._space.clear()
            await self._space.wait()
            if self._closing:
                raise ClosedTransportError("the peer closed while the message waited for room")
        self._inbox.append(rec)
        self._idle.clear()
        self._wake.set()

    async def send(self, message: Message) -> None:
        """Queue ``message`` for its target; waits while the peer is over its inbox limit.

        Raises:
            FunctionNotFoundError: no function is bound to the target type.
            ClosedTransportError: the peer is not running.
        """
        self._check(message)
        await self._submit(
            (message.target_typename, message.target_id, "", "", message._vt, message._v, 0, 0)
        )

    async def request(self, message: Message, timeout: float = 10.0) -> Message:
        """Send ``message`` and wait for the function's ``context.reply``.

        Returns:
            The reply as a :class:`Message` addressed from the instance that replied
            (``target_typename``/``target_id`` name the replier).

        Raises:
            RequestTimeoutError: no reply within ``timeout`` seconds.
            InvocationError: the function raised.
            FunctionNotFoundError: no function is bound to the target type.
        """
        self._check(message)
        rid = next(self._request_ids)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._requests[rid] = fut
        try:
            await self._submit(
                (message.target_typename, message.target_id, "", "", message._vt, message._v, self.peer_id, rid)
            )
            try:
                return await asyncio.wait_for(fut, timeout)
            except (asyncio.TimeoutError, TimeoutError):
                raise RequestTimeoutError(
                    f"no reply from {message.target_typename}/{message.target_id} within {timeout} s; "
                    "does the function call context.reply()?"
                ) from None
        finally:
            self._requests.pop(rid, None)

    def egress(self, typename: str, start: str | int = "earliest") -> AsyncIterator[EgressRecord]:
        """Iterate the records of the egress ``typename``, waiting for new ones.

        Args:
            typename: the egress name used in ``egress_message_builder``.
            start: ``"earliest"`` (the oldest retained record), ``"latest"`` (only records
                produced after this call) or an offset.

        The iteration ends when the peer closes.
        """
        if self.backend is None or self._closing:
            raise ClosedTransportError("the peer is not running")
        first, nxt = self.backend.egress_bounds(typename)
        if start == "earliest":
            pos = first
        elif start == "latest":
            pos = nxt
        elif isinstance(start, int) and not isinstance(start, bool) and start >= 0:
            pos = start
        else:
            raise ValueError(f"start must be 'earliest', 'latest' or an offset >= 0, got {start!r}")
        return self._egress_from(typename, pos)

    async def _egress_from(self, typename: str, pos: int) -> AsyncIterator[EgressRecord]:
        assert self.backend is not None
        backend = self.backend
        while True:
            event = self._egress_events.get(typename)
            if event is None:
                event = self._egress_events[typename] = asyncio.Event()
            records = backend.egress_range(typename, pos, 1000)
            if records:
                if records[0][0] > pos:
                    log.warning(
                        "egress %r consumer fell behind retention: records %d..%d were trimmed",
                        typename, pos, records[0][0] - 1,
                    )  # fmt: skip
                for off, vt, data in records:
                    yield EgressRecord(typename, self.peer_id, off, vt, data)
                pos = records[-1][0] + 1
                continue
            if self._closing:
                return
            await event.wait()
            if self._egress_events.get(typename) is event:
                self._egress_events[typename] = asyncio.Event()

    async def idle(self) -> None:
        """Wait until every queued message (and every due timer) has been processed."""
        while True:
            if self._inbox or self._timer_due(self._now_ms()):
                self._idle.clear()
                self._wake.set()
            elif self._idle.is_set() or self._closing:
                return
            await self._idle.wait()

    def status(self) -> dict[str, Any]:
        """Counters for monitoring: queued messages, batches, invocations, failures, next timer."""
        d = self.dispatcher
        return {
            "peer": self.peer_id,
            "queued": len(self._inbox),
            "batches": self.batches,
            "invocations": d.invocations if d else 0,
            "failures": d.failures if d else 0,
            "next_timer_ms": self._next_due,
        }

    # -- the loop -------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock.now() * 1000)

    def _timer_due(self, now_ms: int) -> bool:
        return self._next_due is not None and self._next_due <= now_ms

    async def _loop(self) -> None:
        assert self.backend is not None and self.dispatcher is not None
        inbox = self._inbox
        backend = self.backend
        dispatcher = self.dispatcher
        max_batch = self.config.max_batch
        backoff = 0.05
        while True:
            now_ms = self._now_ms()
            if not inbox and not self._timer_due(now_ms):
                if self._closing:
                    return
                self._idle.set()
                deadline = None if self._next_due is None else self._next_due / 1000
                await self.clock.wait(self._wake, deadline)
                self._wake.clear()
                continue
            self._idle.clear()
            n = min(len(inbox), max_batch)
            batch = [inbox.popleft() for _ in range(n)]
            fired: list[Any] = []
            if self._timer_due(now_ms):
                fired = backend.due_timers(now_ms, max(max_batch - n, 1))
            try:
                outcome = await dispatcher.run(batch, fired, now_ms)
                backend.commit(outcome.ops)
            except StateBackendError as exc:
                dispatcher.rollback()
                inbox.extendleft(reversed(batch))
                log.error("peer %d could not write a batch of %d messages: %s; retrying in %.2f s",
                          self.peer_id, len(batch), exc, backoff)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception:
                dispatcher.rollback()
                inbox.extendleft(reversed(batch))
                log.exception("peer %d: internal error in a batch; retrying", self.peer_id)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.05
            self.batches += 1
            self._dirty = True
            if self.config.sync_interval == 0:
                backend.flush()
            if fired:
                self._next_due = backend.next_timer_due()
            self._after_commit(outcome)
            if len(inbox) < self.config.inbox_limit:
                self._space.set()
            # Let clients and other tasks run between batches.
            await asyncio.sleep(0)

    def _after_commit(self, out: BatchOutcome) -> None:
        if out.min_due is not None and (self._next_due is None or out.min_due < self._next_due):
            self._next_due = out.min_due
        if out.sends:
            self._inbox.extend(out.sends)
        for reply in out.replies:
            self._deliver_reply(reply)
        for typename in out.egress:
            ev = self._egress_events.get(typename)
            if ev is not None:
                ev.set()

    def _deliver_reply(self, reply: tuple[Any, ...]) -> None:
        _peer, rid, status, kind, value, r_type, r_id = reply
        fut = self._requests.get(rid)
        if fut is None or fut.done():
            return  # an answer after the first, or after the requester gave up
        if status == REPLY_OK:
            fut.set_result(Message(r_type, r_id, kind, value))
        elif kind == "FunctionNotFoundError":
            fut.set_exception(FunctionNotFoundError(value, list(self.table)))
        else:
            fut.set_exception(InvocationError(f"{r_type}/{r_id}", value))

    async def _sync_loop(self) -> None:
        assert self.backend is not None
        while True:
            await asyncio.sleep(self.config.sync_interval)
            if self._dirty:
                self._dirty = False
                # fsync off the loop; aclose() waits for it before closing the store.
                self._flush = asyncio.ensure_future(asyncio.to_thread(self.backend.flush))
                await asyncio.shield(self._flush)
