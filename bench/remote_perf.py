"""Remote functions against the same function in-process: throughput and latency.

A counter function (one ``IntType`` state, one increment per message) runs (a) in the
peer, (b) behind an aiohttp server in another process, served by ``RequestReplyHandler``
and called over StateFun's request-reply protocol through ``module.yaml``. One peer
(``LocalMesh``), messages sent from the same process.

    python bench/remote_perf.py [--messages 20000] [--ids 100] [--latency 300]

Throughput: ``--messages`` sends to ``--ids`` addresses, then wait until idle; the
batches let each address's backlog go in one request. Latency: one message at a time
(send, wait until idle), ``--latency`` times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import statefun_mesh as sm  # noqa: E402

SERVER = """
import sys
from aiohttp import web
import statefun_mesh as sm
from bench.remote_perf import counter_functions

handler = sm.RequestReplyHandler(counter_functions("remote/counter"))

async def handle(request):
    return web.Response(body=await handler.handle_async(await request.read()), content_type="application/octet-stream")

app = web.Application()
app.add_routes([web.post("/{name}", handle)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def counter_functions(typename: str = "bench/counter") -> sm.StatefulFunctions:
    functions = sm.StatefulFunctions()

    @functions.bind(typename, specs=[sm.ValueSpec("count", sm.IntType)])
    def counter(context: sm.Context, message: sm.Message) -> None:
        context.storage.count = (context.storage.count or 0) + message.as_int()

    return functions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the function server did not start") from None
            time.sleep(0.05)


async def throughput(mesh: sm.LocalMesh, typename: str, n: int, ids: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        await mesh.send(sm.message_builder(typename, f"id-{i % ids}", int_value=1))
    await mesh.idle(timeout=600)
    return n / (time.perf_counter() - start)


async def latency(mesh: sm.LocalMesh, typename: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        await mesh.send(sm.message_builder(typename, f"lat-{i % 10}", int_value=1))
        await mesh.idle(timeout=60)
        out.append((time.perf_counter() - start) * 1000)
    return out


async def check(mesh: sm.LocalMesh, typename: str, expected: int) -> None:
    peer = mesh.peers[0]
    assert peer.backend is not None
    total = 0
    from statefun_mesh.state.lmdb_backend import decode_state_value

    with peer.backend.read() as txn:
        for _, raw in txn.cursor(db=peer.backend.db_state):
            vt, data, _ = decode_state_value(raw)
            if vt == "io.statefun.types/int":
                total += sm.IntType.serializer().deserialize(data)
    assert total == expected, (typename, total, expected)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--ids", type=int, default=100)
    ap.add_argument("--latency", type=int, default=300)
    args = ap.parse_args()
    port = free_port()
    server = start_server(port)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            module = Path(tmp) / "module.yaml"
            module.write_text(
                "kind: io.statefun.endpoints.v2/http\nspec:\n  functions: remote/*\n"
                f"  urlPathTemplate: http://127.0.0.1:{port}/{{function.name}}\n"
            )
            rows = []
            for label, functions, typename, extra in (
                ("in-process", counter_functions("bench/counter"), "bench/counter", {}),
                ("remote (HTTP)", sm.StatefulFunctions(), "remote/counter", {"module": str(module)}),
            ):
                async with sm.LocalMesh(functions, state_dir=Path(tmp) / label.split()[0], **extra) as mesh:
                    await throughput(mesh, typename, min(1000, args.messages), args.ids)  # warm-up
                    rate = await throughput(mesh, typename, args.messages, args.ids)
                    lat = await latency(mesh, typename, args.latency)
                    await check(mesh, typename, min(1000, args.messages) + args.messages + args.latency)
                    stats = mesh.peers[0].remote
                    reqs = stats.requests if stats is not None else 0
                    q = statistics.quantiles(lat, n=100)
                    rows.append((label, rate, statistics.median(lat), q[98], reqs))
            print(f"{args.messages} messages to {args.ids} ids, 1 peer; latency over {args.latency} single messages")
            print("| function | messages/s | latency p50 ms | latency p99 ms | HTTP requests |")
            print("|---|---:|---:|---:|---:|")
            for label, rate, p50, p99, reqs in rows:
                print(f"| {label} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {reqs:,} |")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
