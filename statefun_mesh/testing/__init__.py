"""Test support for statefun_mesh users and implementers: shared conformance suites."""

from __future__ import annotations

from .transports import TransportFactory as TransportFactory
from .transports import check_transport as check_transport

__all__ = ["TransportFactory", "check_transport"]
