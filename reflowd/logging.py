"""Structured logs: JSON lines for files, readable text on a TTY, one ``<N>``-prefixed line per event for journald.

Under systemd, stderr is a stream to journald (``JOURNAL_STREAM`` names it). journald
reads a leading ``<N>`` as the syslog priority of the line and stamps time and pid
itself, so the journal format is ``<N>event key=value ...`` with no timestamp, and
anything multi-line (a traceback) is folded into one line so one event stays one
journal entry: ``journalctl --user -u reflowd -p warning`` then shows exactly the
warnings and errors.
"""

from __future__ import annotations

import json as _json
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

#: structlog level -> syslog priority (sd-daemon(3)): journald shows and filters on these.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2, "fatal": 2}

_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:@+,")


def journal_stream_matches(stream: TextIO, env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Whether *stream* is the journald connection systemd announced in ``JOURNAL_STREAM`` (``dev:inode``)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return info.st_dev == int(dev) and info.st_ino == int(ino)


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else _json.dumps(value, default=str, separators=(",", ":"))
    if text and all(c in _BARE for c in text):
        return text
    return _json.dumps(text)  # quoted, with newlines escaped: the event stays on one line


def render_journal_line(event_dict: MutableMapping[str, Any]) -> str:
    """``<N>event key=value ...`` (pure): the priority prefix, the event, then its fields in order."""
    fields = dict(event_dict)
    level = str(fields.pop("level", "info"))
    fields.pop("timestamp", None)
    event = str(fields.pop("event", "")).replace("\r", " ").replace("\n", " | ")
    parts = [f"<{PRIORITIES.get(level, 6)}>{event}"]
    parts += [f"{key}={_value(value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


def _journal_renderer(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
    return render_journal_line(event_dict)


def configure(level: str = "info", *, json: bool | None = None, stream: TextIO | None = None,
              journal: bool | None = None) -> None:
    """Set up structlog once for this process.

    ``journal=None`` with ``json=None`` picks the journal format when *stream* is
    journald's (``JOURNAL_STREAM``), else JSON unless *stream* is a terminal.
    """
    out = stream or sys.stderr
    if journal is None:
        journal = json is None and journal_stream_matches(out)
    as_json = (not out.isatty()) if json is None else json
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if journal:
        processors += [structlog.processors.format_exc_info, _journal_renderer]
    elif as_json:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=False),
                       structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=False), structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
