"""Shared fixtures: both hot-path implementations, async tests, opt-in slow tests, fuzz budgets."""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # shared helpers import as tests.* (tests/meshes.py, tests/fuzzing.py, ...)
    sys.path.insert(0, _ROOT)

from tests.cores import speedups  # noqa: E402, F401 - the fixture, shared with bench/conftest.py

# Hypothesis profiles of the fuzz tests (tests/unit/test_fuzz_frames.py, tests/integration/test_fuzz_endpoints.py):
# "ci" is the default, "slow" is selected by --run-slow (the 1,000,000-input run). Both are derandomized and
# keep no example database, so every run of the suite draws the same inputs and a failure reproduces as is.
# A fuzz test picks its own max_examples for each (it tells them apart by max_examples).
_FUZZ_COMMON: dict[str, Any] = {
    "derandomize": True,
    "database": None,
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("ci", max_examples=100, **_FUZZ_COMMON)
settings.register_profile("slow", max_examples=10_000, **_FUZZ_COMMON)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


_INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
#: fixtures that hand a test both cores (or the C one) as modules, whatever the pass
_BOTH_CORES_FIXTURES = {"speedups", "both", "c_core"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Everything under tests/integration opens real sockets or processes: marked so, as are the
    # few such tests under tests/unit, so `-m "not integration"` runs the tests without them.
    integration = pytest.mark.integration
    for item in items:
        if _INTEGRATION_DIR in item.path.parents:
            item.add_marker(integration)
    if os.environ.get("STATEFUN_MESH_NO_EXTENSIONS"):
        # Tests of what does not depend on the hot path's implementation (network faults,
        # CURVE, blob store faults, the CLI's messages) run once, on the C core; the twin
        # is pinned to it by the vectors and by every other test, run on both.
        one = pytest.mark.skip(reason="c_core_only: tests no hot-path code; runs on the C core")
        # Tests that take both cores as modules (the speedups fixture, test_speedups.py's
        # `both`, test_fuzz_frames.py's `c_core`) run both side by side whatever the pass:
        # the C pass runs them already, so the pure pass would only repeat them.
        both = pytest.mark.skip(reason="runs both cores side by side: the C core's pass runs it")
        for item in items:
            if "c_core_only" in item.keywords:
                item.add_marker(one)
            elif _BOTH_CORES_FIXTURES & set(getattr(item, "fixturenames", ())):
                item.add_marker(both)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh event loop, bounded by a timeout (default 60 s)."""
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    marker = pyfuncitem.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker else 60.0
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def run() -> None:
        await asyncio.wait_for(func(**kwargs), timeout)

    asyncio.run(run())
    return True


#: per test item, its reports by phase ("setup", "call", "teardown"): fixtures read it to
#: add diagnostics (e.g. the peers' logs) when the test failed
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    rep = yield
    item.stash.setdefault(REPORTS, {})[rep.when] = rep
    return rep


def failed(request: pytest.FixtureRequest) -> bool:
    """In a fixture's teardown: whether the test's setup or body failed."""
    reports = request.node.stash.get(REPORTS, {})
    return any(r.failed for r in reports.values())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): time limit of an async test")
    settings.load_profile("slow" if config.getoption("--run-slow") else "ci")
    # Hypothesis's pytest plugin, reporting a failure, imports a module that warns; with
    # filterwarnings = error that turned the failure report into an INTERNALERROR
    config.addinivalue_line("filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")


class FuzzCount:
    """Inputs a fuzz test actually ran, by kind; reported in pytest's summary."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.notes: list[str] = []
        self.started = time.monotonic()

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def note(self, text: str) -> None:
        """A line for the summary besides the counts (e.g. a measured memory growth)."""
        self.notes.append(text)

    @property
    def total(self) -> int:
        """Inputs run: every kind but those named "skipped" (drawn, but not sent)."""
        return sum(n for kind, n in self.counts.items() if "skipped" not in kind)


_FUZZ_REPORT: list[str] = []


@pytest.fixture(scope="module")
def fuzz_count(request: pytest.FixtureRequest) -> Iterator[FuzzCount]:
    """A per-module tally of fuzz inputs; the total and the time are printed at the end of the run."""
    count = FuzzCount()
    yield count
    detail = ", ".join(f"{k} {v:,}" for k, v in sorted(count.counts.items()))
    _FUZZ_REPORT.append(
        f"{request.module.__name__}: {count.total:,} inputs in {time.monotonic() - count.started:.1f} s ({detail})"
    )
    _FUZZ_REPORT.extend(f"  {line}" for line in count.notes)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FUZZ_REPORT:
        terminalreporter.section("fuzz inputs run")
        for line in _FUZZ_REPORT:
            terminalreporter.write_line(line)
