"""Issue #8, done-when: a seeded fuzz run against one real reflowd.

At least 10,000 frames across every method and parameter (random bytes,
lone surrogates, deep nesting, huge numbers, wrong types, oversize lines,
half-open connections) and 1,000 mutated manifests. After each batch the
daemon must answer ``ping``, its memory and descriptors must stay bounded and
a real run must still complete; no request may end in an internal error, and
every mutated manifest the door accepts must run to an end. It prints the
counts. ``REFLOW_FUZZ_SEED`` replays a run; the seed is printed.
"""

from __future__ import annotations

import copy
import json
import os
import random
import select
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from reflow.loader import load_workflow
from reflow_client.client import Client
from reflow_client.protocol import INTERNAL_ERROR, MAX_MESSAGE_BYTES
from reflowd.commands import REGISTRY

from .support import ROOT, DaemonProcess, wait_for

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"
SEED = int(os.environ.get("REFLOW_FUZZ_SEED", "20260808"))
FRAMES = 10_000
MANIFESTS = 1_000
FRAME_BATCHES = 4
MANIFEST_BATCHES = 2
#: Runs the door accepted that are left to run to their end (the rest are cancelled at once).
RUNS_TO_FINISH = 8
#: Frames sent back to back before reading their replies (each still followed by its own sentinel ping).
PIPELINE = 50
SENTINEL = b'{"jsonrpc":"2.0","id":"fuzz-sentinel","method":"ping"}\n'

SURROGATES = ["\ud800", "\udfff", "\udcff", "a\udc80b", "\ud83d"]
STRINGS = ["", " ", "x", "local", "succeeded", "running", "2026-01-01", "2026-13-45T99:99", "\0", "a\0b", "\n", "é",
           "😀", "../../etc/passwd", "/tmp", "UNLIMITED", "4G", "00:00:01", "-1", "0", "1e400", "NaN", "null",
           "x" * 5000, "{\"jsonrpc\":\"2.0\"}", "\\u0000", "\t\r", "\u202e"]


def _surrogate(rng: random.Random) -> str:
    return rng.choice(SURROGATES) + rng.choice(STRINGS[:8])


def _deep(rng: random.Random, depth: int) -> Any:
    value: Any = rng.choice([1, "x", None, []])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def fuzz_value(rng: random.Random, depth: int = 0) -> Any:
    """Anything JSON can say (and a few things it cannot), biased to edges."""
    pick = rng.randrange(16)
    if pick == 0:
        return rng.choice([0, 1, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 10**308, rng.randrange(-999, 999)])
    if pick == 1:
        return rng.choice([0.0, -0.0, 1.5, 1e308, -1e308, 5e-324, rng.uniform(-1e6, 1e6)])
    if pick == 2:
        return rng.choice([True, False, None])
    if pick in (3, 4):
        return rng.choice(STRINGS)
    if pick == 5:
        return _surrogate(rng)
    if pick == 6:
        return _deep(rng, rng.choice([5, 50, 99, 100, 101, 150, 400]))
    if pick == 7 and depth < 3:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick == 8 and depth < 3:
        return {rng.choice(STRINGS[:10] + ["run_id", "task", "manifest"]): fuzz_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    if pick == 9:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 30)))
    return rng.choice(["run-that-does-not-exist", "local", "work", "prepare", 3, [], {}, "stop"])


def _dump(message: Any) -> bytes:
    """JSON as a careless client would send it: surrogates as escapes, NaN as the bare word."""
    return json.dumps(message, ensure_ascii=True, allow_nan=True).encode()


def request_frame(rng: random.Random, method: str, run_ids: list[str], coverage: Counter[str]) -> bytes:
    spec = REGISTRY[method].params
    params: dict[str, Any] = {}
    for name, field in spec.items():
        roll = rng.random()
        if roll < 0.3:
            continue
        coverage[f"{method}.{name}"] += 1
        if roll < 0.45 and name == "run_id" and run_ids:
            params[name] = rng.choice(run_ids)
        elif roll < 0.55:
            kinds = field.kind if isinstance(field.kind, tuple) else (field.kind,)
            params[name] = {int: 1, float: 1.0, str: "work", bool: True, dict: {}, list: []}.get(kinds[0], None)
        else:
            params[name] = fuzz_value(rng)
    if rng.random() < 0.1:
        params[rng.choice(["bogus", "\udcff", ""])] = 1
    if method == "shutdown":
        params["not_a_parameter"] = True  # never let the fuzzer stop the daemon
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
    roll = rng.random()
    if roll < 0.8:
        msg["id"] = rng.randrange(10**6)
    elif roll < 0.9:
        msg["id"] = fuzz_value(rng)
    if rng.random() < 0.05:
        msg["jsonrpc"] = fuzz_value(rng)
    if rng.random() < 0.05 and method != "shutdown":
        msg["params"] = fuzz_value(rng)
    return _dump(msg)


def raw_frame(rng: random.Random) -> bytes:
    pick = rng.randrange(9)
    if pick == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b" ")
    if pick == 1:
        good = _dump({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        return good[: rng.randrange(1, len(good))]
    if pick == 2:
        n = rng.choice([100, 1000, 100_000])
        return b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"a":' + b"[" * n + b"]" * n + b"}}"
    if pick == 3:
        number = rng.choice([b"1" + b"0" * 400, b"1e400", b"-1e999", b"NaN", b"Infinity", b"9" * 5000])
        return b'{"jsonrpc":"2.0","id":1,"method":"runs","params":{"limit":' + number + b"}}"
    if pick == 4:
        return b'{"jsonrpc":"2.0","id":"' + rng.choice([b"\\ud800", b"\\udfff", b"\xed\xa0\x80", b"\xff"]) + \
            b'","method":"' + rng.choice([b"ping", b"status", b"\\udcff"]) + b'"}'
    if pick == 5:
        return _dump(fuzz_value(rng))
    if pick == 6:
        return b"[" * rng.randrange(1, 5000)
    if pick == 7:
        return rng.choice([b"{}", b"[]", b"null", b"0", b'""', b'{"jsonrpc":"2.0"}', b'{"method":"ping"}'])
    return b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"run_id":"' + \
        bytes(rng.randrange(0x80, 0x100) for _ in range(8)) + b'"}}'


class Conn:
    """One connection sending frames, each followed by a sentinel ping whose answer proves the daemon lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = self._open()
        self.buf = b""

    def _open(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(str(self.path))
        return s

    def exchange(self, frame: bytes) -> list[dict[str, Any]]:
        """Send a frame; return every reply before the sentinel's (the daemon must answer the sentinel)."""
        return self.exchange_many([frame])[0]

    def exchange_many(self, frames: list[bytes]) -> list[list[dict[str, Any]]]:
        """Send frames back to back, each followed by the sentinel; the replies to each frame, in order.

        The daemon answers a connection's requests in order, so the replies between two sentinel
        answers are the frame's; sending a batch at once spares a round trip per frame.
        """
        out = memoryview(b"".join(frame + b"\n" + SENTINEL for frame in frames))
        answers: list[list[dict[str, Any]]] = []
        for frame in frames:
            replies = []
            while True:
                while b"\n" not in self.buf:
                    # Keep sending while reading: replies must never fill the socket while we only write.
                    readable, writable, _ = select.select([self.sock], [self.sock] if out else [], [], 60)
                    assert readable or writable, f"reflowd did not answer within 60 s after {frame[:120]!r}"
                    if writable:
                        out = out[self.sock.send(out[:1 << 16]):]
                    if readable:
                        chunk = self.sock.recv(1 << 20)
                        assert chunk, f"reflowd closed the connection after {frame[:120]!r}"
                        self.buf += chunk
                line, self.buf = self.buf.split(b"\n", 1)
                reply = json.loads(line)
                if reply.get("id") == "fuzz-sentinel":
                    assert reply["result"]["pong"] is True
                    break
                replies.append(reply)
            answers.append(replies)
        return answers

    def close(self) -> None:
        self.sock.close()


def _check_reply(reply: dict[str, Any], frame: bytes, counts: Counter[str]) -> None:
    assert reply.get("jsonrpc") == "2.0", reply
    if "error" in reply:
        err = reply["error"]
        assert isinstance(err["code"], int) and err["message"], reply
        assert err["code"] != INTERNAL_ERROR, f"internal error for {frame[:300]!r}: {err['message']}"
        counts["error replies"] += 1
    else:
        assert "result" in reply, reply
        counts["result replies"] += 1


def _mutate(rng: random.Random, manifest: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(manifest)
    for _ in range(rng.randrange(1, 4)):
        path: list[Any] = []
        node: Any = data
        while isinstance(node, (dict, list)) and node and rng.random() < 0.75:
            key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
            path.append(key)
            node = node[key]
        parent: Any = data
        for key in path[:-1]:
            parent = parent[key]
        if not path:
            data[rng.choice(["extra", "version", "workflow"])] = fuzz_value(rng)
            continue
        last = path[-1]
        op = rng.randrange(8)
        if op == 0 and isinstance(parent, dict):
            del parent[last]
        elif op == 1 and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        elif op == 2 and isinstance(parent, list):
            rng.shuffle(parent)
        elif op == 3 and isinstance(parent, dict):
            parent[rng.choice(["surprise", "\udcff", "time", "mem", "retries", "array_parallelism", "cpus"])] = \
                fuzz_value(rng)
        elif op == 4:
            parent[last] = rng.choice(["lots", "", "-1G", "abc", "0", "-1", "x", [1], {}, "a\0b", "\udfff",
                                       "00:00:01", "1G", "UNLIMITED", 0, 1, 2, 10**9, True, None])
        else:
            parent[last] = fuzz_value(rng)
    return data


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
def test_fuzz_frames_and_manifests(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\nmax_workers = 1\n')
    d.start()
    assert d.proc is not None
    pid = d.proc.pid
    wf = load_workflow(COUNTING)
    manifest = wf.describe()
    params = wf.resolve_parameters({"n": 1})
    counts: Counter[str] = Counter()
    coverage: Counter[str] = Counter()
    accepted: list[str] = []
    started = time.monotonic()
    baseline: dict[str, int] = {}

    def checkpoint(label: str) -> None:
        """Between batches: ping, bounded memory and descriptors, and a real run completes."""
        with Client(d.socket, timeout=60) as c:
            assert c.ping()["pong"] is True
            run = c.submit(manifest, wf.resolve_parameters({"n": 2}), str(tmp_path / f"real-{label}"))
            final = c.wait(run.run_id, timeout=180)
            assert final.state == "succeeded", (label, final)
        rss, fds = _rss_kb(pid), _fds(pid)
        baseline.setdefault("rss", rss)
        baseline.setdefault("fds", fds)
        counts["checkpoints"] += 1
        assert rss < baseline["rss"] + 200_000, f"memory grew from {baseline['rss']} kB to {rss} kB ({label})"
        assert fds <= baseline["fds"] + 32, f"descriptors grew from {baseline['fds']} to {fds} ({label})"

    checkpoint("start")
    methods = sorted(REGISTRY)
    conn = Conn(d.socket)
    try:
        per_batch = FRAMES // FRAME_BATCHES
        pending: list[bytes] = []

        def flush() -> None:
            for frame, replies in zip(pending, conn.exchange_many(pending)):
                for reply in replies:
                    _check_reply(reply, frame, counts)
                    if isinstance(reply.get("result"), dict) and "run_id" in reply["result"]:
                        accepted.append(reply["result"]["run_id"])  # a fuzzed submit the door let in
                counts["frames"] += 1
            pending.clear()

        for batch in range(FRAME_BATCHES):
            for i in range(per_batch):
                if len(pending) >= PIPELINE:
                    flush()
                roll = rng.random()
                if roll < 0.003:  # half-open: a partial frame, then the client goes away
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(30)
                    s.connect(str(d.socket))
                    s.sendall(raw_frame(rng)[:40])
                    if rng.random() < 0.5:
                        s.shutdown(socket.SHUT_WR)
                    s.close()
                    counts["half-open connections"] += 1
                    counts["frames"] += 1
                    continue
                if roll < 0.0035 and counts["oversize lines"] < 4:
                    flush()
                    replies = conn.exchange(b"[" + b"1," * (MAX_MESSAGE_BYTES // 2) + b"1]")
                    assert replies and replies[0]["error"]["message"].startswith("message of"), replies[:1]
                    counts["oversize lines"] += 1
                    counts["frames"] += 1
                    continue
                if roll < 0.6:
                    method = methods[i % len(methods)]
                    if method == "watch":  # a watch keeps its connection: use one of its own and leave
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.settimeout(30)
                        s.connect(str(d.socket))
                        s.sendall(request_frame(rng, method, accepted, coverage) + b"\n")
                        s.close()
                        counts["frames"] += 1
                        counts["method watch"] += 1
                        continue
                    frame = request_frame(rng, method, accepted, coverage)
                    counts[f"method {method}"] += 1
                else:
                    frame = raw_frame(rng)
                    counts["raw frames"] += 1
                pending.append(frame)
            flush()
            checkpoint(f"frames-{batch}")
        per_batch = MANIFESTS // MANIFEST_BATCHES
        for batch in range(MANIFEST_BATCHES):
            for first in range(0, per_batch, PIPELINE):
                frames = []
                for i in range(first, min(first + PIPELINE, per_batch)):
                    mutated = _mutate(rng, manifest)
                    p = params if rng.random() < 0.8 else _mutate(rng, params)
                    run_dir = str(tmp_path / "m" / f"{batch}-{i}") if rng.random() < 0.9 else fuzz_value(rng)
                    frames.append(_dump({"jsonrpc": "2.0", "id": i, "method": "submit",
                                         "params": {"manifest": mutated, "params": p, "run_dir": run_dir}}))
                cancels = []
                for frame, replies in zip(frames, conn.exchange_many(frames)):
                    assert len(replies) == 1
                    _check_reply(replies[0], frame, counts)
                    counts["manifests"] += 1
                    if "result" in replies[0]:
                        run_id = replies[0]["result"]["run_id"]
                        accepted.append(run_id)
                        counts["manifests accepted"] += 1
                        if counts["manifests accepted"] > RUNS_TO_FINISH:
                            cancels.append(_dump({"jsonrpc": "2.0", "id": "c", "method": "cancel",
                                                  "params": {"run_id": run_id}}))
                    else:
                        counts["manifests refused"] += 1
                for replies in conn.exchange_many(cancels) if cancels else []:
                    for reply in replies:
                        _check_reply(reply, b"cancel", counts)
            checkpoint(f"manifests-{batch}")
    finally:
        conn.close()
    # Every run the door let in comes to an end: nothing that passed it may wedge or crash later.
    with Client(d.socket, timeout=60) as c:
        for run_id in accepted:
            final = wait_for(lambda r=run_id: (s := c.status(r)).finished and s, timeout=180, interval=0.2,
                             what=f"accepted run {run_id} to end")
            counts[f"accepted runs {final.state}"] += 1
        stats = c.stats()
    assert stats["counters"].get("evaluation_errors", 0) == 0, stats["counters"]
    assert stats["server"]["handler_errors"] == 0
    assert "Traceback" not in d.log(), d.log()[-5000:]
    assert d.stop() == 0
    elapsed = time.monotonic() - started
    missing = [f"{m}.{p}" for m in methods for p in REGISTRY[m].params if not coverage[f"{m}.{p}"]]
    print(f"\nfuzz seed {SEED}: {elapsed:.0f} s, daemon rss {_rss_note(baseline)}")
    for key in sorted(counts):
        print(f"  {key:32s} {counts[key]}")
    print(f"  parameters fuzzed: {len(coverage)} of {sum(len(c.params) for c in REGISTRY.values())}")
    assert counts["frames"] >= FRAMES and counts["manifests"] >= MANIFESTS
    assert not missing, f"parameters never fuzzed: {missing}"


def _rss_note(baseline: dict[str, int]) -> str:
    return f"{baseline.get('rss', 0) // 1024} MiB at start"
