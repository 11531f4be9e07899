"""The storage layout has one owner (state/lmdb_backend.py): the state keys the dispatcher
builds on its hot path are the keys ``state_key`` makes, and every LMDB file of a peer
grows through the same grow-and-retry loop, failing with a ``StateCapacityError`` that
names the file and changing nothing when it cannot grow (real LMDB files, tiny maps)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from statefun_mesh import IntType, StatefulFunctions, ValueSpec
from statefun_mesh.errors import StateCapacityError
from statefun_mesh.ingress import IngressLog
from statefun_mesh.spill import Spill
from statefun_mesh.state.lmdb_backend import KG_PREFIXES, MAX_KEY, LmdbStateBackend, encode_state_value, state_key

PAGE = os.sysconf("SC_PAGE_SIZE")


def test_the_dispatchers_key_parts_make_the_keys_state_key_makes() -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="lay/out", specs=[ValueSpec(name="count", type=IntType)])
    def f(context: object, message: object) -> None: ...

    spec = functions._functions["lay/out"]  # the bound spec, as the dispatcher reads it
    for kg, id in ((0, "a"), (1023, "ünï\udcff"), (32767, "x" * 40)):
        name, _, tpart, npart, vhead, decode = spec.key_parts[0]
        fast = KG_PREFIXES[kg] + tpart + id.encode("utf-8", "surrogatepass") + npart
        assert name == "count" and len(fast) <= MAX_KEY and fast == state_key(kg, "lay/out", id, "count")
    # the stored-value header the dispatcher decodes by: what encode_state_value writes before the bytes
    stored = encode_state_value(IntType.typename, b"\r\x05\x00\x00\x00", 0)
    assert stored.startswith(vhead) and stored[len(vhead) :] == b"\r\x05\x00\x00\x00"
    assert decode is not None and decode(stored[len(vhead) :]) == 5
    assert not encode_state_value(IntType.typename, b"", 7).startswith(vhead)  # an expiry: decoded in full
    long_id = "y" * 600  # past MAX_KEY: the hashed form, which the dispatcher falls back to
    assert len(state_key(5, "lay/out", long_id, "count")) == 2 + 1 + 32


def test_the_ingress_log_grows_and_then_refuses_without_appending(tmp_path: Path) -> None:
    log = IngressLog(str(tmp_path / "ingress"), sync=False, map_size=16 * PAGE, max_map_size=64 * PAGE)
    try:
        rec = ("t/f", "id", "", "", "vt", b"v" * 2000, 0, 0)
        first = log.append([rec] * 10)  # more than 16 pages: the map grows
        assert first == 0 and log.next_offset == 10
        with pytest.raises(StateCapacityError, match=r"the ingress log at .* is full at its size limit"):
            log.append([rec] * 200)  # never fits in 64 pages
        assert log.next_offset == 10 and len(log.read(0, 1000)) == 10  # nothing of it was appended
    finally:
        log.close()


def test_the_spill_grows_and_then_refuses(tmp_path: Path) -> None:
    spill = Spill(str(tmp_path / "spill"), map_size=16 * PAGE, max_size=64 * PAGE)
    try:
        rec = ("t/f", "id", "", "", "vt", b"v" * 2000, 0, 0)
        spill.push([rec] * 10)
        assert spill.count == 10
        with pytest.raises(StateCapacityError, match=r"the inbox spill at .* is full at \d+ MiB"):
            spill.push([rec] * 200)
        assert spill.count == 10 and len(spill.pop()) == 10
    finally:
        spill.close()


def test_the_state_store_grows_and_then_refuses_a_batch_whole(tmp_path: Path) -> None:
    backend = LmdbStateBackend(str(tmp_path / "state"), map_size=32 * PAGE, max_map_size=128 * PAGE)
    try:
        ops = [("put", "state", state_key(1, "t/f", f"k{i}", "v"), b"x" * 1000) for i in range(60)]
        backend.commit(ops)  # more than 32 pages: grows
        big = [("put", "state", state_key(1, "t/f", f"z{i}", "v"), b"x" * 1000) for i in range(1000)]
        with pytest.raises(StateCapacityError, match=r"the state store at .* is full at its size limit"):
            backend.commit(big)
        with backend.read() as txn:
            keys = [k for k, _ in backend.iter_state(txn)]
        assert len(keys) == 60  # nothing of the refused batch
    finally:
        backend.close()
