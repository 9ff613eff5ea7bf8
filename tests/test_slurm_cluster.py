"""SlurmScheduler straight against the real test cluster (no engine)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import anyio
import pytest

from reflowd.budget import Budget, MeteredTransport
from reflowd.schedulers.base import Outcome, Phase, SubmitError, SubmitRequest
from reflowd.schedulers.slurm import REASON_REFRESH, SlurmScheduler
from reflowd.transports.local import LocalTransport

pytestmark = [pytest.mark.slurm, pytest.mark.anyio]


def request(tmp_path: Path, body: str, partition: str, **kw: object) -> SubmitRequest:
    script = tmp_path / "w.sh"
    script.write_text(body)
    tag = "rft" + secrets.token_hex(6)
    (tmp_path / "logs").mkdir(exist_ok=True)
    base = dict(tag=tag, run_id="r", task="t", job_dir=str(tmp_path / tag), log_dir=str(tmp_path / "logs"),
                workdir=str(tmp_path), worker_argv=["bash", str(script)], time="00:05:00", mem="100M",
                options={"partition": partition})
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


async def scheduler(budget: Budget | None = None) -> SlurmScheduler:
    """The adapter on a metered transport, as the daemon builds it: every command it runs is charged."""
    s = SlurmScheduler(MeteredTransport(LocalTransport(), budget or Budget(6000)))
    await s.probe()
    return s


async def test_probe_reads_site_facts(slurm_cluster) -> None:
    s = await scheduler()
    assert s.max_array_size == 1001
    assert s.accounting is slurm_cluster.accounting


async def test_array_runs_every_element_with_one_query_per_poll(slurm_cluster, tmp_path: Path) -> None:
    """One poll is one status command for all 20 elements. The adapter may add an extra command only
    where it says so (a live pending-reason refresh, at most every REASON_REFRESH seconds; a fall-back
    when sacct fails), and every command, extras included, is charged to the budget."""
    budget = Budget(6000)
    s = await scheduler(budget)
    out = tmp_path / "out"
    out.mkdir()
    req = request(tmp_path, f'echo "$@" > {out}/"$2"\n', slurm_cluster.partition, indices=list(range(20)),
                  array_parallelism=5)
    job = await s.submit(req)
    keys = [req.element_key(job, i) for i in req.indices or []]
    started = time.monotonic()
    polls = 0

    async def all_done():
        nonlocal polls
        charged, queries, extras = budget.charged, s.queries, s.reason_refreshes + s.fallbacks
        obs = await s.query([job])
        polls += 1
        assert s.queries == queries + 1
        assert budget.charged - charged == 1 + (s.reason_refreshes + s.fallbacks - extras), budget.commands
        return all(k in obs and obs[k].phase is Phase.DONE for k in keys) and obs

    obs = await until(all_done, what="20 elements to finish")
    assert s.fallbacks == 0, "sacct worked: no poll needed a second status command"
    assert s.reason_refreshes <= 1 + (time.monotonic() - started) / REASON_REFRESH
    assert s.queries == polls
    assert {obs[k].outcome for k in keys} == {Outcome.COMPLETED}
    assert sorted(int(p.name) for p in out.iterdir()) == list(range(20))
    assert (out / "7").read_text().strip() == "--index 7"


async def test_failed_job_and_absent_job(slurm_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    job = await s.submit(request(tmp_path, "exit 4\n", slurm_cluster.partition))
    obs = await until(lambda: _done(s, job), what="the job to fail")
    assert obs.outcome is Outcome.FAILED
    assert (await s.query(["99999999"])) == {}, "an id Slurm does not know is absent, not an error"


async def _done(s: SlurmScheduler, key: str):
    obs = (await s.query([key.split("_")[0]])).get(key)
    return obs if obs is not None and obs.phase is Phase.DONE else None


async def test_cancel_single_elements_and_find_by_tag(slurm_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    req = request(tmp_path, "sleep 120\n", slurm_cluster.partition, indices=[0, 1, 2, 3])
    job = await s.submit(req)
    found = await s.find_tags([req.tag, "rfnosuchtag000"])
    assert [j.job_id for j in found[req.tag]] == [job] and found[req.tag][0].active
    assert found["rfnosuchtag000"] == []

    async def all_running():
        obs = await s.query([job])
        return all(obs.get(f"{job}_{i}") and obs[f"{job}_{i}"].phase is Phase.RUNNING for i in range(4))

    # Pending elements that are cancelled vanish from squeue (never materialised): cancel running ones.
    await until(all_running, what="four running elements")
    await s.cancel([f"{job}_1", f"{job}_2"])
    cancelled = await until(lambda: _done(s, f"{job}_1"), what="element 1 to be cancelled")
    assert cancelled.outcome is Outcome.CANCELLED
    obs = await s.query([job])
    assert obs[f"{job}_0"].phase is not Phase.DONE, "the other elements go on"
    await s.cancel([job])
    await until(lambda: _done(s, f"{job}_3"), what="the whole array to be cancelled")


async def test_pending_reason_on_a_down_partition(slurm_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    job = await s.submit(request(tmp_path, "true\n", slurm_cluster.bad_partition))
    try:
        obs = await until(lambda: _reason(s, job), what="a pending reason")
        assert obs.phase is Phase.QUEUED and obs.reason == "PartitionDown"
    finally:
        await s.cancel([job])


async def _reason(s: SlurmScheduler, job: str):
    obs = (await s.query([job])).get(job)
    return obs if obs is not None and obs.reason else None


async def test_refusals_are_permanent_submit_errors(slurm_cluster, tmp_path: Path) -> None:
    s = await scheduler()
    with pytest.raises(SubmitError) as info:
        await s.submit(request(tmp_path, "true\n", "no_such_partition"))
    assert info.value.permanent and "partition" in str(info.value).lower()
    if slurm_cluster.accounting:
        with pytest.raises(SubmitError) as info:
            await s.submit(request(tmp_path, "true\n", slurm_cluster.partition,
                                   options={"partition": slurm_cluster.partition, "account": "no_such_account"}))
        assert info.value.permanent and "Invalid account" in str(info.value)
