"""Frames per second through ZmqTransport over tcp on 127.0.0.1, with and without CURVE.

    PYTHONPATH=. python bench/curve_frames.py [--rounds 3]

Two transports in this process; peer 0 sends N frames of one size to peer 1, which
counts them. Prints the median rate of the rounds (A/B interleaved) and frames per CPU
second of this process (libzmq's I/O threads included).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

from statefun_mesh.mesh import free_ports
from statefun_mesh.security import generate_keypair
from statefun_mesh.transport.zeromq import ZmqTransport

CASES = ((100, 200_000), (4096, 100_000), (65536, 20_000))


async def one_round(curve: bool, size: int, n: int) -> tuple[float, float]:
    """(frames/s wall clock, frames per CPU second) of one round."""
    eps = [f"tcp://127.0.0.1:{p}" for p in free_ports(2)]
    if curve:
        pairs = [generate_keypair() for _ in range(2)]
        ts = [ZmqTransport(i, eps, keys=pairs[i], peer_keys=[p.public for p in pairs]) for i in range(2)]
    else:
        ts = [ZmqTransport(i, eps) for i in range(2)]
    got = 0
    done = asyncio.Event()

    def received(src: int, frame: bytes) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    await ts[0].start(lambda src, frame: None)
    await ts[1].start(received)
    frame = b"\x01" * size
    ts[0].send(1, frame)  # connect (and handshake) before the clock starts
    while got < 1:
        await asyncio.sleep(0.01)
    got = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        ts[0].send(1, frame)
        if i % 1000 == 0:
            await asyncio.sleep(0)
    await asyncio.wait_for(done.wait(), 300)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for t in ts:
        await t.aclose()
    return n / wall, n / cpu


async def main(rounds: int) -> None:
    for size, n in CASES:
        res: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(rounds):
            for curve in (False, True):
                res[curve].append(await one_round(curve, size, n))
        for curve in (False, True):
            rate = statistics.median(r[0] for r in res[curve])
            per_cpu = statistics.median(r[1] for r in res[curve])
            print(
                f"{size:>6} B frames, {'CURVE' if curve else 'plain'}: {rate:>9,.0f} frames/s "
                f"({rate * size / 1e6:,.1f} MB/s); {per_cpu:>9,.0f} frames per CPU-second",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case and mode (default: 3)")
    logging.basicConfig(level=logging.ERROR)  # not the plaintext warnings
    asyncio.run(main(parser.parse_args().rounds))
