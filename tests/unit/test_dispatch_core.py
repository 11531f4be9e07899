"""The dispatcher's per-batch loop (``_speedups.dispatch_groups``, ``collect_puts``) on both cores.

The Cython core compiles ``statefun_mesh/_dispatch_loop.py``, the twin runs it: these tests
pin what one batch writes, byte for byte, against ``tests/data/dispatch_batch.json`` (run
under ``STATEFUN_MESH_NO_EXTENSIONS=1`` and ``STATEFUN_MESH_REQUIRE_EXTENSIONS=1`` in CI),
and the objects the loop builds without their ``__init__``.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import IntType, LongType, StatefulFunctions, ValueSpec, _speedups, make_json_type, message_builder
from statefun_mesh._dispatch_loop import KIT_FIELDS
from statefun_mesh.address import Address
from statefun_mesh.context import Cell, PyCell, PyContext
from statefun_mesh.dispatch import _KIT, Dispatcher
from statefun_mesh.functions import merge_functions
from statefun_mesh.state.lmdb_backend import LmdbStateBackend, encode_state_value, state_key

DATA = Path(__file__).resolve().parent.parent / "data" / "dispatch_batch.json"
JSON = make_json_type("test/doc")
INT = IntType.typename


def _functions(seen: list[Any]) -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(
        typename="t/count", specs=[ValueSpec("n", IntType), ValueSpec("doc", JSON), ValueSpec("big", LongType)]
    )
    def count(context: Any, message: Any) -> None:
        v = message.as_int()
        if v < 0:
            context.storage.n = 99  # discarded: the invocation raises
            raise ValueError(f"negative {v}")
        if v == 0:
            del context.storage.n
            context.storage.doc = None
            return
        context.storage.n = (context.storage.n or 0) + v
        # a LongType value past int32 (the Cython core codes int/long itself)
        context.storage.big = (context.storage.big or -(2**40)) + v * 2**33
        doc = context.storage.doc or {"seen": []}
        doc["seen"].append(v)
        context.storage.doc = doc
        if v % 3 == 0:
            context.send(message_builder(target_typename="t/other", target_id=context.address.id, int_value=v))
        if context.in_request:
            context.reply(int_value=context.storage.n)
        caller = context.caller
        seen.append((str(context.address), None if caller is None else (caller.typename, caller.id)))

    @functions.bind(typename="t/ttl", specs=[ValueSpec("v", IntType, expire_after_write=timedelta(seconds=5))])
    def ttl(context: Any, message: Any) -> None:
        context.storage.v = (context.storage.v or 0) + 1

    @functions.bind(typename="t/slots")
    def slots(context: Any, message: Any) -> None:
        # every slot of the objects the loop builds without __init__ is set (the twin's
        # slots: the Cython core's Context has the same fields)
        for name in PyContext.__slots__:
            getattr(context, name)
        for name in ("_address", "_cells", "_writes"):
            object.__getattribute__(context.storage, name)
        seen.append(("slots", message.as_int()))

    return functions


def _rec(t: str, id: str, v: int, caller: tuple[str, str] = ("", ""), request: int = 0) -> tuple[Any, ...]:
    return (t, id, caller[0], caller[1], INT, IntType.serializer().serialize(v), 3 if request else 0, request)


def _batch() -> list[tuple[Any, ...]]:
    long_id = "L" * 600  # past LMDB's key limit: the hashed key form
    return [
        _rec("t/count", "a", 1),
        _rec("t/count", "b", 3, caller=("t/x", "c1")),
        _rec("t/count", "a", 2, request=7),
        _rec("t/count", "a", -1),  # raises: dead letter, error reply none (no request)
        _rec("t/count", "c", 0),  # deletes what c held
        _rec("t/count", long_id, 6),
        _rec("t/ttl", "e", 1),  # stored value expired: read as absent
        _rec("t/ttl", "f", 1),  # stored value with an expiry, not yet due
        _rec("t/nobody", "z", 1),  # unknown type
        _rec("t/slots", "s", 4),
        _rec("t/count", "b", 3, request=9),
    ]


def _hex(x: Any) -> Any:
    if isinstance(x, bytes):
        return "0x" + x.hex()
    if isinstance(x, (list, tuple)):
        return [_hex(i) for i in x]
    return x


def _run(tmp_path: Path, cache_bytes: int = 0, again: bool = False) -> tuple[dict[str, Any], list[Any]]:
    """One batch (``again``: then the same batch once more, reading what the first wrote)
    through a store with a write-back cache of ``cache_bytes`` (0: none); the result also
    holds the ``state`` database as LMDB holds it after a flush."""
    seen: list[Any] = []
    backend = LmdbStateBackend(str(tmp_path / "state"), cache_bytes=cache_bytes)
    try:
        backend.commit(
            [
                (
                    "put",
                    "state",
                    state_key(_speedups.key_group("c", 128), "t/count", "c", "n"),
                    encode_state_value(INT, b"\r\x05\x00\x00\x00", 0),
                ),
                (
                    "put",
                    "state",
                    state_key(_speedups.key_group("e", 128), "t/ttl", "e", "v"),
                    encode_state_value(INT, b"\r\x05\x00\x00\x00", 500),
                ),
                (
                    "put",
                    "state",
                    state_key(_speedups.key_group("f", 128), "t/ttl", "f", "v"),
                    encode_state_value(INT, b"\r\x05\x00\x00\x00", 5000),
                ),
            ]
        )
        backend.flush_cache()  # the stored values the batch starts from are in LMDB
        d = Dispatcher(merge_functions(_functions(seen)), backend, max_parallelism=128)
        out = asyncio.run(d.run(_batch(), [], 1000))
        if again:
            backend.commit(out.ops)
            out = asyncio.run(d.run(_batch(), [], 1000))
        for op in out.ops:  # a putmulti's 4th field: the bytes of its keys and values (the cache's bound)
            assert op[0] != "putmulti" or op[3] == sum(len(k) + len(v) for k, v in op[2])
        ops = [
            # a dead letter carries a traceback (paths, line numbers): its bytes are not pinned
            [*op[:3], "<dead letter>"]
            if op[0] == "put" and op[1] == "egress"
            else op[:3]
            if op[0] == "putmulti"
            else op
            for op in out.ops
        ]
        backend.commit(out.ops)
        result = {
            "ops": _hex(ops),
            "sends": _hex(out.sends),
            "replies": _hex([[*list(r[:4]), r[4] if r[2] == 0 else "<error>", *list(r[5:])] for r in out.replies]),
            "invocations": d.invocations,
            "failures": d.failures,
            "unknown": d.unknown,
        }
        if cache_bytes or again:
            with backend.read() as txn:
                result["state"] = _hex(list(backend.iter_state(txn)))
        return result, seen
    finally:
        backend.close()


def test_one_batch_writes_the_pinned_bytes(tmp_path: Path) -> None:
    result, seen = _run(tmp_path)
    if not DATA.exists():  # pragma: no cover - regenerating the vector is a deliberate act
        pytest.fail(f"{DATA} is missing; write it with: python {__file__} > {DATA}")
    assert result == json.loads(DATA.read_text())
    assert ("t/count/b", ("t/x", "c1")) in seen and ("t/count/a", None) in seen and ("slots", 4) in seen


def test_a_batch_through_the_write_back_cache_writes_and_reads_the_same_bytes(tmp_path: Path) -> None:
    """With the write-back cache (checkpoints on) a batch writes the same ops and, once
    flushed, LMDB holds the same bytes; a second batch reads the first one's writes from
    the cache (its values, its deletion of ``c``'s count, the TTL value's expiry header)
    and produces what it produces reading them from LMDB, on both cores."""
    pinned, _ = _run(tmp_path / "pinned", cache_bytes=1 << 20)
    state = pinned.pop("state")
    assert pinned == json.loads(DATA.read_text())
    plain, _ = _run(tmp_path / "plain")
    with_cache, _ = _run(tmp_path / "cached", cache_bytes=1 << 20)
    assert with_cache["state"] == state
    without, _ = _run(tmp_path / "plain2", again=True)
    cached, _ = _run(tmp_path / "cached2", cache_bytes=1 << 20, again=True)
    assert cached == without
    assert cached["state"] != state  # the second batch saw the first's writes and wrote on them
    assert plain == {k: v for k, v in pinned.items()}


def test_the_loop_is_the_cores_own() -> None:
    # the Cython core runs its typed loop (csrc/dispatch.pxi; tests/unit/test_dispatch_native.py
    # holds it to the twin's); the twin runs the module's source
    if _speedups.IMPLEMENTATION == "c":
        assert type(_speedups.dispatch_groups).__name__ == "cython_function_or_method"
        assert _speedups.dispatch_groups.__name__ == "dispatch_groups_native"
    else:
        from statefun_mesh import _dispatch_loop

        assert _speedups.dispatch_groups is _dispatch_loop.dispatch_groups
    assert len(_KIT) == len(KIT_FIELDS)


def test_storage_reads_are_properties_and_addresses_are_cheap_values() -> None:
    functions = _functions([])
    spec = merge_functions(functions)["t/count"]
    # no __getattr__ on the hot path: a property (twin) or the Cython core's descriptor
    read = spec.storage_class.__dict__["n"]
    assert isinstance(read, property) or type(read).__name__ == "StateProperty"
    a = Address("t/count", "a")
    assert a == Address("t/count", "a") and hash(a) == hash(Address("t/count", "a"))
    assert (a.typename, a.id, a.namespace, a.name, str(a)) == ("t/count", "a", "t", "count", "t/count/a")
    assert repr(a) == "Address(typename='t/count', id='a')"
    with pytest.raises(AttributeError):
        a.id = "b"
    cell = Cell("n", IntType, b"k", None, None, 0)
    assert {s for s in PyCell.__slots__ if hasattr(cell, s)} == set(PyCell.__slots__)


if __name__ == "__main__":  # pragma: no cover - writes the vector
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        json.dump(_run(Path(tmp))[0], sys.stdout, indent=1)
        print()
