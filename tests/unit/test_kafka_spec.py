"""module.yaml's Kafka components (io.statefun.kafka.v1/ingress and /egress), as StateFun 3.3 writes them."""

from __future__ import annotations

import pytest

from statefun_mesh.connectors.kafka_spec import KafkaEgressSpec, KafkaIngressSpec, KafkaTopic
from statefun_mesh.errors import ConfigError
from statefun_mesh.remote.module_yaml import parse_module_yaml

# StateFun 3.3's documented examples (docs/modules/io/apache-kafka.md), verbatim apart from the layout
INGRESS = """
kind: io.statefun.kafka.v1/ingress
spec:
  id: com.example/users
  address: kafka-broker:9092
  consumerGroupId: my-consumer-group
  startupPosition:
    type: earliest
  topics:
    - topic: messages-1
      valueType: com.example/User
      targets:
        - com.example.fns/greeter
"""
EGRESS = """
kind: io.statefun.kafka.v1/egress
spec:
  id: com.example/users
  address: kafka-broker:9092
  deliverySemantic:
    type: exactly-once
    transactionTimeout: 15min
  properties:
    - foo.config: bar
"""
ENDPOINT = """
kind: io.statefun.endpoints.v2/http
spec:
  functions: com.example.fns/*
  urlPathTemplate: http://fns:8000/{function.name}
"""


def test_statefun_documented_module_parses() -> None:
    m = parse_module_yaml("---".join([ENDPOINT, INGRESS, EGRESS]))
    assert len(m.endpoints) == 1
    assert m.kafka_ingresses == [
        KafkaIngressSpec(
            id="com.example/users",
            address="kafka-broker:9092",
            group_id="my-consumer-group",
            topics=(KafkaTopic("messages-1", "com.example/User", ("com.example.fns/greeter",)),),
            startup="earliest",
        )
    ]
    assert m.kafka_egresses == [
        KafkaEgressSpec(
            id="com.example/users",
            address="kafka-broker:9092",
            semantic="exactly-once",
            transaction_timeout=900.0,
            properties={"foo.config": "bar"},
        )
    ]


def ingress(**changes: str) -> str:
    spec = {
        "id": "com.example/users",
        "address": "b1:9092,b2:9093",
        "consumerGroupId": "g",
        "topics": "[{topic: t, valueType: com.example/V, targets: [a/b, a/c]}]",
    }
    spec.update(changes)
    body = "".join(f"  {k}: {v}\n" for k, v in spec.items() if v != "DROP")
    return "kind: io.statefun.kafka.v1/ingress\nspec:\n" + body


def test_startup_positions() -> None:
    (s,) = parse_module_yaml(ingress()).kafka_ingresses
    assert s.startup == "group-offsets" and s.auto_offset_reset == "latest"  # StateFun's defaults
    assert s.address == "b1:9092,b2:9093" and s.topic("t").targets == ("a/b", "a/c")
    (s,) = parse_module_yaml(
        ingress(
            startupPosition="{type: specific-offsets, offsets: [t/0: 91, t/2: 8]}", autoOffsetResetPosition="earliest"
        )
    ).kafka_ingresses
    assert s.specific_offsets == {("t", 0): 91, ("t", 2): 8} and s.auto_offset_reset == "earliest"
    (s,) = parse_module_yaml(ingress(startupPosition="{type: date, date: '2020-02-01 04:15:00.00 Z'}")).kafka_ingresses
    assert s.date_ms == 1580530500000
    (s,) = parse_module_yaml(
        ingress(startupPosition="{type: date, date: '2020-02-01 05:15:00.000 +01:00'}")
    ).kafka_ingresses
    assert s.date_ms == 1580530500000
    (s,) = parse_module_yaml(ingress(properties="{max.poll.records: 10, check.crcs: true}")).kafka_ingresses
    assert s.properties == {"max.poll.records": "10", "check.crcs": "true"}


def test_egress_defaults() -> None:
    (e,) = parse_module_yaml("kind: io.statefun.kafka.v1/egress\nspec: {id: a/b, address: 'k:1'}\n").kafka_egresses
    assert (e.semantic, e.properties) == ("at-least-once", {})
    (e,) = parse_module_yaml(
        "kind: io.statefun.kafka.v1/egress\nspec: {id: a/b, address: 'k:1', deliverySemantic: "
        "{type: exactly-once, transactionTimeoutMillis: 60000}}\n"
    ).kafka_egresses
    assert e.transaction_timeout == 60.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ingress(id="DROP"), r"spec\.id: required"),
        (ingress(id="nons"), r"spec\.id: 'nons' is not 'namespace/name'"),
        (ingress(address="DROP"), r"spec\.address: required"),
        (ingress(address="'k:notaport'"), r"spec\.address: 'k:notaport' .* is not host:port"),
        (ingress(consumerGroupId="DROP"), r"spec\.consumerGroupId: required"),
        (ingress(topics="DROP"), r"spec\.topics: required"),
        (ingress(topics="[]"), r"spec\.topics: required"),
        (ingress(topics="[{topic: t, targets: [a/b]}]"), r"spec\.topics\[0\]\.valueType: required"),
        (ingress(topics="[{topic: t, valueType: a/V}]"), r"spec\.topics\[0\]\.targets: required"),
        (ingress(topics="[{topic: t, valueType: a/V, targets: [nons]}]"), r"targets\[0\]: 'nons' is not a function"),
        (ingress(topics="[{topic: 'bad topic', valueType: a/V, targets: [a/b]}]"), r"topics\[0\]\.topic: required"),
        (ingress(topics="[{topic: t, valueType: a/V, targets: [a/b], x: 1}]"), r"topics\[0\]\.x: unknown"),
        (
            ingress(topics="[{topic: t, valueType: a/V, targets: [a/b]}, {topic: t, valueType: a/V, targets: [a/c]}]"),
            "listed twice",
        ),
        (ingress(startupPosition="{type: soonest}"), r"startupPosition\.type: unknown startup position 'soonest'"),
        (ingress(startupPosition="earliest"), r"spec\.startupPosition: expected \{type"),
        (ingress(startupPosition="{type: specific-offsets}"), "needs offsets"),
        (ingress(startupPosition="{type: specific-offsets, offsets: [u/0: 1]}"), "not 'topic/partition' of a topic"),
        (ingress(startupPosition="{type: specific-offsets, offsets: [t/0: -1]}"), "must be an integer >= 0"),
        (ingress(startupPosition="{type: date, date: yesterday}"), "not a date"),
        (ingress(startupPosition="{type: date, date: '2020-02-01 04:15:00'}"), "needs a time zone"),
        (ingress(autoOffsetResetPosition="none"), "must be latest or earliest"),
        (ingress(properties="[a, b]"), r"properties\[0\]: expected one 'name: value'"),
        (ingress(groupId="g"), r"spec\.groupId: unknown setting"),
        ("kind: io.statefun.kafka.v1/ingress\nspec: []\n", "'spec' must be a mapping"),
        ("kind: io.statefun.kafka.v1/egress\nspec: {address: 'k:1'}\n", r"spec\.id: required"),
        (
            "kind: io.statefun.kafka.v1/egress\nspec: {id: a/b, address: 'k:1', deliverySemantic: {type: twice}}\n",
            "unknown delivery semantic 'twice'",
        ),
        (
            "kind: io.statefun.kafka.v1/egress\nspec: {id: a/b, address: 'k:1', deliverySemantic: "
            "{type: at-least-once, transactionTimeout: 1min}}\n",
            "a transaction timeout is for exactly-once",
        ),
        (
            "kind: io.statefun.kafka.v1/egress\nspec: {id: a/b, address: 'k:1', deliverySemantic: "
            "{type: exactly-once, transactionTimeout: soon}}\n",
            "expected a duration",
        ),
        (ingress() + "---\n" + ingress(), "two Kafka ingress components have the id 'com.example/users'"),
    ],
)
def test_bad_components_name_what_is_wrong(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        parse_module_yaml(text, source="m.yaml")
    assert "m.yaml" in str(info.value)


def test_a_kafka_egress_cannot_be_immediate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("confluent_kafka")
    import statefun_mesh as sm

    path = tmp_path / "module.yaml"
    path.write_text("kind: io.statefun.kafka.v1/egress\nspec: {id: a/out, address: 'k:1'}\n")
    with pytest.raises(ConfigError, match="egress_immediate: Kafka egress a/out is listed in egress_immediate"):
        sm.LocalMesh(sm.StatefulFunctions(), module=str(path), egress_immediate=["a/out"])


def test_a_kafka_ingress_target_must_exist(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("confluent_kafka")
    import statefun_mesh as sm

    path = tmp_path / "module.yaml"
    path.write_text(INGRESS)
    with pytest.raises(ConfigError, match=r"targets com\.example\.fns/greeter, which is neither bound locally nor"):
        sm.LocalMesh(sm.StatefulFunctions(), module=str(path))
