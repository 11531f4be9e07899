"""CPU cost of rebuilding a peer's state store from a checkpoint object (the restarted
peer's part of a recovery round), in this process, without the mesh around it.

Writes a ``base`` object of ``--keys`` state entries shaped like ``bench/ckpt_app.py``'s
(~100-byte string values, 10 per instance) into a temporary directory, then ``--repeat``
times: the SHA-256 check of the file, and decoding it while ``LmdbStateBackend.load``
writes it into an empty store, each timed in CPU seconds of this process
(``time.process_time``: the machine's other load does not inflate it) and wall seconds.
``--heap`` live objects are kept on the heap meanwhile, as a running peer has (the cyclic
garbage collector's cost grows with them).

    python bench/restore_load.py --keys 500000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from statefun_mesh.snapshot.format import file_sha256, open_object_file, write_object  # noqa: E402
from statefun_mesh.state.lmdb_backend import LmdbStateBackend, encode_state_value, state_key  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=500_000, help="state entries in the object (default: 500000)")
    p.add_argument("--repeat", type=int, default=3, help="rebuilds (default: 3)")
    p.add_argument("--heap", type=int, default=300_000, help="live objects kept meanwhile (default: 300000)")
    args = p.parse_args(argv)
    heap = [[i] for i in range(args.heap)]
    work = Path(tempfile.mkdtemp(prefix="statefun-mesh-restore-"))
    try:
        value = encode_state_value("io.statefun.types/string", b"x" * 100, 0)
        keys = sorted(
            state_key(i % 32768, "ckpt/fill", f"fill-{i}", f"v{j}") for i in range(args.keys // 10) for j in range(10)
        )
        obj = work / "base.bin"
        with open(obj, "wb") as fh:
            n, size, _ = write_object(fh, "base", {"checkpoint": 1}, (["state", k, value] for k in keys))
        del keys
        print(f"restore_load: {n:,} entries, {size / 1e6:.1f} MB object, {len(heap):,} live objects")
        for r in range(args.repeat):
            store = work / f"store-{r}"
            backend = LmdbStateBackend(store)
            c0, w0 = time.process_time(), time.perf_counter()
            file_sha256(str(obj))
            c1, w1 = time.process_time(), time.perf_counter()
            _, _, entries = open_object_file(str(obj))
            loaded = backend.load(entries, append=True)
            c2, w2 = time.process_time(), time.perf_counter()
            backend.close()
            shutil.rmtree(store)
            assert loaded == n
            print(
                f"  rebuild {r + 1}: SHA-256 {c1 - c0:.3f} CPU-s ({w1 - w0:.3f} s), decode + load "
                f"{c2 - c1:.3f} CPU-s ({w2 - w1:.3f} s), total {c2 - c0:.3f} CPU-s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
