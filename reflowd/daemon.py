"""reflowd's process: one instance per state directory, a socket, the engine.

Startup order: take the state-directory lock (refuse if another reflowd holds
it, saying where it runs), open the store, recover unfinished runs, then
listen. SIGTERM/SIGINT (or the ``shutdown`` command): stop accepting, let
the engine stop, flush the store, exit 0. Jobs keep running; the next
daemon re-attaches to them. SIGHUP re-reads the configuration file and never
stops the daemon. The socket is removed on every way out once it was made.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import SocketListener

from reflow_client.config import Config, ConfigError, load_config

from . import systemd
from .cache_store import CacheError, CacheStore, cache_path, open_cache
from .clusters import ClusterRuntime, build_cluster
from .engine.engine import Engine, EngineSettings
from .server import Server, connection_cap
from .store import Store, StoreError

log = structlog.get_logger("reflowd")

VERSION = "0.1.0"

#: How long a thread holding the GIL runs before a waiting one is let in (CPython's default: 5 ms). The
#: store's writer and the file readers release the GIL for their I/O and need it back to hand each result to
#: the loop; behind a busy loop each hand-back waited up to the whole interval, and a commit takes four or
#: five of them. At 1 ms a 10^5-element fan-out ran 5-9 % faster and pings' 99th percentile halved (10 ms).
SWITCH_INTERVAL_S = 0.001


def tune_interpreter() -> None:
    """Settings of the daemon's own process (never of a user's script that embeds the engine)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


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


def raise_fd_limit(ceiling: int = 1 << 20) -> tuple[int, int]:
    """Raise the soft descriptor limit toward the hard one (every connection and job costs descriptors);
    the (old, new) soft limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            pass
    return soft, soft


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
        self._owns_socket = False
        self._socket_id: tuple[int, int] | None = None

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

        try:  # a hangup while starting must not kill us either (the receiver below takes over)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        except ValueError:
            pass  # not the main thread (an embedding test): signals are not ours to handle
        lock = await anyio.to_thread.run_sync(claim)
        old_limit, fd_limit = raise_fd_limit()
        cache = CacheStore(cache_path(self.state_dir), origin="daemon")  # shared with embedded runs
        store = Store(self.state_dir / "reflowd.sqlite", cache=cache)
        try:
            if systemd.activation_socket() is None:  # say "socket in use" before any work, as a plain error
                await anyio.to_thread.run_sync(_remove_stale_socket, self.socket_path)
            try:
                await store.open()
                await open_cache(cache, adopt=store.path)
            except (StoreError, CacheError) as exc:
                raise DaemonError(str(exc)) from None
            self.engine = Engine(store, self._build_clusters(), self.options.settings)
            self.server = Server(self, max_connections=connection_cap())
            if fd_limit != old_limit:
                log.debug("raised the descriptor limit", soft=fd_limit, was=old_limit)
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.run_writer)
                tg.start_soon(cache.run_writer)
                tg.start_soon(self._signals)  # before recovery: a SIGTERM then still stops cleanly
                await tg.start(self.engine.run)
                listener = await self._listen()
                tg.start_soon(self.server.serve, listener)
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
                    try:
                        await store.close()
                    finally:
                        await cache.close()
                    self._remove_socket()
                    lock.release()
        log.info("reflowd stopped")
        return 0

    def _remove_socket(self) -> None:
        """Remove the socket this daemon made (never systemd's, never one another process now owns)."""
        if not getattr(self, "_owns_socket", False) or self._socket_id is None:
            return
        try:
            info = self.socket_path.lstat()
            if (info.st_dev, info.st_ino) == self._socket_id:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the socket", socket=str(self.socket_path), error=str(exc))
        self._socket_id = None

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
        info = self.socket_path.lstat()
        self._socket_id = (info.st_dev, info.st_ino)
        self._owns_socket = True
        return listener

    async def _signals(self) -> None:
        """SIGTERM/SIGINT stop the daemon; SIGHUP re-reads the configuration and never stops it."""
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload_config()
                    continue
                self.request_shutdown(signal.Signals(signum).name)
                return

    async def reload_config(self) -> None:
        """Re-read the configuration file: the default cluster changes at once; changed clusters are
        reported (their connections and jobs belong to the running engine, so they need a restart)."""
        try:
            config = await anyio.to_thread.run_sync(load_config, self.config.path)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded; keeping the running one", error=str(exc))
            return
        changed = sorted(n for n in set(config.clusters) | set(self.config.clusters)
                         if config.clusters.get(n) != self.config.clusters.get(n))
        usable = config.default_cluster in self.engine.clusters
        if usable:
            self.default_cluster = config.default_cluster
        log.info("SIGHUP: configuration reloaded", path=str(config.path), default_cluster=self.default_cluster)
        if changed or not usable:
            log.warning("SIGHUP: changes to these clusters take effect after a restart of reflowd",
                        clusters=changed or [config.default_cluster])

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            systemd.notify("WATCHDOG=1")
            await anyio.sleep(interval)

