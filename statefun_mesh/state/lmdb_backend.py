"""LMDB state backend: one environment per peer, key layout, value codec, batch commits.

Layout (ARCHITECTURE §6). Named databases in one environment:

``state``
    key ``kg (u16 BE) | typename | 0x00 | id | 0x00 | state name`` — big-endian key
    group first, so a key group is one contiguous range. Type names and state names
    never contain NUL, so the key parses unambiguously (first and last NUL), even for
    ids that contain NUL. A key longer than LMDB's 511-byte limit is stored as
    ``kg | 0x00 | blake2b-256(typename NUL id NUL name)`` instead (a type name never
    starts with NUL, so the two forms cannot collide).
    value ``version (u8 = 1) | expire_at_ms (u64 BE, 0 = never) | len (u16 BE) |
    value typename | value bytes``.
``timers``      ``kg | seq (u64 BE)`` → msgpack ``[due_ms, token, sender_typename, sender_id, record]``
``timer_due``   ``due_ms (u64 BE) | kg | seq`` → empty: the firing order
``timer_tokens`` ``kg | blake2b-128(sender typename NUL sender id NUL token) | seq`` → empty
``egress``      ``egress typename | 0x00 | offset (u64 BE)`` → msgpack ``[value_typename, value]``,
                or ``[value_typename, value, id]`` for an immediate egress (``egress_immediate``);
                the id counter lives in ``state`` under the reserved name ``~egress-seq``
``dedup``       ``kg | blake2b-128(typename NUL id NUL idempotency key)`` → expire_at_ms (u64 BE):
                client messages already applied, so a resend is not applied again
``meta``        small counters (``timer_seq``) and the layout version.

All writes of one batch go through :meth:`LmdbStateBackend.commit` as an ordered list
of operations applied in one write transaction. A full map grows the map and
replays the operations; any other failure aborts the transaction, so a batch is
applied wholly or not at all.

Longer than ~500 lines because it is the one owner of the store's layout: keys and
value headers, the grow-and-retry commit, the change tracking a checkpoint's delta is
read from, rollback in place, and the dumps a checkpoint uploads all depend on it.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import operator
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, cast

import lmdb
import msgpack

from ..errors import StateBackendError, StateCapacityError
from ..records import OP_DEL

__all__ = [
    "LAYOUT_VERSION",
    "ChangeLog",
    "LmdbStateBackend",
    "Op",
    "decode_state_value",
    "dedup_key",
    "write_error",
    "encode_state_value",
    "state_key",
    "state_key_parts",
    "timer_token_prefix",
    "value_header",
]

log = logging.getLogger("statefun_mesh.state")

LAYOUT_VERSION: Final = 1
MAX_KEY: Final = 511
_VALUE_HEAD: Final = struct.Struct(">BQH")
_KG: Final = struct.Struct(">H")
_U64: Final = struct.Struct(">Q")
#: A failed LMDB write with less free space than this on its disk is taken for a full disk:
#: LMDB reports a short write (ENOSPC part-way through) as EIO, "Input/output error".
FULL_DISK_SLACK: Final = 64 << 20
_KG_SEQ: Final = struct.Struct(">HQ")
_DUE_KG_SEQ: Final = struct.Struct(">QHQ")

#: One write of a batch: ``("put", db, key, value)``, ``("putmulti", db, [(key, value), ...])``
#: (distinct keys, written with one cursor; a 4th field, when there, is the bytes of its keys
#: and values), ``("del", db, key)``,
#: ``("cancel", kg, token_prefix)`` or ``("fired", kg, seq, due_ms, token_prefix_or_None)``
#: (the tags are named in records.py: OP_PUT, OP_DEL, OP_CANCEL, OP_FIRED).
Op = tuple[Any, ...]


#: the first two bytes of every ``state`` key of key group ``kg`` (``KG_PREFIXES[kg]``)
KG_PREFIXES: Final = [kg.to_bytes(2, "big") for kg in range(32768)]


def state_key_parts(typename: str, name: str) -> tuple[bytes, bytes]:
    """The fixed parts of the ``state`` keys of value ``name`` of type ``typename``:
    ``(type part, name part)``. A key is ``KG_PREFIXES[kg] + type part + id bytes +
    name part`` (``id`` UTF-8, surrogates passed) when that is at most ``MAX_KEY``
    bytes long, else :func:`state_key`'s hashed form; the dispatcher builds keys from
    these parts on its hot path, :func:`state_key` everywhere else."""
    return typename.encode() + b"\x00", b"\x00" + name.encode()


def state_key(kg: int, typename: str, id: str, name: str) -> bytes:
    """Return the ``state`` key of one value of one instance (the layout: see :func:`state_key_parts`)."""
    body = b"%s\x00%s\x00%s" % (typename.encode(), id.encode("utf-8", "surrogatepass"), name.encode())
    if len(body) + 2 <= MAX_KEY:
        return _KG.pack(kg) + body
    return _KG.pack(kg) + b"\x00" + hashlib.blake2b(body, digest_size=32).digest()


def value_header(value_typename: str, expire_at_ms: int = 0) -> bytes:
    """The bytes a stored value of type ``value_typename`` with expiry ``expire_at_ms``
    starts with: the value is this header followed by the value's bytes."""
    tn = value_typename.encode()
    return _VALUE_HEAD.pack(1, expire_at_ms, len(tn)) + tn


#: value_header(vt) of the value types seen (expiry 0), for encode_state_value
_HEADERS: dict[str, bytes] = {}


def encode_state_value(value_typename: str, data: bytes, expire_at_ms: int) -> bytes:
    """Encode a stored value with its type name and expiry."""
    if not expire_at_ms:
        head = _HEADERS.get(value_typename)
        if head is None:
            head = value_header(value_typename)
            if len(_HEADERS) < 4096:  # type names come from functions, remote ones too: bounded
                _HEADERS[value_typename] = head
        return head + data
    tn = value_typename.encode()
    return _VALUE_HEAD.pack(1, expire_at_ms, len(tn)) + tn + data


def decode_state_value(raw: bytes) -> tuple[str, bytes, int]:
    """Decode a stored value into ``(value_typename, data, expire_at_ms)``.

    Raises:
        StateBackendError: the bytes are not a version-1 stored value.
    """
    if len(raw) < _VALUE_HEAD.size or raw[0] != 1:
        raise StateBackendError(f"stored value has an unknown layout (first byte {raw[:1]!r})")
    _, expire, n = _VALUE_HEAD.unpack_from(raw)
    end = _VALUE_HEAD.size + n
    return raw[_VALUE_HEAD.size : end].decode(), raw[end:], expire


def dedup_key(kg: int, typename: str, id: str, key: str) -> bytes:
    """Return the ``dedup`` key of one idempotency key sent to one instance."""
    h = hashlib.blake2b(
        b"%s\x00%s\x00%s"
        % (typename.encode(), id.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")),
        digest_size=16,
    ).digest()
    return _KG.pack(kg) + h


def timer_token_prefix(kg: int, sender_typename: str, sender_id: str, token: str) -> bytes:
    """Return the ``timer_tokens`` prefix of one (sender instance, token) pair."""
    h = hashlib.blake2b(
        b"%s\x00%s\x00%s" % (sender_typename.encode(), sender_id.encode("utf-8", "surrogatepass"), token.encode()),
        digest_size=16,
    ).digest()
    return _KG.pack(kg) + h


def write_error(what: str, path: str, exc: Exception, remedy: str) -> StateBackendError:
    """The error for a failed LMDB write to ``what`` at ``path``: a :class:`StateCapacityError`
    naming the full disk (or file-size limit) and ``remedy`` when that is the cause, else a
    :class:`StateBackendError`. Nothing of the failed transaction was applied either way."""
    text = str(exc)
    try:
        st = os.statvfs(path)
        free: int | None = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if "File too large" in text:
        return StateCapacityError(
            f"cannot write {what} at {path}: {text}: a file reached this process's file size limit "
            f"(ulimit -f / RLIMIT_FSIZE); raise the limit; {remedy}"
        )
    if "No space left" in text or "quota exceeded" in text.lower() or (free is not None and free < FULL_DISK_SLACK):
        space = f" ({free >> 20} MiB free)" if free is not None else ""
        return StateCapacityError(
            f"the disk holding {what} at {path} is full{space}: {text}; free space on that disk or move "
            f"state_dir to a larger one; {remedy}"
        )
    return StateBackendError(f"writing to {what} at {path} failed: {text}; check the disk (dmesg); {remedy}")


def write_growing(
    env: lmdb.Environment,
    write: Callable[[lmdb.Transaction], object],
    *,
    what: str,
    path: str,
    max_size: int,
    full: str,
    remedy: str,
) -> None:
    """Run ``write`` in one write transaction of ``env``, doubling the map while it does not
    fit: the one grow-and-retry loop of every LMDB file of a peer (state store, ingress
    log, inbox spill).

    Raises:
        StateCapacityError: the map would grow past ``max_size`` (its message: ``full``,
            with the size reached put in for ``{mib}``), or the disk is full; nothing was written.
        StateBackendError: any other LMDB failure (with ``remedy``); nothing was written.
    """
    while True:
        try:
            with env.begin(write=True) as txn:
                write(txn)
            return
        except lmdb.MapFullError as exc:
            size = env.info()["map_size"]
            if size * 2 > max_size:
                raise StateCapacityError(full.format(mib=size >> 20)) from exc
            log.info("%s map full at %d MiB; growing to %d MiB", what, size >> 20, size >> 19)
            env.set_mapsize(size * 2)
        except lmdb.Error as exc:
            raise write_error(what, path, exc, remedy) from exc


_FIRST: Final = operator.itemgetter(0)
_DISCARDED = ".discarded-"


def discard_store(path: str) -> None:
    """Delete the LMDB environment directory ``path`` without waiting for the disk.

    A restarted peer replaces its store with a rebuilt one on the recovery's critical
    path; unlinking a file of hundreds of MB (and dropping its cached pages) took 0.1-0.2 s
    there. The directory is renamed aside at once (``path`` is free for the new store) and
    deleted by a background thread; what a crash leaves of such directories is deleted by
    the next call for the same ``path``.
    """
    parent, base = os.path.split(os.path.abspath(path))
    doomed = []
    try:
        doomed = [os.path.join(parent, f) for f in os.listdir(parent) if f.startswith(base + _DISCARDED)]
    except OSError:
        pass
    if os.path.exists(path):
        aside = f"{path}{_DISCARDED}{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(path, aside)
            doomed.append(aside)
        except OSError:
            shutil.rmtree(path)  # cannot rename (it must be gone before the new store opens)
    if doomed:

        def delete() -> None:
            for d in doomed:
                shutil.rmtree(d, ignore_errors=True)

        threading.Thread(target=delete, name="statefun-mesh discard store", daemon=True).start()


class LmdbStateBackend:
    """One peer's LMDB environment.

    Args:
        path: directory of the environment (created if missing).
        map_size: initial map size in bytes; it doubles whenever a batch does not fit,
            up to ``max_map_size``.
        max_map_size: the largest map the backend grows to before it fails batches
            with :class:`~statefun_mesh.errors.StateCapacityError`.
        sync: fsync every commit. Off by default: a commit survives a crash of the
            process (it is in the OS page cache) but not of the machine, which is what
            checkpoints are for; :meth:`close` and :meth:`flush` always sync.
        cache_bytes: ``> 0``: keep a write-back cache of the ``state`` database of about
            this many bytes (a peer with checkpoints: a share of ``memory_budget``, see
            ``CACHE_SHARE``); 0: every commit writes its state to LMDB (without checkpoints).

    The write-back cache (docs/architecture.md §6 "Write-back cache"): a commit's ``state``
    puts and deletes go to :attr:`cache` (key -> the exact stored bytes, ``None``: deleted)
    instead of LMDB, after its other operations committed; :meth:`flush_cache` writes them
    in one transaction (a checkpoint's cut calls it before its read transaction; a commit
    calls it once the cache passes ``cache_bytes``; :meth:`read` and :meth:`close` call
    it). Readers of a batch's transaction look in the cache first (:meth:`read_unflushed`,
    :meth:`state_get`); a recovery discards it (:meth:`discard_cache`). Used only with
    checkpoints: then the live store after the last cut is never what a recovery uses.
    The cache is the event loop's: only its thread commits, reads and flushes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = 1 << 30,
        max_map_size: int = 1 << 40,
        sync: bool = False,
        cache_bytes: int = 0,
    ) -> None:
        self.path = os.fspath(path)
        os.makedirs(self.path, exist_ok=True)
        try:
            self.env = lmdb.open(
                self.path,
                map_size=map_size,
                max_dbs=8,
                sync=sync,
                metasync=sync,
                readahead=False,
                max_readers=256,
            )
        except lmdb.Error as exc:
            raise StateBackendError(f"cannot open the state store at {self.path}: {exc}") from exc
        self.max_map_size = max_map_size
        env = self.env
        self.db_state = env.open_db(b"state")
        self.db_timers = env.open_db(b"timers")
        self.db_timer_due = env.open_db(b"timer_due")
        self.db_timer_tokens = env.open_db(b"timer_tokens")
        self.db_egress = env.open_db(b"egress")
        self.db_meta = env.open_db(b"meta")
        self.db_dedup = env.open_db(b"dedup")
        self._dbs = {
            "state": self.db_state,
            "timers": self.db_timers,
            "timer_due": self.db_timer_due,
            "timer_tokens": self.db_timer_tokens,
            "egress": self.db_egress,
            "meta": self.db_meta,
            "dedup": self.db_dedup,
        }
        with env.begin(write=True) as txn:
            version = txn.get(b"layout_version", db=self.db_meta)
            if version is None:
                txn.put(b"layout_version", _U64.pack(LAYOUT_VERSION), db=self.db_meta)
            elif _U64.unpack(version)[0] != LAYOUT_VERSION:
                raise StateBackendError(
                    f"the state store at {self.path} has layout version {_U64.unpack(version)[0]}, "
                    f"this statefun_mesh reads version {LAYOUT_VERSION}; restore from a checkpoint "
                    "or use a fresh state directory"
                )
        self._closed = False
        #: (database name, key) of every entry written since the last take_changes(),
        #: or None while nobody tracks changes (no checkpoints); the keys a ``putmulti`` op
        #: writes (a batch's state values, most of all writes) are in ``_changed_keys``
        #: instead: see :meth:`pending_changes`.
        self.changed: set[tuple[str, bytes]] | None = None
        #: database name -> keys written by ``putmulti`` since the last take_changes(), folded
        #: from ``_runs``: a write costs one set insertion of its key, where a new
        #: ``(database, key)`` tuple cost twice that (about 2 % of a busy peer's CPU, issue 9)
        self._changed_keys: dict[str, set[bytes]] = {}
        #: the keys of each ``putmulti`` since the last fold into ``_changed_keys``, as
        #: ``(database, [key, ...])``: a batch's commit only copies its keys into a list
        #: (~37 µs per 1,000 writes on the loop, where the set insertions cost ~130 µs);
        #: they are deduplicated at the cut, in the checkpoint's build thread (ChangeLog)
        self._runs: list[tuple[str, list[bytes]]] = []
        #: keys in ``_runs``: folded on the loop once above FOLD_KEYS (bounded memory)
        self._run_keys = 0
        #: the write-back cache of the ``state`` database (None: off): key -> the bytes LMDB
        #: will hold, or None for a deletion; one dict for the store's life (the dispatcher
        #: holds it), emptied by a flush or a discard
        self.cache: dict[bytes, bytes | None] | None = {} if cache_bytes > 0 else None
        self.cache_bytes = cache_bytes
        #: bytes written into the cache since it was last emptied: every write's key and value
        #: plus CACHE_ENTRY_OVERHEAD, rewrites of a key included (an upper bound of what it holds)
        self._cached = 0
        #: flushes of the cache (at cuts, at the bound, before direct reads) and keys they wrote
        self.cache_flushes = 0
        self.cache_flushed_keys = 0

    # -- reads ------------------------------------------------------------------------

    def read(self) -> lmdb.Transaction:
        """Begin a read transaction: a consistent, copy-on-write view of the whole store.

        This is the snapshot seam: a checkpoint copies what one read transaction sees.
        The write-back cache is flushed first, so the view holds every committed batch
        (raises what :meth:`flush_cache` raises).
        """
        if self.cache:
            self.flush_cache()
        return self.env.begin(buffers=False)

    def read_unflushed(self) -> lmdb.Transaction:
        """A read transaction without flushing the write-back cache first: a batch's (the
        dispatcher's). Its reader must look in :attr:`cache` before it (:meth:`state_get`)."""
        return self.env.begin(buffers=False)

    def state_get(self, txn: lmdb.Transaction, key: bytes) -> bytes | None:
        """The stored bytes of ``state`` key ``key`` as a batch sees them: the write-back
        cache's, else ``txn``'s (a transaction of :meth:`read_unflushed`)."""
        cache = self.cache
        if cache is not None and key in cache:
            return cache[key]
        return cast("bytes | None", txn.get(key, db=self.db_state))

    def meta_int(self, key: bytes, default: int = 0) -> int:
        """Read an integer counter from ``meta``."""
        with self.env.begin() as txn:
            raw = txn.get(key, db=self.db_meta)
        return default if raw is None else _U64.unpack(raw)[0]

    def next_timer_due(self) -> int | None:
        """Return the due time (ms) of the earliest pending timer, or ``None``."""
        with self.env.begin() as txn, txn.cursor(db=self.db_timer_due) as cur:
            if cur.first():
                return int(_U64.unpack_from(cur.key())[0])
        return None

    def due_timers(self, now_ms: int, limit: int) -> list[tuple[int, int, int, list[Any]]]:
        """Return up to ``limit`` timers due at ``now_ms``: ``(kg, seq, due_ms, value)`` in firing order."""
        out: list[tuple[int, int, int, list[Any]]] = []
        with self.env.begin() as txn, txn.cursor(db=self.db_timer_due) as cur:
            if not cur.first():
                return out
            for key in cur.iternext(keys=True, values=False):
                due, kg, seq = _DUE_KG_SEQ.unpack(key)
                if due > now_ms or len(out) >= limit:
                    break
                raw = txn.get(_KG_SEQ.pack(kg, seq), db=self.db_timers)
                if raw is None:  # index without a timer: repaired by the next write
                    log.warning("timer index entry without a timer (kg %d, seq %d); dropping it", kg, seq)
                    out.append((kg, seq, due, []))
                    continue
                out.append((kg, seq, due, msgpack.unpackb(raw, raw=False)))
        return out

    def egress_range(self, typename: str, start: int, limit: int) -> list[tuple[int, str, bytes, str | None]]:
        """Return up to ``limit`` egress records ``(offset, value type, value, id or None)``
        of ``typename`` from offset ``start`` on."""
        prefix = typename.encode() + b"\x00"
        out: list[tuple[int, str, bytes, str | None]] = []
        with self.env.begin() as txn, txn.cursor(db=self.db_egress) as cur:
            if not cur.set_range(prefix + _U64.pack(start)):
                return out
            for key, val in cur.iternext():
                if not key.startswith(prefix) or len(out) >= limit:
                    break
                fields = msgpack.unpackb(val, raw=False)  # [vt, value] or [vt, value, id]
                out.append(
                    (
                        _U64.unpack_from(key, len(prefix))[0],
                        fields[0],
                        fields[1],
                        fields[2] if len(fields) > 2 else None,
                    )
                )
        return out

    def egress_bounds(self, typename: str) -> tuple[int, int]:
        """Return ``(first, next)`` offsets of an egress: its oldest retained and its next record."""
        prefix = typename.encode() + b"\x00"
        with self.env.begin() as txn, txn.cursor(db=self.db_egress) as cur:
            if not cur.set_range(prefix) or not cur.key().startswith(prefix):
                return 0, 0
            first = _U64.unpack_from(cur.key(), len(prefix))[0]
            found = cur.prev() if cur.set_range(prefix + b"\xff" * 8) else cur.last()
            if not found or not cur.key().startswith(prefix):  # pragma: no cover - first exists
                return first, first
            last = _U64.unpack_from(cur.key(), len(prefix))[0]
            return first, last + 1

    def egress_heads(self, txn: lmdb.Transaction) -> dict[str, int]:
        """The next offset of every egress in ``txn``'s view."""
        heads: dict[str, int] = {}
        with txn.cursor(db=self.db_egress) as cur:
            found = cur.first()
            while found:
                key = cast(bytes, cur.key())  # the store returns bytes (it is not opened with buffers=True)
                prefix = key[:-8]
                found = cur.prev() if cur.set_range(prefix + b"\xff" * 8) else cur.last()
                last = cast(bytes, cur.key())
                heads[prefix[:-1].decode()] = _U64.unpack_from(last, len(prefix))[0] + 1
                found = cur.set_range(prefix + b"\xff" * 8 + b"\x00")
        return heads

    def iter_state(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
        """Iterate every ``state`` entry of a transaction's view, in key order."""
        with txn.cursor(db=self.db_state) as cur:
            yield from cast("Iterator[tuple[bytes, bytes]]", cur.iternext())

    # -- writes -----------------------------------------------------------------------

    def commit(self, ops: Sequence[Op]) -> None:
        """Apply ``ops`` in order in one write transaction.

        Raises:
            StateCapacityError: the store is full and cannot grow (map at its limit, or
                the disk is full); nothing of the batch was applied.
            StateBackendError: any other LMDB failure; nothing was applied.
        """
        if not ops:
            return
        cache = self.cache
        if cache is not None:
            if self._cached > self.cache_bytes:
                self.flush_cache()  # raises with nothing of this batch applied, the cache intact
            state: list[Op] = []
            other: list[Op] = []
            for op in ops:
                kind = op[0]
                if (kind == "putmulti" or kind == "put" or kind == "del") and op[1] == "state":
                    state.append(op)
                else:
                    other.append(op)
            if other:
                self._write(other)
            # the batch's other writes are in: its state writes go to the cache (not before:
            # a failed commit must leave nothing of the batch behind)
            added = 0
            for op in state:
                kind = op[0]
                if kind == "putmulti":
                    puts = op[2]
                    cache.update(puts)
                    # the bytes of its keys and values: counted by collect_puts (an optional 4th
                    # field: a sum over the list here cost ~130 ns a write, a third of the rest)
                    size = op[3] if len(op) > 3 else sum(map(len, itertools.chain.from_iterable(puts)))
                    added += size + CACHE_ENTRY_OVERHEAD * len(puts)
                elif kind == "put":
                    cache[op[2]] = op[3]
                    added += len(op[2]) + len(op[3]) + CACHE_ENTRY_OVERHEAD
                else:
                    cache[op[2]] = None
                    added += len(op[2]) + CACHE_ENTRY_OVERHEAD
            self._cached += added
            return
        self._write(ops)

    def _write(self, ops: Sequence[Op]) -> None:
        write_growing(
            self.env,
            lambda txn: self._apply(txn, ops),
            what="the state store",
            path=self.path,
            max_size=self.max_map_size,
            full=f"the state store at {self.path} is full at its size limit ({{mib}} MiB); raise max_map_size or "
            "delete state",
            remedy="nothing of the batch was applied; the peer retries it with backoff and goes on by itself",
        )

    def _apply(self, txn: lmdb.Transaction, ops: Sequence[Op]) -> None:
        dbs = self._dbs
        put = txn.put
        delete = txn.delete
        track = self.changed
        for op in ops:
            kind = op[0]
            if kind == "put":
                put(op[2], op[3], db=dbs[op[1]])
                if track is not None:
                    track.add((op[1], op[2]))
            elif kind == "putmulti":
                with txn.cursor(db=dbs[op[1]]) as cur:
                    cur.putmulti(op[2])
                if track is not None:
                    self._runs.append((op[1], list(map(_FIRST, op[2]))))
                    self._run_keys += len(op[2])
                    if self._run_keys > FOLD_KEYS:
                        _fold(self._changed_keys, self._runs)
                        self._runs = []
                        self._run_keys = 0
            elif kind == "del":
                delete(op[2], db=dbs[op[1]])
                if track is not None:
                    track.add((op[1], op[2]))
            elif kind == "cancel":
                self._cancel(txn, op[1], op[2])
            elif kind == "fired":
                _, kg, seq, due, tok = op
                keys = [("timers", _KG_SEQ.pack(kg, seq)), ("timer_due", _DUE_KG_SEQ.pack(due, kg, seq))]
                if tok is not None:
                    keys.append(("timer_tokens", tok + _U64.pack(seq)))
                for db, key in keys:
                    delete(key, db=dbs[db])
                    if track is not None:
                        track.add((db, key))
            elif kind == "trim":
                self._trim(txn, op[1], op[2])
            else:  # pragma: no cover - programming error
                raise AssertionError(f"unknown op {kind!r}")

    def flush_cache(self) -> int:
        """Write the write-back cache into LMDB in one write transaction (one ``putmulti``
        of its puts, its deletes), track each key once as changed, and empty it; returns
        how many keys. A no-op without a cache.

        Raises:
            StateCapacityError: the store is full (map at its limit, or the disk); nothing
                was written and the cache keeps every entry (a later flush retries).
            StateBackendError: any other LMDB failure; the same.
        """
        cache = self.cache
        if not cache:
            return 0
        db = self.db_state
        puts = [(k, v) for k, v in cache.items() if v is not None]
        dels = [k for k, v in cache.items() if v is None] if len(puts) < len(cache) else []

        def write(txn: lmdb.Transaction) -> None:
            if puts:
                with txn.cursor(db=db) as cur:
                    cur.putmulti(puts)
            for key in dels:
                txn.delete(key, db=db)

        write_growing(
            self.env,
            write,
            what="the state store",
            path=self.path,
            max_size=self.max_map_size,
            full=f"the state store at {self.path} is full at its size limit ({{mib}} MiB) while writing cached "
            "state; raise max_map_size or delete state",
            remedy="nothing was written and the cache keeps it; the peer retries",
        )
        n = len(cache)
        if self.changed is not None:  # one key per distinct key written since the last flush
            self._runs.append(("state", list(cache)))
            self._run_keys += n
            if self._run_keys > FOLD_KEYS:
                _fold(self._changed_keys, self._runs)
                self._runs = []
                self._run_keys = 0
        cache.clear()
        self._cached = 0
        self.cache_flushes += 1
        self.cache_flushed_keys += n
        return n

    def discard_cache(self) -> int:
        """Forget the write-back cache without writing it (a recovery: the store is rolled
        back or rebuilt to a checkpoint, which the cached writes came after); returns how
        many keys it held."""
        cache = self.cache
        if not cache:
            return 0
        n = len(cache)
        cache.clear()
        self._cached = 0
        return n

    def purge_dedup(self, now_ms: int, start: bytes, limit: int) -> bytes:
        """Delete expired idempotency keys among the next ``limit`` from ``start``.

        Returns where the next call should start (``b""``: from the beginning again).
        """
        expired: list[bytes] = []
        nxt = b""
        with self.env.begin() as txn, txn.cursor(db=self.db_dedup) as cur:
            if cur.set_range(start):
                for i, (key, value) in enumerate(cur.iternext()):
                    if i >= limit:
                        nxt = key
                        break
                    if _U64.unpack(value)[0] <= now_ms:
                        expired.append(key)
        if expired:
            self.commit([(OP_DEL, "dedup", k) for k in expired])
        return nxt

    # -- snapshots ---------------------------------------------------------------------

    def pending_changes(self) -> set[tuple[str, bytes]] | None:
        """``(database, key)`` of every entry written since the last :meth:`take_changes`
        (``None``: changes are not tracked). Not a live view: later writes are not in it."""
        if self.changed is None:
            return None
        keys = {name: set(names) for name, names in self._changed_keys.items()}
        return ChangeLog(set(self.changed), keys, list(self._runs)).as_set()

    def take_changes(self) -> set[tuple[str, bytes]]:
        """Return the keys written since the last call and start a new set (turns tracking on)."""
        return self.take_change_log().as_set()

    def take_change_log(self) -> ChangeLog:
        """What :meth:`take_changes` returns, not yet deduplicated: a checkpoint's cut takes
        it on the loop at the cost of a few pointer swaps, and its build thread folds it."""
        log = ChangeLog(self.changed or set(), self._changed_keys, self._runs)
        self.changed = set()
        self._changed_keys = {}
        self._runs = []
        self._run_keys = 0
        return log

    def dump(self, txn: lmdb.Transaction) -> Iterator[tuple[str, bytes, bytes]]:
        """Every entry of every database in ``txn``'s view: a full snapshot."""
        for name, db in self._dbs.items():
            if name == "meta":
                continue
            with txn.cursor(db=db) as cur:
                for key, value in cast("Iterator[tuple[bytes, bytes]]", cur.iternext()):
                    yield name, key, value
        raw = cast("bytes | None", txn.get(b"timer_seq", db=self.db_meta))
        if raw is not None:
            yield "meta", b"timer_seq", raw

    def entries(self, txn: lmdb.Transaction) -> int:
        """Entries a base object of ``txn``'s view would hold (every database but meta)."""
        n = 0
        for name, db in self._dbs.items():
            if name != "meta":
                n += int(txn.stat(db)["entries"])
        return n

    def dump_packed(self, txn: lmdb.Transaction, chunk: int = 4096) -> Iterator[tuple[int, bytes]]:
        """What :meth:`dump` yields, msgpack-encoded as ``[database, key, value]`` entries (a
        base object's encoding), ``(count, bytes)`` for up to ``chunk`` entries at a time:
        one comprehension per chunk over the cursor instead of two generator steps and a
        ``pack`` call per entry in the build thread, which holds the GIL the loop needs."""
        pack = msgpack.Packer(use_bin_type=True).pack
        for name, db in self._dbs.items():
            if name == "meta":
                continue
            with txn.cursor(db=db) as cur:
                it = cast("Iterator[tuple[bytes, bytes]]", cur.iternext())
                while part := [pack([name, k, v]) for k, v in itertools.islice(it, chunk)]:
                    yield len(part), b"".join(part)
        raw = cast("bytes | None", txn.get(b"timer_seq", db=self.db_meta))
        if raw is not None:
            yield 1, pack(["meta", b"timer_seq", raw])

    def delta(
        self, txn: lmdb.Transaction, changed: set[tuple[str, bytes]]
    ) -> Iterator[tuple[str, bytes, bytes | None]]:
        """The current value (``None``: deleted) in ``txn``'s view of every changed key, in key order."""
        dbs = self._dbs
        for name, key in sorted(changed):
            yield name, key, cast("bytes | None", txn.get(key, db=dbs[name]))

    def delta_packed(
        self, txn: lmdb.Transaction, changed: set[tuple[str, bytes]] | ChangeLog, chunk: int = 4096
    ) -> Iterator[tuple[int, bytes]]:
        """What :meth:`delta` yields, msgpack-encoded as ``[database, key, value]`` entries
        (the checkpoint objects' encoding), ``(count, bytes)`` for up to ``chunk`` entries at
        a time: the bytes a checkpoint's build writes for them, from C-level loops (one
        ``getmulti`` and one comprehension per chunk) instead of a generator per entry; it
        ran 2.6 µs per entry in the build thread, holding the GIL the loop needs."""
        import msgpack

        pack = msgpack.Packer(use_bin_type=True).pack
        dbs = self._dbs
        if isinstance(changed, ChangeLog):
            # per database, in the order sorted (database, key) pairs have: no tuple per key
            keys: list[tuple[str, bytes]] = []
            for name, names in sorted(changed.by_database().items()):
                keys += zip(itertools.repeat(name), sorted(names))
        else:
            keys = sorted(changed)
        for i in range(0, len(keys), chunk):
            part = keys[i : i + chunk]
            out: list[bytes] = []
            start = 0
            while start < len(part):  # runs of one database (sorted: each database's keys are together)
                name = part[start][0]
                end = start
                while end < len(part) and part[end][0] == name:
                    end += 1
                run = [k for _, k in part[start:end]]
                with txn.cursor(db=dbs[name]) as cur:
                    found = dict(cur.getmulti(run))
                out += [pack([name, k, found.get(k)]) for k in run]
                start = end
            yield len(part), b"".join(out)

    def load(self, entries: Iterable[Sequence[Any]], batch: int = 50_000, *, append: bool = False) -> int:
        """Apply snapshot entries ``(database, key, value or None)`` (puts, and deletes for
        ``None``) in order, ``batch`` to a write transaction; return how many.

        The restore path: runs of puts into one database go to LMDB as one
        ``Cursor.putmulti``, and a batch is held as three flat lists (database names, keys,
        values), never as one container object per entry, so loading millions of entries
        does not set off the cyclic garbage collector over and over. Nothing is added to
        the change set (a restore is followed by :meth:`take_changes`). ``append``: the
        entries are in key order per database and after every key the store holds (a base
        loaded into an empty store), so LMDB appends them without searching; a run that
        is not in order is put again the ordinary way, so this is only ever a speed-up.

        Raises:
            StateBackendError: an entry names an unknown database (what came before its
                batch is applied), or LMDB failed.
        """
        n = 0
        it = iter(entries)
        while True:
            names: list[str] = []
            keys: list[bytes] = []
            values: list[bytes | None] = []
            for e in itertools.islice(it, batch):
                names.append(e[0])
                keys.append(e[1])
                values.append(e[2])
            if not names:
                return n
            write_growing(
                self.env,
                functools.partial(self._load_chunk, names=names, keys=keys, values=values, append=append),
                what="the state store",
                path=self.path,
                max_size=self.max_map_size,
                full=f"the state store at {self.path} is full at its size limit ({{mib}} MiB) while restoring a "
                "checkpoint; raise max_map_size",
                remedy="the restore failed; the coordinator retries it",
            )
            n += len(names)

    def _load_chunk(
        self, txn: lmdb.Transaction, names: list[str], keys: list[bytes], values: list[bytes | None], append: bool
    ) -> None:
        dbs = self._dbs
        end = len(names)
        if names.count(names[0]) == end and None not in values:
            # the common case (a base's batch: puts into one database), checked in C
            self._put_run(txn, names[0], keys, cast("list[bytes]", values), append)
            return
        i = 0
        while i < end:
            name = names[i]
            j = i
            while j < end and names[j] == name and values[j] is not None:
                j += 1
            if j > i:  # a run of puts into one database
                self._put_run(txn, name, keys[i:j], cast("list[bytes]", values[i:j]), append)
                i = j
            else:  # a delete
                db = dbs.get(name)
                if db is None:
                    raise StateBackendError(f"snapshot entry for unknown database {name!r}")
                txn.delete(keys[i], db=db)
                i += 1

    def _put_run(self, txn: lmdb.Transaction, name: str, keys: list[bytes], values: list[bytes], append: bool) -> None:
        db = self._dbs.get(name)
        if db is None:
            raise StateBackendError(f"snapshot entry for unknown database {name!r}")
        with txn.cursor(db=db) as cur:
            consumed, added = cur.putmulti(zip(keys, values, strict=True), append=append)
            if added != consumed:  # out of order for an append (LMDB skipped those): put them all
                cur.putmulti(zip(keys, values, strict=True))

    def usable_view(self, view: lmdb.Transaction) -> bool:
        """Whether read transaction ``view`` still sees its snapshot: growing the map
        (``set_mapsize``) invalidates every open transaction of the environment."""
        try:
            view.stat(self.db_state)
        except lmdb.Error:
            return False
        return True

    def rollback(self, view: lmdb.Transaction, keys: Iterable[tuple[str, bytes]]) -> int:
        """Roll the store back in place to what ``view`` sees, given ``keys``: every
        ``(database, key)`` written since ``view`` began (a superset is fine). Each of
        them gets ``view``'s value again, or is deleted where ``view`` has none; every
        other entry is untouched, so it already equals ``view``'s. One write transaction;
        the change set is emptied (the store now equals ``view``). Returns how many keys.

        The restore path of a peer that kept running: it rewrites only what changed since
        the checkpoint instead of rebuilding the whole store from its objects.

        Raises:
            StateBackendError: ``view`` is no longer readable, or the write failed;
                nothing was written then.
        """
        self.discard_cache()  # writes after the view's cut that never reached LMDB
        dbs = self._dbs
        try:
            restore = [(dbs[db], key, cast("bytes | None", view.get(key, db=dbs[db]))) for db, key in sorted(keys)]
        except lmdb.Error as exc:
            raise StateBackendError(
                f"cannot read the checkpoint's view of {self.path}: {exc}; rebuild the "
                "store from the checkpoint instead"
            ) from exc

        def write(txn: lmdb.Transaction) -> None:
            for db, key, value in restore:
                if value is None:
                    txn.delete(key, db=db)
                else:
                    txn.put(key, value, db=db)

        write_growing(
            self.env,
            write,
            what="the state store",
            path=self.path,
            max_size=self.max_map_size,
            full=f"the state store at {self.path} is full at its size limit ({{mib}} MiB) while rolling back to a "
            "checkpoint; raise max_map_size",
            remedy="the rollback failed; the coordinator retries the recovery",
        )
        self.take_changes()
        return len(restore)

    def _cancel(self, txn: lmdb.Transaction, kg: int, prefix: bytes) -> None:
        seqs: list[int] = []
        with txn.cursor(db=self.db_timer_tokens) as cur:
            if cur.set_range(prefix):
                for key in cast("Iterator[bytes]", cur.iternext(keys=True, values=False)):
                    if not key.startswith(prefix):
                        break
                    seqs.append(_U64.unpack_from(key, len(prefix))[0])
        for seq in seqs:
            tkey = _KG_SEQ.pack(kg, seq)
            raw = txn.get(tkey, db=self.db_timers)
            txn.delete(prefix + _U64.pack(seq), db=self.db_timer_tokens)
            track = self.changed
            if track is not None:
                track.add(("timer_tokens", prefix + _U64.pack(seq)))
            if raw is None:
                continue
            due = msgpack.unpackb(raw, raw=False)[0]
            txn.delete(tkey, db=self.db_timers)
            txn.delete(_DUE_KG_SEQ.pack(due, kg, seq), db=self.db_timer_due)
            if track is not None:
                track.add(("timers", tkey))
                track.add(("timer_due", _DUE_KG_SEQ.pack(due, kg, seq)))

    def _trim(self, txn: lmdb.Transaction, typename: str, keep_from: int) -> None:
        prefix = typename.encode() + b"\x00"
        end = prefix + _U64.pack(keep_from)
        with txn.cursor(db=self.db_egress) as cur:
            if not cur.set_range(prefix):
                return
            track = self.changed
            while cur.key() and cast(bytes, cur.key()) < end:
                if track is not None:
                    track.add(("egress", cast(bytes, cur.key())))
                if not cur.delete():
                    break

    def flush(self) -> None:
        """Force committed data to disk."""
        self.env.sync(True)

    def close(self) -> None:
        """Flush the write-back cache, sync and close the environment (idempotent). A cache
        that cannot be written is dropped with a warning (a peer with a cache rebuilds its
        store from its last checkpoint when it starts again)."""
        if not self._closed:
            self._closed = True
            try:
                try:
                    self.flush_cache()
                except StateBackendError as exc:
                    log.warning(
                        "closing %s: %d cached state writes not written: %s", self.path, len(self.cache or ()), exc
                    )
                self.env.sync(True)
            finally:
                self.env.close()


#: Python memory of one write-back cache entry besides its key's and value's bytes: the
#: two bytes objects' headers and the dict's slot (counted per write: see ``_cached``)
CACHE_ENTRY_OVERHEAD: Final = 100
#: the write-back cache's share of ``memory_budget`` (a peer with checkpoints): an eighth,
#: beside the inbox's half and the links' and frames' quarters. Writes are counted with
#: rewrites, so a hot key set written faster than this per checkpoint interval is flushed
#: between cuts too: ~230,000 writes of small values per flush at the default 256 MiB
CACHE_SHARE: Final = 8

#: keys of ``putmulti`` writes the store keeps as lists before it folds them into its
#: change set on the loop: 262,144 keys (~20 MiB of state keys) bounds the memory when
#: checkpoints are rare; at a checkpoint a second the cut folds them first
FOLD_KEYS: Final = 1 << 18


def _fold(into: dict[str, set[bytes]], runs: list[tuple[str, list[bytes]]]) -> None:
    """Add the keys of ``runs`` (database, keys) to the per-database sets ``into``."""
    for name, keys in runs:
        have = into.get(name)
        if have is None:
            have = into[name] = set()
        have.update(keys)


class ChangeLog:
    """The keys a store wrote between two cuts, as it tracked them: ``(database, key)``
    pairs of single writes, per-database sets, and the key lists of ``putmulti`` writes not
    yet deduplicated. Owned by one checkpoint once taken (the store starts new ones), so
    its build thread can fold it (:meth:`by_database`) while the loop writes on."""

    __slots__ = ("_keys", "_lock", "_pairs", "_runs")

    def __init__(
        self, pairs: set[tuple[str, bytes]], keys: dict[str, set[bytes]], runs: list[tuple[str, list[bytes]]]
    ) -> None:
        self._pairs = pairs
        self._keys = keys  # folded into in place: the caller hands over what it passes
        self._runs = runs
        # the build thread folds while the loop may read it (a checkpoint aborted mid-build)
        self._lock = threading.Lock()

    def add(self, pairs: set[tuple[str, bytes]]) -> None:
        """Add changed ``(database, key)`` pairs (keys an aborted checkpoint carried over)."""
        with self._lock:
            self._pairs |= pairs

    def writes(self) -> int:
        """Writes logged, duplicates counted until folded: what folding would cost."""
        with self._lock:
            return (
                sum(len(keys) for _, keys in self._runs)
                + len(self._pairs)
                + sum(len(keys) for keys in self._keys.values())
            )

    def by_database(self) -> dict[str, set[bytes]]:
        """Every changed key, per database (folds the lists: call it off the loop). Do
        not modify the sets."""
        with self._lock:
            if self._runs or self._pairs:
                keys = self._keys
                _fold(keys, self._runs)
                for name, key in self._pairs:
                    have = keys.get(name)
                    if have is None:
                        have = keys[name] = set()
                    have.add(key)
                self._runs, self._pairs = [], set()
            return self._keys

    def as_set(self) -> set[tuple[str, bytes]]:
        """Every changed key as ``(database, key)``."""
        out: set[tuple[str, bytes]] = set()
        for name, keys in self.by_database().items():
            out.update(zip(itertools.repeat(name), keys))
        return out


def pack_kg_seq(kg: int, seq: int) -> bytes:
    """``kg | seq``: a ``timers`` key."""
    return _KG_SEQ.pack(kg, seq)


def pack_due_kg_seq(due: int, kg: int, seq: int) -> bytes:
    """``due | kg | seq``: a ``timer_due`` key."""
    return _DUE_KG_SEQ.pack(due, kg, seq)


def pack_u64(n: int) -> bytes:
    """Big-endian u64."""
    return _U64.pack(n)
