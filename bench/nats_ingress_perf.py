"""Throughput of the NATS JetStream ingress into a real mesh.

Starts a nats-server with JetStream (tests/natsserver.py; ``bash .ci/install-nats-server.sh``
installs it) and ``statefun-mesh run tests.integration.app:functions --peers N`` (with
checkpoints, as ``run`` defaults to), fills a stream with ``--messages`` messages to
``it/counter`` over ``--keys`` instances (payload ``1`` as ``io.statefun.types/int``),
then starts ``statefun-mesh nats-ingress`` and times from its first log line to the
moment the consumer has nothing pending and nothing unacked. Each run uses a stream of
its own. Afterwards every counter must hold exactly the messages it was sent.

Run from the repository root::

    python bench/nats_ingress_perf.py                        # 3 peers, 20,000 messages
    python bench/nats_ingress_perf.py --keys 10 --unordered --messages 10000
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


async def fill(url: str, stream: str, messages: int, keys: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
    headers = {"Statefun-Value-Type": "io.statefun.types/int"}
    pending = []
    for i in range(messages):
        pending.append(js.publish(f"{stream.lower()}.it.counter.{stream}-{i % keys}", b"1", headers=headers))
        if len(pending) == 500:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    await nc.close()


async def wait_done(url: str, stream: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    try:
        while "consumer" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.01)
        start = time.monotonic()
        while True:
            ci = await js.consumer_info(stream, "bench")
            if ci.num_pending == 0 and ci.num_ack_pending == 0:
                return time.monotonic() - start
            assert time.monotonic() < deadline, f"not done within {timeout} s: {ci}"
            await asyncio.sleep(0.02)
    finally:
        await nc.close()


async def check(endpoint: str, stream: str, messages: int, keys: int) -> None:
    async with MeshClient(endpoint) as c:
        for k in range(keys):
            want = messages // keys + (1 if k < messages % keys else 0)
            deadline = time.monotonic() + 30
            while True:
                reply = await c.request(message_builder("it/counter", f"{stream}-{k}", int_value=0))
                if reply.as_int() >= want or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert reply.as_int() == want, (k, reply.as_int(), want)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--keys", type=int, nargs="+", default=[1000])
    ap.add_argument("--unordered", action="store_true")
    ap.add_argument("--max-in-flight", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    with nats_and_mesh("nats-bench-", args.peers) as (server, mesh, tmp):
        run = 0
        for keys in args.keys:
            for _ in range(args.repeat):
                run += 1
                stream = f"BENCH{run}"
                asyncio.run(fill(server.url, stream, args.messages, keys))
                log = tmp / f"bridge-{run}.log"
                cmd = [
                    sys.executable,
                    "-m",
                    "statefun_mesh",
                    "nats-ingress",
                    "--nats-url",
                    server.url,
                    "--stream",
                    stream,
                    "--durable",
                    "bench",
                    "--mesh",
                    mesh.endpoint,
                    "--max-in-flight",
                    str(args.max_in_flight),
                    "--status-interval",
                    "0",
                    *(["--unordered"] if args.unordered else []),
                ]
                secs, cpu = time_bridge(
                    cmd, log, lambda proc, stream=stream, log=log: wait_done(server.url, stream, proc, log, 300)
                )
                asyncio.run(check(mesh.endpoint, stream, args.messages, keys))
                print(
                    f"{args.peers} peers, {keys:>5} keys, {'unordered' if args.unordered else 'ordered  '}, "
                    f"max in flight {args.max_in_flight}: {args.messages} messages in {secs:.2f} s = "
                    f"{args.messages / secs:,.0f} msg/s; bridge CPU {cpu:.1f} s (counts checked)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
