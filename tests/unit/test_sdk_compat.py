"""The behaviour the official StateFun Python SDK's unit tests check, against statefun_mesh.

apache/flink-statefun statefun-sdk-python/tests has 34 tests in 7 files (message, request
reply, statefun, storage, typename, types, valuespec). Each test below exercises the
behaviour of one of them (named in its docstring) through statefun_mesh's public API,
written for this project. Where the official test reaches into SDK internals
(``statefun.storage.resolve``, ``statefun.utils.to_typed_value``, ``store._cells``), the
same behaviour is checked where a user sees it: through ``RequestReplyHandler``, whose
answer carries the resolution and the state mutations. docs/coming-from-statefun.md
lists those internals.

These tests need protobuf (a dependency) but not the official package.
"""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict

from statefun_mesh import (
    BoolType,
    Context,
    DoubleType,
    FloatType,
    IntType,
    LongType,
    Message,
    RequestReplyHandler,
    StatefulFunctions,
    StringType,
    TypedValue,
    ValueSpec,
    kafka_egress_message,
    kinesis_egress_message,
    message_builder,
    simple_type,
)
from statefun_mesh.address import parse_typename
from statefun_mesh.remote.protocol import FromFunction, ToFunction

# -- helpers: a ToFunction builder and the answer as a dict, as a user would inspect it ------


class Invocation:
    """Builds a ToFunction for one target."""

    def __init__(self, namespace: str, name: str, id: str) -> None:
        self.to = ToFunction()
        t = self.to.invocation.target
        t.namespace, t.type, t.id = namespace, name, id

    def state(self, name: str, value: Any = None, tpe: Any = None) -> Invocation:
        pv = self.to.invocation.state.add()
        pv.state_name = name
        if value is not None:
            pv.state_value.typename = tpe.typename
            pv.state_value.has_value = True
            pv.state_value.value = tpe.serializer().serialize(value)
        return self

    def absent_state(self, name: str, tpe: Any) -> Invocation:
        pv = self.to.invocation.state.add()
        pv.state_name = name
        pv.state_value.typename = tpe.typename  # typed, but has_value false: never written
        return self

    def message(self, value: Any, tpe: Any, caller: tuple[str, str, str] | None = None) -> Invocation:
        inv = self.to.invocation.invocations.add()
        if caller:
            inv.caller.namespace, inv.caller.type, inv.caller.id = caller
        inv.argument.typename = tpe.typename
        inv.argument.has_value = True
        inv.argument.value = tpe.serializer().serialize(value)
        return self


def round_trip(functions: StatefulFunctions, invocation: Invocation) -> dict[str, Any]:
    out = RequestReplyHandler(functions).handle_sync(invocation.to.SerializeToString())
    return MessageToDict(FromFunction.FromString(out), preserving_proto_field_name=True)  # type: ignore[no-any-return]


def result(answer: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return answer.get("invocation_result", {}).get(kind, [])  # type: ignore[no-any-return]


# -- message_test.py --------------------------------------------------------------------


def test_message_int() -> None:
    """message_test.test_example: an int message reads back as an int."""
    m = message_builder(target_typename="foo/bar", target_id="a", int_value=1)
    assert m.is_int() and m.as_int() == 1


def test_message_with_type() -> None:
    """message_test.test_with_type: value= with value_type=."""
    m = message_builder(target_typename="foo/bar", target_id="a", value=5.0, value_type=FloatType)
    assert m.is_float() and m.as_float() == 5.0


def test_kafka_egress_record_typed_value() -> None:
    """message_test.test_kafka_egress: the record is a typed KafkaProducerRecord."""
    record = kafka_egress_message(typename="foo/bar", topic="topic", value=1337420)
    assert record.typed_value.typename == "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord"
    assert record.typed_value.has_value
    decoded = record.as_kafka()
    assert (decoded.topic, decoded.key, decoded.value) == ("topic", "", (1337420).to_bytes(4, "big"))


# -- request_reply_test.py --------------------------------------------------------------


def test_request_reply_integration() -> None:
    """request_reply_test.test_integration: state, send, delayed, cancellation, egress in one answer."""
    functions = StatefulFunctions()

    @functions.bind(typename="org.foo/greeter", specs=[ValueSpec(name="seen", type=IntType)])
    def fun(context: Context, message: Message) -> None:
        if message.is_string():
            message.as_string()
        seen = context.storage.seen
        context.storage.seen += 1
        context.send(message_builder(target_typename="org.foo/greeter-java", target_id="0", int_value=seen))
        hoo = message_builder(target_typename="night/owl", target_id="1", str_value="hoo hoo")
        context.send_after(timedelta(hours=1), hoo)
        context.send_after(timedelta(hours=1), hoo, cancellation_token="token-1234")
        context.cancel_delayed_message("token-1234")
        context.send_egress(kafka_egress_message(typename="e/kafka", topic="out", key="abc", value=1337420))
        context.send_egress(
            kinesis_egress_message(typename="e/kinesis", stream="out", partition_key="abc", value="hello there")
        )

    answer = round_trip(
        functions,
        Invocation("org.foo", "greeter", "0")
        .state("seen", 1, IntType)
        .message("Hello", StringType, ("org.foo", "greeter-java", "0")),
    )
    out = result(answer, "outgoing_messages")[0]
    assert out["target"] == {"namespace": "org.foo", "type": "greeter-java", "id": "0"}
    assert out["argument"]["typename"] == "io.statefun.types/int"
    mutation = result(answer, "state_mutations")[0]
    assert mutation["mutation_type"] == "MODIFY" and mutation["state_name"] == "seen"
    assert IntType.serializer().deserialize(base64.b64decode(mutation["state_value"]["value"])) == 2
    delayed = result(answer, "delayed_invocations")
    assert int(delayed[0]["delay_in_ms"]) == 1000 * 60 * 60
    assert delayed[1]["cancellation_token"] == "token-1234"
    assert delayed[2]["is_cancellation_request"] is True and delayed[2]["cancellation_token"] == "token-1234"
    egress = result(answer, "outgoing_egresses")
    assert (egress[0]["egress_namespace"], egress[0]["egress_type"]) == ("e", "kafka")
    assert egress[0]["argument"]["typename"] == "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord"
    assert egress[1]["argument"]["typename"] == "type.googleapis.com/io.statefun.sdk.egress.KinesisEgressRecord"


def test_request_reply_incomplete_context() -> None:
    """request_reply_test.test_integration_incomplete_context: missing specs named, with their expiry."""
    functions = StatefulFunctions()

    @functions.bind(
        typename="org.foo/bar",
        specs=[
            ValueSpec(name="seen", type=IntType),
            ValueSpec("missing_state_1", type=StringType),
            ValueSpec("missing_state_2", type=FloatType, expire_after_write=timedelta(milliseconds=2000)),
        ],
    )
    def fun(context: Context, message: Message) -> None:
        raise AssertionError("a function is not invoked while its state is incomplete")

    answer = round_trip(functions, Invocation("org.foo", "bar", "0").state("seen").message(1, IntType))
    missing = answer["incomplete_invocation_context"]["missing_values"]
    assert missing[0]["state_name"] == "missing_state_1"
    assert missing[0]["type_typename"] == "io.statefun.types/string"
    assert missing[1]["state_name"] == "missing_state_2"
    assert missing[1]["expiration_spec"] == {"mode": "AFTER_WRITE", "expire_after_millis": "2000"}


def test_request_reply_caller_not_set() -> None:
    """request_reply_test.test_caller_not_set: an ingress message has no caller."""
    callers: list[Any] = []
    functions = StatefulFunctions()
    functions.register("org.foo/greeter", lambda context, message: callers.append(context.caller))
    round_trip(functions, Invocation("org.foo", "greeter", "0").message("Hello", StringType))
    assert callers == [None]


# -- statefun_test.py -------------------------------------------------------------------


def test_bound_function_is_sync() -> None:
    """statefun_test.test_example."""
    functions = StatefulFunctions()

    @functions.bind(typename="org.foo/greeter", specs=[ValueSpec(name="seen_count", type=IntType)])
    def greeter(context: Context, message: Message) -> None:
        pass

    fun = functions.for_typename("org.foo/greeter")
    assert not fun.is_async
    assert fun.storage_spec is not None


def test_bound_function_is_async() -> None:
    """statefun_test.test_async."""
    functions = StatefulFunctions()

    @functions.bind(typename="org.foo/greeter", specs=[ValueSpec(name="seen_count", type=IntType)])
    async def greeter(context: Context, message: Message) -> None:
        pass

    fun = functions.for_typename("org.foo/greeter")
    assert fun.is_async
    assert fun.storage_spec is not None


def test_bound_function_keeps_its_specs_in_order() -> None:
    """statefun_test.test_state_spec."""
    functions = StatefulFunctions()
    foo, bar = ValueSpec(name="foo", type=IntType), ValueSpec(name="bar", type=StringType)
    functions.register("org.foo/greeter", lambda context, message: None, [foo, bar])
    spec = functions.for_typename("org.foo/greeter").storage_spec
    assert spec.specs == [foo, bar]
    assert spec.names == frozenset({"foo", "bar"})


def test_stateless_function_has_no_specs() -> None:
    """statefun_test.test_stateless."""
    functions = StatefulFunctions()
    functions.register("org.foo/greeter", lambda context, message: None)
    assert functions.for_typename("org.foo/greeter").storage_spec.specs == []


def test_duplicate_state_names_are_refused() -> None:
    """statefun_test.test_duplicate_state."""
    functions = StatefulFunctions()
    with pytest.raises(ValueError):

        @functions.bind(
            typename="org.foo/greeter",
            specs=[ValueSpec(name="bar", type=IntType), ValueSpec(name="bar", type=IntType)],
        )
        def foo(context: Context, message: Message) -> None:
            pass


def test_function_without_a_context_parameter_is_refused() -> None:
    """statefun_test.test_wrong_signature: a one-argument function is a ValueError at bind."""
    functions = StatefulFunctions()
    with pytest.raises(ValueError, match="does not expect a context and a message"):

        @functions.bind(typename="org.foo/greeter", specs=[ValueSpec(name="bar", type=IntType)])
        def foo(message: Message) -> None:
            pass

    with pytest.raises(ValueError):
        functions.register("org.foo/three", lambda a, b, c: None)
    with pytest.raises(ValueError, match="function instance must be provided"):
        functions.register("org.foo/none", None)  # type: ignore[arg-type]
    assert "org.foo/greeter" not in functions  # nothing half-registered


def test_callables_that_take_context_and_message_are_accepted() -> None:
    """Beyond statefun_test: bound methods, defaults and *args can take (context, message)."""

    class Greeter:
        def __call__(self, context: Context, message: Message) -> None:
            pass

        def greet(self, context: Context, message: Message) -> None:
            pass

    functions = StatefulFunctions()
    functions.register("a/callable", Greeter())
    functions.register("a/method", Greeter().greet)
    functions.register("a/default", lambda context, message, extra=None: None)
    functions.register("a/varargs", lambda *args: None)
    assert len(functions) == 4


# -- storage_test.py (resolution and mutations, seen through the handler) ------------------


def _reader(specs: list[ValueSpec], seen: list[Any], body: Any = None) -> StatefulFunctions:
    functions = StatefulFunctions()

    def fun(context: Context, message: Message) -> None:
        if body is not None:
            body(context.storage, seen)
        else:
            seen.append({s.name: getattr(context.storage, s.name) for s in specs})

    functions.register("example/func", fun, specs)
    return functions


def _invoke(functions: StatefulFunctions, inv: Invocation) -> dict[str, Any]:
    return round_trip(functions, inv.message(0, IntType))


def test_storage_resolves_received_values() -> None:
    """storage_test.test_example."""
    seen: list[Any] = []
    specs = [ValueSpec(name="a", type=IntType), ValueSpec(name="b", type=StringType)]
    _invoke(
        _reader(specs, seen), Invocation("example", "func", "1").state("a", 1, IntType).state("b", "hello", StringType)
    )
    assert seen == [{"a": 1, "b": "hello"}]


def test_storage_with_nothing_received_asks_for_every_spec() -> None:
    """storage_test.test_failed_resolution."""
    specs = [ValueSpec(name="a", type=IntType), ValueSpec(name="b", type=StringType)]
    answer = _invoke(_reader(specs, []), Invocation("example", "func", "1"))
    assert [m["state_name"] for m in answer["incomplete_invocation_context"]["missing_values"]] == ["a", "b"]


def test_storage_partly_received_asks_for_the_rest() -> None:
    """storage_test.test_partial_failed_resolution."""
    specs = [ValueSpec(name="a", type=IntType), ValueSpec(name="b", type=StringType)]
    answer = _invoke(_reader(specs, []), Invocation("example", "func", "1").state("a", 1, IntType))
    assert [m["state_name"] for m in answer["incomplete_invocation_context"]["missing_values"]] == ["b"]


def test_storage_ignores_values_it_did_not_declare() -> None:
    """storage_test.test_ignore_unknown: an undeclared name is an AttributeError."""
    seen: list[Any] = []

    def body(storage: Any, seen: list[Any]) -> None:
        seen.append(storage.a)
        with pytest.raises(AttributeError):
            storage.b  # noqa: B018
        seen.append("checked")

    inv = Invocation("example", "func", "1").state("a", 1, IntType).state("b", "hello", StringType)
    _invoke(_reader([ValueSpec(name="a", type=IntType)], seen, body), inv)
    assert seen == [1, "checked"]


def test_storage_attribute_manipulation() -> None:
    """storage_test.test_attribute_manipulation: +=, assign, del (reads None), assign 0."""
    seen: list[Any] = []

    def body(storage: Any, seen: list[Any]) -> None:
        storage.a += 1
        seen.append(storage.a)
        storage.a = 1337
        seen.append(storage.a)
        del storage.a
        seen.append(storage.a)
        storage.a = 0
        seen.append(storage.a)

    answer = _invoke(
        _reader([ValueSpec("a", IntType)], seen, body), Invocation("example", "func", "1").state("a", 1, IntType)
    )
    assert seen == [2, 1337, None, 0]
    (mutation,) = result(answer, "state_mutations")
    assert mutation["mutation_type"] == "MODIFY"
    assert mutation["state_value"]["typename"] == "io.statefun.types/int"  # 0 is a value, not a deletion


def test_storage_read_only_sends_no_mutation() -> None:
    """storage_test.test_no_modifications."""
    answer = _invoke(_reader([ValueSpec("a", IntType)], []), Invocation("example", "func", "1").state("a", 1, IntType))
    assert result(answer, "state_mutations") == []


def test_storage_modification_is_sent_back() -> None:
    """storage_test.test_modification."""

    def body(storage: Any, seen: list[Any]) -> None:
        storage.a = 23249425

    functions = _reader([ValueSpec("a", IntType)], [], body)
    inv = Invocation("example", "func", "1").state("a", 1, IntType).message(0, IntType)
    answer = FromFunction.FromString(RequestReplyHandler(functions).handle_sync(inv.to.SerializeToString()))
    (mutation,) = answer.invocation_result.state_mutations
    assert mutation.state_value.has_value
    assert IntType.serializer().deserialize(mutation.state_value.value) == 23249425


def test_storage_deletion_is_sent_back() -> None:
    """storage_test.test_deletion."""

    def body(storage: Any, seen: list[Any]) -> None:
        del storage.a

    answer = _invoke(
        _reader([ValueSpec("a", IntType)], [], body), Invocation("example", "func", "1").state("a", 1, IntType)
    )
    (mutation,) = result(answer, "state_mutations")
    # DELETE is the enum's zero, which proto3 (and so MessageToDict) leaves out
    assert mutation.get("mutation_type", "DELETE") == "DELETE" and "state_value" not in mutation


def test_storage_absent_value_reads_none_and_can_be_set() -> None:
    """storage_test.test_missing_val: a typed value without has_value is None."""
    seen: list[Any] = []

    def body(storage: Any, seen: list[Any]) -> None:
        seen.append(storage.a)
        storage.a = 121314

    answer = _invoke(
        _reader([ValueSpec("a", IntType)], seen, body), Invocation("example", "func", "1").absent_state("a", IntType)
    )
    assert seen == [None]
    (mutation,) = result(answer, "state_mutations")
    assert mutation["mutation_type"] == "MODIFY" and mutation["state_value"]["has_value"] is True


def test_stateless_storage_has_no_values() -> None:
    """storage_test.test_stateless."""
    seen: list[Any] = []
    _invoke(_reader([], seen, lambda storage, seen: seen.append(dir(storage))), Invocation("example", "func", "1"))
    assert seen == [[]]


# -- typename_test.py -------------------------------------------------------------------


def test_typename_parts() -> None:
    """typename_test.test_example."""
    assert parse_typename("foo/bar") == ("foo", "bar")


@pytest.mark.parametrize("typename", ["/bar", "n/", "/", ""])
def test_malformed_typenames(typename: str) -> None:
    """typename_test.test_no_namespace, test_no_name, test_no_namespace_and_name, test_empty_string."""
    with pytest.raises(ValueError):
        parse_typename(typename)


# -- types_test.py ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tpe", "value"),
    [
        (BoolType, True),
        (IntType, 0),
        (FloatType, 0.5),
        (DoubleType, 1e-20),
        (LongType, 1 << 45),
        (StringType, "hello world"),
    ],
)
def test_built_in_types_round_trip(tpe: Any, value: Any) -> None:
    """types_test.test_built_ins."""
    ser = tpe.serializer()
    assert ser.deserialize(ser.serialize(value)) == value


def test_json_simple_type_round_trip() -> None:
    """types_test.test_json_type: simple_type from json.dumps/json.loads (a str serializer)."""
    tpe = simple_type(typename="org.foo.bar/UserJson", serialize_fn=json.dumps, deserialize_fn=json.loads)
    ser = tpe.serializer()
    assert ser.deserialize(ser.serialize({"name": "bob", "last": "mop"})) == {"name": "bob", "last": "mop"}


def test_message_from_a_typed_value() -> None:
    """types_test.test_message: Message(target_typename, target_id, typed_value)."""
    typed_value = TypedValue("io.statefun.types/string", StringType.serializer().serialize("hello world"))
    msg = Message(target_typename="foo/bar", target_id="1", typed_value=typed_value)
    assert msg.is_string() and msg.as_string() == "hello world"
    # ... also positionally, and from the protocol's own protobuf TypedValue
    from statefun_mesh.remote.protocol import TypedValue as PbTypedValue

    pb_value = PbTypedValue(typename="io.statefun.types/int", has_value=True, value=IntType.serializer().serialize(3))
    assert Message("foo/bar", "1", pb_value).as_int() == 3
    with pytest.raises(ValueError, match="target_id"):
        Message("foo/bar", "", typed_value)


# -- valuespec_test.py ------------------------------------------------------------------


def test_value_spec_without_expiry() -> None:
    """valuespec_test.test_example."""
    a = ValueSpec(name="a", type=IntType)
    assert a.name == "a" and a.type is IntType
    assert not a.after_write and not a.after_call and a.duration == 0


def test_value_spec_expire_after_call() -> None:
    """valuespec_test.test_expire_after_access: duration in milliseconds."""
    a = ValueSpec(name="a", type=IntType, expire_after_call=timedelta(seconds=1))
    assert a.after_call and not a.after_write and a.duration == 1000


def test_value_spec_expire_after_write() -> None:
    """valuespec_test.test_expire_after_write."""
    a = ValueSpec(name="a", type=IntType, expire_after_write=timedelta(seconds=1))
    assert a.after_write and not a.after_call and a.duration == 1000


def test_value_spec_illegal_names() -> None:
    """valuespec_test.test_illegal_name."""
    with pytest.raises(ValueError):
        ValueSpec(name="-a", type=IntType, expire_after_call=timedelta(1))
    with pytest.raises(ValueError):
        ValueSpec(name="def", type=IntType, expire_after_call=timedelta(1))
