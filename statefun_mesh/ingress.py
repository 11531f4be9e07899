"""The built-in ingress log: client messages made durable before they are acknowledged.

Each peer appends the client messages it admits to its own log, an LMDB environment
beside (not inside) its state store, at ``<state_dir>/peer-<id>.ingress``. The state
store is rolled back on recovery; the ingress log never is: a checkpoint records the
log position it covers, and recovery replays the log from there. Entries before the
position of the last complete checkpoint are trimmed.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from typing import Any, Final

import lmdb
import msgpack

from .errors import StateBackendError
from .state.lmdb_backend import write_error, write_growing

__all__ = ["IngressLog"]

_U64: Final = struct.Struct(">Q")

log = logging.getLogger("statefun_mesh.ingress")


class IngressLog:
    """An append-only log of message records, addressed by offset.

    Args:
        path: directory of the log's LMDB environment.
        sync: fsync every append (the default): an acknowledged message survives a
            machine crash, not only a process crash.
    """

    def __init__(self, path: str, *, sync: bool = True, map_size: int = 1 << 30, max_map_size: int = 1 << 40) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, map_size=map_size, max_dbs=1, sync=sync, metasync=sync, readahead=False)
        except lmdb.Error as exc:
            raise StateBackendError(f"cannot open the ingress log at {path}: {exc}") from exc
        self.max_map_size = max_map_size
        with self.env.begin() as txn, txn.cursor() as cur:
            self.next_offset = _U64.unpack(cur.key())[0] + 1 if cur.last() else 0
            self.first_offset = _U64.unpack(cur.key())[0] if cur.first() else self.next_offset

    def append(self, records: Sequence[Sequence[Any]]) -> int:
        """Append ``records`` in one transaction; return the offset of the first.

        Raises:
            StateCapacityError: the log is full and cannot grow, or the disk is full;
                nothing was appended.
            StateBackendError: any other failure; nothing was appended.
        """
        first = self.next_offset
        items = [(_U64.pack(first + i), msgpack.packb(list(r), use_bin_type=True)) for i, r in enumerate(records)]

        def write(txn: lmdb.Transaction) -> None:
            for k, v in items:
                txn.put(k, v, append=True)

        write_growing(
            self.env,
            write,
            what="the ingress log",
            path=self.path,
            max_size=self.max_map_size,
            full=f"the ingress log at {self.path} is full at its size limit ({{mib}} MiB); let checkpoints "
            "complete: they trim the log",
            remedy="client sends are refused meanwhile (nothing of them was logged; retry them with the "
            "same idempotency key) and accepted again once the log can be written",
        )
        self.next_offset = first + len(items)
        return first

    def read(self, start: int, limit: int) -> list[tuple[int, tuple[Any, ...]]]:
        """Up to ``limit`` entries ``(offset, record)`` from ``start`` on."""
        out: list[tuple[int, tuple[Any, ...]]] = []
        with self.env.begin() as txn, txn.cursor() as cur:
            if not cur.set_range(_U64.pack(start)):
                return out
            for key, value in cur.iternext():
                if len(out) >= limit:
                    break
                out.append((_U64.unpack(key)[0], tuple(msgpack.unpackb(value, raw=False))))
        return out

    def trim(self, before: int) -> None:
        """Delete the entries before offset ``before`` (covered by a complete checkpoint)."""
        if before <= self.first_offset:
            return
        try:
            with self.env.begin(write=True) as txn, txn.cursor() as cur:
                if cur.first():
                    while cur.key() and _U64.unpack(cur.key())[0] < before:
                        if not cur.delete():
                            break
        except lmdb.Error as exc:  # e.g. a full disk: keep the entries, the next checkpoint trims them
            log.warning(
                "%s", write_error("the ingress log", self.path, exc, "trimming is retried after the next checkpoint")
            )
            return
        self.first_offset = before

    def close(self) -> None:
        self.env.close()
