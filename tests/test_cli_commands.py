"""reflow-client, reflowd and a workflow's own CLI as a person types them (real subprocesses, a real reflowd).

Covers issue #11: one-line errors with documented exit codes, --json that is
only JSON, results, run ids by prefix and 'last', help/--version/"did you
mean", shell completion, Ctrl-C, logs --follow, and #10's "no reserved names".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .support import ROOT, DaemonProcess, wait_for
from .terminal import Terminal

EXAMPLE = ROOT / "examples" / "etl.py"
COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"
RESERVED = ROOT / "tests" / "workflows" / "reserved_names.py"
MANY_FAILURES = ROOT / "tests" / "workflows" / "many_failures.py"
CONFIG = '[clusters.local]\nscheduler = "local"\nmax_workers = 4\n'


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    d = DaemonProcess(tmp_path_factory.mktemp("clicmd"), config=CONFIG)
    d.start()
    yield d
    d.stop()


def one_error(result: subprocess.CompletedProcess[str], code: int, prog: str = "reflow-client") -> str:
    """The documented shape of a user mistake: one line, the exit code, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def flow(d: DaemonProcess, workflow: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python pipeline.py ARGS`` against the test daemon."""
    return subprocess.run([sys.executable, str(workflow), *args], env=d.env, capture_output=True, text=True,
                          timeout=timeout)


def submitted(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)["run_id"]


# ---------------------------------------------------------------------------- errors and exit codes


def test_workflow_file_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "none")
    (tmp_path / "syntax.py").write_text("x = (\n")
    (tmp_path / "empty.py").write_text("y = 1\n")
    (tmp_path / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "adir").mkdir()
    cases = {
        "nope.py": "workflow file nope.py does not exist",
        "syntax.py": "syntax.py:1: syntax error: '(' was never closed",
        "adir": "adir is a directory; give the Python file that defines the workflow",
        "empty.py": "empty.py defines no Workflow when imported; create it at the top level of the file",
        "raises.py": "raises.py raised RuntimeError while being imported: boom at import",
    }
    for name, message in cases.items():
        result = subprocess.run([sys.executable, "-m", "reflow_client.cli", "submit", name, "--no-daemon"],
                                env=d.env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert message in one_error(result, 2)
    debug = subprocess.run([sys.executable, "-m", "reflow_client.cli", "submit", "syntax.py", "--debug"],
                           env=d.env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("reflow-client: error: ")
    env_debug = subprocess.run([sys.executable, "-m", "reflow_client.cli", "submit", "syntax.py"],
                               env={**d.env, "REFLOW_DEBUG": "1"}, capture_output=True, text=True, timeout=60,
                               cwd=tmp_path)
    assert "Traceback" in env_debug.stderr


def test_no_daemon_and_unknown_runs(tmp_path: Path, daemon: DaemonProcess) -> None:
    nobody = DaemonProcess(tmp_path / "none")
    assert "no reflowd is running" in one_error(nobody.cli("status", "last"), 3)
    assert "no run id starts with 'zzz'" in one_error(daemon.cli("status", "zzz"), 2)
    bad_state = daemon.cli("runs", "--state", "bogus")
    assert bad_state.returncode == 2 and "invalid choice: 'bogus'" in bad_state.stderr


def test_reflowd_start_up_errors(tmp_path: Path, daemon: DaemonProcess) -> None:
    env = {**daemon.env, "REFLOW_STATE_DIR": str(tmp_path / "state")}

    def reflowd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "reflowd", *args], env=env, capture_output=True, text=True,
                              timeout=60)

    long = tmp_path / ("x" * 120) / "reflowd.sock"
    assert "over the 107-byte limit of Unix sockets" in one_error(reflowd("--socket", str(long)), 2, "reflowd")
    (tmp_path / "afile").write_text("")
    assert "is not a directory" in one_error(reflowd("--socket", str(tmp_path / "afile" / "s.sock")), 2, "reflowd")
    assert "pick another location with --socket" in one_error(reflowd("--socket", "/proc/nope/s.sock"), 2,
                                                              "reflowd")
    in_use = one_error(reflowd("--socket", str(daemon.socket)), 1, "reflowd")
    assert f"another reflowd (pid {daemon.proc.pid}) already listens on {daemon.socket}" in in_use
    assert daemon.answers(), "the running daemon is untouched"
    assert "--socket PATH" in reflowd("--help").stdout


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as a user who cannot write the directory")
def test_reflowd_in_an_unwritable_directory() -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="reflow-nobody-"))  # /tmp/pytest-of-root is closed to other users
    try:
        os.chmod(base, 0o755)
        (base / "locked").mkdir(mode=0o755)
        (base / "config.toml").write_text("")
        code = (  # the interpreter lives under /root: import first (argparse imports shutil late), then become nobody
            "import os, shutil, sys, anyio, reflowd.__main__ as m, reflowd.engine.engine, reflowd.logging, reflowd.systemd\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"sys.exit(m.main(['--socket', {str(base / 'locked' / 's.sock')!r}, '--state-dir', '/tmp/x-nobody']))\n"
        )
        env = {**os.environ, "REFLOW_CONFIG": str(base / "config.toml")}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        assert "is not writable by you; use another --socket" in one_error(result, 2, "reflowd")
        unreadable = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                    env={**env, "REFLOW_CONFIG": "/root/.no-such-dir/config.toml"})
        assert "/root/.no-such-dir/config.toml" in one_error(unreadable, 2, "reflowd")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_reflowd_help_shows_the_paths_in_force(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLOW_")}
    env.update(XDG_STATE_HOME=str(tmp_path / "xstate"), XDG_CONFIG_HOME=str(tmp_path / "xconf"),
               XDG_RUNTIME_DIR=str(tmp_path / "xrun"))
    (tmp_path / "xrun").mkdir()
    out = subprocess.run([sys.executable, "-m", "reflowd", "--help"], env=env, capture_output=True, text=True,
                         timeout=60).stdout
    flat = "".join(out.split())  # argparse wraps long paths anywhere
    assert f"state{tmp_path / 'xstate' / 'reflow'}" in flat
    assert f"socket{tmp_path / 'xrun' / 'reflow' / 'reflowd.sock'}" in flat
    assert f"configuration{tmp_path / 'xconf' / 'reflow' / 'config.toml'}" in flat
    assert "~/.local/state" not in flat


def test_autostart_says_pid_and_log_and_a_failed_start_is_one_line(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "auto")
    try:
        result = d.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "r"), "--n", "2", "--json")
        run_id = submitted(result)
        m = re.search(r"started reflowd in the background \(pid (\d+), log (\S+)\)", result.stderr)
        assert m and Path(m.group(2)) == d.state_dir / "reflowd.log", result.stderr
        assert run_id.startswith("counting-")
    finally:
        d.cli("shutdown")
    wait_for(lambda: not d.socket.exists(), timeout=60, what="the background daemon to stop")

    broken = DaemonProcess(tmp_path / "broken", socket=tmp_path / ("y" * 120) / "reflowd.sock")
    failed = broken.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "r2"))
    line = one_error(failed, 3)
    assert "reflowd did not start: socket path" in line and "107-byte limit" in line and "its log:" in line


def test_broken_pipe_is_quiet(daemon: DaemonProcess, tmp_path: Path) -> None:
    for cmd in (f"{sys.executable} {COUNTING} describe", f"{sys.executable} -m reflow_client.cli --help",
                f"{sys.executable} {COUNTING} dag"):
        result = subprocess.run(["bash", "-c", f"{cmd} 2>{tmp_path / 'err'} | head -1"], env=daemon.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout
        assert (tmp_path / "err").read_text() == "", cmd


# ---------------------------------------------------------------------------- help, version, suggestions


def test_help_version_and_suggestions(daemon: DaemonProcess) -> None:
    generic = daemon.cli("submit", "--help")
    assert generic.returncode == 0 and "--run-dir DIR" in generic.stdout and "WORKFLOW_FILE" in generic.stdout
    with_file = daemon.cli("submit", str(COUNTING), "--help")
    assert with_file.returncode == 0
    assert "workflow parameters:" in with_file.stdout and "--fail-on INT" in with_file.stdout
    assert "--cancel-on-interrupt" in with_file.stdout
    from reflow.cli import build_parser as workflow_parser
    from reflow.loader import load_workflow
    from reflow_client.cli import build_parser
    from reflowd.__main__ import build_parser as reflowd_parser

    parsers = [build_parser(), workflow_parser(load_workflow(COUNTING)), reflowd_parser()]
    while parsers:  # every option and argument of every (sub)command says what it does
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.help is not argparse.SUPPRESS:
                assert action.help, (parser.prog, action.option_strings or action.dest)
    version = daemon.cli("--version")
    assert version.returncode == 0 and re.match(r"reflow-client \d", version.stdout)
    reflowd = subprocess.run([sys.executable, "-m", "reflowd", "--version"], capture_output=True, text=True,
                             timeout=60)
    assert re.match(r"reflowd \d", reflowd.stdout)
    typo = daemon.cli("stauts", "last")
    assert typo.returncode == 2 and "did you mean 'status'?" in typo.stderr
    flag = daemon.cli("submit", str(COUNTING), "--nn", "3")
    assert flag.returncode == 2 and "did you mean --n?" in flag.stderr
    assert flag.stderr.startswith(f"usage: reflow-client submit {COUNTING}"), "the usage of the command mistyped"
    option = daemon.cli("status", "last", "--tsk", "x")
    assert option.returncode == 2 and "did you mean --task?" in option.stderr


def test_shell_completion_loads_in_bash(daemon: DaemonProcess) -> None:
    for shell in ("bash", "zsh", "fish"):
        script = daemon.cli("completion", shell)
        assert script.returncode == 0 and "reflow-client" in script.stdout and "reflowd" in script.stdout
    bin_dir = Path(sys.executable).parent
    probe = (
        'eval "$(reflow-client completion bash)"\n'
        'complete -p reflow-client reflowd\n'
        'COMP_LINE="reflow-client sta"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(reflow-client sta); COMP_CWORD=1\n'
        '_python_argcomplete reflow-client sta reflow-client\n'
        'echo "commands: ${COMPREPLY[*]}"\n'
        'COMP_LINE="reflow-client status --ta"; COMP_POINT=${#COMP_LINE}; '
        'COMP_WORDS=(reflow-client status --ta); COMP_CWORD=2\n'
        '_python_argcomplete reflow-client --ta status\n'
        'echo "options: ${COMPREPLY[*]}"\n'
    )
    result = subprocess.run(["bash", "-c", probe], env={**daemon.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^complete .*-F _python_argcomplete reflow-client$", result.stdout, re.M), result.stdout
    assert re.search(r"^complete .*-F _python_argcomplete reflowd$", result.stdout, re.M), result.stdout
    commands = re.search(r"^commands: (.*)$", result.stdout, re.M).group(1).split()
    assert {"status", "stats"} <= set(c.strip() for c in commands), result.stdout
    options = re.search(r"^options: (.*)$", result.stdout, re.M).group(1).split()
    assert "--task" in [o.strip() for o in options], result.stdout


# ---------------------------------------------------------------------------- runs, results and JSON


def test_submit_wait_results_prefixes_and_json(daemon: DaemonProcess, tmp_path: Path) -> None:
    wait = daemon.cli("submit", str(EXAMPLE), "--run-dir", str(tmp_path / "etl"), "--chunks", "6", "--wait")
    assert wait.returncode == 0, wait.stderr
    assert "follow it with" not in wait.stdout and "follow it" not in wait.stdout
    run_id = re.search(r"submitted run (\S+)", wait.stdout).group(1)
    assert re.search(rf"^run {run_id} succeeded after \d+s$", wait.stdout, re.M)
    assert re.search(r"^results:\n  merge = \{'chunks': 6, 'values': 12000, ", wait.stdout, re.M), wait.stdout

    for ref in (run_id, run_id[: len("etl-2025")], "last"):
        status = daemon.cli("status", ref, "--task", "summarise")
        assert status.returncode == 0 and f"Run       {run_id}" in status.stdout, (ref, status.stderr)
        assert "__reflow__" not in status.stdout and "ChunkStats(chunk='chunk-0003.txt', count=2000" in status.stdout
    other = daemon.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "c"), "--n", "2", "--wait", "--json")
    other_id = json.loads(other.stdout)["run_id"]
    assert json.loads(daemon.cli("status", "last", "--json").stdout)["run"]["id"] == other_id
    assert json.loads(daemon.cli("status", "last", "--workflow", "etl", "--json").stdout)["run"]["id"] == run_id
    workflow_cli = flow(daemon, EXAMPLE, "status", "last")
    assert workflow_cli.returncode == 0 and f"Run       {run_id}" in workflow_cli.stdout, "scoped to its workflow"
    submitted(daemon.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "c2"), "--n", "1", "--json"))
    ambiguous = one_error(daemon.cli("status", "counting-"), 2)
    assert "run id prefix 'counting-' is ambiguous: it matches" in ambiguous and other_id in ambiguous

    results = json.loads(daemon.cli("results", run_id[:12], "--json").stdout)
    assert results["run_id"] == run_id and results["state"] == "succeeded"
    assert results["results"][0]["task"] == "merge" and results["results"][0]["value"]["chunks"] == 6
    one = json.loads(daemon.cli("results", "last", "--workflow", "etl", "--task", "summarise", "--index", "2",
                                "--json").stdout)
    assert one["results"] == [{"task": "summarise", "index": 2, "state": "succeeded",
                               "value": one["results"][0]["value"]}]
    assert one["results"][0]["value"]["chunk"] == "chunk-0002.txt", "a dataclass is a JSON object, not a string"
    text = daemon.cli("results", run_id, "--task", "summarise").stdout
    assert text.count("summarise[") == 6 and "ChunkStats(chunk='chunk-0005.txt'" in text
    bad_index = daemon.cli("results", run_id, "--task", "summarise", "--index", "6")
    assert "has no element 6 (valid: 0-5)" in one_error(bad_index, 2)
    from_flow = flow(daemon, EXAMPLE, "results", "last", "--json")
    assert json.loads(from_flow.stdout)["run_id"] == run_id

    status_json = json.loads(daemon.cli("status", run_id, "--task", "summarise", "--json").stdout)
    assert status_json["instances"][0]["output"]["chunk"] == "chunk-0000.txt", "outputs are JSON values"
    runs = json.loads(daemon.cli("runs", "--json").stdout)
    assert {run_id, other_id} <= {r["id"] for r in runs}
    for args in (("ping", "--json"), ("stats", "--json"), ("cancel", run_id, "--json"), ("retry", run_id, "--json"),
                 ("logs", run_id, "merge", "--json")):
        result = daemon.cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        json.loads(result.stdout)
    watch = daemon.cli("watch", run_id, "--json")
    events = [json.loads(line) for line in watch.stdout.splitlines()]
    assert events[0]["type"] == "snapshot" and events[-1]["type"] == "end"


def test_submit_json_with_wait_is_one_document(daemon: DaemonProcess, tmp_path: Path) -> None:
    result = daemon.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "j"), "--n", "3", "--wait", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # the whole of stdout: no progress lines
    assert doc["state"] == "succeeded" and doc["results"] == [
        {"task": "total", "index": None, "state": "succeeded", "value": 5}]
    local = subprocess.run([sys.executable, str(COUNTING), "run", "--run-dir", str(tmp_path / "local"), "--n", "3",
                            "--json"], capture_output=True, text=True, timeout=180, env=daemon.env)
    doc = json.loads(local.stdout)
    assert local.returncode == 0 and doc["state"] == "succeeded" and doc["results"][0]["value"] == 5


def test_failures_cut_at_twenty_say_how_many_more(daemon: DaemonProcess, tmp_path: Path) -> None:
    result = daemon.cli("submit", str(MANY_FAILURES), "--run-dir", str(tmp_path / "f"), "--n", "25", "--wait")
    assert result.returncode == 1
    full = re.findall(r"^  explode\[\d+\]: failed \(attempt 1", result.stdout, re.M)
    assert len(full) == 5, "five failures in full"
    assert "... and 20 more failure(s) (reflow-client status" in result.stdout
    assert re.search(r"log: \S+/logs/explode\.\S+\.err", result.stdout), "each failure names its log file"
    status = daemon.cli("status", "last")
    assert len(re.findall(r"^  explode\[\d+\]: failed \(attempt 1", status.stdout, re.M)) == 20
    assert "... and 5 more failure(s) not listed" in status.stdout
    assert json.loads(daemon.cli("status", "last", "--json").stdout)["failures_total"] == 25


def test_local_run_failure_report_matches_the_daemon_path(tmp_path: Path) -> None:
    local = subprocess.run([sys.executable, str(COUNTING), "run", "--run-dir", str(tmp_path / "l"), "--n", "4",
                            "--fail-on", "2", "--max-workers", "1"], capture_output=True, text=True, timeout=180,
                           cwd=tmp_path)
    assert local.returncode == 1
    assert local.stderr == "", "no log lines without -v"
    out = local.stdout
    assert re.search(r"^run counting-\S+ failed after \d+s$", out, re.M)
    assert out.count("work[2]: failed (attempt 1") == 1, "the failure is reported once"
    assert "ValueError: bad input 2" in out and re.search(r"log: \S+/logs/work\.\S+\.2\.err", out)
    assert "cancelled: None" not in out and "= None" not in out and "results:" not in out, \
        "no results for tasks that did not produce any"
    verbose = subprocess.run([sys.executable, str(COUNTING), "run", "--run-dir", str(tmp_path / "v"), "--n", "2",
                              "-v"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert verbose.returncode == 0 and verbose.stderr.strip(), "-v shows the engine's log lines"


def test_a_restart_neither_stops_a_follower_nor_loses_progress(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "restart", config=CONFIG)
    d.start()
    try:
        follower = subprocess.Popen([sys.executable, "-m", "reflow_client.cli", "submit", str(COUNTING), "--run-dir",
                                     str(tmp_path / "r"), "--n", "3", "--delay", "4", "--wait", "--json"],
                                    env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: (tmp_path / "r" / "executions.txt").exists() and "work" in
                 (tmp_path / "r" / "executions.txt").read_text(), timeout=120, what="work to start")
        assert d.stop() == 0
        d.start()
        out, err = follower.communicate(timeout=180)
        assert follower.returncode == 0, (out, err)
        assert "lost the connection to reflowd; trying again" in err
        run_id = json.loads(out)["run_id"]
        runs = d.cli("runs", check=True).stdout
        assert re.search(rf"^{run_id}\s+succeeded\s+local\s+\S+ \S+\s+5/5$", runs, re.M), runs
        assert d.stop() == 0
        d.start()
        runs = d.cli("runs", check=True).stdout
        assert re.search(rf"^{run_id}\s+succeeded\s+local\s+\S+ \S+\s+5/5$", runs, re.M), \
            "a finished run keeps its progress column after a restart"
        stats = d.cli("stats", check=True).stdout
        assert stats.startswith("reflowd pid ") and "runs " in stats
        with pytest.raises(json.JSONDecodeError):
            json.loads(stats)
    finally:
        d.stop()


# ---------------------------------------------------------------------------- logs and the workflow's own CLI


def test_logs_follow_and_array_tasks(daemon: DaemonProcess, tmp_path: Path) -> None:
    run_id = submitted(daemon.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "logs"), "--n", "3",
                                  "--delay", "3", "--json", "--force"))
    follow = daemon.cli("logs", run_id, "work", "--index", "1", "--follow", timeout=180)
    assert follow.returncode == 0 and follow.stdout.strip().endswith("element 1 done"), follow.stdout
    no_index = daemon.cli("logs", run_id, "work")
    assert "task 'work' is an array task with 3 element(s): pass --index N (0-2)" in one_error(no_index, 2)
    for args in (("watch", run_id), ("logs", run_id, "work", "--index", "0"), ("results", run_id)):
        result = flow(daemon, COUNTING, *args)
        assert result.returncode == 0, (args, result.stderr)
    assert "element 0 done" in flow(daemon, COUNTING, "logs", run_id, "work", "--index", "0").stdout
    assert "total = 5" in flow(daemon, COUNTING, "results", run_id).stdout


def test_ctrl_c_during_submit_wait(daemon: DaemonProcess, tmp_path: Path) -> None:
    def interrupt(*extra: str) -> tuple[int, str, str]:
        term = Terminal([sys.executable, "-m", "reflow_client.cli", "submit", str(COUNTING), "--run-dir",
                         str(tmp_path / "c"), "--n", "2", "--delay", "60", "--force", "--wait", *extra],
                        cols=100, rows=30, env=daemon.env)
        try:
            term.wait_for(lambda t: re.search(r"submitted run (\S+)", t.text()) and "work[]" in t.text(), 120,
                          "the live display")
            run_id = re.search(r"submitted run (\S+)", term.text()).group(1)
            term.interrupt()
            code = term.finish(60)
        finally:
            term.kill()
        return code, run_id, term.text()

    code, run_id, screen = interrupt()
    assert code == 130
    assert f"interrupted: run {run_id} goes on in reflowd." in screen
    assert f"reflow-client watch {run_id}" in screen and f"reflow-client cancel {run_id}" in screen
    with daemon.client() as c:
        assert c.status(run_id).state == "running"
        c.cancel(run_id)
    code, run_id, screen = interrupt("--cancel-on-interrupt")
    assert code == 130 and f"interrupted: cancelled run {run_id}" in screen
    wait_for(lambda: daemon.client().status(run_id).state == "cancelled", timeout=60, what="the run to be cancelled")


# ---------------------------------------------------------------------------- no reserved parameter names


def test_parameters_named_like_our_options_win_their_names(daemon: DaemonProcess, tmp_path: Path) -> None:
    given = ["--name", "n1", "--format", "json", "--index", "7", "--json", "yes", "--wait", "1.5", "--task", "t9",
             "--verify", "--cluster", "c2", "--force", "3", "--workflow", "w2", "--socket", "s2", "--command",
             "x", "--debug", "-h", "5"]
    expected = {"name": "n1", "format": "json", "index": 7, "json": True, "wait": 1.5, "task": "t9", "verify": True,
                "cluster": "c2", "force": 3, "workflow": "w2", "socket": "s2", "command": "x", "debug": True,
                "hours": 5}
    local = flow(daemon, RESERVED, "run", "--run-dir", str(tmp_path / "l"), *given, "--reflow-json",
                 "--reflow-force")
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout)["results"][0]["value"] == expected
    sub = daemon.cli("submit", str(RESERVED), "--run-dir", str(tmp_path / "d"), *given, "--reflow-wait",
                     "--reflow-json", "--reflow-workflow", "reserved")
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout)["results"][0]["value"] == expected
    own = flow(daemon, RESERVED, "submit", "--run-dir", str(tmp_path / "d2"), *given, "--reflow-wait",
               "--reflow-json")
    assert json.loads(own.stdout)["results"][0]["value"] == expected
    help_text = " ".join(daemon.cli("submit", str(RESERVED), "--help").stdout.split())
    assert "--reflow-wait follow the run's progress" in help_text and "(--wait is the workflow's own parameter)" \
        in help_text
    assert "--wait FLOAT [float] (default: 0.0)" in help_text
    assert "--reflow-help" not in help_text and "--help show this help" in help_text
    required = flow(daemon, RESERVED, "run", "--name", "x")
    assert required.returncode == 2 and "the following arguments are required: --run-dir" in required.stderr
