"""Repeated problems log a bounded number of lines and a summary with the count (issue 7 item 6).

Real sockets into a real in-process mesh over tcp: 10,000 bad frames on a peer link, 10,000
at a client endpoint, 10,000 from a routing id that is no peer; and a function that fails
on every message. Each is counted in full; the log gets one line per kind and window, and a
summary line with the rest once the window closed (flushed from the heartbeat loop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from statefun_mesh import LocalMesh, StatefulFunctions, message_builder
from statefun_mesh.logutil import DEFAULT_WINDOW
from statefun_mesh.mesh import free_ports
from statefun_mesh.transport.zeromq import peer_identity
from tests.integration import app
from tests.integration.support import eventually, ids_on

#: how repeated problems are logged: no hot-path code (the decoders are fuzzed on both cores)
pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]

N = 10_000
SUMMARY = re.compile(r"\.\.\. and ([\d,]+) more (.+) in the last \d+ s")


def dealer(endpoint: str, identity: bytes | None) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def summarised(records: list[logging.LogRecord], kind: str) -> int:
    """The count the summary lines of ``kind`` report."""
    total = 0
    for r in records:
        m = SUMMARY.match(r.getMessage())
        if m and m.group(2) == kind:
            total += int(m.group(1).replace(",", ""))
    return total


@pytest.mark.timeout(90)
async def test_ten_thousand_bad_frames_log_a_bounded_number_of_lines_and_a_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    client_ep = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    mesh = LocalMesh(
        app.functions,
        peers=3,
        transport="tcp",
        state_dir=tmp_path,
        client_endpoints=[client_ep, "", ""],
        heartbeat_interval=0.2,
    )
    await mesh.start()
    try:
        peer0 = mesh.peers[0]
        before = peer0.status()["bad_frames"]
        first = len(caplog.records)
        # (1) a peer link: peer 2's routing id (peer 1 keeps its channel), frames too short
        # or of another version: refused before anything else is looked at
        link = dealer(mesh.config.endpoints[0], peer_identity(2))
        # (2) the client endpoint: frames that are no client frame
        client = dealer(client_ep, None)
        # (3) a routing id that is no peer of the mesh
        stranger = dealer(mesh.config.endpoints[0], b"stranger")
        try:
            for i in range(N):
                await link.send(b"\x00\x00" if i % 2 else b"\x00\x00\x00\x00\x09\x01junk")
                await client.send(b"\x07not a frame")
                await stranger.send(b"x")
            await eventually(
                lambda: asyncio.sleep(0, peer0.status()["bad_frames"] - before >= 3 * N),
                timeout=30,
                interval=0.1,
                what=f"{3 * N} bad frames counted",
            )
            # the client endpoint answers each bad frame with an ERROR: drain them
            while await client.poll(0):
                await client.recv()
        finally:
            for s in (link, client, stranger):
                s.close(0)
        assert peer0.status()["bad_frames"] - before == 3 * N, "every bad frame counts in status()['bad_frames']"
        # the summaries come once the window closed, from the heartbeat loop
        await asyncio.sleep(DEFAULT_WINDOW + 1.0)
        records = [r for r in caplog.records[first:] if r.name.startswith("statefun_mesh")]
        noisy = [r for r in records if r.levelno >= logging.WARNING]
        assert len(noisy) < 20, f"{len(noisy)} log lines for {3 * N} bad frames:\n" + "\n".join(
            r.getMessage() for r in noisy[:40]
        )
        firsts = {
            "bad frames": sum("rejected a frame from peer 2" in r.getMessage() for r in records),
            "bad client frames": sum("rejected a frame from client" in r.getMessage() for r in records),
            "frames from non-peers": sum("not a peer of this mesh" in r.getMessage() for r in records),
        }
        for kind, lines in firsts.items():
            assert lines >= 1, f"no line names the first of the {kind}"
            assert lines + summarised(records, kind) == N, (
                f"{kind}: {lines} lines + a summary of {summarised(records, kind)} != {N}"
            )
        run = uuid.uuid4().hex[:8]
        key = ids_on(0, run, 1)[0]
        reply = await mesh.peers[1].request(
            message_builder(target_typename=app.COUNTER, target_id=key, int_value=3), timeout=10
        )
        assert reply.as_int() == 3, "the mesh serves on"
    finally:
        await mesh.aclose()


def failing_functions() -> StatefulFunctions:
    functions = StatefulFunctions()

    @functions.bind(typename="lt/fails")
    def fails(context, message):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"bad input {message.as_int()}")

    return functions


@pytest.mark.timeout(60)
async def test_failing_invocations_log_one_line_per_kind_and_dead_letters_carry_the_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with LocalMesh(failing_functions(), state_dir=tmp_path) as mesh:
        first = len(caplog.records)
        for i in range(300):
            await mesh.send(message_builder(target_typename="lt/fails", target_id=f"k{i % 7}", int_value=i))
        await mesh.idle(timeout=30)
        assert mesh.peers[0].status()["failures"] == 300
        lines = [r for r in caplog.records[first:] if r.levelno >= logging.WARNING]
        text = "\n".join(r.getMessage() for r in lines)
        assert len(lines) <= 2, f"{len(lines)} lines for 300 failures of one kind:\n{text}"
        assert all(r.exc_info is None for r in lines), "the traceback belongs in the dead letter, not the log"
        assert "lt/fails" in text and "RuntimeError" in text
        letters = []
        async for rec in mesh.egress("statefun-mesh/dead-letters"):
            letters.append(json.loads(rec.raw_value()))
            if len(letters) == 300:
                break
        assert all("Traceback" in d["traceback"] and "bad input" in d["traceback"] for d in letters)
