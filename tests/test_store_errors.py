"""The store writer survives write errors: a full disk, unencodable text, a refused row.

A failed commit keeps its batch (newer changes to a row win), the condition is
reported, and once the disk has room again everything is committed exactly once.
The full disk is made two ways: SQLite's ``max_page_count`` (no root needed) and,
as root, a real tmpfs filled to the last byte under a running reflowd.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from reflow_client.client import StoreUnavailableError
from reflow_client.manifest import Manifest, TaskManifest
from reflowd.engine.model import Instance, Run, TaskRun
from reflowd.store import JobRecord, Store

from .support import ROOT, DaemonProcess, wait_for

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"
GATED = ROOT / "tests" / "engine_workflows" / "gated.py"


def _run(run_id: str = "r1") -> tuple[Run, Instance]:
    task = TaskManifest(name="a", is_array=False, config={}, dependencies=[])
    manifest = Manifest(workflow="w", tasks=[task], cli_params=[], entrypoint="/x.py", python="python", working_dir="/")
    run = Run(id=run_id, manifest=manifest, params={}, run_dir="/tmp", cluster="local")
    inst = Instance(run_id=run_id, task="a", index=None)
    run.tasks["a"] = TaskRun(manifest=task, run_id=run_id, instances={None: inst})
    return run, inst


async def _pragma(store: Store, sql: str) -> int:
    assert store._db is not None
    async with store._db.execute(sql) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _wait(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_full_database_keeps_the_batch_and_commits_it_when_space_returns(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", commit_interval=0.01, retry_initial=0.02, retry_max=0.1)
    await store.open()
    run, inst = _run()
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_writer)
        store.put_run(run)
        store.put_instance(inst)
        await store.flush()
        pages = await _pragma(store, "PRAGMA page_count")
        await _pragma(store, f"PRAGMA max_page_count={pages}")  # the "disk" is full: no page can be added
        big = "x" * 20000
        for i in range(50):
            store.add_transition(run.id, "a", None, "pending", "ready", {"i": i, "pad": big}, time.time())
        inst.attempt = 2
        store.put_instance(inst)
        await _wait(lambda: not store.writable)
        assert store.write_error is not None and store.write_error.startswith("disk full"), store.write_error
        assert str(store.path) in store.write_error
        health = store.health()
        assert health["writable"] is False and health["backlog"] >= 51 and health["since"] is not None
        # Nothing committed yet, and flush() waits instead of pretending.
        with anyio.move_on_after(0.3) as scope:
            await store.flush()
        assert scope.cancelled_caught
        # Reads keep working meanwhile.
        assert [r["id"] for r in await store.list_runs()] == ["r1"]
        assert await store.transitions(run.id) == []
        # Changes made while it fails are kept too, and the newest version of a row wins.
        inst.attempt = 3
        store.put_instance(inst)
        store.add_transition(run.id, "a", None, "ready", "submitting", {"late": True}, time.time())
        failures = store.write_failures
        await _wait(lambda: store.write_failures >= failures + 2)  # it keeps retrying
        await _pragma(store, "PRAGMA max_page_count=1073741823")  # space is back
        with anyio.fail_after(30):
            await store.flush()
        assert store.writable and store.write_error is None
        tg.cancel_scope.cancel()
    await store.close()
    again = Store(tmp_path / "s.sqlite")
    await again.open()
    rows = await again.transitions("r1")
    assert [r["evidence"].get("i") for r in rows[:50]] == list(range(50))  # each once, in order
    assert rows[50]["evidence"] == {"late": True} and len(rows) == 51
    loaded = await again.load_run("r1")
    assert loaded is not None and loaded.tasks["a"].instances[None].attempt == 3
    await again.close()


@pytest.mark.anyio
async def test_unencodable_text_is_escaped_and_a_refused_row_never_blocks_the_rest(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", commit_interval=0.01)
    await store.open()
    run, inst = _run()
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_writer)
        run.run_dir = "/data/\udcff\ud800"  # an undecodable Linux path arrives as lone surrogates
        run.params = {"name": "\udfff"}
        store.put_run(run)
        inst.error = "bad \ud800 text"
        store.put_instance(inst)
        store.put_job(JobRecord("t\ud800", run.id, "a", "local", {"argv": ["\udcff"]}))
        store.put_cache("huge", [1], "h", "w", "a", run.id, 10**30)  # an integer SQLite cannot hold
        store.add_transition(run.id, "a", None, "pending", "ready", {"ok": 1}, time.time())
        with anyio.fail_after(30):
            await store.flush()
        assert store.writable
        assert store.rows_escaped >= 3 and store.rows_dropped == 1
        tg.cancel_scope.cancel()
    await store.close()
    again = Store(tmp_path / "s.sqlite")
    await again.open()
    loaded = await again.load_run("r1")
    assert loaded is not None
    assert loaded.params == {"name": "\udfff"}  # JSON columns round-trip exactly
    assert loaded.run_dir == "/data/\\udcff\\ud800"  # plain text is escaped, visibly
    assert loaded.tasks["a"].instances[None].error == "bad \\ud800 text"
    assert len(await again.transitions("r1")) == 1
    assert await again.cache_lookup(["huge"]) == {}
    await again.close()


@pytest.mark.anyio
async def test_close_while_the_disk_is_full_says_what_it_could_not_keep(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", commit_interval=0.01, retry_initial=0.02, retry_max=0.05,
                  close_timeout=0.3)
    await store.open()
    run, inst = _run()
    store.put_run(run)
    await store._commit_pending()
    pages = await _pragma(store, "PRAGMA page_count")
    await _pragma(store, f"PRAGMA max_page_count={pages}")
    for _ in range(20):
        store.add_transition(run.id, "a", None, "pending", "ready", {"pad": "y" * 20000}, time.time())
    started = time.monotonic()
    await store.close()  # returns (bounded), never raises
    assert time.monotonic() - started < 10
    assert store.write_error is not None and store.backlog == 20


# ---------------------------------------------------------------------- a real full disk (root: tmpfs)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                            capture_output=True, text=True, timeout=60)
    return result.returncode == 0


def _fill(path: Path) -> Path:
    """Take every free byte of the filesystem at *path*."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root (the max_page_count tests cover the rest)")
def test_daemon_on_a_full_tmpfs_refuses_submissions_keeps_reading_and_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "statefs"
    if not _mount_tmpfs(state, "32m"):
        if os.environ.get("CI"):
            raise AssertionError("cannot mount a tmpfs as root under CI")
        pytest.skip("cannot mount a tmpfs here")
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\nmax_workers = 4\n')
    d.state_dir = state / "state"
    try:
        d.start()
        first = d.cli("submit", str(COUNTING), "--run-dir", str(tmp_path / "one"), "--n", "3", "--no-daemon",
                      "--json", check=True)
        run_id = json.loads(first.stdout.strip().splitlines()[-1])["run_id"]
        with d.client() as c:
            wait_for(lambda: c.status(run_id).state == "succeeded", timeout=120, what="the first run")
        # A second run whose tasks wait for a file: it is mid-flight when the disk fills up.
        gate = tmp_path / "gate"
        second = d.cli("submit", str(GATED), "--run-dir", str(tmp_path / "two"), "--n", "4", "--gate",
                       str(gate), "--no-daemon", "--json", check=True)
        run2 = json.loads(second.stdout.strip().splitlines()[-1])["run_id"]
        with d.client() as c:
            wait_for(lambda: c.status(run2).tasks[1].counts.get("running", 0) == 4, timeout=120,
                     what="the second run's elements to start")
        filler = _fill(state)
        gate.write_text("go")  # elements finish now: their transitions cannot be written
        with d.client() as c:
            ping = wait_for(lambda: (p := c.ping())["store"]["writable"] is False and p, timeout=120,
                            what="ping to report the unwritable store")
            assert ping["store"]["error"].startswith("disk full"), ping
            stats = c.stats()
            assert stats["store"]["writable"] is False and stats["store"]["backlog"] > 0
            status = c.status(run2)  # reads work
            assert status.raw["store"]["writable"] is False
            assert [r.id for r in c.runs()] and c.status(run_id).state == "succeeded"
            with pytest.raises(StoreUnavailableError) as info:
                c.submit(c.describe(run_id), {"n": 1}, str(tmp_path / "three"))
            assert "disk full" in info.value.message and "nothing was changed" in info.value.message
        shown = d.cli("status", run2)
        assert "UNWRITABLE" in shown.stdout and "disk full" in shown.stdout
        assert "cannot write its state database: disk full" in d.cli("ping").stderr
        assert "store      UNWRITABLE since" in d.cli("stats").stdout
        assert "cannot write the state database" in d.log()
        filler.unlink()  # space is back
        with d.client() as c:
            wait_for(lambda: c.ping()["store"]["writable"], timeout=60, what="the store to recover")
            wait_for(lambda: c.status(run2).state == "succeeded", timeout=120, what="the second run to finish")
            third = c.submit(c.describe(run_id), {"n": 2}, str(tmp_path / "three"))
            wait_for(lambda: c.status(third.run_id).state == "succeeded", timeout=120, what="a new run")
        assert d.stop() == 0
        d.start()  # everything acknowledged survived: the second run's results are all on disk
        with d.client() as c:
            st = c.status(run2)
            assert st.state == "succeeded" and st.tasks[1].counts == {"succeeded": 4}
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(timeout=30)
        subprocess.run(["umount", "-l", str(state)], capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


@pytest.mark.anyio
async def test_an_unexpected_error_while_encoding_keeps_the_batch_and_is_shown(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A programming error while a batch is encoded (not a data error) must not end the writer and lose the batch:
    it is reported like an unwritable database, and the batch is committed once the fault is gone."""
    import reflowd.store as store_module

    store = Store(tmp_path / "s.sqlite", commit_interval=0.01, retry_initial=0.02, retry_max=0.1)
    await store.open()
    run, inst = _run()
    original = store_module._Batch.encode
    broken = {"on": True}

    def encode(self: object) -> None:
        if broken["on"]:
            raise AttributeError("'NoneType' object has no attribute 'hex'")
        original(self)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module._Batch, "encode", encode)
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.run_writer)
        store.put_run(run)
        store.put_instance(inst)
        store.add_transition(run.id, "a", None, "pending", "ready", {"n": 1}, time.time())
        await _wait(lambda: not store.writable)
        assert store.write_error is not None and "AttributeError" in store.write_error, store.write_error
        failures = store.write_failures
        await _wait(lambda: store.write_failures >= failures + 2)  # the writer is alive and keeps trying
        broken["on"] = False
        with anyio.fail_after(30):
            await store.flush()
        assert store.writable
        tg.cancel_scope.cancel()
    await store.close()
    again = Store(tmp_path / "s.sqlite")
    await again.open()
    assert [r["evidence"] for r in await again.transitions("r1")] == [{"n": 1}]
    assert (await again.load_run("r1")) is not None
    await again.close()
