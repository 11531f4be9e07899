"""Macro-benchmark: keyed-counter throughput of an in-process LocalMesh, C core vs twin.

One ``LocalMesh`` (memory transport, 1 or 3 peers, one event loop) runs ``perf/counter``
from ``bench/perf_app.py``: one ``IntType`` state over 10,000 keys. Each round injects
20,000 increments (two per key) straight into peer 0's router, the way a client's
messages enter after admission, so no client and no per-message ``await`` is on the
timed path; with 3 peers, two thirds of them cross the memory transport as batch frames.
A round ends when every peer is idle. The keys all exist before the first timed round.

The core is switched by patching ``statefun_mesh._speedups`` with the ``speedups``
fixture's module before the mesh is built (everything in the package reads the core
through that module), so both run here side by side. ``bench/mesh_perf.py`` measures
real peer processes over ZeroMQ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from bench import perf_app as app
from statefun_mesh import LocalMesh, _speedups, message_builder

N_KEYS = 10_000
N_MESSAGES = 20_000
ROUNDS = 5

_ONE = app.IntType.serializer().serialize(1)
RECORDS = [
    (app.COUNTER, app.counter_id(i % N_KEYS), "", "", app.IntType.typename, _ONE, 0, 0) for i in range(N_MESSAGES)
]


@pytest.fixture
def core(speedups: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Make ``speedups`` (the twin or the Cython core) the one the mesh uses."""
    for name in _speedups.__all__:
        if name != "IMPLEMENTATION":
            monkeypatch.setattr(_speedups, name, getattr(speedups, name))
    impl = "python" if speedups.__name__.endswith("_py") else "c"
    monkeypatch.setattr(_speedups, "IMPLEMENTATION", impl)
    return speedups


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.mark.parametrize("peers", [1, 3])
def test_counter_throughput(benchmark: Any, core: ModuleType, loop: asyncio.AbstractEventLoop, peers: int) -> None:
    """LocalMesh, memory transport: 20,000 counter increments over 10,000 keys; time per round."""
    mesh = LocalMesh(app.functions, peers=peers)
    loop.run_until_complete(mesh.start())
    try:
        entry = mesh.peers[0]
        route = entry.router.route  # inject after admission: no client on the timed path
        idle = mesh.idle

        async def one_round() -> None:
            route(RECORDS, from_client=True)
            await idle(timeout=120)

        rounds_run = []

        def run() -> None:
            loop.run_until_complete(one_round())
            rounds_run.append(1)

        run()  # creates every key: the timed rounds update existing state
        benchmark.group = f"mesh-counter-{peers}-peer{'s' if peers > 1 else ''}"
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)

        status = mesh.status()
        assert {s["core"] for s in status} == {"python" if core.__name__.endswith("_py") else "c"}
        invocations = sum(s["invocations"] for s in status)
        assert invocations == N_MESSAGES * len(rounds_run)
        assert sum(s["failures"] for s in status) == 0
        reply = loop.run_until_complete(
            mesh.request(message_builder(app.COUNTER, app.counter_id(7), int_value=0), timeout=10)
        )
        assert reply.as_int() == len(rounds_run) * N_MESSAGES // N_KEYS
        if benchmark.stats is not None:  # None under --benchmark-disable
            stats = benchmark.stats.stats
            benchmark.extra_info.update(
                messages_per_round=N_MESSAGES,
                invocations_per_s_min_round=N_MESSAGES / stats.min,
                invocations_per_s_median_round=N_MESSAGES / stats.median,
                batches=sum(s["batches"] for s in status),
            )
    finally:
        loop.run_until_complete(mesh.aclose())
