"""End to end: a StateFun program written with the official SDK, served by aiohttp in a
process of its own, driven through ``statefun-mesh run --module module.yaml`` with a
SIGKILL of a peer in the middle: state counts, delayed messages (with cancellations)
and egress records each exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from statefun_mesh import DEAD_LETTERS, message_builder
from statefun_mesh.mesh import free_ports
from tests.integration.crash_util import Clients, CrashMesh
from tests.integration.support import ROOT, read_egress

pytestmark = pytest.mark.integration

REMOTE_APP = Path(__file__).with_name("remote_app.py")


def start_function_server(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_ports(1)[0]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    log = open(workdir / "functions.log", "wb")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(
        [sys.executable, str(REMOTE_APP), str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                text = (workdir / "functions.log").read_text()
                raise AssertionError(f"function server did not start:\n{text}") from None
            time.sleep(0.05)


async def test_official_sdk_remote_function_exactly_once_across_a_sigkill(tmp_path: Path) -> None:
    pytest.importorskip("statefun", reason="the official SDK (apache-flink-statefun, in the dev extra)")
    server, port = start_function_server(tmp_path)
    module = tmp_path / "module.yaml"
    module.write_text(
        "kind: io.statefun.endpoints.v2/http\n"
        "spec:\n"
        "  functions: remote.example/*\n"
        f"  urlPathTemplate: http://127.0.0.1:{port}/{{function.name}}\n"
        "  transport:\n"
        "    timeouts: {call: 30 sec}\n"
    )
    mesh = CrashMesh(tmp_path / "mesh", checkpoint_interval=0.3)
    (tmp_path / "mesh").mkdir()
    mesh.extra_args = ["--module", str(module)]
    ids = [f"c{i}" for i in range(6)]
    per_id = 30
    try:
        mesh.start()
        mesh.wait_up()
        clients = await Clients.connect(mesh.endpoint)
        try:
            deadline = time.monotonic() + 120

            async def send_round(r: int) -> None:
                await asyncio.gather(
                    *(
                        clients.send(
                            message_builder("remote.example/counter", id, int_value=1),
                            f"{id}-{r}",
                            first=i,
                            deadline=deadline,
                        )
                        for i, id in enumerate(ids)
                    )
                )

            for r in range(per_id // 2):
                await send_round(r)
            old_pid, _ = mesh.kill_peer(1)
            for r in range(per_id // 2, per_id):
                await send_round(r)
            mesh.wait_peer_restarted(1, old_pid)
            counts = await read_egress(clients.clients[0], "e/counts", count=len(ids) * per_id, timeout=90)
            ticks = await read_egress(clients.clients[0], "e/ticks", count=len(ids) * per_id // 2, timeout=60)
            # nothing more arrives: wait past a few checkpoints and read everything
            await asyncio.sleep(1.5)
            counts = await read_egress(clients.clients[0], "e/counts", idle=1.0, timeout=60)
            ticks = await read_egress(clients.clients[0], "e/ticks", idle=1.0, timeout=60)
            dead = await read_egress(clients.clients[0], DEAD_LETTERS, idle=0.5, timeout=30)
        finally:
            await clients.aclose()
        seen = Counter((d["id"], d["count"]) for d in (json.loads(r.as_string()) for r in counts))
        assert seen == Counter({(id, c): 1 for id in ids for c in range(1, per_id + 1)}), "counts not exactly once"
        fired = Counter((d["id"], d["n"]) for d in (json.loads(r.as_string()) for r in ticks))
        # odd counts' delayed messages fire once each; even ones were cancelled in the same call
        assert fired == Counter({(id, c): 1 for id in ids for c in range(1, per_id + 1, 2)}), "timers not exactly once"
        assert dead == [], [r.raw_value()[:300] for r in dead]
        assert "recover" in mesh.log().lower()  # the kill did roll the mesh back
    finally:
        mesh.cleanup()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
