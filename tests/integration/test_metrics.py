"""Prometheus metrics, /healthz and /readyz, scraped over real HTTP from real peers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from statefun_mesh import (
    ConfigError,
    IntType,
    LocalMesh,
    MeshConfig,
    StatefulFunctions,
    StatefunMeshError,
    ValueSpec,
    message_builder,
)
from statefun_mesh.config import load_config
from statefun_mesh.peer import Peer
from tests.meshes import mesh_settings

pytestmark = pytest.mark.timeout(120)


def app(slept: list[float] | None = None) -> StatefulFunctions:
    """The test app; ``slept`` collects how long each m/slow invocation's own sleep took."""
    functions = StatefulFunctions()

    @functions.bind(typename="m/counter", specs=[ValueSpec(name="n", type=IntType)])
    def counter(context, message):
        context.storage.n = (context.storage.n or 0) + 1
        if context.address.id.startswith("fwd"):
            context.send(message_builder(target_typename="m/slow", target_id=context.address.id, int_value=1))

    @functions.bind(typename="m/slow")
    def slow(context, message):
        t = time.perf_counter()
        time.sleep(0.003)  # 3 ms: lands in the (0.0025, 0.005] latency bucket on an idle machine
        if slept is not None:
            slept.append(time.perf_counter() - t)

    @functions.bind(typename="m/bad")
    def bad(context, message):
        raise ValueError("always")

    return functions


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def scrape(peer: Peer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = await get(peer.http.url + "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def settings(tmp_path: Path, peers: int, **kw: Any) -> dict[str, Any]:
    return mesh_settings(
        tmp_path, **{"metrics_endpoints": ("127.0.0.1:0",) * peers, "peers": peers, "transport": "ipc", **kw}
    )


async def test_metrics_move_with_load_and_match_status(tmp_path: Path) -> None:
    slept: list[float] = []
    async with LocalMesh(app(slept), **settings(tmp_path, 2)) as mesh:
        p0, p1 = mesh.peers
        before = [await scrape(p) for p in (p0, p1)]
        for p, s in zip((p0, p1), before, strict=True):
            assert value(s, "statefun_mesh_ready") == 1
            info = [dict(k[1]) for k in s if k[0] == "statefun_mesh_peer_info"]
            assert info == [{"peer": str(p.peer_id), "peers": "2", "core": info[0]["core"]}]
            assert (
                value(s, "statefun_mesh_invocations_total", function_type="m/counter") == 0
                if ("statefun_mesh_invocations_total", (("function_type", "m/counter"),)) in s
                else True
            )
        n = 300
        for i in range(n):
            await p0.send(message_builder(target_typename="m/counter", target_id=f"k{i % 50}", int_value=1))
        for i in range(20):
            await p0.send(message_builder(target_typename="m/counter", target_id=f"fwd{i}", int_value=1))
        await p0.send(message_builder(target_typename="m/bad", target_id="x", int_value=1))
        await mesh.idle(timeout=30)
        after = [await scrape(p) for p in (p0, p1)]

        def total(name: str, samples: list[dict], **labels: str) -> float:
            return sum(s.get((name, tuple(sorted(labels.items()))), 0.0) for s in samples)

        assert total("statefun_mesh_invocations_total", after, function_type="m/counter") == n + 20
        assert total("statefun_mesh_invocations_total", after, function_type="m/slow") == 20
        assert total("statefun_mesh_invocation_failures_total", after, function_type="m/bad") == 1
        assert total("statefun_mesh_dead_letters_total", after) == 1

        # The slow function's 3 ms invocations: none at or under 2.5 ms (a sleep never ends
        # early), every one under 1 s: seconds, neither milliseconds (3.0, over 1 s) nor
        # microseconds (under 2.5 ms). Not "all under 10 ms": on a loaded machine a 3 ms
        # sleep, and the time around it, can take longer (the function's own clock says how
        # long its sleeps took; the histogram measures at least that much).
        def bucket(le: str) -> float:
            return total("statefun_mesh_invocation_duration_seconds_bucket", after, function_type="m/slow", le=le)

        assert len(slept) == 20, slept
        assert bucket("0.0025") == 0
        assert bucket("1.0") == bucket("+Inf") == 20
        assert total("statefun_mesh_invocation_duration_seconds_count", after, function_type="m/slow") == 20
        assert total("statefun_mesh_invocation_duration_seconds_sum", after, function_type="m/slow") >= sum(slept)
        # every message sent through peer 0 entered there and was routed locally or to peer 1
        assert value(after[0], "statefun_mesh_messages_in_total") == n + 21
        routed = (
            total("statefun_mesh_messages_routed_local_total", after)
            + total("statefun_mesh_messages_routed_remote_total", after, to_peer="0")
            + total("statefun_mesh_messages_routed_remote_total", after, to_peer="1")
        )
        assert routed == n + 21 + 20  # and the 20 forwarded by m/counter
        # messages went to the other peer: frames were sent, and credit came back for them
        assert total("statefun_mesh_peer_frames_sent_total", after) > 0
        assert (
            total("statefun_mesh_credit_frames_total", after) + total("statefun_mesh_credits_carried_total", after) > 0
        )
        assert value(after[1], "statefun_mesh_messages_received_from_peers_total") == value(
            after[0], "statefun_mesh_messages_routed_remote_total", to_peer="1"
        )
        assert total("statefun_mesh_egress_records_total", after) == 1  # the dead letter
        for p, s in zip((p0, p1), after, strict=True):
            st = p.status()
            assert value(s, "statefun_mesh_batch_size_messages_count") == st["batches"] == p.batches
            assert value(s, "statefun_mesh_batch_size_messages_bucket", le="+Inf") == st["batches"]
            for t, c in st["functions"].items():
                assert value(s, "statefun_mesh_invocations_total", function_type=t) == c["invocations"]
            assert value(s, "statefun_mesh_inbox_messages") == st["queued"] == 0
            # heartbeats and checkpoint barriers keep going out between the scrape and status()
            frames = st["frames"]
            assert value(s, "statefun_mesh_peer_frames_sent_total") <= frames["sent"]
            assert value(s, "statefun_mesh_credit_frames_total") <= frames["credit_frames"]
            assert value(s, "statefun_mesh_credits_carried_total") <= frames["credits_carried"]
            assert value(s, "statefun_mesh_state_bytes") > 0
        # checkpoints complete and are counted; their age is small
        await asyncio.sleep(0.6)
        low = p1.status()["checkpoints"]["last_complete"]
        s = await scrape(p1)
        high = p1.status()["checkpoints"]["last_complete"]
        assert value(s, "statefun_mesh_checkpoints_total") >= 1
        assert value(s, "statefun_mesh_checkpoint_failures_total") == 0
        assert low <= value(s, "statefun_mesh_checkpoint_last_complete") <= high
        assert 0 <= value(s, "statefun_mesh_checkpoint_age_seconds") < 5
        assert value(s, "statefun_mesh_checkpoint_written_bytes_total") > 0
        assert value(s, "process_start_time_seconds") > 0


async def test_readyz_is_503_until_the_mesh_has_recovered_then_200(tmp_path: Path) -> None:
    config = MeshConfig(
        **{k: v for k, v in settings(tmp_path, 2).items() if k != "transport"},
        endpoints=(f"ipc://{tmp_path}/p0", f"ipc://{tmp_path}/p1"),
    )
    functions = app()
    p0 = Peer(config, functions, peer_id=0)
    p1 = Peer(config, functions, peer_id=1)
    start0 = asyncio.ensure_future(p0.start())
    try:
        # peer 0 waits for peer 1 in its first recovery round: alive, not ready
        for _ in range(200):
            if p0.http is not None and p0.http._runner is not None:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert not start0.done()
        status, text = await get(p0.http.url + "/readyz")
        assert status == 503, text
        assert "starting" in text
        assert await get(p0.http.url + "/healthz") == (200, "ok\n")
        s = await scrape(p0)
        assert value(s, "statefun_mesh_ready") == 0
        await p1.start()
        await asyncio.wait_for(start0, 30)
        assert await get(p0.http.url + "/readyz") == (200, "ready\n")
        assert await get(p1.http.url + "/readyz") == (200, "ready\n")

        # A recovery: peer 1 dies and comes back. While peer 0 restores, /readyz says 503
        # (checked from inside the restore, over HTTP: the server runs on the peer's loop).
        seen: list[tuple[int, str]] = []
        assert p0.participant is not None
        restore = p0.participant.restore

        async def restore_and_look(manifest: Any) -> None:
            seen.append(await get(p0.http.url + "/readyz"))
            await restore(manifest)

        p0.participant.restore = restore_and_look  # a spy: the restore itself is the real one
        await p1.abort()
        if p1._unwatch is not None:  # the process it stands for would take its watchdog along
            p1._unwatch()
        p1 = Peer(config, functions, peer_id=1)
        await p1.start()
        for _ in range(300):
            if p0.resumed and seen:
                break
            await asyncio.sleep(0.02)
        assert seen and seen[0][0] == 503 and "recovering" in seen[0][1], seen
        assert await get(p0.http.url + "/readyz") == (200, "ready\n")
        s = await scrape(p0)
        assert value(s, "statefun_mesh_recoveries_total") == 1
        assert value(s, "statefun_mesh_ready") == 1
    finally:
        if not start0.done():
            start0.cancel()
        await asyncio.gather(start0, return_exceptions=True)
        await p1.aclose()
        await p0.aclose()
    # closed: the port is free again
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(p0.http.url + "/healthz")


async def test_egress_reader_lag_and_client_counters(tmp_path: Path) -> None:
    from statefun_mesh import MeshClient, egress_message_builder

    functions = StatefulFunctions()

    @functions.bind(typename="m/emit")
    def emit(context, message):
        context.send_egress(egress_message_builder(target_typename="m/out", value=message.as_int(), value_type=IntType))

    ep = f"ipc://{tmp_path}/client"
    async with LocalMesh(
        functions, state_dir=str(tmp_path / "s"), metrics_endpoints=("127.0.0.1:0",), client_endpoints=(ep,)
    ) as mesh:
        peer = mesh.peers[0]
        async with MeshClient(ep) as client:
            for i in range(10):
                await client.send(message_builder(target_typename="m/emit", target_id="a", int_value=i))
            await mesh.idle(timeout=10)
            got = []
            async for rec in client.egress("m/out", stop_when_idle=0.2):
                got.append(rec)
                if len(got) == 4:
                    break
            s = await scrape(peer)
            lags = {k: v for k, v in s.items() if k[0] == "statefun_mesh_egress_reader_lag_records"}
            assert len(lags) == 1 and dict(next(iter(lags))[1])["egress"] == "m/out"
            # the reader fetched every record (it reads ahead of what the loop above took)
            assert list(lags.values()) == [0]
            with pytest.raises(StatefunMeshError):
                await client.send(message_builder(target_typename="m/nobody", target_id="a", int_value=1))
        # the reader is gone (its client closed; its last long poll, 1 s, ends): records it has
        # not read count as its lag
        await asyncio.sleep(1.2)
        for i in range(5):
            await peer.send(message_builder(target_typename="m/emit", target_id="b", int_value=i))
        await mesh.idle(timeout=10)
        s = await scrape(peer)
        assert [v for k, v in s.items() if k[0] == "statefun_mesh_egress_reader_lag_records"] == [5]
        assert value(s, "statefun_mesh_client_requests_total", kind="send") == 11
        assert value(s, "statefun_mesh_client_requests_total", kind="fetch") >= 1
        assert value(s, "statefun_mesh_client_errors_total") == 1
        assert value(s, "statefun_mesh_egress_records_total") == 15


async def test_client_gauges_count_a_pending_request(tmp_path: Path) -> None:
    # metrics read the client endpoint's public pending_requests / parked_sends (issue 11:
    # no private fields of the endpoint); a request whose function never replies is pending
    from statefun_mesh import MeshClient

    functions = StatefulFunctions()

    @functions.bind(typename="m/mute")
    def mute(context, message):
        del context, message  # never replies: the request waits for its timeout

    ep = f"ipc://{tmp_path}/client"
    async with LocalMesh(
        functions, state_dir=str(tmp_path / "s"), metrics_endpoints=("127.0.0.1:0",), client_endpoints=(ep,)
    ) as mesh:
        peer = mesh.peers[0]
        async with MeshClient(ep) as client:
            s = await scrape(peer)
            assert value(s, "statefun_mesh_client_pending_requests") == 0
            waiting = asyncio.ensure_future(
                client.request(message_builder(target_typename="m/mute", target_id="a", int_value=1), timeout=5.0)
            )
            try:
                for _ in range(100):  # bounded: 5 s
                    s = await scrape(peer)
                    if value(s, "statefun_mesh_client_pending_requests") == 1:
                        break
                    await asyncio.sleep(0.05)
                assert value(s, "statefun_mesh_client_pending_requests") == 1
                assert value(s, "statefun_mesh_client_parked_sends") == 0
            finally:
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)


async def test_request_service_time_histogram(tmp_path: Path) -> None:
    # the client endpoint's service-time counts (status "request_service_us_log2") as a
    # Prometheus histogram: one observation per answered request, sum in seconds
    from statefun_mesh import MeshClient

    functions = StatefulFunctions()

    @functions.bind(typename="m/echo")
    def echo(context, message):
        context.reply(int_value=message.as_int())

    ep = f"ipc://{tmp_path}/client"
    async with LocalMesh(
        functions, state_dir=str(tmp_path / "s"), metrics_endpoints=("127.0.0.1:0",), client_endpoints=(ep,)
    ) as mesh:
        peer = mesh.peers[0]
        async with MeshClient(ep) as client:
            s = await scrape(peer)
            assert value(s, "statefun_mesh_client_request_service_seconds_count") == 0
            for i in range(7):
                reply = await client.request(
                    message_builder(target_typename="m/echo", target_id=str(i), int_value=i), timeout=10.0
                )
                assert reply.as_int() == i
            s = await scrape(peer)
        buckets = sorted(
            (float(dict(k[1])["le"]), v)
            for k, v in s.items()
            if k[0] == "statefun_mesh_client_request_service_seconds_bucket"
        )
        assert len(buckets) == 26 and buckets[-1] == (float("inf"), 7)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert buckets[0] == (1e-06, 0)  # nothing is answered within a microsecond
        assert value(s, "statefun_mesh_client_request_service_seconds_count") == 7
        assert 0 < value(s, "statefun_mesh_client_request_service_seconds_sum") < 70
        assert sum(peer.client_server.service_us) == 7


async def test_a_taken_metrics_port_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        config = MeshConfig(state_dir=str(tmp_path), metrics_endpoints=(f"127.0.0.1:{port}",))
        peer = Peer(config, app())
        with pytest.raises(Exception, match=f"cannot bind its metrics endpoint 127.0.0.1:{port}"):
            await peer.start()


def test_metrics_endpoints_config(tmp_path: Path) -> None:
    assert MeshConfig(peers=1, metrics_endpoints=["http://127.0.0.1:9100"]).metrics_endpoints == (
        "http://127.0.0.1:9100",
    )
    with pytest.raises(ConfigError, match=r"metrics_endpoints.*one entry per peer"):
        MeshConfig(peers=2, endpoints=("ipc:///tmp/a", "ipc:///tmp/b"), metrics_endpoints=("127.0.0.1:1",))
    with pytest.raises(ConfigError, match="expected an HTTP endpoint HOST:PORT"):
        MeshConfig(metrics_endpoints=("tcp://127.0.0.1:9100",))
    with pytest.raises(ConfigError, match="expected an HTTP endpoint"):
        MeshConfig(metrics_endpoints=("127.0.0.1:70000",))
    f = tmp_path / "mesh.toml"
    f.write_text(
        '[[peer]]\nendpoint = "ipc:///tmp/x0"\nmetrics_endpoint = "127.0.0.1:9100"\n'
        '[[peer]]\nendpoint = "ipc:///tmp/x1"\n'
    )
    assert load_config(f).metrics_endpoints == ("127.0.0.1:9100", "")
    f.write_text('metrics_endpoints = ["127.0.0.1:9100"]\ndashboard = true\n')
    cfg = load_config(f)
    assert cfg.metrics_endpoints == ("127.0.0.1:9100",) and cfg.dashboard


def test_cli_metrics_flags() -> None:
    from statefun_mesh.cli import build_parser

    p = build_parser()
    args = p.parse_args(
        ["peer", "--config", "m.toml", "--id", "0", "--metrics-endpoint", "127.0.0.1:9100", "--dashboard"]
    )
    assert args.metrics_endpoint == "127.0.0.1:9100" and args.dashboard
    args = p.parse_args(["run", "app:functions", "--metrics-port", "9100", "--dashboard-peer", "1"])
    assert (args.metrics_port, args.dashboard_peer, args.no_metrics) == (9100, 1, False)
    for bad in (
        ["peer", "--config", "m.toml", "--id", "0", "--metrics-endpoint", "localhost"],
        ["run", "--metrics-port", "70000"],
        ["run", "--metrics-port", "-1"],
    ):
        with pytest.raises(SystemExit) as exc:
            p.parse_args(bad)
        assert exc.value.code == 2


async def test_api_mesh_gathers_every_peer_through_the_client_endpoints(tmp_path: Path) -> None:
    import json

    clients = (f"ipc://{tmp_path}/c0", f"ipc://{tmp_path}/c1")
    async with LocalMesh(app(), **settings(tmp_path, 2, client_endpoints=clients, dashboard=True)) as mesh:
        p0, p1 = mesh.peers
        for i in range(40):
            await p0.send(message_builder(target_typename="m/counter", target_id=f"k{i}", int_value=1))
        await mesh.idle(timeout=30)
        status, body = await get(p1.http.url + "/api/mesh")
        doc = json.loads(body)
        assert status == 200 and doc["peers"] == 2 and doc["functions"] == ["m/bad", "m/counter", "m/slow"]
        assert [s["peer"] for s in doc["status"]] == [0, 1]
        for s, p in zip(doc["status"], (p0, p1), strict=True):
            assert s["invocations"] == p.status()["invocations"] and s["ready"] is True
            assert "client_requests" in s and "egress_readers" in s  # as a client endpoint answers it
        assert sum(s["functions"]["m/counter"]["invocations"] for s in doc["status"]) == 40
        status, html = await get(p0.http.url + "/")
        assert status == 200 and "/api/mesh" in html and "<script>" in html
        # nothing in the page reaches outside the peer
        assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
        status, body = await get(p0.http.url + "/api/status")
        assert status == 200 and json.loads(body)["peer"] == 0
