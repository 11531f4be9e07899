"""Faults other than crashes, with real parts: the blob store down or refusing writes, the
blob store's disk full, the peers' state disk full. ``statefun-mesh run`` with 3 peer
processes and a counter workload whose clients retry with idempotency keys; the fault
comes and goes while it runs; then a peer is SIGKILLed, and every key's count must be
exactly what was acknowledged, every increment in the egress exactly once.

Full disks are small tmpfs mounts (``mount -t tmpfs -o size=...``): where mounting is
not permitted (no CAP_SYS_ADMIN) those tests skip and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import stat
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh import MeshClient
from statefun_mesh.errors import StatefunMeshError
from tests.integration import crash_app as app
from tests.integration.crash_util import (
    Clients,
    CrashMesh,
    FileBlobs,
    S3Blobs,
    probe_ids,
    wait_log,
    wait_responsive,
)
from tests.integration.support import fill_disk, mount_tmpfs, read_egress, unmount
from tests.integration.test_crash_recovery import (
    app_client,
    counter_query,
    kill_and_wait,
    read_counts,
    start_mesh,
    wait_new_checkpoints,
)

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]

BUCKET = "statefun-faults"
CHECKPOINT_FAILED = r"checkpoint \d+ could not be written: [^\n]*"
ABORTED = r"checkpoint \d+ aborted: [^\n]*"


# -- fixtures: meshes, tmpfs mounts, a private S3 server ------------------------------------


class Env:
    """Meshes and tmpfs mounts of one test; torn down in that order (processes first)."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.meshes: list[CrashMesh] = []
        self.mounts: list[Path] = []
        self.closers: list[Callable[[], None]] = []

    def mesh(self, **kw: Any) -> CrashMesh:
        m = CrashMesh(self.tmp.mktemp("fault"), **kw)
        self.meshes.append(m)
        return m

    def tmpfs(self, path: Path, size: str) -> Path:
        """Mount a tmpfs of ``size`` at ``path``, or skip the test saying why it cannot."""
        mount_tmpfs(path, size)
        self.mounts.append(path)
        return path

    def teardown(self) -> None:
        for m in self.meshes:
            m.cleanup()
        for close in self.closers:
            close()
        for path in reversed(self.mounts):
            unmount(path)


@pytest.fixture
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory)
    try:
        yield e
    finally:
        e.teardown()


# -- the workload ---------------------------------------------------------------------------


class Workload:
    """``workers`` clients sending increments ``inc-<n>`` to ``keys`` counters until stopped;
    every send retries (same idempotency key) until acknowledged."""

    def __init__(self, clients: Clients, *, keys: int = 40, workers: int = 4, pause: float = 0.01) -> None:
        self.clients = clients
        self.keys = [f"f{j}" for j in range(keys)]
        self.workers = workers
        self.pause = pause
        self.sent: Counter[str] = Counter()
        self.plan: list[tuple[str, str]] = []  # (increment, key) acknowledged
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self._next = 0

    @property
    def acked(self) -> int:
        return len(self.plan)

    def start(self, deadline: float) -> None:
        async def worker(w: int) -> None:
            while not self.stopping.is_set():
                i = self._next
                self._next += 1
                inc, key = f"inc-{i}", self.keys[i % len(self.keys)]
                await self.clients.send(
                    app.json_message(app.COUNTER, key, {"inc": inc}), inc, first=w, deadline=deadline
                )
                self.sent[key] += 1
                self.plan.append((inc, key))
                await asyncio.sleep(self.pause)

        self.tasks = [asyncio.create_task(worker(w)) for w in range(self.workers)]

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    async def cancel(self) -> None:
        self.stopping.set()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def wait_acked(self, more: int, timeout: float, what: str) -> float:
        """Wait until ``more`` sends beyond the current count are acknowledged; return the seconds it took."""
        target = self.acked + more
        t0 = time.monotonic()
        while self.acked < target:
            for t in self.tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"{what}: {self.acked} of {target} sends acknowledged within {timeout} s; "
                    f"client errors {self.clients.errors}"
                )
            await asyncio.sleep(0.05)
        return time.monotonic() - t0


async def verify_exactly_once(mesh: CrashMesh, clients: Clients, work: Workload, deadline: float) -> None:
    """Every key's count is what was acknowledged; every increment is in the egress once."""
    want = {k: work.sent[k] for k in work.keys}
    final: dict[str, int] = {}
    settle = time.monotonic() + 30
    while time.monotonic() < settle:
        final = await read_counts(clients, work.keys, deadline=deadline)
        if final == want or any(final[k] > want[k] for k in work.keys):
            break
        await asyncio.sleep(0.5)
    wrong = {k: (final[k], want[k]) for k in work.keys if final[k] != want[k]}
    assert not wrong, f"{len(wrong)} keys with a wrong count (got, acknowledged): {wrong}\nlog: {mesh.log_path}"
    await wait_new_checkpoints(mesh, 2)
    async with app_client(mesh) as client:
        records = await read_egress(client, app.INCREMENTS, idle=3.0, timeout=max(deadline - time.monotonic(), 30))
    seen = Counter(r.as_string() for r in records)
    expected = {f"{key}|{inc}" for inc, key in work.plan}
    dups = {v: c for v, c in seen.items() if c > 1}
    missing = expected - set(seen)
    assert not dups and not missing and set(seen) <= expected, (
        f"egress: {len(records)} records for {work.acked} increments; duplicated {list(dups.items())[:5]}, "
        f"{len(missing)} missing, unexpected {sorted(set(seen) - expected)[:5]}"
    )


async def peer_checkpoint_status(clients: Clients) -> list[dict[str, Any]]:
    out = []
    for ep in clients.endpoints:
        async with MeshClient(ep, timeout=3.0) as c:
            try:
                out.append((await c.info())["status"]["checkpoints"])
            except StatefunMeshError as exc:
                out.append({"error": repr(exc)})
    return out


async def wait_status_failing(clients: Clients, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        st = await peer_checkpoint_status(clients)
        if any(s.get("failing") for s in st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"no peer reports failing checkpoints in its status within {timeout} s: {st}")
        await asyncio.sleep(0.2)


async def finish(mesh: CrashMesh, clients: Clients, work: Workload, deadline: float) -> None:
    """Checkpoints complete again; SIGKILL a peer under load; nothing lost, nothing doubled."""
    await wait_new_checkpoints(mesh, 2, timeout=40)
    await work.wait_acked(100, 20, "sends after the fault")
    victim = random.randrange(3)
    secs = await kill_and_wait(mesh, victim, probe_ids("probe"))
    await work.wait_acked(100, 30, "sends after the SIGKILL")
    await work.stop()
    print(
        f"[faults] SIGKILLed peer {victim}; the mesh answered {secs:.2f} s later; {work.acked} sends "
        f"acknowledged in all, client retries {clients.retries} {dict(clients.errors)}"
    )
    await verify_exactly_once(mesh, clients, work, deadline)


# -- 1. the blob store down -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def under_load(mesh: CrashMesh, *, acked: int = 0, what: str = "") -> AsyncIterator[tuple[Any, Workload, float]]:
    """Start ``mesh`` and a workload on it, to run until the test's deadline (170 s from now);
    yield (clients, workload, deadline) once two checkpoints completed and ``acked`` sends were
    acknowledged (``what`` names them). The workload and the clients are stopped after."""
    clients = await start_mesh(mesh)
    deadline = time.monotonic() + 170
    work = Workload(clients)
    try:
        work.start(deadline)
        await wait_new_checkpoints(mesh, 2)
        if acked:
            await work.wait_acked(acked, 20, what)
        yield clients, work, deadline
    finally:
        await work.cancel()
        await clients.aclose()


@contextlib.asynccontextmanager
async def s3_mesh_under_load(env: Env, prefix: str) -> AsyncIterator[tuple[Any, CrashMesh, Any, Workload, float]]:
    """A private S3 server (so it can be stopped), a mesh checkpointing to it under ``prefix``, and a
    workload on the mesh: yielded once two checkpoints completed and 100 sends were acknowledged,
    with the test's deadline (170 s). The workload, the clients and the mesh are stopped after."""
    from tests.s3server import create_bucket, require_s3_server, running_s3_server

    pytest.importorskip("boto3")
    require_s3_server()
    with running_s3_server() as server:
        create_bucket(server, BUCKET)
        blobs = S3Blobs(server, BUCKET, prefix)
        env.closers.append(blobs.close)
        mesh = env.mesh(blobs=blobs)
        try:
            async with under_load(mesh, acked=100, what="sends before the outage") as (clients, work, deadline):
                yield server, mesh, clients, work, deadline
        finally:
            mesh.cleanup()  # inside the server's lifetime, as the tests did


@pytest.mark.timeout(180)
async def test_s3_down_then_read_only_checkpoints_fail_processing_goes_on(env: Env) -> None:
    """The S3 server stops, then comes back read-only (refusing every write), then comes
    back whole: checkpoints fail meanwhile (logged, in the peers' status), client sends
    are acknowledged throughout, checkpoints complete again, and after a SIGKILL nothing
    acknowledged is lost or doubled."""
    async with s3_mesh_under_load(env, "outage") as (server, mesh, clients, work, deadline):
        mark = len(mesh.log(mesh.runs))
        server.stop()
        failed = await asyncio.to_thread(wait_log, mesh, CHECKPOINT_FAILED, timeout=30, after=mark)
        aborted = await asyncio.to_thread(wait_log, mesh, ABORTED, timeout=30, after=mark)
        print(f"\n[s3 down] {failed}\n[s3 down] {aborted}")
        assert server.endpoint_url in failed and "check that the server is running" in failed, failed
        status = await wait_status_failing(clients, 20)
        print(f"[s3 down] peer status: {status}")
        secs = await work.wait_acked(300, 30, "sends while the S3 server is down")
        print(f"[s3 down] 300 sends acknowledged in {secs:.2f} s while S3 was down")

        server.restart(read_only=True)
        mark = len(mesh.log(mesh.runs))
        failed = await asyncio.to_thread(wait_log, mesh, CHECKPOINT_FAILED, timeout=30, after=mark)
        print(f"[s3 read-only] {failed}")
        before = mesh.manifests()
        await work.wait_acked(300, 30, "sends while the S3 server refuses writes")
        assert mesh.manifests() == before, "a checkpoint completed on a read-only S3 server"

        server.restart()
        await finish(mesh, clients, work, deadline)
        print(f"[s3] checkpoints list:\n{mesh.checkpoints_list()}")
        st = await peer_checkpoint_status(clients)
        assert not any(s.get("failing") for s in st), st


@pytest.mark.timeout(180)
async def test_a_peer_restarting_while_s3_is_down_recovers_once_it_is_back(env: Env) -> None:
    """A SIGKILL while the S3 server is stopped: the recovery round cannot read the
    checkpoint, so it is retried (logged) rather than given up or mistaken for a bad
    checkpoint; once the server is back the mesh recovers by itself, exactly once."""
    async with s3_mesh_under_load(env, "restart-while-down") as (server, mesh, clients, work, deadline):
        mark = len(mesh.log(mesh.runs))
        server.stop()
        old, _ = mesh.kill_peer(1)
        await asyncio.to_thread(mesh.wait_peer_restarted, 1, old)
        retry = await asyncio.to_thread(
            wait_log,
            mesh,
            r"(retrying the round|cannot read checkpoint \d+ from the blob store)",
            timeout=40,
            after=mark,
        )
        print(f"\n[s3 down, peer restarted] {retry}")
        assert "skipping checkpoint" not in mesh.log(mesh.runs)[mark:], "a store outage was taken as a bad checkpoint"
        server.restart()
        await wait_responsive(mesh.endpoint, probe_ids("probe"), counter_query, timeout=60)
        await finish(mesh, clients, work, deadline)


def _root_bypasses_permissions(directory: Path) -> bool:
    probe = directory / ".write-probe"
    mode = stat.S_IMODE(directory.stat().st_mode)
    os.chmod(directory, 0o555)
    try:
        probe.write_bytes(b"x")
    except PermissionError:
        return False
    else:
        probe.unlink()
        return True
    finally:
        os.chmod(directory, mode)


@pytest.mark.timeout(180)
async def test_file_blob_store_unwritable_checkpoints_fail_processing_goes_on(env: Env) -> None:
    """The checkpoint directory becomes unwritable: ``chmod a-w`` where permissions hold;
    as root (who writes anyway) the directory is moved away and a file put in its place."""
    workdir = env.tmp.mktemp("blobs")
    root = workdir / "checkpoints"
    root.mkdir()
    as_root = _root_bypasses_permissions(root)
    mesh = env.mesh(blobs=FileBlobs(root))
    away = workdir / "checkpoints.away"
    broken = False

    def break_store() -> None:
        nonlocal broken
        if as_root:
            root.rename(away)
            root.write_bytes(b"not a directory")
        else:
            for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
                os.chmod(d, 0o555)
        broken = True

    def repair_store() -> None:
        nonlocal broken
        if not broken:
            return
        if as_root:
            root.unlink()
            away.rename(root)
        else:
            for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
                os.chmod(d, 0o755)
        broken = False

    env.closers.append(repair_store)
    async with under_load(mesh) as (clients, work, deadline):
        before = mesh.manifests()
        mark = len(mesh.log(mesh.runs))
        break_store()
        failed = await asyncio.to_thread(wait_log, mesh, CHECKPOINT_FAILED, timeout=30, after=mark)
        print(f"\n[file {'replaced by a file' if as_root else 'read-only'}] {failed}")
        want = "is not a directory" if as_root else "permission denied"
        assert str(root) in failed and want in failed, failed
        await wait_status_failing(clients, 20)
        secs = await work.wait_acked(300, 30, "sends while the blob store is unwritable")
        print(f"[file] 300 sends acknowledged in {secs:.2f} s while the blob store was unwritable")
        repair_store()
        assert mesh.manifests()[: len(before)] == before
        await finish(mesh, clients, work, deadline)


# -- 2. full disks --------------------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_blob_store_disk_full_checkpoints_fail_processing_goes_on(env: Env) -> None:
    """``file://`` on a small tmpfs that fills up: checkpoints fail naming the full disk,
    processing and acknowledgements go on, and all is well once space is freed."""
    workdir = env.tmp.mktemp("blobdisk")
    root = env.tmpfs(workdir / "mnt", "16m") / "checkpoints"
    mesh = env.mesh(blobs=FileBlobs(root))
    async with under_load(mesh) as (clients, work, deadline):
        mark = len(mesh.log(mesh.runs))
        filler = fill_disk(root.parent)
        failed = await asyncio.to_thread(wait_log, mesh, CHECKPOINT_FAILED, timeout=30, after=mark)
        print(f"\n[blob disk full] {failed}")
        assert "disk (or quota) is full" in failed and str(root) in failed, failed
        await wait_status_failing(clients, 20)
        secs = await work.wait_acked(300, 30, "sends while the blob store's disk is full")
        print(f"[blob disk full] 300 sends acknowledged in {secs:.2f} s while the blob store's disk was full")
        filler.unlink()
        await finish(mesh, clients, work, deadline)


@pytest.mark.timeout(180)
async def test_state_disk_full_batches_fail_cleanly_and_resume(env: Env) -> None:
    """The peers' state disk (LMDB stores, ingress logs, local checkpoint copies) is a small
    tmpfs that fills up: client sends are refused with an error naming the full disk and
    what to do, batches fail whole and are retried; once space is freed everything goes on,
    and after a SIGKILL every acknowledged increment counts exactly once."""
    workdir = env.tmp.mktemp("statedisk")
    state = env.tmpfs(workdir / "state", "24m")
    mesh = env.mesh(state_dir=state, blobs=FileBlobs(workdir / "blobs"))
    async with under_load(mesh, acked=200, what="sends before the disk fills") as (clients, work, deadline):
        pids = mesh.peer_pids()
        mark = len(mesh.log(mesh.runs))
        filler = fill_disk(state)
        full = await asyncio.to_thread(
            wait_log, mesh, r"the disk holding the (ingress log|state store) at [^\n]*", timeout=30, after=mark
        )
        print(f"\n[state disk full] {full}")
        assert str(state) in full and "free space on that disk" in full, full
        # the clients see it too: their sends are refused with the same error and retried
        t0 = time.monotonic()
        while "StateCapacityError" not in clients.errors and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.1)
        assert "StateCapacityError" in clients.errors, clients.errors
        acked_full = work.acked
        await asyncio.sleep(3.0)
        print(
            f"[state disk full] {work.acked - acked_full} sends acknowledged in 3 s with the disk full; "
            f"client errors {dict(clients.errors)}"
        )
        assert mesh.peer_pids() == pids, f"peers died on the full disk: {pids} -> {mesh.peer_pids()}"
        filler.unlink()
        secs = await work.wait_acked(200, 30, "sends after space was freed")
        print(f"[state disk full] sends acknowledged again {secs:.2f} s after space was freed")
        await finish(mesh, clients, work, deadline)
        restarts = mesh.log().count("restarting")
        assert "dispatch loop died" not in mesh.log(), mesh.log_path
        print(f"[state disk full] launcher restarts in the log: {restarts}")


@pytest.mark.timeout(150)
async def test_state_store_disk_full_without_checkpoints_no_batch_half_applied(env: Env) -> None:
    """Without checkpoints there is no ingress log, so the state store itself hits the full
    disk: batches fail whole with an error naming the state store, the disk and the remedy,
    stay queued and are retried; once space is freed every admitted increment is applied
    exactly once (no batch half-applied, none lost, none doubled) and no peer died."""
    workdir = env.tmp.mktemp("statestore")
    state = env.tmpfs(workdir / "state", "24m")
    mesh = env.mesh(state_dir=state, checkpoints=False)
    clients = await start_mesh(mesh)
    deadline = time.monotonic() + 140
    work = Workload(clients, pause=0.002)
    try:
        work.start(deadline)
        await work.wait_acked(300, 20, "sends before the disk fills")
        pids = mesh.peer_pids()
        mark = len(mesh.log(mesh.runs))
        filler = fill_disk(state)
        full = await asyncio.to_thread(
            wait_log, mesh, r"could not write a batch of \d+ messages: [^\n]*", timeout=60, after=mark
        )
        print(f"\n[state store full] {full}")
        assert "the disk holding the state store at" in full and str(state) in full, full
        assert "free space on that disk" in full and "nothing of the batch was applied" in full, full
        await asyncio.sleep(2.0)  # batches keep failing and being retried; admission stops at inbox_limit
        assert mesh.peer_pids() == pids, f"peers died on the full disk: {pids} -> {mesh.peer_pids()}"
        filler.unlink()
        secs = await work.wait_acked(300, 30, "sends after space was freed")
        print(
            f"[state store full] sends acknowledged again {secs:.2f} s after space was freed; "
            f"{mesh.log(mesh.runs).count('could not write a batch')} failed batch attempts logged"
        )
        await work.stop()
        want = {k: work.sent[k] for k in work.keys}
        final: dict[str, int] = {}
        settle = time.monotonic() + 30
        while time.monotonic() < settle:
            final = await read_counts(clients, work.keys, deadline=deadline)
            if final == want or any(final[k] > want[k] for k in work.keys):
                break
            await asyncio.sleep(0.5)
        wrong = {k: (final[k], want[k]) for k in work.keys if final[k] != want[k]}
        assert not wrong, f"keys with a wrong count (got, admitted): {wrong}\nlog: {mesh.log_path}"
        assert "dispatch loop died" not in mesh.log()
    finally:
        await work.cancel()
        await clients.aclose()
