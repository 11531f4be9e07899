"""Peak RSS of invocations that send many messages, with the outbox and without.

    python bench/outbox_rss.py [sends=200000] [peers=2] [budget MiB=16] [value bytes=100] [sync|async]

LocalMesh (peers in this process); one client message makes one invocation send
``sends`` messages spread over 10 addresses ("sync"), or four client messages make four
``async`` invocations send ``sends / 4`` each ("async"). Each mode runs in a fresh
interpreter: "on" as shipped, "off" with staging disabled (``Outbox.stage`` and
``AsyncStage.stage`` do nothing), which keeps the invocations' sends in memory until
their batch commits, as before the outbox. A thread samples the anonymous RSS every 5 ms
(a sync invocation blocks the event loop).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time


def _rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise KeyError("RssAnon")


async def _run(n: int, peers: int, budget: int, size: int, off: bool, kind: str) -> None:
    from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, message_builder
    from statefun_mesh.memory import malloc_trim
    from statefun_mesh.outbox import AsyncStage, Outbox

    if off:
        Outbox.stage = lambda self, ctx: None  # type: ignore[method-assign]
        AsyncStage.stage = lambda self, ctx: None  # type: ignore[method-assign]
    functions = StatefulFunctions()
    pad = "v" * size
    starts = 1 if kind == "sync" else 4

    if kind == "sync":

        @functions.bind(typename="ob/burst")
        def burst(context, message):  # type: ignore[no-untyped-def]
            for i in range(n):
                context.send(message_builder(target_typename="ob/count", target_id=f"s{i % 10}", str_value=pad))

    else:

        @functions.bind(typename="ob/burst")
        async def burst_async(context, message):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0)
            for i in range(n // starts):
                context.send(message_builder(target_typename="ob/count", target_id=f"s{i % 10}", str_value=pad))

    @functions.bind(typename="ob/count", specs=[ValueSpec(name="n", type=IntType)])
    def count(context, message):  # type: ignore[no-untyped-def]
        context.storage.n = (context.storage.n or 0) + 1
        if context.in_request:
            context.reply(int_value=context.storage.n)

    with tempfile.TemporaryDirectory() as d:
        async with LocalMesh(functions, peers=peers, state_dir=d, memory_budget=budget) as mesh:
            malloc_trim()
            base = _rss_anon()
            peak = [base]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], _rss_anon())
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            for b in range(starts):
                await mesh.send(message_builder(target_typename="ob/burst", target_id=f"b{b}", int_value=0))
            await asyncio.wait_for(mesh.idle(), 1200)
            elapsed = time.perf_counter() - t0
            done.set()
            sampler.join()
            total = 0
            for k in range(10):
                reply = await mesh.request(message_builder(target_typename="ob/count", target_id=f"s{k}", int_value=0))
                total += reply.as_int() - 1
    mode = "off" if off else "on "
    growth = (peak[0] - base) / 2**20
    print(
        f"outbox {mode}: {kind}, {n} sends of {size} B, {peers} peers, memory_budget {budget >> 20} MiB: "
        f"peak anonymous RSS growth {growth:.0f} MiB, {elapsed:.1f} s, applied {total}"
    )


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--child":
        n, peers, budget, size, off = int(args[1]), int(args[2]), int(args[3]), int(args[4]), args[5] == "off"
        asyncio.run(_run(n, peers, budget, size, off, args[6]))
        return
    n = int(args[0]) if args else 200_000
    peers = int(args[1]) if len(args) > 1 else 2
    budget = (int(args[2]) if len(args) > 2 else 16) << 20
    size = int(args[3]) if len(args) > 3 else 100
    kind = args[4] if len(args) > 4 else "sync"
    for mode in ("off", "on"):
        subprocess.run(
            [sys.executable, __file__, "--child", str(n), str(peers), str(budget), str(size), mode, kind], check=True
        )


if __name__ == "__main__":
    main()
