"""Throttled logging: one line per kind of repeated problem, then a summary.

Bad input can arrive at line rate (a fuzzer, a misconfigured client, a full disk that
fails every batch). Logging each occurrence floods the log and costs more CPU than the
problem itself, so repeated warnings of one *kind* are summarised: the first of a kind
is logged as it comes, later ones within ``window`` seconds are only counted, and the
count is logged as ``"... and 10,482 more <kind> in the last 10 s"`` when the window
closes (at the next occurrence after it, or at the next :meth:`ThrottledLog.flush`,
which a peer calls from its heartbeat loop so a burst's summary is never lost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["DEFAULT_WINDOW", "JsonFormatter", "ThrottledLog", "format_seconds"]

DEFAULT_WINDOW: Final = 10.0


class _Kind:
    __slots__ = ("level", "opened", "suppressed")

    def __init__(self, level: int, opened: float) -> None:
        self.level = level
        self.opened = opened
        self.suppressed = 0


class ThrottledLog:
    """Log repeated warnings of one kind once per window, with a count of the rest.

    Args:
        logger: where the lines go.
        window: seconds during which further lines of a kind are only counted.
        clock: monotonic seconds (injectable for tests).
    """

    __slots__ = ("_clock", "_kinds", "logger", "window")

    def __init__(
        self, logger: logging.Logger, window: float = DEFAULT_WINDOW, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.window = window
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def log(self, level: int, kind: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        """Log ``msg % args`` unless ``kind`` was logged less than ``window`` seconds ago.

        Returns:
            True if the line was written, False if it was counted for the summary.
        """
        now = self._clock()
        k = self._kinds.get(kind)
        if k is not None and now - k.opened < self.window:
            k.suppressed += 1
            return False
        if k is not None:
            self._summarise(kind, k, now)
        self._kinds[kind] = _Kind(level, now)
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def warning(self, kind: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, kind, msg, *args, **kwargs)

    def error(self, kind: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        """:meth:`log` at ERROR."""
        return self.log(logging.ERROR, kind, msg, *args, **kwargs)

    def flush(self) -> None:
        """Write the summary of every kind whose window has closed; forget quiet kinds."""
        now = self._clock()
        for kind, k in list(self._kinds.items()):
            if now - k.opened >= self.window:
                self._summarise(kind, k, now)
                del self._kinds[kind]

    def _summarise(self, kind: str, k: _Kind, now: float) -> None:
        if k.suppressed:
            self.logger.log(k.level, "... and %s more %s in the last %.0f s", f"{k.suppressed:,}", kind, now - k.opened)
            k.suppressed = 0


def format_seconds(seconds: float) -> str:
    """A duration for people: ``10`` for 9.9996, ``1.5``, ``0.25``, ``0.004`` (no float noise)."""
    text = f"{seconds:.{2 if abs(seconds) >= 1 else 3}f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``,
    plus ``source`` (e.g. ``"peer-0"``) when given and ``exception`` when there is one.

    For log collectors (Loki, Elasticsearch, CloudWatch): a message that spans lines, or a
    traceback, stays one record.
    """

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source

    def format(self, record: logging.LogRecord) -> str:
        import datetime
        import json

        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.source:
            doc["source"] = self.source
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)
