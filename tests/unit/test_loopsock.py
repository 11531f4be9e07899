"""LoopSocket: a plain ZeroMQ socket read from the event loop's reader callback (real sockets
over inproc). Every message is delivered, in order, also when a send consumed the FD's
signal; an idle socket costs no callbacks."""

from __future__ import annotations

import asyncio
import itertools
import time

import zmq
import zmq.asyncio

from statefun_mesh.transport.loopsock import DRAIN_BUDGET, LoopSocket

_names = itertools.count()


def pair() -> tuple[zmq.Socket, zmq.Socket]:
    ctx = zmq.asyncio.Context.instance()
    ep = f"inproc://loopsock-test-{next(_names)}"
    router: zmq.Socket = zmq.Socket(ctx, zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(ep)
    dealer: zmq.Socket = zmq.Socket(ctx, zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"d")
    dealer.connect(ep)
    return router, dealer


async def eventually(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def test_every_message_arrives_in_order_also_beyond_one_drain() -> None:
    router, dealer = pair()
    got: list[bytes] = []
    ls = LoopSocket(dealer, lambda parts: got.append(parts[0]), name="test dealer")
    try:
        dealer.send(b"hello")  # the ROUTER learns the dealer's routing id
        ls.sent()
        assert router.recv_multipart() == [b"d", b"hello"]
        n = 3 * DRAIN_BUDGET + 7  # more than one reader callback takes
        for i in range(n):
            router.send_multipart([b"d", str(i).encode()])
        assert await eventually(lambda: len(got) == n), f"{len(got)} of {n} arrived"
        assert got == [str(i).encode() for i in range(n)]
    finally:
        ls.close()
        router.close(0)


async def test_a_message_whose_signal_a_send_consumed_is_still_read() -> None:
    # libzmq processes a socket's pending commands inside a send (at most once a
    # millisecond); if a message's "readable" command is among them, the FD never
    # signals it. LoopSocket.sent() checks EVENTS after a send made outside its reader.
    router, dealer = pair()
    got: list[bytes] = []
    ls = LoopSocket(dealer, lambda parts: got.append(parts[0]), name="test dealer")
    try:
        dealer.send(b"hello")
        ls.sent()
        assert router.recv_multipart() == [b"d", b"hello"]
        await asyncio.sleep(0.05)
        missed = 0
        for i in range(20):
            router.send_multipart([b"d", b"m%d" % i])
            time.sleep(0.003)  # past libzmq's command-processing throttle, before the loop reads
            dealer.send(b"ping")  # processes the commands: the FD's signal is gone
            ls.sent()
            if not await eventually(lambda i=i: len(got) == i + 1, timeout=1.0):
                missed += 1
                break
            assert router.recv_multipart() == [b"d", b"ping"]
        assert missed == 0, f"a message stayed unread after a send ({len(got)} read)"
    finally:
        ls.close()
        router.close(0)


async def test_an_idle_socket_costs_no_callbacks() -> None:
    router, dealer = pair()
    calls = 0
    ls = LoopSocket(dealer, lambda parts: None, name="test dealer")
    ready = ls._ready

    def counting() -> None:
        nonlocal calls
        calls += 1
        ready()

    loop = asyncio.get_running_loop()
    loop.remove_reader(ls._fd)
    loop.add_reader(ls._fd, counting)
    try:
        for i in range(10):
            router.send_multipart([b"d", b"x"]) if i else (dealer.send(b"hello"), ls.sent())
        await asyncio.sleep(0.1)
        calls = 0
        await asyncio.sleep(0.5)
        assert calls == 0, f"{calls} reader callbacks in 0.5 s on an idle socket"
    finally:
        ls.close()
        router.close(0)
