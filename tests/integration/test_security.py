"""The attacks of issue 7 item 3, from a process that can reach the peers' tcp ports.

Each runs against a real ``statefun-mesh run`` cluster (3 peer processes on 127.0.0.1,
checkpoints on) twice: without keys (``--no-keys``), where the test asserts the damage,
so it proves the attack is real; and with the keys ``run`` makes by default, where the
same attack must change nothing, be counted as refused, and leave the mesh working.
The attacker knows everything but the keys: the peer endpoints (from the run's
mesh.toml), the live generation (from the blob store), the client key file even (it
tries that key on the peer links too).
"""

from __future__ import annotations

import asyncio
import random
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from statefun_mesh import IntType, LocalMesh, MeshClient, message_builder
from statefun_mesh._speedups import encode_batch
from statefun_mesh.config import MeshConfig, load_config
from statefun_mesh.errors import RequestTimeoutError
from statefun_mesh.security import ClientKeys, Keypair, curve_client, find_client_keys, generate_keypair
from statefun_mesh.transport import codec
from statefun_mesh.transport.zeromq import peer_identity
from tests.integration import app
from tests.integration.support import Cluster, _cmdline, eventually, ids_on

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]

INT = "io.statefun.types/int"
MODES = [pytest.param(False, id="no-keys"), pytest.param(True, id="curve")]


# -- the attacker's knowledge and tools --------------------------------------------------------


def run_config(cluster: Cluster) -> MeshConfig:
    """The run's mesh.toml, read from a peer's command line."""
    cmd = _cmdline(cluster.peer_pids()[0])
    return load_config(cmd[cmd.index("--config") + 1])


def live_generation(cluster: Cluster) -> int:
    return int((cluster.state_dir / "checkpoints" / "coordinator" / "generation").read_text())


def int_bytes(n: int) -> bytes:
    return IntType.serializer().serialize(n)


def counter_record(id: str, n: int) -> tuple[Any, ...]:
    return (app.COUNTER, id, "", "", INT, int_bytes(n), 0, 0)


#: how long an attacker's send may wait for a connection (a refused handshake leaves it none)
STRIKE_SEND_TIMEOUT = 5.0


async def strike(
    endpoint: str, identity: bytes, frames: list[bytes], *, curve: tuple[Keypair, str] | None = None, hold: float = 0.5
) -> None:
    """Connect as ``identity`` (with a CURVE key pair and server key, if given), send ``frames``, go."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    if curve is not None:
        curve_client(sock, curve[0], curve[1])
    sock.connect(endpoint)
    try:
        for f in frames:
            # A DEALER's send waits while it has no connection, and a refused CURVE handshake
            # leaves it none between reconnects: bounded, so a refused attacker gives up
            # (the attacks that must succeed, without keys, are checked by their effect).
            try:
                await asyncio.wait_for(sock.send(f), STRIKE_SEND_TIMEOUT)
            except TimeoutError:
                break
        await asyncio.sleep(hold)
    finally:
        sock.close(0)


async def strike_all_ways(cluster: Cluster, keys: bool, peer: int, identity: bytes, frames: list[bytes]) -> None:
    """Plaintext; and with CURVE, also with the run's client key and with a fresh key."""
    cfg = run_config(cluster)
    endpoint = cfg.endpoints[peer]
    await strike(endpoint, identity, frames)
    if keys:
        client = find_client_keys(cluster.endpoint)
        assert client is not None, "the run left no client key for its endpoint"
        server_key = cfg.peer_public_keys()[peer]
        await strike(endpoint, identity, frames, curve=(Keypair(client.public, client.secret), server_key))
        await strike(endpoint, identity, frames, curve=(generate_keypair(), server_key))


def cluster_args(keys: bool) -> tuple[str, ...]:
    return () if keys else ("--no-keys",)


async def count(client: MeshClient, id: str) -> int:
    reply = await client.request(message_builder(target_typename=app.COUNTER, target_id=id, int_value=0), timeout=5)
    return reply.as_int()


async def add(client: MeshClient, id: str, n: int) -> None:
    await client.send(message_builder(target_typename=app.COUNTER, target_id=id, int_value=n))


async def statuses(cluster: Cluster) -> list[dict[str, Any]]:
    async with MeshClient(cluster.endpoint) as c:
        info = await c.info()
        out = []
        for ep in info["client_endpoints"]:
            async with MeshClient(ep, keys=c.keys) as ck:
                out.append((await ck.info())["status"])
        return out


async def healthy(cluster: Cluster, run: str) -> None:
    """Messages entering at every peer reach ids on every peer, exactly once."""
    async with MeshClient(cluster.endpoint) as c0:
        eps = (await c0.info())["client_endpoints"]
        for via, ep in enumerate(eps):
            async with MeshClient(ep, keys=c0.keys) as c:
                for p in range(3):
                    key = ids_on(p, f"{run}-healthy-{via}", 1)[0]
                    await add(c, key, 1)
                    await eventually(
                        _counts_to(c, key, 1), timeout=15, what=f"a message entering at peer {via} reaches peer {p}"
                    )


def _counts_to(client: MeshClient, key: str, value: int) -> Callable[[], Any]:
    return lambda: _equals(count(client, key), value)


async def _equals(coro: Any, value: int) -> bool:
    return await coro == value  # type: ignore[no-any-return]


async def refused(cluster: Cluster, peer: int) -> int:
    return (await statuses(cluster))[peer]["refused_connections"]  # type: ignore[no-any-return]


# -- the attacks --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keys", MODES)
async def test_forged_batch_frame(start_cluster: Callable[..., Cluster], keys: bool) -> None:
    """One batch frame under peer 1's routing id takes a counter on peer 0 from 5 to 1005."""
    cluster = start_cluster("tcp", args=cluster_args(keys))
    run = uuid.uuid4().hex[:8]
    target = ids_on(0, f"{run}-t", 1)[0]
    async with MeshClient(cluster.endpoint) as c:
        await add(c, target, 5)
        await eventually(lambda: _equals(count(c, target), 5), timeout=15, what="the counter is 5")
        frame = struct.pack(">I", live_generation(cluster)) + encode_batch([counter_record(target, 1000)])
        await strike_all_ways(cluster, keys, 0, peer_identity(1), [frame])
        await asyncio.sleep(1.0)
        if not keys:
            assert await count(c, target) == 1005, "the forged batch was not applied: the attack is not shown"
            return
        assert await count(c, target) == 5
    assert await refused(cluster, 0) >= 3  # plaintext, the client key, a fresh key
    await healthy(cluster, run)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keys", MODES)
async def test_spoofed_recover_and_resume(start_cluster: Callable[..., Cluster], keys: bool) -> None:
    """RECOVER [g+1, -1] then RESUME [g+1] under the coordinator's id: peer 1 drops its state and
    answers 0 for a counter that was at 5 (acknowledged sends lost)."""
    cluster = start_cluster("tcp", args=cluster_args(keys))
    run = uuid.uuid4().hex[:8]
    target = ids_on(1, f"{run}-t", 1)[0]
    async with MeshClient(cluster.endpoint) as c:
        eps = (await c.info())["client_endpoints"]
        async with MeshClient(eps[1], keys=c.keys) as c1:
            await add(c, target, 5)
            await eventually(lambda: _equals(count(c1, target), 5), timeout=15, what="the counter is 5")
            gen = live_generation(cluster) + 1
            prefix = struct.pack(">I", gen)
            await strike_all_ways(
                cluster, keys, 1, peer_identity(0), [prefix + codec.encode_control(codec.RECOVER, gen, -1)]
            )
            await asyncio.sleep(1.5)
            resume = prefix + codec.encode_control(codec.RESUME, gen)
            await strike_all_ways(cluster, keys, 1, peer_identity(0), [resume])
            await asyncio.sleep(1.0)
            if not keys:
                assert await count(c1, target) == 0, "peer 1 kept its state: the attack is not shown"
                return
            assert await count(c1, target) == 5
    assert await refused(cluster, 1) >= 6
    await healthy(cluster, run)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keys", MODES)
async def test_forged_heartbeats(start_cluster: Callable[..., Cluster], keys: bool) -> None:
    """Heartbeats under peer 1's id with new incarnations make the coordinator start recovery rounds."""
    cluster = start_cluster("tcp", args=cluster_args(keys))
    run = uuid.uuid4().hex[:8]
    target = ids_on(2, f"{run}-t", 1)[0]
    async with MeshClient(cluster.endpoint) as c:
        await add(c, target, 5)
        await eventually(lambda: _equals(count(c, target), 5), timeout=15, what="the counter is 5")
    rounds_before = cluster.log().count("peer 1 restarted")
    gen = struct.pack(">I", live_generation(cluster))
    rng = random.Random(7)
    beats = [gen + codec.encode_control(codec.HEARTBEAT, 1, rng.getrandbits(48) | 1) for _ in range(5)]
    for beat in beats:
        await strike_all_ways(cluster, keys, 0, peer_identity(1), [beat])
    await asyncio.sleep(1.0)
    caused = cluster.log().count("peer 1 restarted") - rounds_before
    if not keys:
        assert caused >= 1, "no recovery round: the attack is not shown"
        return
    assert caused == 0
    assert await refused(cluster, 0) >= 15
    async with MeshClient(cluster.endpoint) as c:
        assert await count(c, target) == 5
    await healthy(cluster, run)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keys", MODES)
async def test_routing_id_takeover(start_cluster: Callable[..., Cluster], keys: bool) -> None:
    """A connection announcing peer 1's routing id to peer 0 for 0.3 s cuts peer 1's channel into peer 0."""
    cluster = start_cluster("tcp", args=cluster_args(keys))
    run = uuid.uuid4().hex[:8]
    await healthy(cluster, f"{run}-before")
    await strike_all_ways(cluster, keys, 0, peer_identity(1), [])
    target = ids_on(0, f"{run}-t", 1)[0]
    async with MeshClient(cluster.endpoint) as c0:
        eps = (await c0.info())["client_endpoints"]
        async with MeshClient(eps[1], keys=c0.keys) as c1:
            await add(c1, target, 1)  # enters at peer 1, lives on peer 0
            if not keys:
                await asyncio.sleep(4.0)
                assert await count(c0, target) == 0, "peer 1's channel into peer 0 still works: the attack is not shown"
                return
            await eventually(lambda: _equals(count(c0, target), 1), timeout=10, what="peer 1 reaches peer 0")
    assert await refused(cluster, 0) >= 3
    await healthy(cluster, run)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("keys", MODES)
async def test_client_without_an_admitted_key(start_cluster: Callable[..., Cluster], keys: bool) -> None:
    """A stranger on the client endpoint: sends a message and reads the live generation."""
    cluster = start_cluster("tcp", args=cluster_args(keys))
    run = uuid.uuid4().hex[:8]
    target = ids_on(0, f"{run}-t", 1)[0]
    ctx = zmq.asyncio.Context.instance()

    async def stranger(curve: tuple[Keypair, str] | None) -> list[Any]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve_client(sock, *curve)
        sock.connect(cluster.endpoint)
        answers = []
        try:
            await sock.send(codec.encode_control(codec.C_SEND, 1, app.COUNTER, target, INT, int_bytes(7), ""))
            await sock.send(codec.encode_control(codec.C_FETCH, 2, "it/none", "earliest", 10, 0, -1))
            for _ in range(2):
                if not await sock.poll(2000):
                    break
                answers.append(codec.decode_control(await sock.recv(), None)[1])
        finally:
            sock.close(0)
        return answers

    answers = await stranger(None)
    if not keys:
        assert len(answers) == 2, answers
        fetched = next(a for a in answers if a[0] == 2)
        assert fetched[-1] == live_generation(cluster), "the generation is not readable: the attack is not shown"
        async with MeshClient(cluster.endpoint) as c:
            await eventually(lambda: _equals(count(c, target), 7), timeout=10, what="the stranger's send applied")
        return
    assert answers == []
    server_key = run_config(cluster).peer_public_keys()[0]
    assert await stranger((generate_keypair(), server_key)) == []
    with pytest.raises(RequestTimeoutError):
        stranger_keys = generate_keypair()
        async with MeshClient(
            cluster.endpoint,
            timeout=1.0,
            keys=ClientKeys(stranger_keys.public, stranger_keys.secret, {cluster.endpoint: server_key}),
        ) as c:
            await c.info()
    status = (await statuses(cluster))[0]
    assert status["refused_clients"] >= 3, status
    async with MeshClient(cluster.endpoint) as c:
        assert await count(c, target) == 0
    await healthy(cluster, run)


# -- peer-frame checks (in one process, plaintext tcp: these guard a link that is authenticated) --


def _plain_dealer(endpoint: str, identity: bytes) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


@pytest.mark.timeout(60)
async def test_control_frames_only_from_the_coordinator(tmp_path: Path) -> None:
    """RECOVER, RESUME, CK_DONE and CK_ABORT on peer 2's link into peer 1 are refused and counted."""
    async with LocalMesh(
        app.functions, peers=3, transport="tcp", state_dir=tmp_path, blob_store=f"memory://sec-{uuid.uuid4().hex}"
    ) as mesh:
        peer = mesh.peers[1]
        gen = peer.generation
        prefix = struct.pack(">I", gen + 1)
        frames = [
            prefix + codec.encode_control(codec.RECOVER, gen + 1, -1),
            struct.pack(">I", gen) + codec.encode_control(codec.RESUME, gen),
            struct.pack(">I", gen) + codec.encode_control(codec.CK_DONE, 1),
            struct.pack(">I", gen) + codec.encode_control(codec.CK_ABORT, 1),
        ]
        sock = _plain_dealer(mesh.config.endpoints[1], peer_identity(2))
        try:
            for f in frames:
                await sock.send(f)
            await eventually(
                lambda: asyncio.sleep(0, peer.status().get("refused_frames") == 4),
                timeout=5,
                what="4 control frames refused",
            )
        finally:
            sock.close(0)
        assert peer.generation == gen and peer.resumed
        await asyncio.sleep(0.3)
        assert peer.status()["refused_frames"] == 4


@pytest.mark.timeout(60)
async def test_far_ahead_generation_is_refused_not_held(tmp_path: Path) -> None:
    """A batch frame stamped far above the mesh's generation is refused and counted, not held."""
    async with LocalMesh(
        app.functions, peers=3, transport="tcp", state_dir=tmp_path, blob_store=f"memory://sec-{uuid.uuid4().hex}"
    ) as mesh:
        peer = mesh.peers[0]
        inbound = peer.inbound
        await eventually(
            lambda: asyncio.sleep(0, inbound.coordinator_generation >= 0 or peer.coordinator is not None),
            timeout=5,
            what="peer 0 knows the generation",
        )
        far = peer.generation + 1000
        near = peer.generation + 1
        batch = encode_batch([counter_record("x", 1)] * 100)
        sock = _plain_dealer(mesh.config.endpoints[0], peer_identity(1))
        held_before = len(peer.inbound.held)
        try:
            for _ in range(50):
                await sock.send(struct.pack(">I", far) + batch)
            await sock.send(struct.pack(">I", near) + batch)  # one round ahead: may be real, so held
            await eventually(
                lambda: asyncio.sleep(0, peer.status().get("refused_frames") == 50),
                timeout=5,
                what="50 far-ahead frames refused",
            )
            await eventually(
                lambda: asyncio.sleep(0, len(peer.inbound.held) == held_before + 1),
                timeout=5,
                what="the near frame held",
            )
        finally:
            sock.close(0)


@pytest.mark.timeout(60)
async def test_a_peer_key_cannot_speak_for_another_peer(tmp_path: Path) -> None:
    """With CURVE, a connection holding peer 2's key that announces peer 1's routing id is
    peer 2: its heartbeat claiming peer 1 is refused, and peer 1's own channel keeps working."""
    from statefun_mesh.security import ensure_keypair

    keys = tmp_path / "keys"
    keys.mkdir()
    pairs = [ensure_keypair(str(keys / f"peer-{k}")) for k in range(3)]
    async with LocalMesh(
        app.functions,
        peers=3,
        transport="tcp",
        state_dir=tmp_path / "state",
        peer_keys=tuple(p.public for p in pairs),
        secret_key=str(keys / "peer-{id}.key_secret"),
    ) as mesh:
        peer0 = mesh.peers[0]
        before = peer0.status()["bad_frames"]
        beat = struct.pack(">I", peer0.generation) + codec.encode_control(codec.HEARTBEAT, 1, 12345)
        await strike(mesh.config.endpoints[0], peer_identity(1), [beat], curve=(pairs[2], pairs[0].public), hold=0.3)
        await eventually(
            lambda: asyncio.sleep(0, peer0.status()["bad_frames"] == before + 1),
            timeout=5,
            what="the heartbeat claiming peer 1 on peer 2's link refused",
        )
        key = ids_on(0, f"{uuid.uuid4().hex[:8]}-t", 1)[0]
        await mesh.peers[1].send(message_builder(target_typename=app.COUNTER, target_id=key, int_value=1))
        await mesh.idle(10)
        reply = await mesh.peers[0].request(
            message_builder(target_typename=app.COUNTER, target_id=key, int_value=0), timeout=5
        )
        assert reply.as_int() == 1
        assert peer0.status()["unavailable_peers"] == []


@pytest.mark.timeout(60)
async def test_status_names_the_peer_keys_its_links_were_started_with(tmp_path: Path) -> None:
    """A peer's info lists every peer's public key as its links use them: read once at start,
    not from the key files on every status call (a 5 ms status poll read them 200 times a
    second). So it still answers, with the same keys, once the files are gone."""
    from statefun_mesh.mesh import local_endpoints
    from statefun_mesh.security import ensure_keypair

    keys = tmp_path / "keys"
    keys.mkdir()
    pairs = [ensure_keypair(str(keys / f"peer-{k}")) for k in range(2)]
    async with LocalMesh(
        app.functions,
        peers=2,
        transport="tcp",
        state_dir=tmp_path / "state",
        client_endpoints=local_endpoints("tcp", 2, ""),
        peer_keys=tuple(str(keys / f"peer-{k}.key") for k in range(2)),
        secret_key=str(keys / "peer-{id}.key_secret"),
    ) as mesh:
        server = mesh.peers[1].client_server
        assert server is not None
        assert server.info()["peer_keys"] == [p.public for p in pairs]
        for k in range(2):
            (keys / f"peer-{k}.key").unlink()
        info = server.info()
        assert info["peer_keys"] == [p.public for p in pairs]
        assert info["status"]["peer"] == 1
