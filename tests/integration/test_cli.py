"""The ``statefun-mesh`` client commands against a running cluster (tcp and ipc)."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from statefun_mesh import MeshClient
from statefun_mesh.mesh import free_ports
from tests.integration import app
from tests.integration.support import Cluster, ids_on, read_egress, run_cli

#: the CLI client commands and their messages: no hot-path code
pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]


def cli(cluster: Cluster, *args: str, timeout: float = 30.0):
    return run_cli(*args, "--endpoint", cluster.endpoint, timeout=timeout)


def test_send_then_request(cluster: Cluster) -> None:
    key = f"cli-{uuid.uuid4().hex[:8]}"
    sent = cli(cluster, "send", app.COUNTER, key, "--int", "5")
    assert sent.returncode == 0, sent.stderr
    assert f"sent to {app.COUNTER}/{key}" in sent.stderr
    assert sent.stdout == ""
    got = cli(cluster, "request", app.COUNTER, key, "--int", "2")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {"from": f"{app.COUNTER}/{key}", "type": "io.statefun.types/int", "value": 7}


def test_request_with_json(cluster: Cluster) -> None:
    key = f"cli-{uuid.uuid4().hex[:8]}"
    got = cli(cluster, "request", app.EMIT, key, "--json", json.dumps({"egress": "it/cli-json", "n": 2, "tag": "j"}))
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["value"] == 2


@pytest.mark.timeout(90)
async def test_egress_prints_records_of_every_peer_and_stops_when_idle(cluster: Cluster) -> None:
    run = uuid.uuid4().hex[:8]
    egress = f"it/cli-{run}"
    emitters = [ids_on(p, f"{run}-e", 1)[0] for p in range(3)]
    for e in emitters:
        r = cli(cluster, "request", app.EMIT, e, "--json", json.dumps({"egress": egress, "n": 3, "tag": run}))
        assert r.returncode == 0, r.stderr
    # Records become readable once the checkpoint that produced them completes.
    async with MeshClient(cluster.endpoint, timeout=10) as client:
        await read_egress(client, egress, count=9, timeout=40)
    try:
        out = cli(cluster, "egress", egress, "--idle", "1", timeout=20)
    except subprocess.TimeoutExpired as exc:
        printed = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(
            f"`statefun-mesh egress --idle 1` had not exited 20 s later, after printing "
            f"{len(printed.splitlines())} of 9 records (see test_client_egress.py)"
        )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 9
    assert {(d["peer"], d["offset"]) for d in lines} == {(p, o) for p in range(3) for o in range(3)}
    assert {d["value"] for d in lines} == {f"{run}:{e}:{i}" for e in emitters for i in range(3)}
    assert {d["type"] for d in lines} == {"io.statefun.types/string"}
    limited = cli(cluster, "egress", egress, "--limit", "4", timeout=20)
    assert limited.returncode == 0, limited.stderr
    assert len(limited.stdout.splitlines()) == 4


def test_status(cluster: Cluster) -> None:
    out = cli(cluster, "status", "--json")  # without --json: a table (test_cli_rough_edges.py)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["peers"] == 3 and doc["max_parallelism"] == 1024
    assert app.COUNTER in doc["functions"] and app.SEQ in doc["functions"]
    assert [s["peer"] for s in doc["status"]] == [0, 1, 2]
    for s in doc["status"]:
        assert s["unavailable_peers"] == [] and isinstance(s["bad_frames"], int)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["send", app.COUNTER, "k", "--int", "abc"], "abc"),
        (["send", app.COUNTER, "k", "--int", "99999999999"], "int32"),
        (["request", app.COUNTER, "k", "--bool", "maybe"], "maybe"),
        (["send", app.COUNTER, "k", "--json", "{not json"], "not valid JSON"),
        (["send", app.COUNTER, "k", "--int", "1", "--str", "x"], "exactly one value"),
        (["send", app.COUNTER, "k"], "exactly one value"),
        (["send", "no-namespace", "k", "--int", "1"], "no-namespace"),
        (["send", app.COUNTER, "", "--int", "1"], "id"),
        (["send", "it/nope", "k", "--int", "1"], "no function is bound to type 'it/nope'"),
        (["request", "it/nope", "k", "--int", "1"], "it/nope"),
        (["egress", "not a type name"], "not a type name"),
    ],
)
def test_bad_input_exits_with_2_and_says_why(cluster: Cluster, args: list[str], message: str) -> None:
    out = cli(cluster, *args)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert f"statefun-mesh {args[0]}: error:" in out.stderr, out.stderr
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_unreachable_endpoint_exits_with_2() -> None:
    port = free_ports(1)[0]
    out = run_cli("status", "--endpoint", f"tcp://127.0.0.1:{port}", "--timeout", "1", timeout=30)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "no answer" in out.stderr and str(port) in out.stderr
    assert "Traceback" not in out.stderr
