"""The envelope of frames between peers, and credit grants carried in it (issue 9).

Every frame between peers travels in an envelope: the sender's generation, and, when the
sender owes credit to the receiver and may grant it, the grant (docs/architecture.md §5).
Before, a grant was a CREDIT frame of its own after each batch, so a request through
another peer cost that peer a REPLIES frame and a CREDIT frame back; now the grant rides
the REPLIES frame. A batch or reply frame is built with room for the envelope's head,
which is written in place when it is sent (no ``prefix + frame`` copy).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from statefun_mesh import IntType, LocalMesh, StatefulFunctions, ValueSpec, message_builder
from statefun_mesh._speedups import key_group
from statefun_mesh.errors import FrameDecodeError
from statefun_mesh.transport import codec

pytestmark = pytest.mark.timeout(60)

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "data" / "envelope_vectors.json").read_text())["vectors"]
MAX_PARALLELISM = 128


@pytest.mark.parametrize("v", VECTORS, ids=[v["what"] for v in VECTORS])
def test_envelope_vectors(v: dict[str, Any]) -> None:
    frame, env = bytes.fromhex(v["frame"]), bytes.fromhex(v["envelope"])
    assert codec.envelope(v["generation"], v["credit"]) + frame == env
    room = bytearray(codec.ENVELOPE_MAX) + frame
    assert bytes(codec.seal_envelope(room, v["generation"], v["credit"])) == env
    gen, credit, body = codec.open_envelope(env)
    assert (gen, credit, bytes(body)) == (v["generation"], v["credit"] or None, frame)


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x07\x01", b"\x80\x00\x00\x07\x00\x00\x00\x01\x01", b"\xff" * 9])
def test_an_envelope_too_short_for_its_head_and_a_frame_is_refused(data: bytes) -> None:
    with pytest.raises(FrameDecodeError, match="too short"):
        codec.open_envelope(data)


def test_a_generation_over_31_bits_does_not_fit_an_envelope() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        codec.envelope(codec.GENERATION_MASK + 1)
    with pytest.raises(ValueError, match="does not fit"):
        codec.seal_envelope(bytearray(10), codec.GENERATION_MASK + 1, 1)


def test_a_large_frame_is_opened_without_a_copy() -> None:
    frame = bytes(1 << 16)
    _, _, body = codec.open_envelope(codec.envelope(3, 5) + frame)
    assert isinstance(body, memoryview) and body.nbytes == len(frame)


def test_flush_room_is_flush_after_free_room(speedups: ModuleType) -> None:
    rec = ("t/f", "a", "c/t", "b", "v", b"\x00" * 300, 1, 2)
    for n in (0, 1, 15, 16, 70_000):
        a, b = speedups.BatchEncoder(), speedups.BatchEncoder()
        a.extend([rec] * n)
        b.extend([rec] * n)
        framed = a.flush_room(8)
        assert type(framed) is bytearray and framed == bytearray(8) + b.flush()
        assert len(a) == 0 and a.nbytes == 0 and a.flush() == speedups.encode_batch([])
    with pytest.raises(ValueError):
        speedups.BatchEncoder().flush_room(-1)


# -- credit carried on frames going the same way ---------------------------------------


def app() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="env/counter", specs=[ValueSpec(name="count", type=IntType)])
    def counter(context, message):
        context.storage.count = (context.storage.count or 0) + 1
        if context.in_request:
            context.reply(int_value=context.storage.count)

    return functions


def ids_on(peer: int, peers: int, count: int) -> list[str]:
    out = [f"k-{i}" for i in range(count * peers * 8)]
    return [k for k in out if key_group(k, MAX_PARALLELISM) * peers // MAX_PARALLELISM == peer][:count]


def count_frames(peer: Any) -> dict[str, int]:
    """Count what ``peer`` sends other peers: frames by kind, grants in envelopes, and batch or
    reply frames handed to the transport as a new ``bytes`` (head + frame: a copy of the frame)."""
    counts: dict[str, int] = {}
    send = peer.transport.send

    def counted(p: int, data: Any) -> None:
        _, credit, body = codec.open_envelope(bytes(data))
        kind = {codec.KIND_BATCH: "batch", codec.CREDIT: "credit", codec.REPLIES: "replies"}.get(body[1], "other")
        counts[kind] = counts.get(kind, 0) + 1
        if credit is not None:
            counts["carried"] = counts.get("carried", 0) + credit
        if kind in ("batch", "replies") and type(data) is bytes:
            counts["copied"] = counts.get("copied", 0) + 1
        send(p, data)

    peer.transport.send = counted
    return counts


@pytest.mark.parametrize("transport", ["memory", "inproc"])
async def test_a_request_through_another_peer_gets_its_credit_back_on_the_reply(tmp_path: Path, transport: str) -> None:
    """Old code: the owner answered each request with a REPLIES frame and then a CREDIT frame
    (100 CREDIT frames for 100 requests); now the grant rides the REPLIES frame."""
    n = 100
    keys = ids_on(1, 2, 5)
    async with LocalMesh(
        app(), state_dir=tmp_path, peers=2, transport=transport, max_parallelism=MAX_PARALLELISM
    ) as mesh:
        entry, owner = mesh.peers
        counts, sent = count_frames(owner), count_frames(entry)
        for i in range(n):
            msg = message_builder(target_typename="env/counter", target_id=keys[i % 5], int_value=1)
            reply = await entry.request(msg)
            assert reply.as_int() == i // 5 + 1
        await mesh.idle(10)
        assert entry.router.credit[1] == mesh.config.credit_window  # every grant arrived
        assert counts.get("replies") == n
        assert counts.get("credit", 0) == 0, counts
        assert counts.get("carried") == n
        assert owner.router.credits_piggybacked == n and owner.router.credit_frames == 0
        # the head written in place: the frames went out as views of the frames built, not copies
        assert sent.get("batch") == n and "copied" not in sent and "copied" not in counts


@pytest.mark.parametrize("transport", ["memory", "inproc"])
async def test_credit_with_nothing_going_back_is_a_frame_of_its_own(tmp_path: Path, transport: str) -> None:
    """Messages with no answer: nothing goes back, so the grant is a CREDIT frame once the
    receiver's inbox is empty, as before; the window is whole again."""
    keys = ids_on(1, 2, 5)
    async with LocalMesh(
        app(), state_dir=tmp_path, peers=2, transport=transport, max_parallelism=MAX_PARALLELISM
    ) as mesh:
        entry, owner = mesh.peers
        counts = count_frames(owner)
        for i in range(50):
            await entry.send(message_builder(target_typename="env/counter", target_id=keys[i % 5], int_value=1))
        await mesh.idle(10)
        assert entry.router.credit[1] == mesh.config.credit_window
        assert counts.get("credit", 0) >= 1 and owner.router.credit_frames == counts["credit"]
        total = 0
        for k in keys:
            msg = message_builder(target_typename="env/counter", target_id=k, int_value=1)
            total += (await mesh.request(msg)).as_int()
        assert total == 50 + 5


async def test_a_carried_grant_of_a_later_generation_waits_like_a_credit_frame(tmp_path: Path) -> None:
    """A grant is handled as the CREDIT frame it replaces would be: one in an envelope of a
    later generation is held with it (not applied to this generation's window); a grant of
    more than is outstanding is refused and counted, and the frame it rode is still handled."""
    async with LocalMesh(
        app(), state_dir=tmp_path, peers=2, transport="memory", max_parallelism=MAX_PARALLELISM
    ) as mesh:
        peer = mesh.peers[0]
        window = mesh.config.credit_window
        peer.router._credit[1] = window - 10  # 10 records outstanding to peer 1
        gen = peer.generation
        replies = codec.encode_control(codec.REPLIES, [])  # no reply in it
        peer.inbound.on_frame(1, codec.envelope(gen + 1, 4) + replies)
        assert peer.router.credit[1] == window - 10
        held = [(g, bytes(f)) for g, _, f in peer.inbound.held]
        assert held == [(gen + 1, codec.encode_control(codec.CREDIT, 4)), (gen + 1, replies)]
        bad = peer.inbound.bad_frames
        peer.inbound.on_frame(1, codec.envelope(gen, 11) + replies)  # more than outstanding
        assert peer.router.credit[1] == window - 10 and peer.inbound.bad_frames == bad + 1
        peer.inbound.on_frame(1, codec.envelope(gen, 6) + replies)
        assert peer.router.credit[1] == window - 4 and peer.inbound.bad_frames == bad + 1
