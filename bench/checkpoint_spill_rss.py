"""Peak RSS of writing, then reading back, one checkpoint's inflight object with a large spill.

    python bench/checkpoint_spill_rss.py [spilled MiB (default 256)]

One peer (LocalMesh, file:// blob store); a spill of the given size in 32 KiB records;
one checkpoint cut (``_write_objects``) over it, then the restore's read of its inflight
object. Prints the anonymous RSS before and its peak during each step.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time

from statefun_mesh import LocalMesh, StatefulFunctions
from statefun_mesh.snapshot.participant import _Snap
from statefun_mesh.spill import Spill


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) >> 10  # MiB
    raise KeyError(field)


class _Peak:
    """The peak anonymous RSS (heap: what a checkpoint allocates), sampled every 5 ms in a
    thread. VmHWM would also count the spill's LMDB pages mapped while it is read, which
    are file pages the kernel can drop, not memory the process holds."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.005)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def main(mib: int) -> None:
    functions = StatefulFunctions()

    @functions.bind(typename="b/f")
    def f(context, message):  # type: ignore[no-untyped-def]
        pass

    with tempfile.TemporaryDirectory() as tmp:
        async with LocalMesh(
            functions, state_dir=f"{tmp}/state", blob_store=f"file://{tmp}/blobs", checkpoint_interval=3600
        ) as mesh:
            peer = mesh.peers[0]
            p = peer.participant
            spill = Spill(f"{tmp}/spill")
            for c in range(mib):
                spill.push([("b/f", f"{c}.{i}", "", "", "t", bytes([i]) * (32 << 10), 0, 0) for i in range(32)])
            snap = _Snap(10**6, peer.backend.read(), set(), [], 0, set(), 1)
            snap.spill_txn = spill.cut()
            base = _status("RssAnon")
            with _Peak() as w:
                part = await p._write_objects(snap)
            write_peak = w.peak
            snap.txn.abort()
            snap.spill_txn.abort()
            spill.close()
            with _Peak() as r:
                if hasattr(p, "_open"):
                    _, entries = await p._open(part.inflight)
                else:  # before: the whole object fetched as bytes, then decoded
                    from statefun_mesh.snapshot.format import decode_object

                    data = await p._fetch(part.inflight)
                    _, _, entries = decode_object(data, sha256=part.inflight.sha256)
                n = sum(1 for _ in entries)
                entries = data = None  # type: ignore[assignment]
            read_peak = r.peak
            print(
                f"spilled {mib} MiB, object {part.inflight.size >> 20} MiB, {n} records: "
                f"anonymous RSS before {base} MiB, "
                f"peak writing {write_peak} MiB (+{write_peak - base}), peak reading {read_peak} MiB "
                f"(+{read_peak - base})"
            )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 256))
