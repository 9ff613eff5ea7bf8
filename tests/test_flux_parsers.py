"""Flux: rendering and parsing against outputs in the flux-core manual pages' formats (tests/data/flux/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflowd.schedulers import flux_commands as fc
from reflowd.schedulers.base import OptionError, Outcome, Phase, Presence, SubmitError, SubmitRequest

DATA = Path(__file__).parent / "data" / "flux"
BASE = 248034287616000


def data(name: str) -> str:
    return (DATA / name).read_text()


def request(**kw) -> SubmitRequest:
    base = dict(tag="rf0123456789abcdef", run_id="r1", task="work", job_dir="/runs/x/.reflow/r1/jobs/rf01",
                log_dir="/runs/x/logs", workdir="/runs/x", worker_argv=["python3", "-m", "reflow.worker", "/j"],
                time="00:30:00", mem="4G", cpus=3)
    base.update(kw)
    return SubmitRequest(**base)  # type: ignore[arg-type]


def test_job_ids_in_every_encoding_compare_by_value() -> None:
    value = BASE + 10 * 65536
    spelled = data("submit_ok.txt").strip()
    assert spelled.startswith("ƒ") and fc.id_value(spelled) == value
    assert fc.id_value("f" + spelled[1:]) == value  # FLUX_F58_FORCE_ASCII
    assert fc.id_value(str(value)) == value
    assert fc.id_value(hex(value)) == value
    dothex = f"{value:016x}"
    assert fc.id_value(".".join(dothex[i:i + 4] for i in range(0, 16, 4))) == value
    assert fc.f58(value) == spelled
    for bad in ("", "ƒ0OIl", "12a", "job"):
        assert fc.id_value(bad) is None, bad


def test_singleton_submission_names_the_job_after_its_tag() -> None:
    argv = fc.render_submit(request(options={"queue": "batch"}), "/j/job.sh")
    assert argv[:2] == ["flux", "submit"]
    assert "--job-name=rf0123456789abcdef" in argv and "--cores-per-task=3" in argv
    assert "--time-limit=1800s" in argv and "--queue=batch" in argv and "--cwd=/runs/x" in argv
    assert argv[-2:] == ["/bin/bash", "/j/job.sh"]
    assert not any(a.startswith("--cc") for a in argv)


def test_array_is_one_bulk_submission_with_cc_in_name_and_script() -> None:
    req = request(indices=list(range(20, 30)), index_offset=20)
    argv = fc.render_submit(req, "/j/job.sh")
    assert "--cc=0-9" in argv and "--job-name=rf0123456789abcdef.{cc}" in argv
    script = fc.render_job_script(req)
    assert "index=$(( (FLUX_JOB_CC) + 20 ))" in script
    assert "--cc=0" in fc.render_submit(request(indices=[4]), "/j.sh")


def test_options_and_refusals() -> None:
    argv = fc.render_submit(request(options={"account": "bank1", "signal": "USR1@120",
                                             "native_args": ["--urgency=8", "-o", "cpu-affinity=off"]}), "/j.sh")
    assert "--setattr=system.bank=bank1" in argv and "--signal=USR1@120s" in argv
    assert argv[-5:-2] == ["--urgency=8", "-o", "cpu-affinity=off"]
    for key in ("qos", "mail_user", "mail_type"):
        with pytest.raises(OptionError) as info:
            fc.validate_options({key: "x"})
        assert key in str(info.value) and "Flux" in str(info.value) and "queue" in str(info.value)


def test_submit_output_refusals_and_partial_bulk_submission() -> None:
    assert fc.parse_submit(data("submit_ok.txt"), "", 0, 1) == [data("submit_ok.txt").strip()]
    ids = fc.parse_submit(data("submit_bulk_ok.txt"), "", 0, 4)
    assert sorted(fc.id_value(i) for i in ids) == [BASE + i * 65536 for i in range(4)]
    with pytest.raises(SubmitError) as info:
        fc.parse_submit("", data("submit_bad_queue.stderr"), 1, 1)
    assert info.value.permanent and "queue" in str(info.value)
    with pytest.raises(SubmitError) as info:
        fc.parse_submit("", data("submit_no_broker.stderr"), 1, 1)
    assert not info.value.permanent
    with pytest.raises(SubmitError) as info:
        fc.parse_submit(data("submit_bulk_partial.txt"), data("submit_bulk_partial.stderr"), 1, 4)
    assert not info.value.permanent and "2 of 4" in str(info.value)


JOBS = {job.name: job for job in fc.parse_jobs(data("jobs_states.txt"))}


@pytest.mark.parametrize("name,phase,reason", [
    ("rfdepend", Phase.QUEUED, "waiting for dependencies"),
    ("rfpriority", Phase.QUEUED, "waiting for priority"),
    ("rfsched", Phase.QUEUED, None),
    ("rfheld", Phase.QUEUED, "held (urgency 0)"),
    ("rfrun", Phase.RUNNING, None),
    ("rfcleanup", Phase.RUNNING, "cleaning up"),
])
def test_every_active_state(name: str, phase: Phase, reason: str | None) -> None:
    o = fc.observe(JOBS[name])
    assert o.presence is Presence.PRESENT and o.phase is phase and o.reason == reason and o.outcome is None


@pytest.mark.parametrize("name,outcome,code", [
    ("rfdone", Outcome.COMPLETED, "0"),
    ("rffailed", Outcome.FAILED, "1"),
    ("rfcancelq", Outcome.CANCELLED, "-128"),
    ("rfcancelr", Outcome.CANCELLED, "143"),
    ("rftimeout", Outcome.TIMEOUT, "142"),
    ("rfkilled", Outcome.FAILED, "-9"),
    ("rfexec", Outcome.FAILED, "1"),
    ("rfoom", Outcome.OUT_OF_MEMORY, "137"),
])
def test_inactive_results(name: str, outcome: Outcome, code: str) -> None:
    o = fc.observe(JOBS[name])
    assert o.phase is Phase.DONE and o.outcome is outcome and o.exit_code == code


def test_exception_notes_become_the_reason() -> None:
    assert "lost contact" in (fc.observe(JOBS["rfexec"]).reason or "")
    assert fc.observe(JOBS["rfcancelr"]).reason == "cancel: canceled by user"
    assert fc.observe(JOBS["rffailed"]).reason == "exit code 1"


def test_unknown_state_and_unknown_ids_and_a_broker_that_does_not_answer() -> None:
    odd = fc.FluxJob(1, "LIMBO", "", "", "16", "", "x", "")
    assert fc.observe(odd).presence is Presence.UNKNOWN
    unknown, other = fc.jobs_errors(data("jobs_unknown.stderr"))
    assert unknown == {fc.id_value("ƒ2QhsYVvS")} and other == []
    unknown, other = fc.jobs_errors(data("jobs_no_broker.stderr"))
    assert not unknown and "Unable to connect" in other[0]


def test_bulk_members_are_found_by_name_and_grouped_under_the_lowest_id() -> None:
    jobs = fc.parse_jobs(data("jobs_bulk.txt"))
    assert [fc.tag_of(j.name) for j in jobs[:4]] == [("rfbulk", 0), ("rfbulk", 1), ("rfbulk", 2), ("rfbulk", 3)]
    found = fc.tagged_jobs(jobs, ["rfbulk", "rfnone"])
    assert [(j.job_id, j.active) for j in found["rfbulk"]] == [(fc.f58(BASE), True)]
    assert found["rfnone"] == []
    assert fc.tag_of("my.job.name") == ("my.job.name", None)


def test_version() -> None:
    assert fc.parse_version(data("version.txt")) == "0.61.2"
