"""Conformance suite for :class:`~statefun_mesh.blobstore.base.BlobStore` implementations.

Every blob store must pass :func:`check_blob_store`::

    async def test_my_store(tmp_path) -> None:
        async with MyBlobStore(...) as store:
            await check_blob_store(store)

The suite works under a fresh random prefix (``conformance-<hex>/``), so it can run
against a shared bucket, and deletes what it wrote when it passes. It does not close
the store. A failed check raises :class:`AssertionError` saying what was wrong.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from typing import Final

from ..blobstore.base import BlobStore
from ..errors import BlobNotFoundError, BlobStoreError

__all__ = ["BAD_NAMES", "BIG_OBJECT_SIZE", "FILE_OBJECT_SIZE", "check_blob_store"]

#: The large round trip: big enough to cross any single-read or single-packet shortcut.
BIG_OBJECT_SIZE: Final = 5 * 1024 * 1024
#: The file round trip: over S3BlobStore's part size, so it is a multipart upload there.
FILE_OBJECT_SIZE: Final = 9 * 1024 * 1024 + 1
#: Names every store must reject with ``ValueError`` before doing any I/O.
BAD_NAMES: Final = (
    "",
    "/abs",
    "/",
    "a//b",
    "a/",
    "../escape",
    "a/../b",
    "a/..",
    "./a",
    "a/./b",
    "nul\x00byte",
    "x" * 1025,
)
_BAD_PREFIXES: Final = ("/abs", "a//b", "../x", "a/../", "nul\x00")
_CONCURRENT: Final = 32


def _pattern(size: int, seed: int) -> bytes:
    block = bytes((i * 31 + seed) & 0xFF for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


async def _check_bad_names(store: BlobStore) -> None:
    for bad in BAD_NAMES:
        for op, call in (
            ("put", lambda n: store.put(n, b"x")),
            ("get", store.get),
            ("exists", store.exists),
            ("delete", store.delete),
        ):
            try:
                await call(bad)
            except ValueError:
                continue
            except Exception as exc:
                raise AssertionError(f"{op}({bad!r}) raised {type(exc).__name__}: {exc}, expected ValueError") from exc
            raise AssertionError(f"{op}({bad!r}) was accepted, expected ValueError")
    for bad in _BAD_PREFIXES:
        try:
            await store.list(bad)
        except ValueError:
            continue
        raise AssertionError(f"list({bad!r}) was accepted, expected ValueError")
    for wrong in (b"bytes-name", None, 7):
        try:
            await store.get(wrong)  # type: ignore[arg-type]
        except TypeError:
            continue
        except ValueError:
            continue  # also acceptable: it is rejected before any I/O
        raise AssertionError(f"get({wrong!r}) was accepted, expected TypeError")


async def _check_files(store: BlobStore, base: str) -> None:
    """put_file/get_file: small, empty and multi-part (over 8 MiB) objects, interchangeable with put/get."""
    with tempfile.TemporaryDirectory(prefix="blobstore-check-") as tmp:
        src, dest = os.path.join(tmp, "src"), os.path.join(tmp, "dest")
        for size in (0, 10, FILE_OBJECT_SIZE):
            data = _pattern(size, size & 0xFF)
            with open(src, "wb") as fh:
                fh.write(data)
            name = f"{base}files/{size}.bin"
            await store.put_file(name, src)
            got = await store.get(name)
            assert got == data, f"put_file of {size} bytes came back as {len(got)} different bytes"
            with open(dest, "wb") as fh:
                fh.write(b"old content, longer than some objects")
            await store.get_file(name, dest)
            with open(dest, "rb") as fh:
                assert fh.read() == data, f"get_file of a {size}-byte object wrote different bytes"
        await store.put(base + "files/put.bin", b"from put")
        await store.get_file(base + "files/put.bin", dest)
        with open(dest, "rb") as fh:
            assert fh.read() == b"from put", "get_file of an object stored by put wrote different bytes"
        try:
            await store.get_file(base + "files/missing", dest)
        except BlobNotFoundError:
            pass
        else:
            raise AssertionError("get_file of a missing object did not raise BlobNotFoundError")
        try:
            await store.put_file(base + "files/nofile", os.path.join(tmp, "no-such-file"))
        except BlobStoreError:
            pass
        else:
            raise AssertionError("put_file of a missing local file did not raise BlobStoreError")
        assert not await store.exists(base + "files/nofile"), "a failed put_file left an object"


async def check_blob_store(store: BlobStore) -> None:
    """Run every check on ``store``; raise ``AssertionError`` on the first failure.

    Checks: round trips of small, empty and 5 MiB objects (content and ``bytes``
    type), ``bytearray``/``memoryview`` input copied, overwrite, ``exists`` for
    objects vs prefixes, sorted ``list`` with directory and partial prefixes,
    idempotent ``delete``, :class:`BlobNotFoundError` on a missing ``get``,
    ``put_file``/``get_file`` round trips (also of a multi-part object),
    ``ValueError`` on bad names and prefixes, and concurrent puts of different names.

    Args:
        store: an open store; it is left open.
    """
    base = f"conformance-{secrets.token_hex(6)}/"
    assert await store.list(base) == [], f"fresh prefix {base!r} is not empty: {await store.list(base)}"

    # Round trips.
    small = base + "checkpoints/000012/manifest.json"
    await store.put(small, b'{"checkpoint": 12}')
    got = await store.get(small)
    assert type(got) is bytes, f"get returned {type(got).__name__}, expected bytes"
    assert got == b'{"checkpoint": 12}', f"small round trip returned {got[:64]!r}"

    empty = base + "empty.bin"
    await store.put(empty, b"")
    assert await store.get(empty) == b"", "empty object did not round-trip"
    assert await store.exists(empty), "exists() is False for an empty object"

    big_data = _pattern(BIG_OBJECT_SIZE, 7)
    big = base + "big/object.bin"
    await store.put(big, big_data)
    got = await store.get(big)
    assert len(got) == BIG_OBJECT_SIZE, f"5 MiB object came back with {len(got)} bytes"
    assert got == big_data, "5 MiB object came back with different content"

    # Overwrite replaces the whole object, also with a shorter one.
    await store.put(big, b"short")
    assert await store.get(big) == b"short", "overwrite with a shorter object did not replace it"
    await store.put(small, b"v2")
    assert await store.get(small) == b"v2", "overwrite did not replace the object"

    # The store keeps its own copy of mutable input.
    buf = bytearray(b"mutable")
    await store.put(base + "copied", buf)
    buf[:] = b"CHANGED"
    assert await store.get(base + "copied") == b"mutable", "put kept a reference to a bytearray"
    await store.put(base + "view", memoryview(b"from a view"))
    assert await store.get(base + "view") == b"from a view", "memoryview did not round-trip"

    # Unusual but valid names.
    odd = base + "ün icode/with space/.dotfile-ok~"
    await store.put(odd, b"odd")
    assert await store.get(odd) == b"odd", f"{odd!r} did not round-trip"

    # exists: objects only, not prefixes; missing names.
    assert await store.exists(small), "exists() is False for a stored object"
    assert not await store.exists(base + "checkpoints/000012"), "exists() is True for a directory-like prefix"
    assert not await store.exists(base + "missing"), "exists() is True for a missing object"

    # get of missing names.
    for missing in (base + "missing", base + "checkpoints/000012", base + "nodir/at/all"):
        try:
            await store.get(missing)
        except BlobNotFoundError:
            pass
        else:
            raise AssertionError(f"get({missing!r}) did not raise BlobNotFoundError")
    try:
        await store.get(base + "missing")
    except LookupError:
        pass
    else:  # pragma: no cover - covered above
        raise AssertionError("BlobNotFoundError is not a LookupError")

    # list: sorted, objects only, string prefixes.
    layout = [
        "cp/000001/manifest.json",
        "cp/000001/peer-0.delta",
        "cp/000002/manifest.json",
        "cp/00000a",
        "cp-other/x",
        "cp.json",
        "cq/1",
    ]
    for i, rel in enumerate(reversed(layout)):
        await store.put(base + rel, str(i).encode())
    everything = sorted([small, empty, big, base + "copied", base + "view", odd] + [base + r for r in layout])
    listed = await store.list(base)
    assert listed == everything, f"list({base!r}) returned {listed}, expected {everything}"
    all_names = await store.list()
    assert all_names == sorted(all_names), "list() is not sorted"
    assert set(everything) <= set(all_names), "list() misses objects that list(prefix) returns"
    expectations = {
        "cp/": ["cp/000001/manifest.json", "cp/000001/peer-0.delta", "cp/000002/manifest.json", "cp/00000a"],
        "cp/000001/": ["cp/000001/manifest.json", "cp/000001/peer-0.delta"],
        "cp/00000": ["cp/000001/manifest.json", "cp/000001/peer-0.delta", "cp/000002/manifest.json", "cp/00000a"],
        "cp": [
            "cp-other/x",
            "cp.json",
            "cp/000001/manifest.json",
            "cp/000001/peer-0.delta",
            "cp/000002/manifest.json",
            "cp/00000a",
        ],
        "cp/000001/manifest.json": ["cp/000001/manifest.json"],
        "cp/0000019": [],
        "nothing/here/": [],
    }
    for rel, expected in expectations.items():
        want = [base + e for e in expected]
        got_names = await store.list(base + rel)
        assert got_names == want, f"list({base + rel!r}) returned {got_names}, expected {want}"

    # delete: removes, is idempotent, leaves no directory-like entries behind.
    await store.delete(base + "cp/000001/manifest.json")
    await store.delete(base + "cp/000001/manifest.json")
    await store.delete(base + "never/existed")
    assert not await store.exists(base + "cp/000001/manifest.json"), "exists() is True after delete"
    assert await store.list(base + "cp/000001/") == [base + "cp/000001/peer-0.delta"], "delete removed too much"
    await store.delete(base + "cp/000001/peer-0.delta")
    assert await store.list(base + "cp/000001") == [], "list still shows a deleted object or a directory"
    try:
        await store.get(base + "cp/000001/peer-0.delta")
    except BlobNotFoundError:
        pass
    else:
        raise AssertionError("get() of a deleted object did not raise BlobNotFoundError")
    await store.put(base + "cp/000001/manifest.json", b"again")
    assert await store.get(base + "cp/000001/manifest.json") == b"again", "re-put after delete failed"

    # Concurrent puts of different names, then concurrent gets.
    names = [f"{base}concurrent/{i:03d}/blob" for i in range(_CONCURRENT)]
    payloads = [_pattern(1000 + 997 * i, i) for i in range(_CONCURRENT)]
    await asyncio.gather(*(store.put(n, p) for n, p in zip(names, payloads, strict=True)))
    results = await asyncio.gather(*(store.get(n) for n in names))
    for name, want_data, got_data in zip(names, payloads, results, strict=True):
        assert got_data == want_data, f"concurrent put of {name!r} came back different ({len(got_data)} bytes)"
    assert await store.list(base + "concurrent/") == names, "list after concurrent puts is wrong"

    await _check_files(store, base)
    await _check_bad_names(store)

    # Clean up (also exercises concurrent deletes).
    await asyncio.gather(*(store.delete(n) for n in await store.list(base)))
    leftover = await store.list(base)
    assert leftover == [], f"objects left after deleting everything: {leftover}"
