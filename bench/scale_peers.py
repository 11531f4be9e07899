"""How a mesh's per-peer costs grow with the number of peers (issue 12 item 4), on one machine.

For each N: ``statefun-mesh run tests.integration.crash_app:functions --peers N`` (ipc,
checkpoints every second to a file:// store), a light load (20 counter increments a second),
then per peer: open sockets (``/proc/PID/fd`` links to ``socket:``), resident memory, CPU
used while idle but for heartbeats (over ``--idle`` seconds, no load), checkpoint durations
(from the coordinator's "checkpoint N complete in X s" lines: barrier alignment + upload),
and the time from a SIGKILL of the last peer until every peer answers a request.

    python bench/scale_peers.py --peers 4 16 32 > scale.json

Every process it starts is stopped at the end (also on error).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.crash_app import COUNTER, json_message, query
from tests.integration.crash_util import Clients, CrashMesh, probe_ids, wait_responsive
from tests.integration.support import cpu_seconds, memory_kib


def sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


async def one(n: int, idle: float, workdir: Path) -> dict[str, object]:
    mesh = CrashMesh(workdir, peers=n, checkpoint_interval=1.0)
    out: dict[str, object] = {"peers": n}
    try:
        t0 = time.monotonic()
        mesh.start()
        await asyncio.to_thread(mesh.wait_up, 300.0)
        out["start_s"] = round(time.monotonic() - t0, 1)
        clients = await Clients.connect(mesh.endpoint, timeout=5.0)
        deadline = time.monotonic() + 120
        for i in range(100):  # light load: 20 a second for 5 s
            await clients.send(
                json_message(COUNTER, f"k{i % 50}", {"inc": str(i)}), f"s-{i}", first=i, deadline=deadline
            )
            await asyncio.sleep(0.05)
        await clients.aclose()
        pids = mesh.peer_pids()
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        await asyncio.sleep(idle)
        cpu = [cpu_seconds(p) - cpu0[k] for k, p in pids.items()]
        mem = [memory_kib(p).get("VmRSS", 0) for p in pids.values()]
        socks = [sockets(p) for p in pids.values()]
        out["sockets_per_peer"] = {"min": min(socks), "max": max(socks)}
        out["rss_mib_per_peer"] = {"median": round(statistics.median(mem) / 1024, 1), "max": round(max(mem) / 1024, 1)}
        out["idle_cpu_pct_per_peer"] = round(100 * statistics.mean(cpu) / idle, 2)
        durations = [float(x) for x in re.findall(r"checkpoint \d+ complete in ([\d.]+) s", mesh.log())]
        if durations:
            out["checkpoint_s"] = {
                "count": len(durations),
                "median": round(statistics.median(durations), 3),
                "max": round(max(durations), 3),
            }
        probes = probe_ids("probe", n)
        old, t_kill = mesh.kill_peer(n - 1)
        await asyncio.to_thread(mesh.wait_peer_restarted, n - 1, old, 120.0)
        t_ok = await wait_responsive(mesh.endpoint, probes, lambda i: query(COUNTER, i), timeout=240)
        out["recovery_after_sigkill_s"] = round(t_ok - t_kill, 2)
        m = re.findall(r"recovery round \d+ done in ([\d.]+) s", mesh.log())
        out["recovery_round_s"] = float(m[-1]) if m else None
    finally:
        mesh.stop()
        mesh.cleanup()
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--peers", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--idle", type=float, default=10.0)
    args = p.parse_args()
    results = []
    for n in args.peers:
        with tempfile.TemporaryDirectory(prefix=f"statefun-mesh-scale-{n}-") as d:
            r = asyncio.run(one(n, args.idle, Path(d)))
        print(json.dumps(r), file=sys.stderr, flush=True)
        results.append(r)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
