"""Micro-benchmarks of batch frames: encode and decode 1,000 messages, C core vs twin."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from statefun_mesh import _speedups_py


@pytest.fixture(scope="module")
def frame(records: list[Any]) -> bytes:
    """The 1,000-message batch frame (~121 KB), encoded by the twin."""
    return _speedups_py.encode_batch(records)


@pytest.mark.benchmark(group="encoder-append-1000")
def test_encoder_append_flush(benchmark: Any, speedups: ModuleType, records: list[Any], frame: bytes) -> None:
    """BatchEncoder: append() x 1,000 then flush(); time per 1,000-message frame."""
    encoder_class = speedups.BatchEncoder

    def encode() -> bytes:
        enc = encoder_class()
        append = enc.append
        for rec in records:
            append(rec)
        return enc.flush()

    assert benchmark(encode) == frame


@pytest.mark.benchmark(group="encode_batch-1000")
def test_encode_batch(benchmark: Any, speedups: ModuleType, records: list[Any], frame: bytes) -> None:
    """encode_batch() of 1,000 messages; time per 1,000-message frame."""
    encode_batch = speedups.encode_batch
    assert benchmark(encode_batch, records) == frame


@pytest.mark.benchmark(group="decode_batch-1000")
def test_decode_batch(benchmark: Any, speedups: ModuleType, records: list[Any], frame: bytes) -> None:
    """decode_batch() of a 1,000-message frame (~121 KB); time per frame."""
    decode_batch = speedups.decode_batch
    assert benchmark(decode_batch, frame) == records
