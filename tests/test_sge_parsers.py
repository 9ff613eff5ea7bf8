"""Grid Engine builders and parsers against outputs recorded from the real test cluster (tests/data/sge/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reflowd.schedulers import sge_commands as gc
from reflowd.schedulers.base import OptionError, Outcome, Phase, Presence, SubmitError, SubmitRequest

DATA = Path(__file__).parent / "data" / "sge"


def read(name: str) -> str:
    return (DATA / name).read_text()


def recorded(name: str) -> tuple[str, str, int]:
    """stdout, stderr and exit code of one recorded command."""
    return read(f"{name}.stdout"), read(f"{name}.stderr"), int(read(f"{name}.rc"))


def req(**kw: object) -> SubmitRequest:
    base = dict(tag="rfabc123", run_id="r1", task="work", job_dir="/scratch/run/.reflow/r1/jobs/rfabc123",
                log_dir="/scratch/run/logs", workdir="/scratch/run", worker_argv=["/opt/py/bin/python", "-m",
                                                                                 "reflow.worker", "/jd"],
                time="00:30:00", mem="4G")
    base.update(kw)
    return SubmitRequest(**base)  # type: ignore[arg-type]


def directive_lines(request: SubmitRequest, settings: gc.SGESettings | None = None) -> list[str]:
    script = gc.render_script(request, settings or gc.SGESettings("smp"))
    return [line for line in script.splitlines() if line.startswith("#$ ")]


# ---------------------------------------------------------------------- qsub


def test_qsub_terse_job_and_array_ids() -> None:
    assert gc.parse_qsub(*recorded("qsub_ok")) == "13"
    assert gc.parse_qsub(*recorded("qsub_array")) == "14", "an array prints 14.1-10:1"
    assert gc.parse_qsub('Your job 3 ("okjob") has been submitted\n', "", 0) == "3"
    with pytest.raises(SubmitError) as info:
        gc.parse_qsub("warning: something\n", "", 0)
    assert not info.value.permanent, "no id printed: the outcome is unknown, resolve by tag"


@pytest.mark.parametrize(
    "name,permanent,fragment",
    [
        ("qsub_unknown_queue", True, 'unknown queue "no_such.q"'),
        ("qsub_unknown_pe", True, 'parallel environment "nope" does not exist'),
        ("qsub_unknown_project", True, 'project "noproj" does not exist'),
        ("qsub_invalid_option", True, 'invalid option argument "-frobnicate"'),
        ("qsub_unknown_resource", True, 'unknown resource "nosuchres"'),
        ("qsub_too_many_tasks", True, "more than 75000 tasks"),
        ("qsub_qmaster_down", False, "unable to send message to qmaster"),
    ],
)
def test_qsub_refusals(name: str, permanent: bool, fragment: str) -> None:
    with pytest.raises(SubmitError) as info:
        gc.parse_qsub(*recorded(name))
    assert info.value.permanent is permanent
    assert fragment in str(info.value) and "Exiting." not in str(info.value)


def test_script_directives_for_a_plain_job() -> None:
    assert directive_lines(req()) == [
        "#$ -N rfabc123",
        "#$ -S /bin/bash",
        "#$ -wd /scratch/run",
        "#$ -o /scratch/run/.reflow/r1/jobs/rfabc123/",
        "#$ -j y",
        "#$ -l h_rt=0:30:00,h_vmem=4096M",
    ]
    script = gc.render_script(req(env={"A": "x y"}), gc.SGESettings())
    assert script.startswith("#!/bin/bash\n")
    assert "export A='x y'" in script
    assert "exec >>/scratch/run/logs/work.rfabc123.out 2>>/scratch/run/logs/work.rfabc123.err" in script
    assert script.rstrip().endswith("exec /opt/py/bin/python -m reflow.worker /jd")
    assert gc.render_qsub(req(), "/jd/job.sh") == ["qsub", "-terse", "/jd/job.sh"]


def test_time_memory_and_cpus_convert_to_grid_engine_units() -> None:
    lines = directive_lines(req(time="1-12:00:00", mem="6G", cpus=4))
    assert "#$ -pe smp 4" in lines
    assert "#$ -l h_rt=36:00:00,h_vmem=1536M" in lines, "memory is per slot: 6G over 4 slots"
    assert "#$ -l h_rt=0:05:00,mem_free=500M" in directive_lines(req(time="5", mem="500M"),
                                                                gc.SGESettings(memory_resource="mem_free"))
    assert "#$ -l h_rt=0:00:30" in directive_lines(req(time="00:00:30"), gc.SGESettings(memory_resource="none"))
    assert not any("-l" in line for line in directive_lines(req(time="UNLIMITED"),
                                                            gc.SGESettings(memory_resource="none")))
    with pytest.raises(OptionError, match="parallel_environment"):
        gc.render_script(req(cpus=2), gc.SGESettings())


def test_arrays_use_one_based_task_ids_and_the_engines_keys() -> None:
    request = req(indices=list(range(100)), array_parallelism=10)
    lines = directive_lines(request)
    assert "#$ -t 1-100:1" in lines and "#$ -tc 10" in lines
    script = gc.render_script(request, gc.SGESettings())
    assert '--index "$((SGE_TASK_ID - 1 + 0))"' in script
    assert 'exec >>/scratch/run/logs/work.rfabc123."$((SGE_TASK_ID - 1))".out' in script
    assert 'exec 2>>/scratch/run/logs/work.rfabc123."$((SGE_TASK_ID - 1))".err' in script
    assert "exit 0" not in script, "an exact range skips nothing"
    # A chunk beyond the site's limit: index_offset makes task ids start at 1 again.
    chunk = req(indices=[75000, 75001], index_offset=75000)
    assert "#$ -t 1-2:1" in directive_lines(chunk)
    assert '--index "$((SGE_TASK_ID - 1 + 75000))"' in gc.render_script(chunk, gc.SGESettings())
    # Evenly spaced: a step; single: one id.
    assert "#$ -t 1-7:3" in directive_lines(req(indices=[0, 3, 6]))
    assert "#$ -t 5" in directive_lines(req(indices=[4]))
    # Uneven: the covering range, and the tasks in between exit at once.
    uneven = gc.render_script(req(indices=[0, 1, 5]), gc.SGESettings())
    assert "#$ -t 1-6:1" in uneven
    assert 'case " 1 2 6 " in *" $SGE_TASK_ID "*) ;; *) exit 0 ;; esac' in uneven


def test_paths_with_spaces_are_quoted_and_unsafe_ones_refused() -> None:
    assert '#$ -wd "/scratch/my run"' in directive_lines(req(workdir="/scratch/my run"))
    for bad in ('/scratch/a"b', "/scratch/$HOME", "/scratch/a\\b"):
        with pytest.raises(OptionError, match="cannot be given to Grid Engine"):
            gc.render_script(req(workdir=bad), gc.SGESettings())


# ---------------------------------------------------------------------- options


def test_portable_options_map_to_qsub_flags() -> None:
    options = {"partition": "short.q", "account": "proj42", "mail_user": "a@example.org",
               "mail_type": "END,FAIL", "signal": "B:USR1@120", "native_args": "-l gpu=1 -p -10"}
    request = req(time="01:00:00", options=options)
    lines = directive_lines(request)
    assert "#$ -q short.q" in lines and "#$ -P proj42" in lines
    assert "#$ -M a@example.org" in lines and "#$ -m ea" in lines
    assert "#$ -l h_rt=1:00:00,h_vmem=4096M,s_rt=0:58:00" in lines, "SIGUSR1 120 s before h_rt through s_rt"
    assert gc.render_qsub(request, "/jd/job.sh") == ["qsub", "-terse", "-l", "gpu=1", "-p", "-10", "/jd/job.sh"]
    assert "#$ -q long.q" in directive_lines(req(options={"queue": "long.q"}))
    assert "#$ -P p1" in directive_lines(req(options={"project": "p1"}))
    assert gc.mail_letters(["BEGIN", "END"]) == "be" and gc.mail_letters("ALL") == "beas"
    assert gc.mail_letters("bea") == "bea" and gc.mail_letters("NONE") == "n"


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"qos": "high"}, "'qos' is not available on Grid Engine"),
        ({"constraint": "x"}, "it accepts: account, mail_type, mail_user, native_args, partition, project, queue"),
        ({"time": "1:00:00"}, "use job(time=...)"),
        ({"mem": "4G"}, "use job(mem=...)"),
        ({"cpus": 4}, "use job(cpus=...)"),
        ({"partition": "a", "queue": "b"}, "both set qsub -q"),
        ({"mail_type": "SOMETIMES"}, "'SOMETIMES' is not one of its mail types"),
        ({"mail_type": "NONE,END"}, "NONE cannot be combined"),
        ({"signal": "TERM@60"}, "can only send SIGUSR1"),
        ({"native_args": ["-N", "x"]}, "qsub -N cannot be set here"),
        ({"native_args": "-t 1-5"}, "qsub -t cannot be set here"),
        ({"native_args": "-l 'unclosed"}, "native_args"),
        ({"native_args": {"-l": "x"}}, "expected a list of strings"),
        ({"partition": "a\nb"}, "one non-empty line"),
    ],
)
def test_refused_options_name_the_key_and_the_way_out(options: dict, fragment: str) -> None:
    with pytest.raises(OptionError) as info:
        gc.validate_options(options)
    assert fragment in str(info.value), str(info.value)
    assert list(options)[0] in str(info.value) or fragment.startswith("both")


def test_signal_needs_a_time_limit_inside_it() -> None:
    with pytest.raises(OptionError, match="needs a time limit"):
        gc.render_script(req(time="UNLIMITED", options={"signal": "USR1@60"}), gc.SGESettings())
    with pytest.raises(OptionError, match="not within"):
        gc.render_script(req(time="00:01:00", options={"signal": "USR1@60"}), gc.SGESettings())
    assert gc.signal_lead("SIGUSR1") == 60 and gc.signal_lead("10@5") == 5


# ---------------------------------------------------------------------- qstat


def test_qstat_xml_with_every_kind_of_job() -> None:
    obs = gc.parse_qstat(read("qstat_mixed.xml"))
    assert obs["20"].phase is Phase.RUNNING and obs["20"].native_state == "r" and obs["20"].reason is None
    assert obs["21"].phase is Phase.RUNNING and obs["21"].reason == "suspended"
    assert obs["22"].phase is Phase.QUEUED and "hold" in (obs["22"].reason or "")
    assert obs["23"].phase is Phase.QUEUED and obs["23"].native_state == "Eqw" and "qmod -cj" in (obs["23"].reason or "")
    assert obs["25"].native_state == "hqw", "waiting on -hold_jid"
    # Array 24: tasks 1 and 2 running, 3-6 pending -> keys <job>_<task - 1>.
    assert {k: o.phase for k, o in obs.items() if k.startswith("24_")} == {
        "24_0": Phase.RUNNING, "24_1": Phase.RUNNING, "24_2": Phase.QUEUED, "24_3": Phase.QUEUED,
        "24_4": Phase.QUEUED, "24_5": Phase.QUEUED}
    assert "24" not in obs
    names = {j.job_id: j.name for j in gc.parse_qstat_jobs(read("qstat_mixed.xml"))}
    assert names["24"] == "arr_e" and names["20"] == "run_a"


def test_qstat_xml_suspended_queue_deletion_and_empty() -> None:
    obs = gc.parse_qstat(read("qstat_queue_suspended.xml"))
    assert obs["20"].native_state == "S" and obs["20"].phase is Phase.RUNNING and "queue" in (obs["20"].reason or "")
    obs = gc.parse_qstat(read("qstat_deleting.xml"))
    assert obs["20"].native_state == "dr" and obs["20"].phase is Phase.RUNNING and obs["20"].reason == "being deleted"
    assert gc.parse_qstat(read("qstat_empty_xml.stdout")) == {}
    with pytest.raises(ValueError, match="not XML"):
        gc.parse_qstat("error: commlib error\n")
    assert gc.qstat_unknown_jobs(read("qstat_unknown_job_xml.stdout")) == ["999999"]


#: Every state combination qstat(1) documents, with the phase it means.
DOCUMENTED_STATES = {
    "qw": Phase.QUEUED, "hqw": Phase.QUEUED, "hRwq": Phase.QUEUED, "Rq": Phase.QUEUED,
    "r": Phase.RUNNING, "t": Phase.RUNNING, "Rr": Phase.RUNNING, "Rt": Phase.RUNNING,
    "s": Phase.RUNNING, "ts": Phase.RUNNING, "S": Phase.RUNNING, "tS": Phase.RUNNING, "T": Phase.RUNNING,
    "tT": Phase.RUNNING, "Rs": Phase.RUNNING, "Rts": Phase.RUNNING, "RS": Phase.RUNNING, "RtS": Phase.RUNNING,
    "RT": Phase.RUNNING, "RtT": Phase.RUNNING,
    "Eqw": Phase.QUEUED, "Ehqw": Phase.QUEUED, "EhRqw": Phase.QUEUED,
    "dr": Phase.RUNNING, "dt": Phase.RUNNING, "dRr": Phase.RUNNING, "dRt": Phase.RUNNING, "ds": Phase.RUNNING,
    "dS": Phase.RUNNING, "dT": Phase.RUNNING, "dRs": Phase.RUNNING, "dRS": Phase.RUNNING, "dRT": Phase.RUNNING,
    "dqw": Phase.QUEUED, "dhqw": Phase.QUEUED,
    "z": Phase.DONE,
}


@pytest.mark.parametrize("state", sorted(DOCUMENTED_STATES))
def test_every_documented_state_maps(state: str) -> None:
    obs = gc.observe(state)
    assert obs.presence is Presence.PRESENT and obs.phase is DOCUMENTED_STATES[state] and obs.native_state == state
    if "E" in state:
        assert "error state" in (obs.reason or "")
    elif "d" in state:
        assert obs.reason == "being deleted"
    elif set(state) & set("sST"):
        assert "suspended" in (obs.reason or "")
    elif "h" in state:
        assert "hold" in (obs.reason or "")
    assert obs.outcome is None, "qstat never says how a job ended"


def test_unknown_state_is_unknown_not_absent() -> None:
    obs = gc.observe("Xq")
    assert obs.presence is Presence.UNKNOWN and "Xq" in (obs.detail or "")


def test_task_lists() -> None:
    assert gc.expand_tasks("3-10:1") == list(range(3, 11))
    assert gc.expand_tasks("1,4-8:2") == [1, 4, 6, 8]
    assert gc.expand_tasks("7") == [7]
    with pytest.raises(ValueError):
        gc.expand_tasks("a-b")


# ---------------------------------------------------------------------- qacct


def acct(name: str, job: str) -> dict:
    return gc.parse_qacct_observations(job, read(name))


def test_qacct_success_exit_status_and_array_tasks() -> None:
    assert acct("qacct_ok.txt", "13") == {"13": gc.record_observation(gc.parse_qacct(read("qacct_ok.txt"))[0])}
    ok = acct("qacct_ok.txt", "13")["13"]
    assert ok.phase is Phase.DONE and ok.outcome is Outcome.COMPLETED and ok.exit_code == "0"
    three = acct("qacct_exit3.txt", "26")["26"]
    assert three.outcome is Outcome.FAILED and three.exit_code == "3" and three.reason == "exit status 3"
    array = acct("qacct_array.txt", "14")
    assert sorted(array) == sorted(f"14_{i}" for i in range(10)), "taskid 1..10 -> keys 14_0..14_9"
    assert {o.outcome for o in array.values()} == {Outcome.COMPLETED}


def test_qacct_killed_timed_out_and_never_started() -> None:
    killed = acct("qacct_qdel_running.txt", "20")["20"]
    assert killed.outcome is Outcome.CANCELLED and "SIGKILL" in (killed.reason or "") and killed.exit_code == "137"
    tasks = acct("qacct_array_qdel.txt", "24")
    assert sorted(tasks) == ["24_0", "24_1", "24_2"] and {o.outcome for o in tasks.values()} == {Outcome.CANCELLED}
    timeout = acct("qacct_h_rt.txt", "27")["27"]
    assert timeout.outcome is Outcome.TIMEOUT and "h_rt" in (timeout.reason or "")
    eqw = acct("qacct_eqw.txt", "23")["23"]
    assert eqw.outcome is Outcome.FAILED and "opening input/output file" in (eqw.reason or "")


def _record(**fields: str) -> dict[str, str]:
    base = {"jobnumber": "5", "taskid": "undefined", "failed": "0", "exit_status": "0", "slots": "1",
            "ru_wallclock": "10s", "maxvmem": "10.000MB", "category": "-l h_rt=600,h_vmem=100M"}
    base.update(fields)
    return base


@pytest.mark.parametrize(
    "failed,expected",
    [(code, Outcome.NODE_FAIL) for code in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 22)]
    + [(code, Outcome.FAILED) for code in (12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 26, 27, 28, 29, 36, 38)]
    + [(37, Outcome.TIMEOUT)],
)
def test_every_failed_code_maps_to_an_outcome(failed: int, expected: Outcome) -> None:
    text = f"{failed}  : {gc.FAILED_CODES[failed]}"
    obs = gc.record_observation(_record(failed=text, exit_status="1"))
    assert obs.phase is Phase.DONE and obs.outcome is expected
    assert f"failed {failed}" in (obs.reason or "") and gc.FAILED_CODES[failed] in (obs.reason or "")


@pytest.mark.parametrize("failed", [24, 25, 30])
def test_rescheduled_records_are_queued_again(failed: int) -> None:
    obs = gc.record_observation(_record(failed=f"{failed}  : {gc.FAILED_CODES[failed]}"))
    assert obs.phase is Phase.QUEUED and "rescheduled" in (obs.reason or "")


def test_limits_explain_a_kill() -> None:
    over_mem = gc.record_observation(_record(failed="100 : assumedly after job", exit_status="137",
                                             maxvmem="99.000MB"))
    assert over_mem.outcome is Outcome.OUT_OF_MEMORY
    over_time = gc.record_observation(_record(failed="100 : assumedly after job", exit_status="137",
                                              ru_wallclock="600s"))
    assert over_time.outcome is Outcome.TIMEOUT
    per_slot = gc.record_observation(_record(failed="100 : assumedly after job", exit_status="137", slots="4",
                                             maxvmem="99.000MB"))
    assert per_slot.outcome is Outcome.CANCELLED, "h_vmem is per slot: 4 slots may use 400M"
    usr1 = gc.record_observation(_record(failed="100 : assumedly after job", exit_status="138"))
    assert usr1.outcome is Outcome.FAILED and "SIGUSR1" in (usr1.reason or ""), "an unhandled s_rt signal is no qdel"
    term = gc.record_observation(_record(failed="100 : assumedly after job", exit_status="143"))
    assert term.outcome is Outcome.CANCELLED and "SIGTERM" in (term.reason or "")
    assert gc.category_limits("-U x -l h_rt=86400,h_stack=256m,h_vmem=25G,tmpfree=200G -pe smp 2") == {
        "h_rt": "86400", "h_stack": "256m", "h_vmem": "25G", "tmpfree": "200G"}


def test_qacct_batch_not_found_and_unreadable_file() -> None:
    answers = gc.parse_qacct_batch(read("qacct_batch.txt"))
    assert set(answers) == {"13", "999999", "okjob"}
    assert answers["13"].ok and gc.parse_qacct_observations("13", answers["13"].text)["13"].outcome is Outcome.COMPLETED
    assert answers["999999"].not_found and gc.accounting_problem(answers["999999"]) is None
    assert gc.parse_qacct_observations("999999", answers["999999"].text) == {}
    broken = gc.QacctAnswer("1", 1, read("qacct_no_file.txt"))
    assert not broken.not_found and "No such file or directory" in (gc.accounting_problem(broken) or "")
    # A section cut off (the command died) has no answer: the caller treats it as unknown.
    assert "13" not in gc.parse_qacct_batch("#reflow-qacct 13\n====\nqname all.q\n")
    with pytest.raises(ValueError):
        gc.render_qacct(["13; rm -rf /"])


def test_tags_from_qstat_and_accounting() -> None:
    listed = gc.parse_qstat_jobs(read("qstat_mixed.xml"))
    answers = gc.parse_qacct_batch(read("qacct_batch.txt"))
    found = gc.tagged_jobs(listed, {"okjob": answers["okjob"].text}, ["arr_e", "okjob", "nothing"])
    assert [(j.job_id, j.active) for j in found["arr_e"]] == [("24", True)]
    assert found["okjob"] and all(not j.active for j in found["okjob"])
    assert found["nothing"] == []


# ---------------------------------------------------------------------- qdel, probe


def test_qdel_keys_and_failures() -> None:
    assert gc.render_qdel(["12", "14_0", "14_9"]) == ["qdel", "12", "14.1", "14.10"]
    with pytest.raises(ValueError):
        gc.render_qdel(["12;x"])
    assert gc.qdel_failed(*recorded("qdel_unknown")) is None, "an ended job is not a failure to cancel"
    assert "qmaster" in (gc.qdel_failed(*recorded("qdel_qmaster_down")) or "")
    assert gc.qmaster_unreachable(recorded("qstat_qmaster_down")[1])


def test_probe_parsers() -> None:
    config = gc.parse_qconf_conf(read("qconf_sconf.stdout"))
    assert gc.max_array_size(config) == 75000 and config["max_aj_instances"] == "2000"
    assert config["reporting_params"].startswith("accounting=true reporting=false flush_time=00:00:01")
    assert gc.max_array_size({"max_aj_tasks": "0"}) == 100_000
    assert gc.parse_version(read("qstat_help.stdout")) == "SGE 8.1.9"


# ---------------------------------------------------------------------- configuration


def test_cluster_settings_reach_the_adapter() -> None:
    from reflow_client.config import ConfigError, parse_config
    from reflowd.clusters import build_cluster
    from reflowd.schedulers.sge import SGEScheduler

    config = parse_config({"clusters": {"ge": {"scheduler": "sge", "parallel_environment": "threaded",
                                                 "memory_resource": "mem_free", "partition": "all.q"}}})
    runtime = build_cluster(config.cluster("ge"))
    assert isinstance(runtime.scheduler, SGEScheduler)
    assert runtime.scheduler.settings == gc.SGESettings("threaded", "mem_free")
    assert runtime.config.submit_options == {"partition": "all.q"}
    assert runtime.scheduler.stats()["parallel_environment"] == "threaded"
    assert parse_config({"clusters": {"ge": {"scheduler": "sge"}}}).cluster("ge").memory_resource == "h_vmem"
    with pytest.raises(ConfigError, match="only applies to scheduler 'sge'"):
        parse_config({"clusters": {"s": {"scheduler": "slurm", "parallel_environment": "smp"}}})
    with pytest.raises(ConfigError, match="expected a name"):
        parse_config({"clusters": {"ge": {"scheduler": "sge", "memory_resource": "h vmem"}}})
    # Under [defaults] they apply where they mean something and are dropped elsewhere.
    both = parse_config({"defaults": {"parallel_environment": "smp"},
                         "clusters": {"ge": {"scheduler": "sge"}, "s": {"scheduler": "slurm"}}})
    assert both.cluster("ge").parallel_environment == "smp" and both.cluster("s").parallel_environment is None


# ---------------------------------------------------------------------- out of memory, limits (issue #14)


def test_h_vmem_kill_by_the_execd_is_out_of_memory_with_the_peak_and_the_host() -> None:
    """Recorded: a job whose processes together passed -l h_vmem=300M (execd: 'exceeds job hard limit')."""
    obs = acct("qacct_h_vmem_killed.txt", "430")["430"]
    assert obs.outcome is Outcome.OUT_OF_MEMORY and "h_vmem" in (obs.reason or "")
    assert obs.peak_mem == "379M" and obs.node == "vm"
    assert "exceeds job hard limit \"h_vmem\"" in read("execd_h_vmem_message.txt")


def test_a_memory_error_under_h_vmem_is_an_ordinary_exit_to_grid_engine() -> None:
    """Recorded: one process over -l h_vmem=300M: h_vmem is its RLIMIT_AS, so Python raised MemoryError and
    exited 1. qacct sees a plain failure (failed 0) and a sampled maxvmem far below the limit: the worker's
    result (MemoryError) is what tells out-of-memory here (reflowd/engine/causes.py)."""
    obs = acct("qacct_memoryerror.txt", "429")["429"]
    assert obs.outcome is Outcome.FAILED and obs.exit_code == "1" and obs.native_state == "finished"
    assert obs.peak_mem == "88M"


def test_peak_text() -> None:
    assert gc.peak_text("0.000B") is None and gc.peak_text(None) is None
    assert gc.peak_text("4.793MB") == "5M" and gc.peak_text("379.027MB") == "379M"
    assert gc.peak_text("12.500GB") == "12.5G" and gc.peak_text("512.000KB") == "512K"


def test_max_u_jobs_is_the_queue_limit() -> None:
    conf = gc.parse_qconf_conf(read("qconf_sconf_max_u_jobs.stdout"))
    assert gc.queue_limit(conf) == 3
    assert gc.queue_limit(gc.parse_qconf_conf(read("qconf_sconf.stdout"))) is None, "0 means unlimited"
    assert gc.queue_limit({"max_u_jobs": "50", "max_jobs": "20"}) == 20
    assert gc.queue_limit({"max_u_jobs": "junk"}) is None


def test_a_submission_over_max_u_jobs_is_a_limit_refusal_not_a_failure() -> None:
    from reflowd.driver.queue_limits import is_limit_refusal

    stdout, stderr, rc = recorded("qsub_max_u_jobs_4")
    with pytest.raises(SubmitError) as info:
        gc.parse_qsub(stdout, stderr, rc)
    assert "only 3 jobs are allowed per user" in str(info.value)
    assert is_limit_refusal(str(info.value))
    # max_u_jobs counts jobs, not array tasks: a 5-task array went in under max_u_jobs=3 (recorded).
    assert read("qsub_max_u_jobs_array.stdout").strip() == "435.1-5:1"


def test_queue_caps_from_qconf_sq_star() -> None:
    queues = gc.parse_qconf_queues(read("qconf_sq_star.stdout"))
    assert set(queues) == {"all.q", "reflow_test_capped.q"}
    assert gc.queue_caps(queues["all.q"]) == {"max_time": None, "max_mem": None}
    assert gc.queue_caps(queues["reflow_test_capped.q"]) == {"max_time": "00:00:20", "max_mem": "1024M"}
    assert gc.queue_caps({"h_rt": "48:00:00,[vm=1:0:0]", "h_vmem": "1.5g"}) == {"max_time": "2-00:00:00",
                                                                               "max_mem": "1430M"}
    assert gc.sge_seconds("3600") == 3600 and gc.sge_seconds("INFINITY") is None
    with pytest.raises(ValueError):
        gc.sge_megabytes("lots")
    assert int(read("qconf_sq_unknown.rc")) != 0 and "no_such.q" in read("qconf_sq_unknown.stderr")


def test_resource_quota_sets_are_recorded_as_running_limits_only() -> None:
    """``qconf -srqs`` limits what runs (slots), not what is queued: nothing to cap submissions with."""
    assert "limit        users {*} to slots=4" in read("qconf_srqs.stdout")
    assert "maxujobs                          0" in read("qconf_ssconf.stdout")


def test_a_cancel_of_10_5_elements_is_cut_into_commands_one_shell_argument_takes() -> None:
    """Over SSH the whole command is one argument of the remote ``sh -c`` (128 KiB at most on Linux)."""
    import shlex

    from reflowd.schedulers.base import command_chunks

    keys = [f"4242_{t}" for t in range(100_000)]
    chunks = command_chunks(keys)
    assert len(chunks) > 1 and [k for chunk in chunks for k in chunk] == keys  # (all, in order, once)
    assert all(len(shlex.join(gc.render_qdel(chunk))) < 128 * 1024 for chunk in chunks)
    assert command_chunks(["x" * 70_000, "y"]) == [["x" * 70_000], ["y"]]
