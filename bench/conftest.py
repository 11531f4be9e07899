"""Micro-benchmark fixtures: both hot-path implementations, side by side."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest


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


N_MESSAGES = 1000


@pytest.fixture(scope="session")
def records() -> list[tuple[str, str, str, str, str, bytes, int, int]]:
    """1,000 typical messages: 11-byte ids, a caller on 2 of 3, a 64-byte value."""
    return [
        (
            "shop/cart",
            f"user-{i:06d}",
            "shop/checkout" if i % 3 else "",
            f"order-{i}" if i % 3 else "",
            "shop/AddItem",
            bytes((i + j) % 256 for j in range(64)),
            i % 4,
            i if i % 5 == 0 else 0,
        )
        for i in range(N_MESSAGES)
    ]
