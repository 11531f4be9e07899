"""Blob stores: the conformance suite on memory and file stores, file-store specifics, URLs."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from statefun_mesh.blobstore import (
    BlobStore,
    FileSystemBlobStore,
    MemoryBlobStore,
    S3BlobStore,
    open_blob_store,
)
from statefun_mesh.errors import BlobNotFoundError, BlobStoreError, ConfigError
from statefun_mesh.testing.blobstores import check_blob_store

REPO = Path(__file__).resolve().parents[2]


def _factories(tmp_path: Path) -> dict[str, Callable[[], BlobStore]]:
    return {
        "memory": lambda: MemoryBlobStore(f"test-{os.urandom(4).hex()}"),
        "fs": lambda: FileSystemBlobStore(tmp_path / "blobs"),
    }


@pytest.fixture(params=["memory", "fs"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], BlobStore]:
    return _factories(tmp_path)[request.param]


# -- conformance -------------------------------------------------------------------------


async def test_conformance(make_store: Callable[[], BlobStore]) -> None:
    async with make_store() as store:
        await check_blob_store(store)


async def test_conformance_twice_on_one_store(make_store: Callable[[], BlobStore]) -> None:
    # The suite leaves nothing behind, so it can run again (and against a shared bucket).
    async with make_store() as store:
        await check_blob_store(store)
        await check_blob_store(store)
        assert await store.list() == []


async def test_closed_store_raises(make_store: Callable[[], BlobStore]) -> None:
    store = make_store()
    await store.put("a", b"1")
    await store.aclose()
    await store.aclose()  # idempotent
    for call in (store.get("a"), store.exists("a"), store.list(), store.delete("a"), store.put("b", b"")):
        with pytest.raises(BlobStoreError, match="closed"):
            await call
    assert "closed" in repr(store)


async def test_non_bytes_data_is_type_error(make_store: Callable[[], BlobStore]) -> None:
    async with make_store() as store:
        with pytest.raises(TypeError, match="bytes"):
            await store.put("a", "text")  # type: ignore[arg-type]
        assert not await store.exists("a")


# -- memory ------------------------------------------------------------------------------


async def test_memory_namespaces_are_shared_by_name() -> None:
    name = f"shared-{os.urandom(4).hex()}"
    a, b = open_blob_store(f"memory://{name}"), open_blob_store(f"memory://{name}")
    try:
        await a.put("x/y", b"1")
        assert await b.get("x/y") == b"1"
        assert await MemoryBlobStore().list() == []  # a private namespace
        other = MemoryBlobStore(name + "-other")
        assert await other.list() == []
        MemoryBlobStore.discard(name)
        assert await MemoryBlobStore(name).list() == []
    finally:
        MemoryBlobStore.discard(name)
        MemoryBlobStore.discard(name + "-other")


# -- file system -------------------------------------------------------------------------


async def test_fs_layout_and_no_temp_files_left(tmp_path: Path) -> None:
    store = FileSystemBlobStore(tmp_path / "root")
    await store.put("checkpoints/000012/manifest.json", b"{}")
    assert (tmp_path / "root/checkpoints/000012/manifest.json").read_bytes() == b"{}"
    await store.put("checkpoints/000012/manifest.json", b"{1}")
    assert sorted(p.name for p in (tmp_path / "root/checkpoints/000012").iterdir()) == ["manifest.json"]
    assert store.url == "file://" + str(tmp_path / "root")
    assert store.root == str(tmp_path / "root")


async def test_fs_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = FileSystemBlobStore(tmp_path)
    await store.put("cp/1/a/b", b"x")
    await store.put("cp/2", b"y")
    await store.delete("cp/1/a/b")
    assert not (tmp_path / "cp/1").exists()
    assert (tmp_path / "cp/2").is_file()
    await store.delete("cp/2")
    assert list(tmp_path.iterdir()) == []  # the root itself stays
    await store.delete("cp")  # a missing name whose parent is gone


async def test_fs_missing_root_lists_empty_and_put_creates_it(tmp_path: Path) -> None:
    store = FileSystemBlobStore(tmp_path / "not" / "yet")
    assert await store.list() == []
    assert not await store.exists("a")
    with pytest.raises(BlobNotFoundError):
        await store.get("a")
    await store.put("a", b"1")
    assert (tmp_path / "not/yet/a").read_bytes() == b"1"


async def test_fs_root_replaced_by_a_file_is_an_error_not_an_empty_store(tmp_path: Path) -> None:
    # Listing it as empty would make a recovery restore empty state: it must fail, and say why.
    (tmp_path / "root").write_bytes(b"not a directory")
    store = FileSystemBlobStore(tmp_path / "root")
    with pytest.raises(BlobStoreError, match=r"root .*root is not a directory"):
        await store.list("checkpoints/")
    with pytest.raises(BlobStoreError, match=r"root .*root is not a directory"):
        await store.put("objects/peer-0000/000000000001-base.bin", b"x")
    assert await FileSystemBlobStore(tmp_path / "root" / "below").list() == []  # a path below a file: no objects


async def test_fs_directory_is_not_an_object(tmp_path: Path) -> None:
    store = FileSystemBlobStore(tmp_path)
    await store.put("a/b", b"1")
    assert not await store.exists("a")
    with pytest.raises(BlobNotFoundError):
        await store.get("a")
    await store.delete("a")  # a directory-like prefix: nothing to delete
    assert await store.get("a/b") == b"1"
    with pytest.raises(BlobStoreError, match=r"'a'.*both an object and the prefix"):
        await store.put("a", b"2")
    await store.put("f", b"1")
    with pytest.raises(BlobStoreError, match=r"'f/g'.*both an object and the prefix") as info:
        await store.put("f/g", b"2")
    assert isinstance(info.value.__cause__, OSError)


async def test_fs_ignores_and_reserves_partial_names(tmp_path: Path) -> None:
    store = FileSystemBlobStore(tmp_path)
    await store.put("d/real", b"1")
    leftover = tmp_path / "d" / ".real.0123456789abcdef.partial"
    leftover.write_bytes(b"half")
    assert await store.list() == ["d/real"]
    with pytest.raises(ValueError, match="reserves"):
        await store.put("d/.real.0123456789abcdef.partial", b"x")


async def test_fs_failed_rename_leaves_old_object_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileSystemBlobStore(tmp_path)
    await store.put("obj", b"old")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error", str(dst))

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(BlobStoreError, match="cannot write 'obj'") as info:
        await store.put("obj", b"new")
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert await store.get("obj") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj"]


_CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from statefun_mesh.blobstore import FileSystemBlobStore

    def crash(src, dst):  # the process dies after the temp file is written and fsynced
        os._exit(17)

    async def main():
        store = FileSystemBlobStore(sys.argv[1])
        await store.put("cp/overwritten", b"old")
        os.replace = crash
        await store.put(sys.argv[2], b"N" * 1_000_000)

    asyncio.run(main())
    """
)


@pytest.mark.integration  # a process
@pytest.mark.parametrize("name", ["cp/new", "cp/overwritten"])
async def test_fs_crash_between_temp_write_and_rename(tmp_path: Path, name: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASH_CHILD, str(tmp_path), name, cwd=str(REPO), stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 17, err.decode()
    partials = [p for p in (tmp_path / "cp").iterdir() if p.name.endswith(".partial")]
    assert len(partials) == 1 and partials[0].stat().st_size == 1_000_000  # the crash hit after the write

    store = FileSystemBlobStore(tmp_path)
    assert await store.list() == ["cp/overwritten"]
    assert await store.get("cp/overwritten") == b"old"
    if name == "cp/new":
        assert not await store.exists(name)
        with pytest.raises(BlobNotFoundError):
            await store.get(name)
    await store.put(name, b"after")  # the leftover does not get in the way
    assert await store.get(name) == b"after"


def _deny(path_part: str, real: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path_part in os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    return guarded


async def test_fs_permission_denied_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root (CI) chmod does not deny anything, so the OS answer is injected.
    store = FileSystemBlobStore(tmp_path / "locked")
    await store.put("ok", b"1")
    locked = str(tmp_path / "locked" / "cp")
    monkeypatch.setattr(os, "open", _deny(locked, os.open))
    monkeypatch.setattr(os, "mkdir", _deny(locked, os.mkdir))
    with pytest.raises(BlobStoreError) as info:
        await store.put("cp/1", b"x")
    message = str(info.value)
    assert locked in message and "permission denied" in message and "'cp/1'" in message
    assert store.url in message
    assert isinstance(info.value.__cause__, PermissionError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
async def test_fs_permission_denied_real(tmp_path: Path) -> None:
    store = FileSystemBlobStore(tmp_path / "ro")
    await store.put("a", b"1")
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(BlobStoreError, match="permission denied") as info:
            await store.put("b", b"x")
        assert str(tmp_path / "ro") in str(info.value)
    finally:
        (tmp_path / "ro").chmod(0o700)


async def test_fs_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileSystemBlobStore(tmp_path)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(BlobStoreError, match=r"No space left on device; the disk \(or quota\) is full") as info:
        await store.put("big", b"x" * 100)
    assert str(tmp_path / "big") in str(info.value)
    monkeypatch.undo()
    assert await store.list() == []  # no temp file left


async def test_fs_concurrent_overwrites_are_whole(tmp_path: Path) -> None:
    store = FileSystemBlobStore(tmp_path)
    versions = [bytes([i]) * 200_000 for i in range(8)]
    await store.put("hot", versions[0])

    async def read_many() -> None:
        for _ in range(30):
            assert await store.get("hot") in versions

    await asyncio.gather(*(store.put("hot", v) for v in versions), read_many(), read_many())
    assert await store.get("hot") in versions


# -- open_blob_store ---------------------------------------------------------------------


def test_open_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_blob_store(f"file://{tmp_path}/dir%20x")
    assert isinstance(store, FileSystemBlobStore) and store.root == f"{tmp_path}/dir x"
    assert open_blob_store(f"file://localhost{tmp_path}").root == str(tmp_path)  # type: ignore[attr-defined]
    assert open_blob_store(f"file:{tmp_path}").root == str(tmp_path)  # type: ignore[attr-defined]
    assert open_blob_store(str(tmp_path)).root == str(tmp_path)  # type: ignore[attr-defined]
    monkeypatch.chdir(tmp_path)
    assert open_blob_store("rel/ckpt").root == str(tmp_path / "rel/ckpt")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("file://relative/path", "cannot name a host"),
        ("file://otherhost/abs", "cannot name a host"),
        ("file://", "absolute path"),
        ("file:relative", "absolute path"),
        ("file:///abs?x=1", "query"),
        ("file:///abs#frag", "query"),
        ("", "empty"),
        ("ftp://host/x", "unknown scheme"),
        ("s3:bucket", "needs '//'"),
        ("s3://", "needs a bucket"),
        ("s3://user:pw@bucket/x", "credentials"),
        ("memory://", "memory://name"),
        ("memory://a/b", "memory://name"),
        ("/with\x00nul", "NUL"),
    ],
)
def test_open_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        open_blob_store(url)
    assert isinstance(info.value, ValueError)
    assert "file:///" in str(info.value)  # says what to write instead


def test_open_rejects_unknown_options(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        open_blob_store(str(tmp_path), endpoint_url="http://x")


def test_open_s3_url_without_io(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    store = open_blob_store("s3://my-bucket/a/prefix/", region="eu-west-1")
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.url) == ("my-bucket", "a/prefix", "s3://my-bucket/a/prefix")
    assert store.endpoint_url is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert open_blob_store("s3://b").endpoint_url == "http://127.0.0.1:1"  # type: ignore[attr-defined]
    assert open_blob_store("s3://b", endpoint_url="http://h:2").endpoint_url == "http://h:2"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"access_key": "only-one"},
        {"secret_key": "only-one"},
        {"session_token": "t"},
        {"read_timeout": 0},
        {"max_attempts": 0},
    ],
)
def test_s3_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        S3BlobStore("bucket", **kwargs)


def test_s3_bad_prefix() -> None:
    with pytest.raises(ConfigError, match="prefix"):
        S3BlobStore("bucket", "a/../b")
    with pytest.raises(ConfigError, match="bucket"):
        S3BlobStore("a/b")


def test_s3_without_boto3_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes "import boto3" fail
    with pytest.raises(BlobStoreError, match=r"pip install 'statefun-mesh\[s3\]'") as info:
        open_blob_store("s3://bucket/prefix")
    assert "s3://bucket/prefix" in str(info.value)


async def test_s3_boto3_vanishing_later_is_blob_store_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3")
    store = S3BlobStore("bucket", endpoint_url="http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(BlobStoreError, match=r"pip install"):
        await store.get("x")
    await store.aclose()


async def test_file_store_concurrent_deletes_of_one_directory(tmp_path: Path) -> None:
    # Regression: deletes racing on the last entries of a directory; one prunes it while
    # another fsyncs it after its unlink, which then failed with ENOENT.
    from statefun_mesh.blobstore.filesystem import FileSystemBlobStore

    for round_ in range(20):
        async with FileSystemBlobStore(str(tmp_path / "blobs")) as store:
            names = [f"r{round_}/d/{i:04d}" for i in range(16)]
            for n in names:
                await store.put(n, b"x")
            await asyncio.gather(*(store.delete(n) for n in names))
            assert await store.list(f"r{round_}/") == []
