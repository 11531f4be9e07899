"""Restoring a checkpoint taken on N peers onto M peers.

Everything a peer stores is either keyed by key group (state, timers, timer tokens,
idempotency keys: the key group is part of the LMDB key, ARCHITECTURE §6) or belongs
to the peer itself (its egress logs, its counters, its ingress log). A peer of the
new mesh therefore takes:

- every key-grouped entry, from whichever old parts held it, whose key group it now
  owns;
- the messages in flight at the cut (from every old part) whose target it now owns;
- the egress log of the old peer with its own index, unchanged (so a consumer's
  ``(peer, offset)`` positions stay valid), and, when scaling down, the egress logs of
  the removed peers ``r`` with ``r % M == self``, appended after its own (new offsets);
- its own ingress log from the old part's position, and the ingress logs of the
  removed peers it inherits, from their parts' positions (read from the state
  directory: on one machine, ``statefun-mesh run``, they are there).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any, Final

__all__ = ["KEY_GROUPED", "entry_key_group", "inherited_peers", "split_entries"]

_U16: Final = struct.Struct(">H")
_U64: Final = struct.Struct(">Q")

#: databases whose keys start with the key group (big-endian u16)
KEY_GROUPED: Final = frozenset({"state", "timers", "timer_tokens", "dedup"})


def entry_key_group(db: str, key: bytes) -> int | None:
    """The key group of one stored entry, or ``None`` for per-peer entries (egress, meta)."""
    if db in KEY_GROUPED:
        return _U16.unpack_from(key)[0]  # type: ignore[no-any-return]
    if db == "timer_due":  # due_ms (u64) | kg (u16) | seq (u64)
        return _U16.unpack_from(key, 8)[0]  # type: ignore[no-any-return]
    return None


def inherited_peers(me: int, old_peers: int, new_peers: int) -> list[int]:
    """The old peers whose egress and ingress logs new peer ``me`` takes over: its own
    index (if it existed), then the removed peers ``r >= new_peers`` with ``r % new_peers == me``."""
    own = [me] if me < old_peers else []
    return own + [r for r in range(new_peers, old_peers) if r % new_peers == me]


class split_entries:
    """Filter one old part's checkpoint entries for a new peer owning key groups ``[lo, hi)``.

    Iterating yields the key-grouped entries to load. Meanwhile it collects, in
    :attr:`egress`, the part's egress entries (``key -> value``, deletes applied) when
    ``keep_egress``, and the largest ``timer_seq`` counter in :attr:`timer_seq`.
    """

    def __init__(self, entries: Iterable[Any], lo: int, hi: int, *, keep_egress: bool) -> None:
        self._entries = entries
        self.lo, self.hi = lo, hi
        self.keep_egress = keep_egress
        self.egress: dict[bytes, bytes] = {}
        self.timer_seq = 0

    def __iter__(self) -> Iterator[tuple[str, bytes, bytes | None]]:
        lo, hi = self.lo, self.hi
        for db, key, value in self._entries:
            if db == "egress":
                if self.keep_egress:
                    if value is None:
                        self.egress.pop(key, None)
                    else:
                        self.egress[key] = value
                continue
            if db == "meta":
                if key == b"timer_seq" and value is not None:
                    self.timer_seq = max(self.timer_seq, _U64.unpack(value)[0])
                continue
            kg = entry_key_group(db, key)
            if kg is not None and lo <= kg < hi:
                yield db, key, value


def renumber_egress(entries: dict[bytes, bytes], heads: dict[str, int]) -> list[tuple[str, bytes, bytes]]:
    """Egress entries of a removed peer, appended after ``heads`` (updated in place), in order."""
    out: list[tuple[str, bytes, bytes]] = []
    for key in sorted(entries):  # typename NUL offset (u64 BE): sorts by egress, then offset
        typename = key[:-9].decode()
        offset = heads.get(typename, 0)
        heads[typename] = offset + 1
        out.append(("egress", key[:-8] + _U64.pack(offset), entries[key]))
    return out
