"""`statefun-mesh run` serves every peer's metrics and health on ports it prints, keeps
them across a peer's restart, and `--no-metrics` serves none."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from statefun_mesh import MeshClient, StatefunMeshError
from statefun_mesh.security import ClientKeys, generate_keypair, public_of, read_key
from tests.integration.support import running_cluster, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def metric(text: str, name: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and not s.labels:
                return s.value
    raise KeyError(name)


def test_run_prints_metrics_ports_and_keeps_them_across_a_restart(tmp_path_factory: pytest.TempPathFactory) -> None:
    with running_cluster(tmp_path_factory.mktemp("metrics"), peers=2, args=("--checkpoint-interval", "0.5")) as cluster:
        m = re.search(
            r"metrics at (http://127\.0\.0\.1:\d+)/metrics, (http://127\.0\.0\.1:\d+)/metrics", cluster.output()
        )
        assert m, cluster.output()
        urls = [m.group(1), m.group(2)]
        assert f"dashboard at {urls[0]}/" in cluster.output()
        for url in urls:
            assert fetch(url + "/healthz") == (200, "ok\n")
            wait_until(lambda u=url: fetch(u + "/readyz") == (200, "ready\n"), 30, "ready")
            assert metric(fetch(url + "/metrics")[1], "statefun_mesh_recoveries_total") == 0
        assert fetch(urls[1] + "/")[0] == 404  # the dashboard is peer 0's only
        assert "<title>statefun-mesh</title>" in fetch(urls[0] + "/")[1]

        # run's mesh uses CURVE: a client with a key the mesh does not know is refused, and counted
        server = read_key(str(cluster.state_dir / "keys" / "peer-0.key_secret"), secret=True)
        stranger = generate_keypair()
        keys = ClientKeys(stranger.public, stranger.secret, {cluster.endpoint: public_of(server)})

        async def intrude() -> None:
            async with MeshClient(cluster.endpoint, timeout=1.0, keys=keys) as c:
                await c.info()

        with pytest.raises((StatefunMeshError, TimeoutError)):
            asyncio.run(intrude())
        wait_until(
            lambda: metric(fetch(urls[0] + "/metrics")[1], "statefun_mesh_client_refused_connections_total") >= 1,
            10,
            "the refusal counted",
        )

        victim = cluster.peer_pids()[1]
        os.kill(victim, signal.SIGKILL)
        # the restarted peer serves where it did, and the mesh recovered: peer 0 counts it
        wait_until(lambda: cluster.peer_pids().get(1) not in (None, victim), 30, "peer 1 restarted")
        wait_until(lambda: fetch(urls[1] + "/readyz") == (200, "ready\n"), 60, "peer 1 ready again")
        wait_until(
            lambda: (
                fetch(urls[0] + "/readyz") == (200, "ready\n")
                and metric(fetch(urls[0] + "/metrics")[1], "statefun_mesh_recoveries_total") >= 1
            ),
            60,
            "peer 0 recovered",
        )


def test_no_metrics(tmp_path_factory: pytest.TempPathFactory) -> None:
    with running_cluster(tmp_path_factory.mktemp("nometrics"), peers=1, args=("--no-metrics",)) as cluster:
        assert "metrics at" not in cluster.output() and "dashboard" not in cluster.output()
