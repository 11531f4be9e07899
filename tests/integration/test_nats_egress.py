"""The NATS JetStream egress (``statefun-mesh nats-egress``) against a real nats-server.

A real ``nats-server -js`` on 127.0.0.1, a real 3-peer mesh (``statefun-mesh run`` with
checkpoints every 0.5 s, one immediate egress), and the bridge as a process of its own, so
it can be SIGKILLed. ``it/emit`` of tests/integration/app.py writes ``n`` string records
``"<tag>:<id>:<i>"`` to the egress its message names.

Without the nats-server binary (or nats-py) these tests skip, except under CI (``CI``
set), where they fail: install it with ``bash .ci/install-nats-server.sh``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from statefun_mesh import MeshClient, message_builder  # noqa: E402
from statefun_mesh.connectors.nats_egress import EgressRoute, render  # noqa: E402
from statefun_mesh.errors import ConfigError  # noqa: E402
from statefun_mesh.messages import EgressRecord, kafka_egress_message  # noqa: E402
from tests.binaries import free_port  # noqa: E402
from tests.integration.app import EMIT, JSON  # noqa: E402
from tests.integration.support import BridgeProcess, Cluster, run_cli, running_cluster  # noqa: E402
from tests.natsserver import NatsServer, running_nats_server  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]

if os.environ.get("CI") is None:
    nats = pytest.importorskip("nats", reason="the NATS egress needs nats-py: pip install 'statefun-mesh[nats]'")
else:
    import nats
from nats.js.api import StreamConfig  # noqa: E402

IMMEDIATE = "it/nimm"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = f'checkpoint_interval = 0.5\negress_immediate = ["{IMMEDIATE}"]\n'
    with running_cluster(tmp_path_factory.mktemp("nats-egress-mesh"), config=config) as c:
        yield c


class Bridge(BridgeProcess):
    """``python -m statefun_mesh nats-egress ...`` in a session of its own, logging to files."""

    def __init__(self, workdir: Path, nats_url: str, mesh: Cluster, *args: str) -> None:
        super().__init__("nats-egress", workdir, nats_url, mesh, *args)

    def counters(self, run: int) -> dict[str, int]:
        """The last status line's counters of run ``run`` (1-based)."""
        text = (self.workdir / f"bridge-{run}.log").read_text(errors="replace")
        found = re.findall(r"published (\d+) .*?duplicates dropped (\d+)", text)
        assert found, text[-2000:]
        return {"published": int(found[-1][0]), "duplicates": int(found[-1][1])}


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[Any]:
    made: list[Bridge] = []

    def make(nats_url: str, mesh: Cluster, *args: str) -> Bridge:
        b = Bridge(tmp_path, nats_url, mesh, *args)
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()


async def add_stream(url: str, name: str, subjects: list[str]) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=name, subjects=subjects))
    finally:
        await nc.close()


async def stream_messages(url: str, stream: str) -> list[Any]:
    """Every message of ``stream`` (subject, data, headers), in stream order."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        count = (await js.stream_info(stream)).state.messages
        out = []
        for seq in range(1, count + 1):
            out.append(await js.get_msg(stream, seq))
        return out
    finally:
        await nc.close()


async def stream_count(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def wait_count(url: str, stream: str, at_least: int, timeout: float, bridge: Bridge) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = await stream_count(url, stream)
        if n >= at_least:
            return n
        if time.monotonic() > deadline:
            raise AssertionError(f"{stream} has {n} messages, expected {at_least}; bridge log:\n{bridge.log()[-3000:]}")
        await asyncio.sleep(0.1)


async def emit(client: MeshClient, egress: str, ids: list[str], n: int, tag: str) -> None:
    await asyncio.gather(
        *(
            client.send(
                message_builder(
                    target_typename=EMIT,
                    target_id=i,
                    value={"egress": egress, "n": n, "tag": tag},
                    value_type=JSON,
                ),
                idempotency_key=f"{tag}:{i}",
            )
            for i in ids
        )
    )


def expected(ids: list[str], n: int, tag: str) -> set[str]:
    return {f"{tag}:{i}:{k}" for i in ids for k in range(n)}


def assert_once(msgs: list[Any], want: set[str]) -> None:
    values = [m.data.decode() for m in msgs]
    dups = [v for v, c in collections.Counter(values).items() if c > 1]
    assert not dups, f"published twice: {dups[:10]}"
    assert set(values) == want, f"missing {sorted(want - set(values))[:10]}, extra {sorted(set(values) - want)[:10]}"


# -- tests ---------------------------------------------------------------------------------------


def test_bad_config_is_a_clear_error_and_exit_2() -> None:
    for args, words in [
        (["--name", "b"], "at least one route"),
        (["--name", "b", "--route", "it/x"], "EGRESS=SUBJECT_TEMPLATE"),
        (["--name", "b", "--route", "it/x=out.{nope}"], "unknown fields ['nope']"),
        (["--name", "b", "--route", "it/x=out.>"], "no empty tokens, spaces or wildcards"),
        (["--name", "b.c", "--route", "it/x=out"], "name must be letters"),
        (["--name", "b", "--route", "it/x=a", "--route", "it/x=b"], "one route only"),
        (["--name", "b", "--route", "nonamespace=a"], "bad egress name"),
    ]:
        res = run_cli("nats-egress", "--nats-url", "nats://127.0.0.1:1", *args, timeout=30)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert words in res.stderr, (args, res.stderr)


def test_subject_template_uses_kafka_fields_and_ids_follow_the_record() -> None:
    msg = kafka_egress_message(typename="it/k", topic="greetings", key="a.b c", value="hello")
    rec = EgressRecord("it/k", 2, 17, msg.value_typename(), msg.raw_value())
    subject, payload, headers = render("out.{topic}.{key}.{peer}", rec)
    assert (subject, payload) == ("out.greetings.a_b_c.2", b"hello")
    assert headers["Nats-Msg-Id"] == "it/k/2/17"
    assert headers["Statefun-Kafka-Key"] == "a.b c" and headers["Statefun-Kafka-Topic"] == "greetings"
    imm = EgressRecord("it/k", 0, 3, "io.statefun.types/int", b"\x08\x07", id="it/emit/x#4")
    assert render("{egress}.{topic}", imm)[0] == "it.k._"
    assert render("{egress}.{topic}", imm)[2]["Nats-Msg-Id"] == "it/emit/x#4"
    # a header line cannot hold a line break (NATS makes it a space): '%' and control characters are escaped
    odd = EgressRecord("it/k", 0, 3, "io.statefun.types/string", b"", id="it/emit/a\r\nb%#1")
    assert render("x", odd)[2]["Nats-Msg-Id"] == "it/emit/a%0D%0Ab%25#1"
    assert render("x", odd)[2]["Statefun-Record-Id"] == "it/emit/a%0D%0Ab%25#1"
    with pytest.raises(ConfigError, match="unknown fields"):
        EgressRoute.parse("it/k=out.{offset}")


async def test_transactional_egress_exactly_once_across_bridge_and_peer_sigkill(
    nats_server: NatsServer, mesh: Cluster, bridges: Any
) -> None:
    """Records reach the stream once each, although the bridge is SIGKILLed mid-stream and
    restarted, and a mesh peer is SIGKILLed (recovery re-produces unreleased records)."""
    run = uuid.uuid4().hex[:6]
    egress, stream = f"it/tx{run}", f"TX{run}"
    await add_stream(nats_server.url, stream, [f"tx{run}.>"])
    bridge = bridges(
        nats_server.url, mesh, "--name", f"tx{run}", "--batch", "20", "--route", f"{egress}=tx{run}.{{peer}}"
    )
    ids = [f"{run}-{i}" for i in range(30)]
    want: set[str] = set()
    async with MeshClient(mesh.endpoint, timeout=30) as client:
        bridge.start()
        await emit(client, egress, ids, 40, "a")
        want |= expected(ids, 40, "a")
        await wait_count(nats_server.url, stream, 100, 30, bridge)
        bridge.kill()  # mid-stream: 1200 records, batches of 20
        partial = await stream_count(nats_server.url, stream)
        await emit(client, egress, ids, 10, "b")  # while the bridge is down
        want |= expected(ids, 10, "b")
        bridge.start()
        await wait_count(nats_server.url, stream, partial + 50, 30, bridge)
        os.kill(mesh.peer_pids()[1], signal.SIGKILL)
        await emit(client, egress, ids, 10, "c")  # retried by the client until the peer is back
        want |= expected(ids, 10, "c")
        await wait_count(nats_server.url, stream, len(want), 60, bridge)
        await asyncio.sleep(1.5)  # anything published twice would show up by now
        assert bridge.stop() == 0
    assert partial < len(want)
    msgs = await stream_messages(nats_server.url, stream)
    assert_once(msgs, want)
    # the restarted bridge went on from its stored position: it re-published at most the tail
    # acked after the last position write (JetStream dropped those), not everything
    c2 = bridge.counters(2)
    assert c2["duplicates"] < partial, (c2, partial)
    # a bridge under another name starts from the beginning: JetStream drops every record by its id
    other = bridges(nats_server.url, mesh, "--name", f"tx{run}x", "--route", f"{egress}=tx{run}.{{peer}}")
    other.start()
    deadline = time.monotonic() + 30
    while not re.search(rf"duplicates dropped {len(want)}\b", other.log()):
        assert time.monotonic() < deadline, other.log()[-3000:]
        await asyncio.sleep(0.2)
    assert other.stop() == 0
    assert await stream_count(nats_server.url, stream) == len(want)
    m = msgs[0]
    assert m.headers["Nats-Msg-Id"] == f"{egress}/{m.headers['Statefun-Peer']}/{m.headers['Statefun-Offset']}"
    assert m.subject == f"tx{run}.{m.headers['Statefun-Peer']}"
    assert m.headers["Statefun-Value-Type"] == "io.statefun.types/string"
    assert "stopped: published" in bridge.log()


async def test_immediate_egress_uses_record_ids_across_bridge_and_peer_sigkill(
    nats_server: NatsServer, mesh: Cluster, bridges: Any
) -> None:
    run = uuid.uuid4().hex[:6]
    stream = f"IM{run}"
    await add_stream(nats_server.url, stream, [f"im{run}.>"])
    bridge = bridges(
        nats_server.url,
        mesh,
        "--name",
        f"im{run}",
        "--batch",
        "10",
        "--route",
        f"{IMMEDIATE}=im{run}.{{name}}.{{peer}}",
    )
    # NATS turns a line break in a header into a space: unescaped, these two ids would share Nats-Msg-Ids
    ids = [f"{run}-{i}" for i in range(18)] + [f"{run}-line\nbreak%", f"{run}-line break%"]
    async with MeshClient(mesh.endpoint, timeout=30) as client:
        bridge.start()
        await emit(client, IMMEDIATE, ids, 20, "a")
        await wait_count(nats_server.url, stream, 50, 30, bridge)
        bridge.kill()
        await emit(client, IMMEDIATE, ids, 5, "b")
        bridge.start()
        # a peer crash: the records its instances made since the checkpoint are made again
        # (same ids, maybe other offsets); the bridge re-reads from the restored position
        os.kill(mesh.peer_pids()[2], signal.SIGKILL)
        await emit(client, IMMEDIATE, ids, 5, "c")
        want = expected(ids, 20, "a") | expected(ids, 5, "b") | expected(ids, 5, "c")
        await wait_count(nats_server.url, stream, len(want), 30, bridge)
        await asyncio.sleep(1.5)
        lines = bridge.log().count("nats-egress: published")
        await asyncio.sleep(2.5)  # idle: no progress lines while the counters stand still
        assert bridge.log().count("nats-egress: published") == lines, bridge.log()[-2000:]
        assert bridge.stop() == 0
    msgs = await stream_messages(nats_server.url, stream)
    assert_once(msgs, want)
    for m in msgs:
        assert m.headers["Nats-Msg-Id"] == m.headers["Statefun-Record-Id"]
        assert m.headers["Nats-Msg-Id"].startswith(f"{EMIT}/{run}-")


async def test_nats_down_at_start_backs_off_then_delivers(tmp_path: Path, mesh: Cluster, bridges: Any) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    run = uuid.uuid4().hex[:6]
    egress = f"it/down{run}"
    bridge = bridges(url, mesh, "--name", "late", "--route", f"{egress}=late.{{peer}}")
    bridge.start()
    async with MeshClient(mesh.endpoint, timeout=30) as client:
        await emit(client, egress, ["x", "y"], 5, "a")
        deadline = time.monotonic() + 20
        while "cannot connect to NATS" not in bridge.log():
            assert bridge.proc.poll() is None, bridge.log()
            assert time.monotonic() < deadline, bridge.log()
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        assert bridge.proc.poll() is None, bridge.log()
        with running_nats_server(port=port) as server:
            await add_stream(server.url, "LATE", ["late.>"])
            await wait_count(server.url, "LATE", 10, 30, bridge)
            assert bridge.stop() == 0
            assert_once(await stream_messages(server.url, "LATE"), expected(["x", "y"], 5, "a"))


def test_sigterm_while_waiting_for_nats_stops_cleanly(mesh: Cluster, bridges: Any) -> None:
    bridge = bridges(f"nats://127.0.0.1:{free_port()}", mesh, "--name", "never", "--route", "it/never=never")
    bridge.start()
    deadline = time.monotonic() + 20
    while "cannot connect to NATS" not in bridge.log():
        assert bridge.proc.poll() is None and time.monotonic() < deadline, bridge.log()
        time.sleep(0.1)
    t0 = time.monotonic()
    assert bridge.stop(timeout=10) == 0, bridge.log()
    assert time.monotonic() - t0 < 5, bridge.log()
