"""Integration fixtures: real clusters started with ``statefun-mesh run``, always cleaned up."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # the clusters import tests.integration.app from the repository root
    sys.path.insert(0, _ROOT)

from tests.integration.crash_util import CrashMesh  # noqa: E402
from tests.integration.support import Cluster, running_cluster  # noqa: E402


@pytest.fixture
def crash_meshes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., CrashMesh]]:
    """``crash_meshes(**CrashMesh options)``: crash-test meshes (``statefun-mesh run`` of peers one
    can SIGKILL), each in a directory of its own, checkpointing to <state-dir>/checkpoints unless
    given ``blobs``; every one is killed at teardown, with every peer it had."""
    started: list[CrashMesh] = []

    def make(**kw: Any) -> CrashMesh:
        m = CrashMesh(tmp_path_factory.mktemp("mesh"), **kw)
        started.append(m)
        return m

    yield make
    for m in started:
        m.cleanup()


@pytest.fixture
def start_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Cluster]]:
    """Start clusters of one's own (``start_cluster(transport="ipc", config=..., env=...)``);
    every one is stopped at teardown, also when the test failed."""
    with contextlib.ExitStack() as started:

        def start(transport: str = "ipc", **kwargs: Any) -> Cluster:
            workdir = tmp_path_factory.mktemp(f"cluster-{transport}")
            return started.enter_context(running_cluster(workdir, transport=transport, **kwargs))

        yield start


# ipc on the C core only: the transport is not hot-path code; the twin runs the shared cluster on tcp
@pytest.fixture(scope="session", params=["tcp", pytest.param("ipc", marks=pytest.mark.c_core_only)])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 3-peer cluster shared by the tests that leave it healthy (each uses ids of its own)."""
    with running_cluster(tmp_path_factory.mktemp(f"shared-{request.param}"), transport=request.param) as c:
        yield c


@pytest.fixture
def cluster_endpoint(cluster: Cluster) -> str:
    """The client endpoint of the shared cluster (peer 0's)."""
    return cluster.endpoint


@pytest.fixture(scope="session")
def mesh_s3_server() -> Iterator[Any]:
    """One local S3 server (``rclone serve s3`` on 127.0.0.1) with bucket ``statefun-mesh``,
    shared by the tests that run meshes on ``s3://`` (each under a prefix of its own).
    Skips without the server binary, but fails under CI (see tests/s3server.py)."""
    from tests.s3server import create_bucket, require_s3_server, running_s3_server

    if os.environ.get("CI") is None:
        pytest.importorskip("boto3", reason="s3:// blob stores need boto3: pip install 'statefun-mesh[s3]'")
    require_s3_server()
    with running_s3_server() as server:
        create_bucket(server, MESH_BUCKET)
        yield server


@pytest.fixture(scope="module")
def nats_server() -> Iterator[Any]:
    """A real ``nats-server -js`` on 127.0.0.1 for one test module (the NATS ingress's or egress's).
    Skips without the binary, but fails under CI (see tests/natsserver.py)."""
    from tests.natsserver import require_nats_server, running_nats_server

    require_nats_server()
    with running_nats_server() as server:
        yield server


MESH_BUCKET = "statefun-mesh"
