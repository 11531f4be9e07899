"""The StateFun-compatible API: validation at the call, as the StateFun SDK does it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from statefun_mesh import (
    Address,
    EgressMessage,
    FloatType,
    IntType,
    Message,
    StatefulFunctions,
    StringType,
    TypeNameError,
    ValueSpec,
    egress_message_builder,
    message_builder,
)


@pytest.mark.parametrize("name", ["", "1abc", "with space", "class", "Upper", "_1", "_cells", "a-b"])
def test_value_spec_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        ValueSpec(name=name, type=IntType)


def test_value_spec_checks_type_and_ttls() -> None:
    with pytest.raises(TypeError, match="not a statefun_mesh Type"):
        ValueSpec(name="x", type=int)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Only one of"):
        ValueSpec(name="x", type=IntType, expire_after_call=timedelta(1), expire_after_write=timedelta(1))
    with pytest.raises(TypeError, match="timedelta"):
        ValueSpec(name="x", type=IntType, expire_after_call=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        ValueSpec(name="x", type=IntType, expire_after_write=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="millisecond"):
        ValueSpec(name="x", type=IntType, expire_after_write=timedelta(microseconds=10))
    spec = ValueSpec(name="seen_count", type=IntType, expire_after_call=timedelta(seconds=3))
    assert spec.after_call and not spec.after_write and spec.duration == 3000  # milliseconds, as in StateFun
    # As in StateFun: a zero TTL is no TTL; names may start with an underscore.
    spec = ValueSpec(name="_x", type=IntType, expire_after_write=timedelta(0))
    assert (spec.duration, spec.after_call, spec.after_write) == (0, False, False)


@pytest.mark.parametrize("typename", ["", "noslash", "ns/", "/name", "a\x00b/c"])
def test_malformed_type_names(typename: str) -> None:
    with pytest.raises(ValueError):
        message_builder(target_typename=typename, target_id="1", int_value=1)
    with pytest.raises(TypeNameError):
        StatefulFunctions().register(typename, lambda c, m: None)


def test_message_builder_keywords_and_values() -> None:
    m = message_builder(target_typename="a.b/c", target_id="7", int_value=5)
    assert m.is_int() and m.as_int() == 5 and not m.is_string()
    assert m.value_typename() == "io.statefun.types/int"
    assert m.typed_value.typename == "io.statefun.types/int"
    assert message_builder(target_typename="a/c", target_id="7", str_value="hi").as_string() == "hi"
    assert message_builder(target_typename="a/c", target_id="7", bool_value=True).as_bool() is True
    assert message_builder(target_typename="a/c", target_id="7", long_value=2**40).as_long() == 2**40
    assert message_builder(target_typename="a/c", target_id="7", double_value=0.5).as_double() == 0.5
    assert message_builder(target_typename="a/c", target_id="7", float_value=0.5).as_float() == 0.5
    m = message_builder(target_typename="a/c", target_id="7", value="x", value_type=StringType)
    assert m.is_type(StringType) and m.raw_value() == StringType.serializer().serialize("x")
    with pytest.raises(TypeError, match="cannot read a value of type"):
        m.as_int()
    with pytest.raises(ValueError, match="deduce"):
        message_builder(target_typename="a/c", target_id="7", value=1)
    with pytest.raises(TypeError, match="exactly one"):
        message_builder(target_typename="a/c", target_id="7", int_value=1, str_value="x")
    with pytest.raises(TypeError, match="unknown message value keyword"):
        message_builder(target_typename="a/c", target_id="7", integer=1)
    with pytest.raises(ValueError, match="missing"):
        message_builder(target_typename="a/c", target_id="7", int_value=None)
    with pytest.raises(ValueError, match="target_id"):
        message_builder(target_typename="a/c", target_id="", int_value=1)
    with pytest.raises(TypeError, match="target_id"):
        message_builder(target_typename="a/c", target_id=7, int_value=1)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        message_builder(target_typename="a/c", target_id="7", int_value="not an int")
    with pytest.raises((TypeError, ValueError)):
        message_builder(target_typename="a/c", target_id="7", int_value=2**40)
    with pytest.raises(TypeError, match="value_type"):
        message_builder(target_typename="a/c", target_id="7", value=1, value_type=int)


def test_egress_message_builder() -> None:
    e = egress_message_builder(target_typename="x/out", value=1.5, value_type=FloatType)
    assert isinstance(e, EgressMessage) and e.typename == "x/out" and e.as_float() == 1.5
    with pytest.raises(ValueError):
        egress_message_builder(target_typename="bad", value=1, value_type=IntType)
    with pytest.raises(ValueError):
        egress_message_builder(target_typename="x/out", value=None, value_type=IntType)


def test_bind_and_register() -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="ns/f", specs=[ValueSpec(name="a", type=IntType)])
    def f(context, message):
        pass

    async def g(context, message):
        pass

    functions.register("ns/g", g)
    assert functions.for_typename("ns/f").fun is f
    assert functions.for_typename("ns/g").is_async
    assert not functions.for_typename("ns/f").is_async
    assert sorted(functions.typenames) == ["ns/f", "ns/g"]
    with pytest.raises(ValueError, match="already bound"):
        functions.register("ns/f", f)
    with pytest.raises(TypeError, match="not callable"):
        functions.register("ns/h", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        functions.register("ns/h", f, specs=[ValueSpec("a", IntType), ValueSpec("a", IntType)])
    with pytest.raises(TypeError, match="ValueSpec"):
        functions.register("ns/h", f, specs=["a"])  # type: ignore[list-item]


def test_address() -> None:
    a = Address("com.example/user", "42")
    assert (a.namespace, a.name, a.id, str(a)) == ("com.example", "user", "42", "com.example/user/42")
    assert a == Address("com.example/user", "42") and hash(a) == hash(Address("com.example/user", "42"))
    with pytest.raises(AttributeError):
        a.id = "x"  # type: ignore[misc]
    assert isinstance(message_builder(target_typename="a/b", target_id="1", int_value=1), Message)
