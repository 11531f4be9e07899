"""The NATS ingress's mapping of a NATS message to a mesh message, and its idempotency keys
(pure functions; the bridge itself is tested against a real nats-server in
tests/integration/test_nats_ingress.py). Needs no nats-py."""

from __future__ import annotations

import re

import pytest

from statefun_mesh import IntType, StringType
from statefun_mesh.connectors.nats import NatsIngressConfig, NatsMapping, UnmappableMessage, idempotency_key
from statefun_mesh.errors import ConfigError


def test_subject_spells_namespace_name_and_id_after_the_prefix() -> None:
    m = NatsMapping("orders").map("orders.com.example.cart.alice", None, b"hi")
    assert (m.target_typename, m.target_id) == ("com.example/cart", "alice")
    assert m.as_string() == "hi"
    m = NatsMapping("").map("shop.cart.bob", {}, b"x")
    assert (m.target_typename, m.target_id) == ("shop/cart", "bob")


def test_headers_win_and_the_subject_fills_in_the_rest() -> None:
    both = {"Statefun-Target-Type": "a/b", "Statefun-Target-Id": "x.y"}
    m = NatsMapping("p").map("p.q.r.s", both, b"1")
    assert (m.target_typename, m.target_id) == ("a/b", "x.y")
    m = NatsMapping("p").map("p.user.42.7", {"statefun-target-type": "a/b"}, b"1")  # any case; dotted id
    assert (m.target_typename, m.target_id) == ("a/b", "user.42.7")
    m = NatsMapping("p").map("p.ns.x.name", {"Statefun-Target-Id": "i"}, b"1")
    assert (m.target_typename, m.target_id) == ("ns.x/name", "i")
    m = NatsMapping("p", target_type="fixed/type").map("p.alice", None, b"1")
    assert (m.target_typename, m.target_id) == ("fixed/type", "alice")


def test_values_primitive_types_as_text_others_as_bytes() -> None:
    mp = NatsMapping("p")
    m = mp.map("p.a.b.c", {"Statefun-Value-Type": "io.statefun.types/int"}, b" 42\n")
    assert m.is_type(IntType) and m.as_int() == 42
    m = mp.map("p.a.b.c", {"Statefun-Value-Type": "io.statefun.types/bool"}, b"true")
    assert m.as_bool() is True
    m = mp.map("p.a.b.c", {"Statefun-Value-Type": "io.statefun.types/double"}, b"2.5")
    assert m.as_double() == 2.5
    m = mp.map("p.a.b.c", {"Statefun-Value-Type": "com.example/order"}, b'{"n": 1}')
    assert (m.value_typename(), m.raw_value()) == ("com.example/order", b'{"n": 1}')
    m = NatsMapping("p", value_type="raw/bytes").map("p.a.b.c", None, b"\xff\x00")
    assert (m.value_typename(), m.raw_value()) == ("raw/bytes", b"\xff\x00")
    assert NatsMapping("p").map("p.a.b.c", None, b" text ").is_type(StringType)


@pytest.mark.parametrize(
    ("subject", "headers", "data", "reason"),
    [
        ("p.a.b", None, b"1", "does not spell <namespace>.<name>.<id>"),
        ("q.a.b.c", None, b"1", "does not start with the prefix"),
        ("p.x", {"Statefun-Target-Type": "nons", "Statefun-Target-Id": "i"}, b"1", "bad target"),
        ("p.a.b.c", {"Statefun-Value-Type": "io.statefun.types/int"}, b"4.5", "is not a valid io.statefun.types/int"),
        ("p.a.b.c", {"Statefun-Value-Type": "io.statefun.types/bool"}, b"yes", "is not a valid io.statefun.types/bool"),
        ("p.a.b.c", None, b"\xff", "must be UTF-8 text"),
        ("p.a.b.c", {"Statefun-Value-Type": "nope"}, b"1", "bad Statefun-Value-Type"),
        ("p.a", {"Statefun-Target-Id": "i"}, b"1", "does not spell <namespace>.<name>"),
    ],
)
def test_unmappable_messages_say_why(subject: str, headers: dict[str, str] | None, data: bytes, reason: str) -> None:
    with pytest.raises(UnmappableMessage, match=re.escape(reason)):
        NatsMapping("p").map(subject, headers, data)


def test_idempotency_keys() -> None:
    assert idempotency_key({"Nats-Msg-Id": "order-7"}, "S", 3, 1000) == "order-7"
    assert idempotency_key({"nats-msg-id": "order-7"}, "S", 3, 1000) == "order-7"
    assert idempotency_key(None, "S", 3, 1000) == "S:3@1000"
    # a stream created again restarts its sequences; its creation time keeps the keys apart
    assert idempotency_key({}, "S", 3, 2000) != idempotency_key({}, "S", 3, 1000)


def test_config_is_checked() -> None:
    NatsIngressConfig(stream="S", durable="d")
    with pytest.raises(ConfigError, match="max_ack_pending"):
        NatsIngressConfig(stream="S", durable="d", max_in_flight=100, max_ack_pending=10)
    with pytest.raises(ConfigError, match="stream"):
        NatsIngressConfig(stream="a.b", durable="d")
    with pytest.raises(ConfigError, match="malformed type name"):
        NatsIngressConfig(stream="S", durable="d", target_type="nons")
    with pytest.raises(ConfigError, match="wildcards"):
        NatsIngressConfig(stream="S", durable="d", subject_prefix="a.*")
