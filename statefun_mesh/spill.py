"""The spill: the tail of a peer's inbox on disk, when the inbox outgrows its share of ``memory_budget``.

A peer's inbox keeps its oldest messages in memory, up to half of ``memory_budget``;
messages that arrive while it is fuller, or while anything is spilled, are appended
here (in order) and read back into memory as the inbox drains. So arrival order is kept:
everything in memory is older than everything spilled.

The spill is not durable state: a separate LMDB environment
(``<state_dir>/peer-<id>.spill``), wiped when opened and when a recovery drops the
queues, never fsynced. With checkpoints on, a cut includes it (the participant opens a
read transaction at the cut and writes the spilled records into the ``inflight`` object
after those in memory), so recovery restores spilled messages like any other in flight.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Final

import lmdb
import msgpack

from .errors import StateBackendError
from .state.lmdb_backend import write_growing

__all__ = ["Spill"]

_U64: Final = struct.Struct(">Q")


class Spill:
    """A FIFO of message records in chunks, in an LMDB environment of its own.

    Args:
        path: directory of the environment (deleted and created afresh).
        max_size: the largest the map grows to (bytes).
    """

    def __init__(self, path: str, *, map_size: int = 64 << 20, max_size: int = 1 << 40) -> None:
        self.path = path
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, map_size=map_size, max_dbs=1, sync=False, metasync=False, readahead=False)
        except lmdb.Error as exc:
            raise StateBackendError(f"cannot open the inbox spill at {path}: {exc}") from exc
        self._db = self.env.open_db()
        self.max_size = max_size
        self._head = 0  # key of the oldest chunk
        self._tail = 0  # key of the next chunk
        #: records spilled and not yet read back
        self.count = 0

    def push(self, records: Sequence[Any]) -> None:
        """Append ``records`` (one chunk) after everything spilled.

        Raises:
            StateCapacityError: the disk is full or the spill reached ``max_size``.
        """
        data = msgpack.packb([list(r) for r in records], use_bin_type=True)
        key = _U64.pack(self._tail)
        write_growing(
            self.env,
            lambda txn: txn.put(key, data, append=True),
            what="the inbox spill",
            path=self.path,
            max_size=self.max_size,
            full=f"the inbox spill at {self.path} is full at {{mib}} MiB; raise memory_budget or slow the input down",
            remedy="messages stay in memory meanwhile",
        )
        self._tail += 1
        self.count += len(records)

    def pop(self) -> list[tuple[Any, ...]]:
        """Remove and return the oldest chunk (``[]`` if nothing is spilled).

        Raises:
            StateBackendError: the removal could not be written (a full disk: deleting
                needs free pages too): the chunk stays, to be popped again later.
        """
        if self._head == self._tail:
            return []
        key = _U64.pack(self._head)
        got: list[Any] = [None]

        def take(txn: lmdb.Transaction) -> None:
            got[0] = txn.pop(key)

        write_growing(
            self.env,
            take,
            what="the inbox spill",
            path=self.path,
            max_size=self.max_size,
            full=f"the inbox spill at {self.path} is full at {{mib}} MiB and cannot even drop a chunk read back; "
            "free disk space",
            remedy="the chunk stays spilled and is read back once it can be removed",
        )
        data = got[0]
        self._head += 1
        if data is None:  # cannot happen: chunks are written before the tail moves
            return []
        records = [tuple(r) for r in msgpack.unpackb(data, raw=False)]
        self.count -= len(records)
        if self._head == self._tail:
            self.count = 0
        return records

    def cut(self) -> lmdb.Transaction | None:
        """A read transaction over what is spilled now (``None`` if nothing is), for a checkpoint."""
        if self._head == self._tail:
            return None
        return self.env.begin()

    @staticmethod
    def records(txn: lmdb.Transaction) -> Iterator[tuple[Any, ...]]:
        """Every record in ``txn``'s view, oldest first (usable from another thread)."""
        with txn.cursor() as cur:
            for _, data in cur:
                for r in msgpack.unpackb(data, raw=False):
                    yield tuple(r)

    @staticmethod
    def packed(txn: lmdb.Transaction) -> Iterator[tuple[int, bytes]]:
        """Every chunk in ``txn``'s view as ``(records, their msgpack encodings one after
        another)``, oldest first, without decoding them (a checkpoint copies them as they are)."""
        with txn.cursor() as cur:
            for _, data in cur:
                first = data[0]
                if 0x90 <= first <= 0x9F:  # fixarray
                    yield first & 0x0F, bytes(data[1:])
                elif first == 0xDC:  # array 16
                    yield int.from_bytes(data[1:3], "big"), bytes(data[3:])
                else:  # array 32
                    yield int.from_bytes(data[1:5], "big"), bytes(data[5:])

    def clear(self) -> None:
        """Drop everything spilled."""
        if self._head != self._tail:
            with self.env.begin(write=True) as txn:
                txn.drop(self._db, delete=False)
        self._head = self._tail = 0
        self.count = 0

    def close(self) -> None:
        self.env.close()
        shutil.rmtree(self.path, ignore_errors=True)
