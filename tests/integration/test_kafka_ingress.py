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
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import statefun_mesh as sm  # noqa: E402
from statefun_mesh.mesh import free_ports  # noqa: E402
from tests.binaries import require_binary  # noqa: E402
from tests.integration import crash_app as app  # noqa: E402
from tests.kafkabroker import (  # noqa: E402
    KafkaBroker,
    KafkaBrokerUnavailable,
    find_tansu,
    running_kafka_broker,
    start_kafka_broker,
)

if os.environ.get("CI"):
    import confluent_kafka  # CI must have it: these tests may not skip there
else:
    confluent_kafka = pytest.importorskip("confluent_kafka", reason="pip install confluent-kafka")

# the Kafka connector is not hot-path code: its tests run once, on the C core (the twin
# routes what it consumes in every other test)
pytestmark = pytest.mark.c_core_only

DEADLINE = 45.0


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    require_binary(find_tansu, KafkaBrokerUnavailable, "Kafka")
    with running_kafka_broker() as b:
        yield b


def create_topic(broker: KafkaBroker, name: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.address, "log_level": 0})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(10)


def produce(broker: KafkaBroker, topic: str, records: list[tuple[bytes | None, bytes | None, int | None]]) -> None:
    p = confluent_kafka.Producer(
        {"bootstrap.servers": broker.address, "enable.idempotence": True, "log_level": 0, "linger.ms": 5}
    )
    for key, value, partition in records:
        if partition is None:
            p.produce(topic, key=key, value=value)
        else:
            p.produce(topic, key=key, value=value, partition=partition)
    assert p.flush(20) == 0, "not every record was delivered to the broker"


def module_yaml(
    tmp_path: Path,
    address: str,
    topics: list[tuple[str, str, list[str]]],
    *,
    startup: str = "earliest",
    group: str = "mesh",
    egress: str | None = None,
    remote: bool = False,
) -> str:
    lines = [
        "kind: io.statefun.kafka.v1/ingress",
        "spec:",
        "  id: kt/in",
        f"  address: {address}",
        f"  consumerGroupId: {group}",
        "  startupPosition:",
        f"    type: {startup}",
        "  topics:",
    ]
    for topic, value_type, targets in topics:
        lines += [f"    - topic: {topic}", f"      valueType: {value_type}", "      targets:"]
        lines += [f"        - {t}" for t in targets]
    if remote:  # kr/* served in-process by tests/integration/kafka_remote.py, over the request-reply protocol
        lines += [
            "---",
            "kind: io.statefun.endpoints.v2/http",
            "spec:",
            "  functions: kr/*",
            "  urlPathTemplate: python:tests.integration.kafka_remote:handler",
        ]
    if egress is not None:  # kafka_app's egress kt/out with this delivery semantic
        lines += [
            "---",
            "kind: io.statefun.kafka.v1/egress",
            "spec:",
            "  id: kt/out",
            f"  address: {address}",
            "  deliverySemantic:",
            f"    type: {egress}",
        ]
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
    mesh = sm.LocalMesh(
        app.functions, peers=2, module=module, blob_store="file://" + str(tmp_path / "ck"), checkpoint_interval=0.5
    )
    async with mesh:
        got = await wait_counts(mesh, {k: 20 for k in keys})
        assert got == {k: 20 for k in keys}
        ingresses = [p.kafka for p in mesh.peers]
        # partition p on peer p % 2: both peers read, two partitions each
        assert sorted(len(i.assigned["kt/in"]) for i in ingresses) == [2, 2]
        assert sum(i.routed for i in ingresses) == 400
        assert all(i.dead_lettered == 0 for i in ingresses)
        statuses = [p.status()["kafka"] for p in mesh.peers]
        assert sum(st["ingress"]["routed"] for st in statuses) == 400 and statuses[0]["egress"] is None
        assert sorted(statuses[1]["ingress"]["positions"]) == ["kafka|kt/in|orders|1", "kafka|kt/in|orders|3"]
        assert sum(v for st in statuses for v in st["ingress"]["positions"].values()) == 400  # next offsets


@pytest.mark.timeout(90)
async def test_bad_records_are_dead_letters_naming_topic_partition_offset(
    broker: KafkaBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    create_topic(broker, "mixed", 1)
    create_topic(broker, "ints", 1)
    produce(
        broker,
        "mixed",
        [
            (b"a", inc(0), 0),  # offset 0: good
            (None, inc(1), 0),  # 1: no key
            (b"\xff\xfeid", inc(2), 0),  # 2: a key that is not UTF-8
            (b"a", None, 0),  # 3: a tombstone
            (b"a", inc(4), 0),  # 4: good
        ],
    )
    produce(broker, "ints", [(b"a", b"\xff\xff not an int", 0)])
    module = module_yaml(
        tmp_path,
        broker.address,
        [("mixed", "cr/json", [app.COUNTER]), ("ints", "io.statefun.types/int", [app.COUNTER])],
    )
    async with sm.LocalMesh(
        app.functions, module=module, blob_store="file://" + str(tmp_path / "ck"), checkpoint_interval=0.5
    ) as mesh:
        kafka = mesh.peers[0].kafka
        deadline = time.monotonic() + DEADLINE
        while kafka.dead_lettered < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert await wait_counts(mesh, {"a": 2}) == {"a": 2}  # the good ones, once each
        letters = sorted(kafka.dead_letters)
        assert [(t, p, o) for t, p, o, _ in letters] == [
            ("ints", 0, 0),
            ("mixed", 0, 1),
            ("mixed", 0, 2),
            ("mixed", 0, 3),
        ]
        reasons = [r for *_, r in letters]
        assert "not a io.statefun.types/int value" in reasons[0]
        assert "no key" in reasons[1] and "not UTF-8" in reasons[2] and "tombstone" in reasons[3]
        assert "dead letter mixed/0@1 skipped: the record has no key" in caplog.text  # the rest: throttled
        # the dead letters are behind the positions: a restart does not read them again
        assert kafka.positions == {"kafka|kt/in|mixed|0": 5, "kafka|kt/in|ints|0": 1}


@pytest.mark.timeout(90)
async def test_missing_topic_is_reported_and_read_once_it_exists(
    broker: KafkaBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from statefun_mesh.connectors import kafka as kafka_mod

    monkeypatch.setattr(kafka_mod, "METADATA_EVERY", 1.0)
    create_topic(broker, "present", 1)
    produce(broker, "present", [(b"p", inc(0), 0)])
    module = module_yaml(
        tmp_path, broker.address, [("present", "cr/json", [app.COUNTER]), ("later", "cr/json", [app.COUNTER])]
    )
    async with sm.LocalMesh(
        app.functions, module=module, blob_store="file://" + str(tmp_path / "ck"), checkpoint_interval=0.5
    ) as mesh:
        assert await wait_counts(mesh, {"p": 1}) == {"p": 1}  # the other topic does not hold this one up
        deadline = time.monotonic() + DEADLINE
        while "topic later" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert re_search(r"kafka ingress kt/in: topic later at 127\.0\.0\.1:\d+ is not readable", caplog.text)
        create_topic(broker, "later", 2)
        produce(broker, "later", [(b"l", inc(i), i % 2) for i in range(6)])
        assert await wait_counts(mesh, {"p": 1, "l": 6}) == {"p": 1, "l": 6}


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


@pytest.mark.timeout(120)
async def test_broker_down_at_start_is_retried_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broker: KafkaBroker
) -> None:
    port = free_ports(1)[0]
    module = module_yaml(tmp_path, f"127.0.0.1:{port}", [("late", "cr/json", [app.COUNTER])])
    late = None
    try:
        async with sm.LocalMesh(
            app.functions, module=module, blob_store="file://" + str(tmp_path / "ck"), checkpoint_interval=0.5
        ) as mesh:
            # the peer runs (answers requests) while its ingress cannot reach the broker
            assert await counts(mesh, ["x"]) == {"x": 0}
            deadline = time.monotonic() + DEADLINE
            while f"kafka ingress kt/in at 127.0.0.1:{port}" not in caplog.text and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert f"kafka ingress kt/in at 127.0.0.1:{port}" in caplog.text and "retrying in" in caplog.text
            late = await asyncio.to_thread(start_kafka_broker, tmp_path, port=port)
            create_topic(late, "late", 2)
            produce(late, "late", [(f"k{i % 3}".encode(), inc(i), i % 2) for i in range(30)])
            expected = {"k0": 10, "k1": 10, "k2": 10}
            assert await wait_counts(mesh, expected, timeout=60) == expected
    finally:
        # stopped after the mesh: a consumer closed with its broker gone waits out its client calls
        # (up to 30 s), which only made this test slow
        if late is not None:
            late.stop()


# -- exactly once across SIGKILLs of peer processes ---------------------------------------------


async def run_exactly_once(
    broker: KafkaBroker,
    crash_meshes: Callable[..., Any],
    tmp_path: Path,
    *,
    topic: str,
    records: int,
    keys: int,
    kills: int,
    budget: float,
    egress: str | None = None,
    remote: bool = False,
) -> list[tuple[bytes, bytes]]:
    """Records -> ``cr/counter`` (or, with ``egress``, ``kt/counter`` and its Kafka egress) on 3 peer
    processes, ``kills`` SIGKILLs; every count exact. Returns the egress topic's records."""
    from tests.integration import crash_util, kafka_app
    from tests.integration.crash_util import Clients, probe_ids, reply_json
    from tests.integration.test_crash_recovery import kill_and_wait

    counter = app.COUNTER
    old_app = crash_util.APP
    if egress is not None:
        counter = kafka_app.KT_COUNTER
        crash_util.APP = "tests.integration.kafka_app:functions"  # restored below
        create_topic(broker, kafka_app.OUT_TOPIC, 3)

    deadline = time.monotonic() + budget
    create_topic(broker, topic, 6)
    names = [f"u{i}" for i in range(keys)]
    expected = {k: 0 for k in names}
    for i in range(records):
        expected[names[i % keys]] += 1
    targets = [counter, "kr/counter"] if remote else [counter]
    module = module_yaml(tmp_path, broker.address, [(topic, "cr/json", targets)], egress=egress, remote=remote)
    mesh = crash_meshes(checkpoint_interval=0.3)
    mesh.extra_args = ["--module", module]
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    clients = await Clients.connect(mesh.endpoint)
    probes = probe_ids("probe")
    try:
        # the records arrive while the peers are killed: produced in slices, a kill after some
        slices = kills + 2
        per = records // slices + 1
        for s in range(slices):
            chunk = [(names[i % keys].encode(), inc(i), None) for i in range(s * per, min(records, (s + 1) * per))]
            await asyncio.to_thread(produce, broker, topic, chunk)
            if s < kills:
                await asyncio.sleep(0.7)  # some of the slice consumed, a checkpoint or two taken
                victim = random.randrange(3)
                if egress is not None:  # the victim has produced to Kafka: its position there matters
                    mark = f"kt/out/{victim}/".encode()
                    while not any(
                        h.startswith(mark)
                        for _, h in await asyncio.to_thread(
                            read_topic, broker, kafka_app.OUT_TOPIC, 1, quiet=0.3, timeout=2.0
                        )
                    ):
                        assert time.monotonic() < deadline, f"peer {victim} never produced to Kafka"
                secs = await kill_and_wait(mesh, victim, probes)
                print(f"\n[kafka] slice {s}: peer {victim} SIGKILLed; the mesh answered {secs:.2f} s later")
        got: dict[str, int] = {}
        while time.monotonic() < deadline:
            got = {}
            for i, k in enumerate(names):
                reply = await clients.request(app.query(counter, k), first=i, deadline=deadline)
                got[k] = reply_json(reply)["count"]
            if got == expected:
                break
            assert all(got[k] <= expected[k] for k in names), "a record was applied twice"
            await asyncio.sleep(0.5)
        assert got == expected, f"{sum(got.values())} of {records} applied: " + str(
            {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
        )
        await asyncio.sleep(1.5)  # a duplicate replay would land now
        again = {k: reply_json(await clients.request(app.query(counter, k), deadline=deadline))["count"] for k in names}
        assert again == expected
        assert "dead letter" not in mesh.log()
        if egress is None:
            return []
        return await asyncio.to_thread(read_topic, broker, kafka_app.OUT_TOPIC, records * len(targets), quiet=3.0)
    finally:
        crash_util.APP = old_app
        await clients.aclose()
        mesh.stop()


@pytest.mark.timeout(150)
async def test_each_record_counts_once_across_a_sigkill(
    broker: KafkaBroker, crash_meshes: Callable[..., Any], tmp_path: Path
) -> None:
    await run_exactly_once(broker, crash_meshes, tmp_path, topic="eo-short", records=3000, keys=60, kills=1, budget=120)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_each_record_counts_once_across_three_sigkills_20k(
    broker: KafkaBroker, crash_meshes: Callable[..., Any], tmp_path: Path
) -> None:
    """The issue's check: 20,000 keyed records -> kt/counter (local) and kr/counter (remote) -> a Kafka
    egress (exactly-once), 3 SIGKILLs; state exact, and the egress topic, read_committed, holds
    exactly the expected records."""
    own = await asyncio.to_thread(start_kafka_broker, tmp_path)  # its own: the egress topics are fixed
    try:
        got = await run_exactly_once(
            own,
            crash_meshes,
            tmp_path,
            topic="eo-long",
            records=20_000,
            keys=500,
            kills=3,
            budget=850,
            egress="exactly-once",
            remote=True,
        )
    finally:
        own.stop()
    check_egress(got, 20_000, 500, remote=True)


# -- the Kafka egress ----------------------------------------------------------------------------


def read_topic(
    broker: KafkaBroker, topic: str, expected: int, *, quiet: float = 2.0, timeout: float = DEADLINE
) -> list[tuple[bytes, bytes]]:
    """Every record of ``topic`` (all partitions, read_committed): (value, statefun-mesh-id header);
    reads until ``expected`` arrived and nothing more came for ``quiet`` seconds."""
    c = confluent_kafka.Consumer(
        {
            "bootstrap.servers": broker.address,
            "group.id": f"reader-{random.random()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "log_level": 0,
        }
    )
    try:
        md = c.list_topics(topic, timeout=10.0)
        parts = sorted(md.topics[topic].partitions)
        c.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in parts])
        out: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            msgs = [m for m in c.consume(1000, 0.2) if m.error() is None]
            if msgs:
                last = time.monotonic()
            out += [(m.value(), dict(m.headers() or []).get("statefun-mesh-id", b"")) for m in msgs]
            if len(out) >= expected and time.monotonic() - last > quiet:
                break
        return out
    finally:
        c.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("semantic", ["exactly-once", "at-least-once"])
async def test_egress_records_are_produced_once_each(broker: KafkaBroker, tmp_path: Path, semantic: str) -> None:

    broker = await asyncio.to_thread(start_kafka_broker, tmp_path)  # its own: the egress topics are fixed
    try:
        await egress_once_each(broker, tmp_path, semantic)
    finally:
        broker.stop()


async def egress_once_each(broker: KafkaBroker, tmp_path: Path, semantic: str) -> None:
    from tests.integration import kafka_app

    topic = "kin"
    create_topic(broker, topic, 3)
    create_topic(broker, kafka_app.OUT_TOPIC, 2)
    records = [(f"e{i % 7}".encode(), inc(i), None) for i in range(300)]
    produce(broker, topic, records)
    module = module_yaml(tmp_path, broker.address, [(topic, "cr/json", [kafka_app.KT_COUNTER])], egress=semantic)
    mesh = sm.LocalMesh(
        kafka_app.functions,
        peers=2,
        module=module,
        blob_store="file://" + str(tmp_path / "ck"),
        checkpoint_interval=0.3,
    )
    async with mesh:
        got = await asyncio.to_thread(read_topic, broker, kafka_app.OUT_TOPIC, 300)
        egresses = [p.kafka_egress for p in mesh.peers]
        assert sum(e.records_out for e in egresses) == 300
        if semantic == "exactly-once":
            assert all(e.transactions > 0 for e in egresses)  # both peers produced, in transactions
    values = sorted(v.decode() for v, _ in got)
    assert values == sorted(f"e{i % 7}|{i}" for i in range(300))
    ids = [h for _, h in got]
    assert len(set(ids)) == 300 and all(h.startswith(b"kt/out/") for h in ids)


@pytest.mark.timeout(150)
async def test_egress_across_a_sigkill_loses_nothing(crash_meshes: Callable[..., Any], tmp_path: Path) -> None:
    broker = await asyncio.to_thread(start_kafka_broker, tmp_path)  # its own: the egress topics are fixed
    try:
        got = await run_exactly_once(
            broker,
            crash_meshes,
            tmp_path,
            topic="eo-egress",
            records=2000,
            keys=40,
            kills=1,
            budget=120,
            egress="exactly-once",
            remote=True,
        )
    finally:
        broker.stop()
    check_egress(got, 2000, 40, remote=True)


@pytest.mark.timeout(150)
async def test_rescale_3_to_2_moves_partitions_with_their_positions(
    broker: KafkaBroker, crash_meshes: Callable[..., Any], tmp_path: Path
) -> None:
    """5 partitions on 3 peers (p % 3), the whole mesh SIGKILLed past its last checkpoint, back on
    2 peers (p % 2: partitions 2, 3 and 4 change peers) with --restore latest: every count exact."""
    from tests.integration.crash_util import Clients, reply_json
    from tests.integration.test_rescale_cli import crash_everything

    deadline = time.monotonic() + 130
    topic, keys = "rescale", [f"r{i}" for i in range(30)]
    create_topic(broker, topic, 5)
    module = module_yaml(tmp_path, broker.address, [(topic, "cr/json", [app.COUNTER])])
    mesh = crash_meshes(peers=3, checkpoint_interval=0.3)
    mesh.extra_args = ["--module", module]

    async def read(clients: Any) -> dict[str, int]:
        out = {}
        for i, k in enumerate(keys):
            reply = await clients.request(app.query(app.COUNTER, k), first=i, deadline=deadline)
            out[k] = reply_json(reply)["count"]
        return out

    async def wait_exact(clients: Any, expected: dict[str, int]) -> dict[str, int]:
        while True:
            got = await read(clients)
            assert all(got[k] <= expected[k] for k in keys), "a record was applied twice"
            if got == expected or time.monotonic() > deadline - 10:
                return got
            await asyncio.sleep(0.3)

    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    clients = await Clients.connect(mesh.endpoint)
    try:
        await asyncio.to_thread(produce, broker, topic, [(keys[i % 30].encode(), inc(i), i % 5) for i in range(600)])
        assert await wait_exact(clients, dict.fromkeys(keys, 20)) == dict.fromkeys(keys, 20)
        # more records; the mesh dies while (or right after) it reads them, past its last checkpoint
        await asyncio.to_thread(
            produce, broker, topic, [(keys[i % 30].encode(), inc(i), i % 5) for i in range(600, 1200)]
        )
        await asyncio.sleep(0.2)
    finally:
        await clients.aclose()
    crash_everything(mesh)

    mesh.peers = 2
    mesh.extra_args = ["--module", module, "--restore", "latest"]
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    clients = await Clients.connect(mesh.endpoint)
    try:
        await asyncio.to_thread(
            produce, broker, topic, [(keys[i % 30].encode(), inc(i), i % 5) for i in range(1200, 1500)]
        )
        assert await wait_exact(clients, dict.fromkeys(keys, 50)) == dict.fromkeys(keys, 50)
        assert "dead letter" not in mesh.log()
    finally:
        await clients.aclose()
        mesh.stop()


def check_egress(got: list[tuple[bytes, bytes]], records: int, keys: int, remote: bool) -> None:
    """The egress topic holds each local record once and, with ``remote``, each remote one once
    with the counts 1..n per key (the remote function's state applied each record once)."""
    values = [v.decode() for v, _ in got]
    local = [v for v in values if not v.startswith("r:")]
    expected = {f"u{i % keys}|{i}" for i in range(records)}
    assert set(local) == expected, f"lost: {sorted(expected - set(local))[:10]}"
    dups = len(values) - len(set(values))
    print(f"\n[kafka egress] {len(values)} records read_committed, {dups} duplicates")
    assert dups == 0
    if not remote:
        return
    by_key: dict[str, list[tuple[str, int]]] = {}
    for v in values:
        if v.startswith("r:"):
            k, i, c = v[2:].split("|")
            by_key.setdefault(k, []).append((i, int(c)))
    assert {f"u{int(i) % keys}|{i}" for got_ in by_key.values() for i, _ in got_} == expected
    for k, entries in by_key.items():
        assert sorted(c for _, c in entries) == list(range(1, len(entries) + 1)), f"remote counts of {k}"
