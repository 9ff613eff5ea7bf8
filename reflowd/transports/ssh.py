"""Commands and files on a remote cluster over one pooled SSH connection (asyncssh).

* **One connection per cluster**, opened on first use, kept alive with SSH
  keepalives, re-established with exponential backoff and jitter after a drop.
  While the cluster is down every call fails fast with ``TransportError`` (the
  engine reads that as "unknown": nothing is concluded from an outage) and
  ``health`` says since when and why.
* **Channels are capped** below the server's ``MaxSessions`` (OpenSSH: 10; the
  11th channel open fails): commands beyond the cap queue on a semaphore. The
  SFTP session holds one channel for the connection's lifetime.
* **Retries are the transport's only for idempotent work**: a query that was
  in flight when the connection dropped is run again on the new connection; a
  submission (``idempotent=False``) is not -- the caller resolves it by its tag.
* **Host keys are always verified** (``known_hosts`` from the cluster config,
  else ``~/.ssh/known_hosts``); an unknown or changed key raises
  :class:`HostKeyError` saying how to check and accept it. A refused key raises
  :class:`AuthenticationError`. Both are retried only slowly (a user may fix
  them while the daemon runs) and never hidden.
* **Files go through SFTP**, many requests in flight on the one channel: a poll
  cycle's result reads cost round trips, not processes. Writes are atomic
  (temporary name, then ``posix-rename``).
* Commands are argv lists joined with :func:`shlex.join`: nothing reaches the
  remote shell unquoted.
"""

from __future__ import annotations

import os
import random
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import asyncssh
import structlog

from .base import AuthenticationError, CommandResult, CommandTimeout, HostKeyError, Transport, TransportError

log = structlog.get_logger("reflowd.ssh")

T = TypeVar("T")

#: SFTP requests kept in flight at once on the one SFTP channel.
SFTP_PARALLEL = 32

#: What a call sees when the connection under it goes away.
_CONNECTION_ERRORS = (asyncssh.ConnectionLost, asyncssh.DisconnectError, ConnectionError)


@dataclass(frozen=True)
class SSHSettings:
    """How to reach one cluster; from ``[clusters.NAME]``."""

    host: str
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    proxy_jump: str | None = None
    max_channels: int = 8
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    connect_timeout: float = 20.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0

    @property
    def known_hosts_path(self) -> str:
        return os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")

    @property
    def label(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}"


@dataclass(frozen=True)
class JumpHost:
    host: str
    port: int = 22
    user: str | None = None


def parse_jump(spec: str) -> list[JumpHost]:
    """``[user@]host[:port]``, comma-separated for a chain, as OpenSSH's ``ProxyJump``."""
    hops = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        user, _, rest = part.rpartition("@")
        host, port = rest, 22
        if rest.startswith("["):  # [ipv6]:port
            host, _, tail = rest[1:].partition("]")
            if tail.startswith(":"):
                port = _port(tail[1:], spec)
        elif rest.count(":") == 1:
            host, _, port_text = rest.partition(":")
            port = _port(port_text, spec)
        if not host:
            raise ValueError(f"proxy_jump {spec!r}: a hop has no host (expected [user@]host[:port])")
        hops.append(JumpHost(host=host, port=port, user=user or None))
    if not hops:
        raise ValueError(f"proxy_jump {spec!r} names no host (expected [user@]host[:port])")
    return hops


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"proxy_jump {spec!r}: {text!r} is not a port number")
    return int(text)


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [base/2, base]: reconnecting daemons do not stampede."""
    base = min(maximum, initial * (2 ** max(0, failures - 1)))
    return (rng or random).uniform(base / 2, base)


def remote_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """One shell-safe command line; environment through ``env`` (servers rarely AcceptEnv)."""
    if not argv:
        raise ValueError("empty command")
    prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
    return shlex.join([*prefix, *argv])


def host_key_message(settings: SSHSettings, host: str, port: int, detail: str, offered: str | None) -> str:
    target = host if port == 22 else f"[{host}]:{port}"
    keyscan = f"ssh-keyscan{'' if port == 22 else f' -p {port}'} {shlex.quote(host)}"
    offered_text = f" The server offered {offered}." if offered else ""
    return (
        f"the host key of {target} is not trusted: it is missing from, or differs from the entry in, "
        f"{settings.known_hosts_path} ({detail}).{offered_text} Check the fingerprint with your site's "
        f"documentation, then accept it with '{keyscan} >> {settings.known_hosts_path}' (or connect once "
        f"with ssh and answer yes); if the key changed, remove the old line with "
        f"'ssh-keygen -R \"{target}\" -f {settings.known_hosts_path}' first. reflowd never accepts host keys by itself."
    )


def auth_message(settings: SSHSettings, host: str, detail: str) -> str:
    key = f"the key {settings.identity_file}" if settings.identity_file else "your SSH agent's and default keys"
    return (
        f"{settings.user + '@' if settings.user else ''}{host} refused {key} ({detail}). Check 'identity_file' "
        f"and 'user' in the cluster's config, and that the public key is in ~/.ssh/authorized_keys on the "
        f"cluster (try: ssh -p {settings.port} {'-i ' + settings.identity_file + ' ' if settings.identity_file else ''}"
        f"{settings.label.rsplit(':', 1)[0]} true)."
    )


async def _abandon(process: asyncssh.SSHClientProcess[bytes]) -> bool:
    """Stop a command we no longer wait for (timeout, cancellation); True when its channel is gone.

    OpenSSH keeps a session -- and its slot under MaxSessions -- until the command
    exits, even after the client closed the channel, and many servers refuse the
    "signal" request that would kill it (Debian 12's sshd does). So a False here
    means a server slot may stay taken: the transport then recycles the connection.
    """
    with anyio.CancelScope(shield=True):
        try:
            process.send_signal("KILL")
        except Exception:  # the channel or connection is already gone
            pass
        process.close()
        with anyio.move_on_after(1):
            await process.wait_closed()
            return True
    return False


class _Dropped(Exception):
    """The connection went away under a call; retry on a new one if the work is idempotent."""


class SSHTransport(Transport):
    """The transport for a cluster reached over SSH."""

    def __init__(self, settings: SSHSettings) -> None:
        super().__init__()
        if settings.max_channels < 2:
            raise ValueError("max_channels must be at least 2 (one for SFTP, one for commands)")
        self.settings = settings
        self.name = f"ssh:{settings.label}"
        self._jumps = parse_jump(settings.proxy_jump) if settings.proxy_jump else []
        self._conn: asyncssh.SSHClientConnection | None = None
        self._tunnels: list[asyncssh.SSHClientConnection] = []
        self._sftp: asyncssh.SFTPClient | None = None
        self._generation = 0  # bumped on every new connection
        self._connect_lock = anyio.Lock()
        self._sftp_lock = anyio.Lock()
        # SFTP keeps one channel open for good: commands get the rest.
        self._channels = anyio.Semaphore(settings.max_channels - 1)
        self._epoch = 0  # bumped whenever the connection is dropped: counters below belong to one epoch
        self._inflight = 0  # commands running on the current connection
        self._stranded = 0  # abandoned commands that may still hold a server session on it
        self._failures = 0
        self._next_attempt = 0.0
        self._last_exc: TransportError | None = None
        self._closed = False
        self._dirs: set[str] = set()  # directories known to exist on this connection
        self.stats.update(commands=0, command_seconds=0.0, sftp_ops=0, connects=0)

    # ------------------------------------------------------------------ connection

    def _alive(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def _options(self, host: str, port: int, user: str | None) -> dict[str, Any]:
        s = self.settings
        opts: dict[str, Any] = {
            "host": host,
            "port": port,
            "known_hosts": s.known_hosts_path,
            "keepalive_interval": s.keepalive_interval,
            "keepalive_count_max": s.keepalive_count_max,
            "connect_timeout": s.connect_timeout,
            "login_timeout": s.connect_timeout,
        }
        if user:
            opts["username"] = user
        if s.identity_file:
            opts["client_keys"] = [os.path.expanduser(s.identity_file)]
        return opts

    async def _open(self) -> asyncssh.SSHClientConnection:
        tunnels: list[asyncssh.SSHClientConnection] = []
        tunnel: asyncssh.SSHClientConnection | None = None
        hop_host, hop_port = self.settings.host, self.settings.port
        try:
            for hop in self._jumps:
                hop_host, hop_port = hop.host, hop.port
                opts = self._options(hop.host, hop.port, hop.user or self.settings.user)
                if tunnel is not None:
                    opts["tunnel"] = tunnel
                tunnel = await asyncssh.connect(**opts)
                tunnels.append(tunnel)
            hop_host, hop_port = self.settings.host, self.settings.port
            opts = self._options(self.settings.host, self.settings.port, self.settings.user)
            if tunnel is not None:
                opts["tunnel"] = tunnel
            conn = await asyncssh.connect(**opts)
        except BaseException as exc:
            offered = None
            if isinstance(exc, asyncssh.HostKeyNotVerifiable):  # ask for the key through the same tunnel
                offered = await self._offered_key(hop_host, hop_port, tunnels[-1] if tunnels else None)
            for t in reversed(tunnels):
                t.close()
            if isinstance(exc, asyncssh.HostKeyNotVerifiable):
                raise HostKeyError(host_key_message(self.settings, hop_host, hop_port, str(exc), offered)) from None
            if isinstance(exc, (asyncssh.PermissionDenied, asyncssh.KeyImportError)):
                raise AuthenticationError(auth_message(self.settings, hop_host, str(exc))) from None
            if isinstance(exc, (OSError, asyncssh.Error, TimeoutError)):
                raise TransportError(f"cannot connect to {hop_host}:{hop_port}: {exc or type(exc).__name__}") from None
            raise
        self._tunnels = tunnels
        return conn

    async def _offered_key(self, host: str, port: int, tunnel: asyncssh.SSHClientConnection | None) -> str | None:
        """The key the server showed, to quote its fingerprint in the error (best effort)."""
        try:
            with anyio.fail_after(5):
                key = await asyncssh.get_server_host_key(host, port, tunnel=tunnel if tunnel is not None else ())
        except Exception:
            return None
        return f"{key.get_algorithm()} key {key.get_fingerprint()}" if key is not None else None

    async def _connection(self, *, force: bool = False) -> asyncssh.SSHClientConnection:
        """The live connection, opening one if due; fails fast during backoff."""
        if self._alive() and not self._recycle_due():
            assert self._conn is not None
            return self._conn
        async with self._connect_lock:
            if self._alive() and not self._recycle_due():
                assert self._conn is not None
                return self._conn
            if self._alive():
                log.info("recycling the connection: abandoned commands may still hold server sessions",
                         transport=self.name, stranded=self._stranded)
            if self._closed:
                raise TransportError(f"{self.name}: transport closed")
            now = time.monotonic()
            if not force and now < self._next_attempt and self._last_exc is not None:
                wait = self._next_attempt - now
                raise type(self._last_exc)(f"{self._last_exc} (next attempt in {wait:.0f} s)")
            self._drop_locked()
            try:
                with anyio.fail_after(self.settings.connect_timeout + 5):
                    conn = await self._open()
            except TimeoutError:
                raise self._failed(TransportError(f"cannot connect to {self.settings.label}: timed out")) from None
            except TransportError as exc:
                raise self._failed(exc) from None
            self._conn = conn
            self._generation += 1
            self._failures = 0
            self._last_exc = None
            self.stats["connects"] += 1
            self.health.extra.pop("next_attempt_in", None)
            if self._generation > 1:
                self.health.reconnects += 1
                log.info("reconnected", transport=self.name, generation=self._generation)
            self.health.mark_ok()
            return conn

    def _recycle_due(self) -> bool:
        """Abandoned sessions only go away with their connection: renew it once nothing else runs on it."""
        return self._stranded > 0 and self._inflight == 0

    def _failed(self, exc: TransportError) -> TransportError:
        self._failures += 1
        slow = isinstance(exc, (HostKeyError, AuthenticationError))
        delay = self.settings.backoff_max if slow else backoff_delay(
            self._failures, self.settings.backoff_initial, self.settings.backoff_max)
        self._next_attempt = time.monotonic() + delay
        self._last_exc = exc
        self.health.mark_down(str(exc))
        self.health.extra["next_attempt_in"] = round(delay, 1)
        log.warning("cluster unreachable", transport=self.name, error=str(exc), retry_in=round(delay, 1))
        return exc

    def _drop_locked(self) -> list[asyncssh.SSHClientConnection]:
        """Close the connection and its tunnels; returns them so a caller may wait for them to close."""
        conns = [c for c in [self._conn, *reversed(self._tunnels)] if c is not None]
        for conn in conns:
            conn.close()
        self._conn = None
        self._tunnels = []
        self._sftp = None
        self._epoch += 1
        self._inflight = 0
        self._stranded = 0
        self._dirs.clear()
        return conns

    def _lost(self, generation: int, error: str) -> None:
        """A call saw the connection die: forget it (once per generation) and mark the outage."""
        if generation == self._generation and self._conn is not None:
            log.warning("connection lost", transport=self.name, error=error)
            self._drop_locked()
            self._next_attempt = 0.0  # the first reconnect is immediate; backoff starts if it fails
            self.health.mark_down(f"connection lost: {error}")

    async def _with_retry(self, work: Callable[[asyncssh.SSHClientConnection], Awaitable[T]], *,
                          idempotent: bool, what: str) -> T:
        attempts = 2 if idempotent else 1
        for attempt in range(attempts):
            conn = await self._connection()
            generation = self._generation
            try:
                result = await work(conn)
            except _Dropped as exc:
                self._lost(generation, str(exc.__cause__ or exc))
                if attempt + 1 < attempts:
                    continue
                raise TransportError(f"{self.name}: connection lost during {what}: {exc.__cause__ or exc}") from None
            self.health.mark_ok()
            return result
        raise AssertionError("unreachable")

    async def check(self, *, timeout: float = 30.0) -> None:
        """Connect now (ignoring backoff) and run ``true``: submit-time proof that the cluster is usable."""
        with anyio.fail_after(timeout):
            await self._connection(force=True)
        await super().check(timeout=timeout)

    async def aclose(self) -> None:
        async with self._connect_lock:
            self._closed = True
            conns = self._drop_locked()
        with anyio.move_on_after(5), anyio.CancelScope(shield=True):
            for conn in conns:
                await conn.wait_closed()

    # ------------------------------------------------------------------ commands

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> CommandResult:
        command = remote_command(argv, env)

        async def once(conn: asyncssh.SSHClientConnection) -> CommandResult:
            async with self._channels:
                started = time.monotonic()
                try:
                    completed = await self._exec(conn, command, stdin, timeout)
                except TimeoutError:
                    raise CommandTimeout(f"{argv[0]} on {self.settings.host} did not finish within {timeout:.0f} s") \
                        from None
                except asyncssh.ChannelOpenError as exc:
                    if conn.is_closed() or self._stranded:  # our abandoned sessions fill the server's slots
                        raise _Dropped() from exc
                    raise TransportError(f"{self.name}: the server refused a channel for {argv[0]}: {exc.reason}. "
                                         "Lower the cluster's max_channels below the server's MaxSessions") from None
                except _CONNECTION_ERRORS as exc:
                    raise _Dropped() from exc
                self.stats["commands"] += 1
                self.stats["command_seconds"] += time.monotonic() - started
            if completed.exit_status is None and completed.exit_signal is None:
                # The channel closed without an exit status: the session died (connection lost or killed).
                raise _Dropped() from TransportError(f"{argv[0]}: no exit status")
            return CommandResult(
                -1 if completed.exit_status is None else completed.exit_status,  # killed by a signal
                (completed.stdout or b"").decode("utf-8", "replace"),
                (completed.stderr or b"").decode("utf-8", "replace"),
            )

        return await self._with_retry(once, idempotent=idempotent, what=argv[0])

    async def _exec(self, conn: asyncssh.SSHClientConnection, command: str, stdin: bytes | None,
                    timeout: float) -> asyncssh.SSHCompletedProcess:
        process: asyncssh.SSHClientProcess[bytes] | None = None
        epoch = self._epoch
        self._inflight += 1
        try:
            with anyio.fail_after(timeout):
                process = await conn.create_process(
                    command, encoding=None, **({"input": stdin} if stdin is not None else {"stdin": asyncssh.DEVNULL}))
                return await process.wait(check=False)
        finally:
            if process is not None and process.exit_status is None and process.exit_signal is None:
                if not await _abandon(process) and epoch == self._epoch:
                    self._stranded += 1
            if epoch == self._epoch:
                self._inflight -= 1

    # ------------------------------------------------------------------ files

    async def _sftp_client(self, conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
        if self._sftp is not None:
            return self._sftp
        async with self._sftp_lock:
            if self._sftp is None:
                try:
                    self._sftp = await conn.start_sftp_client()
                except asyncssh.ChannelOpenError as exc:
                    if conn.is_closed():
                        raise _Dropped() from exc
                    raise TransportError(f"{self.name}: cannot open an SFTP session: {exc.reason}") from None
                except _CONNECTION_ERRORS as exc:
                    raise _Dropped() from exc
            return self._sftp

    async def _files(self, what: str, timeout: float, op: Callable[[asyncssh.SFTPClient], Awaitable[T]]) -> T:
        """Run an SFTP operation with a timeout; file work is idempotent, so a drop is retried once."""

        async def once(conn: asyncssh.SSHClientConnection) -> T:
            try:
                with anyio.fail_after(timeout):
                    return await op(await self._sftp_client(conn))
            except TimeoutError:
                raise CommandTimeout(f"{what} on {self.settings.host} did not finish within {timeout:.0f} s") from None
            except (asyncssh.SFTPConnectionLost, *_CONNECTION_ERRORS) as exc:
                raise _Dropped() from exc
            except asyncssh.SFTPError as exc:
                if conn.is_closed():
                    raise _Dropped() from exc
                raise TransportError(f"{what} on {self.settings.host}: {exc.reason}") from None

        return await self._with_retry(once, idempotent=True, what=what)

    @staticmethod
    async def _gather(items: Sequence[Any], fn: Callable[[Any], Awaitable[T]]) -> list[T]:
        """Many SFTP requests in flight on the one channel (bounded)."""
        out: list[Any] = [None] * len(items)
        errors: list[Exception] = []
        limiter = anyio.CapacityLimiter(SFTP_PARALLEL)

        async def one(i: int, item: Any) -> None:
            async with limiter:
                if errors:  # one failure fails the batch: start nothing new
                    return
                try:
                    out[i] = await fn(item)
                except Exception as exc:  # re-raised bare below, so callers can map SFTP errors
                    errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i, item in enumerate(items):
                tg.start_soon(one, i, item)
        if errors:
            raise errors[0]
        return out

    async def read_files(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bytes | None]:
        items = list(dict.fromkeys(paths))

        async def op(sftp: asyncssh.SFTPClient) -> dict[str, bytes | None]:
            async def read(path: str) -> bytes | None:
                self.stats["sftp_ops"] += 1
                try:
                    async with sftp.open(path, "rb") as fh:
                        return await fh.read()
                except asyncssh.SFTPNoSuchFile:
                    return None

            return dict(zip(items, await self._gather(items, read)))

        return await self._files(f"reading {len(items)} file(s)", timeout, op)

    async def write_files(self, files: Mapping[str, bytes], *, timeout: float = 60.0, mode: int = 0o644) -> None:
        items = list(files.items())

        async def op(sftp: asyncssh.SFTPClient) -> None:
            await self._makedirs(sftp, sorted({os.path.dirname(p) for p, _ in items if os.path.dirname(p)}))

            async def write(item: tuple[str, bytes]) -> None:
                path, data = item
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
                self.stats["sftp_ops"] += 1
                try:
                    async with sftp.open(tmp, "wb", attrs=asyncssh.SFTPAttrs(permissions=mode)) as fh:
                        await fh.write(data)
                    await sftp.chmod(tmp, mode)  # the server's umask may have narrowed it
                    await sftp.posix_rename(tmp, path)
                except BaseException as exc:
                    if isinstance(exc, (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath)):
                        self._dirs.clear()  # a directory we made was removed: make it again next time
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        try:
                            await sftp.remove(tmp)
                        except Exception:
                            pass
                    raise

            await self._gather(items, write)

        await self._files(f"writing {len(items)} file(s)", timeout, op)

    async def _makedirs(self, sftp: asyncssh.SFTPClient, dirs: Sequence[str]) -> None:
        for path in dirs:
            if path in self._dirs:
                continue
            self.stats["sftp_ops"] += 1
            await sftp.makedirs(path, exist_ok=True)
            self._dirs.add(path)

    async def makedirs(self, paths: Sequence[str], *, timeout: float = 30.0) -> None:
        dirs = list(paths)

        async def op(sftp: asyncssh.SFTPClient) -> None:
            await self._makedirs(sftp, dirs)

        await self._files(f"creating {len(dirs)} directorie(s)", timeout, op)

    async def listdir(self, path: str, *, timeout: float = 30.0) -> list[str]:
        async def op(sftp: asyncssh.SFTPClient) -> list[str]:
            self.stats["sftp_ops"] += 1
            try:
                names = await sftp.listdir(path)
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                return []
            return [n for n in names if n not in (".", "..")]

        return await self._files(f"listing {path}", timeout, op)

    async def exists(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bool]:
        items = list(dict.fromkeys(paths))

        async def op(sftp: asyncssh.SFTPClient) -> dict[str, bool]:
            async def one(path: str) -> bool:
                self.stats["sftp_ops"] += 1
                return bool(await sftp.exists(path))

            return dict(zip(items, await self._gather(items, one)))

        return await self._files(f"checking {len(items)} path(s)", timeout, op)
