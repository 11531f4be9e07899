"""Hypothesis fuzzing of the frame decoders: differential (Cython core vs twin) and the control codec.

Every input goes through ``decode_batch`` of both cores, which must agree: the same
records, or both a ``FrameDecodeError`` (the only error a bytes frame may raise). Inputs
are valid frames (canonical and non-canonical encodings) mutated by bit flips, byte
writes, truncation, insertion, deletion and length headers overwritten with huge ones;
wrong msgpack types in a record's fields; deep nesting; and raw bytes. The control
codec (``transport/codec.py``, one implementation) is fuzzed the same way against its
documented contract: a result of the declared shape, or ``FrameDecodeError``.

Budgets: the default ("ci") profile runs a few tens of thousands of inputs in well under
a minute per core; ``--run-slow`` (the "slow" profile) runs over 1,000,000. Both are
derandomized (tests/conftest.py), and the inputs run are printed in the summary.
A disagreement found here goes into tests/data/frame_vectors.json as a regression.
"""

from __future__ import annotations

import array
import gc
import random
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statefun_mesh import _speedups_py
from statefun_mesh.errors import FrameDecodeError
from statefun_mesh.transport import codec

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # the shared strategies live in tests/fuzzing.py
    sys.path.insert(0, _ROOT)

from tests.cores import c_module  # noqa: E402
from tests.fuzzing import (  # noqa: E402
    CLIENT_KINDS,
    CONTROL_ITEMS,
    MUTANTS,
    PEER_KINDS,
    U64,
    base_frames,
    control_frames,
    mutate,
    mutations,
    random_mutation,
    raw_frames,
)

#: True under --run-slow (the "slow" Hypothesis profile of tests/conftest.py)
SLOW = settings.default.max_examples >= 10_000


def budget(ci: int, slow: int) -> int:
    return slow if SLOW else ci


@pytest.fixture(scope="module")
def c_core() -> ModuleType:
    return c_module()


#: every SAMPLE_EVERY-th input of the fuzz, kept for the memory checks at the end of this module
#: (measuring the whole process would measure Hypothesis too, whose memory grows with its examples)
SAMPLE: list[bytes] = []
SAMPLE_EVERY = 7 if not SLOW else 97
_seen = 0


def sample(frame: bytes) -> None:
    global _seen
    _seen += 1
    if _seen % SAMPLE_EVERY == 0 and len(SAMPLE) < 20_000:
        SAMPLE.append(frame)


# ---------------------------------------------------------------- the differential check


def outcome(decode: Callable[[Any], Any], frame: Any) -> tuple[str, Any]:
    try:
        return "ok", decode(frame)
    except FrameDecodeError as exc:
        return "FrameDecodeError", str(exc)
    except Exception as exc:  # any other class is a crash of the decoder
        raise AssertionError(f"decode_batch raised {type(exc).__name__}: {exc} on {bytes(frame)[:200].hex()}") from exc


def assert_agree(c: ModuleType, frame: bytes) -> str:
    sample(frame)
    py_kind, py_res = outcome(_speedups_py.decode_batch, frame)
    c_kind, c_res = outcome(c.decode_batch, frame)
    assert py_kind == c_kind, (
        f"the cores disagree on {frame[:300].hex()} ({len(frame)} bytes): twin {py_kind} {py_res!r:.200}, "
        f"C core {c_kind} {c_res!r:.200}"
    )
    if py_kind == "ok":
        assert py_res == c_res, f"the cores decode {frame[:300].hex()} differently"
        for rec in py_res + c_res:  # and both give exactly the documented types
            assert type(rec) is tuple and len(rec) == 8
            assert [type(x) for x in rec] == [str] * 5 + [bytes, int, int], rec
            assert 0 <= rec[6] <= U64 and 0 <= rec[7] <= U64
    return py_kind


@settings(max_examples=budget(ci=600, slow=10_000))
@given(base=base_frames, ops=st.lists(mutations, max_size=6), seed=st.integers(0, 2**32 - 1))
def test_decoders_agree_on_mutated_frames(
    c_core: ModuleType, fuzz_count: Any, base: bytes, ops: list[Any], seed: int
) -> None:
    """Every input decoded by both cores: the base frame; each of ``ops`` applied on top of the
    previous; then MUTANTS mutants of the base, each 1-3 mutations drawn from ``seed``."""
    frame = base
    fuzz_count.add(f"batch frames {assert_agree(c_core, frame)}")
    for op in ops:
        frame = mutate(frame, op)
        fuzz_count.add(f"batch frames {assert_agree(c_core, frame)}")
    rng = random.Random(seed)
    for _ in range(MUTANTS):
        frame = base
        applied = [random_mutation(rng) for _ in range(rng.choice((1, 1, 2, 3)))]
        for op in applied:
            frame = mutate(frame, op)
        try:
            fuzz_count.add(f"batch frames {assert_agree(c_core, frame)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc} (the base frame with mutations {applied})") from None


def as_buffer(frame: bytes, wrap: str) -> tuple[Any, bytes]:
    """``frame`` as another buffer type, and the bytes that buffer stands for."""
    if wrap == "bytearray":
        return bytearray(frame), frame
    if wrap == "memoryview":
        return memoryview(b"xx" + frame + b"yy")[2:-2], frame
    if wrap == "strided":
        interleaved = bytes(b for pair in zip(frame, b"\xc1" * len(frame), strict=True) for b in pair)
        return memoryview(interleaved)[::2], frame
    padded = frame + b"\x00" * (-len(frame) % 4)  # an array of u32: its raw bytes, in machine order
    return array.array("I", padded), padded


@settings(max_examples=budget(ci=150, slow=5_000))
@given(
    frame=base_frames,
    ops=st.lists(mutations, max_size=2),
    wrap=st.sampled_from(["bytearray", "memoryview", "strided", "array"]),
)
def test_decoders_agree_on_other_buffers(
    c_core: ModuleType, fuzz_count: Any, frame: bytes, ops: list[Any], wrap: str
) -> None:
    """A frame handed over as a bytearray, a (sliced or strided) memoryview or an array of u32
    decodes as the bytes it stands for do, in both cores."""
    for op in ops:
        frame = mutate(frame, op)
    buf, raw = as_buffer(frame, wrap)
    expected = assert_agree(c_core, raw)
    for mod in (_speedups_py, c_core):
        kind, res = outcome(mod.decode_batch, buf)
        assert kind == expected, f"{mod.__name__} on a {wrap} of {raw[:200].hex()}: {kind} {res!r:.200}"
        if kind == "ok":
            assert res == _speedups_py.decode_batch(raw)
    fuzz_count.add(f"batch frames as {wrap}", 2)


def test_regression_vectors_found_by_the_fuzz(c_core: ModuleType) -> None:
    """Inputs the fuzz found the cores disagreeing on (none yet) are pinned in tests/data/frame_vectors.json,
    whose 'malformed' and 'noncanonical' lists test_speedups.py runs through both cores; here, a few
    classes of input the fuzz reaches only rarely, run directly."""
    frames = [
        b"\x01\x01" + b"\x91" * 100_000 + b"\x90",  # deep nesting where records belong
        b"\x01\x01\x91" + b"\x98" * 100_000,
        b"\x01\x01\xdd\xff\xff\xff\xff" + b"\x98" * 50,  # huge declared counts and lengths
        b"\x01\x01\x91\x98\xdb\xff\xff\xff\xff",
        b"\x01\x01\x91\x98\xa0\xa0\xa0\xa0\xa0\xc6\xff\xff\xff\xff",
        b"\x01\x01\x91\x98\xa0\xa0\xa0\xa0\xa0\xc4\x00\xd3\x00\x00\x00\x00\x00\x00\x00\x01\xd0\x7f",  # signed, >= 0
        b"\x01\x01\x91\x98\xa0\xa0\xa0\xa0\xa0\xc4\x00\xd3\x80\x00\x00\x00\x00\x00\x00\x00\x00",  # negative int64
    ]
    kinds = [assert_agree(c_core, f) for f in frames]
    assert kinds == ["FrameDecodeError"] * 5 + ["ok", "FrameDecodeError"]


def _peak_of(decode: Callable[[Any], Any], frame: bytes) -> int:
    """Peak of the memory traced while ``decode(frame)`` runs (0 when tracemalloc is off)."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        result = decode(frame)
    except FrameDecodeError:
        result = None
    peak = tracemalloc.get_traced_memory()[1] - base
    del result
    return peak


def test_decoding_allocates_in_proportion_to_the_frame(c_core: ModuleType, fuzz_count: Any) -> None:
    """Bounded memory, per input: over a sample of the inputs the fuzz above ran (thousands, of
    every kind, huge declared lengths among them), neither core allocates more than a constant
    plus a multiple of the frame's own size to decode or reject it."""
    if len(SAMPLE) < 500:
        pytest.skip("needs the inputs of the fuzz tests above (run the whole module)")
    for frame in SAMPLE:  # once untraced first: one-time costs (a lazy import, a cache) are not per frame
        for decode in (_speedups_py.decode_batch, c_core.decode_batch):
            _peak_of(decode, frame)
    tracemalloc.start()
    try:
        worst, worst_ratio = 0, 0.0
        for frame in SAMPLE:
            for decode in (_speedups_py.decode_batch, c_core.decode_batch):
                peak = _peak_of(decode, frame)
                bound = 64 * len(frame) + (256 << 10)
                if peak > bound:
                    # tracemalloc counts every thread's allocations (a thread an earlier test
                    # left winding down): a decode's own cost is the same every time, so
                    # measure again and keep the least
                    peak = min(peak, *(_peak_of(decode, frame) for _ in range(3)))
                # decoded records cost Python objects: ~20x their 10-byte minimum on the wire
                assert peak <= bound, (
                    f"{decode.__module__} allocated {peak} bytes for a {len(frame)}-byte frame {frame[:5000].hex()}"
                )
                worst = max(worst, peak)
                if len(frame) >= 1024:
                    worst_ratio = max(worst_ratio, peak / len(frame))
    finally:
        tracemalloc.stop()
    fuzz_count.note(
        f"decoding {len(SAMPLE):,} sampled inputs: peak allocation at most {worst:,} bytes, "
        f"and at most {worst_ratio:.1f} bytes per frame byte for frames of 1 KiB and more"
    )


def test_decoders_do_not_leak_on_the_fuzzed_inputs(c_core: ModuleType) -> None:
    """The sampled inputs, decoded again and again by both cores: no memory stays behind."""
    if len(SAMPLE) < 500:
        pytest.skip("needs the inputs of the fuzz tests above (run the whole module)")
    frames = SAMPLE[:3000]

    def round_() -> None:
        for frame in frames:
            for decode in (_speedups_py.decode_batch, c_core.decode_batch):
                try:
                    decode(frame)
                except FrameDecodeError:
                    pass

    for _ in range(3):  # warm up: caches, interned strings, free lists
        round_()
    gc.collect()
    before = sys.getallocatedblocks()
    for _ in range(10):
        round_()
    gc.collect()
    grown = sys.getallocatedblocks() - before
    assert grown < 200, f"{grown} memory blocks stayed allocated after decoding {len(frames)} frames 10 more times"


# ---------------------------------------------------------------- the control codec

_N = type(None)
#: per kind, the documented item types (the codec module docstring), checked independently of its table
CONTROL_TYPES: dict[int, tuple[Any, ...]] = {
    codec.CREDIT: (int,),
    codec.HEARTBEAT: (int, int),
    codec.REPLIES: (list,),
    codec.BARRIER: (int, int),
    codec.CK_ACK: (int, (dict, _N), (str, _N)),
    codec.CK_DONE: (int,),
    codec.CK_ABORT: (int,),
    codec.RECOVER: (int, int),
    codec.READY: (int,),
    codec.RESUME: (int,),
    codec.RESTORE_FAILED: (int, int, str),
    codec.REPLAYED: (int,),
    codec.C_SEND: (int, str, str, str, bytes, str),
    codec.C_REQUEST: (int, str, str, str, bytes, (int, float)),
    codec.C_FETCH: (int, str, (int, str), int, int, int),
    codec.C_INFO: (int,),
    codec.R_ACK: (int,),
    codec.R_REPLY: (int, str, str, str, bytes),
    codec.R_ERROR: (int, str, str, list),
    codec.R_RECORDS: (int, int, int, list, int),
    codec.R_INFO: (int, dict),
}


def check_control(frame: bytes, expect: frozenset[int] | None) -> str:
    try:
        kind, items = codec.decode_control(frame, expect)
    except FrameDecodeError:
        return "FrameDecodeError"
    except Exception as exc:
        raise AssertionError(f"decode_control raised {type(exc).__name__}: {exc} on {frame[:200].hex()}") from exc
    assert frame[0] == 1 and kind == frame[1] and (expect is None or kind in expect)
    assert type(items) is list and len(items) == len(CONTROL_ITEMS[kind])
    for item, tp in zip(items, CONTROL_TYPES[kind], strict=True):
        assert not isinstance(item, bool) and isinstance(item, tp), (kind, items)
    return "ok"


@settings(max_examples=budget(ci=500, slow=8_000))
@given(
    base=control_frames() | raw_frames,
    ops=st.lists(mutations, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    expect=st.sampled_from([None, PEER_KINDS, CLIENT_KINDS]),
)
def test_control_codec_contract(
    fuzz_count: Any, base: bytes, ops: list[Any], seed: int, expect: frozenset[int] | None
) -> None:
    """decode_control gives items of the declared shape or raises FrameDecodeError, nothing else;
    valid frames re-encode to frames that decode to the same items. Inputs: the base frame, each of
    ``ops`` on top of the previous, then MUTANTS // 2 mutants of the base drawn from ``seed``."""
    rng = random.Random(seed)
    frames = [base]
    for op in ops:
        frames.append(mutate(frames[-1], op))
    for _ in range(MUTANTS // 2):
        frame = base
        for _ in range(rng.choice((1, 1, 2))):
            frame = mutate(frame, random_mutation(rng))
        frames.append(frame)
    for frame in frames:
        kind = check_control(frame, expect)
        fuzz_count.add(f"control frames {kind}")
        if kind == "ok":
            k, items = codec.decode_control(frame, expect)
            again = codec.encode_control(k, *items)
            assert codec.decode_control(again, expect) == (k, items) or _has_nan(items)


def _has_nan(obj: Any) -> bool:
    if isinstance(obj, float):
        return obj != obj
    if isinstance(obj, (list, tuple)):
        return any(_has_nan(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_nan(x) for x in obj.values())
    return False


@settings(max_examples=budget(ci=100, slow=5_000))
@given(
    body=base_frames | control_frames() | raw_frames,
    gen=st.integers(0, codec.GENERATION_MASK),
    credit=st.sampled_from([0, 0, 1, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    ops=st.lists(mutations, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_envelope_contract(fuzz_count: Any, body: bytes, gen: int, credit: int, ops: list[Any], seed: int) -> None:
    """open_envelope, on the envelope of any frame and its mutants: (generation within 31 bits, a
    u32 grant or None, the rest of the bytes) or FrameDecodeError, nothing else; an intact
    envelope opens to what was put in it."""
    env = codec.envelope(gen, credit) + body
    if len(body) >= 2:
        g, c, rest = codec.open_envelope(env)
        assert (g, c, bytes(rest)) == (gen, credit or None, body)
    rng = random.Random(seed)
    frames = [env]
    for op in ops:
        frames.append(mutate(frames[-1], op))
    for _ in range(MUTANTS // 4):
        frames.append(mutate(env, random_mutation(rng)))
    for frame in frames:
        try:
            g, c, rest = codec.open_envelope(frame)
        except FrameDecodeError:
            fuzz_count.add("envelopes FrameDecodeError")
            continue
        except Exception as exc:
            raise AssertionError(f"open_envelope raised {type(exc).__name__}: {exc} on {frame[:64].hex()}") from exc
        assert 0 <= g <= codec.GENERATION_MASK and (c is None or 0 <= c < 2**32) and len(rest) >= 2
        assert bytes(rest) == frame[-len(rest) :]
        fuzz_count.add("envelopes ok")
