"""Rescaling with `statefun-mesh run --restore latest`, real processes and real crashes.

A 3-peer mesh counts; the whole mesh is SIGKILLed (peers first, then the launcher)
after messages were acknowledged past the last checkpoint. It comes back on 2 peers
with `--restore latest`, and peer 0 is SIGKILLed again before a checkpoint of the new
shape exists: the launcher restarts it without `--restore`, and the mesh must rescale
again rather than refuse or restore the wrong thing. Every count must be exact.
A later start with another --peers and no --restore is refused with exit status 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration import crash_app as app
from tests.integration.crash_util import Clients, CrashMesh, probe_ids, reply_json, wait_responsive
from tests.integration.support import gather_bounded

pytestmark = [pytest.mark.integration, pytest.mark.timeout(170)]

KEYS = 60


def increment(key: str, n: int) -> Any:
    return app.json_message(app.COUNTER, key, {"inc": n})


async def send_all(clients: Clients, items: list[tuple[str, str]], deadline: float) -> None:
    async def one(i: int, key: str, idem: str) -> None:
        await clients.send(increment(key, i), idem, first=i, deadline=deadline)

    await gather_bounded((one(i, k, idem) for i, (k, idem) in enumerate(items)), 16)


async def read_counts(clients: Clients, keys: list[str], deadline: float) -> dict[str, int]:
    async def one(i: int, key: str) -> tuple[str, int]:
        r = await clients.request(app.query(app.COUNTER, key), first=i, deadline=deadline)
        return key, reply_json(r)["count"]

    return dict(await gather_bounded((one(i, k) for i, k in enumerate(keys)), 16))


def crash_everything(mesh: CrashMesh) -> None:
    """SIGKILL the launcher, then every peer: nothing gets to stop cleanly. (Launcher first:
    it restarts a dead peer at once, so a peer killed before it could come back.)"""
    pids = mesh.peer_pids()
    assert mesh.proc is not None
    os.killpg(mesh.proc.pid, signal.SIGKILL)
    mesh.proc.wait(10)
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    mesh.cleanup()


async def test_rescale_3_to_2_with_a_crash_before_the_first_new_checkpoint(
    crash_meshes: Callable[..., CrashMesh],
) -> None:
    deadline = time.monotonic() + 150
    keys = [f"r{i}" for i in range(KEYS)]
    expected = dict.fromkeys(keys, 0)
    mesh = crash_meshes(peers=3, checkpoint_interval=0.5)
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    clients = await Clients.connect(mesh.endpoint)
    try:
        first = [(keys[i % KEYS], f"a{i}") for i in range(KEYS * 4)]
        await send_all(clients, first, deadline)
        for k, _ in first:
            expected[k] += 1
        have = mesh.manifests()
        while len([n for n in mesh.manifests() if n > (have[-1] if have else -1)]) < 2:
            assert time.monotonic() < deadline, "no checkpoints"
            await asyncio.sleep(0.1)
        # acknowledged now; some only in the ingress logs when everything dies
        late = [(keys[i % KEYS], f"b{i}") for i in range(KEYS * 2)]
        await send_all(clients, late, deadline)
        for k, _ in late:
            expected[k] += 1
    finally:
        await clients.aclose()
    crash_everything(mesh)

    # 3 -> 2, and the new peer 0 dies before any checkpoint of the new shape
    mesh.peers = 2
    mesh.checkpoint_interval = 60.0
    mesh.extra_args = ["--restore", "latest"]
    mesh.start()
    await asyncio.to_thread(mesh.wait_up)
    old, _ = mesh.kill_peer(0)
    await asyncio.to_thread(mesh.wait_peer_restarted, 0, old)
    probes = probe_ids("probe", peers=2)
    await wait_responsive(mesh.endpoint, probes, lambda k: app.query(app.COUNTER, k), timeout=60)
    clients = await Clients.connect(mesh.endpoint)
    try:
        counts = await read_counts(clients, keys, deadline)
        wrong = {k: (counts[k], n) for k, n in expected.items() if counts[k] != n}
        assert not wrong, f"{len(wrong)} counts wrong (have, expected): {list(wrong.items())[:5]}\n{mesh.log()[-3000:]}"
        # resends of keys applied before the rescale are still deduplicated
        await send_all(clients, first[:KEYS] + late[:KEYS], deadline)
        assert await read_counts(clients, keys, deadline) == expected
    finally:
        await clients.aclose()
    log = mesh.log()
    assert log.count("rescaling: checkpoint") >= 2, log[-3000:]  # once asked, once after the crash
    assert mesh.stop() == 0

    # another shape without --restore: refused, saying how
    mesh.peers = 4
    mesh.extra_args = []
    mesh.start()
    assert mesh.proc is not None
    code = await asyncio.to_thread(mesh.proc.wait, 60)
    assert code == 2, mesh.log(mesh.runs)[-3000:]
    assert "--restore latest" in mesh.log(mesh.runs)
