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

import confluent_kafka  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

import statefun_mesh as sm  # noqa: E402
from tests.integration import crash_app as app  # noqa: E402
from tests.kafkabroker import running_kafka_broker  # noqa: E402


def produce(address: str, topic: str, n: int, keys: int) -> float:
    admin = AdminClient({"bootstrap.servers": address, "log_level": 0})
    for f in admin.create_topics([NewTopic(topic, 6, 1)]).values():
        f.result(10)
    p = confluent_kafka.Producer({"bootstrap.servers": address, "enable.idempotence": True, "linger.ms": 20,
                                  "log_level": 0})  # fmt: skip
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


async def consume(address: str, topic: str, n: int, peers: int, root: str) -> float:
    module = Path(root) / "module.yaml"
    module.write_text(
        f"kind: io.statefun.kafka.v1/ingress\nspec:\n  id: bench/in\n  address: {address}\n"
        f"  consumerGroupId: bench\n  startupPosition: {{type: earliest}}\n"
        f"  topics:\n    - topic: {topic}\n      valueType: cr/json\n      targets: [{app.COUNTER}]\n"
    )
    mesh = sm.LocalMesh(app.functions, peers=peers, module=str(module), state_dir=root + "/state",
                        blob_store=f"file://{root}/ck", checkpoint_interval=0.5)  # fmt: skip
    async with mesh:
        t0 = time.perf_counter()
        while True:
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
    args = ap.parse_args()
    with running_kafka_broker() as broker, tempfile.TemporaryDirectory() as root:
        secs = produce(broker.address, "bench", args.records, args.keys)
        print(f"produced {args.records} records in {secs:.2f} s")
        secs = asyncio.run(consume(broker.address, "bench", args.records, args.peers, root))
        rate = args.records / secs
        print(f"ingress -> cr/counter -> egress: {args.records} records, {args.peers} peer(s) in one process, "
              f"{secs:.2f} s, {rate:,.0f} records/s ({sm._speedups.IMPLEMENTATION} core)")  # fmt: skip


if __name__ == "__main__":
    main()
