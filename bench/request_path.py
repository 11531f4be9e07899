"""Where a request's time goes at light load: the client's view, the peer's, and its system calls (issue 9).

Starts ``statefun-mesh run bench.perf_app:functions`` with 2 peers (as ``bench/mesh_perf.py``
does), sends ``--requests`` sequential ``MeshClient.request``s to counters peer 0 owns, then
to counters peer 1 owns through peer 0, and prints per series: the client's latency
percentiles next to the bare zmq.asyncio echo floor measured just before (mesh_perf's), the
*service time inside peer 0* (from the request frame's arrival to its answer's send: the
client endpoint's histogram in ``status``, so the client's own scheduling is not in it),
and per peer process the frames it sent, the credit grants carried in other frames'
envelopes and the CREDIT frames of their own. With ``--strace``, a second pass counts
each peer's system calls per request (``strace -c -f`` attached meanwhile; it slows the
peers, so its latencies are not reported): the measure the machine's load does not move.

    python bench/request_path.py --requests 3000 --strace
    PYTHONPATH=/path/to/other/checkout python bench/request_path.py   # the same for another tree
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import perf_app as app  # noqa: E402
from bench.mesh_perf import MeshProcesses, Session, echo_floor, request_latency  # noqa: E402
from statefun_mesh import message_builder  # noqa: E402


def strace(pid: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def calls(out: Path) -> tuple[int, dict[str, int]]:
    total, top = 0, {}
    for line in out.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m and m.group(2) != "total":
            top[m.group(2)] = int(m.group(1))
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?total$", line)
        if m:
            total = int(m.group(1))
    return total, top


def frames(status: dict[str, Any]) -> dict[str, int]:
    r = status.get("frames", {})
    return {k: int(v) for k, v in r.items()} if isinstance(r, dict) else {}


def service(before: list[int], after: list[int]) -> dict[str, Any]:
    """Percentiles of the service-time histogram's growth (bucket upper bounds, µs)."""
    counts = [a - b for a, b in zip(after, before, strict=True)]
    n = sum(counts)
    out: dict[str, Any] = {"n": n}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)):
        seen = 0
        for i, c in enumerate(counts):
            seen += c
            if n and seen >= q * n:
                out[name] = f"<{1 << i:,}"
                break
    return out


async def series(
    s: Session, pids: list[int], ids: list[str], n: int, work: Path, tag: str, trace: bool
) -> dict[str, Any]:
    client = s.clients[0]
    msgs = [message_builder(app.COUNTER, i, int_value=0) for i in ids]
    for i in range(50):
        await client.request(msgs[i % len(msgs)])
    res: dict[str, Any] = {}
    before = await s.statuses()
    if not trace:
        res["client"], _ = await request_latency(client, ids, n, None, pids)
    outs = [work / f"{tag}-{p}.strace" for p in pids]
    if trace:
        tracers = [strace(p, o) for p, o in zip(pids, outs, strict=True)]
        await asyncio.sleep(1.0)  # attached
        for i in range(n):
            await client.request(msgs[i % len(msgs)])
        for t in tracers:
            t.send_signal(signal.SIGINT)
        for t in tracers:
            t.wait(30)
    after = await s.statuses()
    if not trace:
        key = "request_service_us_log2"  # not in an older tree's status
        res["inside peer 0"] = service(before[0].get(key, [0]), after[0].get(key, [0]))
    for k, (b, a) in enumerate(zip(before, after, strict=True)):
        fb, fa = frames(b), frames(a)
        row: dict[str, Any] = {f"{f}/request": round((fa[f] - fb.get(f, 0)) / n, 2) for f in sorted(fa)}
        if trace:
            total, top = calls(outs[k])
            row["syscalls/request"] = round(total / n, 1)
            row["top"] = {name: round(c / n, 1) for name, c in sorted(top.items(), key=lambda kv: -kv[1])[:5]}
        res[f"peer {k}"] = row
    return res


async def run(args: argparse.Namespace) -> None:
    ns = argparse.Namespace(transport="ipc", checkpoint_interval=None, mesh_config=None, no_keys=False)
    mesh = MeshProcesses(ns, 2, "c", lambda m: print(m, file=sys.stderr))
    try:
        mesh.start(60)
        s = Session(mesh)
        await s.open()
        pids = mesh.pids()
        work = Path(tempfile.mkdtemp(prefix="request-syscalls-"))
        await s.clients[0].request(message_builder(app.COUNTER, "warm", int_value=1))
        own = [app.counter_id(i) for i in range(2000) if app.owner(app.counter_id(i), 2, s.maxp) == 0][:200]
        far = [app.counter_id(i) for i in range(2000) if app.owner(app.counter_id(i), 2, s.maxp) == 1][:200]
        tree = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(ROOT)
        print(f"tree {tree}, {args.requests} sequential requests per series")
        passes = [False, True] if args.strace else [False]
        for trace in passes:
            if not trace:
                floor = await echo_floor(args.requests)
                print(f"echo floor: {fmt(floor)}")
            for tag, ids in (("owner peer 0", own), ("through peer 0 to owner peer 1", far)):
                res = await series(s, pids, ids, args.requests, work, tag.replace(" ", "-"), trace)
                print(f"{tag}{' (strace)' if trace else ''}:")
                for k, v in res.items():
                    print(f"  {k}: {fmt(v) if k == 'client' else v}")
        await s.close()
    finally:
        mesh.stop()
        mesh.cleanup(None)


def fmt(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:,.0f}" for k, v in r.items() if isinstance(v, (int, float)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--strace", action="store_true", help="a second pass counting system calls (strace -c -f)")
    args = p.parse_args()
    t = time.monotonic()
    asyncio.run(run(args))
    print(f"{time.monotonic() - t:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
