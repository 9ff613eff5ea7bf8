"""SGEScheduler straight against the real Grid Engine test cluster (no engine)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import anyio
import pytest

from reflowd.schedulers.base import Observation, OptionError, Outcome, Phase, SubmitError, SubmitRequest
from reflowd.schedulers.sge import SGEScheduler
from reflowd.schedulers.sge_commands import SGESettings
from reflowd.transports.local import LocalTransport

pytestmark = [pytest.mark.sge, pytest.mark.anyio]


def request(tmp_path: Path, body: str, **kw: object) -> SubmitRequest:
    tag = "rft" + secrets.token_hex(6)
    script = tmp_path / f"{tag}.sh"
    script.write_text(body)
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / tag).mkdir(exist_ok=True)
    base = dict(tag=tag, run_id="r", task="t", job_dir=str(tmp_path / tag), log_dir=str(tmp_path / "logs"),
                workdir=str(tmp_path), worker_argv=["bash", str(script)], time="00:05:00", mem="200M")
    base.update(kw)
    return SubmitRequest(**base)  # type: ignore[arg-type]


async def until(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await condition()
        if last:
            return last
        await anyio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last {last!r}")


async def scheduler() -> SGEScheduler:
    s = SGEScheduler(LocalTransport(), SGESettings(parallel_environment="smp"))
    await s.probe()
    return s


async def observe(s: SGEScheduler, key: str) -> Observation | None:
    return (await s.query([key.split("_")[0]])).get(key)


async def done(s: SGEScheduler, key: str) -> Observation | None:
    obs = await observe(s, key)
    return obs if obs is not None and obs.phase is Phase.DONE else None


async def test_probe_reads_site_facts(sge_cluster) -> None:
    s = await scheduler()
    facts = s.stats()
    assert facts["version"].startswith("SGE 8.1"), facts
    assert s.max_array_size == 75000 and facts["accounting"] is True
    assert sge_cluster.parallel_environment in facts["parallel_environments"]
    assert "warning" not in facts
    # Limits (issue #14): no max_u_jobs set; all.q has no h_rt/h_vmem of its own, so nothing caps escalation.
    assert facts["max_queued"] is None and facts["queue_caps"]["all.q"] == {"max_time": None, "max_mem": None}
    assert facts["max_time"] is None and facts["max_mem"] is None


async def test_array_maps_task_ids_to_indices_and_logs(sge_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    out = tmp_path / "out"
    out.mkdir()
    body = f'echo "$@" > {out}/"$2"; echo "stdout of $2"; echo "stderr of $2" >&2\n'
    req = request(tmp_path, body, indices=list(range(12)), array_parallelism=4)
    job = await s.submit(req)
    keys = [req.element_key(job, i) for i in req.indices]

    async def all_done():
        before = s.queries
        obs = await s.query([job])
        assert s.queries == before + 1
        return all(k in obs and obs[k].phase is Phase.DONE for k in keys) and obs

    obs = await until(all_done, what="12 elements to finish")
    assert {obs[k].outcome for k in keys} == {Outcome.COMPLETED}
    assert sorted(int(p.name) for p in out.iterdir()) == list(range(12))
    assert (out / "7").read_text().strip() == "--index 7"
    assert (tmp_path / "logs" / f"t.{req.tag}.7.out").read_text() == "stdout of 7\n"
    assert (tmp_path / "logs" / f"t.{req.tag}.7.err").read_text() == "stderr of 7\n"
    assert "#$ -tc 4" in (Path(req.job_dir) / "job.sh").read_text()


async def test_uneven_indices_and_offset_run_exactly_those_elements(sge_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    out = tmp_path / "out"
    out.mkdir()
    req = request(tmp_path, f'echo "$@" > {out}/"$2"\n', indices=[1000, 1003, 1004, 1009], index_offset=1000)
    job = await s.submit(req)
    keys = [req.element_key(job, i) for i in req.indices]
    assert keys == [f"{job}_0", f"{job}_3", f"{job}_4", f"{job}_9"]

    async def all_done():
        obs = await s.query([job])
        return all(k in obs and obs[k].phase is Phase.DONE for k in keys) and obs

    obs = await until(all_done, what="four elements to finish")
    assert {obs[k].outcome for k in keys} == {Outcome.COMPLETED}
    assert sorted(int(p.name) for p in out.iterdir()) == [1000, 1003, 1004, 1009], "the tasks in between did nothing"


async def test_exit_status_timeout_and_absent(sge_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    failing = await s.submit(request(tmp_path, "exit 4\n"))
    slow = await s.submit(request(tmp_path, "sleep 120\n", time="00:00:03"))
    obs = await until(lambda: done(s, failing), what="the job to fail")
    assert obs.outcome is Outcome.FAILED and obs.exit_code == "4", obs
    obs = await until(lambda: done(s, slow), what="the job to hit h_rt")
    assert obs.outcome is Outcome.TIMEOUT and "h_rt" in (obs.reason or ""), obs
    assert (await s.query(["99999999"])) == {}, "an id Grid Engine does not know is absent, not an error"


async def test_cancel_single_tasks_then_the_array_and_find_by_tag(sge_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    req = request(tmp_path, "sleep 120\n", indices=[0, 1, 2, 3])
    job = await s.submit(req)
    found = await s.find_tags([req.tag, "rfnosuchtag000"])
    assert [j.job_id for j in found[req.tag]] == [job] and found[req.tag][0].active
    assert found["rfnosuchtag000"] == []

    async def all_running():
        obs = await s.query([job])
        return all(obs.get(f"{job}_{i}") and obs[f"{job}_{i}"].phase is Phase.RUNNING for i in range(4))

    await until(all_running, what="four running elements")
    await s.cancel([f"{job}_1", f"{job}_2"])
    cancelled = await until(lambda: done(s, f"{job}_1"), what="element 1 to be cancelled")
    assert cancelled.outcome is Outcome.CANCELLED and "qdel" in (cancelled.reason or ""), cancelled
    obs = await s.query([job])
    assert obs[f"{job}_0"].phase is Phase.RUNNING, "the other elements go on"
    await s.cancel([job])
    await until(lambda: done(s, f"{job}_3"), what="the whole array to be cancelled")
    found = await s.find_tags([req.tag])
    assert [(j.job_id, j.active) for j in found[req.tag]] == [(job, False)], "finished jobs are found through qacct"


async def test_held_and_error_states_are_queued_with_a_reason(sge_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    held = await s.submit(request(tmp_path, "true\n", options={"native_args": ["-h"]}))
    broken = await s.submit(request(tmp_path, "true\n", workdir=str(tmp_path / "missing-dir")))
    try:
        obs = await until(lambda: observe(s, held), what="the held job")
        assert obs.phase is Phase.QUEUED and obs.native_state == "hqw" and "hold" in (obs.reason or "")
        obs = await until(lambda: _error_state(s, broken), what="the job to enter Eqw")
        assert obs.phase is Phase.QUEUED and "error state" in (obs.reason or "")
    finally:
        await s.cancel([held, broken])


async def _error_state(s: SGEScheduler, job: str) -> Observation | None:
    obs = await observe(s, job)
    return obs if obs is not None and "E" in (obs.native_state or "") else None


async def test_cpus_use_the_parallel_environment(sge_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    out = tmp_path / "nslots"
    job = await s.submit(request(tmp_path, f'echo "$NSLOTS" > {out}\n', cpus=2))
    obs = await until(lambda: done(s, job), what="the 2-slot job")
    assert obs.outcome is Outcome.COMPLETED and out.read_text().strip() == "2"
    bare = SGEScheduler(LocalTransport(), SGESettings(parallel_environment=None))
    with pytest.raises(SubmitError) as info:
        await bare.submit(request(tmp_path, "true\n", cpus=2))
    assert info.value.permanent and "parallel_environment" in str(info.value)


async def test_refusals(sge_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    with pytest.raises(SubmitError) as info:
        await s.submit(request(tmp_path, "true\n", options={"partition": sge_cluster.bad_queue}))
    assert info.value.permanent and "unknown queue" in str(info.value)
    with pytest.raises(SubmitError) as info:
        await s.submit(request(tmp_path, "true\n", options={"account": "no_such_project"}))
    assert info.value.permanent and "project" in str(info.value)
    with pytest.raises(OptionError) as opt:
        s.validate_options({"qos": "high"})
    assert "'qos'" in str(opt.value) and "Grid Engine" in str(opt.value) and "partition" in str(opt.value)
