"""Soak (issue 12 item 5): random SIGKILLs of random peers under a mixed client load, exactly once.

A 3-peer ``statefun-mesh run`` mesh (real peer processes, which the launcher restarts),
checkpoints every 0.5 s to a ``file://`` blob store. The load sends, each operation with an
idempotency key and retried through the next peer on any error until accepted:

- counter increments (``cr/counter``), each emitting one egress record (``cr/increments``);
- money-conserving transfers between accounts (``hx/account``, tests/integration/netns_app.py);
- ping-pong chains bouncing between two instances until they finish (``cr/ping``/``cr/pong``,
  then ``cr/done``);
- timers (``cr/timer-setter`` schedules one ``send_after`` to ``cr/timer-target``), 40 %
  of them cancelled by a second message right after.

Each kill comes at a random moment of one of three kinds: while the mesh runs normally
(``steady``), while a checkpoint is being written (a peer's object of checkpoint n is in
the blob store, its manifest is not: ``checkpoint``), and during the recovery round the
previous kill started (``recovery``). At the end every accepted operation must have been
applied exactly once: each counter equals its increments, each balance the accepted
transfers' effects (and they sum to 0), each chain finished once with all its hops, each
kept timer fired once and each cancelled one never (if the cancellation was accepted at
least ``CANCEL_MARGIN`` before the timer could be due, through the peer that took the
timer; else 0 or 1 times), and the egress holds each increment once, at offsets 0..n-1 per
peer.

``test_soak_a_few_sigkills`` (CI, under a minute) kills 4 times; ``test_soak_100_sigkills``
(``--run-slow``, about 20 minutes) 100 times. Each prints a ``MEASURED soak`` line, the
figures docs/guarantees.md quotes ("Soak: 100 SIGKILLs").
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.integration import crash_app as app
from tests.integration import netns_app
from tests.integration.crash_util import (
    APP,
    Clients,
    CrashMesh,
    FileBlobs,
    app_client,
    probe_ids,
    reply_json,
    wait_responsive,
)
from tests.integration.support import gather_bounded, read_egress

pytestmark = pytest.mark.integration

APPS = [APP, "tests.integration.netns_app:functions"]
COUNTER_KEYS = 40
ACCOUNTS = 10
SETTERS = 6
TIMER_DELAY_MS = (2_000, 5_000)
#: a cancellation accepted this long before its timer can be due must win (processing lag
#: between acceptance and the setter applying it stays well under this without a crash)
CANCEL_MARGIN = 1.0
#: from SIGKILL to every peer answering; the launcher's restart back-off alone reaches 5 s
RECOVERY_BOUND = 60.0
MODES = ("steady", "checkpoint", "recovery")


@dataclass
class Kill:
    peer: int
    mode: str
    note: str
    at: float  # monotonic time of the kill
    wall: float = 0.0  # wall-clock time of the kill (the peers' log lines have wall-clock times)
    recovered_s: float | None = None  # kill -> every peer answers (None: the next kill came first)


def _counter_query(id: str) -> Any:
    return app.query(app.COUNTER, id)


class Load:
    """The client load of the soak: four kinds of operation, each accepted one recorded."""

    def __init__(self, clients: Clients, *, seed: int, deadline: float, pause: float) -> None:
        self.clients = clients
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.pause = pause
        self.stop = asyncio.Event()
        self.incs: dict[str, str] = {}  # increment id -> counter key
        self.xfers: list[tuple[str, str, int]] = []  # (from, to, amount)
        self.chains: dict[str, int] = {}  # chain -> hops
        self.kept: set[str] = set()  # timer targets
        self.cancelled: dict[str, bool] = {}  # timer target -> the cancellation must win
        self.latest_due = 0.0  # monotonic; no timer can be due later than this (plus processing lag)
        self.latencies: list[float] = []
        #: idempotency key -> (wall-clock time of its acceptance, index of the peer that accepted it)
        self.accepted: dict[str, tuple[float, int]] = {}

    async def _send(self, msg: Any, key: str, first: int) -> tuple[float, float, int]:
        """Send until accepted; (monotonic start, acceptance, index of the peer that accepted)."""
        t0 = time.monotonic()
        n = await self.clients.send(msg, key, first=first, deadline=self.deadline)
        t1 = time.monotonic()
        self.latencies.append(t1 - t0)
        via = (first + n - 1) % len(self.clients.clients)
        self.accepted[key] = (time.time(), via)
        return t0, t1, via

    async def counters(self, w: int) -> None:
        n = 0
        while not self.stop.is_set():
            inc, key = f"i{w}-{n}", f"k{self.rng.randrange(COUNTER_KEYS)}"
            await self._send(app.json_message(app.COUNTER, key, {"inc": inc}), inc, w + n)
            self.incs[inc] = key
            n += 1
            await asyncio.sleep(self.pause)

    async def transfers(self, w: int) -> None:
        n = 0
        while not self.stop.is_set():
            a, b = self.rng.sample(range(ACCOUNTS), 2)
            amount = self.rng.randint(1, 100)
            tid = f"x{w}-{n}"
            doc = {"xfer": tid, "to": f"a{b}", "amount": amount}
            await self._send(netns_app.json_message(netns_app.ACCOUNT, f"a{a}", doc), tid, w + n)
            self.xfers.append((f"a{a}", f"a{b}", amount))
            n += 1
            await asyncio.sleep(self.pause)

    async def chain_starts(self) -> None:
        n = 0
        while not self.stop.is_set():
            c, hops = f"ch{n}", self.rng.randint(5, 60)
            doc = {"chain": c, "left": hops, "hops": 0, "partner": f"{c}-b"}
            await self._send(app.json_message(app.PING, f"{c}-a", doc), f"start-{c}", n)
            self.chains[c] = hops
            n += 1
            await asyncio.sleep(self.pause * 10)

    async def timers(self) -> None:
        n = 0
        while not self.stop.is_set():
            setter, target, token = f"s{n % SETTERS}", f"t{n}", f"tok-{n}"
            delay = self.rng.randint(*TIMER_DELAY_MS) / 1000
            t0, t1, via = await self._send(
                app.json_message(app.TIMER_SETTER, setter, {"set": [[target, int(delay * 1000), token]]}), f"set-{n}", n
            )
            self.latest_due = max(self.latest_due, t1 + delay)
            if self.rng.random() < 0.4:
                # Sent through the peer that took the timer: its ingress log keeps the two in
                # order, also when a recovery replays them (through another peer they could
                # overtake each other, and a cancellation applied first cancels nothing).
                _, c1, cvia = await self._send(
                    app.json_message(app.TIMER_SETTER, setter, {"cancel": [token]}), f"cancel-{n}", via
                )
                self.cancelled[target] = cvia == via and c1 < t0 + delay - CANCEL_MARGIN
            else:
                self.kept.add(target)
            n += 1
            await asyncio.sleep(self.pause * 4)

    def tasks(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(c)
            for c in (self.counters(0), self.counters(1), self.transfers(0), self.chain_starts(), self.timers())
        ]

    def ops(self) -> int:
        return len(self.incs) + len(self.xfers) + len(self.chains) + len(self.kept) + 2 * len(self.cancelled)


def _in_progress_checkpoint(blobs: FileBlobs) -> int | None:
    """A checkpoint being written now: a peer wrote an object of it within the last 0.3 s, and
    its manifest is not there yet (objects of aborted checkpoints stay until garbage-collected,
    hence the age)."""
    done = blobs.manifests()
    newest = done[-1] if done else -1
    now = time.time()
    try:
        for d in (blobs.root / "objects").iterdir():
            for f in d.iterdir():
                head = f.name.split("-", 1)[0]
                if head.isdigit() and int(head) > newest and now - f.stat().st_mtime < 0.3:
                    return int(head)
    except FileNotFoundError:  # a directory appearing or an object garbage-collected meanwhile
        return None
    return None


async def _killer(
    mesh: CrashMesh,
    kills: int,
    rng: random.Random,
    probes: list[str],
    script: list[tuple[int, str]] | None = None,
    spare_new_coordinator: bool = False,
) -> list[Kill]:
    """SIGKILL ``kills`` times, each at a moment of a random kind (see the module docstring),
    or as ``script`` says: (peer, kind) for each kill. ``spare_new_coordinator``: no kill
    falls into the first round of a restarted peer 0 (an open bug, see
    test_a_peer_killed_in_the_first_round_of_a_restarted_coordinator)."""
    modes = [*MODES, *(rng.choice(MODES) for _ in range(kills - len(MODES)))][:kills]
    rng.shuffle(modes)
    if modes and modes[0] == "recovery":  # there is no round to kill into before the first kill
        i = modes.index("steady") if "steady" in modes else 1 % len(modes)
        modes[0], modes[i] = modes[i], modes[0]
    victims = [*rng.sample(range(3), 3), *(rng.randrange(3) for _ in range(kills))][:kills]
    if script is not None:
        victims, modes = [k for k, _ in script], [m for _, m in script]
    if spare_new_coordinator:
        victims = [
            rng.choice((1, 2)) if k == 0 and j + 1 < kills and modes[j + 1] == "recovery" else k
            for j, k in enumerate(victims)
        ]
    done: list[Kill] = []
    round_note = ""  # the state of the round a "recovery" kill falls into
    await asyncio.sleep(rng.uniform(0.5, 1.5))  # the load is running
    for j in range(kills):
        mode, note = modes[j], round_note
        round_note = ""
        if mode == "steady":
            await asyncio.sleep(rng.uniform(0.0, 1.5))
        elif mode == "checkpoint":
            end = time.monotonic() + 5.0
            while (n := _in_progress_checkpoint(mesh.blobs)) is None and time.monotonic() < end:
                await asyncio.sleep(0.005)
            note = f"checkpoint {n} being written" if n is not None else "no checkpoint seen under way"
        mark = mesh.log_path.stat().st_size
        old, t_kill = mesh.kill_peer(victims[j])
        kill = Kill(victims[j], mode, note, t_kill, time.time())
        done.append(kill)
        await asyncio.to_thread(mesh.wait_peer_restarted, victims[j], old, 40)
        if j + 1 < kills and modes[j + 1] == "recovery":
            # the next kill falls into the recovery round this one starts
            m = await _wait_log(mesh, r"recovery round (\d+) \(", after=mark, timeout=30)
            await asyncio.sleep(rng.uniform(0.0, 0.05))  # a round takes some 0.05-0.7 s here
            finished = b"recovery round " + m.group(1) + b" done" in _log_bytes(mesh, mark)
            round_note = f"round {m.group(1).decode()} {'already done' if finished else 'under way'}"
            continue
        try:
            t_ok = await wait_responsive(mesh.endpoint, probes, _counter_query, timeout=RECOVERY_BOUND)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nkills so far: {done}\nlauncher log: {mesh.log_path}") from None
        kill.recovered_s = t_ok - t_kill
        print(
            f"[soak] kill {j + 1}/{kills}: peer {kill.peer} ({mode}{', ' + note if note else ''}); every peer "
            f"answered {kill.recovered_s:.2f} s later; newest checkpoint {mesh.manifests()[-1:]}"
        )
    return done


def _log_bytes(mesh: CrashMesh, after: int) -> bytes:
    """The current launcher log from byte ``after`` on."""
    with open(mesh.log_path, "rb") as fh:
        fh.seek(after)
        return fh.read()


async def _wait_log(mesh: CrashMesh, pattern: str, *, after: int, timeout: float) -> re.Match[bytes]:
    rx = re.compile(pattern.encode())
    end = time.monotonic() + timeout
    while True:
        m = rx.search(_log_bytes(mesh, after))
        if m:
            return m
        if time.monotonic() > end:
            raise AssertionError(f"no log line matching {pattern!r} within {timeout} s: {mesh.log_path}")
        await asyncio.sleep(0.005)


async def _wait_new_checkpoints(mesh: CrashMesh, count: int, timeout: float) -> None:
    before = mesh.manifests()
    base = before[-1] if before else -1
    end = time.monotonic() + timeout
    while len([n for n in mesh.manifests() if n > base]) < count:
        if time.monotonic() > end:
            raise AssertionError(f"no {count} new checkpoints after {base} within {timeout} s: {mesh.log_path}")
        await asyncio.sleep(0.1)


def _expected(load: Load) -> dict[tuple[str, str], Any]:
    """(function type, instance) -> what a query of it must answer once everything is applied.
    A value of None: a timer whose cancellation may or may not have come first (fired 0 or 1 times)."""
    want: dict[tuple[str, str], Any] = {}
    counts = Counter(load.incs.values())
    for k in range(COUNTER_KEYS):
        want[app.COUNTER, f"k{k}"] = {"count": counts[f"k{k}"]}
    accounts = {f"a{k}": {"balance": 0, "debits": 0, "credits": 0} for k in range(ACCOUNTS)}
    for a, b, amount in load.xfers:
        accounts[a]["balance"] -= amount
        accounts[a]["debits"] += 1
        accounts[b]["balance"] += amount
        accounts[b]["credits"] += 1
    for acc, doc in accounts.items():
        want[netns_app.ACCOUNT, acc] = doc
    for c, hops in load.chains.items():
        want[app.DONE, c] = {"done": 1, "hops": [hops]}
        want[app.PING, f"{c}-a"] = {"visits": (hops + 1) // 2}
        want[app.PONG, f"{c}-b"] = {"visits": hops // 2}
    for t in load.kept:
        want[app.TIMER_TARGET, t] = {"fired": 1}
    for t, firm in load.cancelled.items():
        want[app.TIMER_TARGET, t] = {"fired": 0} if firm else None
    return want


def _matches(want: Any, got: Any) -> bool:
    return got in ({"fired": 0}, {"fired": 1}) if want is None else bool(got == want)


async def _settle(clients: Clients, load: Load, deadline: float) -> dict[tuple[str, str], tuple[Any, Any]]:
    """Query until every instance answers what the accepted operations imply (or the deadline),
    then once more, all of them (a duplicate could come late); return the mismatches."""
    want = _expected(load)
    pending = list(want)

    async def ask(i: int, what: tuple[str, str]) -> tuple[tuple[str, str], Any]:
        r = await clients.request(app.query(*what), first=i, deadline=deadline)
        return what, reply_json(r)

    settle_end = min(deadline - 15, time.monotonic() + 120)
    while pending and time.monotonic() < settle_end:
        got = await gather_bounded((ask(i, w) for i, w in enumerate(pending)), 32)
        pending = [w for w, doc in got if not _matches(want[w], doc)]
        if pending:
            await asyncio.sleep(0.5)
    while time.monotonic() < load.latest_due + 1.0:  # a late timer could still fire a second time
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    got = await gather_bounded((ask(i, w) for i, w in enumerate(want)), 32)
    return {w: (want[w], doc) for w, doc in got if not _matches(want[w], doc)}


def _hms(t: float) -> str:
    """A wall-clock time as the peers' log lines show it (local time, milliseconds)."""
    return time.strftime("%H:%M:%S", time.localtime(t)) + f",{int(t * 1000) % 1000:03d}"


def _pct(xs: list[float], q: float) -> float:
    return round(sorted(xs)[min(int(q * len(xs)), len(xs) - 1)], 3) if xs else -1.0


async def run_soak(
    mesh: CrashMesh,
    *,
    kills: int,
    budget: float,
    pause: float,
    seed: int | None = None,
    script: list[tuple[int, str]] | None = None,
    spare_new_coordinator: bool = False,
) -> None:
    seed = random.randrange(1 << 30) if seed is None else seed
    print(f"\n[soak] seed={seed} kills={kills} (rerun: run_soak(..., seed={seed}))")
    rng = random.Random(seed)
    started = time.monotonic()
    deadline = started + budget
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    clients = await Clients.connect(mesh.endpoint)
    probes = probe_ids("probe")
    try:
        load = Load(clients, seed=seed, deadline=deadline, pause=pause)
        workers = load.tasks()
        killer = asyncio.create_task(_killer(mesh, kills, rng, probes, script, spare_new_coordinator))

        try:
            # a worker ends before the killer only by failing (a send not accepted by the deadline)
            await asyncio.wait([killer, *workers], return_when=asyncio.FIRST_COMPLETED)
            if not killer.done():
                killer.cancel()
                await asyncio.gather(killer, return_exceptions=True)
                failed = next(w for w in workers if w.done())
                raise failed.exception() or AssertionError("a load worker stopped")
            done = killer.result()
            await asyncio.sleep(1.0)  # the load goes on a little after the last recovery
        finally:
            load.stop.set()
            ended = await asyncio.gather(*workers, return_exceptions=True)
        errors = [e for e in ended if isinstance(e, BaseException)]
        if errors:
            raise errors[0]
        t_load = time.monotonic() - started
        wrong = await _settle(clients, load, deadline)
        settled = time.monotonic()

        await _wait_new_checkpoints(mesh, 2, timeout=max(deadline - time.monotonic(), 30))
        async with app_client(mesh) as client:
            records = await read_egress(client, app.INCREMENTS, idle=4.0, timeout=max(deadline - time.monotonic(), 60))
        seen = Counter(r.as_string() for r in records)
        expected = {f"{key}|{inc}" for inc, key in load.incs.items()}
        dups = {v: c for v, c in seen.items() if c > 1}
        missing, extra = expected - set(seen), set(seen) - expected
        offsets: dict[int, list[int]] = {}
        for r in records:
            offsets.setdefault(r.peer, []).append(r.offset)
        gaps = {p: (min(o), max(o), len(o)) for p, o in offsets.items() if sorted(o) != list(range(len(o)))}

        log = mesh.log()
        rounds = [float(s) for s in re.findall(r"recovery round \d+ done in ([\d.]+) s", log)]
        recovered = [k.recovered_s for k in done if k.recovered_s is not None]
        measured = {
            "kills": len(done),
            "by_mode": dict(Counter(k.mode for k in done)),
            "killed_while_a_checkpoint_was_written": sum(1 for k in done if "being written" in k.note),
            "killed_during_an_unfinished_recovery_round": sum(1 for k in done if "under way" in k.note),
            "by_peer": dict(sorted(Counter(k.peer for k in done).items())),
            "recovery_s_p50": _pct(recovered, 0.5),
            "recovery_s_max": _pct(recovered, 1.0),
            "recovery_rounds": len(rounds),
            "round_s_p50": _pct(rounds, 0.5),
            "round_s_max": _pct(rounds, 1.0),
            "ops": load.ops(),
            "increments": len(load.incs),
            "transfers": len(load.xfers),
            "chains": len(load.chains),
            "chain_hops": sum(load.chains.values()),
            "timers_kept": len(load.kept),
            "timers_cancelled": len(load.cancelled),
            "cancellations_that_must_win": sum(load.cancelled.values()),
            "send_latency_s_p50": _pct(load.latencies, 0.5),
            "send_latency_s_max": _pct(load.latencies, 1.0),
            "retries": clients.retries,
            "retry_errors": clients.errors,
            "egress_records": len(records),
            "load_s": round(t_load, 1),
            "settle_s": round(settled - started - t_load, 1),
            "seed": seed,
        }
        print(f"MEASURED soak: {json.dumps(measured)}")
        problems = []
        if wrong:
            problems.append(
                f"{len(wrong)} instances differ from the accepted operations (instance: (want, got)): "
                f"{dict(list(wrong.items())[:20])}"
            )
        if dups or missing or extra or gaps:
            problems.append(
                f"egress {app.INCREMENTS}: {len(records)} records for {len(expected)} increments; "
                f"{len(dups)} duplicated (e.g. {list(dups.items())[:5]}), {len(missing)} missing "
                f"(e.g. {sorted(missing)[:5]}), {len(extra)} unexpected; "
                f"offsets not 0..n-1: {gaps}"
            )
        if problems:
            keys = {f"inc {v.split('|')[1]}": v.split("|")[1] for v in missing}
            for (typename, id), _ in wrong.items():
                if typename == app.DONE:
                    keys[f"{typename} {id}"] = f"start-{id}"
                elif typename == app.TIMER_TARGET:
                    keys[f"{typename} {id}"] = f"set-{id[1:]}"
            when = sorted((load.accepted[k], what) for what, k in keys.items() if k in load.accepted)
            problems.append(
                "accepted (wall clock, through peer) of what is missing: "
                + "; ".join(f"{what} at {_hms(t)} via peer {via}" for (t, via), what in when[:40])
            )
            problems.append(
                f"seed {seed}; kills (peer, kind, note, wall clock): "
                f"{[(k.peer, k.mode, k.note, _hms(k.wall)) for k in done]}"
            )
            problems.append(f"launcher log: {mesh.log_path}")
        assert not problems, "\n".join(problems)
        slow = [(k.peer, k.mode, round(k.recovered_s, 1)) for k in done if (k.recovered_s or 0) > RECOVERY_BOUND]
        assert not slow, f"recoveries slower than {RECOVERY_BOUND} s: {slow}"
    finally:
        await clients.aclose()


@pytest.fixture
def soak_mesh(crash_meshes: Callable[..., CrashMesh]) -> CrashMesh:
    return crash_meshes(apps=APPS, checkpoint_interval=0.5)


@pytest.mark.timeout(150)
async def test_soak_a_few_sigkills(soak_mesh: CrashMesh) -> None:
    """4 SIGKILLs (one while a checkpoint is written, one during a recovery round), under a minute,
    at any moment, the first round of a restarted coordinator included."""
    await run_soak(soak_mesh, kills=4, budget=130, pause=0.02)


@pytest.mark.slow
@pytest.mark.timeout(3000)
async def test_soak_100_sigkills(soak_mesh: CrashMesh) -> None:
    """100 SIGKILLs of random peers at random moments under load (about 12 minutes), the first
    round of a restarted coordinator included (before the fix of
    test_a_peer_killed_in_the_first_round_of_a_restarted_coordinator, 2 of 3 such runs lost
    messages or stalled)."""
    await run_soak(soak_mesh, kills=100, budget=2900, pause=0.05)


@pytest.mark.slow  # 30 s; the CI soak above may hit the same moment
@pytest.mark.timeout(150)
async def test_a_peer_killed_in_the_first_round_of_a_restarted_coordinator(soak_mesh: CrashMesh) -> None:
    """Regression (found by the soak, seeds 102602143 and 875439895; before the fix this failed
    in 3 of 5 runs, after it passed 6 of 6): peer 0 (the coordinator) is killed and restarts,
    and peer 2 is killed during the recovery round the new coordinator starts. The new
    coordinator never heard peer 2's former incarnation,
    so it takes the new peer 2 for a first contact, not a restart (peer 0 logs "peer 2 is
    reachable again", only peer 1 logs "peer 2 restarted"), and lets it join the round under
    way instead of starting another. Peer 1 still counts frames and credit of the former peer
    2 in that generation ("peer 2: rejected a credit of 28 from peer 1, which has only 17
    records of this peer's outstanding"), and what was sent to the former peer 2 in that
    generation is never re-sent: accepted messages were lost (10 increments, 3 chain starts,
    1 timer and some transfers in one 100-kill run). Three times in a row, under the soak's load.
    Fixed: a generation sends nothing before RESUME, and READY follows a heartbeat naming
    the process (Router.flush_peer, Recovery.send_ready)."""
    script = [(0, "steady"), (2, "recovery")] * 3
    await run_soak(soak_mesh, kills=len(script), budget=130, pause=0.02, script=script)
