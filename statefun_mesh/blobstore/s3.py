"""S3BlobStore: objects in an S3 (or S3-compatible) bucket under a key prefix, via boto3.

boto3 is an optional dependency (``pip install 'statefun-mesh[s3]'``), imported on
first use. Its blocking calls run in ``asyncio.to_thread``; the low-level client is
thread-safe and shared. Every request is bounded: connect and read timeouts and a
fixed number of attempts ("standard" retry mode), so a dead endpoint surfaces as
``BlobStoreError`` instead of a hang.

Configuration comes from the arguments, else from the standard AWS environment:
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
and boto3's credential chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, config files, instance roles). With an
endpoint URL (MinIO, SeaweedFS, rclone, Ceph...) path-style addressing is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from ..errors import BlobNotFoundError, BlobStoreError, ConfigError
from .base import BlobStore, check_data, check_name, check_prefix

__all__ = ["INSTALL_HINT", "PART_SIZE", "S3BlobStore"]

_T = TypeVar("_T")

INSTALL_HINT: Final = "pip install 'statefun-mesh[s3]'"
#: the part size of ``put_file``'s multipart uploads (and the largest object it sends in one PutObject)
PART_SIZE: Final = 8 << 20
_NOT_FOUND: Final = frozenset({"NoSuchKey", "NotFound", "404"})
_AUTH: Final = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "Forbidden",
        "403",
        "401",
    }
)
_UNAVAILABLE: Final = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "500", "502", "503", "504"}
)


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _have_boto3() -> bool:
    try:
        return importlib.util.find_spec("boto3") is not None
    except (ImportError, ValueError):  # ValueError: a broken or blocked sys.modules entry
        return False


def _boto3_missing(url: str) -> BlobStoreError:
    return BlobStoreError(f"{url}: the s3:// blob store needs boto3, which is not installed; run: {INSTALL_HINT}")


def _drop_empty_expect(request: Any, **kwargs: Any) -> None:
    """Remove ``Expect: 100-continue`` from an empty PutObject.

    botocore sends it with every PutObject. For an empty body, Go-based S3 servers
    (MinIO, SeaweedFS, rclone) answer at once without ``100 Continue``, which leaves
    botocore misparsing the next response on that pooled connection: a stall until
    ``read_timeout`` and a silent retry (boto/botocore#3755). ``Expect`` is not part
    of the SigV4 signature, so dropping it after signing is safe.
    """
    headers = request.headers
    if headers.get("Content-Length") == "0" and "Expect" in headers:
        del headers["Expect"]


class S3BlobStore(BlobStore):
    """A :class:`BlobStore` in an S3 bucket; URL ``s3://bucket/prefix``.

    Object ``name`` is stored at key ``prefix/name``. ``put`` is a single PutObject,
    which S3 applies atomically. Requests are not made until the first operation.

    Args:
        bucket: the bucket, which must exist.
        prefix: key prefix (leading/trailing ``/`` are ignored); ``""`` for the bucket root.
        endpoint_url: an S3-compatible server such as ``http://127.0.0.1:9000``; default
            ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, else AWS itself.
        region: default ``AWS_REGION``/``AWS_DEFAULT_REGION``, else boto3's config, or
            ``us-east-1`` when an endpoint URL is set.
        access_key: with ``secret_key``; default boto3's credential chain.
        secret_key: with ``access_key``.
        session_token: for temporary credentials, with the two keys.
        connect_timeout: seconds to establish a connection.
        read_timeout: seconds to wait for each read from the socket.
        max_attempts: total tries per request, first one included. A dead endpoint thus
            fails an operation after about ``max_attempts * (connect_timeout +
            read_timeout)`` plus the retry backoff (a few seconds).
        max_pool_connections: concurrent connections kept to the endpoint.

    Raises:
        ConfigError: a malformed bucket, prefix or credential combination.
        BlobStoreError: boto3 is not installed.
    """

    __slots__ = (
        "_access_key",
        "_bucket",
        "_client",
        "_client_lock",
        "_connect_timeout",
        "_endpoint_url",
        "_key_prefix",
        "_max_attempts",
        "_max_pool_connections",
        "_prefix",
        "_read_timeout",
        "_region",
        "_secret_key",
        "_session_token",
    )

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        max_pool_connections: int = 10,
    ) -> None:
        super().__init__()
        if not isinstance(bucket, str) or not bucket or "/" in bucket or "\x00" in bucket:
            raise ConfigError(f"S3 bucket must be a non-empty name without '/', got {bucket!r}")
        self._bucket = bucket
        self._prefix = prefix.strip("/") if isinstance(prefix, str) else prefix
        if self._prefix:
            try:
                check_name(self._prefix)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"S3 key prefix {prefix!r} is invalid: {exc}") from None
        self._key_prefix = self._prefix + "/" if self._prefix else ""
        if (access_key is None) != (secret_key is None):
            raise ConfigError(
                f"{self.url}: give both access_key and secret_key, or neither (to use the AWS environment)"
            )
        if session_token is not None and access_key is None:
            raise ConfigError(f"{self.url}: session_token needs access_key and secret_key")
        if connect_timeout <= 0 or read_timeout <= 0 or max_attempts < 1 or max_pool_connections < 1:
            raise ConfigError(f"{self.url}: timeouts must be > 0 and max_attempts, max_pool_connections >= 1")
        if not _have_boto3():
            raise _boto3_missing(self.url)
        self._endpoint_url = endpoint_url or _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
        # S3-compatible servers ignore the region but SigV4 needs one.
        default_region = "us-east-1" if self._endpoint_url else None
        self._region = region or _env("AWS_REGION", "AWS_DEFAULT_REGION") or default_region
        self._access_key = access_key
        self._secret_key = secret_key
        self._session_token = session_token
        self._connect_timeout = float(connect_timeout)
        self._read_timeout = float(read_timeout)
        self._max_attempts = max_attempts
        self._max_pool_connections = max_pool_connections
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` (endpoint and credentials are not part of it)."""
        return f"s3://{self._bucket}/{self._prefix}"

    @property
    def bucket(self) -> str:
        """The bucket name."""
        return self._bucket

    @property
    def prefix(self) -> str:
        """The key prefix without slashes (``""`` for the bucket root)."""
        return self._prefix

    @property
    def endpoint_url(self) -> str | None:
        """The S3-compatible endpoint, or ``None`` for AWS."""
        return self._endpoint_url

    # -- plumbing ------------------------------------------------------------------------

    def _get_client(self) -> Any:
        """Create the boto3 client on first use (in a worker thread: it reads model files)."""
        with self._client_lock:
            if self._client is not None:
                return self._client
            try:
                # import_module keeps mypy from needing boto3's (optional) type stubs.
                boto3 = importlib.import_module("boto3")
                config_cls = importlib.import_module("botocore.config").Config
            except ImportError as exc:
                raise _boto3_missing(self.url) from exc
            try:
                session = boto3.session.Session(
                    aws_access_key_id=self._access_key,
                    aws_secret_access_key=self._secret_key,
                    aws_session_token=self._session_token,
                    region_name=self._region,
                )
                config = config_cls(
                    connect_timeout=self._connect_timeout,
                    read_timeout=self._read_timeout,
                    retries={"mode": "standard", "max_attempts": self._max_attempts},
                    max_pool_connections=self._max_pool_connections,
                    # S3-compatible servers rarely resolve virtual-hosted bucket names.
                    s3={"addressing_style": "path"} if self._endpoint_url else None,
                )
                client = session.client("s3", endpoint_url=self._endpoint_url, config=config)
            except Exception as exc:  # botocore raises ValueError for a bad endpoint, its own errors otherwise
                raise BlobStoreError(
                    f"{self.url}: cannot create the S3 client for endpoint {self._endpoint_url or 'AWS'}: {exc}; "
                    "check endpoint_url (or AWS_ENDPOINT_URL), the region and the AWS profile"
                ) from exc
            client.meta.events.register("before-send.s3.PutObject", _drop_empty_expect)
            self._client = client
            return client

    def _error(self, exc: Exception, action: str, name: str) -> BlobStoreError:
        """Translate a boto3/botocore exception into a ``BlobStoreError`` with a remedy (the one place)."""
        bce = importlib.import_module("botocore.exceptions")

        endpoint = self._endpoint_url or "AWS"
        where = f"{self.url} (endpoint {endpoint})"
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            detail = f"{code or 'error'} (HTTP {status}): {err.get('Message') or 'no message'}"
            if code in _NOT_FOUND and action == "read":
                return BlobNotFoundError(f"{where}: no object {name!r}")
            if code == "NoSuchBucket":
                hint = f"bucket {self._bucket!r} does not exist; create it or fix the bucket in the URL"
            elif code in _AUTH or status in (401, 403):
                hint = (
                    "the credentials were refused; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                    "(or access_key=/secret_key=), the session token, and the bucket's policy"
                )
            elif code in _UNAVAILABLE or (isinstance(status, int) and status >= 500):
                hint = f"the server kept failing after {self._max_attempts} attempts; retry later"
            else:
                hint = "see the S3 error code above"
        elif isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            detail = str(exc)
            hint = (
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, configure an AWS profile, "
                "or pass access_key=/secret_key="
            )
        elif isinstance(exc, (bce.EndpointConnectionError, bce.ConnectTimeoutError, bce.ConnectionClosedError)):
            detail = str(exc)
            hint = (
                f"cannot reach {endpoint} (tried {self._max_attempts} times); check that "
                "the server is running and endpoint_url/AWS_ENDPOINT_URL is right"
            )
        elif isinstance(exc, bce.ReadTimeoutError):
            detail = str(exc)
            hint = (
                f"{endpoint} did not answer within read_timeout={self._read_timeout} s; "
                "check the server's health or raise read_timeout"
            )
        else:
            detail = f"{type(exc).__name__}: {exc}"
            hint = "check the endpoint, network and credentials, then retry"
        return BlobStoreError(f"{where}: cannot {action} {name!r}: {detail}; {hint}")

    def _call_sync(self, action: str, name: str, func: Callable[[Any], _T]) -> _T:
        client = self._get_client()
        bce = importlib.import_module("botocore.exceptions")
        try:
            return func(client)
        except (bce.BotoCoreError, bce.ClientError, OSError) as exc:
            raise self._error(exc, action, name) from exc

    async def _call(self, action: str, name: str, func: Callable[[Any], _T]) -> _T:
        self._check_open()
        return await asyncio.to_thread(self._call_sync, action, name, func)

    @staticmethod
    def _is_not_found(exc: Exception) -> bool:
        client_error = importlib.import_module("botocore.exceptions").ClientError
        return isinstance(exc, client_error) and str(exc.response.get("Error", {}).get("Code", "")) in _NOT_FOUND

    # -- operations ----------------------------------------------------------------------

    async def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """PutObject ``prefix/name`` (atomic in S3).

        Raises:
            BlobStoreError: missing bucket, refused credentials, unreachable endpoint,
                or retries exhausted; the object may or may not have been replaced.
        """
        key = self._key_prefix + check_name(name)
        payload = check_data(name, data)
        await self._call("write", name, lambda c: c.put_object(Bucket=self._bucket, Key=key, Body=payload))

    async def put_file(self, name: str, path: str) -> None:
        """Upload the file ``path`` as ``prefix/name``, holding at most one part in memory.

        Up to :data:`PART_SIZE` bytes: one PutObject streamed from the file; larger: a
        multipart upload in parts of that size (the object appears whole at the final
        CompleteMultipartUpload, so ``put``'s atomicity holds; a failed upload is aborted).

        Raises:
            BlobStoreError: ``path`` cannot be read, or the upload failed as in :meth:`put`.
        """
        key = self._key_prefix + check_name(name)
        try:
            size = os.path.getsize(path)
        except OSError as exc:
            raise BlobStoreError(f"{self.url}: cannot read {path} to store it as {name!r}: {exc}") from exc

        def upload(c: Any) -> None:
            with open(path, "rb") as fh:
                if size <= PART_SIZE:
                    c.put_object(Bucket=self._bucket, Key=key, Body=fh)
                    return
                upload_id = c.create_multipart_upload(Bucket=self._bucket, Key=key)["UploadId"]
                try:
                    parts = []
                    number = 1
                    while chunk := fh.read(PART_SIZE):
                        r = c.upload_part(
                            Bucket=self._bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                        )
                        parts.append({"ETag": r["ETag"], "PartNumber": number})
                        number += 1
                        del chunk
                    c.complete_multipart_upload(
                        Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                    )
                except BaseException:
                    with contextlib.suppress(Exception):
                        c.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
                    raise

        await self._call("write", name, upload)

    async def get_file(self, name: str, path: str) -> None:
        """GetObject ``prefix/name`` into the file ``path``, 1 MiB at a time.

        Raises:
            BlobNotFoundError: no such key.
            BlobStoreError: any other failure (``path`` may be left partly written).
        """
        key = self._key_prefix + check_name(name)

        def read(c: Any) -> None:
            body = c.get_object(Bucket=self._bucket, Key=key)["Body"]
            try:
                with open(path, "wb") as out:
                    for chunk in body.iter_chunks(1 << 20):
                        out.write(chunk)
            finally:
                body.close()

        await self._call("read", name, read)

    async def get(self, name: str) -> bytes:
        """GetObject ``prefix/name`` and read the whole body.

        Raises:
            BlobNotFoundError: no such key.
            BlobStoreError: any other failure.
        """
        key = self._key_prefix + check_name(name)

        def read(c: Any) -> bytes:
            body = c.get_object(Bucket=self._bucket, Key=key)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return await self._call("read", name, read)

    async def exists(self, name: str) -> bool:
        """HeadObject ``prefix/name``; a 404 is ``False``, any other failure raises ``BlobStoreError``."""
        key = self._key_prefix + check_name(name)

        def head(c: Any) -> bool:
            try:
                c.head_object(Bucket=self._bucket, Key=key)
            except Exception as exc:
                if self._is_not_found(exc):
                    return False
                raise
            return True

        return await self._call("look up", name, head)

    async def list(self, prefix: str = "") -> list[str]:
        """ListObjectsV2 (all pages) under ``prefix/<prefix>``; names are returned without the store prefix."""
        key_prefix = self._key_prefix + check_prefix(prefix)
        cut = len(self._key_prefix)

        def walk(c: Any) -> list[str]:
            names: list[str] = []
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=key_prefix):
                for obj in page.get("Contents", ()):
                    name = obj["Key"][cut:]
                    if name:  # skip a "folder marker" equal to the store prefix itself
                        names.append(name)
            names.sort()
            return names

        return await self._call("list", prefix, walk)

    async def delete(self, name: str) -> None:
        """DeleteObject ``prefix/name``; a missing key is fine (S3 answers 204 anyway)."""
        key = self._key_prefix + check_name(name)

        def remove(c: Any) -> None:
            try:
                c.delete_object(Bucket=self._bucket, Key=key)
            except Exception as exc:
                if not self._is_not_found(exc):
                    raise

        await self._call("delete", name, remove)

    async def aclose(self) -> None:
        """Close the client's connection pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)
