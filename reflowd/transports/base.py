"""The transport seam: how the daemon runs commands and moves files on a cluster.

Scheduler adapters only build argv lists and parse text; a transport runs
them, here (``LocalTransport``) or over SSH (``SSHTransport``). Every call
takes a timeout. A transport failure (connection down, timeout) raises
``TransportError`` so callers can answer "unknown" instead of guessing.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class TransportError(Exception):
    """The command or file operation could not be carried out; its outcome is unknown."""


class CommandTimeout(TransportError):
    """The command did not finish within its timeout."""


class HostKeyError(TransportError):
    """The remote host key is unknown or has changed. Never retried automatically."""


class AuthenticationError(TransportError):
    """The remote host refused our credentials. Never retried automatically."""


@dataclass(frozen=True)
class CommandResult:
    """What a finished command printed, and how it exited."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class TransportHealth:
    """Reachability of a cluster, for ``status`` (``unreachable since ...``)."""

    reachable: bool = True
    down_since: float | None = None
    last_error: str | None = None
    last_ok: float | None = None
    reconnects: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def mark_ok(self) -> None:
        self.reachable = True
        self.down_since = None
        self.last_ok = time.time()

    def mark_down(self, error: str) -> None:
        if self.reachable or self.down_since is None:
            self.down_since = time.time()
        self.reachable = False
        self.last_error = error

    def to_dict(self) -> dict[str, object]:
        return {
            "reachable": self.reachable,
            "down_since": self.down_since,
            "last_error": self.last_error,
            "last_ok": self.last_ok,
            "reconnects": self.reconnects,
            **self.extra,
        }


class Transport(abc.ABC):
    """Run commands and move files on one cluster."""

    #: Short name for logs ("local", "ssh:user@host:port").
    name: str = "transport"

    def __init__(self) -> None:
        self.health = TransportHealth()
        #: Counters for ``status``/``stats`` (commands, SFTP operations, connections, ...).
        self.stats: dict[str, float] = {}

    @abc.abstractmethod
    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> CommandResult:
        """Run *argv* (never through an unquoted shell); a non-zero exit is a result, not an error.

        ``idempotent=False`` (a submission) forbids the transport to re-run the
        command by itself after a connection loss: it raises TransportError and
        the caller resolves the outcome by the submission tag.
        """

    @abc.abstractmethod
    async def read_files(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bytes | None]:
        """Read many files in one go; a missing file maps to None."""

    @abc.abstractmethod
    async def write_files(self, files: Mapping[str, bytes], *, timeout: float = 60.0, mode: int = 0o644) -> None:
        """Write many files atomically each (temp file + rename), creating parent directories."""

    @abc.abstractmethod
    async def listdir(self, path: str, *, timeout: float = 30.0) -> list[str]:
        """Names in a directory; an absent directory is empty."""

    @abc.abstractmethod
    async def exists(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bool]:
        """Whether each path exists."""

    @abc.abstractmethod
    async def makedirs(self, paths: Sequence[str], *, timeout: float = 30.0) -> None:
        """Create directories (and parents); existing ones are fine."""

    async def read_file(self, path: str, *, timeout: float = 30.0) -> bytes | None:
        return (await self.read_files([path], timeout=timeout))[path]

    async def write_file(self, path: str, data: bytes, *, timeout: float = 60.0, mode: int = 0o644) -> None:
        await self.write_files({path: data}, timeout=timeout, mode=mode)

    async def check(self, *, timeout: float = 30.0) -> None:
        """Raise TransportError (HostKeyError, AuthenticationError, ...) unless the cluster answers."""
        result = await self.run(["true"], timeout=timeout)
        if not result.ok:
            raise TransportError(f"{self.name}: 'true' exited {result.returncode}: {result.stderr.strip()}")

    async def aclose(self) -> None:
        """Release connections; idempotent."""
