"""Conformance suite for :class:`~statefun_mesh.transport.base.Transport` implementations.

Every transport must pass :func:`check_transport` (in the spirit of trio's
``check_two_way_stream``)::

    async def test_my_transport() -> None:
        await check_transport(lambda n: [MyTransport(i, n) for i in range(n)])

The factory returns ``n`` fresh, unstarted transports forming one mesh (transport ``i``
is peer ``i``); it is called once per check, so it must hand out new endpoints each
time. Every wait is bounded; a failed check raises :class:`AssertionError` naming what
was wrong, and every transport a check created is closed even when the check fails.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from ..errors import ClosedTransportError
from ..transport.base import Transport

__all__ = ["MIN_FRAME", "TransportFactory", "check_transport"]

#: The smallest frame a peer ever sends (version byte + kind byte).
MIN_FRAME: Final = 2
_HEADER: Final = struct.Struct(">HHI")  # src, dst, index: lets a mismatch say which frame came instead
_PATTERN: Final = bytes(range(256)) * ((1 << 20) // 256 + 2)
_MAX_ERRORS: Final = 20

#: ``factory(n_peers)`` -> ``n_peers`` unstarted transports of one mesh (or an awaitable of them).
TransportFactory = Callable[[int], Sequence[Transport] | Awaitable[Sequence[Transport]]]


# -- frames ------------------------------------------------------------------------------


def _sizes(seed: object, src: int, dst: int, count: int, max_size: int) -> list[int]:
    """Frame sizes for one channel: the extremes first, then a mix weighted to small frames."""
    rng = random.Random(f"{seed}:{src}->{dst}")
    head = [MIN_FRAME, max_size, 3, 8, 9, 65536, 65537]
    out: list[int] = []
    for i in range(count):
        if i < len(head):
            out.append(min(head[i], max_size))
            continue
        r = rng.random()
        if r < 0.5:
            size = rng.randint(MIN_FRAME, 64)
        elif r < 0.85:
            size = rng.randint(65, 4096)
        elif r < 0.99:
            size = rng.randint(4097, 65536)
        else:
            size = rng.randint(65537, max_size)
        out.append(min(size, max_size))
    return out


def _frame(src: int, dst: int, index: int, size: int) -> bytes:
    """The ``index``-th frame from ``src`` to ``dst``: deterministic, so the receiver can rebuild it."""
    header = _HEADER.pack(src, dst, index & 0xFFFFFFFF)
    if size < _HEADER.size:
        # too short for the header: a digest of it, still distinct between neighbours
        mixed = (index * 0x9E3779B1 + src * 0x85EBCA77 + dst * 0xC2B2AE3D) & 0xFFFFFFFFFFFFFFFF
        return mixed.to_bytes(8, "big")[:size]
    off = (index * 7 + src * 13 + dst) % 256
    return header + _PATTERN[off : off + size - _HEADER.size]


def _describe(frame: bytes) -> str:
    if len(frame) >= _HEADER.size:
        s, d, i = _HEADER.unpack_from(frame)
        return f"a {len(frame)}-byte frame that looks like #{i} of {s}->{d}"
    return f"a {len(frame)}-byte frame {frame!r}"


class _Plan:
    """What every channel of one check carries: ``sizes[(src, dst)]``."""

    def __init__(self, n: int, count: int, max_size: int, seed: object, pairs: list[tuple[int, int]] | None = None):
        self.n = n
        pairs = pairs if pairs is not None else [(s, d) for s in range(n) for d in range(n) if s != d]
        self.sizes = {(s, d): _sizes(seed, s, d, count, max_size) for s, d in pairs}

    def expected(self, dst: int) -> dict[int, int]:
        return {s: len(sz) for (s, d), sz in self.sizes.items() if d == dst}


class _Receiver:
    """An ``on_frame`` handler that checks every frame against the plan as it arrives."""

    def __init__(self, me: int, n: int, plan: _Plan | None) -> None:
        self.me = me
        self.n = n
        self.plan = plan
        self.next = [0] * n
        self.errors: list[str] = []
        self.done = asyncio.Event()
        self.raw: list[tuple[int, bytes]] = []  # kept only without a plan
        self._check_done()

    def expect(self, src: int) -> int:
        if self.plan is None:
            return 0
        return len(self.plan.sizes.get((src, self.me), ()))

    def _error(self, text: str) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(f"peer {self.me}: {text}")

    def _check_done(self) -> None:
        if all(self.next[s] >= self.expect(s) for s in range(self.n)):
            self.done.set()

    def __call__(self, src: int, frame: bytes) -> None:  # never raises: it runs inside the transport
        if type(src) is not int or not 0 <= src < self.n or src == self.me:
            self._error(f"on_frame called with sender {src!r}")
            return
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            self._error(f"on_frame called with a {type(frame).__name__}, not bytes")
            return
        frame = bytes(frame)
        i = self.next[src]
        self.next[src] = i + 1
        if self.plan is None:
            self.raw.append((src, frame))
            return
        sizes = self.plan.sizes.get((src, self.me))
        if sizes is None or i >= len(sizes):
            self._error(f"unexpected extra frame #{i} from peer {src}: {_describe(frame)}")
            return
        want = _frame(src, self.me, i, sizes[i])
        if frame != want:
            self._error(
                f"frame #{i} from peer {src} should be {len(want)} bytes (#{i} of {src}->{self.me}), "
                f"got {_describe(frame)}: reordered, lost, duplicated or corrupted"
            )
        self._check_done()

    def progress(self) -> str:
        return ", ".join(f"{self.next[s]}/{self.expect(s)} from {s}" for s in range(self.n) if s != self.me)


# -- helpers -----------------------------------------------------------------------------


async def _make(factory: TransportFactory, n: int) -> list[Transport]:
    made = factory(n)
    if inspect.isawaitable(made):
        made = await made
    transports = list(made)
    assert len(transports) == n, f"factory({n}) returned {len(transports)} transports"
    for i, t in enumerate(transports):
        assert isinstance(t, Transport), f"factory returned a {type(t).__name__}, not a Transport"
        assert t.peer_id == i, f"transport {i} of the factory's list has peer_id {t.peer_id}"
    return transports


async def _close_all(transports: Sequence[Transport], timeout: float) -> None:
    errors: list[BaseException] = []
    for t in transports:
        try:
            await asyncio.wait_for(t.aclose(), timeout)
        except Exception as exc:  # close the rest before reporting
            errors.append(exc)
    if errors:
        raise AssertionError(f"aclose() failed: {errors[0]!r}") from errors[0]


async def _wait(receivers: Sequence[_Receiver], timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in receivers)), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        state = "; ".join(f"peer {r.me}: {r.progress()}" for r in receivers)
        errors = [e for r in receivers for e in r.errors]
        raise AssertionError(
            f"{what}: not every frame arrived within {timeout} s ({state})"
            + (f"; first errors: {errors[:5]}" if errors else "")
        ) from None


def _raise_errors(receivers: Sequence[_Receiver], what: str) -> None:
    errors = [e for r in receivers for e in r.errors]
    if errors:
        raise AssertionError(f"{what}: {len(errors)} bad deliveries, e.g.:\n  " + "\n  ".join(errors[:10]))


def _send_range(t: Transport, plan: _Plan, src: int, dst: int, lo: int, hi: int) -> None:
    sizes = plan.sizes[(src, dst)]
    for i in range(lo, min(hi, len(sizes))):
        frame = _frame(src, dst, i, sizes[i])
        if i % 3 == 1:  # send takes any contiguous buffer (a peer sends views of frames it built in place)
            t.send(dst, bytearray(frame))
        elif i % 3 == 2:
            t.send(dst, memoryview(bytearray(8) + frame)[8:])
        else:
            t.send(dst, frame)


# -- the checks --------------------------------------------------------------------------


async def _check_fifo_all_pairs(
    factory: TransportFactory, n: int, frames_per_pair: int, max_size: int, timeout: float, seed: object
) -> None:
    """Every channel at once: thousands of frames of 2 B to ``max_size``, all delivered, in order, once."""
    plan = _Plan(n, frames_per_pair, max_size, seed)
    transports = await _make(factory, n)
    receivers = [_Receiver(i, n, plan) for i in range(n)]
    try:
        # Start them one after the other and send at once: nothing waits for connections.
        for t, r in zip(transports, receivers, strict=True):
            await asyncio.wait_for(t.start(r), timeout)
        chunk = 50
        for lo in range(0, frames_per_pair, chunk):
            for s, d in plan.sizes:
                _send_range(transports[s], plan, s, d, lo, lo + chunk)
            await asyncio.sleep(0)  # let receivers run while senders keep sending
        await _wait(receivers, timeout, "FIFO on every channel")
        await asyncio.sleep(0.05)  # duplicates would show up now
        _raise_errors(receivers, "FIFO on every channel")
    finally:
        await _close_all(transports, timeout)


async def _check_sent_before_receiver_started(
    factory: TransportFactory, max_size: int, timeout: float, seed: object
) -> None:
    """Frames sent to a peer that has not started yet are delivered, in order, once it starts."""
    n, before, after = 3, 200, 50
    late = n - 1
    pairs = [(0, late), (1, late), (0, 1), (1, 0)]
    plan = _Plan(n, before + after, max_size, f"{seed}:late", pairs)
    transports = await _make(factory, n)
    receivers = [_Receiver(i, n, plan) for i in range(n)]
    try:
        for i in range(late):
            await asyncio.wait_for(transports[i].start(receivers[i]), timeout)
        for s, d in pairs:
            _send_range(transports[s], plan, s, d, 0, before)
        await asyncio.sleep(0.2)  # a transport that drops frames for absent peers would do it now
        if any(receivers[late].next):
            raise AssertionError(f"peer {late} received frames before it started")
        await asyncio.wait_for(transports[late].start(receivers[late]), timeout)
        for s, d in pairs:
            _send_range(transports[s], plan, s, d, before, before + after)
        await _wait(receivers, timeout, "frames sent before the receiver started")
        await asyncio.sleep(0.05)
        _raise_errors(receivers, "frames sent before the receiver started")
    finally:
        await _close_all(transports, timeout)


async def _check_bad_peer_ids(factory: TransportFactory, timeout: float) -> None:
    """``send`` to itself or to a peer outside the mesh raises ValueError and sends nothing."""
    n = 3
    transports = await _make(factory, n)
    receivers = [_Receiver(i, n, None) for i in range(n)]
    try:
        for t, r in zip(transports, receivers, strict=True):
            await asyncio.wait_for(t.start(r), timeout)
        for t in transports:
            for bad in (t.peer_id, -1, n, n + 7):
                try:
                    t.send(bad, b"\x01\x02bad peer id")
                except ValueError:
                    continue
                except Exception as exc:
                    raise AssertionError(
                        f"peer {t.peer_id}: send to peer {bad} raised {exc!r}, expected ValueError"
                    ) from exc
                raise AssertionError(f"peer {t.peer_id}: send to peer {bad} did not raise ValueError")
        # A good frame afterwards is the only thing anybody receives.
        transports[0].send(1, b"\x01\x02marker")
        await _wait_raw(receivers[1], 1, timeout, "the marker frame after bad sends")
        await asyncio.sleep(0.05)
        got = {r.me: [(s, f) for s, f in r.raw] for r in receivers}
        want = {0: [], 1: [(0, b"\x01\x02marker")], 2: []}
        if got != want or any(r.errors for r in receivers):
            raise AssertionError(f"after sends to bad peer ids, peers received {got} (errors: {receivers[0].errors})")
    finally:
        await _close_all(transports, timeout)


async def _wait_raw(r: _Receiver, count: int, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(r.raw) < count:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: peer {r.me} got {len(r.raw)} of {count} frames within {timeout} s")
        await asyncio.sleep(0.005)


async def _check_close(factory: TransportFactory, timeout: float) -> None:
    """aclose is idempotent (also unstarted), send after it raises ClosedTransportError,
    frames sent just before it still leave, and the other peers keep talking."""
    n = 3
    transports = await _make(factory, n)
    receivers = [_Receiver(i, n, None) for i in range(n)]
    try:
        for t, r in zip(transports, receivers, strict=True):
            await asyncio.wait_for(t.start(r), timeout)
        # A round trip 0 -> 1 first, so the channel is surely connected.
        transports[0].send(1, b"\x01\x02hello")
        await _wait_raw(receivers[1], 1, timeout, "a frame before closing")
        burst = [b"\x01\x02" + i.to_bytes(4, "big") for i in range(100)]
        for f in burst:
            transports[0].send(1, f)
        await asyncio.wait_for(transports[0].aclose(), timeout)
        try:
            transports[0].send(1, b"\x01\x02after close")
        except ClosedTransportError:
            pass
        except Exception as exc:
            raise AssertionError(f"send after aclose raised {exc!r}, expected ClosedTransportError") from exc
        else:
            raise AssertionError("send after aclose did not raise ClosedTransportError")
        try:
            await asyncio.wait_for(transports[0].aclose(), timeout)
            await asyncio.wait_for(asyncio.gather(transports[0].aclose(), transports[0].aclose()), timeout)
        except Exception as exc:
            raise AssertionError(f"a second aclose raised {exc!r}; aclose must be idempotent") from exc
        # Frames sent just before aclose get their grace period.
        await _wait_raw(receivers[1], 1 + len(burst), timeout, "frames sent just before aclose")
        if [f for _, f in receivers[1].raw[1:]] != burst:
            raise AssertionError("frames sent just before aclose arrived out of order or altered")
        # The others are unaffected.
        transports[1].send(2, b"\x01\x02one-to-two")
        transports[2].send(1, b"\x01\x02two-to-one")
        await _wait_raw(receivers[2], 1, timeout, "1 -> 2 after peer 0 closed")
        await _wait_raw(receivers[1], 2 + len(burst), timeout, "2 -> 1 after peer 0 closed")
        if receivers[2].raw != [(1, b"\x01\x02one-to-two")] or receivers[1].raw[-1] != (2, b"\x01\x02two-to-one"):
            raise AssertionError(
                f"after peer 0 closed: peer 1 got {receivers[1].raw[-1:]}, peer 2 got {receivers[2].raw}"
            )
        if receivers[0].raw:
            raise AssertionError(f"peer 0 received {receivers[0].raw[:3]} although nobody sent to it")
    finally:
        await _close_all(transports, timeout)
    # A transport that never started closes too, and refuses sends afterwards.
    unstarted = await _make(factory, 2)
    try:
        await asyncio.wait_for(unstarted[0].aclose(), timeout)
        await asyncio.wait_for(unstarted[0].aclose(), timeout)
        try:
            unstarted[0].send(1, b"\x01\x02x")
        except ClosedTransportError:
            pass
        except Exception as exc:
            raise AssertionError(
                f"send on a closed, never started transport raised {exc!r}, expected ClosedTransportError"
            ) from exc
        else:
            raise AssertionError("send on a closed, never started transport did not raise")
    finally:
        await _close_all(unstarted, timeout)


async def check_transport(
    factory: TransportFactory,
    *,
    frames_per_pair: int = 2000,
    max_frame_size: int = 1 << 20,
    peers: int = 3,
    timeout: float = 30.0,
    seed: object = 0,
) -> None:
    """Check that a :class:`~statefun_mesh.transport.base.Transport` implementation conforms.

    Checks, each on fresh transports from ``factory``:

    * FIFO, no loss, no duplicates: every ordered pair of ``peers`` peers at once carries
      ``frames_per_pair`` frames of 2 bytes to ``max_frame_size``, sent without waiting
      for connections to be established;
    * frames sent to a peer that has not started yet arrive, in order, once it starts;
    * ``send`` to itself or to an id outside the mesh raises :class:`ValueError`;
    * ``aclose`` is idempotent (also on a transport that never started), ``send`` after it
      raises :class:`~statefun_mesh.errors.ClosedTransportError`, frames sent just before
      it still arrive, and the other peers keep talking.

    Args:
        factory: ``factory(n)`` returns ``n`` unstarted transports of a new mesh (or an
            awaitable of them); transport ``i`` must have ``peer_id == i``.
        frames_per_pair: frames on each channel in the FIFO check.
        max_frame_size: the largest frame sent (the transport's limit must allow it).
        peers: mesh size of the FIFO check (at least 2).
        timeout: bound, in seconds, of every single wait.
        seed: varies the frame sizes.

    Raises:
        AssertionError: the transport broke a requirement; the message says which.
    """
    if peers < 2:
        raise ValueError("peers must be at least 2")
    if max_frame_size < MIN_FRAME:
        raise ValueError(f"max_frame_size must be at least {MIN_FRAME}")
    await _check_fifo_all_pairs(factory, peers, frames_per_pair, max_frame_size, timeout, seed)
    await _check_sent_before_receiver_started(factory, max_frame_size, timeout, seed)
    await _check_bad_peer_ids(factory, timeout)
    await _check_close(factory, timeout)
