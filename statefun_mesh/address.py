"""Type names and function addresses."""

from __future__ import annotations

from operator import itemgetter as _itemgetter
from typing import Final

from .errors import TypeNameError

__all__ = ["Address", "SdkAddress", "check_id", "parse_typename"]


def parse_typename(typename: str) -> tuple[str, str]:
    """Split ``"namespace/name"`` at its last ``/``.

    Raises:
        TypeNameError: (a ``ValueError``) the name is not a non-empty ``str`` of the
            form ``namespace/name`` with both parts non-empty.
    """
    if not isinstance(typename, str):
        raise TypeNameError(f"a type name must be a str of the form 'namespace/name', got {type(typename).__name__}")
    pos = typename.rfind("/")
    if pos <= 0 or pos == len(typename) - 1:
        raise TypeNameError(f"malformed type name {typename!r}: expected 'namespace/name', e.g. 'example/greeter'")
    if "\x00" in typename:
        raise TypeNameError(f"malformed type name {typename!r}: NUL characters are not allowed")
    return typename[:pos], typename[pos + 1 :]


def check_id(id: object, what: str = "target_id") -> str:
    """Return ``id`` if it is a non-empty ``str``; raise ``TypeError``/``ValueError`` otherwise."""
    if not isinstance(id, str):
        raise TypeError(f"{what} must be a str, got {type(id).__name__}")
    if not id:
        raise ValueError(f"{what} can not be missing")
    if not id.isascii():
        try:
            id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{what} is not valid Unicode text (it holds a lone surrogate at {exc.start})") from None
    return id


class Address(tuple[str, str]):
    """The address of one function instance: its type name and its id.

    Instances are virtual: every address exists and costs nothing until it receives
    a message.

    An immutable value (``typename``, ``id``; equal and hashing alike when both are
    equal). It is a 2-tuple underneath, so that the dispatcher can make one per
    address group for the cost of a tuple (issue 9); only ``typename``, ``id``,
    ``namespace``, ``name``, equality, hashing, ``str`` and ``repr`` are its API.
    """

    __slots__ = ()

    def __new__(cls, typename: str, id: str) -> Address:
        return tuple.__new__(cls, (typename, id))

    def __getnewargs__(self) -> tuple[str, str]:
        # pickle and copy call cls.__new__(cls, *these): the two fields, not one tuple
        return (self[0], self[1])

    typename = property(_itemgetter(0), doc="The type name, ``namespace/name``.")
    id = property(_itemgetter(1), doc="The id of the instance.")

    @property
    def namespace(self) -> str:
        """The part of the type name before the last ``/``."""
        t = self[0]
        return t[: t.rfind("/")]

    @property
    def name(self) -> str:
        """The part of the type name after the last ``/``."""
        t = self[0]
        return t[t.rfind("/") + 1 :]

    def __str__(self) -> str:
        return f"{self[0]}/{self[1]}"

    def __repr__(self) -> str:
        return f"Address(typename={self[0]!r}, id={self[1]!r})"


#: ``make_address(Address, (typename, id))``: an :class:`Address` from a 2-tuple without
#: calling ``Address.__new__`` (the dispatcher's per-group fast path; no checks)
make_address: Final = tuple.__new__


class SdkAddress(Address):
    """StateFun's address type: ``SdkAddress(namespace, name, id, typename)``.

    The same value as :class:`Address` (``context.address`` and ``context.caller`` are
    ``Address`` objects with the same four attributes), constructed with StateFun's
    fields: ``typename`` may be left out, and if given must be ``namespace/name``. An
    ``SdkAddress`` equals, and hashes like, the ``Address`` with the same type and id.
    """

    __slots__ = ()

    def __new__(cls, namespace: str, name: str, id: str, typename: str | None = None) -> SdkAddress:
        if not isinstance(namespace, str) or not isinstance(name, str):
            raise TypeError("namespace and name must be str")
        joined = f"{namespace}/{name}"
        if typename is None:
            typename = joined
        elif typename != joined:
            raise ValueError(f"typename {typename!r} does not match namespace {namespace!r} and name {name!r}")
        parse_typename(typename)
        if typename.rfind("/") != len(namespace):
            raise ValueError(f"the name {name!r} of an address can not contain '/'")
        return tuple.__new__(cls, (typename, id))

    def __getnewargs__(self) -> tuple[str, str, str, str]:  # type: ignore[override]
        return (self.namespace, self.name, self[1], self[0])

    def __repr__(self) -> str:
        return (
            f"SdkAddress(namespace={self.namespace!r}, name={self.name!r}, id={self.id!r}, typename={self.typename!r})"
        )
