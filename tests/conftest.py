"""Shared fixtures: both hot-path implementations, async tests, opt-in slow tests."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): time limit of an async test")


@pytest.fixture(params=["python", "c"])
def speedups(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The pure-Python twin and the Cython core, as modules (the C one skipped if not built)."""
    if request.param == "python":
        yield importlib.import_module("statefun_mesh._speedups_py")
    else:
        try:
            mod = importlib.import_module("statefun_mesh._speedups_c")
        except ImportError:
            if os.environ.get("STATEFUN_MESH_REQUIRE_EXTENSIONS"):
                raise
            pytest.skip("the Cython core statefun_mesh._speedups_c is not built")
        yield mod
