"""What the two NATS benches (nats_ingress_perf.py, nats_egress_perf.py) share: a NATS server and
a mesh to run against, and timing one run of a bridge process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.integration.support import Cluster, cpu_seconds, running_cluster  # noqa: E402
from tests.natsserver import NatsServer, running_nats_server  # noqa: E402


@contextlib.contextmanager
def nats_and_mesh(prefix: str, peers: int, *mesh_args: str) -> Iterator[tuple[NatsServer, Cluster, Path]]:
    """A NATS server, a ``statefun-mesh run`` mesh of ``peers`` peers (with ``mesh_args``) and a
    temporary directory; all stopped and removed after."""
    with (
        running_nats_server() as server,
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        running_cluster(Path(tmp), peers=peers, args=mesh_args) as mesh,
    ):
        yield server, mesh, Path(tmp)


def time_bridge(
    cmd: list[str], log: Path, wait: Callable[[subprocess.Popen[bytes]], Awaitable[float]]
) -> tuple[float, float]:
    """Start the bridge ``cmd`` (``python -m statefun_mesh nats-...``) logging to ``log``, run
    ``wait(proc)`` (the seconds it measures), terminate the bridge. Returns the seconds and the
    bridge's CPU seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        secs = asyncio.run(wait(proc))
        cpu = cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return secs, cpu


__all__ = ["ROOT", "nats_and_mesh", "time_bridge"]
