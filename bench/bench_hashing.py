"""Micro-benchmarks of key hashing: key groups and partitioning, C core vs twin."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from statefun_mesh import _speedups_py

MAX_PARALLELISM = 1024
PEERS = 4


@pytest.mark.benchmark(group="key_groups-1000")
def test_key_groups(benchmark: Any, speedups: ModuleType, records: list[Any]) -> None:
    """key_groups() of 1,000 ids (11 bytes) at max_parallelism 1024; time per call of 1,000 ids."""
    ids = [rec[1] for rec in records]
    key_groups = speedups.key_groups
    result = benchmark(key_groups, ids, MAX_PARALLELISM)
    assert result == _speedups_py.key_groups(ids, MAX_PARALLELISM)


@pytest.mark.benchmark(group="partition-1000")
def test_partition(benchmark: Any, speedups: ModuleType, records: list[Any]) -> None:
    """partition() of 1,000 records over 4 peers (max_parallelism 1024); time per call of 1,000 records."""
    partition = speedups.partition
    result = benchmark(partition, records, MAX_PARALLELISM, PEERS)
    assert result == _speedups_py.partition(records, MAX_PARALLELISM, PEERS)
