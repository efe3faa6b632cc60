"""The one place that builds podwire's structlog loggers and decides their fields.

JSON lines when the output is not a terminal (in the cluster), readable lines on a terminal.
Secrets never reach a log line: fields that could carry one are refused here, once, rather
than trusted to every call site.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog

# Field names the code may use; keeping them here keeps logs queryable across components.
NODE, PEER, PUBLIC_KEY, ENDPOINT, ERROR, REASON = (
    "node",
    "peer",
    "public_key",
    "endpoint",
    "error",
    "reason",
)

# Never logged, whatever a call site passes: replaced by a marker so the omission is visible.
SECRET_FIELDS = frozenset({"private_key", "preshared_key", "key", "secret", "token", "raw"})
REDACTED = "<redacted>"


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for name in list(event):
        if name in SECRET_FIELDS or isinstance(event[name], bytes | bytearray):
            event[name] = REDACTED
    return event


def configure(
    *, level: str = "info", stream: TextIO | None = None, json: bool | None = None
) -> None:
    out = stream or sys.stdout
    as_json = not out.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


class _RotatingStream(io.TextIOBase):
    """A text stream onto a file that the standard library's RotatingFileHandler keeps
    bounded: past max_bytes the file becomes `<file>.1` (and so on) and a new one begins."""

    def __init__(self, path: str, *, max_bytes: int, backups: int) -> None:
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, text: str) -> int:
        line = text.rstrip("\n")
        if line:
            self._handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
        return len(text)

    def flush(self) -> None:
        self._handler.flush()

    def isatty(self) -> bool:
        return False


def rotating_file(path: str, *, max_bytes: int, backups: int = 1) -> TextIO:
    """A stream for configure() that keeps the log at path near max_bytes (per file kept)."""
    return cast(TextIO, _RotatingStream(path, max_bytes=max_bytes, backups=backups))


def get(component: str, **bound: Any) -> Any:
    """A logger for one component, with fields bound to every line it writes.

    Lazy: the configuration in force when it first logs applies, so a module-level logger made
    before configure() still writes JSON.
    """
    return structlog.get_logger(component, component=component, **bound)
