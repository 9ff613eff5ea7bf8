"""Issue #8, item 6: a damaged state database is refused at start, never started empty over.

The cases the issue found, each made on a copy of a real database written by
the store: truncated to zero bytes, deleted, cut in half, a bad header, 4 KiB
of garbage in the middle. Each is refused with a message saying what to do,
and the damaged file is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from reflow_client.manifest import Manifest, TaskManifest
from reflowd.engine.model import Instance, Run, TaskRun
from reflowd.store import Store, StoreError, marker_path

from .support import DaemonProcess


def _run(run_id: str) -> tuple[Run, Instance]:
    task = TaskManifest(name="a", is_array=False, config={}, dependencies=[])
    manifest = Manifest(workflow="w", tasks=[task], cli_params=[], entrypoint="/x.py", python="python", working_dir="/")
    run = Run(id=run_id, manifest=manifest, params={"pad": "z" * 2000}, run_dir="/tmp", cluster="local")
    inst = Instance(run_id=run_id, task="a", index=None)
    run.tasks["a"] = TaskRun(manifest=task, instances={None: inst})
    return run, inst


@pytest.fixture(scope="module")
def good_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed database holding 200 runs, and its marker."""
    path = tmp_path_factory.mktemp("good") / "reflowd.sqlite"

    async def make() -> None:
        store = Store(path)
        await store.open()
        for i in range(200):
            run, inst = _run(f"r{i}")
            store.put_run(run)
            store.put_instance(inst)
            store.add_transition(run.id, "a", None, "pending", "ready", {"i": i}, time.time())
        await store._commit_pending()
        await store.close()

    anyio.run(make)
    assert marker_path(path).exists() and path.stat().st_size > 100 * 4096
    return path


def _zero(p: Path) -> None:
    p.write_bytes(b"")


def _delete(p: Path) -> None:
    p.unlink()


def _half(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _half_unaligned(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 + 1234])


def _header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[0:16] = b"not a database!!"
    p.write_bytes(bytes(data))


def _garbage_at(offset: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        data = bytearray(p.read_bytes())
        at = offset(len(data))
        data[at : at + 4096] = hashlib.sha512(b"seed").digest() * 64  # 4 KiB, the same every run
        p.write_bytes(bytes(data))

    return damage


CASES = {
    "zero bytes": (_zero, "is empty (0 bytes), but a database with runs was there before"),
    "deleted": (_delete, "is missing, but a database with runs was there before"),
    "half truncated": (_half, "is cut short"),
    "truncated mid-page": (_half_unaligned, "is cut short"),
    "bad header": (_header, "is not an SQLite database (its header is wrong)"),
    "garbage page 3": (_garbage_at(lambda n: 2 * 4096), "fails SQLite's integrity check"),
    "garbage mid-file": (_garbage_at(lambda n: n // 2 + 1000), ""),
    "garbage near the end": (_garbage_at(lambda n: n - 3 * 4096 - 77), ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_database_is_refused_with_what_to_do(good_db: Path, tmp_path: Path, case: str) -> None:
    damage, expected = CASES[case]
    copy = tmp_path / "state"
    shutil.copytree(good_db.parent, copy)
    path = copy / good_db.name
    damage(path)
    before = path.read_bytes() if path.exists() else None

    async def attempt() -> None:
        await Store(path).open()

    with pytest.raises(StoreError) as info:
        anyio.run(attempt)
    message = str(info.value)
    assert expected in message, message
    assert f"state database {path}" in message and "reflowd will not start over it" in message
    assert "Restore it from a backup" in message and f"move {path}, {path}-wal and {marker_path(path)} aside" in message
    assert "\n" not in message
    after = path.read_bytes() if path.exists() else None
    assert after == before, "the damaged file is left as it was"


def test_a_database_without_marker_is_adopted_and_a_fresh_one_is_made(tmp_path: Path, good_db: Path) -> None:
    """Existing state directories (no marker yet) keep working; a first start makes an empty database."""
    copy = tmp_path / "old"
    shutil.copytree(good_db.parent, copy)
    marker_path(copy / good_db.name).unlink()

    async def check() -> None:
        store = Store(copy / good_db.name)
        await store.open()
        assert len(await store.list_runs(limit=1000)) == 200
        await store.close()
        fresh = Store(tmp_path / "new" / "reflowd.sqlite")
        await fresh.open()
        assert await fresh.list_runs() == []
        await fresh.close()

    anyio.run(check)
    assert marker_path(copy / good_db.name).exists() and marker_path(tmp_path / "new" / "reflowd.sqlite").exists()


def test_an_unrelated_sqlite_file_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "reflowd.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE photos (id INTEGER)")

    with pytest.raises(StoreError, match="is an SQLite database but not reflow's"):
        anyio.run(Store(path).open)


def test_reflowd_refuses_to_start_on_a_truncated_database(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", config="")
    d.start()
    with d.client() as c:
        c.ping()
    assert d.stop() == 0
    db = d.state_dir / "reflowd.sqlite"
    assert db.exists() and marker_path(db).exists()
    os.truncate(db, 0)
    result = subprocess.run([sys.executable, "-m", "reflowd"], env=d.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "is empty (0 bytes), but a database with runs was there before" in result.stderr
    assert "Traceback" not in result.stderr
    assert not d.socket.exists() and db.stat().st_size == 0
