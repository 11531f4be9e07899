"""The Cython core's own batch loop (``dispatch_groups_native``, issue 9 session 7) against its
specification, ``_dispatch_loop.dispatch_groups``, and the send path of ``Context``, on both cores.

The native loop reads the dispatcher once per batch, calls the per-address steps as C
functions and sums each type's statistics per run of its addresses: these tests run the same
batches through it and through the twin's loop (with the same core's objects) and compare
everything a batch produces. Under the twin both names are one function. Real LMDB, the real
dispatcher.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import IntType, StatefulFunctions, ValueSpec, _dispatch_loop, _speedups, message_builder
from statefun_mesh.address import Address, SdkAddress
from statefun_mesh.context import Context
from statefun_mesh.dispatch import LATENCY_BUCKETS, Dispatcher
from statefun_mesh.functions import merge_functions
from statefun_mesh.messages import Message
from statefun_mesh.state.lmdb_backend import LmdbStateBackend

INT = IntType.typename


def _rec(t: str, id: str, v: int, caller: tuple[str, str] = ("", ""), request: int = 0) -> tuple[Any, ...]:
    return (t, id, caller[0], caller[1], INT, IntType.serializer().serialize(v), 3 if request else 0, request)


def _functions(seen: list[Any]) -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="t/a", specs=[ValueSpec("n", IntType)])
    def a(context: Any, message: Any) -> None:
        v = message.as_int()
        if v < 0:
            raise ValueError(f"negative {v}")
        context.storage.n = (context.storage.n or 0) + v
        for i in range(v % 4):
            context.send(message_builder(target_typename="t/b", target_id=f"{context.address.id}.{i}", int_value=i))
        if context.in_request:
            context.reply(int_value=context.storage.n)
        seen.append(("t/a", context.address.id, context.storage.n))

    @functions.bind(typename="t/b")
    def b(context: Any, message: Any) -> None:
        seen.append(("t/b", context.address.id, message.as_int(), context.caller))

    @functions.bind(typename="t/slow")
    def slow(context: Any, message: Any) -> None:
        time.sleep(LATENCY_BUCKETS[2] * 1.5)  # past the first buckets: counted in a later one
        seen.append(("t/slow", context.address.id))

    @functions.bind(typename="t/async", specs=[ValueSpec("n", IntType)])
    async def later(context: Any, message: Any) -> None:
        await asyncio.sleep(0)
        context.storage.n = (context.storage.n or 0) + message.as_int()
        seen.append(("t/async", context.address.id, context.storage.n))

    return functions


def _batches() -> list[tuple[list[tuple[Any, ...]], int | None]]:
    return [
        (
            [
                _rec("t/a", "1", 1),
                _rec("t/nobody", "z", 1),
                _rec("t/a", "2", 3, caller=("t/x", "c")),
                _rec("t/b", "3", 3),
                _rec("t/slow", "s", 0),
                _rec("t/a", "1", 2, request=5),
                _rec("t/a", "4", -1),  # raises: a dead letter, counted as a failure
                _rec("t/async", "q", 2),
                _rec("t/a", "dup", 1, caller=("", "key-1")),  # a client message with an idempotency key
                _rec("t/a", "dup", 1, caller=("", "key-1")),  # its resend: skipped
                _rec("t/a", "5", 7),
            ],
            None,
        ),
        (
            # a send budget the first addresses' sends use up: the rest is deferred
            [_rec("t/a", str(i), 3) for i in range(10)]
            + [_rec("t/async", "q", 1), _rec("t/a", "dup", 1, ("", "key-1"))],
            200,
        ),
    ]


def _run(tmp_path: Path, loop: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(_speedups, "dispatch_groups", loop)
    seen: list[Any] = []
    backend = LmdbStateBackend(str(tmp_path))
    try:
        d = Dispatcher(merge_functions(_functions(seen)), backend, max_parallelism=128)
        outs = []
        for batch, budget in _batches():
            out = asyncio.run(d.run(batch, [], 1000, budget))
            backend.commit(out.ops)
            outs.append(
                {
                    "ops": [op for op in out.ops if not (op[0] == "put" and op[1] == "egress")],  # tracebacks
                    "dead_letters": sum(1 for op in out.ops if op[0] == "put" and op[1] == "egress"),
                    "sends": out.sends,
                    "replies": [r[:3] + r[5:] for r in out.replies],
                    "deferred": out.deferred,
                    "requeue": out.requeue,
                }
            )
        return {
            "outs": outs,
            "seen": seen,
            "counters": (d.invocations, d.failures, d.unknown, d.duplicates),
            "stats": {t: (sum(s.buckets), s.failures, s.buckets[0] > 0) for t, s in sorted(d.stats.items())},
            "slow": (d.stats["t/slow"].buckets[0], d.stats["t/slow"].seconds >= LATENCY_BUCKETS[2]),
            "seconds": all(s.seconds > 0 for s in d.stats.values()),
        }
    finally:
        backend.close()


def test_the_native_loop_does_what_its_specification_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    native = _run(tmp_path / "native", _speedups.dispatch_groups, monkeypatch)
    spec = _run(tmp_path / "spec", _dispatch_loop.dispatch_groups, monkeypatch)
    assert native == spec
    # and what that is, so that two equally wrong loops do not pass
    first, second = native["outs"]
    assert native["counters"] == (9, 2, 1, 1)  # failures: the raise and the unknown type; one duplicate
    assert native["stats"]["t/a"][:2] == (7, 1) and native["stats"]["t/b"][0] == 1
    assert native["slow"] == (0, True)  # the slow invocation is not in the first bucket
    assert native["seconds"]
    assert len(first["sends"]) == 1 + 2 + 3 + 1 + 3  # v % 4 each: t/a 1 (1, then 2), 2 (3), dup (1), 5 (7)
    assert first["replies"] == [(3, 5, 0, "t/a", "1")]
    # the first address's 3 sends reach the budget: every later address waits
    assert second["deferred"] == [_rec("t/a", str(i), 3) for i in range(1, 10)] + [
        _rec("t/async", "q", 1),
        _rec("t/a", "dup", 1, ("", "key-1")),
    ]


@pytest.mark.parametrize("budget", [0, 150, 1000])
def test_once_the_send_budget_is_reached_every_later_address_waits(tmp_path: Path, budget: int) -> None:
    # Before, the budget was checked only when the last address had sent something: past it,
    # every other address still ran (and sent), so a batch's fan-out could overshoot its
    # share of memory_budget by half its addresses instead of one.
    seen: list[Any] = []
    backend = LmdbStateBackend(str(tmp_path))
    try:
        d = Dispatcher(merge_functions(_functions(seen)), backend, max_parallelism=128)
        batch = [_rec("t/a", str(i), 1) for i in range(10, 30)]  # one send each (1 % 4), to "<id>.0"
        out = asyncio.run(d.run(batch, [], 1000, budget))
        per_send = 64 + len("10.0") + len(IntType.serializer().serialize(0))
        ran = max(1, -(-budget // per_send))  # the first address always runs: a batch makes progress
        assert [s[1] for s in seen] == [str(i) for i in range(10, 10 + ran)]
        assert out.deferred == batch[ran:]
        assert len(out.sends) == ran
    finally:
        backend.close()


def test_a_loop_error_keeps_the_statistics_of_what_ran(tmp_path: Path) -> None:
    # a BaseException from a function leaves the loop: the invocations before it are counted
    seen: list[Any] = []
    functions = _functions(seen)

    @functions.bind(typename="t/stop")
    def stop(context: Any, message: Any) -> None:
        raise KeyboardInterrupt

    backend = LmdbStateBackend(str(tmp_path))
    try:
        d = Dispatcher(merge_functions(functions), backend, max_parallelism=128)
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(d.run([_rec("t/a", "1", 1), _rec("t/a", "2", 1), _rec("t/stop", "x", 1)], [], 1000))
        assert sum(d.stats["t/a"].buckets) == 2 and d.stats["t/a"].seconds > 0
        assert d.current is None
    finally:
        backend.close()


@pytest.mark.parametrize(
    "address",
    [Address("t/from", "me"), SdkAddress("t", "from", "me"), ("t/from", "me"), ["t/from", "me"]],
    ids=["address", "sdk-address", "tuple", "list"],
)
def test_a_send_carries_the_senders_fields_whatever_holds_them(address: Any) -> None:
    # Context.send reads an Address's fields without the sequence protocol (C core); any
    # other 2-sequence a caller put in context.address still works, as in the twin
    own = ("t/from", "me", "t/caller", "c", INT, b"", 4, 9)
    ctx = Context(address, own, None, 1 << 20)
    msg = Message("t/to", "you", INT, b"\r\x01\x00\x00\x00")
    ctx.send(msg)
    ctx.send(msg)
    assert ctx._sends == [("t/to", "you", "t/from", "me", INT, b"\r\x01\x00\x00\x00", 4, 9)] * 2
    caller = ctx.caller
    assert type(caller) is Address and caller == Address("t/caller", "c") and caller.id == "c"


def test_storage_attribute_reads_keep_their_order_and_errors() -> None:
    # The Cython core's Storage reads through __getattribute__ (generic lookup, then the
    # declared cells) instead of __getattr__: the same results as the twin's
    from statefun_mesh.context import Cell, Storage, storage_class

    cells = {"n": Cell("n", IntType, b"k", INT, IntType.serializer().serialize(4), 0)}
    s = storage_class("t/a", ["n"])(Address("t/a", "x"), cells)
    assert s.n == 4 and hasattr(s, "n") and not hasattr(s, "other") and getattr(s, "other", 7) == 7
    assert s._cells is cells and s._writes is None and callable(s.__dir__)
    with pytest.raises(AttributeError, match="t/a has no state 'other'; declare it with ValueSpec"):
        _ = s.other
    base = Storage(Address("t/a", "x"), cells)  # no property per state: read from the cells
    assert base.n == 4
    base.n = 6
    assert base.n == 6 and s.n == 4
