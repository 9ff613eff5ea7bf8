"""End to end against a real reflowd process on a temporary socket (local scheduler)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from reflow_client.client import Client, ReflowError, UnknownRunError
from reflow_client.protocol import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_MESSAGE_BYTES,
    MESSAGE_TOO_LARGE,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    UNKNOWN_RUN,
)

from .support import ROOT, DaemonProcess, count_lines, wait_for

EXAMPLE = ROOT / "examples" / "etl.py"
COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"
LOCAL_CONFIG = '[clusters.local]\nscheduler = "local"\nmax_workers = {workers}\n'


@pytest.fixture
def daemon(tmp_path: Path):
    d = DaemonProcess(tmp_path / "d", config=LOCAL_CONFIG.format(workers=4))
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(timeout=30)


def submit(d: DaemonProcess, workflow: Path, run_dir: Path, *args: str) -> str:
    result = d.cli("submit", str(workflow), "--run-dir", str(run_dir), "--no-daemon", "--json", *args, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["run_id"]


def executions(run_dir: Path) -> Counter[str]:
    lines = (run_dir / "executions.txt").read_text().splitlines() if (run_dir / "executions.txt").exists() else []
    return Counter(line.rsplit(" pid=", 1)[0] for line in lines)


def state_of(d: DaemonProcess, run_id: str) -> str:
    with d.client() as c:
        return c.status(run_id).state


def wait_state(d: DaemonProcess, run_id: str, states: tuple[str, ...], timeout: float = 120.0) -> str:
    return wait_for(lambda: (s := state_of(d, run_id)) in states and s, timeout=timeout, interval=0.2,
                    what=f"run {run_id} to reach {states}")


def test_readme_pipeline_status_watch_runs_logs(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "etl"
    run_id = submit(daemon, EXAMPLE, run_dir, "--chunks", "55")
    watch = subprocess.Popen([sys.executable, "-m", "reflow_client.cli", "watch", run_id], env=daemon.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = watch.communicate(timeout=180)
    assert watch.returncode == 0, (out, err)
    assert f"run {run_id} succeeded" in out
    assert "summarise[]" in out and "55/55" in out

    status = daemon.cli("status", run_id, "--json", check=True)
    data = json.loads(status.stdout)
    assert data["run"]["state"] == "succeeded"
    counts = {t["name"]: t["counts"] for t in data["tasks"]}
    assert counts == {"extract": {"succeeded": 1}, "summarise": {"succeeded": 55}, "merge": {"succeeded": 1}}
    report = json.loads((run_dir / "report.json").read_text())
    assert report["summary"]["chunks"] == 55

    text = daemon.cli("status", run_id, "--task", "summarise", check=True).stdout
    assert "[54]" in text and "succeeded" in text

    runs = daemon.cli("runs", "--json", check=True)
    assert run_id in [r["id"] for r in json.loads(runs.stdout)]
    assert run_id in daemon.cli("runs", "--state", "succeeded", check=True).stdout
    assert run_id not in daemon.cli("runs", "--state", "failed", check=True).stdout

    logs = daemon.cli("logs", run_id, "summarise", "--index", "7", check=True)
    assert "chunk-0007.txt: 2000 values" in logs.stdout
    missing = daemon.cli("logs", run_id, "summarise", "--index", "99")
    assert missing.returncode == 2 and "has no element 99: pass --index N (0-54)" in missing.stderr

    # A watch on a finished run reports the outcome at once.
    again = daemon.cli("watch", run_id)
    assert again.returncode == 0 and "succeeded" in again.stdout


def test_failure_shows_traceback_and_retry_completes(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "fail"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "12", "--fail-on", "7")
    assert wait_state(daemon, run_id, ("failed", "succeeded")) == "failed"
    status = daemon.cli("status", run_id)
    assert status.returncode == 0
    assert "work[7]: failed" in status.stdout
    assert "ValueError: bad input 7" in status.stdout
    assert "Traceback (most recent call last)" in status.stdout
    with daemon.client() as c:
        st = c.status(run_id)
    counts = {t.name: t.counts for t in st.tasks}
    assert counts["work"] == {"succeeded": 11, "failed": 1}
    assert counts["total"] == {"upstream_failed": 1}
    watch = daemon.cli("watch", run_id)
    assert watch.returncode == 1, "watch exits non-zero for a failed run"

    (run_dir / "fixed").write_text("yes\n")
    retry = daemon.cli("retry", run_id, check=True)
    assert "retrying 1" in retry.stdout
    assert wait_state(daemon, run_id, ("failed", "succeeded")) == "succeeded"
    runs = executions(run_dir)
    assert runs["work 7"] == 2
    assert all(runs[f"work {i}"] == 1 for i in range(12) if i != 7)
    assert runs["prepare"] == 1 and runs["total"] == 1
    with daemon.client() as c:
        final = c.status(run_id, task="work")
    assert final.instances is not None
    assert [i.attempt for i in final.instances if i.index == 7] == [2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return b") Z " not in Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False


def test_cancel_stops_processes_and_nothing_new_starts(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "cancel"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "12", "--delay", "60")
    # All four slots (max_workers = 4) busy: nothing else can start before the cancel.
    wait_for(lambda: sum(v for k, v in executions(run_dir).items() if k.startswith("work")) >= 4, timeout=60,
             what="four elements to start")
    before = (run_dir / "executions.txt").read_text().splitlines()
    pids = [int(line.rsplit("pid=", 1)[1]) for line in before if line.startswith("work")]
    result = daemon.cli("cancel", run_id, check=True)
    assert "cancelled" in result.stdout
    assert wait_state(daemon, run_id, ("cancelled",)) == "cancelled"
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=30, what="cancelled workers to exit")
    with daemon.client() as c:
        st = c.status(run_id)
    assert {t.name: t.counts for t in st.tasks}["work"] == {"cancelled": 12}
    # Give the engine every chance to start something it should not: submission and file clocks both tick.
    with daemon.client() as c:
        wait_for(lambda: c.stats()["tracked_jobs"]["local"] == 0, timeout=30, what="no tracked jobs")
    after = (run_dir / "executions.txt").read_text().splitlines()
    assert len(after) == len(before) and not any(line.startswith("total") for line in after)


def test_a_kill_owed_when_the_daemon_died_is_sent_when_it_starts_again(tmp_path: Path) -> None:
    """The daemon dies (fault point ``before_kill``, like kill -9) after a cancel was committed and before its
    kills went out: the workers run on, unknown to the next daemon (their instances are cancelled, so nothing
    re-attaches them). It finds the kills owed in its store and stops them, each once."""
    d = DaemonProcess(tmp_path / "d", config=LOCAL_CONFIG.format(workers=4))
    d.start(extra_env={"REFLOW_FAULT_POINTS": "before_kill"})
    run_dir, gate = tmp_path / "owed", tmp_path / "never-opened"
    pids: list[int] = []
    try:
        run_id = submit(d, COUNTING, run_dir, "--n", "2", "--gate", str(gate))
        wait_for(lambda: sum(v for k, v in executions(run_dir).items() if k.startswith("work")) >= 2, timeout=60,
                 what="both elements to start")
        lines = (run_dir / "executions.txt").read_text().splitlines()
        pids = [int(line.rsplit("pid=", 1)[1]) for line in lines if line.startswith("work")]
        d.cli("cancel", run_id)  # answered "cancelled", or cut off as the daemon dies sending the kills
        assert d.proc is not None
        d.proc.wait(timeout=60)
        assert d.proc.returncode == 137, "the fault point ends the daemon like kill -9"
        assert all(_alive(p) for p in pids), "nothing killed the workers yet"
        d.start()
        wait_for(lambda: not any(_alive(p) for p in pids), timeout=60, what="the owed kills to stop the workers")
        with d.client() as c:
            local = wait_for(lambda: (s := c.stats()["clusters"]["local"])["owed_kills"] == 0 and s, timeout=30,
                             what="no kill owed")
        assert local["driver"]["owed_kills_loaded"] == 1, "the run's one array job, owed whole (Engine._cancel_jobs)"
        assert d.log().count("stopping a worker an earlier daemon started") == 2
        assert wait_state(d, run_id, ("cancelled",)) == "cancelled"
        assert not any(line.startswith("total") for line in (run_dir / "executions.txt").read_text().splitlines())
    finally:
        gate.touch()  # (workers a failure left behind finish and exit)
        d.stop()


def test_kill9_midrun_every_task_runs_exactly_once(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config=LOCAL_CONFIG.format(workers=2))
    d.start()
    run_dir = tmp_path / "crash"
    try:
        run_id = submit(d, COUNTING, run_dir, "--n", "40", "--delay", "0.3")
        wait_for(lambda: count_lines(run_dir / "executions.txt") >= 12, timeout=120, what="a third of the work")
        d.kill9()
        assert count_lines(run_dir / "executions.txt") < 42, "the run must be unfinished when the daemon dies"
        d.start()
        assert wait_state(d, run_id, ("succeeded", "failed"), timeout=180) == "succeeded"
        runs = executions(run_dir)
        assert runs["prepare"] == 1 and runs["total"] == 1
        assert [runs[f"work {i}"] for i in range(40)] == [1] * 40
        assert sum(runs.values()) == 42
        with d.client() as c:
            assert c.status(run_id).tasks[1].counts == {"succeeded": 40}
        assert "recovered runs" in d.log()
    finally:
        d.stop()


@pytest.mark.parametrize("point", ["before_submit", "after_submit"])
def test_kill_between_submission_and_record_runs_once(tmp_path: Path, point: str) -> None:
    d = DaemonProcess(tmp_path / "d", config=LOCAL_CONFIG.format(workers=2))
    d.start(extra_env={"REFLOW_FAULT_POINTS": point})
    run_dir = tmp_path / "fault"
    try:
        run_id = submit(d, COUNTING, run_dir, "--n", "5")
        assert d.proc is not None
        d.proc.wait(timeout=60)
        assert d.proc.returncode == 137, "the fault point ends the daemon like kill -9"
        d.start()
        assert wait_state(d, run_id, ("succeeded", "failed"), timeout=180) == "succeeded"
        runs = executions(run_dir)
        assert runs["prepare"] == 1 and runs["total"] == 1
        assert [runs[f"work {i}"] for i in range(5)] == [1] * 5
    finally:
        d.stop()


def _rpc(sock: socket.socket, payload: bytes) -> dict:
    sock.sendall(payload)
    buf = b""
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "daemon closed the connection"
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def test_protocol_garbage_never_hurts(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "keep"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "3")
    wait_state(daemon, run_id, ("succeeded",))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(daemon.socket))
    cases = [
        (b"this is not json\n", PARSE_ERROR),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"ping\"\n", PARSE_ERROR),  # truncated object
        (b"[1, 2, 3]\n", INVALID_REQUEST),
        (b"{\"id\": 2, \"method\": \"ping\"}\n", INVALID_REQUEST),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 3, \"method\": 42}\n", INVALID_REQUEST),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 4, \"method\": \"no_such\"}\n", METHOD_NOT_FOUND),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 5, \"method\": \"status\", \"params\": [1]}\n", INVALID_PARAMS),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 6, \"method\": \"status\", \"params\": {\"run_id\": 7}}\n", INVALID_PARAMS),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 7, \"method\": \"status\", \"params\": {}}\n", INVALID_PARAMS),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 8, \"method\": \"status\", \"params\": {\"run_id\": \"nope\"}}\n",
         UNKNOWN_RUN),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 9, \"method\": \"runs\", \"params\": {\"limit\": \"ten\"}}\n", INVALID_PARAMS),
        (b"{\"jsonrpc\": \"2.0\", \"id\": 10, \"method\": \"submit\", \"params\": {\"manifest\": {\"version\": 1}, "
         b"\"run_dir\": \"/tmp/x\"}}\n", INVALID_PARAMS),
        (b"\xff\xfe\x00garbage\n", PARSE_ERROR),
        (b"x" * (MAX_MESSAGE_BYTES + 100) + b"\n", MESSAGE_TOO_LARGE),
    ]
    for payload, code in cases:
        reply = _rpc(s, payload)
        assert reply["error"]["code"] == code, (payload[:80], reply)
        assert reply["error"]["message"]
        # The same connection goes on.
        assert _rpc(s, b"{\"jsonrpc\": \"2.0\", \"id\": 99, \"method\": \"ping\"}\n")["result"]["pong"] is True
    bad_manifest = _rpc(s, b"{\"jsonrpc\": \"2.0\", \"id\": 11, \"method\": \"submit\", \"params\": {\"manifest\": "
                           b"{\"version\": 1}, \"run_dir\": \"/tmp/x\"}}\n")
    assert "invalid manifest" in bad_manifest["error"]["message"]
    # A frame cut off by a closing client.
    s.sendall(b"{\"jsonrpc\": \"2.0\", \"id\": 12, \"meth")
    s.close()
    with daemon.client() as c:
        assert c.ping()["pong"] is True
        assert c.status(run_id).state == "succeeded"
        assert [r.id for r in c.runs()] == [run_id]
        with pytest.raises(UnknownRunError):
            c.status("no-such-run")
        with pytest.raises(ReflowError) as info:
            c.call("cancel", run_id=run_id, task="no_such_task")
        assert "no task 'no_such_task'" in info.value.message


def test_many_clients_at_once(daemon: DaemonProcess, tmp_path: Path) -> None:
    import threading

    run_dir = tmp_path / "busy"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "20", "--delay", "0.2")
    errors: list[BaseException] = []
    answers = Counter[str]()

    def hammer() -> None:
        try:
            with Client(daemon.socket, timeout=60) as c:
                for _ in range(25):
                    assert c.ping()["pong"]
                    c.status(run_id)
                    answers["ok"] += 1
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert answers["ok"] == 16 * 25
    assert wait_state(daemon, run_id, ("succeeded", "failed")) == "succeeded"


def test_second_daemon_on_same_state_dir_is_refused(daemon: DaemonProcess) -> None:
    other_socket = daemon.base / "other.sock"
    result = subprocess.run([sys.executable, "-m", "reflowd", "--socket", str(other_socket)], env=daemon.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "another reflowd" in result.stderr
    assert str(daemon.state_dir) in result.stderr and str(daemon.socket) in result.stderr
    assert daemon.answers()


def test_sigterm_flushes_and_exits_zero(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_dir = tmp_path / "term"
    run_id = submit(daemon, COUNTING, run_dir, "--n", "4")
    wait_state(daemon, run_id, ("succeeded",))
    assert daemon.stop() == 0
    assert not daemon.socket.exists(), "the socket is removed on a clean stop"
    assert "reflowd stopped" in daemon.log()
    daemon.start()
    with daemon.client() as c:
        st = c.status(run_id)
        assert st.state == "succeeded" and st.tasks[1].counts == {"succeeded": 4}


def test_shutdown_command_replies_then_stops(daemon: DaemonProcess) -> None:
    result = daemon.cli("shutdown", check=True)
    assert "stopping" in result.stdout
    assert daemon.proc is not None and daemon.proc.wait(timeout=30) == 0


def test_without_daemon_commands_say_how_to_start_one(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path)
    result = d.cli("status", "some-run")
    assert result.returncode == 3
    assert "no reflowd is running" in result.stderr and "reflowd" in result.stderr
    flow = subprocess.run([sys.executable, str(COUNTING), "runs"], env=d.env, capture_output=True, text=True,
                          timeout=60)
    assert flow.returncode == 3 and "no reflowd is running" in flow.stderr
    nostart = d.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "r"), "--no-daemon")
    assert nostart.returncode == 3 and not d.socket.exists()


def test_submit_starts_a_daemon_in_the_background(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path)
    run_dir = tmp_path / "auto"
    result = d.cli("submit", str(COUNTING), "--run-dir", str(run_dir), "--n", "3", "--wait")
    try:
        assert result.returncode == 0, result.stderr
        assert "succeeded" in result.stdout
        assert (d.state_dir / "reflowd.log").exists()
        assert executions(run_dir)["total"] == 1
    finally:
        d.cli("shutdown")
    wait_for(lambda: not d.socket.exists(), timeout=30, what="the background daemon to stop")


def test_python_api_submit_wait_status(daemon: DaemonProcess, tmp_path: Path) -> None:
    from reflow.loader import load_workflow

    wf = load_workflow(COUNTING)
    run = wf.submit(tmp_path / "api", store=daemon.socket, n=6)
    final = run.wait(timeout=120)
    assert final.ok and final.state == "succeeded"
    info = run.status(as_dict=True)
    assert info is not None and info["run"]["id"] == run.run_id
    assert {t["name"]: t["counts"] for t in info["tasks"]}["work"] == {"succeeded": 6}
    assert run.retry() == 0
    with pytest.raises(TimeoutError):
        slow = wf.submit(tmp_path / "slow", store=daemon.socket, n=2, delay=30)
        slow.wait(timeout=1)
    assert slow.cancel() >= 1
    assert slow.wait(timeout=60).state == "cancelled"


def test_workflow_cli_commands_go_through_the_daemon(daemon: DaemonProcess, tmp_path: Path) -> None:
    env = daemon.env
    sub = subprocess.run([sys.executable, str(COUNTING), "submit", "--run-dir", str(tmp_path / "cli"), "--n", "3",
                          "--json", "--wait"], env=env, capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    run_id = json.loads(sub.stdout.splitlines()[0])["run_id"]
    status = subprocess.run([sys.executable, str(COUNTING), "status", run_id], env=env, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0 and "succeeded" in status.stdout
    runs = subprocess.run([sys.executable, str(COUNTING), "runs", "--json"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert run_id in [r["id"] for r in json.loads(runs.stdout)]


def test_task_log_lines_carry_run_task_and_index(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_id = submit(daemon, COUNTING, tmp_path / "logs", "--n", "3")
    wait_state(daemon, run_id, ("succeeded",))
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    task_lines = [entry for entry in lines if entry.get("event") == "task state" and entry.get("run_id") == run_id]
    assert task_lines
    assert all({"run_id", "task", "index", "cluster", "level", "timestamp"} <= set(e) for e in task_lines)
    assert {e["index"] for e in task_lines if e["task"] == "work"} == {0, 1, 2}


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_socket_refuses_other_users(tmp_path: Path) -> None:
    import shutil
    import tempfile

    public = Path(tempfile.mkdtemp(prefix="reflow-peer-"))  # /tmp/pytest-of-root is closed to other users
    d = DaemonProcess(tmp_path / "d", socket=public / "sock" / "reflowd.sock")
    d.start()
    try:
        os.chmod(public, 0o755)
        os.chmod(d.socket.parent, 0o755)
        os.chmod(d.socket, 0o666)  # let the other user reach the socket: only SO_PEERCRED stands in the way
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(20)\n"
            f"s.connect({str(d.socket)!r})\n"
            "s.sendall(b'{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"ping\"}\\n')\n"
            "data = b''\n"
            "while True:\n"
            "    chunk = s.recv(4096)\n"
            "    if not chunk: break\n"
            "    data += chunk\n"
            "sys.stdout.write(data.decode())\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout.splitlines()[0])
        assert "only its own user" in reply["error"]["message"]
        assert "result" not in reply
        assert d.answers()
    finally:
        d.stop()
        shutil.rmtree(public, ignore_errors=True)


def test_socket_and_directory_permissions(daemon: DaemonProcess) -> None:
    assert oct(daemon.socket.stat().st_mode & 0o777) == oct(0o600)
    assert oct(daemon.socket.parent.stat().st_mode & 0o777) == oct(0o700)
    assert oct(daemon.state_dir.stat().st_mode & 0o777) == oct(0o700)
