"""Hypothesis fuzzing of a real peer process's client and peer endpoints (ZeroMQ over tcp).

The peer is ``python -m statefun_mesh peer`` of a mesh without keys and without
checkpoints (the worst case: anyone who reaches the port may talk), running the
integration app. Before the fuzz it is given known counters; the fuzz then sends frames
drawn from ``tests/fuzzing.py`` (valid frames mutated, wrong msgpack types, deep
nesting, huge declared lengths, raw bytes):

* to its **client endpoint** (ROUTER) from a DEALER of ours, in a one-peer mesh;
* to its **peer endpoint** from a DEALER announcing the routing id of peer 1 of a
  two-peer mesh whose peer 1 is this test (a ROUTER bound at peer 1's endpoint takes
  what peer 0 sends it); every frame is preceded by a generation, as ``Router.send`` does.

After each example a barrier proves the peer read everything sent so far and still
serves: an ``INFO`` answered on the client endpoint, or on the peer endpoint a batch
whose request is answered (``REPLIES``) on peer 1's channel. At the end: the known
counters read back unchanged, the peer still accepts and applies a message, its process
is alive and its anonymous RSS grew less than a bound.

What is *not* sent (counted as "skipped"): frames that would legitimately change the
known counters (a valid send, request or batch for them); requests with a finite timeout
over 30 s (valid: each would hold its pending slot that long; non-finite ones *are* sent,
and refused under ``max_request_timeout``); and peer frames
stamped with a generation ahead of the peer's, which the peer holds (per sender, up to
its link window) for when that generation starts, or refuses when far ahead
(``test_bad_input.py``, ``test_security.py``): valid input, not fuzz. Everything else
goes, including valid frames with nonsense values and messages of several parts.
The checks stay at the transport interface, so they hold as they are once CURVE and the
peer-identity checks land: a mesh without keys keeps accepting these connections.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import msgpack
import pytest
import zmq
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from statefun_mesh import IntType
from statefun_mesh._speedups_py import decode_batch, encode_batch
from statefun_mesh.errors import FrameDecodeError
from statefun_mesh.functions import merge_functions
from statefun_mesh.mesh import free_ports
from statefun_mesh.transport import codec
from statefun_mesh.transport.zeromq import peer_identity
from tests.fuzzing import (
    CLIENT_KINDS,
    MUTANTS,
    PEER_KINDS,
    base_frames,
    control_frames,
    derived_inputs,
    mutations,
    raw_frames,
)
from tests.integration import app
from tests.integration.support import ROOT, alive, ids_on, memory_kib

pytestmark = pytest.mark.integration

SLOW = settings.default.max_examples >= 10_000
INT = "io.statefun.types/int"
KNOWN = 6  # known counters, with the values 1..KNOWN
GEN = struct.Struct(">I")
#: kinds a peer handles whatever the generation stamped on them (Inbound.on_frame)
ANY_GENERATION_KINDS = frozenset({codec.HEARTBEAT, codec.RECOVER, codec.READY, codec.RESUME, codec.RESTORE_FAILED})
#: growth of the peer's anonymous RSS over the fuzz that counts as unbounded
RSS_BOUND_KIB = 32 * 1024
APP_TYPES = frozenset(merge_functions(app.functions))
#: the peer's anonymous RSS and rejected-frame count when each fuzz started
RSS_BEFORE: dict[str, int] = {}
BAD_BEFORE: dict[str, int] = {}


def budget(ci: int, slow: int) -> int:
    return slow if SLOW else ci


#: The peer is stateful: once a frame broke it, every later example fails too, so shrinking
#: would only retry (each try waiting out a barrier); the first failing example is reported as
#: is, and the frames sent in it are written to a file named in the failure.
NO_SHRINK: Final = [Phase.explicit, Phase.reuse, Phase.generate]


def send_all(sock: zmq.Socket, frames: list[bytes], barrier: Any, workdir: Path, what: str) -> None:
    """Send ``frames`` then pass ``barrier``; on failure, save the frames for a replay."""
    for frame in frames:
        sock.send(frame)
    try:
        barrier()
    except AssertionError as exc:
        saved = workdir / f"{what}-failing-example.msgpack"
        saved.write_bytes(msgpack.packb(frames))
        raise AssertionError(f"{exc}\nthe {len(frames)} frames of this example are in {saved}") from None


def int_bytes(n: int) -> bytes:
    return IntType.serializer().serialize(n)  # type: ignore[no-any-return]


def int_value(data: bytes) -> int:
    return IntType.serializer().deserialize(data)  # type: ignore[no-any-return]


# -- the peer under test --------------------------------------------------------------------


class FuzzedPeer:
    """Peer 0 of a ``peers``-peer mesh, alone in a process of its own; peer 1 (if any) is us."""

    def __init__(self, workdir: Path, peers: int) -> None:
        ports = free_ports(peers + 1)
        self.workdir = workdir
        self.peers = peers
        self.endpoints = [f"tcp://127.0.0.1:{p}" for p in ports[:peers]]
        self.client_endpoint = f"tcp://127.0.0.1:{ports[peers]}"
        self.known = {i: n + 1 for n, i in enumerate(ids_on(0, f"fuzz-known-{uuid.uuid4().hex[:6]}", KNOWN, peers))}
        tables = "".join(
            f'[[peer]]\nendpoint = "{ep}"\nclient_endpoint = "{self.client_endpoint if k == 0 else ""}"\n'
            for k, ep in enumerate(self.endpoints)
        )
        config = workdir / "mesh.toml"
        config.write_text(f'state_dir = "{workdir / "state"}"\nfunctions = ["{app.__name__}:functions"]\n{tables}')
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self.log_path = workdir / "peer.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "statefun_mesh",
                    "peer",
                    "--config",
                    str(config),
                    "--id",
                    "0",
                    "--log-level",
                    "critical",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.ctx = zmq.Context()
        self.client = self._socket(zmq.DEALER, self.client_endpoint, f"fuzz-client-{uuid.uuid4().hex[:6]}".encode())
        self._corr = 1 << 40
        self.replies = 0

    def _socket(self, kind: int, endpoint: str, identity: bytes | None = None, bind: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            sock.setsockopt(zmq.IDENTITY, identity)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
        return sock

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def rss_anon_kib(self) -> int:
        return memory_kib(self.proc.pid).get("RssAnon", 0)

    def call(self, kind: int, *items: Any, timeout: float = 30.0) -> tuple[int, list[Any]]:
        """One client request; replies to earlier (fuzzed) frames are read and dropped on the way."""
        self._corr += 1
        corr = self._corr
        self.client.send(codec.encode_control(kind, corr, *items))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.client.poll(int(left * 1000) + 1):
                raise AssertionError(
                    f"peer 0 did not answer a {kind:#x} frame within {timeout} s "
                    f"(alive: {self.proc.poll() is None}):\n{self.log()}"
                )
            answer = codec.decode_control(self.client.recv())
            if answer[1][0] == corr:
                return answer
            self.replies += 1

    def count(self, id: str) -> int:
        kind, items = self.call(codec.C_REQUEST, app.COUNTER, id, INT, int_bytes(0), 10.0)
        assert kind == codec.R_REPLY, items
        return int_value(items[4])

    def bad_frames(self) -> int:
        """The rejected frames the peer has counted (``status()["bad_frames"]``)."""
        _, items = self.call(codec.C_INFO)
        return int(items[1]["status"]["bad_frames"])

    def add(self, id: str, n: int) -> None:
        kind, items = self.call(codec.C_SEND, app.COUNTER, id, INT, int_bytes(n), "")
        assert kind == codec.R_ACK, items

    def wait_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the peer exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.call(codec.C_INFO, timeout=1.0)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.ctx.destroy(linger=0)


def start_peer(workdir: Path, peers: int) -> FuzzedPeer:
    peer = FuzzedPeer(workdir, peers)
    try:
        peer.wait_up()
        for id, n in peer.known.items():
            peer.add(id, n)
        assert {id: peer.count(id) for id in peer.known} == peer.known
    except BaseException:
        peer.close()
        raise
    return peer


def check_after_fuzz(peer: FuzzedPeer, rss_before: int, fuzz_count: Any, what: str) -> None:
    assert peer.proc.poll() is None and alive(peer.proc.pid), f"the peer died:\n{peer.log()}"
    counts = {id: peer.count(id) for id in peer.known}
    assert counts == peer.known, f"fuzzed frames on the {what} changed known counters: {counts} != {peer.known}"
    fresh = ids_on(0, f"fuzz-fresh-{uuid.uuid4().hex[:6]}", 1, peer.peers)[0]
    peer.add(fresh, 5)
    assert peer.count(fresh) == 5
    grown = peer.rss_anon_kib() - rss_before
    fuzz_count.note(f"{what}: the peer's RssAnon grew {grown} KiB over its fuzz (bound {RSS_BOUND_KIB} KiB)")
    assert grown < RSS_BOUND_KIB, f"the peer's anonymous memory grew by {grown} KiB over the fuzz of its {what}"


# -- the client endpoint --------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_fuzz_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedPeer]:
    peer = start_peer(tmp_path_factory.mktemp("fuzz-client"), peers=1)
    try:
        yield peer
    finally:
        peer.close()


def client_skip_reason(frame: bytes, known: dict[str, int]) -> str | None:
    """Why a frame is not sent to the client endpoint (see the module docstring), or None."""
    try:
        kind, items = codec.decode_control(frame, CLIENT_KINDS)
    except FrameDecodeError:
        return None
    if kind in (codec.C_SEND, codec.C_REQUEST) and items[1] == app.COUNTER and items[2] in known:
        return "valid for a known counter"
    if kind == codec.C_REQUEST and math.isfinite(items[5]) and items[5] > 30:
        return "request timeout over 30 s"  # valid: it would hold its pending slot that long
    return None


@st.composite
def client_frames(draw: st.DrawFn) -> bytes:
    """Mostly client kinds (valid or with wrong items), some other kinds, batches and raw bytes."""
    which = draw(st.integers(0, 9))
    if which < 6:
        kind = draw(st.sampled_from(sorted(CLIENT_KINDS)))
        frame: bytes = draw(control_frames(kinds=st.just(kind)))
        return frame
    if which < 8:
        return draw(control_frames())  # any kind, also the peers' and the answers'
    return draw(base_frames)


@settings(max_examples=budget(ci=250, slow=5_000), phases=NO_SHRINK)
@given(base=client_frames(), ops=st.lists(mutations, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_client_endpoint_survives_fuzzed_frames(
    client_fuzz_peer: FuzzedPeer, fuzz_count: Any, base: bytes, ops: list[Any], seed: int
) -> None:
    peer = client_fuzz_peer
    if "client" not in RSS_BEFORE:
        RSS_BEFORE["client"], BAD_BEFORE["client"] = peer.rss_anon_kib(), peer.bad_frames()
    frames = []
    for frame in derived_inputs(base, ops, seed, MUTANTS):
        reason = client_skip_reason(frame, peer.known)
        if reason is not None:
            fuzz_count.add(f"client endpoint skipped: {reason}")
            continue
        frames.append(frame)
        try:
            codec.decode_control(frame, CLIENT_KINDS)
            fuzz_count.add("client endpoint frames sent, well-formed")
        except FrameDecodeError:
            fuzz_count.add("client endpoint frames sent, malformed")
    if seed % 8 == 0:  # a message of several parts is no client frame, whatever the parts hold
        peer.client.send_multipart(frames[:3] if len(frames) > 2 else [base, base])
        fuzz_count.add("client endpoint frames sent, malformed")
    # the barrier: an INFO answered after everything before it was read
    send_all(peer.client, frames, lambda: peer.call(codec.C_INFO), peer.workdir, "client")


def test_client_endpoint_state_and_memory_after_the_fuzz(client_fuzz_peer: FuzzedPeer, fuzz_count: Any) -> None:
    """Runs after the fuzz above (same module, same peer): nothing known changed, the peer serves, bounded RSS."""
    if "client" not in RSS_BEFORE:
        pytest.skip("checks what the fuzz test above did (run the whole module)")
    malformed = fuzz_count.counts["client endpoint frames sent, malformed"]
    rejected = client_fuzz_peer.bad_frames() - BAD_BEFORE["client"]
    assert rejected == malformed, f"the peer counted {rejected} rejected frames for the {malformed} malformed ones"
    check_after_fuzz(client_fuzz_peer, RSS_BEFORE["client"], fuzz_count, "client endpoint")


# -- the peer endpoint ----------------------------------------------------------------------


class FakePeer1:
    """This test as peer 1: a DEALER announcing peer 1's routing id into peer 0, and a ROUTER
    at peer 1's endpoint taking what peer 0 sends it."""

    def __init__(self, peer: FuzzedPeer) -> None:
        self.peer = peer
        self.sink = peer._socket(zmq.ROUTER, peer.endpoints[1], bind=True)
        self.dealer = peer._socket(zmq.DEALER, peer.endpoints[0], peer_identity(1))
        self.barrier_id = f"fuzz-barrier-{uuid.uuid4().hex[:6]}"
        self._rid = 1 << 50
        self.received = 0

    def barrier(self, timeout: float = 30.0) -> None:
        """A batch asking peer 0 to answer a request on peer 1's channel: once the answer is
        back, peer 0 has read every frame sent before it and its dispatch loop runs."""
        self._rid += 1
        rid = self._rid
        batch = encode_batch([(app.COUNTER, self.barrier_id, "", "", INT, int_bytes(0), 1, rid)])
        self.dealer.send(GEN.pack(0) + batch)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sink.poll(int(left * 1000) + 1):
                raise AssertionError(f"peer 0 did not answer the barrier on peer 1's channel:\n{self.peer.log()}")
            parts = self.sink.recv_multipart()
            self.received += 1
            _, _, body = codec.open_envelope(parts[-1])  # a REPLIES frame carries peer 0's credit grant
            if len(body) > 2 and body[1] == codec.REPLIES:
                _, items = codec.decode_control(body)
                if any(reply[0] == rid for reply in items[0]):
                    return


@pytest.fixture(scope="module")
def peer_fuzz_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FuzzedPeer, FakePeer1]]:
    peer = start_peer(tmp_path_factory.mktemp("fuzz-peer"), peers=2)
    try:
        fake = FakePeer1(peer)
        fake.barrier(timeout=60)
        yield peer, fake
    finally:
        peer.close()


def peer_skip_reason(frame: bytes, known: dict[str, int]) -> str | None:
    """Why a frame is not sent to the peer endpoint (see the module docstring), or None."""
    try:
        gen, _, body = codec.open_envelope(frame)  # a credit grant in it: never owed, refused
    except FrameDecodeError:
        return None  # refused before anything else is looked at
    if body[0] != 1:
        return None
    if gen != 0 and body[1] not in ANY_GENERATION_KINDS:
        return "generation ahead of the peer's"
    if body[1] != codec.KIND_BATCH:
        return None
    try:
        records = decode_batch(body)
    except FrameDecodeError:
        return None
    for rec in records:
        if rec[0] == app.COUNTER and rec[1] in known:
            return "valid for a known counter"
        if rec[0] != app.COUNTER and rec[0] in APP_TYPES:
            return "valid for another function of the app"
    return None


def peer_frame_class(frame: bytes) -> str:
    """ "well-formed" if peer 0's decoders accept the frame (its generation aside), else "malformed"."""
    try:
        _, _, body = codec.open_envelope(frame)
        if body[0] != 1:
            return "malformed"
        if body[1] == codec.KIND_BATCH:
            decode_batch(body)
        else:
            codec.decode_control(body, PEER_KINDS)
    except FrameDecodeError:
        return "malformed"
    return "well-formed"


@st.composite
def peer_frames(draw: st.DrawFn) -> bytes:
    """Peer frames in their envelope (batches, control frames of peer kinds and others), some
    with another generation, some carrying a credit grant, and raw bytes."""
    which = draw(st.integers(0, 9))
    if which == 9:
        return draw(raw_frames)
    if which < 5:
        body = draw(base_frames)
    elif which < 8:
        body = draw(control_frames(kinds=st.sampled_from(sorted(PEER_KINDS))))
    else:
        body = draw(control_frames())
    gen = 0 if draw(st.integers(0, 7)) else draw(st.integers(0, 2**32 - 1))
    if not draw(st.integers(0, 4)):  # an envelope carrying a credit grant
        return codec.envelope(gen & codec.GENERATION_MASK, draw(st.integers(1, 2**32 - 1))) + body
    return GEN.pack(gen) + body


@settings(max_examples=budget(ci=250, slow=5_000), phases=NO_SHRINK)
@given(base=peer_frames(), ops=st.lists(mutations, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_peer_endpoint_survives_fuzzed_frames(
    peer_fuzz_peer: tuple[FuzzedPeer, FakePeer1], fuzz_count: Any, base: bytes, ops: list[Any], seed: int
) -> None:
    peer, fake = peer_fuzz_peer
    if "peer" not in RSS_BEFORE:
        RSS_BEFORE["peer"], BAD_BEFORE["peer"] = peer.rss_anon_kib(), peer.bad_frames()
    frames = []
    for frame in derived_inputs(base, ops, seed, MUTANTS):
        reason = peer_skip_reason(frame, peer.known)
        if reason is not None:
            fuzz_count.add(f"peer endpoint skipped: {reason}")
            continue
        frames.append(frame)
        fuzz_count.add(f"peer endpoint frames sent, {peer_frame_class(frame)}")
    if seed % 8 == 0:  # several parts: dropped by the transport, whatever they hold
        fake.dealer.send_multipart(frames[:3] if len(frames) > 2 else [base, base])
        fuzz_count.add("peer endpoint frames sent, malformed")
    send_all(fake.dealer, frames, fake.barrier, peer.workdir, "peer")


def test_peer_endpoint_state_and_memory_after_the_fuzz(
    peer_fuzz_peer: tuple[FuzzedPeer, FakePeer1], fuzz_count: Any
) -> None:
    """Runs after the fuzz above: nothing known changed, peer 0 serves, bounded RSS."""
    peer, fake = peer_fuzz_peer
    if "peer" not in RSS_BEFORE:
        pytest.skip("checks what the fuzz test above did (run the whole module)")
    fake.barrier()
    malformed = fuzz_count.counts["peer endpoint frames sent, malformed"]
    rejected = peer.bad_frames() - BAD_BEFORE["peer"]
    # at least one each; well-formed frames with wrong content (a credit never owed) count too
    assert rejected >= malformed, f"peer 0 counted {rejected} rejected frames for the {malformed} malformed ones"
    fuzz_count.note(f"peer endpoint: {rejected:,} frames counted as rejected by peer 0")
    check_after_fuzz(peer, RSS_BEFORE["peer"], fuzz_count, "peer endpoint")


def test_skip_rules_let_malformed_and_odd_frames_through() -> None:
    """The premise of the endpoint fuzz: only the frames named in the module docstring are held back."""
    known = {"k": 1}
    assert client_skip_reason(codec.encode_control(codec.C_SEND, 1, app.COUNTER, "k", INT, b"x", ""), known)
    assert client_skip_reason(codec.encode_control(codec.C_REQUEST, 1, "x/y", "z", INT, b"", 3600.0), known)
    nan = codec.encode_control(codec.C_REQUEST, 1, "x/y", "z", INT, b"", float("nan"))
    assert client_skip_reason(nan, known) is None  # sent: the endpoint refuses it (max_request_timeout)
    assert client_skip_reason(codec.encode_control(codec.C_SEND, 1, app.COUNTER, "other", INT, b"x", ""), known) is None
    assert client_skip_reason(codec.encode_control(codec.C_REQUEST, 1, "a/b", "c", INT, b"", 1.5), known) is None
    assert client_skip_reason(b"\x01\x10" + msgpack.packb([1, 2]), known) is None
    batch = encode_batch([(app.COUNTER, "k", "", "", INT, b"", 0, 0)])
    assert peer_skip_reason(GEN.pack(0) + batch, known) == "valid for a known counter"
    assert peer_skip_reason(GEN.pack(7) + batch, known) == "generation ahead of the peer's"
    assert peer_skip_reason(GEN.pack(7) + codec.encode_control(codec.HEARTBEAT, 1, 2), known) is None
    assert peer_skip_reason(GEN.pack(0) + batch[:-1], known) is None
    other = encode_batch([(app.COUNTER, "other", "", "", INT, b"", 1, 5)])
    assert peer_skip_reason(GEN.pack(0) + other, known) is None
