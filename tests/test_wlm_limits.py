"""Queue limits and escalation caps read from PBS and LSF (issue #14), on outputs in their documented
formats (tests/data/{pbs,lsf}/) and through the emulators (tests/emulators/), which follow the manuals.

Flux has no per-user queue limit of its own (flux-accounting's ``max_active_jobs`` is a plugin's): the
``max_queued`` of the cluster's configuration is the way there (docs/failures.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from reflowd.driver.queue_limits import is_limit_refusal
from reflowd.schedulers import lsf_commands as lc
from reflowd.schedulers import pbs_commands as pc

from .cluster.wlm import WLM
from .test_scheduler_engine import SLURMY, kill, start_daemon, status, submit_api

DATA = Path(__file__).parent / "data"


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_pbs_limits_for_the_user_from_server_and_default_queue() -> None:
    server = pc.parse_server_attributes(read("pbs/qstat_Bf_limits.txt"))
    queues = pc.parse_queue_attributes(read("pbs/qstat_Qf_limits.txt"))
    assert set(queues) == {"workq", "long"}
    # server: max_queued 100 (generic), queued_jobs_threshold 80; workq: 200 generic but 50 for alice.
    assert pc.queue_limit(server, queues["workq"], "bob") == 80
    assert pc.queue_limit(server, queues["workq"], "alice") == 50
    assert pc.queue_limit(server, queues["long"], "bob") == 80, "max_queuable 1000 is above it"
    assert pc.queue_limit({}, None, "bob") is None
    assert pc.limit_for_user("[u:PBS_GENERIC=10],[o:PBS_ALL=5]", "bob") == 5
    assert pc.limit_for_user("[g:staff=3]", "bob") is None, "group entries are not counted"
    assert pc.queue_caps(queues["workq"]) == {"max_time": "2-00:00:00", "max_mem": f"{192 * 1024}M"}
    assert pc.queue_caps(queues["long"]) == {"max_time": "14-00:00:00", "max_mem": None}
    assert pc.size_megabytes("1048576kb") == 1024 and pc.size_megabytes("2097152") == 2
    assert pc.walltime_seconds("01:30") == 90, "[[hours:]minutes:]seconds" and pc.walltime_seconds("junk") is None


def test_pbs_refusals_over_a_limit_wait_instead_of_failing() -> None:
    assert is_limit_refusal(read("pbs/qsub_max_queued.stderr"))
    assert is_limit_refusal("qsub: would exceed queue generic's per-user limit of jobs in 'Q' state")


def test_lsf_max_pend_jobs() -> None:
    assert lc.queue_limit(lc.parse_params(read("lsf/bparams_a_max_pend.txt"))) == 500
    assert lc.queue_limit(lc.parse_params(read("lsf/bparams_a.txt"))) is None
    assert is_limit_refusal("Pending job threshold reached. Retrying in 60 seconds...")


@pytest.mark.parametrize("wlm_name,knob", [("pbs-emu", "WLM_EMU_MAX_QUEUED"), ("lsf-emu", "WLM_EMU_MAX_PEND_JOBS")],
                         indirect=["wlm_name"])
def test_the_probed_limit_keeps_a_fan_out_under_it(wlm: WLM, knob: str, tmp_path: Path) -> None:
    """The emulator holds the limit (PBS's qsub refuses past it); reflow reads it and stays under it."""
    extra = {knob: "3", "WLM_EMU_MAX_WALLTIME": "02:00:00"}
    d = start_daemon(wlm, tmp_path / "d", extra_env=extra)
    try:
        run_id = submit_api(d, SLURMY, tmp_path / "run", n=9, hold=0.5)
        most = 0
        while status(d, run_id).run.state == "running":
            # what the scheduler holds: jobs (array elements), where the elements of one packed slice share one
            # (a submission in flight is not in the queue yet; the emulator refuses whatever goes past the cap)
            live = {i.job_id for t in ("items", "work", "victim") for i in status(d, run_id, t).instances or []
                    if i.state in ("queued", "running") and i.job_id}
            most = max(most, len(live))
            time.sleep(0.2)
        assert status(d, run_id).run.state == "succeeded", status(d, run_id).failures
        cluster = status(d, run_id).cluster or {}
        assert cluster.get("max_queued") == 3, cluster
        assert 0 < most <= 3, most
        assert not cluster.get("limit_refusals"), cluster
        if wlm.env.scheduler == "pbs":
            with d.client() as c:
                probe = c.stats()["clusters"]["hpc"]["scheduler_stats"]
            assert probe["queue_caps"]["workq"]["max_time"] == "02:00:00", probe
    finally:
        kill(d)
