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

Only synchronous invocations stage (they run one at a time, so an invocation's chunks
are contiguous and a failure drops a suffix). Async and remote invocations keep their
sends in memory until they commit, as before.

The outbox is a separate LMDB environment (``<state_dir>/peer-<id>.outbox``), opened on
first use, wiped when opened and when a recovery drops the queues, never fsynced: with
checkpoints on, a cut includes what is committed here (the inflight object, after the
inbox and its spill), and a restore routes it again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

import lmdb
import msgpack

from .errors import StateBackendError
from .state.lmdb_backend import write_growing

if TYPE_CHECKING:
    from .context import Context

__all__ = ["Outbox"]

_U64: Final = struct.Struct(">Q")
#: records per chunk on disk (one chunk is what the peer routes at a time)
CHUNK: Final = 1000


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
        #: batch's in-memory sends were emitted before it)
        self._splits: list[tuple[int, int]] = []
        #: records ever staged (status)
        self.staged_total = 0
        #: the last failure to stage (the peer logs it and clears it)
        self.error: StateBackendError | None = None

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
        env = self._open()
        keys_chunks: list[tuple[bytes, bytes]] = []
        for i in range(0, len(sends), CHUNK):
            keys_chunks.append((_U64.pack(self._staged + len(keys_chunks)), _pack(sends[i : i + CHUNK])))

        def write(txn: lmdb.Transaction) -> None:
            for key, data in keys_chunks:
                txn.put(key, data)

        try:
            self._write(env, write)
        except StateBackendError as exc:  # e.g. a full disk: they stay in memory (never lost)
            self.error = exc
            ctx._room = self.stage_bytes // 2  # try again after half as much more
            return
        self._staged += len(keys_chunks)
        self.staging = True
        self._cur_count += len(sends)
        self.staged_total += len(sends)
        ctx._sends = None

    def emitted(self, ctx: Context, out_sends: list[Any]) -> None:
        """``ctx`` returned, and its in-memory sends are about to join ``out_sends``: its
        staged chunks go after the ``len(out_sends)`` sends emitted before it."""
        if ctx is self.current:
            self._splits.append((self._slot, len(out_sends)))
            self._staged_count += self._cur_count
            self._cur_count = 0
            self.current = None

    def begin(self) -> None:
        """A batch starts: drop whatever a batch before it staged and did not commit."""
        if self._staged != self._tail or self.current is not None or self._splits:
            self._truncate(self._tail)

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
        env = self._open()
        pieces: list[tuple[bytes, bytes]] = []
        last = 0
        for slot, pos in self._splits:
            pieces.append((_U64.pack(slot), _pack(sends[last:pos])))
            last = pos
        tail = self._staged
        for i in range(last, len(sends), CHUNK):
            pieces.append((_U64.pack(tail), _pack(sends[i : i + CHUNK])))
            tail += 1

        def write(txn: lmdb.Transaction) -> None:
            for key, data in pieces:
                txn.put(key, data)

        self._write(env, write)
        self.count += self._staged_count + len(sends)
        self._tail = self._staged = tail
        self.staging = False
        self._staged_count = 0
        self._splits = []
        return True

    def abandon(self, sends: list[Any]) -> Iterator[list[Any]]:
        """:meth:`commit` failed (a full disk): everything committed and staged here, with
        the batch's in-memory ``sends`` in between, in order, to route at once; then the
        outbox starts afresh (its directory deleted: nothing it held can be read twice)."""
        if self.current is not None:  # the last context that staged raised
            self._truncate(self._slot)
        env = self._env
        with env.begin() if env is not None else contextlib.nullcontext() as txn:

            def chunks(lo: int, hi: int) -> Iterator[list[Any]]:
                for k in range(lo, hi):
                    data = txn.get(_U64.pack(k)) if txn is not None else None
                    if data is not None:
                        yield [tuple(r) for r in msgpack.unpackb(data, raw=False)]

            yield from chunks(self._head, self._tail)
            last = 0
            ends = [slot for slot, _ in self._splits[1:]] + [self._staged]
            for (slot, pos), end in zip(self._splits, ends, strict=True):
                yield list(sends[last:pos])
                last = pos
                yield from chunks(slot + 1, end)
            yield list(sends[last:])
        self.close()
        self._head = self._tail = self._staged = 0
        self.count = self._staged_count = self._cur_count = 0
        self.staging = False
        self._splits = []

    # -- routing what waits ---------------------------------------------------------------

    def pop(self) -> list[tuple[Any, ...]]:
        """Remove and return the oldest committed chunk (``[]``: nothing waits)."""
        env = self._env
        while env is not None and self._head < self._tail:
            key = _U64.pack(self._head)
            with env.begin(write=True) as txn:
                data = txn.pop(key)
            self._head += 1
            records = [tuple(r) for r in msgpack.unpackb(data, raw=False)] if data is not None else []
            self.count -= len(records)
            if self._head == self._tail:
                self.count = 0
            if records:
                return records
        return []

    def cut(self) -> lmdb.Transaction | None:
        """A read transaction over what is committed here now (``None``: nothing), for a
        checkpoint cut (taken between batches, so nothing is staged)."""
        if self._env is None or not self.count:
            return None
        return self._env.begin()

    @staticmethod
    def records(txn: lmdb.Transaction) -> Iterator[list[Any]]:
        """Every committed record in ``txn``'s view, oldest first (usable from another thread)."""
        with txn.cursor() as cur:
            for _, data in cur:
                yield from msgpack.unpackb(data, raw=False)

    def clear(self) -> None:
        """Drop everything, committed or staged (a recovery: what a cut held is restored from it)."""
        if self._env is not None and self._staged != self._head:
            with self._env.begin(write=True) as txn:
                txn.drop(self._env.open_db(), delete=False)
        self._head = self._tail = self._staged = 0
        self.staging = False
        self.count = self._staged_count = self._cur_count = 0
        self.current = None
        self._splits = []

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            shutil.rmtree(self.path, ignore_errors=True)

    # -- internals ------------------------------------------------------------------------

    def _open(self) -> lmdb.Environment:
        if self._env is None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.makedirs(self.path, exist_ok=True)
            try:
                self._env = lmdb.open(self.path, map_size=self.map_size, max_dbs=1, sync=False, metasync=False,
                                      readahead=False)  # fmt: skip
            except lmdb.Error as exc:
                raise StateBackendError(f"cannot open the outbox at {self.path}: {exc}") from exc
        return self._env

    def _write(self, env: lmdb.Environment, write: Any) -> None:
        write_growing(
            env, write, what="the outbox", path=self.path, max_size=self.max_size,
            full=f"the outbox at {self.path} is full at {{mib}} MiB; raise memory_budget or send less per invocation",
            remedy="the sends stay in memory meanwhile",
        )  # fmt: skip

    def _truncate(self, key: int) -> None:
        """Drop staged chunks from ``key`` on (never committed ones)."""
        key = max(key, self._tail)
        if self._env is not None and key < self._staged:
            with self._env.begin(write=True) as txn:
                for k in range(key, self._staged):
                    txn.delete(_U64.pack(k))
        self._staged = key
        self.staging = key != self._tail
        self._cur_count = 0
        self.current = None
        if key == self._tail:
            self._staged_count = 0
            self._splits = []


def _pack(records: Sequence[Any]) -> bytes:
    data: bytes = msgpack.packb([list(r) for r in records], use_bin_type=True)
    return data
