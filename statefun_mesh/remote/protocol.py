"""The request-reply protocol's protobuf messages (``request_reply.proto`` beside this file).

The descriptors are built here at import, field for field as in the ``.proto``, into a
descriptor pool of our own: no generated ``_pb2`` module, so any protobuf from 3.20 on
works (generated code is tied to the protoc that made it), and the official SDK, whose
generated module registers the same message names in protobuf's default pool, can be
imported in the same process without a "duplicate symbol" clash. Both produce and read
the same bytes: the wire format knows only field numbers and types.
"""

from __future__ import annotations

from typing import Any, Final

try:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped,unused-ignore]
except ImportError as exc:  # pragma: no cover - protobuf is a dependency
    raise ImportError(
        "the StateFun request-reply protocol needs the protobuf package: pip install 'protobuf>=3.20'"
    ) from exc

__all__ = [
    "PACKAGE",
    "Address",
    "FromFunction",
    "ToFunction",
    "TypedValue",
    "file_descriptor",
    "message_class",
]

PACKAGE: Final = "io.statefun.sdk.reqreply"

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _BOOL, _BYTES, _INT64 = _F.TYPE_STRING, _F.TYPE_BOOL, _F.TYPE_BYTES, _F.TYPE_INT64
_MSG, _ENUM = _F.TYPE_MESSAGE, _F.TYPE_ENUM

#: one field: (name, number, type, message or enum type name relative to the package, repeated)
_Field = tuple[str, int, int, str, bool]


def _f(name: str, number: int, type: int, type_name: str = "", repeated: bool = False) -> _Field:
    return (name, number, type, type_name, repeated)


# The schema, message by message, exactly as request_reply.proto writes it.
_SCHEMA: Final[dict[str, Any]] = {
    "Address": {"fields": [_f("namespace", 1, _STRING), _f("type", 2, _STRING), _f("id", 3, _STRING)]},
    "TypedValue": {"fields": [_f("typename", 1, _STRING), _f("has_value", 2, _BOOL), _f("value", 3, _BYTES)]},
    "ToFunction": {
        "nested": {
            "PersistedValue": {
                "fields": [_f("state_name", 1, _STRING), _f("state_value", 2, _MSG, "TypedValue")],
            },
            "Invocation": {
                "fields": [_f("caller", 1, _MSG, "Address"), _f("argument", 2, _MSG, "TypedValue")],
            },
            "InvocationBatchRequest": {
                "fields": [
                    _f("target", 1, _MSG, "Address"),
                    _f("state", 2, _MSG, "ToFunction.PersistedValue", repeated=True),
                    _f("invocations", 3, _MSG, "ToFunction.Invocation", repeated=True),
                ],
            },
        },
        "oneof": ("request", [_f("invocation", 100, _MSG, "ToFunction.InvocationBatchRequest")]),
    },
    "FromFunction": {
        "nested": {
            "PersistedValueMutation": {
                "enums": {"MutationType": [("DELETE", 0), ("MODIFY", 1)]},
                "fields": [
                    _f("mutation_type", 1, _ENUM, "FromFunction.PersistedValueMutation.MutationType"),
                    _f("state_name", 2, _STRING),
                    _f("state_value", 3, _MSG, "TypedValue"),
                ],
            },
            "Invocation": {
                "fields": [_f("target", 1, _MSG, "Address"), _f("argument", 2, _MSG, "TypedValue")],
            },
            "DelayedInvocation": {
                "fields": [
                    _f("is_cancellation_request", 10, _BOOL),
                    _f("cancellation_token", 11, _STRING),
                    _f("delay_in_ms", 1, _INT64),
                    _f("target", 2, _MSG, "Address"),
                    _f("argument", 3, _MSG, "TypedValue"),
                ],
            },
            "EgressMessage": {
                "fields": [
                    _f("egress_namespace", 1, _STRING),
                    _f("egress_type", 2, _STRING),
                    _f("argument", 3, _MSG, "TypedValue"),
                ],
            },
            "InvocationResponse": {
                "fields": [
                    _f("state_mutations", 1, _MSG, "FromFunction.PersistedValueMutation", repeated=True),
                    _f("outgoing_messages", 2, _MSG, "FromFunction.Invocation", repeated=True),
                    _f("delayed_invocations", 3, _MSG, "FromFunction.DelayedInvocation", repeated=True),
                    _f("outgoing_egresses", 4, _MSG, "FromFunction.EgressMessage", repeated=True),
                ],
            },
            "ExpirationSpec": {
                "enums": {"ExpireMode": [("NONE", 0), ("AFTER_WRITE", 1), ("AFTER_INVOKE", 2)]},
                "fields": [
                    _f("mode", 1, _ENUM, "FromFunction.ExpirationSpec.ExpireMode"),
                    _f("expire_after_millis", 2, _INT64),
                ],
            },
            "PersistedValueSpec": {
                "fields": [
                    _f("state_name", 1, _STRING),
                    _f("expiration_spec", 2, _MSG, "FromFunction.ExpirationSpec"),
                    _f("type_typename", 3, _STRING),
                ],
            },
            "IncompleteInvocationContext": {
                "fields": [_f("missing_values", 1, _MSG, "FromFunction.PersistedValueSpec", repeated=True)],
            },
        },
        "oneof": (
            "response",
            [
                _f("invocation_result", 100, _MSG, "FromFunction.InvocationResponse"),
                _f("incomplete_invocation_context", 101, _MSG, "FromFunction.IncompleteInvocationContext"),
            ],
        ),
    },
}


def _add_message(container: Any, name: str, body: dict[str, Any]) -> None:
    msg = container.add(name=name)
    for nested_name, nested_body in body.get("nested", {}).items():
        _add_message(msg.nested_type, nested_name, nested_body)
    for enum_name, values in body.get("enums", {}).items():
        enum = msg.enum_type.add(name=enum_name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)

    def add_field(field: _Field, oneof_index: int | None = None) -> None:
        fname, number, ftype, type_name, repeated = field
        fd = msg.field.add(
            name=fname,
            number=number,
            type=ftype,
            label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL,
            json_name=_json_name(fname),
        )
        if type_name:
            fd.type_name = f".{PACKAGE}.{type_name}"
        if oneof_index is not None:
            fd.oneof_index = oneof_index

    for field in body.get("fields", []):
        add_field(field)
    if "oneof" in body:
        oneof_name, fields = body["oneof"]
        msg.oneof_decl.add(name=oneof_name)
        for field in fields:
            add_field(field, 0)


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def file_descriptor() -> Any:
    """The ``FileDescriptorProto`` of ``request_reply.proto`` (a fresh copy)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="statefun_mesh/remote/request_reply.proto", package=PACKAGE, syntax="proto3"
    )
    for name, body in _SCHEMA.items():
        _add_message(fdp.message_type, name, body)
    return fdp


_POOL: Final = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(file_descriptor().SerializeToString())


def message_class(full_name: str) -> Any:
    """The message class of ``io.statefun.sdk.reqreply.<full_name>``, e.g. ``"FromFunction.Invocation"``."""
    desc = _POOL.FindMessageTypeByName(f"{PACKAGE}.{full_name}")
    get = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.21
    if get is not None:
        return get(desc)
    return message_factory.MessageFactory(_POOL).GetPrototype(desc)  # protobuf 3.20


Address: Final[Any] = message_class("Address")
TypedValue: Final[Any] = message_class("TypedValue")
ToFunction: Final[Any] = message_class("ToFunction")
FromFunction: Final[Any] = message_class("FromFunction")

#: FromFunction.PersistedValueMutation.MutationType
DELETE: Final = 0
MODIFY: Final = 1
#: FromFunction.ExpirationSpec.ExpireMode
EXPIRE_NONE: Final = 0
EXPIRE_AFTER_WRITE: Final = 1
EXPIRE_AFTER_INVOKE: Final = 2
