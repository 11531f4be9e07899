"""MemoryBlobStore: a process-local dict of objects, for tests and single-process meshes.

Stores opened with the same ``memory://name`` share one namespace for the life of the
process (like a bucket), so a test can "restart" a peer and let it find its
checkpoints; :meth:`MemoryBlobStore.discard` forgets a namespace.
"""

from __future__ import annotations

import threading
from typing import ClassVar

from ..errors import BlobNotFoundError
from .base import BlobStore, check_data, check_name, check_prefix

__all__ = ["MemoryBlobStore"]


class MemoryBlobStore(BlobStore):
    """A :class:`BlobStore` in this process's memory; URL ``memory://name``.

    Args:
        name: the shared namespace; stores with the same name see the same objects.
            ``""`` gives a private namespace that only this store sees.
    """

    __slots__ = ("_name", "_objects")

    _namespaces: ClassVar[dict[str, dict[str, bytes]]] = {}
    # Guards _namespaces only: stores may be created from several threads (one event loop each).
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str = "") -> None:
        super().__init__()
        if not isinstance(name, str) or "/" in name or "\x00" in name:
            raise ValueError(f"memory blob store name must be a str without '/' or NUL, got {name!r}")
        self._name = name
        if name:
            with self._lock:
                self._objects = self._namespaces.setdefault(name, {})
        else:
            self._objects = {}

    @classmethod
    def discard(cls, name: str) -> None:
        """Forget the namespace ``memory://name`` (stores already open keep their objects)."""
        with cls._lock:
            cls._namespaces.pop(name, None)

    @property
    def url(self) -> str:
        """``memory://name`` (``memory://`` for a private namespace)."""
        return f"memory://{self._name}"

    # The dict operations below are atomic under the GIL and never await, so a reader
    # sees either the whole old bytes object or the whole new one.

    async def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Store a copy-safe ``bytes`` of ``data`` under ``name``."""
        check_name(name)
        payload = check_data(name, data)
        self._check_open()
        self._objects[name] = payload

    async def get(self, name: str) -> bytes:
        """Return the object ``name``.

        Raises:
            BlobNotFoundError: no such object.
        """
        check_name(name)
        self._check_open()
        try:
            return self._objects[name]
        except KeyError:
            raise BlobNotFoundError(f"{self.url}: no object {name!r}") from None

    async def exists(self, name: str) -> bool:
        """Return whether ``name`` is stored."""
        check_name(name)
        self._check_open()
        return name in self._objects

    async def list(self, prefix: str = "") -> list[str]:
        """Return the stored names starting with ``prefix``, sorted."""
        check_prefix(prefix)
        self._check_open()
        return sorted(name for name in tuple(self._objects) if name.startswith(prefix))

    async def delete(self, name: str) -> None:
        """Remove ``name`` if present."""
        check_name(name)
        self._check_open()
        self._objects.pop(name, None)
