"""One result cache per user, shared by local runs and the daemon (issue #11 item 10).

Through the real commands as subprocesses: ``python pipeline.py run`` and
``reflow-client submit --wait`` on the same inputs reuse each other's results
(both ways), a deleted or rewritten result file is not reused, an embedded run
and the daemon writing the cache at once lose nothing, and caches kept by older
versions (in a run directory or the daemon's database) are taken over.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import anyio
import pytest

from reflowd.cache_store import CACHE_FILE, filesystem_type, journal_mode_for

from .support import ROOT, DaemonProcess, wait_for

WF = ROOT / "tests" / "workflows" / "shared_cache.py"
CONFIG = '[clusters.local]\nscheduler = "local"\nmax_workers = 4\n'
TIMEOUT = 300


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    d = DaemonProcess(tmp_path_factory.mktemp("shared-cache"), config=CONFIG)
    d.start()
    yield d
    d.stop()


def local_run(d: DaemonProcess, run_dir: Path, *args: str) -> dict:
    """``python shared_cache.py run`` as the daemon's user (same state directory), its --json document."""
    result = subprocess.run([sys.executable, str(WF), "run", "--run-dir", str(run_dir), *args, "--json"],
                            env=d.env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def submit_wait(d: DaemonProcess, run_dir: Path, *args: str) -> dict:
    result = d.cli("submit", str(WF), "--run-dir", str(run_dir), *args, "--wait", "--json", timeout=TIMEOUT)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def executions(run_dir: Path) -> Counter[str]:
    """How often each task (element) really ran: the workflow appends a line per execution."""
    path = run_dir / "executions.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split(" pid=")[0] for line in lines)


def summary(d: DaemonProcess, run_id: str) -> dict[str, dict[str, int]]:
    status = d.cli("status", run_id, "--json", check=True)
    return json.loads(status.stdout)["summary"]


def cache_rows(state_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(state_dir / CACHE_FILE, timeout=30) as db:
        return [(task, origin) for task, origin in db.execute("SELECT task, origin FROM cache")]


ALL_ONCE = Counter({"make": 1, "read": 1, "square 0": 1, "square 1": 1, "square 2": 1, "total": 1})


def test_local_run_then_submit_runs_nothing_again(daemon: DaemonProcess, tmp_path: Path) -> None:
    rd = tmp_path / "rd"
    first = local_run(daemon, rd)
    assert first["state"] == "succeeded" and first["results"][0]["value"] == 5
    assert executions(rd) == ALL_ONCE

    again = submit_wait(daemon, rd)
    assert again["results"] == [{"task": "total", "index": None, "state": "cached", "value": 5}]
    assert executions(rd) == ALL_ONCE, "the daemon reused every result of the local run"
    assert summary(daemon, again["run_id"]) == {
        "make": {"cached": 1}, "read": {"cached": 1}, "square": {"cached": 3}, "total": {"cached": 1}}


def test_submit_then_local_run_runs_nothing_again(daemon: DaemonProcess, tmp_path: Path) -> None:
    rd = tmp_path / "rd"
    first = submit_wait(daemon, rd)
    assert first["state"] == "succeeded" and first["results"][0]["state"] == "succeeded"
    assert executions(rd) == ALL_ONCE

    again = local_run(daemon, rd)
    assert again["results"] == [{"task": "total", "index": None, "state": "cached", "value": 5}]
    assert executions(rd) == ALL_ONCE, "the local run reused every result of the daemon's run"
    origins = Counter(origin for _, origin in cache_rows(daemon.state_dir))
    assert origins["daemon"] >= 6, "the daemon recorded its results in the shared cache"


def test_a_deleted_or_changed_result_file_is_not_reused(daemon: DaemonProcess, tmp_path: Path) -> None:
    rd = tmp_path / "rd"
    local_run(daemon, rd)
    made = rd / "made.txt"
    made.unlink()
    after_delete = submit_wait(daemon, rd)
    assert made.read_text() == "0 1 2", "make ran again and wrote its file"
    assert executions(rd)["make"] == 2
    assert summary(daemon, after_delete["run_id"])["make"] == {"succeeded": 1}
    assert "output file " + str(made) + " is missing" in daemon.log()
    cache = json.loads(daemon.cli("stats", "--json", check=True).stdout)["store"]["cache"]
    assert cache["path"] == str(daemon.state_dir / CACHE_FILE) and cache["journal_mode"] == "WAL"
    assert cache["rejected"] >= 1 and cache["error"] is None

    made.write_text("0 1 2 and some more")  # rewritten behind reflow's back
    local_run(daemon, rd)
    assert executions(rd)["make"] == 3, "a rewritten result file is not reused"
    assert made.read_text() == "0 1 2"
    assert executions(rd)["square 0"] == 1, "what did not depend on the file stays cached"

    local_run(daemon, rd)
    assert executions(rd)["make"] == 3, "the fresh result is reused again"


def test_embedded_run_and_daemon_write_the_cache_at_once(daemon: DaemonProcess, tmp_path: Path) -> None:
    n = "10"
    by_daemon, by_local = tmp_path / "d", tmp_path / "l"
    before = len(cache_rows(daemon.state_dir))
    local = subprocess.Popen([sys.executable, str(WF), "run", "--run-dir", str(by_local), "--n", n, "--json"],
                             env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    remote = submit_wait(daemon, by_daemon, "--n", n)
    out, err = local.communicate(timeout=TIMEOUT)
    assert local.returncode == 0, (out, err)
    assert remote["state"] == "succeeded" and json.loads(out)["state"] == "succeeded"

    per_run = 3 + int(n)  # make, read, total and the squares
    # (the daemon's last cache entries reach its database with its next commit, which may come just after the run
    # is reported done: wait, bounded, for every entry, then check there is not one too many)
    def all_there() -> list[tuple[str, str]] | None:
        found = cache_rows(daemon.state_dir)
        return found if len(found) >= before + 2 * per_run else None

    rows = wait_for(all_there, timeout=30, what="every cache entry of both runs")
    assert len(rows) == before + 2 * per_run, "no entry lost, none twice"
    with sqlite3.connect(daemon.state_dir / CACHE_FILE, timeout=30) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    counts = {rd: executions(rd) for rd in (by_daemon, by_local)}

    swapped_local = local_run(daemon, by_daemon, "--n", n)  # each run again the other way
    swapped_daemon = submit_wait(daemon, by_local, "--n", n)
    assert swapped_local["results"][0]["state"] == swapped_daemon["results"][0]["state"] == "cached"
    assert {rd: executions(rd) for rd in (by_daemon, by_local)} == counts, "nothing ran twice"


STRESS = textwrap.dedent("""
    import sys, anyio
    import reflowd.cache_store as cache_store
    from reflowd.cache_store import CacheStore

    async def main(path, who, count, mode):
        cache_store.journal_mode_for = lambda fs_type: mode  # as on a network filesystem, for TRUNCATE
        cache = CacheStore(path, origin=who, commit_interval=0.0)
        await cache.open()
        assert cache.journal_mode == mode
        try:
            for start in range(0, count, 25):
                for i in range(start, start + 25):
                    cache.put(f"{who}-{i}", {"n": i}, f"h{i}", "wf", "t", who, i)
                await cache.commit()
                seen = await cache.lookup([f"{who}-{start + 24}", f"{who}-0"])
                assert len(seen) == 2, seen
        finally:
            await cache.close()

    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
""")


@pytest.mark.parametrize("mode", ["WAL", "TRUNCATE"])
def test_processes_writing_the_cache_together_lose_nothing(tmp_path: Path, mode: str) -> None:
    path = tmp_path / CACHE_FILE
    writers = [subprocess.Popen([sys.executable, "-c", STRESS, str(path), who, "1000", mode], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for who in ("p1", "p2", "p3")]
    for w in writers:
        _, err = w.communicate(timeout=TIMEOUT)
        assert w.returncode == 0, err
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        per_writer = dict(db.execute("SELECT origin, COUNT(*) FROM cache GROUP BY origin").fetchall())
        persistent = db.execute("PRAGMA journal_mode").fetchone()[0].upper()  # only WAL outlives a connection
        assert (persistent == "WAL") == (mode == "WAL"), persistent
    assert per_writer == {"p1": 1000, "p2": 1000, "p3": 1000}


def _old_style_run(run_dir: Path, store_path: Path) -> None:
    """A run as reflow made it before the cache was shared: results only in *store_path*'s own cache table."""
    from reflow.loader import load_workflow
    from reflowd.embedded import run_embedded

    wf = load_workflow(WF)
    run_dir.mkdir(parents=True, exist_ok=True)
    status = anyio.run(lambda: run_embedded(
        wf.describe_typed(), wf.resolve_parameters({}), str(run_dir),
        options={"force": False, "force_tasks": [], "verify": False, "on_error": "stop"}, store_path=store_path))
    assert status["run"]["state"] == "succeeded"
    with sqlite3.connect(store_path) as db:
        assert db.execute("SELECT COUNT(*) FROM cache").fetchone()[0] == 6


def test_caches_of_older_versions_are_taken_over(tmp_path: Path) -> None:
    rd = tmp_path / "rd"
    old_db = rd / ".reflow" / "local.sqlite"
    _old_style_run(rd, old_db)
    other = DaemonProcess(tmp_path / "daemon", config=CONFIG)  # a daemon whose database has the same old cache
    other.state_dir.mkdir(parents=True)
    shutil.copyfile(old_db, other.state_dir / "reflowd.sqlite")

    d = DaemonProcess(tmp_path / "local", config=CONFIG)  # no daemon needed: the local run takes over the
    again = local_run(d, rd)                                 # cache in its run directory's database
    assert again["results"][0]["state"] == "cached" and executions(rd) == ALL_ONCE
    assert Counter(o for _, o in cache_rows(d.state_dir)) == {"adopted": 6}

    other.start()
    try:
        assert submit_wait(other, rd)["results"][0]["state"] == "cached"
        assert executions(rd) == ALL_ONCE
    finally:
        other.stop()
    assert "moved cached results into the shared cache" in other.log()


def test_a_damaged_cache_is_moved_aside_not_fatal(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "daemon", config=CONFIG)
    d.state_dir.mkdir(parents=True)
    (d.state_dir / CACHE_FILE).write_bytes(b"this is not a database" * 100)
    rd = tmp_path / "rd"
    result = subprocess.run([sys.executable, str(WF), "run", "--run-dir", str(rd)], env=d.env, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "moved aside and started afresh" in result.stderr
    assert list(d.state_dir.glob(CACHE_FILE + ".damaged-*")), "the damaged file is kept for inspection"
    assert local_run(d, rd)["results"][0]["state"] == "cached", "the new cache works"


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /home rw,relatime shared:20 - nfs4 server:/home rw,vers=4.2
41 40 0:36 / /home/me/fast rw - xfs /dev/sdb1 rw
42 22 0:37 / /scratch\\040space rw - lustre 10.0.0.1@o2ib:/scratch rw
"""


def test_journal_mode_follows_the_filesystem() -> None:
    assert filesystem_type("/var/tmp/x", MOUNTINFO) == "ext4"
    assert filesystem_type("/home/me/.local/state/reflow", MOUNTINFO) == "nfs4"
    assert filesystem_type("/home/me/fast/state", MOUNTINFO) == "xfs"
    assert filesystem_type("/homework", MOUNTINFO) == "ext4", "a prefix of a mount point is not inside it"
    assert filesystem_type("/scratch space/me", MOUNTINFO) == "lustre"
    assert journal_mode_for("nfs4") == journal_mode_for("lustre") == "TRUNCATE"
    assert journal_mode_for("ext4") == journal_mode_for("") == "WAL"
