"""Peak memory in an out-of-memory cause, where the scheduler reports it (issue #14): Slurm's per-step
``MaxRSS`` (asked with one more ``sacct`` only when a job ran out of memory), PBS's ``resources_used.mem``
and ``exec_host``, Grid Engine's ``maxvmem`` (tests/test_sge_parsers.py, tests/test_failures_sge.py).

Outputs are in the formats the manuals document: ``sacct -n -P -o JobID,MaxRSS`` prints one line per
step with sizes in K/M/G, the allocation line has no MaxRSS; ``qstat -f`` prints ``resources_used.mem =
4400kb`` (text) or nests it under ``resources_used`` (``-F json``).
"""

from __future__ import annotations

from typing import Any

import anyio

from reflowd.engine import causes
from reflowd.schedulers import pbs_commands as pc
from reflowd.schedulers import slurm_commands as sc
from reflowd.schedulers.base import Outcome, Phase, size_bytes, size_text
from reflowd.transports.base import CommandResult

SACCT_X = ("42_3|rfab|OUT_OF_MEMORY|0:125|None|c7\n42_4|rfab|COMPLETED|0:0|None|c8\n"
           "43|rfcd|FAILED|1:0|None|c9\n44|rfef|OUT_OF_MEMORY|0:125|None|c2\n")
SACCT_STEPS = ("42_3|\n42_3.batch|2097152K\n42_3.extern|1024K\n42_3.0|3.5G\n"
               "44|\n44.batch|812.50M\n44.extern|0\n")


def test_sizes_as_schedulers_print_them() -> None:
    assert size_bytes("2097152K") == 2 * 1024 ** 3 and size_bytes("4400kb") == 4400 * 1024
    assert size_bytes("379.027MB") == 379.027 * 1024 ** 2 and size_bytes("1.5G") == 1.5 * 1024 ** 3
    assert size_bytes("") is None and size_bytes("n/a") is None
    assert size_text(2 * 1024 ** 3) == "2048M" and size_text(12.5 * 1024 ** 3) == "12.5G"
    assert size_text(0) is None and size_text(None) is None and size_text(2048) == "2K"


def test_slurm_peaks_come_from_the_largest_step_of_each_job_that_ran_out_of_memory() -> None:
    assert sc.out_of_memory_jobs(SACCT_X) == ["42_3", "44"]
    assert sc.out_of_memory_jobs("43|rfcd|FAILED|1:0|None|c9\n") == []
    assert sc.render_sacct_peaks(["42_3", "44"]) == ["sacct", "-n", "-P", "-o", "JobID,MaxRSS", "-j", "42_3,44"]
    assert sc.parse_peaks(SACCT_STEPS) == {"42_3": "3584M", "44": "812M"}
    answers = sc.with_peaks(sc.parse_sacct_answers(SACCT_X), sc.parse_peaks(SACCT_STEPS))
    assert answers["42_3"].peak_mem == "3584M" and answers["44"].peak_mem == "812M"
    assert answers["42_4"].peak_mem is None and answers["42_3"].node == "c7"
    text = causes.describe(causes.from_observation(answers["42_3"]), {"mem": "2G"})
    assert text == "out of memory (limit 2G), peak 3584M on node c7", text


class Sacct:
    """Answers ``sacct`` from the two outputs above; the peak query can be made to fail."""

    def __init__(self, peaks_fail: bool = False) -> None:
        self.peaks_fail = peaks_fail
        self.ran: list[list[str]] = []

    async def run(self, argv: list[str], *, timeout: float = 30.0, idempotent: bool = True) -> Any:
        self.ran.append(argv)
        assert argv[0] == "sacct", argv
        if "-X" in argv:
            return CommandResult(0, SACCT_X, "")
        if self.peaks_fail:
            raise TimeoutError
        return CommandResult(0, SACCT_STEPS, "")


def test_a_slurm_poll_asks_for_peaks_only_when_a_job_ran_out_of_memory_and_survives_without_them() -> None:
    from reflowd.schedulers.slurm import SlurmScheduler

    transport = Sacct()
    s = SlurmScheduler(transport)  # type: ignore[arg-type]
    s.accounting = True
    s._live_reasons = _nothing  # type: ignore[method-assign]  # no pending jobs here: no squeue for reasons
    answers = anyio.run(s.query, ["42_3", "42_4", "43", "44"])
    assert [a[:2] for a in transport.ran] == [["sacct", "-X"], ["sacct", "-n"]]
    assert transport.ran[1][-1] == "42_3,44" and answers["42_3"].peak_mem == "3584M"
    failing = Sacct(peaks_fail=True)
    s = SlurmScheduler(failing)  # type: ignore[arg-type]
    s.accounting = True
    s._live_reasons = _nothing  # type: ignore[method-assign]
    answers = anyio.run(s.query, ["42_3"])
    assert answers["42_3"].outcome is Outcome.OUT_OF_MEMORY and answers["42_3"].peak_mem is None


async def _nothing(observations: Any) -> None:
    return None


PBS_TEXT = """Job Id: 1042.pbs01
    Job_Name = rfab
    job_state = F
    substate = 93
    Exit_status = -27
    exec_host = node7/0*2+node8/0*2
    resources_used.cput = 00:00:09
    resources_used.mem = 4194304kb
    resources_used.vmem = 5242880kb
    resources_used.walltime = 00:00:12

Job Id: 1043.pbs01
    Job_Name = rfcd
    job_state = R
    exec_host = node9/1
    resources_used.mem = 1024kb
"""


def test_pbs_finished_jobs_carry_their_peak_memory_and_first_host() -> None:
    records = pc.parse_qstat_text(PBS_TEXT)
    done = pc.observe(records["1042.pbs01"])
    assert done.phase is Phase.DONE and done.outcome is Outcome.OUT_OF_MEMORY, done
    assert done.peak_mem == "4096M" and done.node == "node7"
    running = pc.observe(records["1043.pbs01"])
    assert running.phase is Phase.RUNNING and running.peak_mem is None and running.node is None
    nested = pc.observe({"job_state": "F", "substate": "92", "Exit_status": 0, "exec_host": "n1/0",
                         "resources_used": {"mem": "2097152kb", "walltime": "00:01:00"}})
    assert nested.peak_mem == "2048M" and nested.node == "n1"
    assert pc.observe({"job_state": "F", "substate": "92", "Exit_status": 0}).peak_mem is None


def test_lsf_finished_jobs_carry_their_peak_memory_and_first_host() -> None:
    from reflowd.schedulers import lsf_commands as lc

    assert "max_mem" in lc.BJOBS_FIELDS and "exec_host" in lc.BJOBS_FIELDS
    over = lc.observe_record({"STAT": "EXIT", "EXIT_CODE": "130", "EXIT_REASON": "TERM_MEMLIMIT: job killed after "
                              "reaching LSF memory usage limit", "EXEC_HOST": "4*hostA:2*hostB", "MAX_MEM": "1.2 Gbytes"})
    assert over.outcome is Outcome.OUT_OF_MEMORY and over.peak_mem == "1229M" and over.node == "hostA", over
    assert lc.peak_text("35 Mbytes") == "35M" and lc.peak_text("-") is None and lc.peak_text("") is None
    running = lc.observe_record({"STAT": "RUN", "EXEC_HOST": "hostC", "MAX_MEM": "2 Mbytes"})
    assert running.phase is Phase.RUNNING and running.node is None and running.peak_mem is None
