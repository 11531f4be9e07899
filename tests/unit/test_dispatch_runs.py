"""The batch loop's per-batch settings and per-type lookups (issue 9, lane perf9b), on both cores.

``Dispatcher.run`` raises the cyclic GC's generation-0 threshold while a batch's sync
invocations run and restores it after; ``dispatch_groups`` looks a type's function up
once per run of addresses of that type. Real LMDB, the real dispatcher.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

from statefun_mesh import IntType, StatefulFunctions, ValueSpec
from statefun_mesh.dispatch import BATCH_GC_THRESHOLD, Dispatcher
from statefun_mesh.functions import merge_functions
from statefun_mesh.state.lmdb_backend import LmdbStateBackend

INT = IntType.typename


def _rec(t: str, id: str, v: int) -> tuple[Any, ...]:
    return (t, id, "", "", INT, IntType.serializer().serialize(v), 0, 0)


def _functions(seen: list[Any]) -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="t/a", specs=[ValueSpec("n", IntType)])
    def a(context: Any, message: Any) -> None:
        context.storage.n = (context.storage.n or 0) + message.as_int()
        seen.append(("t/a", context.address.id, context.storage.n, gc.get_threshold()[0]))

    @functions.bind(typename="t/b")
    def b(context: Any, message: Any) -> None:
        seen.append(("t/b", context.address.id, message.as_int(), gc.get_threshold()[0]))

    return functions


def _dispatcher(tmp_path: Path, seen: list[Any]) -> tuple[LmdbStateBackend, Dispatcher]:
    backend = LmdbStateBackend(str(tmp_path / "state"))
    return backend, Dispatcher(merge_functions(_functions(seen)), backend, max_parallelism=128)


def test_the_gc_threshold_is_raised_during_a_batch_and_restored_after(tmp_path: Path) -> None:
    seen: list[Any] = []
    backend, d = _dispatcher(tmp_path, seen)
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, before[1], before[2])
        asyncio.run(d.run([_rec("t/a", "x", 1), _rec("t/b", "y", 2)], [], 1000))
        assert [s[3] for s in seen] == [BATCH_GC_THRESHOLD, BATCH_GC_THRESHOLD]
        assert gc.get_threshold() == (700, before[1], before[2])
        # a process's own higher threshold is left as it is
        seen.clear()
        gc.set_threshold(BATCH_GC_THRESHOLD * 3, before[1], before[2])
        asyncio.run(d.run([_rec("t/a", "x", 1)], [], 1000))
        assert [s[3] for s in seen] == [BATCH_GC_THRESHOLD * 3]
        assert gc.get_threshold() == (BATCH_GC_THRESHOLD * 3, before[1], before[2])
        # restored when an invocation's BaseException ends the batch too
        gc.set_threshold(700, before[1], before[2])
        d.table["t/b"].fun = _raise_keyboard_interrupt
        try:
            asyncio.run(d.run([_rec("t/b", "y", 1)], [], 1000))
        except KeyboardInterrupt:
            pass
        else:  # pragma: no cover - the function raised it
            raise AssertionError("the batch did not end with the function's KeyboardInterrupt")
        assert gc.get_threshold() == (700, before[1], before[2])
    finally:
        gc.set_threshold(*before)
        backend.close()


def _raise_keyboard_interrupt(context: Any, message: Any) -> None:
    raise KeyboardInterrupt


def test_runs_of_types_with_unknown_types_between_them(tmp_path: Path) -> None:
    # the loop looks a type up once per run of it: an unknown type between two runs of a
    # known one, and a type coming back after another, each still reach the right function
    seen: list[Any] = []
    backend, d = _dispatcher(tmp_path, seen)
    try:
        batch = [
            _rec("t/a", "1", 1),
            _rec("t/nobody", "z", 1),
            _rec("t/a", "2", 2),
            _rec("t/b", "3", 3),
            _rec("t/a", "1", 10),  # the same address as the first: one group, in order
            _rec("t/nobody", "z2", 1),
            _rec("t/a", "4", 4),
        ]
        out = asyncio.run(d.run(batch, [], 1000))
        assert [s[:3] for s in seen] == [
            ("t/a", "1", 1),
            ("t/a", "1", 11),
            ("t/a", "2", 2),
            ("t/b", "3", 3),
            ("t/a", "4", 4),
        ]
        assert (d.invocations, d.unknown) == (5, 2)
        assert sum(d.stats["t/a"].buckets) == 4 and sum(d.stats["t/b"].buckets) == 1
        assert "t/nobody" not in d.stats
        backend.commit(out.ops)
    finally:
        backend.close()


def test_state_keys_of_ascii_and_other_ids_are_the_specs(tmp_path: Path) -> None:
    # the Cython core builds an ASCII id's key from the str's own bytes, any other id's
    # from its UTF-8; both are state_key's bytes (long ones: its hashed form)
    from statefun_mesh import _speedups
    from statefun_mesh.state.lmdb_backend import state_key

    seen: list[Any] = []
    backend, d = _dispatcher(tmp_path, seen)
    ids = ["plain", "é-ü", "日本", "x" * 300, "ü" * 300]
    try:
        out = asyncio.run(d.run([_rec("t/a", i, 5) for i in ids], [], 1000))
        puts = [op for op in out.ops if op[0] == "putmulti"]
        assert len(puts) == 1
        keys = [k for k, _ in puts[0][2]]
        assert keys == [state_key(_speedups.key_group(i, 128), "t/a", i, "n") for i in ids]
        backend.commit(out.ops)
        seen.clear()
        asyncio.run(d.run([_rec("t/a", i, 1) for i in ids], [], 1000))
        assert [s[2] for s in seen] == [6] * len(ids)  # each read back what it wrote
    finally:
        backend.close()


def test_a_peer_process_raises_the_threshold_for_good_and_keeps_a_higher_one() -> None:
    from statefun_mesh.dispatch import raise_gc_threshold

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        assert raise_gc_threshold() == (BATCH_GC_THRESHOLD, 10, 10) == gc.get_threshold()
        gc.set_threshold(BATCH_GC_THRESHOLD * 2, 5, 5)
        assert raise_gc_threshold() == (BATCH_GC_THRESHOLD * 2, 5, 5)
    finally:
        gc.set_threshold(*before)
