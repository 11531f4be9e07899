"""The objects a function sees (``Context``, its storage, ``Message``, ``Cell``) and the
int/long value codec: the Cython core's extension types against the twin's classes.

Under the Cython core, ``statefun_mesh.Context``/``Message`` are its extension types and
``context.PyContext``/``messages.PyMessage`` the twin's classes (the specification); under
the twin both names are the twin's. Either way the behaviour below is the same.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from statefun_mesh import (
    Context,
    IntType,
    LongType,
    Message,
    StatefulFunctions,
    StringType,
    ValueSpec,
    _speedups,
    message_builder,
)
from statefun_mesh.address import Address
from statefun_mesh.context import DELETED, Cell, PyCell, PyContext, PyStorage, Storage, storage_class
from statefun_mesh.errors import MessageTooLargeError
from statefun_mesh.functions import merge_functions
from statefun_mesh.messages import PyMessage, TypedValue

C = _speedups.IMPLEMENTATION == "c"

INTS = [0, 1, -1, 255, 256, -256, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 2**63, True, False]


def test_the_objects_are_the_cores_own() -> None:
    # one class per name in a process: the Cython core's extension types when it is loaded
    if C:
        from statefun_mesh import _speedups_c

        assert (Context, Message, Cell, Storage) == (
            _speedups_c.Context,
            _speedups_c.Message,
            _speedups_c.Cell,
            _speedups_c.Storage,
        )
        assert Context is not PyContext and Message is not PyMessage and Cell is not PyCell
    else:
        assert (Context, Message, Cell, Storage) == (PyContext, PyMessage, PyCell, PyStorage)
    assert type(message_builder("t/a", "x", int_value=1)) is Message


@pytest.mark.parametrize("tpe", [IntType, LongType])
@pytest.mark.parametrize("value", INTS)
def test_the_int_codec_writes_the_serializers_bytes(tpe: Any, value: int) -> None:
    # every int a function may store or send: the same bytes, or the same error, on both cores
    def run(encode: Any) -> Any:
        try:
            return encode(value)
        except (ValueError, TypeError) as exc:
            return (type(exc), str(exc))

    expected = run(tpe.serializer().serialize)
    if C:
        from statefun_mesh import _speedups_c

        assert run(lambda v: _speedups_c.encode_value(tpe, v)) == expected
        if isinstance(expected, bytes):
            assert _speedups_c.decode_value(tpe, expected) == tpe.serializer().deserialize(expected)
    if isinstance(expected, bytes):
        m = Message("t/a", "x", tpe.typename, expected)
        assert (m.as_int() if tpe is IntType else m.as_long()) == int(value)
        assert m.as_type(tpe) == int(value)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r",
        b"\r\x01\x02\x03",
        b"\x0d\x01\x00\x00\x00\x00",
        b"\x08\x05",
        b"\t\x01\x00\x00\x00\x00\x00\x00\x80",
        b"\x0d\xff\xff\xff\xff",
    ],
)
@pytest.mark.parametrize("tpe", [IntType, LongType])
def test_the_int_codec_reads_what_the_serializer_reads(tpe: Any, data: bytes) -> None:
    def run(decode: Any) -> Any:
        try:
            return decode(data)
        except (ValueError, TypeError) as exc:
            return (type(exc), str(exc))

    expected = run(tpe.serializer().deserialize)
    assert run(lambda d: Message("t/a", "x", tpe.typename, d).as_type(tpe)) == expected
    if C:
        from statefun_mesh import _speedups_c

        assert run(lambda d: _speedups_c.decode_value(tpe, d)) == expected


def test_message_behaves_as_the_twins() -> None:
    def observe(cls: Any) -> list[Any]:
        m = cls("t/a", "x", IntType.typename, IntType.serializer().serialize(7))
        s = cls("t/a", "y", StringType.typename, StringType.serializer().serialize("hi"))
        tv = cls("t/a", "z", TypedValue(IntType.typename, IntType.serializer().serialize(3)))
        out: list[Any] = [
            repr(m),
            m.target_typename,
            m.target_id,
            m.value_typename(),
            m.raw_value(),
            m.is_int(),
            m.as_int(),
            m.is_long(),
            m.is_string(),
            s.as_string(),
            s.is_type(StringType),
            m.typed_value.typename,
            tv.as_int(),
            m.is_kafka(),
            m.is_kinesis(),
        ]
        for bad in (
            lambda: m.as_string(),
            lambda: s.as_int(),
            lambda: cls("", "x", None),
            lambda: cls("t/a", "", None),
            lambda: cls("t/a", "x", None),
            lambda: cls("t/a", "x", 5),
        ):
            with pytest.raises((TypeError, ValueError)) as exc:
                bad()
            out.append((exc.type, str(exc.value)))
        return out

    assert observe(Message) == observe(PyMessage)
    m = message_builder("t/a", "x", int_value=5)
    assert pickle.loads(pickle.dumps(m)).as_int() == 5 and repr(pickle.loads(pickle.dumps(m))) == repr(m)


def _storage(names: list[str], cells: dict[str, Any]) -> Any:
    return storage_class("t/a", names)(Address("t/a", "x"), cells)


def test_storage_reads_writes_and_errors() -> None:
    cells = {"n": Cell("n", IntType, b"k", IntType.typename, IntType.serializer().serialize(4), 0)}
    s = _storage(["n"], cells)
    assert s.n == 4 and s._writes is None and dir(s) == ["n"]
    s.n = 5
    assert s.n == 5 and s._writes == {"n": 5}
    del s.n
    assert s.n is None and s._writes == {"n": DELETED}
    s.n = None
    assert s._writes == {"n": DELETED}
    for bad in (lambda: s.other, lambda: setattr(s, "other", 1), lambda: delattr(s, "other")):
        with pytest.raises(AttributeError, match="t/a has no state 'other'; declare it with ValueSpec"):
            bad()
    typed = _storage(["n"], {"n": Cell("n", IntType, b"k", "other/type", b"\x01", 0)})
    with pytest.raises(TypeError, match="holds a value of type 'other/type', but its ValueSpec declares"):
        _ = typed.n


def test_context_behaves_as_the_twins() -> None:
    def observe(cls: Any) -> list[Any]:
        a = Address("t/a", "x")
        rec = ("t/a", "x", "t/b", "y", IntType.typename, b"", 3, 9)
        ctx = cls(a, rec, Storage(a, {}), 200)
        ctx.send(message_builder("t/c", "z", int_value=1))
        ctx.reply(int_value=2)
        ctx.reply(5, IntType)  # the first answer wins
        ctx.cancel_delayed_message("tok")
        out: list[Any] = [
            ctx.address,
            ctx.caller,
            ctx.in_request,
            ctx._reply_peer,
            ctx._request_id,
            ctx._sends,
            ctx._reply,
            ctx._delayed,
            ctx._egress,
        ]
        for bad in (
            lambda: ctx.send("nope"),
            lambda: ctx.send(message_builder("t/c", "z", str_value="v" * 300)),
            lambda: ctx.send_after(5, message_builder("t/c", "z", int_value=1)),
            lambda: ctx.reply(nope=1),
            lambda: ctx.send_egress("nope"),
        ):
            with pytest.raises((TypeError, ValueError, MessageTooLargeError)) as exc:
                bad()
            out.append((exc.type, str(exc.value)))
        client = cls(a, ("t/a", "x", "", "k", IntType.typename, b"", 0, 0), Storage(a, {}))
        out += [client.caller, client.in_request]
        return out

    assert observe(Context) == observe(PyContext)


def test_a_function_sees_the_cores_objects_and_its_writes_apply_in_order(tmp_path: Any) -> None:
    import asyncio

    from statefun_mesh.dispatch import Dispatcher
    from statefun_mesh.state.lmdb_backend import LmdbStateBackend

    functions = StatefulFunctions()
    seen: list[Any] = []

    @functions.bind(typename="t/n", specs=[ValueSpec("n", IntType), ValueSpec("big", LongType)])
    def fn(context: Any, message: Any) -> None:
        seen.append((type(context), type(message), context.storage.n, context.storage.big))
        context.storage.n = (context.storage.n or 0) + message.as_int()
        context.storage.big = 2**40 + message.as_int()
        if message.as_int() == 3:
            context.storage.n = 2**31  # out of IntType's range: the invocation fails, nothing applies

    backend = LmdbStateBackend(str(tmp_path / "s"))
    try:
        d = Dispatcher(merge_functions(functions), backend, max_parallelism=128)
        recs = [("t/n", "a", "", "", IntType.typename, IntType.serializer().serialize(v), 0, 0) for v in (1, 3, 5)]
        out = asyncio.run(d.run(recs, [], 1000))
        backend.commit(out.ops)
        assert (d.invocations, d.failures) == (2, 1)
        assert [s[2:] for s in seen] == [(None, None), (1, 2**40 + 1), (1, 2**40 + 1)]
        assert {s[:2] for s in seen} == {(Context, Message)}
        out = asyncio.run(d.run(recs[:1], [], 1000))
        assert seen[-1][2:] == (6, 2**40 + 5)
    finally:
        backend.close()
