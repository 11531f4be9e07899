"""What checkpoints cost, and how long a recovery takes (the checkpoint benchmarks of the issue).

Three parts, each on real components (LMDB, a ``file://`` blob store, and real peer
processes under ``statefun-mesh run`` where processes are involved):

* **deltas** (in this process: a ``LocalMesh`` whose checkpoints are triggered by
  hand through peer 0's coordinator): for each state size (``--sizes`` LMDB keys,
  ``bench.ckpt_app``'s ``ckpt/fill`` instances of 10 values of ~100 bytes), load the
  state, take a checkpoint (a full *base*), then for each fraction in
  ``--fractions`` rewrite that fraction of the keys and take a checkpoint (a *delta*:
  ``base_every`` and ``delta_ratio`` are set so high that no base intervenes). It
  reports each checkpoint's duration (from the trigger to the published manifest,
  and each peer's own upload time), the bytes uploaded, and delta bytes / base bytes.
* **throughput**: ``bench/mesh_perf.py``'s counter workload (increments generated
  inside the mesh by one driver per peer) on a mesh without checkpoints and on one
  with a checkpoint every ``--tp-interval`` seconds, alternated ABBA (off, on, on,
  off, ...) so that a machine that slows down or speeds up during the run biases
  neither; the ratio of the medians is measured within this one run.
* **recovery**: a mesh of ``--recovery-peers`` processes holding ``--recovery-keys``
  keys; once a checkpoint covers them, SIGKILL peer 1 and time until a request to an
  instance peer 1 owns is answered with the state it held (the launcher restarts the
  peer after its 0.5 s back-off; the coordinator then restores every peer). Twice:
  with ``local_recovery = true`` (the default: peers restore from their local copies
  in ``<state-dir>/peer-K.checkpoints``) and ``false`` (from the blob store only).

Every process it starts it stops (by process group and pid); everything binds
127.0.0.1 or ipc sockets in a temporary directory.

Run from the repository root (extension built)::

    python bench/checkpoint_perf.py                      # full sizes: 10k/100k/1M keys, ~10 minutes
    python bench/checkpoint_perf.py --quick              # every part, small sizes, well under a minute
    python bench/checkpoint_perf.py --parts deltas --sizes 100000 --fractions 0 0.01 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/checkpoint_perf.py` puts bench/ first, not the root
    sys.path.insert(0, str(ROOT))

from bench import ckpt_app, perf_app  # noqa: E402
from bench import mesh_perf as mp  # noqa: E402
from statefun_mesh import LocalMesh, MeshClient  # noqa: E402
from statefun_mesh._speedups import IMPLEMENTATION  # noqa: E402

CKPT_APP_REF = "bench.ckpt_app:functions"
PARTS = ("deltas", "throughput", "recovery")
Log = Callable[[str], None]


# -- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/checkpoint_perf.py",
        description=(
            "Measure checkpoints on real components: checkpoint duration and bytes uploaded against state "
            "size and the fraction of keys changed (in-process LocalMesh, file:// blob store); counter "
            "throughput with a checkpoint every second against none (real peer processes); and the time "
            "from SIGKILL of a peer to answered requests again, restoring from local copies and from the "
            "blob store only. State values are ~100-byte strings, 10 per function instance."
        ),
        epilog=(
            "Aims reported against (the issue): a delta of 1%% changed keys uploads about 1%% of the state; "
            "throughput with checkpoints every 1 s at most 10%% below none. --quick runs every part at "
            "small sizes in well under a minute (the smoke test in tests/ runs it). Results: bench/RESULTS.md."
        ),
    )
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for every part (10k keys, short runs, one kill per mode): a smoke run, not figures to quote",
    )
    d = p.add_argument_group("deltas (in-process)")
    d.add_argument(
        "--sizes", type=int, nargs="+", metavar="KEYS", help="state sizes in LMDB keys (default: 10000 100000 1000000)"
    )
    d.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        metavar="F",
        help="fractions of the keys changed before each delta, in order (default: 0 0.01 0.1 1; "
        "0 shows a checkpoint's fixed cost)",
    )
    d.add_argument("--delta-peers", type=int, default=1, metavar="N", help="peers of the LocalMesh (default: 1)")
    d.add_argument(
        "--delta-repeat",
        type=int,
        metavar="R",
        help="checkpoints per fraction, the table shows the median (default: 3)",
    )
    t = p.add_argument_group("throughput (peer processes)")
    t.add_argument("--tp-peers", type=int, default=2, metavar="N", help="peer processes (default: 2)")
    t.add_argument(
        "--tp-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between checkpoints in the 'on' mesh (default: 1)",
    )
    t.add_argument(
        "--tp-messages",
        type=int,
        metavar="M",
        help="counter increments per run (default: 600000, ~10 s, so a run spans many checkpoints)",
    )
    t.add_argument("--tp-keys", type=int, metavar="K", help="counter instances (default: 10000)")
    t.add_argument("--tp-repeat", type=int, metavar="R", help="runs per mesh start (default: 2)")
    t.add_argument(
        "--tp-rounds", type=int, metavar="N", help="pairs of mesh starts, alternated off,on,on,off,... (default: 2)"
    )
    r = p.add_argument_group("recovery (peer processes)")
    r.add_argument("--recovery-keys", type=int, metavar="KEYS", help="state in LMDB keys (default: 1000000)")
    r.add_argument("--recovery-peers", type=int, default=2, metavar="N", help="peer processes (default: 2)")
    r.add_argument("--recovery-kills", type=int, metavar="K", help="SIGKILLs of peer 1 per mode (default: 2)")
    r.add_argument(
        "--recovery-interval",
        type=float,
        metavar="S",
        help="checkpoint interval of the mesh (default: 5, statefun-mesh run's default)",
    )
    r.add_argument(
        "--modes",
        nargs="+",
        choices=["local", "blob"],
        default=["local", "blob"],
        help="local: restore from local copies (local_recovery = true); blob: from the blob store "
        "only (local_recovery = false) (default: both)",
    )
    r.add_argument(
        "--recovery-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="longest a recovery may take before the run fails (default: 300)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write every raw number (and the machine) to FILE")
    o.add_argument("--keep-logs", metavar="DIR", help="copy the launchers' logs to DIR")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr, only the tables")
    return p


def apply_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    defaults: dict[str, Any] = {
        "sizes": [10_000] if quick else [10_000, 100_000, 1_000_000],
        "fractions": [0.0, 0.01, 0.1, 1.0],
        "delta_repeat": 1 if quick else 3,
        "tp_messages": 100_000 if quick else 600_000,
        "tp_keys": 2_000 if quick else 10_000,
        "tp_repeat": 1 if quick else 2,
        "tp_rounds": 1 if quick else 2,
        "recovery_keys": 10_000 if quick else 1_000_000,
        "recovery_kills": 1 if quick else 2,
        "recovery_interval": 1.0 if quick else 5.0,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


# -- loading state through the mesh -----------------------------------------------------------


def instances_for(keys: int) -> int:
    return max(1, -(-keys // ckpt_app.SPECS))


def _loader_invocations(lo: int, hi: int, chunk: int) -> int:
    return -(-(hi - lo) // chunk) if hi > lo else 0


def fraction_count(instances: int, fraction: float) -> int:
    return min(instances, round(instances * fraction))


# -- part 1: deltas (in-process) -----------------------------------------------------------------


async def _checkpoint(mesh: LocalMesh, timeout: float = 600.0) -> dict[str, Any]:
    """Trigger a checkpoint on peer 0's coordinator and wait for its manifest."""
    coord = mesh.peers[0].coordinator
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    n = coord.trigger()
    while coord.last_complete is None or coord.last_complete.checkpoint < n:
        if coord.in_progress != n:
            raise RuntimeError(f"checkpoint {n} was aborted (see the log)")
        if loop.time() - t0 > timeout:
            raise TimeoutError(f"checkpoint {n} not complete after {timeout} s")
        await asyncio.sleep(0.005)
    wall = loop.time() - t0
    m = coord.last_complete
    parts = []
    for peer, part in zip(mesh.peers, m.parts, strict=True):
        state = part.chain[-1]
        parts.append(
            {
                "peer": part.peer,
                "kind": state.kind,
                "state_bytes": state.size,
                "entries": state.entries,
                "inflight_bytes": part.inflight.size,
                "uploaded_bytes": peer.participant.last_bytes,
                "upload_s": peer.participant.last_duration,
                "chain": len(part.chain),
            }
        )
    kinds = {p["kind"] for p in parts}
    return {
        "checkpoint": n,
        "kind": kinds.pop() if len(kinds) == 1 else "mixed",
        "wall_s": wall,
        "upload_s": max(p["upload_s"] for p in parts),
        "state_bytes": sum(p["state_bytes"] for p in parts),
        "uploaded_bytes": sum(p["uploaded_bytes"] for p in parts),
        "entries": sum(p["entries"] for p in parts),
        "parts": parts,
    }


async def _write_round(mesh: LocalMesh, count: int, rnd: int) -> float:
    """Rewrite fill instances ``0 .. count-1`` with round ``rnd``; return the seconds it took."""
    t0 = time.perf_counter()
    if count:
        await mesh.send(ckpt_app.trigger("loader-0", start=0, end=count, chunk=999, round=rnd))
        await mesh.idle()
    return time.perf_counter() - t0


async def delta_size(keys: int, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    instances = instances_for(keys)
    work = Path(tempfile.mkdtemp(prefix="statefun-mesh-ckperf-"))
    try:
        mesh = LocalMesh(
            ckpt_app.functions,
            peers=args.delta_peers,
            state_dir=str(work / "state"),
            blob_store=f"file://{work / 'blobs'}",
            checkpoint_interval=1e6,
            base_every=1_000_000,
            delta_ratio=1e9,  # deltas only, whatever the fractions' order
        )
        async with mesh:
            load_s = await _write_round(mesh, instances, 0)
            log(
                f"  {keys:,} keys: loaded {instances:,} instances in {load_s:.1f} s "
                f"({instances * ckpt_app.SPECS / load_s:,.0f} keys/s)"
            )
            base = await _checkpoint(mesh)
            if base["kind"] != "base":
                raise RuntimeError(f"the first checkpoint was a {base['kind']}, not a base")
            log(f"  {keys:,} keys: base {base['state_bytes'] / 1e6:.2f} MB in {base['wall_s']:.2f} s")
            rows = []
            rnd = 0
            for f in args.fractions:
                count = fraction_count(instances, f)
                samples = []
                for _ in range(args.delta_repeat):
                    rnd += 1
                    write_s = await _write_round(mesh, count, rnd)
                    ck = await _checkpoint(mesh)
                    if ck["kind"] != "delta":
                        raise RuntimeError(f"expected a delta, got a {ck['kind']}")
                    ck["write_s"] = write_s
                    samples.append(ck)
                row = {
                    "fraction": f,
                    "changed_keys": count * ckpt_app.SPECS,
                    "samples": samples,
                    "wall_s": statistics.median(s["wall_s"] for s in samples),
                    "upload_s": statistics.median(s["upload_s"] for s in samples),
                    "state_bytes": statistics.median(s["state_bytes"] for s in samples),
                    "uploaded_bytes": statistics.median(s["uploaded_bytes"] for s in samples),
                }
                row["delta_over_base"] = row["state_bytes"] / base["state_bytes"]
                row["wall_over_base"] = row["wall_s"] / base["wall_s"]
                log(
                    f"  {keys:,} keys, {f:.0%} changed: delta {row['state_bytes'] / 1e6:.3f} MB "
                    f"({row['delta_over_base']:.2%} of the base) in {row['wall_s']:.3f} s"
                )
                rows.append(row)
            return {
                "keys": keys,
                "instances": instances,
                "entries": base["entries"],
                "load_s": load_s,
                "base": base,
                "deltas": rows,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def run_deltas(args: argparse.Namespace, log: Log) -> list[dict[str, Any]]:
    # the LocalMesh logs in this process: keep its recovery-round warnings out of the output
    logging.getLogger("statefun_mesh").setLevel(logging.ERROR)
    return [await delta_size(k, args, log) for k in args.sizes]


# -- processes -------------------------------------------------------------------------------------


def _mesh_args(interval: float | None, mesh_config: str | None) -> argparse.Namespace:
    return argparse.Namespace(transport="ipc", checkpoint_interval=interval, mesh_config=mesh_config)


def _rescan(mesh: mp.MeshProcesses) -> dict[int, int]:
    """Peer id -> pid of the launcher's live peer processes; remembers them for ``mesh.stop()``."""
    assert mesh.proc is not None
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and mp._ppid(int(entry)) == mesh.proc.pid:
            cmd = mp._cmdline(int(entry))
            if "peer" in cmd and "--id" in cmd and mp._alive(int(entry)):
                k = int(cmd[cmd.index("--id") + 1])
                found[k] = int(entry)
                mesh.peer_procs[k] = (int(entry), cmd)
    return found


def _manifests(mesh: mp.MeshProcesses) -> list[int]:
    d = mesh.state_dir / "checkpoints" / "checkpoints"
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and (d / n / "manifest.json").exists())


def _manifest(mesh: mp.MeshProcesses, n: int) -> dict[str, Any] | None:
    path = mesh.state_dir / "checkpoints" / "checkpoints" / f"{n:012d}" / "manifest.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    return None


def _manifest_stats(mesh: mp.MeshProcesses, ids: list[int]) -> dict[str, Any]:
    """Per peer and checkpoint (of the retained manifests ``ids``): the state object's and the
    in-flight object's entries and bytes."""
    rows = []
    for n in ids:
        m = _manifest(mesh, n)
        if m is None:
            continue
        for part in m["parts"]:
            st, inf = part["chain"][-1], part["inflight"]
            rows.append(
                {
                    "checkpoint": n,
                    "peer": part["peer"],
                    "kind": st["kind"],
                    "state_entries": st["entries"],
                    "state_bytes": st["size"],
                    "inflight_entries": inf["entries"],
                    "inflight_bytes": inf["size"],
                    "chain_bytes": sum(o["size"] for o in part["chain"]),
                    "created_ms": m["created_ms"],
                }
            )
    return {"rows": rows}


def _stop(mesh: mp.MeshProcesses, keep_logs: str | None, tag: str) -> None:
    with contextlib.suppress(Exception):
        if mesh.proc is not None:
            _rescan(mesh)
    mesh.stop()
    if keep_logs:
        dest = Path(keep_logs) / tag
        dest.mkdir(parents=True, exist_ok=True)
        for f in (mesh.out_path, mesh.err_path):
            if f.exists():
                shutil.copy(f, dest / f.name)
    shutil.rmtree(mesh.workdir, ignore_errors=True)


# -- part 2: throughput with and without checkpoints ---------------------------------------------


async def _tp_measure(mesh: mp.MeshProcesses, args: argparse.Namespace, log: Log, tag: str) -> list[dict[str, Any]]:
    s = mp.Session(mesh)
    await s.open()
    try:
        messages = -(-args.tp_messages // args.tp_keys) * args.tp_keys
        await mp.counter_run(s, args.tp_keys, args.tp_keys, 999, 300.0)  # warm-up: every key exists
        runs = []
        for i in range(args.tp_repeat):
            m0 = max(_manifests(mesh) or [0])
            r = await mp.counter_run(s, messages, args.tp_keys, 999, 600.0)
            m1 = _manifests(mesh)
            # ids count up by one per checkpoint (retention deletes old manifests: count by id)
            r["checkpoints_completed"] = max(m1 or [0]) - m0
            r["checkpoint_objects"] = _manifest_stats(mesh, [n for n in m1 if n > m0])
            r["peer_cpu_s"] = sum(p["cpu_s"] for p in r["per_peer"])
            r["per_cpu_s"] = messages / r["peer_cpu_s"] if r["peer_cpu_s"] else None
            log(
                f"  {tag} run {i + 1}/{args.tp_repeat}: {r['rate']:,.0f} increments/s, "
                f"{r['checkpoints_completed']} checkpoints completed during it"
            )
            runs.append(r)
        final = await s.statuses()
        if sum(st["failures"] for st in final):
            raise RuntimeError("invocations failed during the throughput runs")
        return runs
    finally:
        await s.close()


def run_throughput(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    order: list[str] = []
    for i in range(args.tp_rounds):
        order += ["off", "on"] if i % 2 == 0 else ["on", "off"]
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for mode in order:
        interval = args.tp_interval if mode == "on" else None
        mesh = mp.MeshProcesses(_mesh_args(interval, None), args.tp_peers, "c", log)
        log(f"throughput: starting {args.tp_peers} peers, checkpoints {mode}")
        try:
            mesh.start(60.0)
            runs[mode] += asyncio.run(_tp_measure(mesh, args, log, f"checkpoints {mode}"))
        finally:
            _stop(mesh, args.keep_logs, f"throughput-{mode}-{len(runs[mode])}")
    off = statistics.median(r["rate"] for r in runs["off"])
    on = statistics.median(r["rate"] for r in runs["on"])
    off_cpu = statistics.median(r["per_cpu_s"] for r in runs["off"])
    on_cpu = statistics.median(r["per_cpu_s"] for r in runs["on"])
    return {
        "order": order,
        "runs": runs,
        "off_rate": off,
        "on_rate": on,
        "ratio": on / off,
        "off_per_cpu_s": off_cpu,
        "on_per_cpu_s": on_cpu,
        "ratio_cpu": on_cpu / off_cpu,
        "interval_s": args.tp_interval,
        "peers": args.tp_peers,
        "messages": -(-args.tp_messages // args.tp_keys) * args.tp_keys,
        "keys": args.tp_keys,
    }


# -- part 3: recovery after SIGKILL ---------------------------------------------------------------


async def _load(s: mp.Session, instances: int, rnd: int, timeout: float) -> float:
    """Write round ``rnd`` into every fill instance, one loader per peer; return the seconds."""
    n = s.mesh.peers
    loaders = [perf_app.ids_owned_by(p, n, s.maxp, "loader-")[0] for p in range(n)]
    bounds = [instances * d // n for d in range(n + 1)]
    triggers = [
        ckpt_app.trigger(lid, start=bounds[d], end=bounds[d + 1], chunk=999, round=rnd) for d, lid in enumerate(loaders)
    ]
    invocations = instances + sum(_loader_invocations(bounds[d], bounds[d + 1], 999) for d in range(n))

    async def start() -> None:
        await asyncio.gather(*(s.clients[perf_app.owner(t.target_id, n, s.maxp)].send(t) for t in triggers))

    r = await mp.timed_job(s, start, invocations, timeout, poll=0.05)
    return float(r["elapsed_s"])


async def _wait_manifests(mesh: mp.MeshProcesses, after: int, count: int, timeout: float) -> int:
    """Wait until ``count`` manifests newer than ``after`` exist; return the newest id."""
    deadline = time.monotonic() + timeout
    while True:
        newer = [n for n in _manifests(mesh) if n > after]
        if len(newer) >= count:
            return newer[-1]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {count} checkpoints after {after} within {timeout} s:\n{mesh.tail()}")
        await asyncio.sleep(0.1)


async def _kill_and_time(
    mesh: mp.MeshProcesses, client: MeshClient, probe_id: str, expected: str, timeout: float
) -> dict[str, Any]:
    """SIGKILL peer 1; time until a request to ``probe_id`` (on peer 1) is answered with ``expected``.

    A new request goes out every 50 ms (each may wait up to 2 s), so the first answer
    is seen within ~50 ms of the mesh processing again.
    """
    pids = _rescan(mesh)
    victim = pids[1]
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[float] = loop.create_future()
    errors: dict[str, int] = {}
    wrong: list[str] = []

    async def one() -> None:
        try:
            reply = await client.request(ckpt_app.probe(probe_id), timeout=2.0)
        except Exception as exc:  # a timeout or BrokenTransportError while the peer is down or recovering
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        now = time.monotonic()
        if reply.as_string() != expected:
            wrong.append(reply.as_string()[:40])
        elif not answered.done():
            answered.set_result(now)

    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    restarted_at: float | None = None
    tasks: set[asyncio.Task[None]] = set()
    try:
        while not answered.done():
            if time.monotonic() - t_kill > timeout:
                raise TimeoutError(f"peer 1's instances not answering {timeout} s after the kill:\n{mesh.tail()}")
            if restarted_at is None:
                new = _rescan(mesh).get(1)
                if new is not None and new != victim:
                    restarted_at = time.monotonic()
            t = asyncio.create_task(one())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(answered), 0.05)
    finally:
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if wrong:
        raise RuntimeError(f"peer 1's instance answered with other state than it held: {wrong[:3]}")
    t_ok = answered.result()
    return {
        "victim_pid": victim,
        "kill_to_answer_s": t_ok - t_kill,
        "kill_to_new_process_s": (restarted_at - t_kill) if restarted_at else None,
        "failed_requests": errors,
    }


_RESTORED = re.compile(
    r"peer (\d+): checkpoint \d+ restored \(([a-z ]+), (\d+) [a-z ]+\) in ([\d.]+) s, "
    r"([\d.]+) CPU-s"
)


def _restores(log_text: str) -> list[dict[str, Any]]:
    """Each peer's restores as it logged them: how ("rolled back" or "rebuilt"), entries, wall and CPU seconds."""
    return [
        {"peer": int(m[1]), "how": m[2], "entries": int(m[3]), "s": float(m[4]), "cpu_s": float(m[5])}
        for m in _RESTORED.finditer(log_text)
    ]


def _recovery_rounds(log_text: str) -> list[float]:
    out = []
    for line in log_text.splitlines():
        if "recovery round" in line and " done in " in line:
            with contextlib.suppress(ValueError, IndexError):
                out.append(float(line.rsplit(" done in ", 1)[1].split()[0]))
    return out


async def _recovery_measure(mesh: mp.MeshProcesses, args: argparse.Namespace, log: Log, mode: str) -> dict[str, Any]:
    s = mp.Session(mesh)
    await s.open()
    try:
        instances = instances_for(args.recovery_keys)
        n = mesh.peers
        t0 = time.monotonic()
        first = _manifests(mesh)
        load_s = await _load(s, instances, 0, args.recovery_timeout + 600)
        log(
            f"  {mode}: loaded {instances * ckpt_app.SPECS:,} keys in {load_s:.1f} s; waiting for a checkpoint "
            "that covers them"
        )
        # the checkpoint in progress when the load ended may have been cut before its end: wait for two
        at_load_end = max(_manifests(mesh) or [0])
        covering = await _wait_manifests(mesh, at_load_end, 2, 10 * args.recovery_interval + 300)
        log(
            f"  {mode}: checkpoint {covering} covers the state ({time.monotonic() - t0:.0f} s since the load "
            f"began, {len(_manifests(mesh))} manifests retained, {len(first)} before)"
        )
        probe_id = next(
            ckpt_app.fill_id(i) for i in range(instances) if perf_app.owner(ckpt_app.fill_id(i), n, s.maxp) == 1
        )
        expected = ckpt_app.value_for(probe_id, 0)
        before = await s.clients[0].request(ckpt_app.probe(probe_id), timeout=10.0)
        if before.as_string() != expected:
            raise RuntimeError("the probe instance does not hold the loaded state")
        disk_bytes = _state_bytes(mesh)
        kills = []
        for k in range(args.recovery_kills):
            rounds_before = len(_recovery_rounds(mesh.tail(10**9)))
            restores_before = len(_restores(mesh.tail(10**9)))
            in_force = _manifest(mesh, max(_manifests(mesh) or [0])) or {"parts": []}
            restored = [sum(o["size"] for o in p["chain"]) + p["inflight"]["size"] for p in in_force["parts"]]
            r = await _kill_and_time(mesh, s.clients[0], probe_id, expected, args.recovery_timeout)
            # the coordinator logs "recovery round g done in X s" when it sends RESUME
            deadline = time.monotonic() + 10
            while len(_recovery_rounds(mesh.tail(10**9))) <= rounds_before and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            rounds = _recovery_rounds(mesh.tail(10**9))[rounds_before:]
            r["recovery_rounds_s"] = rounds
            r["restores"] = _restores(mesh.tail(10**9))[restores_before:]
            r["restored_bytes_per_peer"] = restored
            if r["kill_to_new_process_s"] is not None and rounds:
                # python start-up, opening the stores, and the heartbeat that tells the coordinator
                r["new_process_to_round_s"] = r["kill_to_answer_s"] - r["kill_to_new_process_s"] - sum(rounds)
            log(
                f"  {mode}: kill {k + 1}/{args.recovery_kills}: answered {r['kill_to_answer_s']:.2f} s after the "
                f"SIGKILL (new process after {r['kill_to_new_process_s'] or float('nan'):.2f} s; recovery "
                f"round(s) {', '.join(f'{x:.2f}' for x in rounds)} s; restores: "
                + "; ".join(
                    f"peer {x['peer']} {x['how']} {x['entries']:,} in {x['s']:.2f} s ({x['cpu_s']:.2f} CPU-s)"
                    for x in r["restores"]
                )
                + ")"
            )
            kills.append(r)
            if k + 1 < args.recovery_kills:  # settle: the mesh checkpoints again before the next kill
                await _wait_manifests(mesh, max(_manifests(mesh) or [0]), 1, 10 * args.recovery_interval + 120)
        return {
            "mode": mode,
            "keys": instances * ckpt_app.SPECS,
            "peers": n,
            "load_s": load_s,
            "disk_bytes": disk_bytes,
            "kills": kills,
            "median_kill_to_answer_s": statistics.median(k["kill_to_answer_s"] for k in kills),
        }
    finally:
        await s.close()


def _state_bytes(mesh: mp.MeshProcesses) -> dict[str, int]:
    """Sizes on disk: the blob store's objects and every peer's local copies."""

    def du(path: Path) -> int:
        total = 0
        for dirpath, _, files in os.walk(path):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(dirpath, f))
        return total

    out = {"blob_store": du(mesh.state_dir / "checkpoints" / "objects")}
    for k in range(mesh.peers):
        out[f"peer-{k}.checkpoints"] = du(mesh.state_dir / f"peer-{k}.checkpoints")
        out[f"peer-{k} lmdb"] = du(mesh.state_dir / f"peer-{k}")
    return out


def run_recovery(args: argparse.Namespace, log: Log) -> list[dict[str, Any]]:
    results = []
    for mode in args.modes:
        cfg = Path(tempfile.mkstemp(prefix="statefun-mesh-ckperf-", suffix=".toml")[1])
        cfg.write_text(f"local_recovery = {'true' if mode == 'local' else 'false'}\n")
        mesh = mp.MeshProcesses(
            _mesh_args(args.recovery_interval, str(cfg)), args.recovery_peers, "c", log, app_ref=CKPT_APP_REF
        )
        # info: each peer logs how it restored ("rolled back" in place or "rebuilt") and how long it took
        mesh.cmd[mesh.cmd.index("--log-level") + 1] = "info"
        log(f"recovery ({mode}): starting {args.recovery_peers} peers, a checkpoint every {args.recovery_interval} s")
        try:
            mesh.start(60.0)
            results.append(asyncio.run(_recovery_measure(mesh, args, log, mode)))
        finally:
            _stop(mesh, args.keep_logs, f"recovery-{mode}")
            cfg.unlink(missing_ok=True)
    return results


# -- output -----------------------------------------------------------------------------------------


def _mb(b: float) -> str:
    return f"{b / 1e6:,.3f}"


def print_tables(res: dict[str, Any]) -> None:
    out = print
    if "deltas" in res:
        out(
            "\n== checkpoint duration and bytes uploaded (LocalMesh, file:// blob store; deltas: median of "
            f"{res['args']['delta_repeat']}) ==\n"
        )
        out(
            "| keys | checkpoint | changed keys | state object MB | uploaded MB | delta / base bytes "
            "| trigger→manifest s | peer upload s | writing the changes s |"
        )
        out("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for size in res["deltas"]:
            b = size["base"]
            out(
                f"| {size['keys']:,} | base | {size['entries']:,} entries | {_mb(b['state_bytes'])} "
                f"| {_mb(b['uploaded_bytes'])} | 100 % | {b['wall_s']:.3f} | {b['upload_s']:.3f} "
                f"| {size['load_s']:.2f} (load) |"
            )
            for r in size["deltas"]:
                ws = statistics.median(s["write_s"] for s in r["samples"])
                out(
                    f"| {size['keys']:,} | delta, {r['fraction']:.0%} | {r['changed_keys']:,} "
                    f"| {_mb(r['state_bytes'])} | {_mb(r['uploaded_bytes'])} | {r['delta_over_base']:.2%} "
                    f"| {r['wall_s']:.3f} | {r['upload_s']:.3f} | {ws:.2f} |"
                )
    if "throughput" in res:
        t = res["throughput"]
        out(
            f"\n== counter throughput, {t['peers']} peer processes, {t['messages']:,} increments over {t['keys']:,} "
            f"keys per run; mesh order {','.join(t['order'])} ==\n"
        )
        out(
            "| checkpoints | runs: increments/s | median | per peer-CPU-s (median) | checkpoints per run "
            "| seconds per checkpoint |"
        )
        out("|---|---|---:|---:|---|---|")
        for mode, label in (("off", "none"), ("on", f"every {t['interval_s']:g} s")):
            rs = t["runs"][mode]
            rates = ", ".join(format(r["rate"], ",.0f") for r in rs)
            cks = ", ".join(str(r["checkpoints_completed"]) for r in rs)
            every = ", ".join(
                format(r["elapsed_s"] / r["checkpoints_completed"], ".2f") if r["checkpoints_completed"] else "-"
                for r in rs
            )
            out(f"| {label} | {rates} | {t[mode + '_rate']:,.0f} | {t[mode + '_per_cpu_s']:,.0f} | {cks} | {every} |")
        rows = [row for r in t["runs"]["on"] for row in r["checkpoint_objects"]["rows"]]
        if rows:
            med = {
                k: statistics.median(row[k] for row in rows)
                for k in ("state_entries", "state_bytes", "inflight_entries", "inflight_bytes")
            }
            out(
                f"\nobjects per peer and checkpoint during the 'on' runs (median of {len(rows)}): state "
                f"{med['state_entries']:,.0f} entries / {med['state_bytes'] / 1e3:,.0f} kB, in flight "
                f"{med['inflight_entries']:,.0f} messages / {med['inflight_bytes'] / 1e3:,.0f} kB"
            )
        out(
            f"\nwith / without checkpoints: {t['ratio']:.3f} wall-clock ({(t['ratio'] - 1):+.1%}), "
            f"{t['ratio_cpu']:.3f} per CPU-second ({(t['ratio_cpu'] - 1):+.1%}); aim: >= 0.90"
        )
    if "recovery" in res:
        out("\n== SIGKILL of peer 1 -> first request to one of its instances answered ==\n")
        out(
            "| restore from | keys | peers | kill → answered s (each kill) | kill → new process s "
            "| new process → recovery round s | recovery round s | restored per peer MB |"
        )
        out("|---|---:|---:|---|---|---|---|---|")
        for r in res["recovery"]:
            label = "local copies" if r["mode"] == "local" else "blob store only"
            ks = r["kills"]
            answered = ", ".join(format(k["kill_to_answer_s"], ".2f") for k in ks)
            restarted = ", ".join(format(k["kill_to_new_process_s"] or float("nan"), ".2f") for k in ks)
            rounds = ", ".join("+".join(format(x, ".2f") for x in k["recovery_rounds_s"]) or "?" for k in ks)
            between = ", ".join(format(k.get("new_process_to_round_s", float("nan")), ".2f") for k in ks)
            restored = ", ".join("/".join(format(b / 1e6, ".1f") for b in k["restored_bytes_per_peer"]) for k in ks)
            out(
                f"| {label} | {r['keys']:,} | {r['peers']} | {answered} | {restarted} | {between} | {rounds} "
                f"| {restored} |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_defaults(args)
    if any(s < 1 for s in args.sizes) or any(not 0 <= f <= 1 for f in args.fractions):
        parser.error("--sizes must be positive and --fractions within 0..1")
    if args.recovery_peers < 2:
        parser.error("--recovery-peers must be at least 2 (peer 1 is the one killed)")
    if (
        min(
            args.delta_peers,
            args.tp_peers,
            args.delta_repeat,
            args.tp_repeat,
            args.tp_rounds,
            args.recovery_kills,
            args.tp_messages,
            args.tp_keys,
            args.recovery_keys,
        )
        < 1
    ):
        parser.error("counts must be positive")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    info = mp.machine()
    info["core"] = IMPLEMENTATION
    log(
        f"checkpoint_perf: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {IMPLEMENTATION} core, "
        f"load {info['loadavg'][0]:.2f}"
    )
    res: dict[str, Any] = {"args": vars(args)}
    t_start = time.monotonic()
    status = 0
    with mp._terminate_on_sigterm():
        try:
            if "deltas" in args.parts:
                log("deltas: in-process LocalMesh, checkpoints triggered by hand")
                res["deltas"] = asyncio.run(run_deltas(args, log))
            if "throughput" in args.parts:
                res["throughput"] = run_throughput(args, log)
            if "recovery" in args.parts:
                res["recovery"] = run_recovery(args, log)
        except KeyboardInterrupt:
            print("checkpoint_perf: interrupted; every mesh it started was stopped", file=sys.stderr)
            status = 130
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"checkpoint_perf: {exc}", file=sys.stderr)
            status = 1
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.monotonic() - t_start
    print_tables(res)
    print(
        f"\n{info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {IMPLEMENTATION} core, "
        f"{info['date_utc']}, load {info['loadavg'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, "
        f"{info['wall_s']:.0f} s"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"argv": sys.argv, "machine": info, "results": res}, fh, indent=1, default=str)
    return status


if __name__ == "__main__":
    sys.exit(main())
