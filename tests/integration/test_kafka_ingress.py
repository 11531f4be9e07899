"""The Kafka ingress of ``module.yaml`` (``io.statefun.kafka.v1/ingress``) against a real broker.

The broker is Tansu (a Kafka-protocol broker, memory storage) on a free 127.0.0.1 port,
started per test module by tests/kafkabroker.py; the client is confluent-kafka. Functions:
``cr/counter`` of tests/integration/crash_app.py (counts its messages, answers a query).

Without the broker binary or confluent-kafka these tests skip, except under CI (``CI`` set),
where they fail: install them with ``bash .ci/install-kafka-broker.sh``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import statefun_mesh as sm  # noqa: E402
from tests.integration import crash_app as app  # noqa: E402
from tests.kafkabroker import KafkaBroker, KafkaBrokerUnavailable, find_tansu, running_kafka_broker  # noqa: E402

if os.environ.get("CI"):
    import confluent_kafka  # CI must have it: these tests may not skip there
else:
    confluent_kafka = pytest.importorskip("confluent_kafka", reason="pip install confluent-kafka")

DEADLINE = 45.0


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    try:
        find_tansu()
    except KafkaBrokerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the Kafka tests must not be skipped: {exc}")
        pytest.skip(str(exc))
    with running_kafka_broker() as b:
        yield b


def create_topic(broker: KafkaBroker, name: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.address, "log_level": 0})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(10)


def produce(broker: KafkaBroker, topic: str, records: list[tuple[bytes | None, bytes | None, int | None]]) -> None:
    p = confluent_kafka.Producer({"bootstrap.servers": broker.address, "enable.idempotence": True, "log_level": 0,
                                  "linger.ms": 5})  # fmt: skip
    for key, value, partition in records:
        if partition is None:
            p.produce(topic, key=key, value=value)
        else:
            p.produce(topic, key=key, value=value, partition=partition)
    assert p.flush(20) == 0, "not every record was delivered to the broker"


def module_yaml(tmp_path: Path, address: str, topics: list[tuple[str, str, list[str]]], *,
                startup: str = "earliest", group: str = "mesh") -> str:  # fmt: skip
    lines = ["kind: io.statefun.kafka.v1/ingress", "spec:", "  id: kt/in", f"  address: {address}",
             f"  consumerGroupId: {group}", "  startupPosition:", f"    type: {startup}", "  topics:"]  # fmt: skip
    for topic, value_type, targets in topics:
        lines += [f"    - topic: {topic}", f"      valueType: {value_type}", "      targets:"]
        lines += [f"        - {t}" for t in targets]
    path = tmp_path / "module.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def inc(i: int) -> bytes:
    return json.dumps({"inc": str(i)}).encode()


async def counts(mesh: Any, keys: list[str]) -> dict[str, int]:
    out = {}
    for k in keys:
        reply = await mesh.request(app.query(app.COUNTER, k), timeout=5.0)
        out[k] = json.loads(reply.raw_value().decode())["count"]
    return out


async def wait_counts(mesh: Any, expected: dict[str, int], timeout: float = DEADLINE) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = await counts(mesh, list(expected))
        if got == expected or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


@pytest.mark.timeout(90)
async def test_records_reach_their_targets_by_key_on_every_peer(broker: KafkaBroker, tmp_path: Path) -> None:
    create_topic(broker, "orders", 4)
    keys = [f"k{i}" for i in range(20)]
    records = [(keys[i % 20].encode(), inc(i), None) for i in range(400)]
    produce(broker, "orders", records)
    module = module_yaml(tmp_path, broker.address, [("orders", "cr/json", [app.COUNTER])])
    mesh = sm.LocalMesh(app.functions, peers=2, module=module, blob_store="file://" + str(tmp_path / "ck"),
                        checkpoint_interval=0.5)  # fmt: skip
    async with mesh:
        got = await wait_counts(mesh, {k: 20 for k in keys})
        assert got == {k: 20 for k in keys}
        ingresses = [p.kafka for p in mesh.peers]
        # partition p on peer p % 2: both peers read, two partitions each
        assert sorted(len(i.assigned["kt/in"]) for i in ingresses) == [2, 2]
        assert sum(i.routed for i in ingresses) == 400
        assert all(i.dead_lettered == 0 for i in ingresses)
