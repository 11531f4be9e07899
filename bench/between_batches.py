"""Micro-benchmark of the per-record work between batches (lane route9, issue 9).

What one peer does per record outside the dispatch loop, for a batch of the counter
workload (``bench/perf_app.py``: 1000 increments from one driver): the inbox accounting
(``records_bytes``, run as records go into the inbox and again as a batch is taken), taking
the batch from the inbox, and decoding a batch frame from another peer. Prints µs per
1000 records, the best of ``--repeat`` rounds, for the implementation ``_speedups`` selected
(``STATEFUN_MESH_NO_EXTENSIONS=1``: the twin). Run it with each tree's ``PYTHONPATH`` to
compare trees::

    PYTHONPATH=. python bench/between_batches.py
"""

from __future__ import annotations

import argparse
import collections
import timeit
from collections.abc import Callable
from typing import Any

from statefun_mesh import _speedups, memory


def _best(fn: Callable[[], Any], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--number", type=int, default=50)
    args = ap.parse_args()
    n = args.records
    recs = [
        ("perf/counter", f"k{i % 10000:05d}", "perf/driver", "d0", "io.statefun.types/int", b"\x08\x01", 0, 0)
        for i in range(n)
    ]
    frame = _speedups.encode_batch(recs)
    rb = getattr(_speedups, "records_bytes", memory.records_bytes)  # a tree without it: the Python one
    inbox: collections.deque[Any] = collections.deque()

    def take_popleft() -> None:
        inbox.extend(recs)
        [inbox.popleft() for _ in range(n)]

    def take_all() -> None:
        inbox.extend(recs)
        list(inbox)
        inbox.clear()

    rows = [
        ("records_bytes (inbox accounting)", lambda: rb(recs)),
        ("take a batch: popleft per record", take_popleft),
        ("take a batch: list + clear", take_all),
        ("decode_batch of a frame", lambda: _speedups.decode_batch(frame)),
    ]
    impl = _speedups.IMPLEMENTATION
    print(f"core {impl}, {n} records, {len(frame)}-byte frame; us per batch (best of {args.repeat})")
    for name, fn in rows:
        print(f"  {name:38s} {_best(fn, args.number, args.repeat):9.1f}")


if __name__ == "__main__":
    main()
