"""The two cores as modules, for the tests and the micro-benchmarks: the ``speedups`` fixture (both;
tests/conftest.py and bench/conftest.py) and :func:`c_module` (the Cython one)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest

__all__ = ["c_module", "speedups"]


def c_module() -> ModuleType:
    """The Cython core; a test skips without it, unless $STATEFUN_MESH_REQUIRE_EXTENSIONS says it must be built."""
    try:
        return importlib.import_module("statefun_mesh._speedups_c")
    except ImportError:
        if os.environ.get("STATEFUN_MESH_REQUIRE_EXTENSIONS"):
            raise
        pytest.skip("the Cython core statefun_mesh._speedups_c is not built")


@pytest.fixture(params=["python", "c"])
def speedups(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The pure-Python twin and the Cython core, as modules (the C one skipped if not built)."""
    yield importlib.import_module("statefun_mesh._speedups_py") if request.param == "python" else c_module()
