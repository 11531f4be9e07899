"""The outbox: what one invocation sends past its share of ``memory_budget``, kept on disk.

A synchronous function that sends 200,000 messages in one invocation used to hold them
all as Python tuples until its batch committed, and then all of them again as frames
waiting for credit: far outside the budget. With an outbox, a context whose sends pass
``stage_bytes`` (estimated as :func:`~statefun_mesh.memory.records_bytes` does) moves
them to disk, in order, and goes on; so an invocation holds at most about
``stage_bytes`` of sends in memory whatever it sends.

What is written is part of the batch, never sent before it commits:

- *staged*: chunks written by the invocation running now, after the committed tail.
  If the invocation raises, or its batch rolls back, they are dropped (the tail does
  not move).
- at the commit, :meth:`Outbox.commit` puts the batch's in-memory sends around the staged
  chunks in the order the invocations emitted them, and the whole batch becomes part
  of the FIFO the peer routes from (:meth:`pop`) as outgoing credit and its inbox allow.
  While anything waits here, later batches' sends queue behind it (per-address order
  between batches is kept).

Synchronous invocations run one at a time, so their chunks are written in the FIFO's
own key range, contiguous, and a failure drops a suffix. Async and remote invocations
run concurrently (and an ``@in_thread`` one in a worker thread), so each of them that
passes ``stage_bytes`` writes to a *stage* of its own (:class:`AsyncStage`, a key range
apart from the FIFO's); when a batch takes the invocation in, the FIFO gets a reference
to the stage in the invocation's place, and at the commit the reference joins the FIFO
like any chunk; :meth:`pop` reads through it. A stage of an invocation that raised, was
cancelled, or whose batch rolled back and runs it again is never referenced by a commit:
its chunks are deleted once the invocation is gone (``AsyncStage.__del__`` queues them
for the next :meth:`begin`). A parked invocation's stage is not in a checkpoint's cut
(its messages are the cut's unprocessed input), only references committed before it.

A full disk never loses anything: a stage that cannot be written keeps its sends in
memory; a commit that cannot be written hands everything back (:meth:`abandon`), and the
stages of invocations still running are read back into memory before the outbox starts
afresh; a :meth:`pop` that cannot be written (deleting needs pages too) leaves the chunk
where it was and raises, and the peer retries later.

The outbox is a separate LMDB environment (``<state_dir>/peer-<id>.outbox``), opened on
first use, wiped when opened and when a recovery drops the queues, never fsynced: with
checkpoints on, a cut includes what is committed here (the inflight object, after the
inbox and its spill), and a restore routes it again.

Longer than ~500 lines because the FIFO, the async stages and their references are one
key space with one lock and one failure story (full disk, rollback, recovery); the
stages cannot be correct apart from the FIFO they are referenced from.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import lmdb
import msgpack

from .errors import StateBackendError
from .state.lmdb_backend import write_growing

if TYPE_CHECKING:
    from .context import Context

__all__ = ["AsyncStage", "Outbox", "Stager"]

_U64: Final = struct.Struct(">Q")
#: a stage's chunk: 0xff (after every FIFO key), the stage's id, the chunk's index
_STAGE_KEY: Final = struct.Struct(">BQQ")
#: a FIFO entry standing for a stage's chunks: b"R" (never a msgpack array's first byte), id, lo, hi
_REF: Final = struct.Struct(">cQQQ")
_REF_TAG: Final = b"R"
#: records per chunk on disk (one chunk is what the peer routes at a time)
CHUNK: Final = 1000


class Stager(Protocol):
    """What ``Context._outbox`` holds: ``Context.send`` calls :meth:`stage` once the
    invocation's sends pass ``stage_bytes`` (``Context._room`` counted down to 0)."""

    def stage(self, ctx: Context) -> None: ...


class Outbox:
    """Committed sends waiting to be routed, and the staged sends of the invocation running now.

    Args:
        path: directory of the LMDB environment (deleted and created afresh on first use).
        stage_bytes: estimated bytes of sends an invocation holds in memory before they
            are written here.
        map_size: the map's initial size (bytes); it doubles as needed, up to ``max_size``.
        max_size: the largest the map grows to (bytes).
    """

    def __init__(self, path: str, stage_bytes: int, *, map_size: int = 64 << 20, max_size: int = 1 << 40) -> None:
        self.path = path
        self.map_size = map_size
        self.stage_bytes = stage_bytes
        self.max_size = max_size
        self._env: lmdb.Environment | None = None
        self._head = 0  # key of the oldest committed chunk
        self._tail = 0  # key after the newest committed chunk
        self._staged = 0  # key after the newest staged chunk (>= _tail)
        #: the next chunk to read of the stage the head entry refers to (0: none read yet)
        self._ref_next = 0
        #: whether the batch running now has staged sends (it then defers the addresses it
        #: has not started); a plain attribute, read once per address by the dispatcher
        self.staging = False
        #: records committed here and not yet routed
        self.count = 0
        self._staged_count = 0  # records staged by contexts of this batch that returned
        self._cur_count = 0  # ... and by the one running now
        #: the context whose sends are staged now, the slot reserved for the batch's sends
        #: emitted before its own, and whether it returned (None: nothing staged)
        self.current: Context | None = None
        self._slot = 0
        #: per context of this batch that staged and returned: (its slot, how many of the
        #: batch's in-memory sends were emitted before it, its stage if it is an async or
        #: remote invocation's, else None: its chunks follow the slot)
        self._splits: list[tuple[int, int, AsyncStage | None]] = []
        #: records ever staged (status)
        self.staged_total = 0
        #: the last failure to stage (the peer logs it and clears it)
        self.error: StateBackendError | None = None
        #: every write transaction (and opening, closing) of the environment: a stage may be
        #: written from an ``@in_thread`` invocation's thread, and a map that grows must
        #: have no other write in flight
        self._lock = threading.RLock()
        #: bumped whenever what is on disk is dropped (clear, abandon, close): a stage of
        #: an older epoch has nothing on disk any more
        self._epoch = 0
        self._next_stage = 0
        #: stages with chunks on disk that no commit took yet (abandon reads them back)
        self._live: weakref.WeakValueDictionary[int, AsyncStage] = weakref.WeakValueDictionary()
        #: chunks of stages that are gone uncommitted: (id, lo, hi), deleted by begin()
        self._dead: list[tuple[int, int, int]] = []
        #: what async and remote contexts get as ``_outbox`` until they first stage
        self._attach = _Attach(self)

    # -- while a batch runs ---------------------------------------------------------------

    def stage(self, ctx: Context) -> None:
        """Write ``ctx``'s sends so far here and empty them (``Context.send`` calls it
        when they pass ``stage_bytes``).

        If the write fails (a full disk), the sends stay in memory and :attr:`error` says why.
        """
        sends = ctx._sends
        ctx._room = self.stage_bytes
        if not sends:
            return
        if self.current is not ctx:
            if self.current is not None:
                self._truncate(self._slot)  # the previous one raised: its sends are dropped
            self.current = ctx
            self._slot = self._staged
            self._staged += 1  # reserved for the batch's sends emitted before this context's
        keys_chunks: list[tuple[bytes, bytes]] = []
        for i in range(0, len(sends), CHUNK):
            keys_chunks.append((_U64.pack(self._staged + len(keys_chunks)), _pack(sends[i : i + CHUNK])))

        def write(txn: lmdb.Transaction) -> None:
            for key, data in keys_chunks:
                txn.put(key, data)

        try:
            self._write(write)
        except StateBackendError as exc:  # e.g. a full disk: they stay in memory (never lost)
            self.error = exc
            ctx._room = self.stage_bytes // 2  # try again after half as much more
            return
        self._staged += len(keys_chunks)
        self.staging = True
        self._cur_count += len(sends)
        self.staged_total += len(sends)
        ctx._sends = None

    def attach(self, ctx: Context) -> None:
        """Let an async or remote invocation's context stage its sends past ``stage_bytes``
        (into an :class:`AsyncStage` of its own, made when it first does)."""
        ctx._outbox = self._attach
        ctx._room = self.stage_bytes

    def new_stage(self) -> AsyncStage:
        """A stage for sends that are not a context's (a remote function's answer)."""
        return AsyncStage(self)

    def emitted(self, ctx: Context, out_sends: list[Any]) -> None:
        """``ctx`` returned, and its in-memory sends are about to join ``out_sends``: its
        staged chunks go after the ``len(out_sends)`` sends emitted before it."""
        if ctx is self.current:
            self._splits.append((self._slot, len(out_sends), None))
            self._staged_count += self._cur_count
            self._cur_count = 0
            self.current = None

    def emitted_stage(self, stage: AsyncStage, out_sends: list[Any]) -> None:
        """An async or remote invocation is taken into the batch running now, and its
        in-memory sends are about to join ``out_sends``: what it staged goes before them.

        The stage itself is not changed until the commit: a batch that rolls back takes
        a parked invocation in again later."""
        if self.current is not None:  # the last sync context that staged raised
            self._truncate(self._slot)
        if stage.held:
            out_sends.extend(stage.held)  # read back into memory by an abandon()
        if stage.hi > stage.lo and stage.epoch == self._epoch:
            self._splits.append((self._staged, len(out_sends), stage))
            self._staged += 2  # the slot for the sends emitted before it, and the reference

    def begin(self) -> None:
        """A batch starts: drop whatever a batch before it staged and did not commit."""
        if self._staged != self._tail or self.current is not None or self._splits:
            self._truncate(self._tail)
        if self._dead:
            dead, self._dead = self._dead, []
            with self._lock:
                if self._env is not None:
                    with contextlib.suppress(lmdb.Error), self._env.begin(write=True) as txn:
                        for sid, lo, hi in dead:
                            for k in range(lo, hi):
                                txn.delete(_STAGE_KEY.pack(0xFF, sid, k))

    def commit(self, sends: list[Any]) -> bool:
        """The batch committed; ``sends`` are its in-memory sends in emitted order.

        Returns ``False`` when nothing is staged or waiting here (the caller routes
        ``sends`` itself), else ``True``: they are queued here, in order, behind what
        waits, for the caller to route from :meth:`pop`.
        """
        if self.current is not None:  # the last context that staged raised
            self._truncate(self._slot)
        if not self._splits and not self.count:
            self._truncate(self._tail)
            return False
        pieces: list[tuple[bytes, bytes]] = []
        last = 0
        added = self._staged_count
        for slot, pos, stage in self._splits:
            pieces.append((_U64.pack(slot), _pack(sends[last:pos])))
            if stage is not None:
                pieces.append((_U64.pack(slot + 1), _REF.pack(_REF_TAG, stage.id, stage.lo, stage.hi)))
                added += stage.count
            last = pos
        tail = self._staged
        for i in range(last, len(sends), CHUNK):
            pieces.append((_U64.pack(tail), _pack(sends[i : i + CHUNK])))
            tail += 1

        def write(txn: lmdb.Transaction) -> None:
            for key, data in pieces:
                txn.put(key, data)

        self._write(write)
        for _, _, done in self._splits:
            if done is not None:  # its chunks are the FIFO's now
                done.done = True
                self._live.pop(done.id, None)
        self.count += added + len(sends)
        self._tail = self._staged = tail
        self.staging = False
        self._staged_count = 0
        self._splits = []
        return True

    def abandon(self, sends: list[Any]) -> Iterator[list[Any]]:
        """:meth:`commit` failed (a full disk): everything committed and staged here, with
        the batch's in-memory ``sends`` in between, in order, to route at once; then the
        outbox starts afresh (its directory deleted: nothing it held can be read twice).

        The stages of async and remote invocations that are still running or parked (not
        this batch's) are read back into their memory first: they are routed when their
        batch commits, never before."""
        if self.current is not None:  # the last context that staged raised
            self._truncate(self._slot)
        with self._lock:
            env = self._env
            ours = {id(stage) for _, _, stage in self._splits if stage is not None}
            others = [s for s in list(self._live.values()) if id(s) not in ours and s.epoch == self._epoch]
            with env.begin() if env is not None else contextlib.nullcontext() as txn:

                def chunks(lo: int, hi: int) -> Iterator[list[Any]]:
                    for k in range(lo, hi):
                        data = txn.get(_U64.pack(k)) if txn is not None else None
                        if data is None:
                            continue
                        if data[:1] == _REF_TAG:
                            yield from _stage_chunks(txn, data, self._ref_next if k == self._head else 0)
                        else:
                            yield [tuple(r) for r in msgpack.unpackb(data, raw=False)]

                for stage in others:  # into memory before anything is routed (the disk is full)
                    held = list(stage.held)
                    for chunk in _stage_chunks(txn, _REF.pack(_REF_TAG, stage.id, stage.lo, stage.hi), 0):
                        held.extend(chunk)
                    stage.held = held
                    stage.lo = stage.hi
                yield from chunks(self._head, self._tail)
                last = 0
                ends = [slot for slot, _, _ in self._splits[1:]] + [self._staged]
                for (slot, pos, split), end in zip(self._splits, ends, strict=True):
                    yield list(sends[last:pos])
                    last = pos
                    if split is None:
                        yield from chunks(slot + 1, end)
                    else:
                        yield from _stage_chunks(txn, _REF.pack(_REF_TAG, split.id, split.lo, split.hi), 0)
                        split.done = True
                yield list(sends[last:])
            self.close()
            for stage in others:  # nothing of theirs on disk now; they may stage afresh
                stage.epoch = self._epoch
        self._head = self._tail = self._staged = self._ref_next = 0
        self.count = self._staged_count = self._cur_count = 0
        self.staging = False
        self._splits = []

    # -- routing what waits ---------------------------------------------------------------

    def pop(self) -> list[tuple[Any, ...]]:
        """Remove and return the oldest committed chunk (``[]``: nothing waits).

        Raises:
            StateBackendError: the removal could not be written (a full disk): the chunk
                stays where it was, to be popped again later (nothing lost, nothing twice).
        """
        with self._lock:
            while self._env is not None and self._head < self._tail:
                data, self._ref_next = self._pop_head()
                if self._ref_next == 0:
                    self._head += 1
                records = [tuple(r) for r in msgpack.unpackb(data, raw=False)] if data is not None else []
                self.count -= len(records)
                if self._head == self._tail:
                    self.count = 0
                if records:
                    return records
            return []

    def _pop_head(self) -> tuple[bytes | None, int]:
        """Remove the head entry's next chunk, in one write: (the chunk, the index of the
        next chunk to read of the stage the head refers to, 0 once the head is done)."""
        key = _U64.pack(self._head)
        start = self._ref_next
        got: list[Any] = [None, 0]

        def take(txn: lmdb.Transaction) -> None:
            data = txn.get(key)
            got[0], got[1] = None, 0
            if data is not None and data[:1] == _REF_TAG:
                _, sid, lo, hi = _REF.unpack(data)
                for k in range(max(lo, start), hi):
                    chunk = txn.pop(_STAGE_KEY.pack(0xFF, sid, k))
                    if chunk is not None:
                        got[0], got[1] = chunk, k + 1
                        break
                if got[1] == 0 or got[1] >= hi:
                    txn.delete(key)
                    got[1] = 0
            else:
                got[0] = txn.pop(key)

        self._write(
            take,
            full="the outbox at {path} is full at {mib} MiB and cannot even drop a routed chunk; free disk space",
            remedy="the chunk stays in the outbox and is routed once it can be removed",
        )
        return got[0], got[1]

    def cut(self) -> lmdb.Transaction | None:
        """A read transaction over what is committed here now (``None``: nothing), for a
        checkpoint cut (taken between batches, so nothing is staged); read it with
        :meth:`packed` or :meth:`records`."""
        if self._env is None or not self.count:
            return None
        return self._env.begin()

    @staticmethod
    def packed(txn: lmdb.Transaction) -> Iterator[tuple[int, bytes]]:
        """Every committed chunk in ``txn``'s view as ``(records, their msgpack encodings one
        after another)``, oldest first, without decoding them (as ``Spill.packed``), the
        chunks of committed stages in their place; usable from another thread."""
        for data in _committed(txn):
            yield _unframe(data)

    @staticmethod
    def records(txn: lmdb.Transaction) -> Iterator[list[Any]]:
        """Every committed record in ``txn``'s view, oldest first (usable from another thread)."""
        for data in _committed(txn):
            yield from msgpack.unpackb(data, raw=False)

    def clear(self) -> None:
        """Drop everything, committed or staged (a recovery: what a cut held is restored from it)."""
        with self._lock:
            if self._env is not None:
                with self._env.begin(write=True) as txn:
                    txn.drop(self._env.open_db(), delete=False)
            self._epoch += 1
            self._live = weakref.WeakValueDictionary()
            self._dead = []
        self._head = self._tail = self._staged = self._ref_next = 0
        self.staging = False
        self.count = self._staged_count = self._cur_count = 0
        self.current = None
        self._splits = []

    def close(self) -> None:
        with self._lock:
            self._epoch += 1
            self._live = weakref.WeakValueDictionary()
            self._dead = []
            if self._env is not None:
                self._env.close()
                self._env = None
                shutil.rmtree(self.path, ignore_errors=True)

    # -- stages of async and remote invocations --------------------------------------------

    def _write_stage(self, stage: AsyncStage, records: Sequence[Any]) -> bool:
        """Append ``records`` to ``stage`` on disk; ``False`` if they could not be written
        (:attr:`error` says why) or the stage is void (a recovery cleared the outbox since)."""
        with self._lock:
            if stage.epoch != self._epoch or stage.done:
                return False
            sid, hi = stage.id, stage.hi
            pieces = [
                (_STAGE_KEY.pack(0xFF, sid, hi + j), _pack(records[i : i + CHUNK]))
                for j, i in enumerate(range(0, len(records), CHUNK))
            ]

            def write(txn: lmdb.Transaction) -> None:
                for key, data in pieces:
                    txn.put(key, data)

            try:
                self._write(write)
            except StateBackendError as exc:  # e.g. a full disk: they stay in memory (never lost)
                self.error = exc
                return False
            stage.hi = hi + len(pieces)
            stage.count += len(records)
            self.staged_total += len(records)
            self._live[sid] = stage
            return True

    # -- internals ------------------------------------------------------------------------

    def _open(self) -> lmdb.Environment:
        if self._env is None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.makedirs(self.path, exist_ok=True)
            try:
                self._env = lmdb.open(
                    self.path, map_size=self.map_size, max_dbs=1, sync=False, metasync=False, readahead=False
                )
            except lmdb.Error as exc:
                raise StateBackendError(f"cannot open the outbox at {self.path}: {exc}") from exc
        return self._env

    def _write(self, write: Any, *, full: str = "", remedy: str = "the sends stay in memory meanwhile") -> None:
        with self._lock:
            write_growing(
                self._open(),
                write,
                what="the outbox",
                path=self.path,
                max_size=self.max_size,
                full=(
                    full.replace("{path}", self.path)
                    if full
                    else f"the outbox at {self.path} is full at {{mib}} MiB; raise memory_budget or send less per "
                    "invocation"
                ),
                remedy=remedy,
            )

    def _truncate(self, key: int) -> None:
        """Drop staged chunks from ``key`` on (never committed ones)."""
        key = max(key, self._tail)
        if self._env is not None and key < self._staged:
            with self._lock, self._env.begin(write=True) as txn:
                for k in range(key, self._staged):
                    txn.delete(_U64.pack(k))
        self._staged = key
        self.staging = key != self._tail
        self._cur_count = 0
        self.current = None
        if key == self._tail:
            self._staged_count = 0
            self._splits = []


class AsyncStage:
    """The sends one async or remote invocation wrote to disk past ``stage_bytes``: chunks
    ``lo`` to ``hi`` of a key range of its own, private until a batch commits the invocation
    (:meth:`Outbox.emitted_stage`, then :meth:`Outbox.commit`)."""

    __slots__ = ("__weakref__", "count", "done", "epoch", "held", "hi", "id", "lo", "outbox", "stage_bytes")

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.stage_bytes = outbox.stage_bytes
        with outbox._lock:
            self.id = outbox._next_stage
            outbox._next_stage += 1
        self.epoch = outbox._epoch
        self.lo = self.hi = 0
        #: records on disk
        self.count = 0
        #: records read back into memory by an abandon() (older than those on disk)
        self.held: list[Any] = []
        #: taken by a commit (or routed by an abandon): its chunks are not its own any more
        self.done = False

    def stage(self, ctx: Context) -> None:
        """``Context.send``'s hook: write the context's sends so far here and empty them."""
        sends = ctx._sends
        ctx._room = self.stage_bytes
        if sends and self.outbox._write_stage(self, sends):
            ctx._sends = None
        elif sends:
            ctx._room = self.stage_bytes // 2  # try again after half as much more

    def write(self, records: Sequence[Any]) -> bool:
        """Append ``records`` here; ``False`` if they could not be written (they stay the caller's)."""
        return self.outbox._write_stage(self, records)

    def emitted(self, out_sends: list[Any]) -> None:
        """The invocation is taken into a batch: see :meth:`Outbox.emitted_stage`."""
        self.outbox.emitted_stage(self, out_sends)

    def __del__(self) -> None:
        # gone without a commit (raised, cancelled, run again after a rollback): its chunks
        # are deleted by the next begin() (not here: this may run inside a write, or in a thread)
        if not self.done and self.hi > self.lo and self.epoch == self.outbox._epoch:
            self.outbox._dead.append((self.id, self.lo, self.hi))


class _Attach:
    """An async or remote context's ``_outbox`` until it first stages: gives it a stage of its own."""

    __slots__ = ("outbox", "stage_bytes")

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.stage_bytes = outbox.stage_bytes

    def stage(self, ctx: Context) -> None:
        stage = AsyncStage(self.outbox)
        ctx._outbox = stage
        stage.stage(ctx)


def _committed(txn: lmdb.Transaction) -> Iterator[bytes]:
    """The FIFO's chunks in ``txn``'s view, oldest first, a reference read through (its
    chunks not popped yet); the stages' own key range (0xff...) is not the FIFO's."""
    with txn.cursor() as cur:
        for key, data in cur:
            if key[:1] == b"\xff":
                return
            if data[:1] == _REF_TAG:
                _, sid, lo, hi = _REF.unpack(data)
                for k in range(lo, hi):
                    chunk = txn.get(_STAGE_KEY.pack(0xFF, sid, k))
                    if chunk is not None:
                        yield bytes(chunk)
            else:
                yield bytes(data)


def _stage_chunks(txn: Any, ref: bytes, start: int) -> Iterator[list[Any]]:
    _, sid, lo, hi = _REF.unpack(ref)
    if txn is None:
        return
    for k in range(max(lo, start), hi):
        data = txn.get(_STAGE_KEY.pack(0xFF, sid, k))
        if data is not None:
            yield [tuple(r) for r in msgpack.unpackb(data, raw=False)]


def _unframe(data: bytes) -> tuple[int, bytes]:
    """A packed chunk as (records, their encodings one after another): its array header off."""
    first = data[0]
    if 0x90 <= first <= 0x9F:  # fixarray
        return first & 0x0F, bytes(data[1:])
    if first == 0xDC:  # array 16
        return int.from_bytes(data[1:3], "big"), bytes(data[3:])
    return int.from_bytes(data[1:5], "big"), bytes(data[5:])  # array 32


def _pack(records: Sequence[Any]) -> bytes:
    data: bytes = msgpack.packb([list(r) for r in records], use_bin_type=True)
    return data
