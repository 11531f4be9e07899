"""A peer process whose delayed messages were all cancelled is idle (no CPU) and stops at
once on SIGTERM (issue 7 item 2: it spun at 100 % and needed SIGKILL after 15 s)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from statefun_mesh import MeshClient, message_builder
from statefun_mesh.mesh import free_ports
from tests.integration.support import ROOT, _cmdline, children, cpu_seconds


@pytest.mark.timeout(90)
async def test_idle_peer_process_with_cancelled_timers(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    out = tmp_path / "run.out"
    with open(out, "wb") as fh, open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "statefun_mesh",
                "run",
                "tests.integration.timer_app:functions",
                "--peers",
                "1",
                "--transport",
                "ipc",
                "--client-endpoint",
                endpoint,
                "--state-dir",
                str(tmp_path / "state"),
            ],
            cwd=ROOT,
            stdout=fh,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    peer_pid = None
    peer_cmd: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while "is up" not in out.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            await asyncio.sleep(0.05)
        (peer_pid,) = [p for p in children(proc.pid) if "--id" in _cmdline(p)]
        peer_cmd = _cmdline(peer_pid)
        async with MeshClient(endpoint, timeout=20) as client:
            for i in range(3):
                await client.send(
                    message_builder(target_typename="it/sched", target_id=f"s{i}", str_value=f"schedule:t{i}")
                )
                await client.send(
                    message_builder(target_typename="it/sched", target_id=f"s{i}", str_value=f"cancel:t{i}")
                )
            await asyncio.sleep(1.0)  # past every due time, and past the checkpoint after the sends
            status = (await client.info())["status"]
        assert status["next_timer_ms"] is None, status
        assert status["failures"] == 0, status
        cpu0, wall0 = cpu_seconds(peer_pid), time.monotonic()
        await asyncio.sleep(1.5)
        cpu, wall = cpu_seconds(peer_pid) - cpu0, time.monotonic() - wall0
        async with MeshClient(endpoint, timeout=20) as client:
            batches = (await client.info())["status"]["batches"] - status["batches"]
        print(f"idle peer: {cpu:.2f} s CPU in {wall:.2f} s, {batches} batches")
        assert batches <= 1, f"the idle peer ran {batches} batches"  # spinning: tens of thousands a second
        assert cpu < 0.1 * wall, f"the idle peer used {cpu:.2f} s of CPU in {wall:.2f} s"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        stopped_in = time.monotonic() - t0
        print(f"stopped {stopped_in:.2f} s after SIGTERM")
        assert proc.returncode == 0 or stopped_in < 5, proc.returncode
        assert stopped_in < 5, f"statefun-mesh run took {stopped_in:.1f} s to stop on SIGTERM"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if peer_pid is not None and _cmdline(peer_pid) == peer_cmd:
            try:
                os.kill(peer_pid, signal.SIGKILL)  # a peer runs in a session of its own
            except ProcessLookupError:
                pass
