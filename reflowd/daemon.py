"""reflowd's process: one instance per state directory, a socket, the engine.

Startup order: take the state-directory lock (refuse if another reflowd holds
it, saying where it runs), open the store, recover unfinished runs, then
listen. SIGTERM/SIGINT (or the ``shutdown`` command): stop accepting, let
the engine stop, flush the store, exit 0. Jobs keep running; the next
daemon re-attaches to them.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import SocketListener

from reflow_client.config import Config, ConfigError

from . import systemd
from .clusters import ClusterRuntime, build_cluster
from .engine.engine import Engine, EngineSettings
from .server import Server
from .store import Store

log = structlog.get_logger("reflowd")

VERSION = "0.1.0"


class DaemonError(RuntimeError):
    """reflowd cannot start; the message says why and what to do."""


@dataclass
class DaemonOptions:
    socket_path: Path
    state_dir: Path
    config: Config
    settings: EngineSettings = field(default_factory=EngineSettings)


class StateLock:
    """An exclusive flock on ``<state_dir>/reflowd.lock`` held for the daemon's lifetime."""

    def __init__(self, state_dir: Path, socket_path: Path) -> None:
        self.path = state_dir / "reflowd.lock"
        self.socket_path = socket_path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise DaemonError(
                f"another reflowd (pid {holder.get('pid', '?')}) already uses state directory {self.path.parent}; "
                f"it serves {holder.get('socket', '?')}. Stop it first ('reflow-client shutdown') "
                "or start this one with another --state-dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "socket": str(self.socket_path)}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def prepare_dir(path: Path, what: str) -> None:
    """Create *path* 0700 and check nobody else can use it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise DaemonError(f"{what} {path} belongs to uid {info.st_uid}, not to you; pick another location")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)


def _remove_stale_socket(path: Path) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise DaemonError(f"{path} exists and is not a socket; remove it or use another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a leftover from a crash
        return
    finally:
        probe.close()
    raise DaemonError(f"something already listens on {path}; is another reflowd running with another state dir?")


class Daemon:
    """Everything one reflowd process owns."""

    version = VERSION

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.socket_path = options.socket_path
        self.state_dir = options.state_dir
        self.config = options.config
        self.default_cluster = options.config.default_cluster
        self.engine: Engine
        self.server: Server | None = None
        self._stop = anyio.Event()
        self.stop_reason = ""

    def request_shutdown(self, reason: str) -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    def _build_clusters(self) -> dict[str, ClusterRuntime]:
        clusters = {}
        for name, cfg in self.config.clusters.items():
            try:
                clusters[name] = build_cluster(cfg)
            except ConfigError as exc:
                raise DaemonError(str(exc)) from None
        return clusters

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        def claim() -> StateLock:
            prepare_dir(self.state_dir, "state directory")
            prepare_dir(self.socket_path.parent, "socket directory")
            lock = StateLock(self.state_dir, self.socket_path)
            lock.acquire()
            return lock

        lock = await anyio.to_thread.run_sync(claim)
        store = Store(self.state_dir / "reflowd.sqlite")
        listener = None
        try:
            await store.open()
            self.engine = Engine(store, self._build_clusters(), self.options.settings)
            self.server = Server(self)
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.run_writer)
                await tg.start(self.engine.run)
                listener = await self._listen()
                tg.start_soon(self.server.serve, listener)
                tg.start_soon(self._signals)
                tg.start_soon(self._watchdog)
                systemd.notify("READY=1")
                log.info("reflowd ready", socket=str(self.socket_path), state_dir=str(self.state_dir),
                         clusters=sorted(self.engine.clusters), pid=os.getpid())
                task_status.started()
                await self._stop.wait()
                log.info("reflowd stopping", reason=self.stop_reason)
                systemd.notify("STOPPING=1")
                await self.server.drain(timeout=5.0)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    if hasattr(self, "engine"):
                        await self.engine.close()
                finally:
                    await store.close()
                    if listener is not None and systemd.activation_socket() is None:
                        try:
                            self.socket_path.unlink()
                        except FileNotFoundError:
                            pass
                    lock.release()
        log.info("reflowd stopped")
        return 0

    async def _listen(self) -> Any:
        activated = systemd.activation_socket()
        if activated is not None:
            return await SocketListener.from_socket(activated)  # a coroutine in anyio 4
        await anyio.to_thread.run_sync(_remove_stale_socket, self.socket_path)
        old = os.umask(0o077)
        try:
            listener = await anyio.create_unix_listener(self.socket_path, mode=0o600)
        finally:
            os.umask(old)
        return listener

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.request_shutdown(signal.Signals(signum).name)
                return

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            systemd.notify("WATCHDOG=1")
            await anyio.sleep(interval)

