"""Kafka ingress -> function -> egress throughput of one peer, against a real broker (Tansu).

Produces N keyed JSON records to a topic (6 partitions), then starts a mesh of P peers in
this process (LocalMesh, checkpoints every 0.5 s to a file:// store) whose module.yaml
has a Kafka ingress on that topic targeting ``cr/counter`` (tests/integration/crash_app.py:
it counts, and emits one record to the mesh's egress ``cr/increments`` per message). Timed:
from the mesh being up until every record is routed and every function has run (the
counters' egress heads sum to N), so it includes consuming, routing, invoking, the LMDB
writes and the egress log. The peers share this process (one core), so the rate divided
by P is a per-peer figure only for P = 1; use P = 1 for "per peer".

    PYTHONPATH=. python bench/kafka_ingress_perf.py --records 50000 --peers 1

With ``--egress exactly-once`` (or ``at-least-once``) the function is ``kt/counter``
(tests/integration/kafka_app.py), which writes one Kafka egress record per message instead,
and the clock stops when the peers' Kafka egress has produced all of them (committed
transactions for exactly-once), so the figure is Kafka in -> function -> Kafka out, including
the checkpoint that releases the records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import confluent_kafka
from confluent_kafka.admin import AdminClient, NewTopic

import statefun_mesh as sm
from tests.integration import crash_app as app
from tests.kafkabroker import running_kafka_broker


def produce(address: str, topic: str, n: int, keys: int) -> float:
    admin = AdminClient({"bootstrap.servers": address, "log_level": 0})
    for f in admin.create_topics([NewTopic(topic, 6, 1)]).values():
        f.result(10)
    p = confluent_kafka.Producer(
        {"bootstrap.servers": address, "enable.idempotence": True, "linger.ms": 20, "log_level": 0}
    )
    t0 = time.perf_counter()
    for i in range(n):
        while True:
            try:
                p.produce(topic, key=f"u{i % keys}".encode(), value=json.dumps({"inc": str(i)}).encode())
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0
    return time.perf_counter() - t0


async def consume(address: str, topic: str, n: int, peers: int, root: str, egress: str | None) -> float:
    from tests.integration import kafka_app

    module = Path(root) / "module.yaml"
    target = kafka_app.KT_COUNTER if egress else app.COUNTER
    text = (
        f"kind: io.statefun.kafka.v1/ingress\nspec:\n  id: bench/in\n  address: {address}\n"
        f"  consumerGroupId: bench\n  startupPosition: {{type: earliest}}\n"
        f"  topics:\n    - topic: {topic}\n      valueType: cr/json\n      targets: [{target}]\n"
    )
    if egress:
        text += (
            f"---\nkind: io.statefun.kafka.v1/egress\nspec:\n  id: {kafka_app.EGRESS}\n  address: {address}\n"
            f"  deliverySemantic: {{type: {egress}}}\n"
        )
    module.write_text(text)
    mesh = sm.LocalMesh(
        kafka_app.functions,
        peers=peers,
        module=str(module),
        state_dir=root + "/state",
        blob_store=f"file://{root}/ck",
        checkpoint_interval=0.5,
    )
    async with mesh:
        t0 = time.perf_counter()
        while True:
            if egress:
                done = sum(p.kafka_egress.records_out for p in mesh.peers)
            else:
                done = sum(p.backend.egress_bounds(app.INCREMENTS)[1] for p in mesh.peers if p.backend is not None)
            if done >= n:
                break
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--peers", type=int, default=1)
    ap.add_argument("--egress", choices=["exactly-once", "at-least-once"], default=None)
    args = ap.parse_args()
    with running_kafka_broker() as broker, tempfile.TemporaryDirectory() as root:
        secs = produce(broker.address, "bench", args.records, args.keys)
        print(f"produced {args.records} records in {secs:.2f} s")
        if args.egress:
            admin = AdminClient({"bootstrap.servers": broker.address, "log_level": 0})
            admin.create_topics([NewTopic("kt-out", 6, 1)])["kt-out"].result(10)
        secs = asyncio.run(consume(broker.address, "bench", args.records, args.peers, root, args.egress))
        rate = args.records / secs
        what = f"Kafka egress ({args.egress})" if args.egress else "mesh egress"
        print(
            f"ingress -> function -> {what}: {args.records} records, {args.peers} peer(s) in one process, "
            f"{secs:.2f} s, {rate:,.0f} records/s ({sm._speedups.IMPLEMENTATION} core)"
        )


if __name__ == "__main__":
    main()
