"""Micro-benchmark fixtures: both hot-path implementations, side by side."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.cores import speedups  # noqa: E402, F401 - the fixture, shared with tests/conftest.py

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
