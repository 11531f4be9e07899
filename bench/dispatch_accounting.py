"""CPU time per message of ``Dispatcher.run`` + commit, every message to its own address.

The worst case for the per-address accounting behind /metrics (dispatch.TypeStats): a
trivial function and 1000 distinct addresses per batch. Compare two trees by running it
in each (PYTHONPATH=<tree> python bench/dispatch_accounting.py), several times, interleaved.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time

from statefun_mesh import IntType, StatefulFunctions, ValueSpec
from statefun_mesh.dispatch import Dispatcher
from statefun_mesh.functions import merge_functions
from statefun_mesh.state.lmdb_backend import LmdbStateBackend

functions = StatefulFunctions()


@functions.bind(typename="b/c", specs=[ValueSpec(name="n", type=IntType)])
def counter(ctx, msg):  # type: ignore[no-untyped-def]
    ctx.storage.n = (ctx.storage.n or 0) + 1


async def main() -> None:
    backend = LmdbStateBackend(tempfile.mkdtemp() + "/s")
    disp = Dispatcher(merge_functions([functions]), backend, max_parallelism=1024)
    value = IntType.serializer().serialize(1)
    recs = [("b/c", f"k{i}", "", "", IntType.typename, value, 0, 0) for i in range(1000)]
    times = []
    for _ in range(60):
        t0 = time.process_time()
        out = await disp.run(recs, [], 0)  # type: ignore[arg-type]
        backend.commit(out.ops)
        times.append(time.process_time() - t0)
    backend.close()
    kept = times[10:]
    print(
        f"1000 distinct addresses per batch: median {statistics.median(kept) * 1e3:.2f} us/msg, "
        f"min {min(kept) * 1e3:.2f} us/msg"
    )


if __name__ == "__main__":
    asyncio.run(main())
