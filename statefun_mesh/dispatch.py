"""One batch: group by address, load declared state once, invoke in order, collect effects.

The dispatcher does not write anything itself: it returns the batch's writes as an
ordered list of operations (:data:`~statefun_mesh.state.lmdb_backend.Op`) that the
peer commits in one LMDB write transaction, and the batch's messages, replies and
egress notifications, which the peer routes only after that commit succeeded. A batch
is therefore applied wholly or not at all; if the commit fails the peer calls
:meth:`Dispatcher.rollback` and retries the same records later.

Longer than ~500 lines because sync, async, ``@in_thread`` and remote invocations share
one batch's bookkeeping (parked addresses, per-invocation rollback, the outbox's stages,
failures and dead letters); the per-record work itself is in ``_dispatch_loop.py`` and
the C core.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import traceback
from bisect import bisect_left
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any, Final

import msgpack

from . import _speedups
from .address import Address
from .context import DELETED, Cell, Context, Storage, _set_address, _set_cells, _set_writes
from .errors import MessageTooLargeError
from .functions import FunctionSpec
from .logutil import ThrottledLog
from .messages import Message
from .outbox import AsyncStage, Outbox
from .state.lmdb_backend import (
    KG_PREFIXES,
    MAX_KEY,
    LmdbStateBackend,
    Op,
    decode_state_value,
    dedup_key,
    encode_state_value,
    pack_due_kg_seq,
    pack_kg_seq,
    pack_u64,
    state_key,
    timer_token_prefix,
)

__all__ = [
    "DEAD_LETTERS",
    "DEAD_LETTER_TYPE",
    "REPLY_ERROR",
    "REPLY_OK",
    "BatchOutcome",
    "Dispatcher",
]

log = logging.getLogger("statefun_mesh.dispatch")

#: Reserved state name (not an identifier, so no ValueSpec can use it) of an instance's
#: immediate-egress record counter, and the type name of its value (u64 BE).
EGRESS_SEQ_NAME: Final = "~egress-seq"
EGRESS_SEQ_TYPE: Final = "statefun-mesh/egress-seq"

#: The egress that receives every message whose invocation failed.
DEAD_LETTERS: Final = "statefun-mesh/dead-letters"
#: Value type of dead-letter records: UTF-8 JSON (see docs/concepts.md).
DEAD_LETTER_TYPE: Final = "statefun-mesh.types/dead-letter"
REPLY_OK: Final = 0
REPLY_ERROR: Final = 1

Record = tuple[str, str, str, str, str, bytes, int, int]
#: The cyclic GC's generation-0 threshold while a batch's sync invocations run (the
#: process's own, if higher, is left alone): a full batch allocates a few thousand
#: containers that stay alive until it ends, so the default 700 collected them several
#: times per batch for nothing (bench/RESULTS.md, session 6, lane perf9b)
BATCH_GC_THRESHOLD: Final = 20_000


def raise_gc_threshold() -> tuple[int, int, int]:
    """Raise the cyclic GC's generation-0 threshold to at least :data:`BATCH_GC_THRESHOLD`
    for the whole process; returns the thresholds now in force. For a peer process
    (``statefun-mesh peer``) once started: outside its batches too (decoding frames,
    routing a batch's sends) young objects are mostly a batch's records still in use, and
    with the default 700 the collector ran ~1,700 times in one counter benchmark, ~6 % of
    the peer's CPU; with 20,000, ~80 times and ~1 % (bench/RESULTS.md, session 6, lane
    perf9b). Not for a user's own process (``LocalMesh``): there only a batch's sync
    part runs with it (``Dispatcher.run``)."""
    g0, g1, g2 = gc.get_threshold()
    if g0 < BATCH_GC_THRESHOLD:
        gc.set_threshold(BATCH_GC_THRESHOLD, g1, g2)
    return gc.get_threshold()


_CACHEABLE: Final = frozenset({int, float, str, bool, bytes, type(None)})
#: (reply_peer, request_id, status, value_typename or error class, value bytes or error text,
#: replier typename, replier id)
Reply = tuple[int, int, int, str, Any, str, str]

#: upper bounds (seconds) of the invocation latency histogram's buckets (Prometheus ``le``)
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: upper bounds of the batch size histogram's buckets (messages per batch; metrics.py)
BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class TypeStats:
    """Counters of one function type on one peer, for metrics (metrics.py) and status.

    Updated once per address group of a batch, not per message: a group's messages are
    invoked back to back, so each is counted with the group's mean latency.
    """

    __slots__ = ("buckets", "failures", "seconds")

    def __init__(self) -> None:
        self.failures = 0  #: invocations that raised (their message went to the dead letters)
        self.seconds = 0.0  #: time spent in the function, summed
        #: invocations per latency bucket (not cumulative; the last one is +Inf), failed ones included
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    @property
    def invocations(self) -> int:
        """Invocations that returned."""
        return sum(self.buckets) - self.failures

    def observe(self, seconds: float, n: int) -> None:
        """``n`` invocations took ``seconds`` together."""
        self.seconds += seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds / n)] += n


#: bytes a send takes in an outgoing frame besides its id and value (type names, framing)
_SEND_OVERHEAD: Final = 64


class BatchOutcome:
    """What one batch produced; applied by the peer after the writes commit."""

    __slots__ = ("cancels", "deferred", "egress", "min_due", "ops", "replies", "requeue", "sends")

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.sends: list[Record] = []
        self.replies: list[Reply] = []
        #: egress typename -> next offset after this batch
        self.egress: dict[str, int] = {}
        #: earliest due time (ms) of a timer this batch added, if any
        self.min_due: int | None = None
        #: messages that waited behind a parked address this batch committed: the peer
        #: puts them back at the head of its inbox once the commit succeeded
        self.requeue: list[Record] = []
        #: whether this batch cancels timers (the earliest pending one may be among them)
        self.cancels = False
        #: records not run because the batch's sends reached ``max_send_bytes`` (whole
        #: addresses, in arrival order): the caller queues them again, first
        self.deferred: list[Record] = []


class _Running:
    """The messages of one address of an ``async`` function, being invoked in a task.

    Its effects stay here until the task is done and a batch takes them into its
    transaction (:meth:`Dispatcher._finish`). A task still awaiting when its batch
    commits is *parked*: later messages for its address wait in ``queue``.
    """

    __slots__ = ("address", "cells", "done", "elapsed", "fspec", "key", "kg", "out", "queue", "records", "task")

    def __init__(
        self,
        fspec: FunctionSpec,
        address: Address,
        kg: int,
        cells: dict[str, Cell],
        records: list[Record],
        out: BatchOutcome,
    ) -> None:
        self.fspec = fspec
        self.address = address
        self.key = (address.typename, address.id)
        self.kg = kg
        self.cells = cells
        self.records = records
        self.elapsed = 0.0  #: seconds its invocations took, task start to end (for TypeStats)
        #: this address's idempotency-key writes (they commit with its invocations)
        self.out = out
        #: (record, context, None) per invocation that returned, (record, None, exc) per one that raised
        self.done: list[tuple[Record, Context | None, Exception | None]] = []
        self.queue: list[Record] = []
        self.task: asyncio.Task[None] | None = None


class _RemoteRunning(_Running):
    """The messages of one address of a remote function, being sent to its endpoint.

    The answers' state mutations go to ``cells`` as they come (the next request of the
    address sends them); every other effect waits in ``effects`` (closures taking the
    committing batch's outcome) until a batch takes the address in.
    """

    __slots__ = ("effects", "endpoint")

    def __init__(
        self, endpoint: Any, address: Address, kg: int, cells: dict[str, Cell], records: list[Record], out: BatchOutcome
    ) -> None:
        super().__init__(None, address, kg, cells, records, out)  # type: ignore[arg-type]
        self.endpoint = endpoint
        self.effects: list[Callable[[BatchOutcome], None]] = []


class Dispatcher:
    """Runs batches of messages against the bound functions and one peer's state.

    Args:
        table: bound functions by type name.
        backend: the peer's state store.
        max_parallelism: the number of key groups (state keys start with the key group).
        egress_retention: records kept per egress; older ones are trimmed.
    """

    def __init__(
        self,
        table: dict[str, FunctionSpec],
        backend: LmdbStateBackend,
        *,
        max_parallelism: int,
        egress_retention: int = 100_000,
        dedup_retention: float = 86_400.0,
        egress_immediate: Iterable[str] = (),
        park_after: float = 0.05,
        remote: Any = None,
        max_message_bytes: int = 0,
        stats: dict[str, TypeStats] | None = None,
    ) -> None:
        self.table = table
        #: per function type: invocations, failures, latency (the peer's dict: it outlives a restore)
        self.stats: dict[str, TypeStats] = {} if stats is None else stats
        #: messages to unknown types (counted here, not per type: the type names come from senders)
        self.unknown = 0
        #: records appended to egresses (dead letters included), and dead letters alone
        self.egress_records = 0
        self.dead_letters = 0
        #: the peer's remote functions (remote.invoker.RemoteFunctions), or None
        self.remote = remote
        #: what a function may send, reply or emit (0: unchecked); see Context._check_size
        self.message_limit = max_message_bytes
        #: where an invocation's sends past their share of memory_budget go (set by the peer)
        self.outbox: Outbox | None = None
        self.backend = backend
        self.max_parallelism = max_parallelism
        self.egress_retention = egress_retention
        self.dedup_retention_ms = int(dedup_retention * 1000)
        self._timer_seq = backend.meta_int(b"timer_seq")
        self._egress_offsets: dict[str, list[int]] = {}
        self._saved: tuple[int, dict[str, list[int]]] | None = None
        #: immediate egresses: their records carry "<type>/<id>#<n>" ids, n counted per instance
        self.immediate = frozenset(egress_immediate)
        self._egress_seq: dict[bytes, int] = {}
        self._txn: Any = None
        self._db_state = backend.db_state
        #: the store's write-back cache of state (None: off), read before the batch's transaction
        self._state_cache = backend.cache
        self._key_group = _speedups.key_group
        self._db_dedup = backend.db_dedup
        #: counters for status: invocations, failures, duplicates skipped
        self.invocations = 0
        self.failures = 0
        self.duplicates = 0
        #: seconds a batch waits for its async invocations before it commits without them
        self.park_after = park_after
        #: async addresses whose batch committed while they were still running
        self._parked: dict[tuple[str, str], _Running] = {}
        #: async addresses started by the batch in progress (cancelled with it)
        self._starting: list[_Running] = []
        #: for rollback: parked addresses the batch in progress took in, queue lengths before it
        self._merged: list[_Running] = []
        self._qlens: dict[tuple[str, str], tuple[_Running, int]] = {}
        self._parked_now: list[_Running] = []
        #: called when a parked address's task is done (the peer wakes its loop)
        self.on_ready: Any = None
        #: the address whose sync function runs now (read by the peer's watchdog thread)
        self.current: Address | None = None
        #: failing invocations log one line per function type and error class per window
        self.tlog = ThrottledLog(log)

    def reload_counters(self) -> None:
        """Re-read what is cached from the store (after the store was restored)."""
        self._timer_seq = self.backend.meta_int(b"timer_seq")
        self._egress_offsets = {}

    # -- rollback of in-memory counters when a commit fails -----------------------

    def rollback(self) -> None:
        """Undo the last :meth:`run` (its commit failed; the peer runs its records again).

        Its counter advances are undone; the parked addresses it took in are parked again,
        the messages it queued behind parked addresses are taken off their queues (they
        go back to the inbox with the batch), and the addresses it parked are cancelled
        (their messages go back with the batch).
        """
        if self._saved is not None:
            self._timer_seq, self._egress_offsets = self._saved
            self._saved = None
        for r, n in self._qlens.values():
            del r.queue[n:]
        for r in self._merged:
            self._parked[r.key] = r
        for r in self._parked_now:
            if self._parked.get(r.key) is r:
                del self._parked[r.key]
            if r.task is not None:
                r.task.cancel()
        self._qlens = {}
        self._merged = []
        self._parked_now = []

    # -- parked async invocations -----------------------------------------------------

    @property
    def parked(self) -> int:
        """How many addresses are parked (an async invocation outlived its batch)."""
        return len(self._parked)

    @property
    def ready(self) -> bool:
        """Whether a parked address finished and waits for a batch to commit it."""
        return any(r.task is not None and r.task.done() for r in self._parked.values())

    @property
    def queued(self) -> int:
        """Messages waiting behind parked addresses."""
        return sum(len(r.queue) for r in self._parked.values()) if self._parked else 0

    def parked_records(self) -> list[Record]:
        """Every message taken in and not committed: a parked address's messages (also
        those whose invocation already returned), then those queued behind it.

        A checkpoint cut between batches saves these as unprocessed input, with the
        state as it was before them: their effects commit after the cut.
        """
        records: list[Record] = []
        for r in self._parked.values():
            records.extend(r.records)
            records.extend(r.queue)
        return records

    def parked_addresses(self) -> list[tuple[Address, int]]:
        """(address, messages queued behind it) of every parked address, for status and logs."""
        return [(r.address, len(r.queue)) for r in self._parked.values()]

    def cancel_all(self) -> None:
        """Cancel every async invocation in progress and forget its messages (the peer
        rolls back to a checkpoint, which has them as unprocessed input)."""
        for r in [*self._parked.values(), *self._starting]:
            if r.task is not None and not r.task.done():
                r.task.cancel()
        self._parked = {}
        self._starting = []
        self._merged = []
        self._qlens = {}
        self._parked_now = []

    def _parked_done(self, task: asyncio.Task[None]) -> None:
        if self.on_ready is not None:
            self.on_ready()

    # -- the batch ------------------------------------------------------------------

    async def run(
        self,
        records: list[Record],
        fired: list[tuple[int, int, int, list[Any]]],
        now_ms: int,
        max_send_bytes: int | None = None,
    ) -> BatchOutcome:
        """Invoke the functions for ``records``, and release the ``fired`` timers' messages.

        With ``max_send_bytes``, addresses not yet started once the batch's sends reach that
        many bytes (estimated) are not run but returned in ``outcome.deferred``: one batch's
        fan-out stays within the peer's memory budget, overshot by one address at most.

        Returns the outcome; nothing is written yet.
        """
        self._saved = (self._timer_seq, {k: list(v) for k, v in self._egress_offsets.items()})
        self._egress_seq = {}
        out = BatchOutcome()
        parked = self._parked
        merging: dict[tuple[str, str], _Running] = {}
        self._merged = []
        self._qlens = {}
        self._parked_now = []
        if parked:
            # Parked addresses whose task is done commit in this batch; what queued
            # behind them (and their messages in this batch) runs after the commit.
            for pkey, pr in list(parked.items()):
                if pr.task is not None and pr.task.done():
                    del parked[pkey]
                    merging[pkey] = pr
                    self._merged.append(pr)
        if fired:
            # A due timer's message is routed like any send of this batch: the timer is
            # deleted in the batch's transaction and the message leaves after the commit,
            # to whichever peer owns its target (not necessarily this one).
            for kg, seq, due, value in fired:
                tok = None
                if value:
                    _, token, s_type, s_id, rec = value
                    if token:
                        tok = timer_token_prefix(kg, s_type, s_id, token)
                    out.sends.append(tuple(rec))
                out.ops.append(("fired", kg, seq, due, tok))

        starting: list[_Running] = []
        touched: list[dict[str, Cell]] = []
        # The batch's records, cells, contexts and sends live until it ends: with the default
        # gen0 threshold (700) the cyclic GC ran several times per batch, walking and
        # promoting objects still in use (~8 % of a busy peer); raised for the sync part of
        # the batch only (restored at once: no await in between), see BATCH_GC_THRESHOLD.
        # Grouping is inside it too: its list per address alone passed 700 in a full batch.
        gc_saved = gc.get_threshold()
        if gc_saved[0] < BATCH_GC_THRESHOLD:
            gc.set_threshold(BATCH_GC_THRESHOLD, gc_saved[1], gc_saved[2])
        with self.backend.read_unflushed() as txn:  # state is read through the write-back cache
            self._txn = txn
            try:
                groups = _speedups.group_records(records)
                self.invocations += _speedups.dispatch_groups(
                    self, _KIT, groups, txn, now_ms, out, max_send_bytes, merging, starting, touched
                )
            finally:
                self.current = None
                if gc_saved[0] < BATCH_GC_THRESHOLD:
                    gc.set_threshold(*gc_saved)
        self._txn = None  # closed: async invocations below read what they need afresh
        for pr in merging.values():
            self._finish(pr, now_ms, out)
            out.requeue.extend(pr.queue)
        if starting:
            await self._start(starting, now_ms, out)

        ops = out.ops
        if touched:
            _speedups.collect_puts(touched, ops, encode_state_value)
        if self._saved[0] != self._timer_seq:
            ops.append(("put", "meta", b"timer_seq", pack_u64(self._timer_seq)))
        for seq_key, seq in self._egress_seq.items():
            ops.append(("put", "state", seq_key, encode_state_value(EGRESS_SEQ_TYPE, pack_u64(seq), 0)))
        return out

    async def _start(self, starting: list[_Running], now_ms: int, out: BatchOutcome) -> None:
        """Run the batch's async addresses, one task each, for up to ``park_after`` seconds;
        take in those that finished and park the others."""
        self._starting = starting
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        try:
            for r in starting:
                r.task = loop.create_task(self._run_async(r, now_ms), name=f"statefun-mesh {r.address}")
                tasks.append(r.task)
            await asyncio.wait(tasks, timeout=self.park_after)
        except BaseException:
            for r in starting:  # the batch is cancelled (a recovery): so are its invocations
                if r.task is not None:
                    r.task.cancel()
            raise
        finally:
            self._starting = []
        for r in starting:
            task = r.task
            assert task is not None
            if task.done():
                self._finish(r, now_ms, out)
            else:
                self._parked[r.key] = r
                self._parked_now.append(r)
                task.add_done_callback(self._parked_done)

    def _finish(self, r: _Running, now_ms: int, out: BatchOutcome) -> None:
        """Take a finished async address's effects into this batch's outcome."""
        assert r.task is not None
        r.task.result()  # a BaseException from the function stops the dispatch loop, as a sync one's does
        out.ops.extend(r.out.ops)
        address, cells = r.address, r.cells
        if type(r) is _RemoteRunning:
            for effect in r.effects:
                effect(out)
        for rec, ctx, exc in r.done:
            if exc is not None:
                self._failed(rec, address, cells, exc, out)
            else:
                assert ctx is not None
                self._emit(address, r.kg, ctx, out, now_ms)
        if r.records:
            self._type_stats(address.typename).observe(r.elapsed, len(r.records))
        ops = out.ops
        for cell in cells.values():
            if cell.dirty:
                if cell.data is None:
                    ops.append(("del", "state", cell.key))
                else:
                    ops.append(("put", "state", cell.key, encode_state_value(cell.vt, cell.data, cell.expire)))  # type: ignore[arg-type]

    def _dedup(
        self,
        txn: Any,
        typename: str,
        id: str,
        kg: int,
        recs: list[Record],
        seen: set[bytes],
        now_ms: int,
        out: BatchOutcome,
    ) -> list[Record]:
        # A client message carries its idempotency key in caller_id (its caller_typename is
        # empty). The key is remembered with the target instance's state, so it is part of
        # every snapshot and a resend through any peer is applied once.
        keep: list[Record] = []
        for rec in recs:
            if rec[2] or not rec[3]:
                keep.append(rec)
                continue
            dk = dedup_key(kg, typename, id, rec[3])
            if dk in seen:
                self.duplicates += 1
                continue
            raw = txn.get(dk, db=self._db_dedup)
            if raw is not None and int.from_bytes(raw, "big") > now_ms:
                self.duplicates += 1
                continue
            seen.add(dk)
            out.ops.append(("put", "dedup", dk, pack_u64(now_ms + self.dedup_retention_ms)))
            keep.append(rec)
        return keep

    async def _run_async(self, r: _Running, now_ms: int) -> None:
        # One address's messages run strictly one after another; other addresses may
        # interleave while this one awaits. State changes apply to the address's cells
        # at once (the next message sees them); every other effect waits in r.done
        # until a batch commits the address (_finish).
        t0 = perf_counter()
        try:
            await self._run_address(r, now_ms)
        finally:
            r.elapsed = perf_counter() - t0

    async def _run_address(self, r: _Running, now_ms: int) -> None:
        if type(r) is _RemoteRunning:
            await self.remote.run(self, r.endpoint, r.address, r.kg, r.records, r.cells, now_ms, r.effects)
            return
        fspec, address, cells = r.fspec, r.address, r.cells
        for rec in r.records:
            ctx = Context(address, rec, fspec.storage_class(address, cells), self.message_limit)
            if self.outbox is not None:  # sends past their share of memory_budget go to disk (outbox.py)
                self.outbox.attach(ctx)
            msg = Message(rec[0], rec[1], rec[4], rec[5])
            try:
                await fspec.fun(ctx, msg)
                writes = self._serialize_writes(ctx.storage)
            except Exception as exc:
                for cell in cells.values():  # decoded values may have been mutated in place
                    cell.has_decoded = False
                r.done.append((rec, None, exc))
                continue
            self._apply(fspec, cells, writes, now_ms)
            r.done.append((rec, ctx, None))

    @staticmethod
    def _serialize_writes(storage: Storage) -> list[tuple[Cell, Any, bytes | None]]:
        writes = storage._writes
        if not writes:
            return []
        cells = storage._cells
        result: list[tuple[Cell, Any, bytes | None]] = []
        for name, value in writes.items():
            cell = cells[name]
            if value is DELETED:
                result.append((cell, None, None))
            else:
                data = cell.type.serializer().serialize(value)
                if not isinstance(data, bytes):
                    raise TypeError(
                        f"the serializer of type {cell.type.typename!r} returned "
                        f"{type(data).__name__}, not bytes, for state {name!r}"
                    )
                result.append((cell, value, data))
        return result

    @staticmethod
    def _apply(
        fspec: FunctionSpec, cells: dict[str, Cell], writes: list[tuple[Cell, Any, bytes | None]] | None, now_ms: int
    ) -> None:
        """Apply a returned invocation's state writes (and TTLs) to its address's cells."""
        for cell, value, data in writes or ():
            cell.dirty = True
            if data is None:
                cell.vt = cell.data = None
                cell.expire = 0
                cell.decoded = None
                cell.has_decoded = True
            else:
                cell.vt = cell.type.typename
                cell.data = data
                cell.expire = 0
                if type(value) in _CACHEABLE:
                    cell.decoded = value
                    cell.has_decoded = True
                else:
                    cell.has_decoded = False
        if fspec.ttl_ms:
            for name, ms, after_call in fspec.ttl_ms:
                cell = cells[name]
                if cell.data is None:
                    continue
                if after_call or cell.expire == 0:
                    cell.expire = now_ms + ms
                    cell.dirty = True

    def _emit(self, address: Address, kg: int, ctx: Context, out: BatchOutcome, now_ms: int) -> None:
        """Take a returned invocation's sends, timers, egress records and reply into ``out``."""
        self.invocations += 1
        stage = ctx._outbox
        if type(stage) is AsyncStage:  # it staged sends: they go before those it kept (outbox.py)
            stage.emitted(out.sends)
        if ctx._sends is not None:
            out.sends.extend(ctx._sends)
        self._emit_other(address, kg, ctx, out, now_ms)

    def _emit_other(self, address: Address, kg: int, ctx: Context, out: BatchOutcome, now_ms: int) -> None:
        """Take a returned invocation's timers, egress records and reply into ``out``."""
        if ctx._delayed is not None:
            self._timers(address, kg, ctx._delayed, now_ms, out)
        if ctx._egress is not None:
            for typename, vt, data in ctx._egress:
                if typename in self.immediate:
                    self._egress(typename, vt, data, out, self._egress_id(address, kg))
                else:
                    self._egress(typename, vt, data, out)
        if ctx._reply is not None and ctx._rec[7]:
            vt, data = ctx._reply
            out.replies.append((ctx._rec[6], ctx._rec[7], REPLY_OK, vt, data, address[0], address[1]))

    def _timers(self, address: Address, kg: int, items: list[tuple[Any, ...]], now_ms: int, out: BatchOutcome) -> None:
        ops = out.ops
        for item in items:
            if item[0] == "cancel":
                ops.append(("cancel", kg, timer_token_prefix(kg, address.typename, address.id, item[1])))
                out.cancels = True
                continue
            _, delay, rec, token = item
            due = now_ms + int(delay.total_seconds() * 1000)
            self._timer_seq += 1
            seq = self._timer_seq
            value = msgpack.packb([due, token, address.typename, address.id, list(rec)], use_bin_type=True)
            ops.append(("put", "timers", pack_kg_seq(kg, seq), value))
            ops.append(("put", "timer_due", pack_due_kg_seq(due, kg, seq), b""))
            if token:
                prefix = timer_token_prefix(kg, address.typename, address.id, token)
                ops.append(("put", "timer_tokens", prefix + pack_u64(seq), b""))
            if out.min_due is None or due < out.min_due:
                out.min_due = due

    def _egress_id(self, address: Address, kg: int) -> str:
        # The n-th immediate egress record an instance produces is "<type>/<id>#<n>". The
        # counter is part of the instance's state, so a recovery rolls it back with the
        # state and the records produced again get the same ids.
        key = state_key(kg, address.typename, address.id, EGRESS_SEQ_NAME)
        seq = self._egress_seq.get(key)
        if seq is None:
            if self._txn is not None:
                raw = self.backend.state_get(self._txn, key)
            else:
                with self.backend.read_unflushed() as txn:
                    raw = self.backend.state_get(txn, key)
            seq = int.from_bytes(decode_state_value(raw)[1], "big") if raw is not None else 0
        seq += 1
        self._egress_seq[key] = seq
        return f"{address.typename}/{address.id}#{seq}"

    def _egress(self, typename: str, vt: str, data: bytes, out: BatchOutcome, rid: str | None = None) -> None:
        bounds = self._egress_offsets.get(typename)
        if bounds is None:
            bounds = list(self.backend.egress_bounds(typename))
            self._egress_offsets[typename] = bounds
        offset = bounds[1]
        bounds[1] = offset + 1
        self.egress_records += 1
        fields = [vt, data] if rid is None else [vt, data, rid]
        out.ops.append(
            ("put", "egress", typename.encode() + b"\x00" + pack_u64(offset), msgpack.packb(fields, use_bin_type=True))
        )
        out.egress[typename] = offset + 1
        if bounds[1] - bounds[0] > self.egress_retention + self.egress_retention // 10:
            bounds[0] = bounds[1] - self.egress_retention
            out.ops.append(("trim", typename, bounds[0]))

    # -- failures -----------------------------------------------------------------------

    def _type_stats(self, typename: str) -> TypeStats:
        st = self.stats.get(typename)
        if st is None:
            st = self.stats[typename] = TypeStats()
        return st

    def _failed(self, rec: Record, address: Address, cells: dict[str, Cell], exc: Exception, out: BatchOutcome) -> None:
        self.failures += 1
        self._type_stats(address.typename).failures += 1
        for cell in cells.values():  # decoded values may have been mutated in place
            cell.has_decoded = False
        error = f"{type(exc).__name__}: {exc}"
        # one line per kind of failure and window (the dead letter carries the traceback)
        self.tlog.error(
            f"failures of {address.typename} ({type(exc).__name__})",
            "function %s raised %s; message moved to egress %r (traceback in the dead letter)",
            address,
            error,
            DEAD_LETTERS,
        )
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8))
        reason = "message too large" if isinstance(exc, MessageTooLargeError) else "function raised"
        self._dead_letter(rec, reason, error, tb, out)
        if rec[7]:
            out.replies.append((rec[6], rec[7], REPLY_ERROR, "InvocationError", error, rec[0], rec[1]))

    def _unknown(self, rec: Record, out: BatchOutcome) -> None:
        self.failures += 1
        self.unknown += 1
        known = sorted(self.table)
        error = f"no function is bound to type {rec[0]!r}"
        self.tlog.error(
            f"messages to unknown type {rec[0][:100]!r}",
            "%s (message to %s/%s from %s); known types: %s; message moved to egress %r",
            error,
            rec[0],
            rec[1],
            f"{rec[2]}/{rec[3]}" if rec[2] else "a client",
            ", ".join(known[:10]) or "none",
            DEAD_LETTERS,
        )
        self._dead_letter(rec, "unknown function type", error, "", out)
        if rec[7]:
            out.replies.append((rec[6], rec[7], REPLY_ERROR, "FunctionNotFoundError", rec[0], rec[0], rec[1]))

    def _dead_letter(self, rec: Record, reason: str, error: str, tb: str, out: BatchOutcome) -> None:
        self.dead_letters += 1
        doc = {
            "target": f"{rec[0]}/{rec[1]}",
            "target_typename": rec[0],
            "target_id": rec[1],
            "caller": f"{rec[2]}/{rec[3]}" if rec[2] else None,
            "caller_typename": rec[2] or None,
            "caller_id": rec[3] if rec[2] else None,
            "value_typename": rec[4],
            "value": base64.b64encode(rec[5]).decode("ascii"),
            "reason": reason,
            "error": error,
            "traceback": tb,
        }
        self._egress(DEAD_LETTERS, DEAD_LETTER_TYPE, json.dumps(doc, separators=(",", ":")).encode(), out)


#: what the per-batch loop (``_speedups.dispatch_groups``) uses, in ``_dispatch_loop.KIT_FIELDS`` order
_KIT: Final = (
    Address,
    Cell,
    Context,
    Message,
    BatchOutcome,
    _Running,
    _RemoteRunning,
    decode_state_value,
    state_key,
    KG_PREFIXES,
    MAX_KEY,
    LATENCY_BUCKETS,
    bisect_left,
    perf_counter,
    DELETED,
    _CACHEABLE,
    _set_address,
    _set_cells,
    _set_writes,
    encode_state_value,
    _speedups.load_cells,
    _speedups.invoke_sync,
)
