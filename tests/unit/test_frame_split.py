"""BatchEncoder.fill splits batches by bytes and by count, identically in both cores (issue 7 item 1)."""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest

from statefun_mesh._speedups_py import decode_batch
from tests.cores import c_module

FRAME_VECTORS = json.loads((Path(__file__).resolve().parents[1] / "data" / "frame_vectors.json").read_text("utf-8"))


def rec(value_len: int, id: str = "id", rid: int = 0) -> tuple:
    return ("t/fn", id, "", "", "t/v", bytes(value_len), 0, rid)


def split(speedups: ModuleType, records: list, max_bytes: int, max_records: int = 0) -> list[bytes]:
    enc = speedups.BatchEncoder()
    frames, i = [], 0
    while i < len(records):
        j = enc.fill(records, i, max_bytes, max_records)
        if j == i and not len(enc):
            raise AssertionError(f"record {i} fits no frame")
        size = enc.frame_size
        frames.append(enc.flush())
        assert len(frames[-1]) == size
        i = j
    return frames


def test_record_size_is_the_encoded_size(speedups: ModuleType) -> None:
    for n in (0, 1, 255, 256, 65535, 65536):
        r = rec(n, "x" * (n % 40), 2**40)
        assert speedups.record_size(r) == len(msgpack.packb(r, use_bin_type=True))
    with pytest.raises(TypeError):
        speedups.record_size(("t/fn",))


@pytest.mark.parametrize("per_frame", [1, 2, 3, 15, 16, 17])
def test_a_frame_of_exactly_max_bytes_is_kept_one_byte_less_splits(speedups: ModuleType, per_frame: int) -> None:
    size = speedups.record_size(rec(1000))
    head = 2 + (1 if per_frame < 16 else 3)
    exact = head + per_frame * size
    records = [rec(1000) for _ in range(per_frame * 3)]
    frames = split(speedups, records, exact)
    assert [len(f) for f in frames] == [exact] * 3
    if per_frame == 1:
        return  # one byte less fits no record: test_a_record_that_fits_no_frame_is_not_appended
    smaller = split(speedups, records, exact - 1)
    assert all(len(f) <= exact - 1 for f in smaller)
    assert len(smaller) > 3
    assert sum(len(decode_batch(f)) for f in smaller) == len(records)


def test_a_record_that_fits_no_frame_is_not_appended(speedups: ModuleType) -> None:
    r = rec(1000)
    size = speedups.record_size(r)
    enc = speedups.BatchEncoder()
    assert enc.fill([r], 0, 3 + size - 1) == 0
    assert (len(enc), enc.nbytes, enc.frame_size) == (0, 0, 3)
    assert enc.fill([r], 0, 3 + size) == 1
    # a full encoder stops at once, a count limit too
    assert enc.fill([r, r], 0, 3 + size) == 0
    assert enc.fill([r, r], 0, 0, 1) == 0
    assert enc.fill([r, r], 0, 0, 3) == 2
    assert len(enc) == 3


def test_fill_checks_its_arguments_and_records(speedups: ModuleType) -> None:
    enc = speedups.BatchEncoder()
    with pytest.raises(ValueError):
        enc.fill([rec(1)], 2)
    with pytest.raises(ValueError):
        enc.fill([rec(1)], 0, -1)
    with pytest.raises(TypeError):
        enc.fill([rec(1), ("bad",), rec(1)])
    assert len(enc) == 1  # the records before the bad one were appended, nothing of it


def test_both_cores_split_alike_at_every_boundary() -> None:
    c = c_module()
    py = importlib.import_module("statefun_mesh._speedups_py")
    rng = random.Random(7)
    lens = [0, 1, 30, 31, 32, 255, 256, 65535, 65536, 100_000]
    records = [
        rec(rng.choice(lens) + rng.randrange(3), f"id{rng.randrange(99)}", rng.choice([0, 5, 2**33]))
        for _ in range(400)
    ]
    biggest = max(py.record_size(r) for r in records)
    for max_bytes in (biggest + 3, biggest + 4, 2 * biggest + 3, 200_000, 1 << 20, 5 << 20, 0):
        for max_records in (0, 1, 15, 16, 17, 1000):
            frames_py = split(py, records, max_bytes, max_records)
            assert frames_py == split(c, records, max_bytes, max_records), (max_bytes, max_records)
            assert [r for f in frames_py for r in decode_batch(f)] == records
            if max_bytes:
                assert max(len(f) for f in frames_py) <= max_bytes
            if max_records:
                assert max(len(decode_batch(f)) for f in frames_py) <= max_records


def test_message_limit_settings() -> None:
    from statefun_mesh import ConfigError, MeshConfig
    from statefun_mesh.config import FRAME_HEADROOM

    assert MeshConfig().message_limit == (64 << 20) - FRAME_HEADROOM
    assert MeshConfig(max_frame_bytes=1 << 20).message_limit == (1 << 20) - FRAME_HEADROOM
    assert MeshConfig(max_message_bytes=1000).message_limit == 1000
    for bad in (0, -1, True, 1.5, (64 << 20) - FRAME_HEADROOM + 1):
        with pytest.raises(ConfigError, match="max_message_bytes"):
            MeshConfig(max_message_bytes=bad)
    with pytest.raises(ConfigError, match="max_frame_bytes"):
        MeshConfig(max_frame_bytes=4095)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="max_request_timeout"):
            MeshConfig(max_request_timeout=bad)
    for name in ("max_pending_requests", "max_pending_requests_per_client"):
        with pytest.raises(ConfigError, match=name):
            MeshConfig(**{name: 0})


def _field(v: Any, hexed: bool) -> Any:
    if isinstance(v, dict):
        unit = bytes.fromhex(v["repeat"]) if hexed else v["repeat"]
        return unit * v["count"]
    return bytes.fromhex(v) if hexed else v


@pytest.mark.parametrize(
    "vector",
    FRAME_VECTORS["splits"],
    ids=[f"{v['frame']}-{v['max_bytes']}-{v['max_records']}" for v in FRAME_VECTORS["splits"]],
)
def test_split_vectors(speedups: ModuleType, vector: dict[str, Any]) -> None:
    """The golden splits (tests/data/make_vectors.py, checked there against a msgpack-only reference)."""
    (frame,) = [f for f in FRAME_VECTORS["frames"] if f["name"] == vector["frame"]]
    records = [(*(_field(r[i], False) for i in range(5)), _field(r[5], True), r[6], r[7]) for r in frame["records"]]
    enc = speedups.BatchEncoder()
    counts, i = [], 0
    while i < len(records):
        j = enc.fill(records, i, vector["max_bytes"], vector["max_records"])
        if j == i and not len(enc):
            counts.append(0)
            j += 1
        else:
            size = enc.frame_size
            out = enc.flush()
            assert len(out) == size <= vector["max_bytes"]
            counts.append(len(decode_batch(out)))
        i = j
    assert ",".join(map(str, counts)) == vector["counts"]
