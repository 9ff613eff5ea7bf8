"""An element whose packed job died runs its next attempt alone, also after reflowd restarts (#15).

When a packed job dies, the element it was running fails with the job's cause; its next attempt (the
automatic retry, or the user's ``retry``) runs unpacked, so that one bad element cannot take a slice of
others down again. The wish is kept in the store with the failure (``Instance.alone``, schema 4), not
only in the daemon's memory. The deterministic simulation checks it across daemon crashes
(tests/sim/packed.py, in tests/test_simulation.py); here: the pure rule, the schema upgrade, and a real
run on the local scheduler with a restart between the deaths and the retry.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections import Counter
from pathlib import Path


from reflowd.driver import packing
from reflowd.engine.decide import Decision
from reflowd.engine.model import Instance
from reflowd.engine.states import State
from reflowd.store import INSTANCES, SCHEMA_VERSION

from .support import ROOT, DaemonProcess, open_and_close_store, wait_for

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"


def test_the_attempt_after_a_packed_death_runs_alone() -> None:
    inst = Instance(run_id="r", task="work", index=3, attempt=2)
    died = packing.died_packed(inst, Decision(State.NODE_FAIL, {"source": "scheduler"}, {"cause": {"kind": "node_fail"}}))
    assert died.state is State.NODE_FAIL and died.fields == {"cause": {"kind": "node_fail"}, "alone": 3}
    assert not packing.runs_alone(inst), "the attempt that died is not the one to run alone"
    inst.alone, inst.attempt = 3, 3
    assert packing.runs_alone(inst)
    inst.attempt = 4
    assert not packing.runs_alone(inst), "only the next attempt: a later one packs as usual"


def test_a_schema_3_database_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"

    open_and_close_store(path)
    with sqlite3.connect(path) as db:  # as schema 3 left it: no `alone` column
        keep = [r[1] for r in db.execute("PRAGMA table_info(instances)") if r[1] != "alone"]
        db.executescript(
            f"CREATE TABLE old AS SELECT {', '.join(keep)} FROM instances; DROP TABLE instances; "
            f"ALTER TABLE old RENAME TO instances; UPDATE meta SET value='3' WHERE key='schema_version';"
            f"INSERT INTO instances (run_id, task, idx, state, attempt, updated_at) VALUES ('r', 't', 2, 'failed', 1, 0);")
    open_and_close_store(path)
    with sqlite3.connect(path) as db:
        assert set(INSTANCES.names) <= {r[1] for r in db.execute("PRAGMA table_info(instances)")}
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert db.execute("SELECT idx, alone FROM instances").fetchall() == [(2, None)]


def executions(run_dir: Path) -> list[tuple[str, int]]:
    path = run_dir / "executions.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(line.split(" pid=")[0], int(line.split(" pid=")[1])) for line in lines]


def pid_of(run_dir: Path, label: str, nth: int = 1) -> int | None:
    found = [pid for name, pid in executions(run_dir) if name == label]
    return found[nth - 1] if len(found) >= nth else None


def test_a_retry_after_a_restart_runs_alone_on_the_local_scheduler(tmp_path: Path) -> None:
    """One worker slot and ``pack = 4``: elements 0-3 and 4-7 go out as two packed jobs, one after the other.
    Killing the processes running elements 1 and 5 fails those two (the others finish or run again). After a
    restart of reflowd, ``retry`` makes both ready together: packed, they would share one job (one slot, no
    spreading); run alone, each gets its own."""
    d = DaemonProcess(tmp_path / "d", config='[clusters.local]\nscheduler = "local"\nmax_workers = 1\npack = 4\n')
    d.start()
    try:
        run_dir = tmp_path / "run"
        out = d.cli("submit", str(COUNTING), "--run-dir", str(run_dir), "--no-daemon", "--json", "--n", "8",
                    "--delay", "1.5", check=True)
        run = json.loads(out.stdout.strip().splitlines()[-1])["run_id"]
        for victim in (1, 5):
            pid = wait_for(lambda v=victim: pid_of(run_dir, f"work {v}"), timeout=240, what=f"element {victim} to start")
            os.kill(pid, signal.SIGKILL)
        with d.client() as c:
            wait_for(lambda: c.status(run).state in ("failed", "succeeded"), timeout=300, interval=0.5,
                     what="the run to end")
            insts = {i.index: i for i in c.status(run, "work").instances or []}
        assert {i: s.state for i, s in insts.items()} == {i: "failed" if i in (1, 5) else "succeeded" for i in range(8)}
        assert len({insts[i].job_id for i in (0, 1, 2, 3)} - {None}) <= 2, "elements shared packed jobs"

        d.stop()
        d.start()
        d.cli("retry", run, check=True)
        with d.client() as c:
            wait_for(lambda: c.status(run).state in ("failed", "succeeded"), timeout=300, interval=0.5,
                     what="the retried run to end")
            assert c.status(run).state == "succeeded"
            insts = {i.index: i for i in c.status(run, "work").instances or []}
        assert insts[1].attempt == 2 and insts[5].attempt == 2
        assert insts[1].job_id != insts[5].job_id, (insts[1].job_id, insts[5].job_id)
        assert pid_of(run_dir, "work 1", 2) != pid_of(run_dir, "work 5", 2), "each retry in a process of its own"
        ran = Counter(name for name, _ in executions(run_dir))
        assert ran["work 1"] == 2 and ran["work 5"] == 2 and all(ran[f"work {i}"] == 1 for i in (0, 4, 6, 7)), ran
    finally:
        d.stop()
