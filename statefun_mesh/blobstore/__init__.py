"""Blob stores that checkpoints are copied to, and ``open_blob_store(url)`` that picks one by URL."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any, Final

from ..errors import ConfigError
from .base import MAX_NAME_BYTES as MAX_NAME_BYTES
from .base import BlobStore as BlobStore
from .base import check_name as check_name
from .base import check_prefix as check_prefix
from .filesystem import FileSystemBlobStore as FileSystemBlobStore
from .memory import MemoryBlobStore as MemoryBlobStore
from .s3 import S3BlobStore as S3BlobStore

__all__ = [
    "MAX_NAME_BYTES",
    "BlobStore",
    "FileSystemBlobStore",
    "MemoryBlobStore",
    "S3BlobStore",
    "check_name",
    "check_prefix",
    "open_blob_store",
]

_FORMS: Final = "file:///absolute/dir, a plain path, memory://name or s3://bucket/prefix"
_SCHEME_ONLY: Final = re.compile(r"(?i)(s3|memory):(?!//)")


def _bad(url: str, problem: str) -> ConfigError:
    return ConfigError(f"blob store URL {url!r}: {problem}; use {_FORMS}")


def open_blob_store(url: str, **options: Any) -> BlobStore:
    """Open the blob store that ``url`` names. No I/O happens until the first operation.

    ``file:///abs/path`` (or ``file://localhost/abs/path``, or a plain absolute or
    relative path) gives a :class:`FileSystemBlobStore`; ``memory://name`` a
    process-local :class:`MemoryBlobStore` (for tests); ``s3://bucket/prefix`` an
    :class:`S3BlobStore`, configured by ``options`` or the AWS environment. The store
    is an async context manager::

        async with open_blob_store("s3://ckpt/prod", endpoint_url="http://minio:9000") as blobs:
            await blobs.put("checkpoints/000012/manifest.json", data)

    Args:
        url: where the objects live; percent-escapes in paths are decoded.
        **options: keyword arguments for the store's constructor, e.g.
            ``endpoint_url``, ``region``, ``access_key``, ``secret_key``,
            ``session_token``, ``read_timeout`` for S3.

    Returns:
        The store; close it with ``aclose()``.

    Raises:
        ConfigError: the URL is empty, malformed or of an unknown scheme (also a ``ValueError``).
        TypeError: an option the chosen store does not accept.
        BlobStoreError: ``s3://`` was asked for but boto3 is not installed.
    """
    if not isinstance(url, str):
        raise TypeError(f"blob store URL must be a str, not {type(url).__name__}")
    if not url:
        raise _bad(url, "it is empty")
    if "\x00" in url:
        raise _bad(url, "it contains NUL")
    if "://" not in url and not url.lower().startswith("file:"):
        if _SCHEME_ONLY.match(url):
            raise _bad(url, "the scheme needs '//'")
        return FileSystemBlobStore(url, **options)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise _bad(url, "query strings and fragments are not supported; pass settings as options")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise _bad(url, f"file URLs cannot name a host ({parts.netloc!r}); write three slashes, file:///dir")
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/"):
            raise _bad(url, "a file URL needs an absolute path")
        return FileSystemBlobStore(path, **options)
    if scheme == "memory":
        name = urllib.parse.unquote(parts.netloc)
        if not name or parts.path not in ("", "/"):
            raise _bad(url, "a memory URL is memory://name, with a name and no path")
        return MemoryBlobStore(name, **options)
    if scheme == "s3":
        if "@" in parts.netloc:
            raise _bad(url, "credentials in the URL are not supported; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if not parts.netloc:
            raise _bad(url, "an s3 URL needs a bucket")
        return S3BlobStore(parts.netloc, urllib.parse.unquote(parts.path), **options)
    raise _bad(url, f"unknown scheme {parts.scheme!r}")
