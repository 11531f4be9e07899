"""The ``speedups`` fixture the tests and the micro-benchmarks share (tests/conftest.py, bench/conftest.py)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest

__all__ = ["speedups"]


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
