"""A real OpenSSH server on 127.0.0.1 as a pytest fixture (``tests/cluster/sshd.sh``).

``sshd_server`` is session-scoped: one sshd on a free high port with its own
host key, a user key generated for the test, ``authorized_keys`` and
``known_hosts`` in a private directory. Fault tests use its handles: ``stop``
/ ``start`` the listener, and ``kill_connections`` to kill the server-side
processes serving established connections (what a crashing or rebooting login
node does to us).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sshd.sh")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


@dataclass
class SSHServer:
    dir: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def user(self) -> str:
        return getpass.getuser()

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def _script(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        result = self._script("start", str(self.dir), str(self.port))
        if result.returncode != 0:
            raise RuntimeError(f"sshd did not start: {result.stderr[-1500:]}")
        self._listener = self.listener_pid()

    def stop(self, *, drop_connections: bool = False) -> None:
        """Stop the listener; with *drop_connections* also kill the established sessions (a host going down)."""
        serving = self.connection_pids() if drop_connections else []
        result = self._script("stop", str(self.dir))
        if result.returncode != 0:
            raise RuntimeError(f"sshd did not stop: {result.stderr[-1500:]}")
        for pid in serving:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def running(self) -> bool:
        return self._script("status", str(self.dir)).returncode == 0

    def listener_pid(self) -> int:
        return int((self.dir / "sshd.pid").read_text().strip())

    def connection_pids(self) -> list[int]:
        """sshd processes serving established connections (descendants of the listener)."""
        tree = _children()
        out: list[int] = []
        stack = list(tree.get(self._listener, []))
        while stack:
            pid = stack.pop()
            if _comm(pid).startswith("sshd"):
                out.append(pid)
            stack.extend(tree.get(pid, []))
        return out

    def kill_connections(self) -> list[int]:
        pids = self.connection_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def config_table(self, name: str = "remote", *, scheduler: str = "slurm", **extra: object) -> str:
        """A ``[clusters.NAME]`` table reaching this server with the test keys."""
        lines = [
            f"[clusters.{name}]",
            f'scheduler = "{scheduler}"',
            f'host = "{self.host}"',
            f"port = {self.port}",
            f'user = "{self.user}"',
            f'identity_file = "{self.key}"',
            f'known_hosts = "{self.known_hosts}"',
        ]
        for key, value in extra.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, dict):
                inner = ", ".join(f'{k} = "{v}"' for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            else:
                lines.append(f"{key} = {value}")
        return "\n".join(lines) + "\n"


def _unavailable() -> str | None:
    if not os.path.exists("/usr/sbin/sshd"):
        if os.getuid() != 0 or shutil.which("apt-get") is None:
            return "no /usr/sbin/sshd and no way to install openssh-server (needs root and apt-get)"
        result = subprocess.run([str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            return f"cannot install openssh-server: {result.stderr[-1000:]}"
    return None


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> SSHServer:
    why = _unavailable()
    if why:
        pytest.skip(why)
    server = SSHServer(dir=tmp_path_factory.mktemp("sshd"), port=free_port())
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def sshd(sshd_server: SSHServer) -> SSHServer:
    """The session's sshd, running again at the start of every test (a fault test may have stopped it)."""
    if not sshd_server.running():
        sshd_server.start()
    return sshd_server
