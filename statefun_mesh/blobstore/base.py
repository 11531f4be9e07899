"""The BlobStore ABC that checkpoints are copied to, and the rules for object names.

A blob store holds immutable-looking objects addressed by ``/``-separated relative
names such as ``checkpoints/000012/manifest.json``. Every operation is a coroutine; an
adapter whose storage blocks (files, HTTP) runs that work in a thread so the peer's
event loop never waits on I/O.

Name rules (:func:`check_name`), the same for every adapter so a checkpoint written to
one store can be copied to any other: a non-empty ``str`` of at most
:data:`MAX_NAME_BYTES` UTF-8 bytes, not starting with ``/``, without empty, ``.`` or
``..`` segments and without NUL. A name may not also be the directory-like prefix of
another name (``a`` and ``a/b``) on stores backed by a file system, so layouts should
keep objects and "directories" apart, as the checkpoint layout does.
"""

from __future__ import annotations

import abc
import asyncio
from types import TracebackType
from typing import Final

from ..errors import BlobStoreError

__all__ = ["MAX_NAME_BYTES", "BlobStore", "check_data", "check_name", "check_prefix"]

#: The longest name in UTF-8 bytes (the S3 key limit, so names stay portable).
MAX_NAME_BYTES: Final = 1024


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a blob {what} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"blob {what} {value!r} contains NUL")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"blob {what} {value!r} is not valid Unicode (lone surrogate)") from None
    if size > MAX_NAME_BYTES:
        raise ValueError(f"blob {what} is {size} bytes long in UTF-8; the limit is {MAX_NAME_BYTES}")
    if value.startswith("/"):
        raise ValueError(
            f"blob {what} {value!r} is absolute; names are relative, like 'checkpoints/000012/manifest.json'"
        )
    return value


def check_name(name: object) -> str:
    """Validate an object name and return it.

    Args:
        name: the candidate name.

    Returns:
        ``name`` unchanged.

    Raises:
        TypeError: ``name`` is not a ``str``.
        ValueError: ``name`` is empty, absolute, longer than :data:`MAX_NAME_BYTES`, or
            has an empty, ``.`` or ``..`` segment or a NUL.
    """
    text = _check_text(name, "name")
    if not text:
        raise ValueError("blob name is empty")
    for segment in text.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"blob name {text!r} has an empty, '.' or '..' segment")
    return text


def check_prefix(prefix: object) -> str:
    """Validate a listing prefix and return it.

    A prefix is a plain string prefix of names, so its last segment may be partial
    (``"checkpoints/0000"``) or empty (``"checkpoints/"``); every segment before the
    last must be a valid name segment.

    Args:
        prefix: the candidate prefix; ``""`` lists everything.

    Returns:
        ``prefix`` unchanged.

    Raises:
        TypeError: ``prefix`` is not a ``str``.
        ValueError: ``prefix`` is absolute, too long, or has an empty, ``.`` or ``..``
            segment before its last one, or a NUL.
    """
    text = _check_text(prefix, "prefix")
    for segment in text.split("/")[:-1]:
        if segment in ("", ".", ".."):
            raise ValueError(f"blob prefix {text!r} has an empty, '.' or '..' segment")
    return text


def check_data(name: str, data: object) -> bytes:
    """Return ``data`` as immutable ``bytes``, so a caller mutating its buffer later changes nothing.

    Raises:
        TypeError: ``data`` is not a bytes-like object.
    """
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"blob {name!r}: data must be bytes, not {type(data).__name__}")


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


class BlobStore(abc.ABC):
    """An object store: whole-object put, get, exists, list and delete under relative names
    (and put/get from/to local files, for objects too large to hold in memory).

    Semantics every implementation guarantees (checked by
    :func:`statefun_mesh.testing.blobstores.check_blob_store`):

    - ``put`` is atomic: a concurrent or later reader sees the whole old object, the
      whole new one, or (for a new name) nothing, never a prefix of the data, also when
      the writing process crashes mid-way.
    - Operations on different names may run concurrently.
    - Every failure of the underlying storage is raised as
      :class:`~statefun_mesh.errors.BlobStoreError` (the storage's own exception is
      ``__cause__``) whose message names the store URL, the object and a remedy.
      Invalid names raise ``ValueError``/``TypeError`` before any I/O.

    Stores are async context managers; ``aclose()`` releases connections and is
    idempotent. Any operation after ``aclose()`` raises ``BlobStoreError``.
    """

    __slots__ = ("_closed",)

    def __init__(self) -> None:
        self._closed = False

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The URL that names this store in messages and that ``open_blob_store`` accepts (never credentials)."""

    @abc.abstractmethod
    async def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``name``, replacing any object of that name atomically.

        Args:
            name: the object's name (see :func:`check_name`).
            data: the whole content; ``bytearray`` and ``memoryview`` are copied first.

        Raises:
            ValueError: ``name`` is invalid.
            TypeError: ``name`` is not a ``str`` or ``data`` is not bytes-like.
            BlobStoreError: the storage failed. The previous object (or its absence) is
                then either unchanged or fully replaced; which one is unknown, so retry
                the put. The same holds when the awaiting task is cancelled.
        """

    async def put_file(self, name: str, path: str) -> None:
        """Store the content of the local file ``path`` under ``name``, like :meth:`put`.

        The file must not change until this returns. The adapters shipped here read it
        in pieces (never the whole object in memory): the file store copies it, the S3
        store uploads it in parts (multipart upload above 8 MiB). This default reads the
        whole file and calls :meth:`put`; other adapters should override it.

        Raises:
            ValueError: ``name`` is invalid.
            BlobStoreError: the storage failed, or ``path`` cannot be read.
        """
        check_name(name)
        try:
            data = await asyncio.to_thread(_read_file, path)
        except OSError as exc:
            raise BlobStoreError(f"{self.url}: cannot read {path} to store it as {name!r}: {exc}") from exc
        await self.put(name, data)

    async def get_file(self, name: str, path: str) -> None:
        """Write the content of ``name`` to the local file ``path`` (replaced), like :meth:`get`.

        The shipped adapters copy it in pieces, never the whole object in memory. On an
        error ``path`` may be left partly written.

        Raises:
            ValueError: ``name`` is invalid.
            BlobNotFoundError: there is no object called ``name``.
            BlobStoreError: the storage failed, or ``path`` cannot be written.
        """
        data = await self.get(name)
        try:
            await asyncio.to_thread(_write_file, path, data)
        except OSError as exc:
            raise BlobStoreError(f"{self.url}: cannot write {name!r} to {path}: {exc}") from exc

    @abc.abstractmethod
    async def get(self, name: str) -> bytes:
        """Return the whole content of ``name``.

        Raises:
            ValueError: ``name`` is invalid.
            BlobNotFoundError: there is no object called ``name``.
            BlobStoreError: the storage failed.
        """

    @abc.abstractmethod
    async def exists(self, name: str) -> bool:
        """Return whether an object called ``name`` exists (a mere prefix of other names does not count).

        Raises:
            ValueError: ``name`` is invalid.
            BlobStoreError: the storage failed.
        """

    @abc.abstractmethod
    async def list(self, prefix: str = "") -> list[str]:
        """Return the names of all objects that start with ``prefix``, sorted.

        Names are sorted by code point, which equals S3's UTF-8 byte order. The prefix
        is a string prefix, not a directory: ``list("cp/00")`` returns ``cp/001/x``
        and ``cp/00.json``. Only objects are returned, never directory-like prefixes.

        Raises:
            ValueError: ``prefix`` is invalid (see :func:`check_prefix`).
            BlobStoreError: the storage failed.
        """

    @abc.abstractmethod
    async def delete(self, name: str) -> None:
        """Delete ``name``; deleting a missing object is not an error.

        Raises:
            ValueError: ``name`` is invalid.
            BlobStoreError: the storage failed; the object may or may not be deleted.
        """

    async def aclose(self) -> None:
        """Release the store's resources. Idempotent; later operations raise ``BlobStoreError``."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise BlobStoreError(
                f"{self.url}: the blob store was closed by aclose(); open a new one with open_blob_store()"
            )

    async def __aenter__(self) -> BlobStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}{' closed' if self._closed else ''}>"
