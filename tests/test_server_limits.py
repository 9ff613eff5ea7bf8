"""Issue #8, item 4: connection floods and descriptor exhaustion never end the listener.

The server runs in this process on a real Unix socket (with a stub daemon
that only answers ``ping`` and a test-only ``hold`` command that keeps a
connection busy), so the descriptor limit can be lowered around exactly the
accept loop; the flood against a real reflowd under a lowered hard limit is at
the end.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from reflow_client.client import Client
from reflowd import commands
from reflowd.server import Server, connection_cap

from .support import ROOT, DaemonProcess, wait_for

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"
PING = b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n'
HOLD = b'{"jsonrpc":"2.0","id":2,"method":"hold"}\n'


class _Store:
    writable = True
    write_error = None
    write_error_since = None


class _Engine:
    store = _Store()


class _Daemon:
    engine = _Engine()
    server = None
    release: anyio.Event


@pytest.fixture
def hold_command() -> Iterator[_Daemon]:
    """A command that keeps its connection busy until the test releases it."""
    daemon = _Daemon()

    @commands.command("hold", help="test only")
    async def hold(d: Any, p: dict[str, Any]) -> dict[str, Any]:
        await d.release.wait()
        return {"held": True}

    yield daemon
    commands.REGISTRY.pop("hold", None)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _reply(sock: socket.socket, timeout: float = 30) -> dict[str, Any] | None:
    """One reply line, or None if the server closed the connection."""
    buf = b""
    with anyio.fail_after(timeout):
        while b"\n" not in buf:
            await anyio.wait_readable(sock)
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def _client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.setblocking(False)
    return s


@pytest.mark.anyio
async def test_idle_connections_are_closed_oldest_first_at_the_cap(tmp_path: Path, hold_command: _Daemon) -> None:
    daemon = hold_command
    daemon.release = anyio.Event()
    path = tmp_path / "s.sock"
    server = Server(daemon, max_connections=3, idle_grace=0.0)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, await anyio.create_unix_listener(path))
        clients = []
        for _ in range(3):
            c = _client(path)
            c.sendall(PING)
            assert (await _reply(c))["result"]["pong"]  # type: ignore[index]
            clients.append(c)
        # A fourth client is served: the connection idle the longest (the first) makes room.
        fourth = _client(path)
        fourth.sendall(PING)
        assert (await _reply(fourth))["result"]["pong"]  # type: ignore[index]
        assert await _reply(clients[0]) is None, "the oldest idle connection was closed"
        clients[1].sendall(PING)
        assert (await _reply(clients[1]))["result"]["pong"], "the others stay"  # type: ignore[index]
        assert server.shed == 1
        # When every connection is busy, a newcomer is refused with a reason, quickly.
        for c in (clients[1], clients[2], fourth):
            c.sendall(HOLD)
        await wait_for_async(lambda: server.active_requests == 3)
        late = _client(path)
        late.sendall(PING)
        refused = await _reply(late, timeout=10)
        assert refused is not None and "too many connections" in refused["error"]["message"]
        daemon.release.set()
        for c in (clients[1], clients[2], fourth):
            assert (await _reply(c))["result"] == {"held": True}  # type: ignore[index]
        for c in [*clients, fourth, late]:
            c.close()
        tg.cancel_scope.cancel()


async def wait_for_async(condition: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_out_of_descriptors_the_accept_loop_backs_off_sheds_and_goes_on(tmp_path: Path,
                                                                              hold_command: _Daemon) -> None:
    daemon = hold_command
    daemon.release = anyio.Event()
    path = tmp_path / "s.sock"
    server = Server(daemon, max_connections=1000, idle_grace=0.2)  # type: ignore[arg-type]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_unix_listener(path)
        tg.start_soon(server.serve, listener)
        await anyio.sleep(0.05)  # the loop holds its spare descriptor
        # Client sockets exist before the limit drops; only the server's accept() needs new descriptors.
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(15)]
        candidates = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(12)]
        resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 4, hard))  # room for a few connections
        busy: list[socket.socket] = []
        try:
            # Phase 1: connections kept busy until the descriptors run out, so nothing can be shed: the next
            # one is refused cheaply (taken off the backlog and closed) and the loop backs off -- never stops.
            refused = None
            for c in candidates:
                c.connect(str(path))
                c.setblocking(False)
                c.sendall(HOLD)
                await wait_for_async(lambda: server.active_requests == len(busy) + 1 or server.refused > 0)
                if server.refused > 0:
                    refused = c
                    break
                busy.append(c)
            assert refused is not None and 1 <= len(busy) < len(candidates), len(busy)
            assert await _reply(refused, timeout=30) is None, "refused while every descriptor is busy"
            assert server.accept_errors > 0
            daemon.release.set()
            for c in busy:
                assert (await _reply(c))["result"] == {"held": True}  # type: ignore[index]
            # Phase 2: more clients than there is room for, one after another: each gets in, because the
            # connection idle the longest makes room.
            for c in idle:
                c.connect(str(path))
                c.setblocking(False)
                c.sendall(PING)
                reply = await _reply(c, timeout=60)
                assert reply is not None and reply["result"]["pong"] is True
            assert server.shed >= len(idle) - len(busy) - 1 and server.accept_errors > 1
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        fresh = _client(path)
        fresh.sendall(PING)
        assert (await _reply(fresh))["result"]["pong"]  # type: ignore[index]
        for c in [*idle, *candidates, fresh]:
            c.close()
        tg.cancel_scope.cancel()


def test_connection_cap_follows_the_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        assert connection_cap() == 64
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        assert connection_cap() == 8
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert connection_cap() == 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------------- a real reflowd under a lowered limit


def _limit_fds(n: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))  # hard too: the daemon cannot raise it

    return apply


def _daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_descriptor_flood_under_a_lowered_limit(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\nmax_workers = 2\n')
    d.start(preexec=_limit_fds(128))
    assert d.proc is not None
    flood: list[socket.socket] = []
    try:
        for _ in range(1500):  # more connections than the daemon has descriptors, held open
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(str(d.socket))
            flood.append(s)
        assert d.proc.poll() is None, d.log()[-3000:]
        assert _daemon_fds(d.proc.pid) <= 128
        with Client(d.socket, timeout=60) as c:  # a real client still gets in
            assert c.ping()["pong"] is True
            server = c.stats()["server"]
            assert server["max_connections"] == 64 and server["idle_closed"] > 1000
        # Half of the flood sends a half frame and stays: still nothing stops the daemon.
        for s in flood[::2]:
            try:
                s.sendall(b'{"jsonrpc": "2.0", "id": 1, "meth')
            except OSError:
                pass  # closed by the daemon already
        result = d.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "run"), "--n", "3", "--no-daemon",
                       "--json", "--wait", timeout=180)
        assert result.returncode == 0, result.stderr
        assert d.proc.poll() is None
    finally:
        for s in flood:
            s.close()
    with d.client() as c:
        assert c.ping()["pong"] is True
    assert d.stop() == 0


def test_the_daemon_raises_its_own_soft_limit(tmp_path: Path) -> None:
    def low_soft() -> None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    d = DaemonProcess(tmp_path / "d", config="")
    d.start(preexec=low_soft)
    try:
        assert d.proc is not None
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        soft = int(line.split()[3])
        assert soft == min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 20), line
    finally:
        d.stop()


# ---------------------------------------------------------------------- signals and the socket


def test_sighup_reloads_and_never_kills(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\n')
    d.start()
    assert d.proc is not None
    try:
        d.config_path.write_text('[clusters.local]\nscheduler = "local"\n[clusters.other]\nscheduler = "slurm"\n')
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in d.log(), timeout=30, what="the reload to be logged")
        assert "take effect after a restart" in d.log() and "other" in d.log()
        d.config_path.write_text("this is [not toml")
        for _ in range(5):
            d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration not reloaded" in d.log(), timeout=30, what="the bad config to be reported")
        assert d.proc.poll() is None and d.answers()
        d.config_path.write_text('[clusters.local]\nscheduler = "local"\n')  # the client reads it too
        result = d.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "run"), "--n", "2", "--no-daemon",
                       "--wait", timeout=180)
        assert result.returncode == 0, result.stderr
    finally:
        code = d.stop()
    assert code == 0 and not d.socket.exists()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "shutdown"])
def test_the_socket_is_removed_on_every_clean_exit(tmp_path: Path, how: str) -> None:
    d = DaemonProcess(tmp_path / "d", config="")
    d.start()
    assert d.proc is not None and d.socket.exists()
    if how == "shutdown":
        d.cli("shutdown", check=True)
    else:
        d.proc.send_signal(getattr(signal, how))
    assert d.proc.wait(timeout=60) == 0
    assert not d.socket.exists()


def test_a_refused_second_daemon_leaves_the_first_ones_socket_alone(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config="")
    d.start()
    try:
        other = subprocess.run([sys.executable, "-m", "reflowd", "--state-dir", str(tmp_path / "other")],
                               env=d.env, capture_output=True, text=True, timeout=60)
        assert other.returncode == 1 and "already listens on" in other.stderr
        assert "Traceback" not in other.stderr and len(other.stderr.strip().splitlines()) == 1, other.stderr
        assert d.socket.exists() and d.answers()
    finally:
        d.stop()


_ASYNC_CLIENT = """
import sys, anyio
from reflow_client.client import AsyncClient

async def main():
    async with AsyncClient(sys.argv[1], timeout=30) as conn:
        print((await conn.ping())["pong"], flush=True)
        sys.stdin.readline()  # the test says: the daemon has closed this connection
        print((await conn.ping())["pong"], flush=True)

anyio.run(main)
"""


@pytest.mark.anyio
async def test_a_client_whose_idle_connection_the_daemon_closed_reconnects(tmp_path: Path) -> None:
    """A script that submits, waits longer than the daemon's idle timeout on its own watch, then asks for the
    status used to fail with "no reflowd is running" (the 10,000-element benchmark's 77-minute run did).
    The async client runs in its own process, as it would against a real daemon."""
    daemon = _Daemon()
    path = tmp_path / "s.sock"
    server = Server(daemon, idle_timeout=0.2, idle_grace=0.0)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, await anyio.create_unix_listener(path))
        sync = Client(path, timeout=30)
        assert (await anyio.to_thread.run_sync(sync.ping))["pong"]
        await wait_for_async(lambda: not server.live)  # the daemon closed the idle connection
        assert (await anyio.to_thread.run_sync(sync.ping))["pong"]
        assert (await anyio.to_thread.run_sync(sync.ping))["pong"], "a live connection is kept and used"
        sync.close()
        async with await anyio.open_process([sys.executable, "-c", _ASYNC_CLIENT, str(path)], cwd=ROOT) as child:
            assert child.stdin is not None and child.stdout is not None
            lines = BufferedByteReceiveStream(child.stdout)
            with anyio.fail_after(60):
                assert await lines.receive_until(b"\n", 100) == b"True"
                await wait_for_async(lambda: not server.live)
                await child.stdin.send(b"go\n")
                assert await lines.receive_until(b"\n", 100) == b"True"
                assert await child.wait() == 0
        tg.cancel_scope.cancel()
