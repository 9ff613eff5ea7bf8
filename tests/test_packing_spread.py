"""Automatic packing spreads a fan-out over the job slots a cluster has (#15).

Packing toward a target can put a fan-out into fewer jobs than the cluster runs at once (300 one-second
elements toward one minute made 6 jobs for the test partition's 8 slots: 1.45 times the ideal). The sizing
(:func:`reflowd.driver.packing.spread`) splits such a batch into one job per slot, but never into jobs
shorter than a floor of predicted work; the slots come from the local scheduler's workers or a Slurm
partition's CPUs and oversubscription (read by the probe), within ``array_parallelism`` and the queue limit.
The real-cluster run that shows the gain is ``bench/packing_slurm.py --elements 300 --seconds 1`` (figures
in docs/packing.md).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from reflow_client.pack import PackSpec
from reflowd.driver import packing
from reflowd.driver.queue_limits import QueueLimit
from reflowd.engine.durations import estimate
from reflowd.schedulers import slurm_commands as sc

DATA = Path(__file__).parent / "data" / "slurm"


def test_a_short_fan_out_fills_every_slot_of_a_batch_cluster() -> None:
    one_second = estimate([1.0] * 10)
    idx = list(range(300))
    before = packing.plan(idx, PackSpec(target=60), one_second, time_limit=300)
    assert before is not None and len(before.slices) == 5, "toward one minute alone: 5 jobs of 60"
    found = packing.plan(idx, PackSpec(target=60), one_second, time_limit=300, parallel=8,
                         min_work=packing.MIN_BATCH_WORK, blind=False)
    assert found is not None and len(found.slices) == 8 and "spread over 8 jobs" in found.why
    assert sorted(i for piece in found.slices for i in piece) == idx
    assert max(map(len, found.slices)) - min(map(len, found.slices)) <= 1


def test_spreading_never_makes_jobs_below_the_floor() -> None:
    one_second = estimate([1.0] * 10)
    # 100 s of work, 8 slots, a 30 s floor: 3 jobs (33 s each), not 8 of 12.5 s.
    assert packing.spread(2, 100, 8, one_second, min_work=30) == 3
    # 20 s of work: one job, as packed; spreading would only pay scheduler overhead.
    assert packing.spread(1, 20, 8, one_second, min_work=30) == 1
    # Already as many jobs as slots (the 10,000-element case): unchanged.
    assert packing.spread(170, 10_000, 8, one_second, min_work=30) == 170
    # A wide job runs `width` elements at once: its work is halved.
    assert packing.spread(1, 120, 8, one_second, width=2, min_work=30) == 2
    # No history: a batch scheduler keeps the packing it was asked for; the local scheduler spreads (a fork).
    assert packing.spread(1, 50, 8, None, min_work=30, blind=False) == 1
    assert packing.spread(1, 50, 8, None, min_work=2) == 8
    assert packing.spread(1, 3, 8, None) == 3, "never more jobs than elements"
    assert packing.spread(2, 300, None, one_second) == 2, "slots unknown: unchanged"


@given(count=st.integers(1, 50), n=st.integers(1, 2000), parallel=st.one_of(st.none(), st.integers(1, 64)),
       mean=st.floats(0.001, 100), width=st.integers(1, 4), floor=st.floats(0.5, 120), blind=st.booleans())
def test_spread_bounds(count: int, n: int, parallel: int | None, mean: float, width: int, floor: float,
                       blind: bool) -> None:
    est = estimate([mean] * 5)
    jobs = packing.spread(count, n, parallel, est, width=width, min_work=floor, blind=blind)
    assert jobs >= count, "spreading only ever adds jobs"
    if jobs > count:
        assert parallel is not None and jobs <= min(n, parallel), "at most one job per slot and per element"
        assert n * est.mean / width / jobs >= floor * (1 - 1e-9), "no spread job below the floor of work"


def test_slurm_partition_slots_from_scontrol() -> None:
    # Recorded on tests/cluster/slurm.sh's cluster: 2 CPUs, OverSubscribe=FORCE:4; `drained` is down.
    assert sc.parse_partition_slots((DATA / "scontrol_show_partition.txt").read_text()) == {"debug": 8}
    site = sc.parse_partition_slots((DATA / "scontrol_show_partition_site.txt").read_text())
    assert site["compute"] == 256 and site["bigmem"] == 128
    assert sc.parse_partition_slots("garbage\nPartitionName=p TotalCPUs=lots State=UP\n") == {}
    assert sc.parse_partition_slots("PartitionName=q TotalCPUs=4 OverSubscribe=YES:4 State=UP") == {"q": 4}


def packer(probe: dict, *, max_queued: int | None = None, max_workers: int | None = None) -> packing.Packer:
    scheduler = SimpleNamespace() if max_workers is None else SimpleNamespace(max_workers=max_workers)
    driver = SimpleNamespace(cluster=SimpleNamespace(scheduler=scheduler, probe=probe),
                             queue_limit=QueueLimit(max_queued))
    return packing.Packer(driver)  # type: ignore[arg-type]


def test_slots_a_task_can_use() -> None:
    probe = {"queue_slots": {"debug": 8, "big": 256}, "default_queue": "debug"}
    assert packer(probe).parallel(None, 1, 1) == 8, "the default partition's slots"
    assert packer(probe).parallel(None, 1, 1, "big") == 256
    assert packer(probe).parallel(None, 2, 1) == 4, "a two-CPU job takes two slots"
    assert packer(probe).parallel(6, 1, 1) == 6, "array_parallelism caps it"
    assert packer(probe, max_queued=3).parallel(None, 1, 1) == 3, "a job over the queue limit would only wait"
    assert packer({}).parallel(None, 1, 1) is None, "not probed (yet): unknown"
    assert packer(probe, max_workers=2).parallel(None, 1, 1) == 2, "the local scheduler's workers"
