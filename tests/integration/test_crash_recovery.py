"""Exactly-once across real crashes: ``statefun-mesh run`` with 3 peer processes, peers
killed with SIGKILL at random moments, the launcher restarting them and peer 0's
coordinator running a recovery round for the whole mesh (ARCHITECTURE §7).

The counter, cycle, timer and corrupted-checkpoint tests run with checkpoints on
``file://`` and on ``s3://`` (a local ``rclone serve s3``, see tests/s3server.py). The S3
variants add about a minute by default; those of the five corruption tests (another
1.5 minutes) are ``slow`` (``--run-slow``).

Every test starts its own mesh (``start_new_session=True``) and kills every process it
started at teardown, also when it failed. ``pytest -s`` shows the measured recovery times.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration import crash_app as app
from tests.integration.conftest import MESH_BUCKET
from tests.integration.crash_util import (
    Clients,
    CrashMesh,
    FileBlobs,
    S3Blobs,
    app_client,
    probe_ids,
    reply_json,
    wait_log,
    wait_responsive,
)
from tests.integration.support import gather_bounded, read_egress

pytestmark = pytest.mark.integration

RECOVERY_BOUND = 20.0  # seconds from SIGKILL to the first answered request


#: both blob stores, the S3 one marked slow (a test that lists this runs on S3 only with --run-slow)
STORES_S3_SLOW = ["file", pytest.param("s3", marks=pytest.mark.slow)]
#: the S3 variant runs on the C core only: which blob store a checkpoint goes to is not
#: hot-path code (the pure-Python twin runs every test on ``file``)
STORES = ["file", pytest.param("s3", marks=pytest.mark.c_core_only)]


@pytest.fixture
def store() -> str:
    """The blob store kind of a test that is not parametrized over stores."""
    return "file"


@pytest.fixture
def meshes(
    crash_meshes: Callable[..., CrashMesh], request: pytest.FixtureRequest, store: str
) -> Iterator[Callable[..., CrashMesh]]:
    """``meshes(**CrashMesh options)``: the shared ``crash_meshes``, checkpointing to the test's
    ``store`` (``file``: <state-dir>/checkpoints; ``s3``: a prefix of its own on the shared S3 server)."""
    s3: list[S3Blobs] = []

    def make(**kw: Any) -> CrashMesh:
        if store == "s3" and "blobs" not in kw:
            server = request.getfixturevalue("mesh_s3_server")
            kw["blobs"] = S3Blobs(server, MESH_BUCKET, f"crash-{uuid.uuid4().hex}")
            s3.append(kw["blobs"])
        return crash_meshes(**kw)

    yield make
    for b in s3:
        b.close()


def counter_query(id: str) -> Any:
    return app.query(app.COUNTER, id)


async def start_mesh(mesh: CrashMesh) -> Clients:
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    return await Clients.connect(mesh.endpoint)


async def kill_and_wait(mesh: CrashMesh, k: int, probes: list[str], *, timeout: float = 60.0) -> float:
    """SIGKILL peer ``k``, wait for its restart and for every peer to answer a request;
    return seconds from the kill to the last probe's first answer."""
    old, t_kill = mesh.kill_peer(k)
    await asyncio.to_thread(mesh.wait_peer_restarted, k, old)
    try:
        t_ok = await wait_responsive(mesh.endpoint, probes, counter_query, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- launcher log (tail) ---\n{mesh.log()[-5000:]}") from None
    return t_ok - t_kill


async def wait_new_checkpoints(mesh: CrashMesh, count: int = 2, timeout: float = 30.0) -> int:
    """Wait until ``count`` more manifests exist than now; return the newest id."""
    before = mesh.manifests()
    base = before[-1] if before else -1
    deadline = time.monotonic() + timeout
    while True:
        ids = [n for n in mesh.manifests() if n > base]
        if len(ids) >= count:
            return ids[-1]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {count} new checkpoints after {base} within {timeout} s "
                f"(have {mesh.manifests()}):\n{mesh.log()[-3000:]}"
            )
        await asyncio.sleep(0.1)


async def read_counts(clients: Clients, keys: list[str], *, deadline: float) -> dict[str, int]:
    async def one(i: int, key: str) -> tuple[str, int]:
        r = await clients.request(counter_query(key), first=i, deadline=deadline)
        return key, reply_json(r)["count"]

    return dict(await gather_bounded((one(i, k) for i, k in enumerate(keys)), 32))


def recovery_rounds(log: str) -> list[str]:
    return re.findall(r"recovery round \d+ \(.*?\): restoring [^\n]*", log)


# -- 1. counters with idempotent retries, 3-5 kills ------------------------------------------


async def run_counter(
    meshes: Callable[..., CrashMesh],
    *,
    increments: int,
    keys: int,
    kills: int,
    workers: int = 8,
    seed: int | None = None,
    budget: float,
) -> None:
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    print(f"\n[counter] seed={seed} increments={increments} keys={keys} kills={kills}")
    started = time.monotonic()
    deadline = started + budget
    mesh = meshes()
    clients = await start_mesh(mesh)
    probes = probe_ids("probe")
    try:
        key_names = [f"k{j}" for j in range(keys)]
        plan = [(f"inc-{i}", key_names[i % keys]) for i in range(increments)]
        rng.shuffle(plan)
        todo = iter(plan)
        sent: Counter[str] = Counter()
        accepted: list[str] = []
        info: dict[str, tuple[float, int, int]] = {}  # inc -> (accepted at, endpoint, attempts)
        attempts = Counter[int]()
        sending_done = asyncio.Event()
        t0 = time.monotonic()

        async def worker(w: int) -> None:
            for inc, key in todo:
                msg = app.json_message(app.COUNTER, key, {"inc": inc})
                n = await clients.send(msg, inc, first=w, deadline=deadline)
                info[inc] = (time.monotonic() - t0, (w + n - 1) % len(clients.clients), n)
                attempts[n] += 1
                sent[key] += 1
                accepted.append(inc)

        victims = [0, 1, 2][: min(kills, 3)] + [rng.randrange(3) for _ in range(kills - 3)]
        rng.shuffle(victims)
        recoveries: list[tuple[int, float]] = []
        kill_times: list[tuple[int, float]] = []

        async def killer() -> None:
            for j, k in enumerate(victims):
                # a random moment while the clients send: kill j falls in the j-th slice of the sends
                mark = int(increments * (j + rng.uniform(0.2, 0.8)) / kills)
                while len(accepted) < mark and not sending_done.is_set():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                at = len(accepted)
                kill_times.append((k, time.monotonic() - t0))
                secs = await kill_and_wait(mesh, k, probes)
                recoveries.append((k, secs))
                print(
                    f"[counter] killed peer {k} after {at} accepted sends; all peers answered "
                    f"{secs:.2f} s later; {len(accepted)} accepted now"
                )

        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(worker(w) for w in range(workers)))
        sending_done.set()
        t_send = time.monotonic() - t0
        print(
            f"[counter] {increments} sends accepted in {t_send:.1f} s ({increments / t_send:.0f}/s); "
            f"retries {clients.retries} {dict(clients.errors)}; attempts histogram {dict(sorted(attempts.items()))}"
        )
        await kill_task
        assert len(recoveries) == kills
        assert sum(sent.values()) == increments

        # every key's count equals the increments sent to it (state), within 30 s
        want = {k: sent[k] for k in key_names}
        final: dict[str, int] = {}
        settle = time.monotonic() + 30
        while True:
            final = await read_counts(clients, key_names, deadline=deadline)
            if final == want or time.monotonic() > settle:
                break
            if all(final[k] >= want[k] for k in key_names) and any(final[k] > want[k] for k in key_names):
                break  # more than sent can never come right again
            await asyncio.sleep(0.5)
        wrong = {k: (final[k], want[k]) for k in key_names if final[k] != want[k]}

        # egress: every increment exactly once, once a checkpoint covers them all
        await wait_new_checkpoints(mesh, 2)
        async with app_client(mesh) as client:
            records = await read_egress(client, app.INCREMENTS, idle=4.0, timeout=max(deadline - time.monotonic(), 30))
        seen = Counter(r.as_string() for r in records)
        dups = {v: c for v, c in seen.items() if c > 1}
        expected = {f"{key}|{inc}" for inc, key in plan}
        missing = expected - set(seen)
        extra = set(seen) - expected
        per_peer: dict[int, list[int]] = {}
        for r in records:
            per_peer.setdefault(r.peer, []).append(r.offset)
        gaps = {p: (min(o), max(o), len(o)) for p, o in per_peer.items() if sorted(o) != list(range(len(o)))}
        problems = []
        if wrong:
            problems.append(f"{len(wrong)} keys with a wrong count (got, sent): {dict(list(wrong.items())[:20])}")
        if dups or missing or extra or gaps:
            problems.append(
                f"egress {app.INCREMENTS}: {len(records)} records for {increments} increments; "
                f"{len(dups)} duplicated (e.g. {list(dups.items())[:5]}), {len(missing)} missing, "
                f"{len(extra)} unexpected, offsets not 0..n-1 per peer: {gaps}"
            )
        if missing:
            lost = sorted((info[v.split("|")[1]], v) for v in missing)
            problems.append(
                "missing increments (accepted at s after the start, via endpoint of peer, attempts): "
                + "; ".join(f"{v} at {a:.2f} s via {e} ({n})" for (a, e, n), v in lost[:20])
            )
        if problems:
            problems.append(f"kills (peer, s after the start): {[(k, round(t, 2)) for k, t in kill_times]}")
            problems.append(f"recovery rounds: {recovery_rounds(mesh.log())}")
            problems.append(f"launcher log: {mesh.log_path}")
        assert not problems, "\n".join(problems)
        total = time.monotonic() - started
        print(
            f"[counter] recovery times (kill -> every peer answers): "
            f"{', '.join(f'peer {k}: {s:.2f} s' for k, s in recoveries)}; test took {total:.1f} s"
        )
        for k, s in recoveries:
            assert s < RECOVERY_BOUND, f"recovery after killing peer {k} took {s:.1f} s"
    finally:
        await clients.aclose()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("store", STORES)
async def test_counter_exactly_once_across_sigkills(meshes: Callable[..., CrashMesh]) -> None:
    await run_counter(meshes, increments=3_000, keys=100, kills=3, budget=140)


@pytest.mark.slow
@pytest.mark.timeout(1500)
async def test_counter_exactly_once_across_sigkills_50k(meshes: Callable[..., CrashMesh]) -> None:
    await run_counter(meshes, increments=50_000, keys=1_000, kills=5, workers=16, budget=1450)


# -- 2. ping-pong cycles in flight across checkpoints and a crash ---------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("store", STORES)
async def test_cycles_finish_exactly_once_across_a_sigkill(meshes: Callable[..., CrashMesh]) -> None:
    chains, rounds = 50, 2000  # ~100k hops: several seconds of cross-peer ping-pong
    mesh = meshes()
    clients = await start_mesh(mesh)
    deadline = time.monotonic() + 130
    probes = probe_ids("probe")
    try:
        names = [f"c{i}" for i in range(chains)]
        for i, c in enumerate(names):
            doc = {"chain": c, "left": rounds, "hops": 0, "partner": f"{c}-b"}
            await clients.send(app.json_message(app.PING, f"{c}-a", doc), f"start-{c}", first=i, deadline=deadline)
        t0 = time.monotonic()
        # let the chains run across a few checkpoints, then crash a peer mid-flight
        await asyncio.sleep(1.5)
        done_before = await chains_done(clients, names, deadline)
        visits_before = reply_json(await clients.request(app.query(app.PING, f"{names[0]}-a"), deadline=deadline))
        victim = random.randrange(3)
        secs = await kill_and_wait(mesh, victim, probes)
        print(
            f"\n[cycles] {sum(1 for d in done_before.values() if d['done'])}/{chains} chains had finished "
            f"(chain {names[0]} at hop ~{2 * visits_before['visits']}/{rounds}) when peer {victim} was killed; "
            f"mesh answered {secs:.2f} s after the kill"
        )
        assert sum(1 for d in done_before.values() if d["done"]) < chains, "the chains finished before the crash"

        while True:
            states = await chains_done(clients, names, deadline)
            if all(s["done"] >= 1 for s in states.values()) or time.monotonic() > deadline - 20:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # a duplicate would arrive after the first finish
        states = await chains_done(clients, names, deadline)
        bad = {c: s for c, s in states.items() if s["done"] != 1 or s["hops"] != [rounds]}
        assert not bad, f"chains not finished exactly once with {rounds} hops: {dict(list(bad.items())[:10])}"
        visits = {}
        for i, c in enumerate(names):
            a = reply_json(await clients.request(app.query(app.PING, f"{c}-a"), first=i, deadline=deadline))["visits"]
            b = reply_json(await clients.request(app.query(app.PONG, f"{c}-b"), first=i, deadline=deadline))["visits"]
            visits[c] = (a, b)
        bad_visits = {c: v for c, v in visits.items() if v != ((rounds + 1) // 2, rounds // 2)}
        assert not bad_visits, f"hop counts per instance differ from ({(rounds + 1) // 2}, {rounds // 2}): {bad_visits}"
        print(
            f"[cycles] all {chains} chains finished once with {rounds} hops; "
            f"{time.monotonic() - t0:.1f} s; recovery rounds: {recovery_rounds(mesh.log())}"
        )
        assert secs < RECOVERY_BOUND
    finally:
        await clients.aclose()


async def chains_done(clients: Clients, names: list[str], deadline: float) -> dict[str, Any]:
    async def one(i: int, c: str) -> tuple[str, Any]:
        return c, reply_json(await clients.request(app.query(app.DONE, c), first=i, deadline=deadline))

    return dict(await gather_bounded((one(i, c) for i, c in enumerate(names)), 16))


# -- 3. timers pending at a crash -------------------------------------------------------------


class SetupTooSlow(Exception):
    """The machine was too slow to set the timers before the first could be due."""


async def timers_across_a_crash_adaptive(meshes: Callable[..., CrashMesh], scale: float) -> dict[str, Any]:
    """:func:`timers_across_a_crash`; on a machine too busy to set the timers in time for
    ``scale``, once more on a fresh mesh with delays 2.5 times as long (never a weaker check)."""
    try:
        return await timers_across_a_crash(meshes, scale)
    except SetupTooSlow as exc:
        print(f"[timers] {exc}; again with delays x{scale * 2.5:g}")
        return await timers_across_a_crash(meshes, scale * 2.5)


async def timers_across_a_crash(meshes: Callable[..., CrashMesh], scale: float = 1.0) -> dict[str, Any]:
    """Set 120 timers (delays 1.5-3 s, times ``scale``) from 12 setter instances; cancel a
    third of them at once (checkpointed before the crash) and a third just before the crash
    (acknowledged, so in the ingress log, but after the last checkpoint); SIGKILL peer 2
    before any is due; wait until all are due after recovery. Returns the firing counts per
    group. S3 checkpoints take longer than local ones: those tests give ``scale=2``."""
    setters = 12
    per_setter = 10
    mesh = meshes()
    clients = await start_mesh(mesh)
    deadline = time.monotonic() + 100
    probes = probe_ids("probe")
    rng = random.Random()
    try:
        plan: dict[str, tuple[str, int, str]] = {}  # target -> (setter, delay_ms, token)
        for s in range(setters):
            for j in range(per_setter):
                plan[f"t{s}-{j}"] = (f"s{s}", rng.randint(int(1_500 * scale), int(3_000 * scale)), f"tok-{s}-{j}")
        targets = sorted(plan)
        shuffled = targets[:]
        rng.shuffle(shuffled)
        third = len(shuffled) // 3
        cancel_early, cancel_late = set(shuffled[:third]), set(shuffled[third : 2 * third])
        keep = set(shuffled[2 * third :])

        t0 = time.monotonic()
        for s in range(setters):
            entries = [[t, d, tok] for t, (setter, d, tok) in plan.items() if setter == f"s{s}"]
            await clients.send(
                app.json_message(app.TIMER_SETTER, f"s{s}", {"set": entries}), f"set-{s}", first=s, deadline=deadline
            )
        for s in range(setters):
            toks = [plan[t][2] for t in cancel_early if plan[t][0] == f"s{s}"]
            await clients.send(
                app.json_message(app.TIMER_SETTER, f"s{s}", {"cancel": toks}),
                f"cancel-early-{s}",
                first=s,
                deadline=deadline,
            )
        await wait_new_checkpoints(mesh, 2)  # the timers and the early cancellations are checkpointed
        newest = mesh.manifests()[-1]
        for s in range(setters):
            toks = [plan[t][2] for t in cancel_late if plan[t][0] == f"s{s}"]
            await clients.send(
                app.json_message(app.TIMER_SETTER, f"s{s}", {"cancel": toks}),
                f"cancel-late-{s}",
                first=s,
                deadline=deadline,
            )
        elapsed = time.monotonic() - t0
        if elapsed >= 1.4 * scale:
            mesh.cleanup()
            raise SetupTooSlow(
                f"setup took {elapsed:.2f} s (bound {1.4 * scale:.1f} s): timers may have fired before the crash"
            )
        victim = 2
        secs = await kill_and_wait(mesh, victim, probes)
        print(
            f"\n[timers] killed peer {victim} {elapsed:.2f} s after setting {len(plan)} timers "
            f"(delays {1.5 * scale:g}-{3 * scale:g} s); every peer answered {secs:.2f} s after the kill"
        )
        rounds = recovery_rounds(mesh.log())
        late_checkpointed = not rounds[-1].endswith(f"restoring checkpoint {newest} on 3 peers")

        await asyncio.sleep(4.0 * scale)  # every timer is due by now; a second firing would have happened

        async def fired(i: int, t: str) -> tuple[str, int]:
            r = await clients.request(app.query(app.TIMER_TARGET, t), first=i, deadline=deadline)
            return t, reply_json(r)["fired"]

        got = dict(await gather_bounded((fired(i, t) for i, t in enumerate(targets)), 16))
        result = {
            "keep": {t: got[t] for t in keep},
            "early": {t: got[t] for t in cancel_early},
            "late": {t: got[t] for t in cancel_late},
            "delay_ms": {t: plan[t][1] for t in targets},
            "late_maybe_checkpointed": late_checkpointed,
            "crash_at_ms": int(elapsed * 1000),
            "answered_at_ms": int((elapsed + secs) * 1000),
        }
        fired_late = {t: n for t, n in result["late"].items() if n}
        print(
            f"[timers] kept: {sum(1 for n in result['keep'].values() if n == 1)}/{len(keep)} fired once; "
            f"cancelled early: {sum(1 for n in result['early'].values() if n)} fired; cancelled just before the "
            f"crash: {len(fired_late)} fired (delays {sorted(plan[t][1] for t in fired_late)} ms; crash at "
            f"{result['crash_at_ms']} ms, mesh back at {result['answered_at_ms']} ms); rounds: {rounds}"
        )
        return result
    finally:
        await clients.aclose()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("store", STORES)
async def test_timers_pending_at_a_crash_fire_exactly_once_and_checkpointed_cancellations_hold(
    meshes: Callable[..., CrashMesh], store: str
) -> None:
    r = await timers_across_a_crash_adaptive(meshes, 2.0 if store == "s3" else 1.0)
    bad_keep = {t: n for t, n in r["keep"].items() if n != 1}
    bad_early = {t: n for t, n in r["early"].items() if n != 0}
    assert not bad_keep, f"timers not fired exactly once (target: times fired): {bad_keep}"
    assert not bad_early, f"timers cancelled (and checkpointed) before the crash fired: {bad_early}"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("store", STORES)
async def test_a_cancellation_acknowledged_before_a_crash_holds_after_recovery(
    meshes: Callable[..., CrashMesh], store: str
) -> None:
    """A client's cancellation the mesh acknowledged (it is in the ingress log) before the
    crash, and before the timer was due, must win after recovery too: without the crash
    the timer never fires. Recovery replays the cancellation from the ingress log, but
    timers that came due during the outage must not fire ahead of it."""
    r = await timers_across_a_crash_adaptive(meshes, 2.0 if store == "s3" else 1.0)
    bad_keep = {t: n for t, n in r["keep"].items() if n != 1}
    assert not bad_keep, f"timers not fired exactly once (target: times fired): {bad_keep}"
    bad_late = {t: (n, r["delay_ms"][t]) for t, n in r["late"].items() if n != 0}
    assert not bad_late, (
        f"{len(bad_late)} of {len(r['late'])} timers whose cancellation was acknowledged before the crash (at "
        f"{r['crash_at_ms']} ms, before they were due) fired after recovery (mesh answering again at "
        f"{r['answered_at_ms']} ms); target: (times fired, delay ms): {bad_late}"
    )


# -- 4. recovery time -------------------------------------------------------------------------


async def first_answer_after(endpoint: str, id: str, t_kill: float, *, timeout: float) -> float:
    """Fire a request every 0.1 s until one is answered; seconds from ``t_kill`` to that answer."""
    from statefun_mesh import MeshClient

    done = asyncio.Event()
    answered: list[float] = []
    tasks: set[asyncio.Task[None]] = set()

    async with MeshClient(endpoint, timeout=5.0) as client:

        async def one() -> None:
            try:
                await client.request(counter_query(id), timeout=5.0)
            except Exception:
                return
            answered.append(time.monotonic())
            done.set()

        end = time.monotonic() + timeout
        try:
            while not done.is_set() and time.monotonic() < end:
                t = asyncio.create_task(one())
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                try:
                    await asyncio.wait_for(done.wait(), 0.1)
                except (asyncio.TimeoutError, TimeoutError):
                    pass
        finally:
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    if not answered:
        raise AssertionError(f"no request to {id} answered within {timeout} s of the kill")
    return min(answered) - t_kill


@pytest.mark.timeout(150)
@pytest.mark.c_core_only  # a measurement of the recovery; the twin's recoveries are checked by the tests above
async def test_recovery_time_after_sigkill(meshes: Callable[..., CrashMesh]) -> None:
    mesh = meshes()
    clients = await start_mesh(mesh)
    deadline = time.monotonic() + 130
    probes = probe_ids("probe")
    try:
        # some state and some traffic, so recovery restores something
        keys = [f"r{j}" for j in range(200)]
        await gather_bounded(
            (
                clients.send(
                    app.json_message(app.COUNTER, k, {"inc": f"pre-{k}"}), f"pre-{k}", first=i, deadline=deadline
                )
                for i, k in enumerate(keys)
            ),
            16,
        )
        await wait_new_checkpoints(mesh, 2)
        results = []
        for victim in (1, 0, 2):
            old, t_kill = mesh.kill_peer(victim)
            # ask the killed peer's own keys, through peer 0's endpoint
            secs = await first_answer_after(mesh.endpoint, probes[victim], t_kill, timeout=60)
            await asyncio.to_thread(mesh.wait_peer_restarted, victim, old, 5)
            all_ok = await wait_responsive(mesh.endpoint, probes, counter_query, timeout=60) - t_kill
            results.append((victim, secs, all_ok))
            print(
                f"\n[recovery] SIGKILL peer {victim}: first answered request after {secs:.2f} s, "
                f"every peer answering after {all_ok:.2f} s"
            )
            await wait_new_checkpoints(mesh, 1)
        rounds = re.findall(r"recovery round (\d+) done in ([\d.]+) s", mesh.log())
        print(f"[recovery] coordinator's recovery rounds (generation, seconds): {rounds}")
        final = await read_counts(clients, keys, deadline=deadline)
        assert all(v == 1 for v in final.values()), {k: v for k, v in final.items() if v != 1}
        for victim, _, all_ok in results:
            assert all_ok < RECOVERY_BOUND, f"recovery after killing peer {victim} took {all_ok:.1f} s"
    finally:
        await clients.aclose()


# -- 5. a corrupted newest checkpoint ---------------------------------------------------------


def _corrupt(blobs: FileBlobs | S3Blobs, name: str, how: str) -> None:
    """Corrupt object ``name`` in the blob store, behind the mesh's back."""
    data = blobs.read(name)
    if how == "truncate":
        blobs.write(name, data[: len(data) // 2])
    else:  # flip bytes in the middle
        mid = len(data) // 2
        blobs.write(name, data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :])


async def corrupted_checkpoint_scenario(meshes: Callable[..., CrashMesh], target: str) -> dict[str, Any]:
    """Round a of increments, a checkpoint, round b, a checkpoint covering it; read the
    released egress; stop the mesh (SIGTERM); corrupt ``target`` of the newest checkpoint;
    start the mesh again. Checks that it recovers, restores the checkpoint before (or, with
    an intact local copy, possibly the newest one), and that no increment is lost. Returns
    the egress read before the stop and after the restart, by (peer, offset)."""
    # a long interval, so we know which checkpoint covers which sends
    mesh = meshes(checkpoint_interval=3.0)
    clients = await start_mesh(mesh)
    deadline = time.monotonic() + 160
    probes = probe_ids("probe")
    keys = [f"x{j}" for j in range(60)]

    async def send_round(tag: str) -> None:
        await gather_bounded(
            (
                clients.send(
                    app.json_message(app.COUNTER, k, {"inc": f"{tag}-{k}"}), f"{tag}-{k}", first=i, deadline=deadline
                )
                for i, k in enumerate(keys)
            ),
            16,
        )

    def covered(n: int) -> int:  # client messages a checkpoint covers (ingress log offsets start at 0)
        return sum(p["ingress_position"] for p in mesh.manifest(n)["parts"])

    try:
        await send_round("a")
        first = await wait_new_checkpoints(mesh, 1)  # covers round a
        await send_round("b")
        while True:
            newest = await wait_new_checkpoints(mesh, 1)
            if covered(newest) >= 2 * len(keys):  # covers round b
                break
        # a consumer reads the egress the newest checkpoint released
        async with app_client(mesh) as client:
            before = {
                (r.peer, r.offset): r.as_string()
                for r in await read_egress(client, app.INCREMENTS, count=2 * len(keys), idle=5.0, timeout=30)
            }
        await clients.aclose()
        code = await asyncio.to_thread(mesh.stop)
        assert code == 0, f"launcher exit code {code}:\n{mesh.log()[-3000:]}"
        ids = mesh.manifests()
        assert ids[-1] == newest, f"a checkpoint was taken after {newest} while stopping: {ids}"
        previous = ids[-2]
        assert previous >= first
        assert covered(previous) < 2 * len(keys), "the previous checkpoint covers round b too: nothing to replay"
        if target.startswith("manifest"):
            _corrupt(
                mesh.blobs,
                f"checkpoints/{newest:012d}/manifest.json",
                "truncate" if target == "manifest-truncated" else "flip",
            )
            corrupted = f"manifest of checkpoint {newest}"
        else:
            # an object only the newest checkpoint names (its own state or in-flight object of
            # the victim peer); unless the test says otherwise, the peer's local copy is gone
            # too (say, its disk was replaced), so the restore has to read the blob store's copy
            victim = int(target.split("-peer")[1][0])
            part = mesh.manifest(newest)["parts"][victim]
            own = [r for r in [*part["chain"], part["inflight"]] if r["checkpoint"] == newest]
            ref = own[0]
            _corrupt(mesh.blobs, ref["name"], "flip")
            local = mesh.state_dir / f"peer-{victim}.checkpoints" / ref["name"].replace("/", "__")
            assert local.exists(), f"peer {victim} kept no local copy of {ref['name']}"
            if not target.endswith("local-copy-intact"):
                local.unlink()
            corrupted = f"object {ref['name']} of checkpoint {newest}"
        listing = mesh.checkpoints_list()
        print(f"\n[corrupt] corrupted the {corrupted}; checkpoints list:\n{listing}")

        clients = await start_mesh(mesh)
        try:
            await wait_responsive(mesh.endpoint, probes, counter_query, timeout=30)
        except AssertionError as exc:
            notes = [
                line
                for line in mesh.log(mesh.runs).splitlines()
                if "recovery round" in line or "ERROR" in line or "Error:" in line
            ]
            raise AssertionError(
                f"after corrupting the {corrupted} and restarting, the mesh did not recover: "
                f"{exc}\n" + "\n".join(notes[:30])
            ) from None
        log = mesh.log(mesh.runs)
        rounds = recovery_rounds(log)
        print(f"[corrupt] after the restart: {rounds}")
        # with an intact local copy the peer may restore the newest checkpoint from it (local recovery).
        # A corrupted object is found by the peer that restores it (it checks the SHA-256); the
        # coordinator then starts another round on the previous checkpoint: the LAST round counts.
        allowed = (previous, newest) if target.endswith("local-copy-intact") else (previous,)
        assert rounds and any(f"restoring checkpoint {n} " in rounds[-1] for n in allowed), (
            f"expected the last recovery round to restore checkpoint {' or '.join(map(str, allowed))} "
            f"(the corrupted one is {newest}): {rounds}\n{log[-4000:]}"
        )
        # nothing lost: round b comes back from the ingress log
        counts = await read_counts(clients, keys, deadline=deadline)
        assert counts == {k: 2 for k in keys}, {k: v for k, v in counts.items() if v != 2}
        await wait_new_checkpoints(mesh, 1)
        async with app_client(mesh) as client:
            after = {
                (r.peer, r.offset): r.as_string()
                for r in await read_egress(client, app.INCREMENTS, count=2 * len(keys), idle=5.0, timeout=30)
            }
        listing = mesh.checkpoints_list()
        print(f"[corrupt] checkpoints list after the restart:\n{listing}")
        lines = {int(line.split()[0]): line for line in listing.splitlines() if line.strip()[:1].isdigit()}
        assert max(lines) > newest and "complete" in lines[max(lines)], listing
        if target.startswith("manifest") and newest in lines:
            assert "INVALID" in lines[newest], listing
        return {"before": before, "after": after, "keys": keys}
    finally:
        await clients.aclose()


@pytest.mark.timeout(180)
@pytest.mark.c_core_only  # the checkpoint format and the fallback: no hot-path code
@pytest.mark.parametrize("store", STORES_S3_SLOW)
@pytest.mark.parametrize(
    "target",
    [
        "manifest-truncated",
        "manifest-flipped",
        "object-flipped-peer1",
        "object-flipped-peer0",
        "object-flipped-peer1-local-copy-intact",
    ],
)
async def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(
    meshes: Callable[..., CrashMesh], target: str
) -> None:
    await corrupted_checkpoint_scenario(meshes, target)


@pytest.mark.timeout(180)
async def test_egress_released_by_a_lost_checkpoint_is_produced_again(meshes: Callable[..., CrashMesh]) -> None:
    """docs/guarantees.md (transactional egress): when a recovery falls back past a checkpoint
    that had released egress, "records that the unreadable checkpoint had released are
    produced again, and not necessarily in the same order" (so ``(peer, offset)`` does not
    identify them across such a fallback; docs/architecture.md §7). Check what is promised:
    the log read after the restart holds every increment exactly once, among them every
    record a consumer had read before the fallback."""
    r = await corrupted_checkpoint_scenario(meshes, "manifest-truncated")
    before, after, keys = r["before"], r["after"], r["keys"]
    expected = Counter(f"{k}|{tag}-{k}" for k in keys for tag in ("a", "b"))
    seen_after = Counter(after.values())
    assert seen_after == expected, (
        f"after the fallback the egress log holds {sum((seen_after - expected).values())} extra and misses "
        f"{sum((expected - seen_after).values())} increments"
    )
    assert set(before.values()) <= set(after.values()), "a record released before the fallback was not produced again"


# -- 6. a second crash during a recovery round --------------------------------------------------


@pytest.mark.timeout(150)
async def test_a_peer_killed_during_a_recovery_round_is_recovered_too(meshes: Callable[..., CrashMesh]) -> None:
    """Cascading failures: peer 2 dies, and its replacement dies too after it answered
    READY but before the round could finish (peer 1 is frozen with SIGSTOP meanwhile, as a
    slow peer would hold the round open). The third peer-2 process must be recovered
    (a new round) and the mesh must answer again once peer 1 runs again."""
    mesh = meshes()
    clients = await start_mesh(mesh)
    deadline = time.monotonic() + 130
    probes = probe_ids("probe")
    keys = [f"d{j}" for j in range(60)]
    stopped: list[int] = []
    try:
        await gather_bounded(
            (
                clients.send(app.json_message(app.COUNTER, k, {"inc": f"d-{k}"}), f"d-{k}", first=i, deadline=deadline)
                for i, k in enumerate(keys)
            ),
            16,
        )
        await wait_new_checkpoints(mesh, 2)
        pids = mesh.peer_pids()
        os.kill(pids[1], signal.SIGSTOP)  # peer 1 freezes: the next recovery round waits for it
        stopped.append(pids[1])
        mark = len(mesh.log(mesh.runs))
        old2, _ = mesh.kill_peer(2)
        new2 = await asyncio.to_thread(mesh.wait_peer_restarted, 2, old2)
        # the round for the new peer 2 waits for peer 1; peer 2 has restored and said READY
        line = await asyncio.to_thread(
            wait_log, mesh, r"recovery round \d+: waiting for peers \[1\]", timeout=30, after=mark
        )
        print(f"\n[cascade] {line}")
        mark = len(mesh.log(mesh.runs))
        mesh.kill_peer(2)
        await asyncio.to_thread(mesh.wait_peer_restarted, 2, new2)
        await asyncio.to_thread(wait_log, mesh, r"peer 2/3 starting", timeout=30, after=mark)
        await asyncio.sleep(1.5)  # its heartbeats (a new incarnation) reach the coordinator mid-round
        os.kill(pids[1], signal.SIGCONT)
        stopped.clear()
        t_cont = time.monotonic()
        try:
            await wait_responsive(mesh.endpoint, probes, counter_query, timeout=30)
        except AssertionError as exc:
            notes = [
                ln
                for ln in mesh.log(mesh.runs).splitlines()[-400:]
                if "recovery round" in ln or "restarted" in ln or "processing (generation" in ln
            ]
            raise AssertionError(
                f"the mesh did not recover after a peer died during a recovery round: {exc}\n" + "\n".join(notes[-25:])
            ) from None
        print(
            f"[cascade] every peer answers {time.monotonic() - t_cont:.2f} s after peer 1 resumed; "
            f"rounds: {recovery_rounds(mesh.log())}"
        )
        counts = await read_counts(clients, keys, deadline=deadline)
        assert counts == {k: 1 for k in keys}, {k: v for k, v in counts.items() if v != 1}
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        await clients.aclose()
