"""Structured logs: JSON lines for files, readable text on a TTY, journal entries under systemd.

Under systemd (``JOURNAL_STREAM`` names our stderr) each event becomes one journal
entry. Where journald's native socket is reachable, the entry carries structured
fields (``PRIORITY``, ``RUN_ID``, ``TASK``, ``CLUSTER``, ``JOB_ID``, ...), so
``journalctl --user -u reflowd RUN_ID=...`` filters by run, and a traceback stays
inside its event's ``MESSAGE``. Otherwise the event is one ``<N>event key=value``
line on stderr: journald reads the ``<N>`` prefix as the priority, and multi-line
values are escaped so one event stays one entry. Both leave time and pid to journald.
"""

from __future__ import annotations

import json as _json
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

#: structlog level -> syslog priority (sd-daemon(3)): journald shows and filters on these.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2, "fatal": 2}

#: Where journald takes native entries; REFLOW_JOURNAL_SOCKET points elsewhere (a test's private journal namespace).
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "reflowd"
#: Field names journald or journalctl give a meaning of their own: ours are prefixed with REFLOW_ instead.
_RESERVED_FIELDS = frozenset({
    "MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO", "INVOCATION_ID",
    "USER_INVOCATION_ID", "SYSLOG_FACILITY", "SYSLOG_IDENTIFIER", "SYSLOG_PID", "SYSLOG_TIMESTAMP", "SYSLOG_RAW",
    "DOCUMENTATION", "TID", "UNIT", "USER_UNIT", "OBJECT_PID", "COREDUMP_UNIT", "COREDUMP_USER_UNIT",
})

_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:@+,")


def journal_stream_matches(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
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


def _split(event_dict: MutableMapping[str, Any]) -> tuple[int, str, dict[str, Any]]:
    fields = dict(event_dict)
    level = str(fields.pop("level", "info"))
    fields.pop("timestamp", None)
    event = str(fields.pop("event", "")).replace("\r", " ").replace("\n", " | ")
    return PRIORITIES.get(level, 6), event, {k: v for k, v in fields.items() if v is not None}


def render_journal_line(event_dict: MutableMapping[str, Any]) -> str:
    """``<N>event key=value ...`` (pure): the priority prefix, the event, then its fields in order, on one line."""
    priority, event, fields = _split(event_dict)
    return " ".join([f"<{priority}>{event}", *(f"{key}={_value(value)}" for key, value in fields.items())])


def field_name(key: str) -> str:
    """A structlog key as a journal field name: upper case, ``[A-Z0-9_]``, not starting with ``_`` or a digit."""
    name = re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_")
    if not name or name[0].isdigit() or name in _RESERVED_FIELDS:
        name = "REFLOW_" + name
    return name[:64]


def journal_fields(event_dict: MutableMapping[str, Any]) -> list[tuple[str, str]]:
    """The native journal entry for one event (pure): MESSAGE as on the stream, the fields one by one.

    A traceback (``exception``) goes into MESSAGE on lines of its own, which the native protocol keeps
    within the one entry.
    """
    priority, event, fields = _split(event_dict)
    exception = fields.pop("exception", None)
    message = " ".join([event, *(f"{key}={_value(value)}" for key, value in fields.items())])
    if exception:
        message += "\n" + str(exception).rstrip("\n")
    entry = [("MESSAGE", message), ("PRIORITY", str(priority)), ("SYSLOG_IDENTIFIER", IDENTIFIER)]
    entry += [(field_name(key), value if isinstance(value, str) else _json.dumps(value, default=str))
              for key, value in fields.items()]
    if exception:
        entry.append(("REFLOW_EXCEPTION", str(exception)))
    return entry


def encode_journal(entry: list[tuple[str, str]]) -> bytes:
    """journald's native datagram format: ``KEY=value\\n``, or for values with newlines ``KEY\\n<le64 size>value\\n``."""
    out = bytearray()
    for key, value in entry:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """Sends each event to journald's native socket; falls back to a ``<N>`` line on the stream if that fails."""

    def __init__(self, address: str, stream: TextIO) -> None:
        self.address = address
        self.stream = stream
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # journald reads fast; a bounded wait keeps a stuck journal from stalling the event loop for long.
        self.sock.settimeout(1.0)

    def msg(self, entry: tuple[bytes, str]) -> None:
        datagram, line = entry
        try:
            self.sock.sendto(datagram, self.address)
        except OSError:  # gone, too large for one datagram, or stuck: the stream still reaches the journal
            print(line, file=self.stream, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _journal_line_renderer(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
    return render_journal_line(event_dict)


def _journal_entry_renderer(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
    return ((encode_journal(journal_fields(event_dict)), render_journal_line(event_dict)),), {}


def native_journal_socket(env: Mapping[str, str] | None = None) -> str | None:
    address = (os.environ if env is None else env).get("REFLOW_JOURNAL_SOCKET") or JOURNAL_SOCKET
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(address)  # a socket file with nobody behind it is refused here
        return address
    except OSError:
        return None


def configure(level: str = "info", *, json: bool | None = None, stream: TextIO | None = None,
              journal: bool | None = None) -> None:
    """Set up structlog once for this process.

    ``journal=None`` with ``json=None`` picks the journal when *stream* is journald's
    (``JOURNAL_STREAM``), else JSON unless *stream* is a terminal.
    """
    out = stream or sys.stderr
    if journal is None:
        journal = json is None and journal_stream_matches(out)
    as_json = (not out.isatty()) if json is None else json
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    factory: Any = structlog.PrintLoggerFactory(file=out)
    if journal:
        processors.append(structlog.processors.format_exc_info)
        address = native_journal_socket()
        if address is not None:
            logger = JournalLogger(address, out)
            processors.append(_journal_entry_renderer)
            factory = lambda *args: logger  # noqa: E731
        else:
            processors.append(_journal_line_renderer)
    elif as_json:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=False),
                       structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=False), structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=factory,
        cache_logger_on_first_use=True,  # a logger built per call cost 16% of the engine's time
    )
