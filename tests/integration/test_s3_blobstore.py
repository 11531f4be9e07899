"""S3BlobStore against a real S3-compatible server (rclone serve s3) on 127.0.0.1.

Without the server binary these tests skip, except under CI (``CI`` set), where they
fail: install it with ``bash .ci/install-s3-server.sh``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # tests.s3server lives at the repository root's tests/
    sys.path.insert(0, _ROOT)

from statefun_mesh.blobstore import S3BlobStore, open_blob_store  # noqa: E402
from statefun_mesh.errors import BlobNotFoundError, BlobStoreError  # noqa: E402
from statefun_mesh.testing.blobstores import check_blob_store  # noqa: E402
from tests.s3server import (  # noqa: E402
    S3Server,
    S3ServerUnavailable,
    create_bucket,
    raw_client,
    require_s3_server,
    running_s3_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.c_core_only]

if os.environ.get("CI") is None:
    boto3 = pytest.importorskip("boto3", reason="S3BlobStore needs boto3: pip install 'statefun-mesh[s3]'")
else:
    import boto3  # noqa: F401  # CI must have it: the tests may not skip there

BUCKET = "statefun-test"


def _raw_client(server: S3Server) -> Any:
    return raw_client(server)


def _create_bucket(server: S3Server, name: str = BUCKET) -> None:
    create_bucket(server, name)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    require_s3_server()
    with running_s3_server() as server:
        _create_bucket(server)
        yield server


@pytest.fixture(autouse=True)
def _isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's AWS setup (and the EC2 metadata probe) out of the tests."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _store(server: S3Server, prefix: str = "", bucket: str = BUCKET, **kwargs: Any) -> S3BlobStore:
    options: dict[str, Any] = {
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "read_timeout": 10.0,
    }
    options.update(kwargs)
    return S3BlobStore(bucket, prefix, **options)


# -- conformance -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "mesh/prod"])
async def test_conformance(s3_server: S3Server, prefix: str) -> None:
    async with _store(s3_server, prefix) as store:
        await check_blob_store(store)


async def test_objects_live_under_the_prefix(s3_server: S3Server) -> None:
    async with _store(s3_server, "/tenant-a/") as a, _store(s3_server, "tenant-b") as b:
        await a.put("checkpoints/000001/manifest.json", b"{}")
        assert await b.list() == []
        assert not await b.exists("checkpoints/000001/manifest.json")
        client = _raw_client(s3_server)
        try:
            keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="tenant-a/")["Contents"]]
        finally:
            client.close()
        assert keys == ["tenant-a/checkpoints/000001/manifest.json"]
        await a.delete("checkpoints/000001/manifest.json")


async def test_list_pages_through_more_than_1000_objects(s3_server: S3Server) -> None:
    names = [f"many/{i:05d}" for i in range(1005)]
    client = _raw_client(s3_server)
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: client.put_object(Bucket=BUCKET, Key="paged/" + n, Body=b"1"), names))
    finally:
        client.close()
    async with _store(s3_server, "paged") as store:
        assert await store.list("many/") == names
        assert await store.list("many/0100") == names[1000:]


async def test_empty_put_does_not_stall_the_next_request(s3_server: S3Server) -> None:
    # botocore's "Expect: 100-continue" on an empty PutObject used to poison the pooled
    # connection against Go servers: the next request stalled for read_timeout.
    async with _store(s3_server, "expect", read_timeout=5.0, max_pool_connections=1) as store:
        for i in range(3):
            await store.put(f"empty-{i}", b"")
            started = time.monotonic()
            await store.put(f"full-{i}", b"x" * 100_000)
            assert await store.get(f"full-{i}") == b"x" * 100_000
            assert time.monotonic() - started < 2.0, "a request after an empty put stalled"
        for name in await store.list():
            await store.delete(name)


# -- configuration from the environment --------------------------------------------------


async def test_credentials_and_endpoint_from_environment(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    store = open_blob_store(f"s3://{BUCKET}/from-env")
    assert isinstance(store, S3BlobStore) and store.endpoint_url == s3_server.endpoint_url
    async with store:
        await store.put("a/b", b"via env")
        assert await store.get("a/b") == b"via env"
        assert await store.list() == ["a/b"]
        await store.delete("a/b")


async def test_endpoint_from_service_specific_variable(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # loses to the S3-specific one
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    async with open_blob_store(f"s3://{BUCKET}/from-env-s3") as store:
        await store.put("x", b"1")
        assert await store.exists("x")
        await store.delete("x")


async def test_no_credentials_anywhere(s3_server: S3Server) -> None:
    async with S3BlobStore(BUCKET, "x", endpoint_url=s3_server.endpoint_url) as store:
        with pytest.raises(BlobStoreError, match="AWS_ACCESS_KEY_ID") as info:
            await asyncio.wait_for(store.put("a", b"1"), 15)
        assert "s3://statefun-test/x" in str(info.value) and "'a'" in str(info.value)


# -- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "creds",
    [
        {"secret_key": "wrong-secret"},
        {"access_key": "unknown-key", "secret_key": "whatever"},
    ],
)
async def test_wrong_credentials(s3_server: S3Server, creds: dict[str, str]) -> None:
    async with _store(s3_server, "denied", **creds) as store:
        with pytest.raises(BlobStoreError, match="credentials were refused") as info:
            await asyncio.wait_for(store.put("a", b"1"), 15)
        assert s3_server.endpoint_url in str(info.value) and "'a'" in str(info.value)
        assert info.value.__cause__ is not None
        for call in (store.get("a"), store.exists("a"), store.list(), store.delete("a")):
            with pytest.raises(BlobStoreError, match="credentials were refused") as info:
                await asyncio.wait_for(call, 15)
            assert not isinstance(info.value, BlobNotFoundError)
    async with _store(s3_server, "denied") as good:
        assert await good.list() == []  # nothing was written with the wrong credentials


async def test_missing_bucket(s3_server: S3Server) -> None:
    async with _store(s3_server, bucket="no-such-bucket") as store:
        with pytest.raises(BlobStoreError, match="bucket 'no-such-bucket' does not exist"):
            await store.list()
        with pytest.raises(BlobStoreError, match="no-such-bucket"):
            await store.put("a", b"1")


async def test_stopped_server_fails_fast() -> None:
    require_s3_server()
    with running_s3_server() as server:
        _create_bucket(server)
        async with _store(server, connect_timeout=1.0, read_timeout=2.0, max_attempts=2) as store:
            await store.put("a", b"1")
            server.stop()
            started = time.monotonic()
            with pytest.raises(BlobStoreError, match="check that the server is running") as info:
                await asyncio.wait_for(store.get("a"), 20)
            assert time.monotonic() - started < 10
            assert server.endpoint_url in str(info.value) and "'a'" in str(info.value)
            with pytest.raises(BlobStoreError):
                await asyncio.wait_for(store.put("b", b"2"), 20)


async def test_unresponsive_server_times_out() -> None:
    require_s3_server()
    with running_s3_server() as server:
        _create_bucket(server)
        async with _store(server, connect_timeout=1.0, read_timeout=1.0, max_attempts=2) as store:
            await store.put("a", b"1")
            server.pause()  # the kernel still accepts connections; nothing answers
            try:
                started = time.monotonic()
                with pytest.raises(BlobStoreError, match="read_timeout") as info:
                    await asyncio.wait_for(store.get("a"), 20)
                assert time.monotonic() - started < 15  # 2 x 1 s reads plus backoff
                assert "'a'" in str(info.value)
            finally:
                server.resume()
            assert await store.get("a") == b"1"  # and it recovers


# -- the skip-or-fail policy -------------------------------------------------------------


@pytest.mark.parametrize("ci", [None, "true", ""])
def test_missing_server_skips_only_outside_ci(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    def missing() -> str:
        raise S3ServerUnavailable("rclone is not installed")

    monkeypatch.setitem(require_s3_server.__globals__, "find_rclone", missing)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
        with pytest.raises(pytest.skip.Exception, match="not installed"):
            require_s3_server()
    else:
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match="must not be skipped"):
            require_s3_server()
