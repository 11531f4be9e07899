"""Throughput of the NATS JetStream egress: records from a real mesh's egress into a stream.

Starts a nats-server with JetStream (tests/natsserver.py; ``bash .ci/install-nats-server.sh``
installs it) and ``statefun-mesh run tests.integration.app:functions --peers N`` (with
checkpoints every second), makes ``it/emit`` write ``--records`` string records to an
egress over 200 instances, waits until the checkpoints released all of them, then starts
``statefun-mesh nats-egress`` and times from its start-up line to the moment the stream
holds every record. Each run uses an egress, a stream and a bridge name of its own.
Afterwards the stream must hold exactly ``--records`` messages.

Run from the repository root::

    python bench/nats_egress_perf.py                    # 3 peers, 20,000 records, --batch 500
    python bench/nats_egress_perf.py --batch 100 2000 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import nats
from nats.js.api import StreamConfig
from nats_bench import nats_and_mesh, time_bridge  # puts the repository root on sys.path

from statefun_mesh import MeshClient, message_builder
from tests.integration.app import EMIT, JSON

IDS = 200


async def produce(endpoint: str, egress: str, records: int) -> None:
    """Emit ``records`` records to ``egress`` and wait until every one is released."""
    per = records // IDS
    async with MeshClient(endpoint, timeout=60) as c:
        await asyncio.gather(
            *(
                c.send(
                    message_builder(
                        target_typename=EMIT,
                        target_id=f"{egress}-{i}",
                        value_type=JSON,
                        value={"egress": egress, "n": per, "tag": "b"},
                    )
                )
                for i in range(IDS)
            )
        )
        endpoints = (await c.info())["client_endpoints"]
        deadline = time.monotonic() + 120
        while True:
            released = 0
            for ep in endpoints:
                _, nxt, _, _ = await c.fetch_egress(egress, ep, "latest", wait=0.0, limit=1)
                released += nxt
            if released >= per * IDS:
                return
            assert time.monotonic() < deadline, f"only {released} of {per * IDS} records released"
            await asyncio.sleep(0.2)


async def wait_done(url: str, stream: str, want: int, proc: subprocess.Popen[bytes], log: Path) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        while "from the mesh at" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.01)
        start = time.monotonic()
        deadline = start + 300
        while True:
            n = (await js.stream_info(stream)).state.messages
            if n >= want:
                secs = time.monotonic() - start
                await asyncio.sleep(1.0)
                n = (await js.stream_info(stream)).state.messages
                assert n == want, f"{n} messages in the stream, {want} records"
                return secs
            assert time.monotonic() < deadline, f"{n} of {want} after 300 s"
            await asyncio.sleep(0.02)
    finally:
        await nc.close()


async def add_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
    await nc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--batch", type=int, nargs="+", default=[500])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    want = args.records // IDS * IDS
    with nats_and_mesh("nats-egress-bench-", args.peers, "--checkpoint-interval", "1") as (server, mesh, tmp):
        run = 0
        for batch in args.batch:
            for _ in range(args.repeat):
                run += 1
                egress, stream = f"bench/out{run}", f"EGRESS{run}"
                asyncio.run(produce(mesh.endpoint, egress, args.records))
                asyncio.run(add_stream(server.url, stream))
                log = tmp / f"bridge-{run}.log"
                cmd = [
                    sys.executable,
                    "-m",
                    "statefun_mesh",
                    "nats-egress",
                    "--nats-url",
                    server.url,
                    "--mesh",
                    mesh.endpoint,
                    "--name",
                    f"bench{run}",
                    "--batch",
                    str(batch),
                    "--route",
                    f"{egress}={stream.lower()}.{{peer}}",
                    "--status-interval",
                    "0",
                ]
                secs, cpu = time_bridge(
                    cmd, log, lambda proc, stream=stream, log=log: wait_done(server.url, stream, want, proc, log)
                )
                print(
                    f"{args.peers} peers, batch {batch:>5}: {want} records in {secs:.2f} s = "
                    f"{want / secs:,.0f} records/s; bridge CPU {cpu:.1f} s (stream count checked)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
