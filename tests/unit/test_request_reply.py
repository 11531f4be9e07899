"""The request-reply protocol and RequestReplyHandler, checked against the official SDK.

The official package (``apache-flink-statefun==3.3.0``, in the ``dev`` extra) is the peer a
StateFun user runs: requests built with its protobuf classes go to our handler and the
answers are parsed with its classes, and the other way round; the same function written
with both SDKs must give the same answer, byte for byte.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import statefun_mesh as sm
from statefun_mesh.remote import protocol as pb

PROTO = Path(sm.__file__).resolve().parent / "remote" / "request_reply.proto"


@pytest.fixture(scope="module")
def official() -> Any:
    return pytest.importorskip("statefun", reason="the official SDK (apache-flink-statefun, in the dev extra)")


# -- the schema ---------------------------------------------------------------------------


def _proto_tokens(text: str) -> list[str]:
    text = re.sub(r"//[^\n]*", "", text)
    return re.findall(r"[A-Za-z_][A-Za-z0-9_.]*|\d+|[{}=;]", text)


def _render(fdp: Any) -> list[str]:
    """Our descriptor written back as .proto tokens (declaration order kept)."""
    from google.protobuf import descriptor_pb2

    F = descriptor_pb2.FieldDescriptorProto
    scalar = {F.TYPE_STRING: "string", F.TYPE_BOOL: "bool", F.TYPE_BYTES: "bytes", F.TYPE_INT64: "int64"}
    out = ["syntax", "=", "proto3", ";", "package", fdp.package, ";"]

    def field(f: Any) -> list[str]:
        if f.type in scalar:
            tname = scalar[f.type]
        else:
            tname = f.type_name.rsplit(".", 1)[-1]
        rep = ["repeated"] if f.label == F.LABEL_REPEATED else []
        return [*rep, tname, f.name, "=", str(f.number), ";"]

    def message(m: Any) -> list[str]:
        toks = ["message", m.name, "{"]
        for e in m.enum_type:
            toks += ["enum", e.name, "{"]
            for v in e.value:
                toks += [v.name, "=", str(v.number), ";"]
            toks += ["}"]
        for n in m.nested_type:
            toks += message(n)
        plain = [f for f in m.field if not f.HasField("oneof_index")]
        for f in plain:
            toks += field(f)
        for i, o in enumerate(m.oneof_decl):
            toks += ["oneof", o.name, "{"]
            for f in m.field:
                if f.HasField("oneof_index") and f.oneof_index == i:
                    toks += field(f)
            toks += ["}"]
        return [*toks, "}"]

    for m in fdp.message_type:
        out += message(m)
    return out


def test_descriptor_matches_the_shipped_proto_file() -> None:
    ours = _render(pb.file_descriptor())
    # Enums come first in the messages that have them, then nested messages, then fields.
    assert ours == _proto_tokens(PROTO.read_text())


def _strip(fdp: Any) -> Any:
    fdp.ClearField("name")
    fdp.ClearField("options")
    fdp.ClearField("dependency")
    fdp.ClearField("source_code_info")

    def clear(m: Any) -> None:
        for f in m.field:
            f.ClearField("json_name")
        for n in m.nested_type:
            clear(n)

    for m in fdp.message_type:
        clear(m)
    return fdp


def test_descriptor_matches_the_official_sdk(official: Any) -> None:
    from google.protobuf import descriptor_pb2
    from statefun import request_reply_pb2

    theirs = descriptor_pb2.FileDescriptorProto()
    request_reply_pb2.DESCRIPTOR.CopyToProto(theirs)
    assert _strip(pb.file_descriptor()) == _strip(theirs)


def test_protocol_loads_beside_the_official_package(official: Any) -> None:
    # Different descriptor pools: no duplicate-symbol clash, the same wire bytes.
    from statefun.request_reply_pb2 import TypedValue as TheirTypedValue

    mine = pb.TypedValue(typename="a/b", has_value=True, value=b"\x01")
    assert TheirTypedValue.FromString(mine.SerializeToString()).value == b"\x01"


# -- one function, two SDKs ---------------------------------------------------------------


def _greeter(sdk: Any, context: Any, message: Any) -> None:
    """The same body for both SDKs: every kind of effect the protocol carries."""
    seen = context.storage.seen or 0
    context.storage.seen = seen + 1
    if context.storage.name is None:
        context.storage.name = message.as_string()
    del context.storage.gone
    context.send(sdk.message_builder(target_typename="org.foo/greeter-java", target_id="0", int_value=seen))
    double = sdk.message_builder(target_typename="org.foo/other", target_id="x", value=2.5, value_type=sdk.DoubleType)
    context.send(double)
    owl = sdk.message_builder(target_typename="night/owl", target_id="1", str_value="hoo")
    context.send_after(timedelta(hours=1), owl)
    context.send_after(
        timedelta(milliseconds=1500),
        sdk.message_builder(target_typename="night/owl", target_id="1", str_value="hoo hoo"),
        cancellation_token="token-1234",
    )
    context.cancel_delayed_message("token-1234")
    context.send_egress(sdk.kafka_egress_message(typename="e/kafka", topic="out", key="abc", value=1337420))
    context.send_egress(sdk.kinesis_egress_message(typename="e/kinesis", stream="s", partition_key="k", value="hi"))
    context.send_egress(sdk.egress_message_builder(target_typename="e/plain", value=seen, value_type=sdk.IntType))
    if context.caller is not None:
        context.send(
            sdk.message_builder(target_typename=context.caller.typename, target_id=context.caller.id, str_value="back")
        )


def _bind(sdk: Any, is_async: bool = False) -> Any:
    functions = sdk.StatefulFunctions()
    specs = [
        sdk.ValueSpec(name="seen", type=sdk.IntType),
        sdk.ValueSpec(name="name", type=sdk.StringType, expire_after_write=timedelta(seconds=2)),
        sdk.ValueSpec(name="gone", type=sdk.BoolType, expire_after_call=timedelta(minutes=1)),
    ]
    if is_async:

        async def greeter(context: Any, message: Any) -> None:
            await asyncio.sleep(0)
            _greeter(sdk, context, message)

        functions.register("org.foo/greeter", greeter, specs)
    else:
        functions.register("org.foo/greeter", lambda context, message: _greeter(sdk, context, message), specs)
    return functions


def _to_function(cls_module: Any, state: dict[str, Any], args: list[tuple[str, tuple[str, str, str] | None]]) -> bytes:
    """A ToFunction for org.foo/greeter id 7 built with ``cls_module``'s classes (theirs or ours)."""
    to = cls_module.ToFunction()
    batch = to.invocation
    batch.target.namespace, batch.target.type, batch.target.id = "org.foo", "greeter", "7"
    for name, value in state.items():
        pv = batch.state.add()
        pv.state_name = name
        if value is not None:
            typename, data = value
            pv.state_value.typename = typename
            pv.state_value.has_value = True
            pv.state_value.value = data
    for text, caller in args:
        inv = batch.invocations.add()
        inv.argument.typename = "io.statefun.types/string"
        inv.argument.has_value = True
        inv.argument.value = sm.StringType.serializer().serialize(text)
        if caller is not None:
            inv.caller.namespace, inv.caller.type, inv.caller.id = caller
    return to.SerializeToString()  # type: ignore[no-any-return]


FULL_STATE = {
    "seen": ("io.statefun.types/int", sm.IntType.serializer().serialize(41)),
    "name": None,
    "gone": ("io.statefun.types/bool", b"\x08\x01"),
}
ARGS = [("Ada", ("org.foo", "caller", "c1")), ("Bob", None), ("Cy", ("a.b", "c", "d"))]


@pytest.mark.parametrize("is_async", [False, True])
def test_same_function_same_answer_as_the_official_sdk(official: Any, is_async: bool) -> None:
    from statefun import request_reply_pb2 as theirs

    request = _to_function(theirs, FULL_STATE, ARGS)
    ours_out = sm.RequestReplyHandler(_bind(sm, is_async)).handle_sync(request)
    theirs_out = official.RequestReplyHandler(_bind(official, is_async)).handle_sync(request)
    parsed_ours = theirs.FromFunction.FromString(ours_out)
    parsed_theirs = theirs.FromFunction.FromString(theirs_out)
    assert parsed_ours == parsed_theirs
    assert ours_out == theirs_out
    result = parsed_ours.invocation_result
    assert [m.state_name for m in result.state_mutations] == ["seen", "name", "gone"]
    assert result.state_mutations[0].mutation_type == 1  # MODIFY
    assert sm.IntType.serializer().deserialize(result.state_mutations[0].state_value.value) == 44
    assert result.state_mutations[2].mutation_type == 0  # DELETE
    assert [d.delay_in_ms for d in result.delayed_invocations][:2] == [3_600_000, 1500]
    assert result.delayed_invocations[1].cancellation_token == "token-1234"
    assert result.delayed_invocations[2].is_cancellation_request
    assert len(result.outgoing_messages) == 3 * 2 + 2  # two sends each, plus an answer to each caller
    assert [e.egress_type for e in result.outgoing_egresses] == ["kafka", "kinesis", "plain"] * 3


def test_our_requests_to_the_official_handler(official: Any) -> None:
    # The other direction: our protocol classes build the request, the official handler
    # answers, our classes read the answer (what a mesh peer does with a remote function).
    request = _to_function(pb, FULL_STATE, ARGS[:1])
    answer = pb.FromFunction.FromString(official.RequestReplyHandler(_bind(official)).handle_sync(request))
    assert answer.WhichOneof("response") == "invocation_result"
    assert [m.state_name for m in answer.invocation_result.state_mutations] == ["seen", "name", "gone"]


@pytest.mark.parametrize("sdk_name", ["ours", "official"])
def test_incomplete_context_names_the_missing_specs(official: Any, sdk_name: str) -> None:
    sdk = sm if sdk_name == "ours" else official
    from statefun import request_reply_pb2 as theirs

    request = _to_function(theirs, {"seen": None}, [("x", None)])
    out = sdk.RequestReplyHandler(_bind(sdk)).handle_sync(request)
    answer = theirs.FromFunction.FromString(out)
    assert answer.WhichOneof("response") == "incomplete_invocation_context"
    missing = answer.incomplete_invocation_context.missing_values
    assert [
        (m.state_name, m.type_typename, m.expiration_spec.mode, m.expiration_spec.expire_after_millis) for m in missing
    ] == [
        ("name", "io.statefun.types/string", 1, 2000),  # AFTER_WRITE
        ("gone", "io.statefun.types/bool", 2, 60000),  # AFTER_INVOKE
    ]
    if sdk_name == "ours":
        theirs_out = official.RequestReplyHandler(_bind(official)).handle_sync(request)
        assert out == theirs_out


def test_incomplete_context_spec_without_ttl_says_none(official: Any) -> None:
    from statefun import request_reply_pb2 as theirs

    functions = sm.StatefulFunctions()
    functions.register("org.foo/greeter", lambda c, m: None, [sm.ValueSpec("seen", sm.IntType)])
    ofunctions = official.StatefulFunctions()
    ofunctions.register("org.foo/greeter", lambda c, m: None, [official.ValueSpec("seen", official.IntType)])
    request = _to_function(theirs, {}, [("x", None)])
    out = sm.RequestReplyHandler(functions).handle_sync(request)
    assert out == official.RequestReplyHandler(ofunctions).handle_sync(request)
    spec = theirs.FromFunction.FromString(out).incomplete_invocation_context.missing_values[0]
    assert spec.HasField("expiration_spec") and spec.expiration_spec.mode == 0


def test_unknown_state_sent_by_the_runtime_is_ignored() -> None:
    functions = sm.StatefulFunctions()
    functions.register("org.foo/greeter", lambda c, m: None, [sm.ValueSpec("seen", sm.IntType)])
    request = _to_function(pb, {"seen": None, "other": ("io.statefun.types/int", b"")}, [("x", None)])
    out = sm.RequestReplyHandler(functions).handle_sync(request)
    # Nothing written, nothing sent: an empty answer, as the official SDK gives (the
    # runtime reads an unset invocation_result as an empty one).
    assert out == b""
    assert pb.FromFunction.FromString(out).WhichOneof("response") is None


def test_caller_is_none_for_ingress_messages() -> None:
    seen: list[Any] = []
    functions = sm.StatefulFunctions()
    functions.register("org.foo/greeter", lambda c, m: seen.append((c.caller, c.address, m.as_string())))
    request = _to_function(pb, {}, [("a", None), ("b", ("x.y", "z", "9"))])
    sm.RequestReplyHandler(functions).handle_sync(request)
    assert seen == [
        (None, sm.Address("org.foo/greeter", "7"), "a"),
        (sm.SdkAddress("x.y", "z", "9"), sm.Address("org.foo/greeter", "7"), "b"),
    ]


def test_writes_are_seen_by_the_next_message_of_the_batch() -> None:
    functions = sm.StatefulFunctions()

    @functions.bind("org.foo/greeter", specs=[sm.ValueSpec("names", sm.make_json_type("x/names"))])
    def append(context: sm.Context, message: sm.Message) -> None:
        names = context.storage.names or []
        names.append(message.as_string())
        context.storage.names = names

    request = _to_function(pb, {"names": None}, [("a", None), ("b", None), ("c", None)])
    answer = pb.FromFunction.FromString(sm.RequestReplyHandler(functions).handle_sync(request))
    (mutation,) = answer.invocation_result.state_mutations
    assert mutation.state_value.typename == "x/names" and mutation.state_value.value == b'["a", "b", "c"]'


def test_a_function_error_propagates_like_the_official_sdk() -> None:
    functions = sm.StatefulFunctions()

    @functions.bind("org.foo/greeter")
    def boom(context: sm.Context, message: sm.Message) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sm.RequestReplyHandler(functions).handle_sync(_to_function(pb, {}, [("x", None)]))


def test_state_of_another_type_is_a_type_error() -> None:
    functions = sm.StatefulFunctions()
    functions.register("org.foo/greeter", lambda c, m: c.storage.seen, [sm.ValueSpec("seen", sm.IntType)])
    request = _to_function(pb, {"seen": ("io.statefun.types/string", b"\x0a\x01a")}, [("x", None)])
    with pytest.raises(TypeError, match=r"io\.statefun\.types/string"):
        sm.RequestReplyHandler(functions).handle_sync(request)


def test_bad_requests_get_clear_errors() -> None:
    handler = sm.RequestReplyHandler(_bind(sm))
    with pytest.raises(ValueError, match="not a StateFun ToFunction"):
        handler.handle_sync(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="no invocation batch"):
        handler.handle_sync(b"")
    with pytest.raises(sm.FunctionNotFoundError, match=r"org\.foo/nope"):
        request = pb.ToFunction()
        request.invocation.target.namespace, request.invocation.target.type = "org.foo", "nope"
        handler.handle_sync(request.SerializeToString())
    with pytest.raises(TypeError, match="bytes"):
        handler.handle_sync("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="functions must be provided"):
        sm.RequestReplyHandler([])


async def test_handle_async_runs_inside_a_running_loop() -> None:
    handler = sm.RequestReplyHandler(_bind(sm, is_async=True))
    out = await handler.handle_async(_to_function(pb, FULL_STATE, ARGS[:1]))
    assert pb.FromFunction.FromString(out).WhichOneof("response") == "invocation_result"
