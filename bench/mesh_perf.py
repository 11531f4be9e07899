"""Throughput and latency of a real mesh of peer processes (modelled on pyzmq's perf/perf.py).

Starts ``python -m statefun_mesh run bench.perf_app:functions --peers N`` (a fresh
temporary state directory, a free client port, checkpoints off unless asked) and
measures, for every core (``c``/``python``) and every peer count asked for:

* **counter**: throughput of a keyed counter (one ``IntType`` state over ``--keys``
  instances). The load comes from ``perf/driver`` functions inside the mesh, one per
  peer, which send ``--messages`` increments in chunks of ``--chunk`` (self-sends keep
  every batch bounded), so no client is on the measured path. Timed from the trigger
  to the moment the peers' own ``invocations`` counters (``MeshClient.info()``) reach
  the expected total.
* **chain**: ``--chains`` function-to-function chains of ``--chain-length`` hops in
  parallel, each hop a message to another instance (and usually another peer).
* **latency**: ``--requests`` sequential ``MeshClient.request`` calls to the counter,
  to instances the connected peer owns and (with several peers) to instances another
  peer owns (one forwarding hop each way), and a few through a whole chain; with the
  CPU time every process spent per request. The floor beside them is the same number
  of round trips to a bare zmq.asyncio echo process.
* **baselines**, in this process, on the same records as the counter run (msgpack frames
  of 1,000 records of the mesh's shape), each measured again right before every
  throughput run:

  - the **StateFun-shaped dispatch with no I/O** (:class:`StatefunShapedBaseline`,
    ``bench/sdk_shape.py``): per address what the official StateFun Python SDK does per
    request and invocation (storage of cells, context, ``Message``, the perf app's own
    counter function, mutations collected), with a dict for the store. Issue 9 states its
    ratio target against this. Every throughput is given as a ratio of it ("x base"), on
    wall-clock rates and on rates per CPU-second (what to compare between runs on a noisy
    machine);
  - the **trivial dispatch** (:class:`Baseline`): msgpack unpack and a dict increment per
    message, printed beside it as the floor of message handling in Python.

The "== targets ==" block at the end prints issue 9's targets, each MET or MISSED: >=
250,000 counter invocations/s per peer with checkpoints every 1 s and >= 0.40 of the
StateFun-shaped baseline (on CPU-second rates), the Cython core >= 2.5x the twin,
request->reply p99 < 1 ms to the owner and < 2 ms through another peer. The checkpoint
cost (<= 10 %) needs runs with and without checkpoints: ``bench/checkpoint_perf.py``.

``--profile DIR`` adds one more counter run and one more series of requests with
py-spy sampling every peer (kept out of the figures), and prints where the time goes.

Each count is checked: after the runs every counter instance must hold exactly the
increments it was sent (the latency requests read it), and every request must be
answered by the instance it was sent to.

Run from the repository root::

    python bench/mesh_perf.py                          # c and python cores, 1 and 2 peers, ipc
    python bench/mesh_perf.py --core c --peers 3 --transport tcp --json out.json
    python bench/mesh_perf.py --core c --peers 1 --profile /tmp/prof   # + py-spy, if installed
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/mesh_perf.py` puts bench/ first, not the root
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from bench import perf_app as app  # noqa: E402
from bench import sdk_shape  # noqa: E402
from statefun_mesh import MeshClient, ValueSpec, message_builder  # noqa: E402
from statefun_mesh.mesh import free_ports  # noqa: E402

APP_REF = "bench.perf_app:functions"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/mesh_perf.py",
        description=(
            "Measure a real statefun_mesh cluster: keyed-counter and chain throughput (load generated "
            "inside the mesh), request->reply latency, and two no-I/O baselines in this process: a "
            "StateFun-shaped Python dispatch (bench/sdk_shape.py; every 'x base' ratio and issue 9's ratio "
            "target divide by it) and a msgpack+trivial dispatch (printed beside it). "
            "Starts `python -m statefun_mesh run bench.perf_app:functions` once per core and peer count, "
            "and always stops it (and only it) on exit, error or Ctrl-C."
        ),
        epilog=(
            "Targets reported against (issue 9): >= 250,000 counter invocations/s per peer with checkpoints "
            "every 1 s and >= 0.40 of the StateFun-shaped baseline (rates per CPU-second), on the Cython core; "
            "the Cython core >= 2.5x the pure-Python twin; request->reply p99 < 1 ms to the owner peer and < 2 ms "
            "through another peer, at light load on loopback. See bench/RESULTS.md for recorded runs."
        ),
    )
    g = p.add_argument_group("the mesh")
    g.add_argument(
        "--peers",
        type=int,
        nargs="+",
        default=[1, 2],
        metavar="N",
        help="peer processes; several values run one mesh each (default: 1 2)",
    )
    g.add_argument("--transport", choices=["ipc", "tcp"], default="ipc", help="between the peers (default: ipc)")
    g.add_argument(
        "--core",
        choices=["c", "python", "both"],
        default="both",
        help="the peers' hot-path core: c (Cython), python (the pure-Python twin, "
        "STATEFUN_MESH_NO_EXTENSIONS=1) or both, one after the other (default: both)",
    )
    ck = g.add_mutually_exclusive_group()
    ck.add_argument(
        "--no-checkpoints",
        dest="checkpoint_interval",
        action="store_const",
        const=None,
        help="take no checkpoints (the default)",
    )
    ck.add_argument(
        "--checkpoint-interval",
        type=float,
        metavar="S",
        default=None,
        help="take a checkpoint every S seconds, to a file:// store in the temporary state directory",
    )
    g.add_argument(
        "--mesh-config",
        metavar="TOML",
        help="further mesh.toml settings (max_batch, linger, ...), passed on as `run --config`",
    )
    g.add_argument(
        "--no-keys",
        action="store_true",
        help="run the mesh without CURVE (default: with the keys `statefun-mesh run` makes)",
    )
    g.add_argument(
        "--start-timeout", type=float, default=60.0, metavar="S", help="for the mesh to come up (default: 60)"
    )
    w = p.add_argument_group("the work")
    w.add_argument(
        "--phases",
        nargs="+",
        choices=["counter", "chain", "latency"],
        default=["counter", "chain", "latency"],
        help="what to measure (default: all three)",
    )
    w.add_argument(
        "--messages",
        type=int,
        default=200_000,
        metavar="M",
        help="counter increments per run, rounded up to a multiple of --keys (default: 200000)",
    )
    w.add_argument("--keys", type=int, default=10_000, metavar="K", help="counter instances (default: 10000)")
    w.add_argument(
        "--chunk",
        type=int,
        default=999,
        metavar="C",
        help="increments a driver sends per invocation; with C + 1 = max_batch every batch is full (default: 999)",
    )
    w.add_argument("--chains", type=int, default=10_000, metavar="P", help="chains started together (default: 10000)")
    w.add_argument(
        "--chain-length", type=int, default=10, metavar="L", help=f"hops per chain, 1..{app.MAX_CHAIN} (default: 10)"
    )
    w.add_argument(
        "--repeat",
        type=int,
        default=3,
        metavar="R",
        help="runs of each throughput measurement; the tables show the median (default: 3)",
    )
    w.add_argument(
        "--requests",
        type=int,
        default=2_000,
        metavar="N",
        help="sequential requests per latency figure (default: 2000)",
    )
    w.add_argument(
        "--chain-requests",
        type=int,
        default=200,
        metavar="N",
        help="sequential requests through a whole chain (default: 200; 0: none)",
    )
    w.add_argument(
        "--phase-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="longest one measurement may take before the run fails (default: 120)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write every raw number (and the machine) to FILE")
    o.add_argument(
        "--profile",
        metavar="DIR",
        help="after the measurements, sample every peer with py-spy during one more counter run, "
        "keep the raw stacks in DIR and print the top functions (needs `pip install py-spy`)",
    )
    o.add_argument("--keep-logs", metavar="DIR", help="copy the launcher's stdout and the peers' log to DIR")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr, only the tables")
    return p


# -- processes -----------------------------------------------------------------------------


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


class MeshProcesses:
    """``statefun-mesh run`` in a session of its own, and the peer processes it starts.

    :meth:`stop` sends SIGTERM to the launcher's process group (the launcher stops its
    peers), SIGKILLs that group if it lingers, then SIGKILLs any peer it left behind:
    only processes this object started, identified by pid *and* command line.
    """

    def __init__(
        self, args: argparse.Namespace, peers: int, core: str, log: Callable[[str], None], app_ref: str = APP_REF
    ) -> None:
        self.peers = peers
        self.core = core
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="statefun-mesh-perf-"))
        self.state_dir = self.workdir / "state"
        self.endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        self.out_path = self.workdir / "launcher.out"
        self.err_path = self.workdir / "launcher.err"
        cmd = [
            sys.executable,
            "-m",
            "statefun_mesh",
            "run",
            app_ref,
            "--peers",
            str(peers),
            "--transport",
            args.transport,
            "--client-endpoint",
            self.endpoint,
            "--state-dir",
            str(self.state_dir),
            "--log-level",
            "warning",
        ]
        if args.checkpoint_interval is None:
            cmd.append("--no-checkpoints")
        else:
            cmd += ["--checkpoint-interval", str(args.checkpoint_interval)]
        if args.mesh_config:
            cmd += ["--config", os.path.abspath(args.mesh_config)]
        if getattr(args, "no_keys", False):
            cmd.append("--no-keys")
        self.cmd = cmd
        env = dict(os.environ)
        env.pop("STATEFUN_MESH_ENDPOINT", None)
        env.pop("STATEFUN_MESH_NO_EXTENSIONS", None)
        env.pop("STATEFUN_MESH_REQUIRE_EXTENSIONS", None)
        if core == "python":
            env["STATEFUN_MESH_NO_EXTENSIONS"] = "1"
        else:
            env["STATEFUN_MESH_REQUIRE_EXTENSIONS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        #: peer id -> (pid, command line), as seen while the launcher was their parent
        self.peer_procs: dict[int, tuple[int, list[str]]] = {}

    def start(self, timeout: float) -> None:
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while "is up" not in self.out_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the mesh exited with code {self.proc.returncode} before it was up:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the mesh was not up within {timeout} s:\n{self.tail()}")
            time.sleep(0.05)
        while len(self.peer_procs) < self.peers:
            for entry in os.listdir("/proc"):
                if entry.isdigit() and _ppid(int(entry)) == self.proc.pid:
                    cmd = _cmdline(int(entry))
                    if "peer" in cmd and "--id" in cmd:
                        self.peer_procs[int(cmd[cmd.index("--id") + 1])] = (int(entry), cmd)
            if len(self.peer_procs) < self.peers:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"found {len(self.peer_procs)} of {self.peers} peer processes")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        return [self.peer_procs[k][0] for k in sorted(self.peer_procs)]

    def tail(self, n: int = 3000) -> str:
        try:
            return self.err_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 20.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.log(f"the launcher (pid {proc.pid}) did not stop within {grace} s; killing its process group")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # The launcher starts every peer in a session of its own: a launcher that had to be
        # killed leaves them behind. Kill those (their own groups), if they are still ours.
        for pid, cmd in self.peer_procs.values():
            if _alive(pid) and _cmdline(pid) == cmd:
                self.log(f"peer pid {pid} outlived the launcher; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)

    def cleanup(self, keep_logs: str | None) -> None:
        if keep_logs:
            dest = Path(keep_logs) / f"{self.core}-{self.peers}peers"
            dest.mkdir(parents=True, exist_ok=True)
            for f in (self.out_path, self.err_path):
                if f.exists():
                    shutil.copy(f, dest / f.name)
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- the baseline ----------------------------------------------------------------------------


def counter_frames(messages: int, keys: int, increment: Callable[[int], int] | None = None) -> list[bytes]:
    """The counter workload as the mesh carries it: msgpack frames of 1,000 records of the mesh's
    shape (``[typename, id, caller_typename, caller_id, value_typename, value, reply_peer,
    request_id]``), increment ``i`` to counter ``i % keys``, its value ``increment(i)`` (default 1)."""
    vt = app.IntType.typename
    ser = app.IntType.serializer()
    one = ser.serialize(1)
    frames = []
    for start in range(0, messages, 1000):
        recs = [
            [
                app.COUNTER,
                app.counter_id(i % keys),
                "",
                "",
                vt,
                one if increment is None else ser.serialize(increment(i)),
                0,
                0,
            ]
            for i in range(start, min(start + 1000, messages))
        ]
        frames.append(msgpack.packb(recs, use_bin_type=True))
    return frames


class _Rates:
    """Rounds of one baseline: messages per second and per CPU-second."""

    what = ""

    def __init__(self, messages: int) -> None:
        self.messages = messages
        self.frames: list[bytes] = []
        self.rates: list[float] = []
        self.cpu_rates: list[float] = []

    def _round(self) -> None:
        raise NotImplementedError

    def _check(self) -> None:
        """After a round, outside its timing: raise unless it did all its work."""

    def run(self, rounds: int = 1) -> tuple[float, float]:
        """Best messages per second and per CPU-second of ``rounds`` rounds (all kept)."""
        best = best_cpu = 0.0
        for _ in range(rounds):
            c0, t0 = time.process_time(), time.perf_counter()
            self._round()
            rate = self.messages / (time.perf_counter() - t0)
            rate_cpu = self.messages / max(time.process_time() - c0, 1e-6)
            self._check()
            self.rates.append(rate)
            self.cpu_rates.append(rate_cpu)
            best, best_cpu = max(best, rate), max(best_cpu, rate_cpu)
        return best, best_cpu

    def summary(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "messages": self.messages,
            "frames": len(self.frames),
            "rounds": self.rates,
            "median": statistics.median(self.rates),
            "best": max(self.rates),
            "cpu_rounds": self.cpu_rates,
            "median_per_cpu_s": statistics.median(self.cpu_rates),
        }


class Baseline(_Rates):
    """The trivial baseline: msgpack-unpack ``messages`` messages (in 1,000-message frames) and
    dispatch each one to a trivial function, in this process.

    The records have the mesh's shape (``[typename, id, caller_typename, caller_id,
    value_typename, value, reply_peer, request_id]``), the counter's ids and values; the
    dispatch looks the function up by type name and calls it with the id and value, and the
    function counts the message in a dict. No state, no objects a function sees: a floor of
    message handling in Python, printed beside :class:`StatefunShapedBaseline`, which is what
    the ratios divide by.
    """

    what = "msgpack unpack + trivial dispatch"

    def __init__(self, messages: int, keys: int) -> None:
        super().__init__(messages)
        self.frames = counter_frames(messages, keys)
        self.counts: dict[str, int] = collections.defaultdict(int)

    def _round(self) -> None:
        counts = self.counts
        counts.clear()

        def count(id: str, value: bytes) -> None:
            counts[id] += 1

        table = {app.COUNTER: count}

        def dispatch(rec: list[Any]) -> None:
            table[rec[0]](rec[1], rec[5])

        unpackb = msgpack.unpackb
        for frame in self.frames:
            for rec in unpackb(frame):
                dispatch(rec)

    def _check(self) -> None:
        assert sum(self.counts.values()) == self.messages


class StatefunShapedBaseline(_Rates):
    """Issue 9's baseline: a StateFun-shaped Python dispatch with no I/O (``bench/sdk_shape.py``).

    Per 1,000-record frame (the same frames as :class:`Baseline`): msgpack-unpack, group by
    address, and per address do what the official StateFun Python SDK does for one request
    (function lookup, ``SdkAddress``, the state values wrapped in ``Cell``s of a storage
    generated per function, a context, per invocation a ``Message`` around a ``TypedValue``
    and the caller's address, the user's function, then the dirty cells collected as
    mutations), with a dict standing for the state store. The function is the perf app's
    own ``perf/counter`` (``bench/perf_app.py``), which reads ``context.storage.count``
    through the generated property (deserialized on every read by the mesh's ``IntType``
    serializer, as the SDK does) and ``message.as_int()``.

    No protobuf, no sockets, no disk, no durability: the ceiling of any faithful Python
    implementation of this API (bench/sdk_shape.py's docstring says exactly what is and is
    not done). The store persists across rounds, as a warmed-up peer's state does; after each
    round (outside its timing) the counts in it must have grown by exactly the increments sent.
    """

    what = "StateFun-shaped dispatch, no I/O"

    def __init__(
        self, messages: int, keys: int, increment: Callable[[int], int] | None = None, frames: list[bytes] | None = None
    ) -> None:
        super().__init__(messages)
        self.frames = frames if frames is not None else counter_frames(messages, keys, increment)
        self.functions = sdk_shape.registry([(app.COUNTER, app.counter, [ValueSpec(name="count", type=app.IntType)])])
        self.store: sdk_shape.Store = {}
        self._per_round = sum(
            app.IntType.serializer().deserialize(rec[5]) for f in self.frames for rec in msgpack.unpackb(f)
        )
        self.rounds_done = 0

    def _round(self) -> None:
        functions, store, dispatch = self.functions, self.store, sdk_shape.dispatch_frame
        done = 0
        for frame in self.frames:
            done += dispatch(functions, frame, store)
        if done != self.messages:
            raise RuntimeError(f"the StateFun-shaped baseline did {done} of {self.messages} invocations")
        self.rounds_done += 1

    def counts(self) -> dict[str, int]:
        """Counter id -> its count in the store."""
        de = app.IntType.serializer().deserialize
        return {id: de(v[1]) for (t, id, name), v in self.store.items() if t == app.COUNTER and name == "count"}

    def _check(self) -> None:
        total = sum(self.counts().values())
        if total != self._per_round * self.rounds_done:
            expected = self._per_round * self.rounds_done
            raise RuntimeError(f"the StateFun-shaped baseline's store holds {total} increments, not {expected}")


# -- measurements ----------------------------------------------------------------------------


class Session:
    """Clients of one running mesh: one per peer's client endpoint."""

    def __init__(self, mesh: MeshProcesses) -> None:
        self.mesh = mesh
        self.clients: list[MeshClient] = []
        self.info: dict[str, Any] = {}

    async def open(self) -> None:
        first = MeshClient(self.mesh.endpoint, timeout=10.0)
        self.info = await first.info()
        self.clients = [first] + [MeshClient(ep, timeout=10.0) for ep in self.info["client_endpoints"][1:]]

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()

    @property
    def maxp(self) -> int:
        return int(self.info["max_parallelism"])

    async def statuses(self) -> list[dict[str, Any]]:
        infos = await asyncio.gather(*(c.info() for c in self.clients))
        return [i["status"] for i in infos]


async def timed_job(
    s: Session, start: Callable[[], Awaitable[None]], invocations: int, timeout: float, poll: float = 0.005
) -> dict[str, Any]:
    """Run ``start`` and wait until the peers have done ``invocations`` more invocations."""
    pids = s.mesh.pids()
    before = await s.statuses()
    cpu0 = [cpu_seconds(pid) for pid in pids]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    target = sum(st["invocations"] for st in before) + invocations
    t0 = time.perf_counter()
    await start()
    while True:
        after = await s.statuses()
        done = sum(st["invocations"] for st in after)
        elapsed = time.perf_counter() - t0
        if done >= target:
            break
        if elapsed > timeout:
            raise TimeoutError(f"{target - done} of {invocations} invocations still to do after {timeout} s")
        await asyncio.sleep(poll)
    cpu1 = [cpu_seconds(pid) for pid in pids]
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    per_peer = []
    for b, a, c0, c1 in zip(before, after, cpu0, cpu1, strict=True):
        inv = a["invocations"] - b["invocations"]
        batches = a["batches"] - b["batches"]
        per_peer.append(
            {
                "peer": a["peer"],
                "invocations": inv,
                "batches": batches,
                "cpu_s": c1 - c0,
                "invocations_per_s": inv / elapsed,
                "cpu_share": (c1 - c0) / elapsed,
                "invocations_per_cpu_s": inv / (c1 - c0) if c1 > c0 else None,
                "mean_batch": inv / batches if batches else None,
                "failures": a["failures"] - b["failures"],
            }
        )
    return {
        "elapsed_s": elapsed,
        "status_invocations": sum(p["invocations"] for p in per_peer),
        "per_peer": per_peer,
        "bench_process_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
    }


def _drivers(s: Session, n: int) -> list[str]:
    return [app.ids_owned_by(p, n, s.maxp, "driver-")[0] for p in range(n)]


async def counter_run(s: Session, messages: int, keys: int, chunk: int, timeout: float) -> dict[str, Any]:
    """One counter throughput run: ``messages`` increments, generated by one driver per peer."""
    n = s.mesh.peers
    drivers = _drivers(s, n)
    bounds = [messages * d // n for d in range(n + 1)]
    driver_invocations = sum(-(-(bounds[d + 1] - bounds[d]) // chunk) for d in range(n))
    triggers = [
        app.trigger(app.DRIVER, did, start=bounds[d], end=bounds[d + 1], chunk=chunk, keys=keys)
        for d, did in enumerate(drivers)
    ]
    # each trigger enters through the peer that owns its driver
    starts = [s.clients[app.owner(t.target_id, n, s.maxp)] for t in triggers]

    async def start() -> None:
        await asyncio.gather(*(c.send(t) for c, t in zip(starts, triggers, strict=True)))

    r = await timed_job(s, start, messages + driver_invocations, timeout)
    r.update(
        messages=messages,
        driver_invocations=driver_invocations,
        rate=messages / r["elapsed_s"],
        status_rate=r["status_invocations"] / r["elapsed_s"],
    )
    r["rate_per_peer"] = r["rate"] / n
    return r


async def chain_run(s: Session, first: int, chains: int, length: int, timeout: float) -> dict[str, Any]:
    """One chain throughput run: ``chains`` chains of ``length`` hops, started by one starter per peer."""
    n = s.mesh.peers
    starters = [app.ids_owned_by(p, n, s.maxp, "chain-start-")[0] for p in range(n)]
    bounds = [chains * d // n for d in range(n + 1)]
    triggers = [
        app.trigger(app.CHAIN_START, sid, first=first + bounds[d], chains=bounds[d + 1] - bounds[d], length=length)
        for d, sid in enumerate(starters)
    ]
    starts = [s.clients[app.owner(t.target_id, n, s.maxp)] for t in triggers]

    async def start() -> None:
        await asyncio.gather(*(c.send(t) for c, t in zip(starts, triggers, strict=True)))

    hops = chains * length
    r = await timed_job(s, start, hops + n, timeout)
    r.update(
        chains=chains,
        length=length,
        hops=hops,
        rate=hops / r["elapsed_s"],
        status_rate=r["status_invocations"] / r["elapsed_s"],
    )
    r["rate_per_peer"] = r["rate"] / n
    return r


class CpuMeter:
    """CPU time the peers and this process spend over a stretch, per call."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peers0 = [cpu_seconds(p) for p in pids]
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.self0 = ru.ru_utime + ru.ru_stime

    def per_call_us(self, calls: int) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        peers = [(cpu_seconds(p) - c0) * 1e6 / calls for p, c0 in zip(self.pids, self.peers0, strict=True)]
        return {
            "peer_cpu_us_per_call": peers,
            "client_cpu_us_per_call": (ru.ru_utime + ru.ru_stime - self.self0) * 1e6 / calls,
        }


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    xs = sorted(samples_ns)

    def pct(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000

    return {
        "n": len(xs),
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": xs[-1] / 1000,
        "mean_us": statistics.fmean(xs) / 1000,
    }


async def request_latency(
    client: MeshClient, ids: list[str], n: int, expected: dict[str, int] | None, pids: list[int]
) -> tuple[dict[str, Any], int]:
    """``n`` sequential requests (after 50 unrecorded ones) reading counters ``ids``; returns
    the latency figures (with the CPU time each process spent per request) and the number of
    wrong answers."""
    msgs = [message_builder(app.COUNTER, id, int_value=0) for id in ids]
    wrong = 0
    samples: list[int] = []
    for i in range(50):
        await client.request(msgs[i % len(msgs)], timeout=10.0)
    cpu = CpuMeter(pids)
    for i in range(n):
        msg = msgs[i % len(msgs)]
        t0 = time.perf_counter_ns()
        reply = await client.request(msg, timeout=10.0)
        samples.append(time.perf_counter_ns() - t0)
        if reply.target_id != msg.target_id or (expected is not None and reply.as_int() != expected[msg.target_id]):
            wrong += 1
    return {**_percentiles(samples), **cpu.per_call_us(n)}, wrong


async def chain_latency(client: MeshClient, starter: str, n: int, length: int, pids: list[int]) -> dict[str, Any]:
    """``n`` sequential requests that each run one chain of ``length`` hops and wait for its last hop's reply."""
    samples: list[int] = []
    cpu: CpuMeter | None = None
    for i in range(n + 10):
        if i == 10:
            cpu = CpuMeter(pids)
        msg = app.trigger(app.CHAIN_START, starter, first=1_000_000 + i, chains=1, length=length)
        t0 = time.perf_counter_ns()
        reply = await client.request(msg, timeout=10.0)
        dt = time.perf_counter_ns() - t0
        if reply.target_typename != app.HOP:
            raise RuntimeError(f"chain request answered by {reply.target_typename}/{reply.target_id}")
        if i >= 10:
            samples.append(dt)
    assert cpu is not None
    return {**_percentiles(samples), **cpu.per_call_us(n)}


# -- profiling --------------------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"; keep "file.py:function"
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:]) if "statefun_mesh" in path else path.split("/")[-1]
    return f"{short}:{name}"


def summarize_raw_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Top functions (own and inclusive samples) and top lines of the main thread, from
    py-spy's ``--format raw`` output; shares are of the main thread's busy samples."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    total = other = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        raw_frames = stack.split(";")
        if not raw_frames[0].startswith("_run_module_as_main"):
            other += c  # another thread: the fsync worker of sync_interval, zmq's, ...
            continue
        frames = [_frame_name(f) for f in raw_frames]
        total += c
        own[frames[-1]] += c
        leaf = raw_frames[-1]
        lines[f"{frames[-1]}:{leaf.rstrip(')').rsplit(':', 1)[-1]}"] += c
        for f in set(frames):
            incl[f] += c
    if not total:
        return {"samples": 0, "other_thread_samples": other, "own": [], "inclusive": [], "lines": []}
    # frames on (nearly) every stack - runpy, asyncio.run, the event loop - say nothing
    inclusive = [(f, c, c / total) for f, c in incl.most_common() if c < 0.97 * total][:top]
    return {
        "samples": total,
        "other_thread_samples": other,
        "own": [(f, c, c / total) for f, c in own.most_common(top)],
        "inclusive": inclusive,
        "lines": [(f, c, c / total) for f, c in lines.most_common(top)],
    }


async def with_py_spy(
    s: Session, outdir: Path, tag: str, work: Callable[[], Awaitable[Any]], log: Callable[[str], None]
) -> tuple[Any, dict[int, Any] | None]:
    """Run ``work()`` while py-spy samples every peer; returns its result and each peer's summary."""
    if shutil.which("py-spy") is None:
        log("--profile: py-spy is not installed (pip install py-spy); skipped")
        return None, None
    outdir.mkdir(parents=True, exist_ok=True)
    spies = []
    for k, pid in enumerate(s.mesh.pids()):
        raw = outdir / f"{tag}-peer{k}.txt"
        spy = subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        spies.append((k, spy, raw))
    try:
        await asyncio.sleep(1.0)  # let py-spy attach
        result = await work()
    finally:
        for _, spy, _ in spies:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for _, spy, _ in spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(spy.pid, signal.SIGKILL)
                spy.wait(5)
    summaries: dict[int, Any] = {}
    for k, _, raw in spies:
        if raw.exists():
            summaries[k] = summarize_raw_profile(raw)
            summaries[k]["file"] = str(raw)
        else:
            log(f"--profile: py-spy wrote nothing for peer {k} (is ptrace allowed here?)")
    return result, summaries


# -- latency floor ------------------------------------------------------------------------------

_ECHO_SERVER = """
import asyncio, sys, zmq, zmq.asyncio
async def main():
    sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    sock.bind(sys.argv[1])
    print("ready", flush=True)
    while True:
        sock.send_multipart(await sock.recv_multipart(), flags=zmq.NOBLOCK)
asyncio.run(main())
"""


async def echo_floor(n: int) -> dict[str, Any]:
    """``n`` sequential round trips to a zmq.asyncio ROUTER that echoes, in another process: what any
    request over this machine's loopback and asyncio costs before a mesh does anything."""
    import zmq
    import zmq.asyncio

    ep = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SERVER, ep],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        if line.strip() != b"ready":
            raise RuntimeError("the echo server did not start")
        sock.connect(ep)
        payload = b"\x01\x11" + bytes(60)  # about a request's size
        samples: list[int] = []
        cpu: CpuMeter | None = None
        for i in range(n + 50):
            if i == 50:
                cpu = CpuMeter([proc.pid])
            t0 = time.perf_counter_ns()
            await sock.send(payload)
            await asyncio.wait_for(sock.recv(), 10)
            if i >= 50:
                samples.append(time.perf_counter_ns() - t0)
        assert cpu is not None
        return {**_percentiles(samples), **cpu.per_call_us(n)}
    finally:
        sock.close(0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# -- one mesh ---------------------------------------------------------------------------------


async def measure(mesh: MeshProcesses, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    s = Session(mesh)
    await s.open()
    try:
        statuses = await s.statuses()
        cores = {st["core"] for st in statuses}
        if cores != {mesh.core}:
            raise RuntimeError(f"asked for the {mesh.core} core, but the peers run {sorted(cores)}")
        n = mesh.peers
        res: dict[str, Any] = {"peers": n, "core": mesh.core, "pids": mesh.pids()}
        increments = 0

        log("  warm-up")
        await counter_run(s, args.keys, args.keys, args.chunk, args.phase_timeout)  # every key created once
        increments += args.keys
        await chain_run(s, 0, min(args.chains, 1000), args.chain_length, args.phase_timeout)
        chain_first = 1000

        log("  baselines (msgpack unpack + trivial dispatch; StateFun-shaped dispatch, no I/O; in this process)")
        trivial = Baseline(args.messages, args.keys)
        base = StatefunShapedBaseline(args.messages, args.keys)
        trivial.run(3)
        base.run(3)

        def baselines() -> tuple[tuple[float, float], tuple[float, float]]:
            """Both, right before a run (the machine's speed at that moment): (shaped, trivial)."""
            return base.run(2), trivial.run(2)

        if "counter" in args.phases:
            runs = []
            for i in range(args.repeat):
                b, bt = baselines()
                r = await counter_run(s, args.messages, args.keys, args.chunk, args.phase_timeout)
                _ratios(r, b, bt)
                increments += args.messages
                log(f"  counter run {i + 1}/{args.repeat}: {r['rate']:,.0f} increments/s ({r['elapsed_s']:.2f} s)")
                runs.append(r)
            res["counter"] = _summary(runs)
        if "chain" in args.phases:
            runs = []
            for i in range(args.repeat):
                b, bt = baselines()
                r = await chain_run(s, chain_first, args.chains, args.chain_length, args.phase_timeout)
                _ratios(r, b, bt)
                chain_first += args.chains
                log(f"  chain run {i + 1}/{args.repeat}: {r['rate']:,.0f} hops/s ({r['elapsed_s']:.2f} s)")
                runs.append(r)
            res["chain"] = _summary(runs)
        res["baseline"] = base.summary()
        res["baseline_trivial"] = trivial.summary()

        if args.profile:
            log("  profiled counter run (py-spy on every peer; not part of the figures)")
            tag = f"{mesh.core}-{n}peers"
            run, prof = await with_py_spy(
                s,
                Path(args.profile),
                f"{tag}-counter",
                lambda: counter_run(s, args.messages, args.keys, args.chunk, args.phase_timeout),
                log,
            )
            if prof is not None:
                increments += args.messages
                res["profile"] = {"rate_while_profiled": run["rate"], "peers": prof}

        if "latency" in args.phases:
            per_key = increments // args.keys
            expected = collections.defaultdict(lambda: per_key)
            log(f"  latency floor: {args.requests} round trips to a zmq.asyncio echo process")
            res["latency_floor"] = await echo_floor(args.requests)
            own_ids = [app.counter_id(i) for i in range(args.keys) if app.owner(app.counter_id(i), n, s.maxp) == 0]
            log(f"  latency: {args.requests} requests to counters peer 0 owns")
            res["latency_owner"], wrong = await request_latency(
                s.clients[0], own_ids[:500], args.requests, expected, mesh.pids()
            )
            if n > 1:
                far_ids = [app.counter_id(i) for i in range(args.keys) if app.owner(app.counter_id(i), n, s.maxp) == 1]
                log(f"  latency: {args.requests} requests through peer 0 to counters peer 1 owns")
                res["latency_forwarded"], w2 = await request_latency(
                    s.clients[0], far_ids[:500], args.requests, expected, mesh.pids()
                )
                wrong += w2
            if args.chain_requests:
                starter = app.ids_owned_by(0, n, s.maxp, "chain-start-")[0]
                log(f"  latency: {args.chain_requests} requests through a chain of {args.chain_length} hops")
                res["latency_chain"] = await chain_latency(
                    s.clients[0], starter, args.chain_requests, args.chain_length, mesh.pids()
                )
            if args.profile:
                log("  profiled owner-peer requests (py-spy on every peer; not part of the figures)")
                ids = own_ids[:500]
                _, prof = await with_py_spy(
                    s,
                    Path(args.profile),
                    f"{mesh.core}-{n}peers-requests",
                    lambda: request_latency(s.clients[0], ids, args.requests, None, mesh.pids()),
                    log,
                )
                if prof is not None:
                    res["profile_requests"] = {"peers": prof}
            res["wrong_answers"] = wrong
            res["expected_count_per_key"] = per_key
            if wrong:
                raise RuntimeError(f"{wrong} requests returned a count other than the {per_key} increments sent")
        final = await s.statuses()
        res["failures"] = sum(st["failures"] for st in final)
        res["bad_frames"] = sum(st["bad_frames"] for st in final)
        if res["failures"] or res["bad_frames"]:
            raise RuntimeError(f"the peers report {res['failures']} failed invocations, {res['bad_frames']} bad frames")
        return res
    finally:
        await s.close()


def _ratios(run: dict[str, Any], baseline: tuple[float, float], trivial: tuple[float, float] | None = None) -> None:
    """Add the run's ratios to the StateFun-shaped baseline (``baseline``; and to the trivial one,
    ``*_trivial``): wall-clock rates, and rates per CPU-second (the peers' summed CPU time against
    the baseline loop's), which a busy machine disturbs much less."""
    work = run.get("messages") or run["hops"]
    cpu = sum(p["cpu_s"] for p in run["per_peer"])
    run["baseline"], run["baseline_per_cpu_s"] = baseline
    run["ratio"] = run["rate"] / baseline[0]
    run["rate_per_cpu_s"] = work / cpu if cpu > 0 else None
    run["ratio_cpu"] = run["rate_per_cpu_s"] / baseline[1] if run["rate_per_cpu_s"] else None
    if trivial is not None:
        run["baseline_trivial"], run["baseline_trivial_per_cpu_s"] = trivial
        run["ratio_trivial"] = run["rate"] / trivial[0]
        run["ratio_cpu_trivial"] = run["rate_per_cpu_s"] / trivial[1] if run["rate_per_cpu_s"] else None


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, range and the median run (the one closest to the median rate)."""
    rates = [r["rate"] for r in runs]
    med = statistics.median(rates)
    mid = min(runs, key=lambda r: abs(r["rate"] - med))
    ratios = [r["ratio"] for r in runs]
    cpu_ratios = [r["ratio_cpu"] for r in runs if r["ratio_cpu"]]
    per_cpu = [r["rate_per_cpu_s"] for r in runs if r["rate_per_cpu_s"]]
    return {
        "runs": runs,
        "median_rate": med,
        "min_rate": min(rates),
        "max_rate": max(rates),
        "median_rate_per_peer": med / len(mid["per_peer"]),
        "ratio_to_baseline": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "median_run": mid,
        "median_rate_per_cpu_s": statistics.median(per_cpu) if per_cpu else None,
        "cpu_ratio_to_baseline": statistics.median(cpu_ratios) if cpu_ratios else None,
        "min_cpu_ratio": min(cpu_ratios, default=None),
        "max_cpu_ratio": max(cpu_ratios, default=None),
        "cpu_ratio_to_trivial": statistics.median(t)
        if (t := [r["ratio_cpu_trivial"] for r in runs if r.get("ratio_cpu_trivial")])
        else None,
    }


# -- output -----------------------------------------------------------------------------------


def _n(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    out = sys.stdout.write
    ck = "off" if args.checkpoint_interval is None else f"every {args.checkpoint_interval} s"
    out(
        f"\n== summary: {args.transport}, checkpoints {ck}; throughput = median of {args.repeat} runs; x base = "
        "ratio to the StateFun-shaped no-I/O dispatch (bench/sdk_shape.py) run just before, on wall-clock rates "
        "(wall) and on rates per CPU-second (cpu) ==\n"
    )
    out(
        f"{'core':<7}{'peers':>5} |{'counter/s':>10}{'/peer':>9}{'/CPU-s':>9}{'wall':>7}{'cpu':>7} |"
        f"{'chain hop/s':>12}{'wall':>7}{'cpu':>7} |{'floor p50/p99 us':>18}{'owner p50/p99 us':>18}"
        f"{'fwd p50/p99 us':>17}{'chain p50/p99 us':>18}\n"
    )
    for r in results:
        c, ch = r.get("counter"), r.get("chain")
        lat = []
        for key in ("latency_floor", "latency_owner", "latency_forwarded", "latency_chain"):
            v = r.get(key)
            lat.append(f"{v['p50_us']:,.0f} / {v['p99_us']:,.0f}" if v else "-")
        out(
            f"{r['core']:<7}{r['peers']:>5} |"
            f"{_n(c and c['median_rate']):>10}{_n(c and c['median_rate_per_peer']):>9}"
            f"{_n(c and c['median_rate_per_cpu_s']):>9}{_n(c and c['ratio_to_baseline'], '.3f'):>7}"
            f"{_n(c and c['cpu_ratio_to_baseline'], '.3f'):>7} |"
            f"{_n(ch and ch['median_rate']):>12}{_n(ch and ch['ratio_to_baseline'], '.3f'):>7}"
            f"{_n(ch and ch['cpu_ratio_to_baseline'], '.3f'):>7} |"
            f"{lat[0]:>18}{lat[1]:>18}{lat[2]:>17}{lat[3]:>18}\n"
        )

    for r in results:
        n = r["peers"]
        out(
            f"\n== core {r['core']}, {n} peer process{'es' if n > 1 else ''} over {args.transport}, "
            f"checkpoints {ck} ==\n"
        )
        for key, label in (
            ("baseline", "x base: StateFun-shaped dispatch, no I/O"),
            ("baseline_trivial", "beside: msgpack unpack + trivial dispatch"),
        ):
            b = r[key]
            out(
                f"{label + ', in 1 process:':<54}{b['median']:>10,.0f} msg/s, {b['median_per_cpu_s']:>10,.0f} "
                f"per CPU-s (medians of {len(b['rounds'])} rounds; wall {min(b['rounds']):,.0f}-{b['best']:,.0f})\n"
            )
        rows = []
        if "counter" in r:
            rows.append(("counter", f"{args.messages:,} increments over {args.keys:,} keys", r["counter"]))
        if "chain" in r:
            rows.append(("chain", f"{args.chains:,} chains x {args.chain_length} hops", r["chain"]))
        if rows:
            out(
                f"\n{'throughput':<46}{'total/s':>10}{'per peer/s':>12}{'per CPU-s':>11}{'x base wall':>19}"
                f"{'x base cpu':>19}{'total/s range':>20}\n"
            )
            for name, what, c in rows:
                label = f"{name} ({what})"
                out(
                    f"{label:<46}{c['median_rate']:>10,.0f}{c['median_rate_per_peer']:>12,.0f}"
                    f"{_n(c['median_rate_per_cpu_s']):>11}"
                    f"{c['ratio_to_baseline']:>7.3f} ({c['min_ratio']:.3f}-{c['max_ratio']:.3f})"
                    f"{_n(c['cpu_ratio_to_baseline'], '.3f'):>7} ({_n(c['min_cpu_ratio'], '.3f')}-"
                    f"{_n(c['max_cpu_ratio'], '.3f')}){c['min_rate']:>11,.0f}-{c['max_rate']:<8,.0f}\n"
                )
            for name, _, c in rows:
                m = c["median_run"]
                out(
                    f"\n{name}, median run ({m['elapsed_s']:.2f} s), per peer:"
                    f"{'invocations/s':>15}{'CPU %':>7}{'inv/CPU-s':>11}{'batches':>9}{'mean batch':>12}\n"
                )
                for p in m["per_peer"]:
                    out(
                        f"{'peer ' + str(p['peer']):>{len(name) + 30}}{p['invocations_per_s']:>15,.0f}"
                        f"{100 * p['cpu_share']:>7.0f}{_n(p['invocations_per_cpu_s']):>11}{p['batches']:>9,}"
                        f"{_n(p['mean_batch']):>12}\n"
                    )
                out(
                    f"  (the peers' own counters include the {'drivers' if name == 'counter' else 'chain starters'}: "
                    f"{m['status_rate']:,.0f} invocations/s; this process used {m['bench_process_cpu_s']:.2f} CPU-s)\n"
                )
        lat = [
            (k, v)
            for k, v in (
                (f"floor: zmq.asyncio echo process ({args.requests:,})", r.get("latency_floor")),
                (f"counter, owner peer ({args.requests:,} requests)", r.get("latency_owner")),
                (f"counter, through another peer ({args.requests:,})", r.get("latency_forwarded")),
                (f"chain of {args.chain_length} hops ({args.chain_requests:,})", r.get("latency_chain")),
            )
            if v
        ]
        if lat:
            out(
                f"\n{'request -> reply, sequential, light load':<46}{'p50 us':>9}{'p90 us':>9}{'p99 us':>9}"
                f"{'max us':>9}   CPU us per request: peers / this process\n"
            )
            for label, v in lat:
                cpu = ""
                if "peer_cpu_us_per_call" in v:
                    cpu = (
                        " + ".join(f"{c:,.0f}" for c in v["peer_cpu_us_per_call"])
                        + f" / {v['client_cpu_us_per_call']:,.0f}"
                    )
                out(
                    f"{label:<46}{v['p50_us']:>9,.0f}{v['p90_us']:>9,.0f}{v['p99_us']:>9,.0f}{v['max_us']:>9,.0f}"
                    f"   {cpu}\n"
                )
            out(f"(every counter read returned the {r['expected_count_per_key']} increments it was sent)\n")
        for key, what in (("profile", "a counter run"), ("profile_requests", "owner-peer requests")):
            prof = r.get(key)
            if not prof:
                continue
            for k, p in sorted(prof["peers"].items()):
                rate = f" at {prof['rate_while_profiled']:,.0f}/s" if "rate_while_profiled" in prof else ""
                out(
                    f"\npy-spy, peer {k}, during {what}{rate}: {p['samples']} main-thread samples "
                    f"({p['other_thread_samples']} in other threads)\n"
                    f"  {'own time, by function':<63} {'inclusive':<63} own time, by line\n"
                )
                for (fo, _, so), (fi, _, si), (fl, _, sl) in zip(
                    p["own"][:12], p["inclusive"][:12], p["lines"][:12], strict=False
                ):
                    out(
                        f"  {100 * so:5.1f}%  {fo[:55]:<55}  {100 * si:5.1f}%  {fi[:55]:<55}  "
                        f"{100 * sl:5.1f}%  {fl[:60]}\n"
                    )

    out("\n== targets (issue 9) ==\n")
    for line in target_lines(results, args):
        out(line + "\n")


#: issue 9's targets
TARGET_PER_PEER: Final = 250_000
TARGET_RATIO: Final = 0.40
TARGET_C_OVER_TWIN: Final = 2.5
TARGET_P99_OWNER_US: Final = 1_000
TARGET_P99_FORWARDED_US: Final = 2_000


def target_lines(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """One line per target of issue 9 this run has figures for, each MET or MISSED with its figure.

    Counter: >= 250,000 invocations/s per peer with checkpoints every 1 s and >= 0.40 of the
    StateFun-shaped no-I/O baseline (on rates per CPU-second), on the Cython core; the Cython
    core >= 2.5x the twin (on the x-base ratios); request->reply p99 < 1 ms to the owner and
    < 2 ms through another peer. The checkpoint-cost target (<= 10 %) needs a run with and one
    without checkpoints: bench/checkpoint_perf.py measures it, not this script.
    """
    ok = {True: "MET", False: "MISSED"}
    lines: list[str] = []
    if args.checkpoint_interval != 1:
        ck = "off" if args.checkpoint_interval is None else f"every {args.checkpoint_interval} s"
        lines.append(f"(the counter targets are stated with checkpoints every 1 s; this run: checkpoints {ck})")
    for r in results:
        if r["core"] != "c":
            continue
        n = r["peers"]
        if "counter" in r:
            c = r["counter"]
            per_peer, ratio = c["median_rate_per_peer"], c["cpu_ratio_to_baseline"]
            lines.append(
                f">= {TARGET_PER_PEER:,} counter invocations/s per peer, {n} peer(s): "
                f"{ok[per_peer >= TARGET_PER_PEER]} ({per_peer:,.0f}/s per peer; "
                f"{_n(c['median_rate_per_cpu_s'])} per CPU-second of the peers)"
            )
            lines.append(
                f">= {TARGET_RATIO:.2f} of the StateFun-shaped no-I/O dispatch (cpu), {n} peer(s): "
                f"{ok[ratio is not None and ratio >= TARGET_RATIO]} ({_n(ratio, '.3f')}; wall "
                f"{c['ratio_to_baseline']:.3f})"
            )
        for key, what, limit in (
            ("latency_owner", "to the owner peer", TARGET_P99_OWNER_US),
            ("latency_forwarded", "through another peer", TARGET_P99_FORWARDED_US),
        ):
            if key in r:
                p99 = r[key]["p99_us"]
                lines.append(
                    f"request->reply p99 < {limit / 1000:g} ms {what}, {n} peer(s): {ok[p99 < limit]} ({p99:,.0f} us)"
                )
    by = {(r["core"], r["peers"]): r for r in results}
    for n in args.peers:
        c, py = by.get(("c", n)), by.get(("python", n))
        if not (c and py):
            continue
        for k in ("counter", "chain"):
            if k in c and k in py:
                cc, pc = c[k]["cpu_ratio_to_baseline"], py[k]["cpu_ratio_to_baseline"]
                wall = c[k]["ratio_to_baseline"] / py[k]["ratio_to_baseline"]
                cpu = cc / pc if cc and pc else None
                verdict = f"{ok[cpu is not None and cpu >= TARGET_C_OVER_TWIN]}: " if k == "counter" else ""
                lines.append(
                    f"Cython core >= {TARGET_C_OVER_TWIN:g}x the twin, {k}, {n} peer(s): {verdict}"
                    f"{_n(cpu, '.2f')}x on cpu ratios, {wall:.2f}x wall"
                )
    lines.append(
        "checkpoint cost <= 10 %: not measured here (one run has one checkpoint setting); see bench/checkpoint_perf.py"
    )
    return lines


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "loadavg": os.getloadavg(),
        "git_commit": commit,
    }


# -- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Handle SIGTERM and SIGHUP as Ctrl-C, so the same cleanup runs.

    They are turned into SIGINT, which ``asyncio.run`` handles by cancelling the
    measurement (its ``finally`` blocks run) before raising ``KeyboardInterrupt``.
    SIGINT itself gets Python's default handler back, in case this was started as a
    background job (which ignores it).
    """

    def handler(_signum: int, _frame: object) -> None:
        signal.raise_signal(signal.SIGINT)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.keys < 1 or args.messages < 1 or args.chunk < 1 or args.repeat < 1 or args.chains < 1:
        parser.error("--keys, --messages, --chunk, --repeat and --chains must be positive")
    if not 1 <= args.chain_length <= app.MAX_CHAIN:
        parser.error(f"--chain-length must be in 1..{app.MAX_CHAIN}")
    if any(n < 1 for n in args.peers):
        parser.error("--peers must be positive")
    args.messages = -(-args.messages // args.keys) * args.keys  # every key gets the same count
    cores = ["c", "python"] if args.core == "both" else [args.core]

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    info = machine()
    log(f"mesh_perf: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, load {info['loadavg'][0]:.2f}")
    results: list[dict[str, Any]] = []
    t_start = time.monotonic()
    status = 0
    with _terminate_on_sigterm():
        try:
            for core in cores:
                for n in args.peers:
                    mesh = MeshProcesses(args, n, core, log)
                    log(f"starting {n} peer(s), {core} core, {args.transport}")
                    try:
                        mesh.start(args.start_timeout)
                        results.append(asyncio.run(measure(mesh, args, log)))
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        print(
                            f"mesh_perf: {core} core, {n} peers: {exc}\n--- launcher log tail ---\n{mesh.tail()}",
                            file=sys.stderr,
                        )
                        status = 1
                    finally:
                        mesh.stop()
                        mesh.cleanup(args.keep_logs)
        except KeyboardInterrupt:
            print("mesh_perf: interrupted; the mesh was stopped", file=sys.stderr)
            status = 130
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = time.monotonic() - t_start
    if results:
        print_tables(results, args)
    print(
        f"\n{info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, {info['date_utc']}, "
        f"load {info['loadavg'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, {info['wall_s']:.0f} s"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {"argv": sys.argv, "args": vars(args), "machine": info, "results": results}, fh, indent=1, default=str
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
