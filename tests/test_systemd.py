"""reflowd under systemd's own tools, without systemd as PID 1.

* socket activation through ``systemd-socket-activate`` (what reflowd.socket does);
* ``Type=notify``: READY=1 only after recovery, WATCHDOG=1 from the event loop,
  STOPPING=1 on shutdown, read from a real ``NOTIFY_SOCKET`` datagram socket;
* logs through a real journald (a private journal namespace) with priorities.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from reflow_client.client import Client
from reflow_client.config import parse_config
from reflowd import systemd
from reflowd.daemon import Daemon, DaemonOptions
from reflowd.logging import encode_journal, field_name, journal_fields, render_journal_line
from reflowd.service import ServiceSpec, render_units

from .support import ROOT, DaemonProcess, wait_for

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"
LOCAL_CONFIG = '[clusters.local]\nscheduler = "local"\nmax_workers = 2\n'
# Under CI (.ci/run installs Debian's systemd package) a missing tool fails instead of skipping.
_IN_CI = bool(os.environ.get("CI") or os.environ.get("REFLOW_CI"))
needs_socket_activate = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None and not _IN_CI,
                                           reason="systemd-socket-activate is missing (Debian package systemd)")


class NotifySocket:
    """A NOTIFY_SOCKET as systemd makes one: a Unix datagram socket the service writes sd_notify messages to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self._closed = False
        self._thread: threading.Thread | None = None

    def drain(self) -> list[str]:
        """Every message already queued (sendto has returned for each), without waiting."""
        got = []
        self.sock.setblocking(False)
        while True:
            try:
                got.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        self.messages += got
        return got

    def wait_for(self, message: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock.setblocking(True)
        while message not in self.messages:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {message!r} within {timeout} s (got {self.messages[-10:]!r})")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass

    def collect(self, on_message: Callable[[str], None] | None = None) -> None:
        """Receive in a thread from now on, as systemd does: the kernel queues only ~10 datagrams
        (net.unix.max_dgram_qlen), and a sender's non-blocking sd_notify drops what does not fit."""
        self.sock.settimeout(0.2)

        def loop() -> None:
            while not self._closed:
                try:
                    message = self.sock.recv(4096).decode()
                except (TimeoutError, OSError):
                    continue
                if on_message is not None:
                    on_message(message)
                self.messages.append(message)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def seen(self, message: str) -> bool:
        return message in self.messages

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


def unit_value(text: str, key: str) -> str:
    return next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "="))


def _submit_slow_run(d: DaemonProcess, run_dir: Path) -> str:
    result = d.cli("submit", str(COUNTING), "--run-dir", str(run_dir), "--no-daemon", "--json",
                   "--n", "2", "--delay", "120", check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["run_id"]


@needs_socket_activate
def test_socket_activation_readiness_watchdog_and_stopping(tmp_path: Path, notify_socket: NotifySocket) -> None:
    # A run left unfinished by a killed daemon, so the activated one has something to recover.
    first = DaemonProcess(tmp_path / "d", config=LOCAL_CONFIG)
    first.start()
    run_dir = tmp_path / "run"
    try:
        run_id = _submit_slow_run(first, run_dir)
        wait_for(lambda: len((run_dir / "executions.txt").read_text().splitlines()) >= 3
                 if (run_dir / "executions.txt").exists() else False, timeout=120, what="both slow elements to start")
    finally:
        first.kill9()

    # Run exactly what `reflowd service install` writes: the units' ListenStream=, ExecStart= and Environment=.
    units = render_units(ServiceSpec(python=os.path.abspath(sys.executable), socket=str(first.socket),
                                     state_dir=str(first.state_dir), config=str(first.config_path),
                                     path=os.environ.get("PATH", "/usr/bin:/bin")))
    listen = unit_value(units["reflowd.socket"], "ListenStream")
    exec_start = shlex.split(unit_value(units["reflowd.service"], "ExecStart"))
    environment = [shlex.split(line)[0] for line in units["reflowd.service"].splitlines() if line.startswith("Environment=")]
    assert listen == str(first.socket) and exec_start[0] == os.path.abspath(sys.executable)
    cmd = ["systemd-socket-activate", "-l", listen, "-E", f"HOME={tmp_path}"]
    for assignment in [*(e.split("=", 1)[1] for e in environment), f"NOTIFY_SOCKET={notify_socket.path}",
                       "WATCHDOG_USEC=400000"]:
        cmd += ["-E", assignment]
    cmd += exec_start
    log_path = tmp_path / "activated.log"
    first.socket.unlink()  # the killed daemon's leftover; systemd, too, replaces a stale socket file when it binds
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: "Listening on" in log_path.read_text(), timeout=30, what="systemd-socket-activate to listen")
        inode = first.socket.stat().st_ino
        # Nothing runs until a client connects: the process is still systemd-socket-activate.
        assert "systemd-socket-activate" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert notify_socket.drain() == []

        log_at_ready: list[str] = []
        notify_socket.collect(lambda m: m == "READY=1" and log_at_ready.append(log_path.read_text()))
        with Client(first.socket, timeout=120) as client:  # the first connection starts reflowd, which serves it
            hello = client.hello()
        assert hello["pid"] == proc.pid, "socket-activate execs reflowd in place"
        # READY=1 went out, and only after recovery (the log line right after it follows "recovered runs").
        wait_for(lambda: notify_socket.seen("READY=1"), timeout=30, what="READY=1")
        assert '"recovered runs"' in log_at_ready[0], "READY=1 came before recovery had finished"
        log_text = log_path.read_text()
        assert log_text.index('"recovered runs"') < log_text.index('"reflowd ready"')
        assert json.loads(next(line for line in log_text.splitlines() if '"recovered runs"' in line))["runs"] == 1
        with Client(first.socket, timeout=30) as client:
            assert client.status(run_id).state == "running"

        # WATCHDOG=1 every WATCHDOG_USEC/2 (0.2 s) from the running daemon.
        before = notify_socket.messages.count("WATCHDOG=1")
        wait_for(lambda: notify_socket.messages.count("WATCHDOG=1") >= before + 3, timeout=60, what="three watchdog pings")

        # A second daemon cannot steal the socket: neither with another state directory ...
        other = subprocess.run([sys.executable, "-m", "reflowd", "--socket", str(first.socket),
                                "--state-dir", str(tmp_path / "other-state"), "--log-format", "json"],
                               env=first.env, capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "already listens" in other.stderr
        # ... nor with the same one (the state lock names the holder).
        same = subprocess.run([sys.executable, "-m", "reflowd", "--socket", str(tmp_path / "elsewhere.sock"),
                               "--log-format", "json"], env=first.env, capture_output=True, text=True, timeout=60)
        assert same.returncode != 0 and f"pid {proc.pid}" in same.stderr
        assert first.socket.stat().st_ino == inode
        with Client(first.socket, timeout=30) as client:
            assert client.ping()["pid"] == proc.pid

        with Client(first.socket, timeout=30) as client:
            client.cancel(run_id)  # ends the slow local workers
            client.shutdown()
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: notify_socket.seen("STOPPING=1"), timeout=30, what="STOPPING=1")
        assert notify_socket.messages.index("READY=1") < notify_socket.messages.index("STOPPING=1")
        assert first.socket.exists() and first.socket.stat().st_ino == inode, \
            "the activated socket belongs to systemd: reflowd must not remove it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_activation_refuses_a_tcp_socket(tmp_path: Path) -> None:
    """A socket reflowd cannot check peers on (TCP) is refused with a clear message, before anything starts."""
    listener = socket.create_server(("127.0.0.1", 0))
    script = ("import os,sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID']=str(os.getpid()); "
              "os.environ['LISTEN_FDS']='1'; from reflowd.__main__ import main; sys.exit(main(sys.argv[2:]))")
    env = {**os.environ, "REFLOW_STATE_DIR": str(tmp_path / "state"), "REFLOW_CONFIG": str(tmp_path / "none.toml")}
    result = subprocess.run([sys.executable, "-c", script, str(listener.fileno()), "--socket", str(tmp_path / "s.sock")],
                            pass_fds=(listener.fileno(),), env=env, capture_output=True, text=True, timeout=60)
    listener.close()
    assert result.returncode == 2
    assert "not a Unix stream socket" in result.stderr
    assert not (tmp_path / "state").exists(), "nothing starts"


@pytest.mark.anyio
async def test_watchdog_pings_come_from_the_event_loop(tmp_path: Path, notify_socket: NotifySocket,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocked event loop sends no WATCHDOG=1 (so systemd restarts a hung daemon); pings resume with the loop."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    options = DaemonOptions(socket_path=tmp_path / "run" / "reflowd.sock", state_dir=tmp_path / "state",
                            config=parse_config({}))
    daemon = Daemon(options)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        with anyio.fail_after(60):
            while notify_socket.drain().count("WATCHDOG=1") < 2 and notify_socket.messages.count("WATCHDOG=1") < 2:
                await anyio.sleep(0.05)
        assert "READY=1" in notify_socket.messages
        notify_socket.drain()
        time.sleep(0.6)  # block the event loop for 12 watchdog intervals
        assert notify_socket.drain() == [], "nothing may ping while the event loop is blocked"
        with anyio.fail_after(60):
            while "WATCHDOG=1" not in notify_socket.drain():
                await anyio.sleep(0.05)
        notify_socket.collect()
        daemon.request_shutdown("test")
    wait_for(lambda: notify_socket.seen("STOPPING=1"), timeout=30, what="STOPPING=1")


def test_watchdog_interval_follows_systemds_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert systemd.watchdog_interval() is None


# ---------------------------------------------------------------- journald

def test_journal_lines_carry_priority_and_stay_one_line() -> None:
    line = render_journal_line({"event": "submit failed", "level": "error", "timestamp": "x", "run_id": "r1",
                                "task": "fit", "error": "sbatch: error: invalid partition\nsecond line",
                                "exception": "Traceback (most recent call last):\n  File ...\nValueError: boom"})
    assert line.startswith("<3>submit failed run_id=r1 task=fit ")
    assert "\n" not in line and "timestamp" not in line
    assert 'error="sbatch: error: invalid partition\\nsecond line"' in line
    assert render_journal_line({"event": "ready", "level": "info", "clusters": ["local", "hpc"]}) == \
        '<6>ready clusters="[\\"local\\",\\"hpc\\"]"'
    assert render_journal_line({"event": "x", "level": "warning"}).startswith("<4>")
    assert render_journal_line({"event": "x", "level": "debug"}).startswith("<7>")


JOURNALD = Path("/lib/systemd/systemd-journald")


@pytest.fixture
def journal_namespace() -> Iterator[str]:
    """A private journald (a journal namespace: its own sockets and files) started for this test."""
    if (os.geteuid() != 0 or not JOURNALD.exists() or shutil.which("journalctl") is None) and not _IN_CI:
        pytest.skip("needs root and systemd-journald/journalctl (Debian package systemd) for a private journal namespace")
    namespace = f"reflowtest{os.getpid()}"
    proc = subprocess.Popen([str(JOURNALD), namespace], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    runtime = Path(f"/run/systemd/journal.{namespace}")
    try:
        wait_for(lambda: (runtime / "stdout").exists(), timeout=30, what="journald to listen")
        yield namespace
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        machine = Path("/etc/machine-id").read_text().strip() if Path("/etc/machine-id").exists() else ""
        for leftover in (runtime, Path(f"/var/log/journal/{machine}.{namespace}"), Path(f"/run/log/journal/{machine}.{namespace}")):
            shutil.rmtree(leftover, ignore_errors=True)


def _journal_stream(namespace: str, identifier: str) -> socket.socket:
    """Connect to journald's stdout stream the way systemd connects a service's stderr (sd_journal_stream_fd)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(f"/run/systemd/journal.{namespace}/stdout")
    sock.shutdown(socket.SHUT_RD)
    # identifier, unit id, default priority, level prefix on, no forwarding to syslog/kmsg/console
    sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    return sock


@pytest.mark.parametrize("mode", ["native", "stream"])
def test_daemon_logs_reach_journald_with_priorities(tmp_path: Path, journal_namespace: str, mode: str) -> None:
    """native: entries with fields through journald's socket; stream: <N> lines on stderr when that socket is absent."""
    stream = _journal_stream(journal_namespace, "reflowd")
    info = os.fstat(stream.fileno())
    d = DaemonProcess(tmp_path / "d", config=LOCAL_CONFIG)
    native = f"/run/systemd/journal.{journal_namespace}/socket" if mode == "native" else str(tmp_path / "no-journal")
    env = {**d.env, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}", "REFLOW_JOURNAL_SOCKET": native}
    proc = subprocess.Popen([sys.executable, "-m", "reflowd"], env=env, stdout=stream.fileno(), stderr=stream.fileno(),
                            stdin=subprocess.DEVNULL, start_new_session=True)
    stream.close()
    try:
        wait_for(d.answers, timeout=60, what="reflowd to answer")
        result = d.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "run"), "--no-daemon", "--json",
                       "--n", "1", "--fail-on", "0", check=True)
        run_id = json.loads(result.stdout.strip().splitlines()[-1])["run_id"]

        def finished() -> bool:
            with Client(d.socket, timeout=30) as client:
                return client.status(run_id).finished

        wait_for(finished, timeout=120, what="the failing run to end")
        with Client(d.socket, timeout=30) as client:
            client.shutdown()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    def entries(*match: str) -> list[dict]:
        out = subprocess.run(["journalctl", f"--namespace={journal_namespace}", "-o", "json", "--no-pager",
                              "SYSLOG_IDENTIFIER=reflowd", *match], capture_output=True, text=True, timeout=60)
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    found = wait_for(lambda: (e := entries()) and any("reflowd stopped" in x["MESSAGE"] for x in e) and e,
                     timeout=60, what="the daemon's lines in the journal")
    ready = next(e for e in found if e["MESSAGE"].startswith("reflowd ready "))
    assert ready["PRIORITY"] == "6" and f"pid={proc.pid}" in ready["MESSAGE"]
    failed = next(e for e in found if "new=failed" in e["MESSAGE"] and "task=work" in e["MESSAGE"])
    assert failed["PRIORITY"] == "4", "a failed task is a warning"
    assert not any(e["MESSAGE"][:1].isspace() or e["MESSAGE"].startswith("Traceback") for e in found), \
        "one event, one journal entry"
    assert "7" in {e["PRIORITY"] for e in found}, "REFLOW_LOG_LEVEL=debug: debug lines at priority 7"
    assert not any(e["MESSAGE"].startswith("<") for e in found), "the <N> prefix is read by journald, not shown"
    assert not any(e["MESSAGE"].startswith("{") for e in found), "no JSON in the journal"
    if mode == "native":
        of_run = entries(f"RUN_ID={run_id}", "TASK=work")  # journalctl filters on reflow's fields
        assert of_run and all(e["RUN_ID"] == run_id and e["TASK"] == "work" for e in of_run)
        assert {e.get("NEW") for e in of_run} >= {"failed"} and failed["CLUSTER"] == "local"
        assert int(failed["_PID"]) == proc.pid, "journald attributes native entries to the sender"
    else:
        assert "RUN_ID" not in failed, "the stream carries the text only"


def test_native_journal_entries_encode_fields_and_tracebacks() -> None:
    entry = journal_fields({"event": "evaluation failed", "level": "error", "run_id": "r1", "message": "clash",
                            "exception": "Traceback (most recent call last):\n  File x\nValueError: boom\n"})
    fields = dict(entry)
    assert fields["PRIORITY"] == "3" and fields["RUN_ID"] == "r1" and fields["SYSLOG_IDENTIFIER"] == "reflowd"
    assert fields["REFLOW_MESSAGE"] == "clash", "reserved journal names are prefixed, not overwritten"
    assert fields["MESSAGE"].startswith("evaluation failed run_id=r1 ") and fields["MESSAGE"].endswith("ValueError: boom")
    data = encode_journal(entry)
    assert data.startswith(b"MESSAGE\n") and b"PRIORITY=3\n" in data and b"RUN_ID=r1\n" in data
    size = struct.unpack("<Q", data[8:16])[0]
    assert data[16:16 + size].decode() == fields["MESSAGE"] and data[16 + size:17 + size] == b"\n"
    assert field_name("job-id") == "JOB_ID" and field_name("_x") == "X" and field_name("1st") == "REFLOW_1ST"
