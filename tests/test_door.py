"""Issue #8, items 1 and 2: every manifest and every frame is checked at the door.

Each input the issue reproduced (a manifest that killed the daemon on every
start, a frame that killed it at once) is sent exactly as reported: the daemon
answers with an error naming the field, keeps serving, and starts again
cleanly afterwards, and a real run still completes.
"""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from reflow.loader import load_workflow
from reflow_client.manifest import Manifest, ManifestError
from reflow_client.protocol import INVALID_PARAMS, INVALID_REQUEST, MAX_DEPTH, PARSE_ERROR

from .support import ROOT, DaemonProcess, wait_for

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"


@pytest.fixture(scope="module")
def counting() -> tuple[dict[str, Any], dict[str, Any]]:
    wf = load_workflow(COUNTING)
    return wf.describe(), wf.resolve_parameters({"n": 2})


def _edit(manifest: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(manifest)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


# (path into the counting manifest, value, text the error must contain): task 1 is the array "work".
BAD_MANIFESTS = [
    (["tasks", 1, "config", "mem"], "lots", "tasks['work'].config.mem: invalid memory request 'lots'"),
    (["tasks", 1, "config", "mem"], "", "tasks['work'].config.mem: invalid memory request ''"),
    (["tasks", 1, "config", "mem"], "-1G", "tasks['work'].config.mem: invalid memory request '-1G'"),
    (["tasks", 1, "config", "time"], "abc", "tasks['work'].config.time: invalid time limit 'abc'"),
    (["tasks", 1, "config", "time"], "0", "tasks['work'].config.time: invalid time limit '0'"),
    (["tasks", 1, "config", "time"], "-1", "tasks['work'].config.time: invalid time limit '-1'"),
    (["tasks", 1, "config", "array_parallelism"], "x", "tasks['work'].config.array_parallelism: expected a whole number"),
    (["tasks", 1, "config", "array_parallelism"], [1], "tasks['work'].config.array_parallelism: expected a whole number"),
    (["tasks", 1, "config", "array_parallelism"], {}, "tasks['work'].config.array_parallelism: expected a whole number"),
    (["tasks", 1, "config", "array_parallelism"], 0, "tasks['work'].config.array_parallelism: 0 is out of range"),
    (["tasks", 0, "config", "array_parallelism"], 2, "tasks['prepare'].config.array_parallelism: only applies to array"),
    (["tasks", 1, "config", "retries"], "abc", "tasks['work'].config.retries: expected a whole number, got str"),
    (["tasks", 1, "config", "retries"], -1, "tasks['work'].config.retries: -1 is out of range"),
    (["tasks", 1, "config", "retries"], 10**6, "tasks['work'].config.retries: 1000000 is out of range"),
    (["tasks", 1, "config", "cpus"], 0, "tasks['work'].config.cpus: 0 is out of range"),
    (["tasks", 1, "config", "time"], "99999-00:00:00", "is more than 366 days"),
    (["tasks", 1, "config", "mem"], "9" * 30 + "T", "tasks['work'].config.mem: '" + "9" * 30),
    (["tasks", 1, "config", "submit_options"], {"partition": ["a", {"b": 1}]}, "submit_options['partition']"),
    (["tasks", 1, "config", "submit_options"], "partition=x", "submit_options: expected an object"),
    (["tasks", 1, "config", "cache"], "no", "tasks['work'].config.cache: expected true or false"),
    (["tasks", 2, "name"], "to\0tal", "tasks['to\\x00tal'].name: must not contain a NUL byte"),
    (["tasks", 2, "name"], "../etc", "tasks['../etc'].name: use letters, digits and underscores"),
    (["python"], "/usr/bin/python\0", "manifest.python: must not contain a NUL byte"),
    (["entrypoint"], "relative.py", "manifest.entrypoint: 'relative.py' must be an absolute path"),
    (["workflow"], "two words", "manifest.workflow: use a short name without spaces or slashes"),
    (["workflow"], "", "manifest.workflow: must not be empty"),
    (["tasks"], [], "manifest.tasks: a workflow needs at least one task"),
    (["tasks", 1, "inputs", "x", 0, "mode"], "direct", "tasks['work'].inputs['x']: mode 'direct' cannot feed an array"),
    (["tasks", 1, "inputs", "x", 0, "mode"], "chain", "tasks['work'].inputs['x']: mode 'chain' needs an array step"),
    (["tasks", 2, "inputs", "values", 0, "mode"], "chain", "mode 'chain' cannot feed a single (non-array) task"),
    (["tasks", 1, "dependencies"], ["prepare", "prepare"], "tasks['work'].dependencies: a task is listed twice"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_MANIFESTS, ids=[f"{p[-1]}={v!r}"[:40] for p, v, _ in
                                                                          BAD_MANIFESTS])
def test_bad_manifest_is_refused_naming_the_field(counting: tuple[dict[str, Any], dict[str, Any]], path: list[Any],
                                                  value: Any, message: str) -> None:
    manifest, _ = counting
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(_edit(manifest, path, value))
    assert message in str(info.value)


def test_every_test_workflow_passes_the_door() -> None:
    for path in sorted((ROOT / "tests" / "workflows").glob("*.py")) + sorted(
            (ROOT / "tests" / "engine_workflows").glob("*.py")) + [ROOT / "examples" / "etl.py"]:
        manifest = load_workflow(path).describe()
        assert Manifest.from_dict(manifest, strict=True).to_manifest_dict() == manifest, path


def test_stored_manifests_load_without_the_value_checks(counting: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """An older reflowd may have stored what the door now refuses: reading it back must not fail."""
    manifest, _ = counting
    old = _edit(manifest, ["tasks", 1, "config", "retries"], "abc")
    assert Manifest.from_dict(old, strict=False).tasks[1].config["retries"] == "abc"


# ---------------------------------------------------------------------- against a real daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    d = DaemonProcess(tmp_path_factory.mktemp("door"), config='[clusters.local]\nscheduler = "local"\nmax_workers = 4\n')
    d.start()
    yield d
    d.stop()


def _frames(sock: socket.socket, payload: bytes) -> dict[str, Any]:
    """Send one request and a ping; return the reply to the request (or the error without id)."""
    sock.sendall(payload + b'\n{"jsonrpc":"2.0","id":"probe","method":"ping"}\n')
    buf = b""
    replies = []
    while True:
        chunk = sock.recv(65536)
        assert chunk, "the daemon closed the connection"
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply = json.loads(line)
            if reply.get("id") == "probe":
                assert reply["result"]["pong"] is True
                assert len(replies) == 1, replies
                return replies[0]
            replies.append(reply)


@pytest.fixture
def conn(daemon: DaemonProcess):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(daemon.socket))
    yield s
    s.close()


def _submit_frame(manifest: dict[str, Any], params: dict[str, Any], run_dir: str) -> bytes:
    msg = {"jsonrpc": "2.0", "id": 7, "method": "submit",
           "params": {"manifest": manifest, "params": params, "run_dir": run_dir}}
    return json.dumps(msg, ensure_ascii=True).encode()


def test_each_bad_manifest_from_the_issue_is_refused_and_the_daemon_lives_on(
        daemon: DaemonProcess, conn: socket.socket, counting: tuple[dict[str, Any], dict[str, Any]],
        tmp_path: Path) -> None:
    manifest, params = counting
    for path, value, message in BAD_MANIFESTS:
        reply = _frames(conn, _submit_frame(_edit(manifest, path, value), params, str(tmp_path / "never")))
        assert reply["id"] == 7 and reply["error"]["code"] == INVALID_PARAMS, reply
        assert message in reply["error"]["message"], (message, reply)
    unknown = _frames(conn, _submit_frame(manifest, {**params, "nn": 3}, str(tmp_path / "never")))
    assert "unknown run parameter(s) 'nn'" in unknown["error"]["message"]
    gone = _frames(conn, _submit_frame(_edit(manifest, ["entrypoint"], "/no/such/flow.py"), params, str(tmp_path)))
    assert "manifest.entrypoint: '/no/such/flow.py' is not a file" in gone["error"]["message"]
    nul_dir = _frames(conn, _submit_frame(manifest, params, str(tmp_path / "a\nb")))
    assert "run_dir" in nul_dir["error"]["message"] and "control characters" in nul_dir["error"]["message"]
    assert not (tmp_path / "never").exists()
    with daemon.client() as c:
        assert c.runs() == [], "nothing was recorded"
    # The issue's worst case: a restart after such a submission must not die again.
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as c:
        run = c.submit(manifest, params, str(tmp_path / "ok"))
        wait_for(lambda: c.status(run.run_id).state == "succeeded", timeout=120, what="a good run after the refusals")


SURROGATE_FRAMES = [
    # (raw frame, expected code, text the message must contain)
    (rb'{"jsonrpc":"2.0","id":"\ud800","method":"ping"}', INVALID_REQUEST, "id: text is not valid Unicode"),
    (rb'{"jsonrpc":"2.0","id":1,"method":"runs","params":{"state":"\udfff"}}', INVALID_PARAMS,
     "params.state: text is not valid Unicode"),
    (rb'{"jsonrpc":"2.0","id":1,"method":"status","params":{"run_id":"x\udcff"}}', INVALID_PARAMS, "params.run_id"),
    (rb'{"jsonrpc":"2.0","id":1,"method":"\ud800ping"}', INVALID_REQUEST, "method: text is not valid Unicode"),
    (rb'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"\udcff":1}}', INVALID_PARAMS, "a key is not valid Unicode"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + b"[" * 1000 + b"]" * 1000 + b"}}", INVALID_REQUEST,
     f"nesting deeper than {MAX_DEPTH} levels"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + b"[" * 150 + b"]" * 150 + b"}}", INVALID_PARAMS,
     f"nesting deeper than {MAX_DEPTH} levels"),
    (b'{"jsonrpc":"2.0","id":1,"method":"runs","params":{"limit":1' + b"0" * 400 + b"}}", INVALID_REQUEST,
     "number with 401 digits is too large"),
    (b'{"jsonrpc":"2.0","id":1,"method":"runs","params":{"limit":1' + b"0" * 30 + b"}}", INVALID_PARAMS,
     "parameter 'limit' is out of range"),
    (b'{"jsonrpc":"2.0","id":1,"method":"runs","params":{"since":1e400}}', INVALID_REQUEST, "number 1e400 is too large"),
    (b'{"jsonrpc":"2.0","id":1,"method":"runs","params":{"since":NaN}}', INVALID_REQUEST, "NaN is not a JSON number"),
    (b'{"jsonrpc":"2.0","id":1,"method":"runs","params":{"since":"\\u0000"}}', INVALID_PARAMS, "NUL"),
    (b'{"jsonrpc":"2.0","id":1,"method":"logs","params":{"run_id":"r","task":"t","index":' + b"9" * 25 + b"}}",
     INVALID_PARAMS, "parameter 'index' is out of range"),
    (b'{"jsonrpc":"2.0","id":' + b"9" * 30 + b',"method":"ping"}', INVALID_REQUEST, "id must fit in 64 bits"),
    (b"\xed\xa0\x80", PARSE_ERROR, "not valid JSON"),  # a surrogate encoded as UTF-8 bytes
    # the same inside a string: json.loads on bytes would let it through as a lone surrogate
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xed\xa0\x80"}}', PARSE_ERROR, "not valid UTF-8 at byte 55"),
    (b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"\xff"}}', PARSE_ERROR, "not valid UTF-8"),
]


@pytest.mark.parametrize(("frame", "code", "message"), SURROGATE_FRAMES,
                         ids=[f.decode("latin-1")[:50] for f, _, _ in SURROGATE_FRAMES])
def test_frames_that_killed_the_daemon_get_a_clear_error(conn: socket.socket, frame: bytes, code: int,
                                                         message: str) -> None:
    reply = _frames(conn, frame)
    assert reply["error"]["code"] == code, reply
    assert message in reply["error"]["message"], reply


def test_surrogates_anywhere_in_a_submission_are_refused(
        conn: socket.socket, counting: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path) -> None:
    manifest, params = counting
    bad = "\udcff"
    cases = [
        (_edit(manifest, ["workflow"], "count" + bad), params, str(tmp_path), "params.manifest.workflow"),
        (_edit(manifest, ["tasks", 2, "name"], "tot" + bad), params, str(tmp_path), "params.manifest.tasks[2].name"),
        (manifest, {**params, "n": bad}, str(tmp_path), "params.params.n"),
        (manifest, params, str(tmp_path / bad), "params.run_dir"),
    ]
    for m, p, run_dir, where in cases:
        reply = _frames(conn, _submit_frame(m, p, run_dir))
        assert reply["error"]["code"] == INVALID_PARAMS and reply["error"]["message"].startswith(where), reply
        assert "not valid Unicode" in reply["error"]["message"]


def test_replies_with_unencodable_text_are_escaped(conn: socket.socket) -> None:
    """A reply echoing text that is not valid Unicode goes out escaped, never as a crash."""
    reply = _frames(conn, rb'{"jsonrpc":"2.0","id":"\ud800","method":"ping"}')
    assert reply["id"] is None and reply["error"]["code"] == INVALID_REQUEST
    conn.sendall(b'{"jsonrpc":"2.0","id":"ok","method":"ping"}\n')
    assert json.loads(conn.recv(65536).split(b"\n")[0])["result"]["pong"] is True
