"""Flink durations as StateFun's module.yaml writes them (``"1 min"``, ``"10s"``, ``"500ms"``,
or a number of milliseconds). Owned here so that every module.yaml reader (remote
endpoints, Kafka components) parses them one way without importing each other.
"""

from __future__ import annotations

import re
from typing import Final

from .errors import ConfigError

__all__ = ["parse_duration"]

_UNITS: Final = {
    "ns": 1e-9,
    "nano": 1e-9,
    "nanos": 1e-9,
    "nanosecond": 1e-9,
    "nanoseconds": 1e-9,
    "µs": 1e-6,
    "us": 1e-6,
    "micro": 1e-6,
    "micros": 1e-6,
    "microsecond": 1e-6,
    "microseconds": 1e-6,
    "ms": 1e-3,
    "milli": 1e-3,
    "millis": 1e-3,
    "millisecond": 1e-3,
    "milliseconds": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_DURATION_RE: Final = re.compile(r"^\s*(\d+)\s*([a-zA-Zµ]*)\s*$")


def parse_duration(value: object, *, key: str = "", source: str | None = None) -> float:
    """A Flink duration (``"1 min"``, ``"10s"``, ``"500ms"``, or a number of milliseconds) in seconds.

    Raises:
        ConfigError: not a duration, an unknown unit, or zero.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"expected a duration such as '10 sec' or '1 min', got {value!r}", source=source, key=key)
    m = _DURATION_RE.match(str(value))
    if m is None:
        raise ConfigError(f"expected a duration such as '10 sec' or '1 min', got {value!r}", source=source, key=key)
    unit = m.group(2).lower() or "ms"
    if unit not in _UNITS:
        raise ConfigError(
            f"unknown time unit {m.group(2)!r} in {value!r} (use ms, s/sec, min, h, d)", source=source, key=key
        )
    seconds = int(m.group(1)) * _UNITS[unit]
    if seconds <= 0:
        raise ConfigError(f"a timeout must be larger than 0, got {value!r}", source=source, key=key)
    return seconds
