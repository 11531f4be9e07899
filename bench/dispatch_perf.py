"""One peer's batch work alone, in process: ``Dispatcher.run`` + ``LmdbStateBackend.commit``.

Runs the mesh benchmark's counter (``bench.perf_app``, one ``IntType`` state) on batches
of 1,000 increments over 10,000 keys against a real LMDB store with change tracking on
(as with checkpoints), and prints the best round's invocations per CPU-second. No
sockets, no peer loop: it measures exactly the code of issue 9's native dispatch, with
far less noise than a mesh on a shared machine. To compare two trees in one run,
alternate them::

    git archive <old> | tar -x -C /tmp/old && cp statefun_mesh/_speedups_c*.so /tmp/old/statefun_mesh/
    for i in 1 2 3; do
        PYTHONPATH=/tmp/old python bench/dispatch_perf.py; PYTHONPATH=. python bench/dispatch_perf.py
    done

``STATEFUN_MESH_NO_EXTENSIONS=1`` measures the pure-Python twin.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.perf_app import _ONE, COUNTER, counter_id, functions
from statefun_mesh import _speedups
from statefun_mesh.dispatch import Dispatcher
from statefun_mesh.functions import merge_functions
from statefun_mesh.state.lmdb_backend import LmdbStateBackend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=50, help="batches of 1,000 per round (default: 50)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds; the best is printed (default: 8)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = LmdbStateBackend(tmp)
        backend.take_changes()  # change tracking on, as with checkpoints
        dispatcher = Dispatcher(merge_functions(functions), backend, max_parallelism=4096)
        one = 1000
        batches = [
            [
                (COUNTER, counter_id((b * one + i) % 10_000), "perf/driver", "d0", "io.statefun.types/int", _ONE, 0, 0)
                for i in range(one)
            ]
            for b in range(args.batches)
        ]

        async def run_all() -> None:
            for records in batches:
                out = await dispatcher.run(records, [], 1000)
                backend.commit(out.ops)
                backend.take_changes()

        loop = asyncio.new_event_loop()
        loop.run_until_complete(run_all())  # warm: every key exists afterwards
        best = float("inf")
        for _ in range(args.rounds):
            t = time.process_time()
            loop.run_until_complete(run_all())
            best = min(best, time.process_time() - t)
        loop.close()
        backend.close()
    n = args.batches * one
    rate = n / best
    print(f"{_speedups.IMPLEMENTATION}: {rate:,.0f} counter invocations per CPU-second ({1e6 / rate:.2f} us each)")


if __name__ == "__main__":
    main()
