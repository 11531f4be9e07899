"""FileSystemBlobStore: objects as files under a root directory, written atomically and durably.

A put writes ``.<basename>.<16 hex>.partial`` in the object's own directory, fsyncs
it, ``os.replace()``s it over the final name and fsyncs the directory, so after a
crash a reader sees the old object or the new one, never a partial file. Leftover
``.partial`` files from a crash are ignored by ``get``/``list`` (their names are
reserved). Deleting an object also removes the directories it leaves empty, so old
checkpoints leave no trail of empty folders. All blocking calls run in
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import urllib.parse
from collections.abc import Callable
from typing import BinaryIO, Final, TypeVar

from ..errors import BlobNotFoundError, BlobStoreError
from .base import BlobStore, check_data, check_name, check_prefix

__all__ = ["FileSystemBlobStore"]

_T = TypeVar("_T")

#: Temporary files of in-progress puts: ``.<basename>.<16 hex>.partial``.
_PARTIAL: Final = re.compile(r"\..+\.[0-9a-f]{16}\.partial\Z", re.DOTALL)
_DIR_FLAGS: Final = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_COPY_CHUNK: Final = 1 << 20
#: Errors that mean "this name does not exist as a file" when reading.
_MISSING: Final = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def _fsync_dir(path: str) -> None:
    """Make a directory's entries (a rename, a new child) durable."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSystemBlobStore(BlobStore):
    """A :class:`BlobStore` on a local (or mounted) directory; URL ``file:///abs/path``.

    The root directory is created on the first put. A store whose root does not
    exist yet lists as empty. Two stores (or processes) may share one root; puts of the
    same name then race and the last ``os.replace`` wins, whole.

    Args:
        root: the directory holding the objects; relative paths are made absolute now.
    """

    __slots__ = ("_root",)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        text = os.fspath(root)
        if not text:
            raise ValueError("FileSystemBlobStore needs a root directory, got ''")
        if "\x00" in text:
            raise ValueError(f"FileSystemBlobStore root {text!r} contains NUL")
        self._root = os.path.abspath(text)

    @property
    def root(self) -> str:
        """The absolute root directory."""
        return self._root

    @property
    def url(self) -> str:
        """``file://`` URL of the root directory."""
        return "file://" + urllib.parse.quote(self._root)

    # -- helpers -------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        check_name(name)
        if _PARTIAL.match(name.rsplit("/", 1)[-1]):
            raise ValueError(
                f"blob name {name!r} matches '.<name>.<16 hex>.partial', which {self.url} reserves for "
                "in-progress writes; choose another name"
            )
        return os.path.join(self._root, *name.split("/"))

    def _error(self, exc: OSError, action: str, name: str, path: str) -> BlobStoreError:
        """Translate an ``OSError`` into a ``BlobStoreError`` naming the path and a remedy (the one place)."""
        code = exc.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            hint = "the disk (or quota) is full; free space or move the blob store to a larger volume"
        elif code in (errno.EACCES, errno.EPERM):
            hint = (
                f"permission denied; make {self._root} and everything below it writable by this user "
                f"(uid {os.geteuid()}) or choose another blob_store directory"
            )
        elif code == errno.EROFS:
            hint = "the file system is read-only; remount it read-write or choose another blob_store directory"
        elif code in (errno.ENOTDIR, errno.EEXIST) and os.path.lexists(self._root) and not os.path.isdir(self._root):
            hint = (
                f"the blob store root {self._root} is not a directory; remove or rename what is there, "
                "or choose another blob_store directory"
            )
        elif code in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY):
            hint = (
                "a name conflicts with an existing object or directory: on a file system one name "
                "cannot be both an object and the prefix directory of another (like 'a' and 'a/b'); "
                "rename one of them"
            )
        elif code == errno.ENAMETOOLONG:
            hint = "a path segment is too long for this file system; use shorter names"
        else:
            hint = "check the disk and the directory's health (dmesg), then retry"
        detail = exc.strerror or str(exc)
        where = exc.filename if isinstance(exc.filename, str) else path
        return BlobStoreError(f"{self.url}: cannot {action} {name!r} ({where}): {detail}; {hint}")

    async def _run(self, func: Callable[..., _T], *args: object) -> _T:
        self._check_open()
        return await asyncio.to_thread(func, *args)

    # -- put -----------------------------------------------------------------------------

    def _ensure_dir(self, directory: str) -> None:
        """Create ``directory`` and missing parents, fsyncing each new entry's parent."""
        if os.path.isdir(directory):
            return
        missing: list[str] = []
        current = directory
        while not os.path.isdir(current):
            missing.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise
                continue  # created concurrently by another put
            _fsync_dir(os.path.dirname(path))

    def _put_sync(self, name: str, path: str, data: bytes) -> None:
        self._put_with(name, path, lambda f: f.write(data))

    def _put_file_sync(self, name: str, path: str, src: str) -> None:
        try:
            source = open(src, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise BlobStoreError(f"{self.url}: cannot read {src} to store it as {name!r}: {exc}") from exc
        with source:
            self._put_with(name, path, lambda f: shutil.copyfileobj(source, f, _COPY_CHUNK))

    def _put_with(self, name: str, path: str, write: Callable[[BinaryIO], object]) -> None:
        directory, base = os.path.split(path)
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.partial")
        try:
            # A concurrent delete may remove the (then empty) directory between our mkdir and
            # open; it only does so when empty, so trying again is enough.
            for attempt in range(5):
                self._ensure_dir(directory)
                try:
                    fd = os.open(tmp, _FILE_FLAGS, 0o644)
                    break
                except FileNotFoundError:
                    if attempt == 4:
                        raise
            try:
                with open(fd, "wb", closefd=True) as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(directory)
        except OSError as exc:
            raise self._error(exc, "write", name, path) from exc

    async def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` to a temp file, fsync, rename over ``name``, fsync the directory.

        Raises:
            BlobStoreError: the disk is full, permission was denied, or ``name``
                conflicts with a directory; the message names the path.
        """
        path = self._path(name)
        payload = check_data(name, data)
        await self._run(self._put_sync, name, path, payload)

    async def put_file(self, name: str, path: str) -> None:
        """Copy the file ``path`` to ``name`` (1 MiB at a time), atomically and durably like :meth:`put`.

        Raises:
            BlobStoreError: ``path`` cannot be read, or writing failed as in :meth:`put`.
        """
        dest = self._path(name)
        await self._run(self._put_file_sync, name, dest, path)

    # -- get / exists --------------------------------------------------------------------

    def _get_sync(self, name: str, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            if exc.errno in _MISSING:
                raise BlobNotFoundError(f"{self.url}: no object {name!r} ({path})") from exc
            raise self._error(exc, "read", name, path) from exc

    def _get_file_sync(self, name: str, path: str, dest: str) -> None:
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            if exc.errno in _MISSING:
                raise BlobNotFoundError(f"{self.url}: no object {name!r} ({path})") from exc
            raise self._error(exc, "read", name, path) from exc
        with source:
            try:
                with open(dest, "wb") as out:
                    shutil.copyfileobj(source, out, _COPY_CHUNK)
            except OSError as exc:
                raise BlobStoreError(f"{self.url}: cannot copy {name!r} ({path}) to {dest}: {exc}") from exc

    async def get_file(self, name: str, path: str) -> None:
        """Copy ``name`` to the local file ``path`` (1 MiB at a time).

        Raises:
            BlobNotFoundError: no such file.
            BlobStoreError: reading or writing failed.
        """
        src = self._path(name)
        await self._run(self._get_file_sync, name, src, path)

    async def get(self, name: str) -> bytes:
        """Return the content of ``name``.

        Raises:
            BlobNotFoundError: no such file (a directory does not count as an object).
            BlobStoreError: reading failed, e.g. permission denied.
        """
        path = self._path(name)
        return await self._run(self._get_sync, name, path)

    def _exists_sync(self, name: str, path: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except OSError as exc:
            if exc.errno in _MISSING:
                return False
            raise self._error(exc, "look up", name, path) from exc

    async def exists(self, name: str) -> bool:
        """Return whether ``name`` is a regular file under the root."""
        path = self._path(name)
        return await self._run(self._exists_sync, name, path)

    # -- list ----------------------------------------------------------------------------

    def _list_sync(self, prefix: str) -> list[str]:
        # Walk only below the deepest directory the prefix names: "cp/0001" starts at cp/.
        head, _, _ = prefix.rpartition("/")
        start = os.path.join(self._root, *head.split("/")) if head else self._root
        names: list[str] = []
        stack = [(start, head + "/" if head else "")]
        while stack:
            directory, rel = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR) and directory == start:
                    if os.path.lexists(self._root) and not os.path.isdir(self._root):
                        # the root replaced by a file: an error, not "no checkpoints" (recovery
                        # would restore empty state)
                        raise self._error(exc, "list", prefix, self._root) from exc
                    return []
                if exc.errno == errno.ENOENT:
                    continue  # removed by a concurrent delete
                raise self._error(exc, "list", prefix, directory) from exc
            for entry in entries:
                name = rel + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if name.startswith(prefix) or prefix.startswith(name + "/"):
                            stack.append((entry.path, name + "/"))
                    elif entry.is_file() and name.startswith(prefix) and not _PARTIAL.match(entry.name):
                        names.append(name)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise self._error(exc, "list", prefix, entry.path) from exc
        names.sort()
        return names

    async def list(self, prefix: str = "") -> list[str]:
        """Walk the tree below ``prefix`` and return the object names, sorted.

        Raises:
            BlobStoreError: a directory could not be read (the message names it).
        """
        check_prefix(prefix)
        return await self._run(self._list_sync, prefix)

    # -- delete --------------------------------------------------------------------------

    def _delete_sync(self, name: str, path: str) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return
            if exc.errno == errno.EISDIR or (exc.errno == errno.EPERM and os.path.isdir(path)):
                return  # a directory-like prefix of other names is not an object
            raise self._error(exc, "delete", name, path) from exc
        directory = os.path.dirname(path)
        try:
            _fsync_dir(directory)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise self._error(exc, "delete", name, path) from exc
            # a concurrent delete emptied and pruned the directory: the entry is gone with it
        while directory != self._root:
            try:
                os.rmdir(directory)  # only succeeds when empty
            except OSError:
                break
            directory = os.path.dirname(directory)

    async def delete(self, name: str) -> None:
        """Unlink ``name`` (missing is fine) and prune directories it left empty.

        Raises:
            BlobStoreError: the file exists but could not be removed.
        """
        path = self._path(name)
        await self._run(self._delete_sync, name, path)
