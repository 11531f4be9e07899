"""What the in-process mesh tests share: the settings of a checkpointing :class:`LocalMesh` over a
test's own directory, and a bounded wait for a condition.

Usage::

    async with LocalMesh(app(), peers=2, **mesh_settings(tmp_path)) as mesh:
        await wait_for(lambda: ..., 30, "what it waits for")

A second mesh started with the same ``tmp_path`` finds the first one's state and checkpoints
(``<tmp_path>/state``, ``<tmp_path>/blobs``): that is how the recovery and rescale tests restart.
Meshes of processes (``statefun-mesh run``) are in tests/integration: ``support.running_cluster``
and the ``crash_meshes`` fixture.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["checkpoint_then_recover", "mesh_settings", "wait_for"]


def mesh_settings(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """LocalMesh keyword arguments: state in ``<tmp_path>/state``, checkpoints every 0.2 s to
    ``file://<tmp_path>/blobs``, heartbeats every 0.1 s (a peer is lost after 1 s); ``overrides`` win."""
    settings: dict[str, Any] = dict(
        state_dir=str(tmp_path / "state"),
        blob_store=f"file://{tmp_path / 'blobs'}",
        checkpoint_interval=0.2,
        heartbeat_interval=0.1,
        heartbeat_timeout=1.0,
    )
    settings.update(overrides)
    return settings


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` is true, checking every 20 ms; AssertionError after ``timeout`` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def checkpoint_then_recover(mesh: Any, min_inflight: int) -> None:
    """Take a checkpoint now (its cut must hold more than ``min_inflight`` messages in flight),
    then start a recovery round, wait until every peer has resumed and the mesh is idle."""
    coord = mesh.peers[0].coordinator
    n_ck = coord.trigger()
    await wait_for(
        lambda: coord.last_complete is not None and coord.last_complete.checkpoint >= n_ck, 30, "the checkpoint"
    )
    inflight = sum(part.inflight.entries for part in coord.last_complete.parts)
    assert inflight > min_inflight, f"the cut held {inflight} messages in flight"
    coord.request_recovery("a test")
    await wait_for(lambda: all(p.recoveries >= 1 and p.resumed for p in mesh.peers), 30, "every peer to resume")
    await asyncio.wait_for(mesh.idle(), 120)
