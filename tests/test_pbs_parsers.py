"""PBS Professional: rendering and parsing against outputs in the Reference Guide's formats (tests/data/pbs/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflowd.schedulers import pbs_commands as pc
from reflowd.schedulers.base import OptionError, Outcome, Phase, Presence, SubmitError, SubmitRequest
from reflowd.schedulers.job_script import ArrayLayout


DATA = Path(__file__).parent / "data" / "pbs"


def data(name: str) -> str:
    return (DATA / name).read_text()


def request(**kw) -> SubmitRequest:
    base = dict(tag="rf0123456789abcdef", run_id="r1", task="work", job_dir="/runs/x/.reflow/r1/jobs/rf01",
                log_dir="/runs/x/logs", workdir="/runs/x", worker_argv=["/usr/bin/python3", "-m", "reflow.worker",
                                                                          "/runs/x/.reflow/r1/jobs/rf01"],
                time="01:30:00", mem="2G", cpus=4)
    base.update(kw)
    return SubmitRequest(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- submission


def test_script_carries_tag_resources_and_walltime_as_directives() -> None:
    script = pc.render_job_script(request(options={"queue": "short", "account": "proj42"}))
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#PBS -N rf0123456789abcdef" in lines
    assert "#PBS -l select=1:ncpus=4:mem=2gb" in lines
    assert "#PBS -l walltime=01:30:00" in lines
    assert "#PBS -q short" in lines and "#PBS -A proj42" in lines
    assert not any(line.startswith("#PBS -J") for line in lines)
    assert lines[-1].startswith("exec /usr/bin/python3 -m reflow.worker")
    assert "exec >>/runs/x/logs/work.rf0123456789abcdef.out 2>>/runs/x/logs/work.rf0123456789abcdef.err" in lines


def test_walltime_past_a_day_counts_hours() -> None:
    assert pc.walltime(request(time="1-01:00:00")) == "25:00:00"
    assert pc.walltime(request(time="90")) == "01:30:00"  # Slurm-style minutes
    assert pc.walltime(request(time="UNLIMITED")) is None


def test_array_is_dense_with_limit_and_index_variable() -> None:
    req = request(indices=list(range(10, 20)), index_offset=10, array_parallelism=3)
    script = pc.render_job_script(req)
    assert "#PBS -J 0-9%3" in script
    assert "index=$(( (PBS_ARRAY_INDEX) + 10 ))" in script
    assert "id=$(( index - 10 ))" in script
    assert 'exec >>/runs/x/logs/work.rf0123456789abcdef."$id".out' in script
    assert script.rstrip().endswith('--index "$index"')
    assert "#PBS -J 0-9" in pc.render_job_script(req, array_limit=False).replace("%3", "")
    assert "%3" not in pc.render_job_script(req, array_limit=False)


def test_non_contiguous_retry_batch_maps_positions_through_a_table() -> None:
    req = request(indices=[3, 17, 42])
    script = pc.render_job_script(req)
    assert "#PBS -J 0-2" in script
    assert "indices=(3 17 42)" in script
    layout = ArrayLayout.of(req, "55[].srv")
    assert layout.keys() == ["55[].srv_3", "55[].srv_17", "55[].srv_42"]
    assert layout.position_of("55[].srv_17") == 1


def test_single_element_array_goes_out_as_a_plain_job() -> None:
    script = pc.render_job_script(request(indices=[7]))
    assert "#PBS -J" not in script
    assert "index=7" in script


def test_options_map_to_pbs_flags_and_unknown_keys_are_refused() -> None:
    script = pc.render_job_script(request(options={"partition": "gpu", "project": "p1", "mail_user": "a@b.c",
                                                   "mail_type": "END,FAIL"}))
    assert "#PBS -q gpu" in script and "#PBS -P p1" in script
    assert "#PBS -M a@b.c" in script and "#PBS -m ea" in script
    with pytest.raises(OptionError) as info:
        pc.validate_options({"qos": "high"})
    message = str(info.value)
    assert "qos" in message and "PBS" in message and "account" in message and "native_args" in message
    with pytest.raises(OptionError, match="job\\(time=...\\)"):
        pc.validate_options({"walltime": "01:00:00"})
    with pytest.raises(OptionError, match="mail_type"):
        pc.validate_options({"mail_type": "SOMETIMES"})


def test_native_flags_pass_through_on_the_command_line_unsplit_by_a_shell() -> None:
    argv = pc.render_qsub(request(options={"native_args": ["-l", "place=scatter", "-W", "group_list=x y"]}), "/j/job.sh")
    assert argv == ["qsub", "-l", "place=scatter", "-W", "group_list=x y", "/j/job.sh"]
    assert pc.render_qsub(request(options={"native_args": "-r n"}), "/j.sh") == ["qsub", "-r", "n", "/j.sh"]


def test_qsub_output_and_refusals() -> None:
    assert pc.parse_qsub(data("qsub_ok.txt"), "", 0) == "1234.pbsserver"
    assert pc.parse_qsub(data("qsub_array_ok.txt"), "", 0) == "1240[].pbsserver"
    for name in ("qsub_unknown_queue.stderr", "qsub_over_limits.stderr", "qsub_illegal_J.stderr"):
        with pytest.raises(SubmitError) as info:
            pc.parse_qsub("", data(name), 1)
        assert info.value.permanent, name
    with pytest.raises(SubmitError) as info:
        pc.parse_qsub("", data("qsub_server_down.stderr"), 2)
    assert not info.value.permanent and "cannot connect" in str(info.value)


# ---------------------------------------------------------------------- status

STATES = pc.parse_qstat_json(data("qstat_f_json_states.json"))


def obs(job_id: str):
    return pc.observe(STATES[job_id])


@pytest.mark.parametrize("job_id,phase,reason", [
    ("101.pbsserver", Phase.QUEUED, "Not Running: Insufficient amount of resource: ncpus"),
    ("102.pbsserver", Phase.QUEUED, "held"),
    ("103.pbsserver", Phase.QUEUED, "waiting for its execution time"),
    ("104.pbsserver", Phase.QUEUED, "being moved"),
    ("105.pbsserver", Phase.QUEUED, "moved to another server"),
    ("106.pbsserver", Phase.RUNNING, None),
    ("107.pbsserver", Phase.RUNNING, "exiting"),
    ("108.pbsserver", Phase.RUNNING, "suspended"),
    ("109.pbsserver", Phase.RUNNING, "suspended (workstation busy)"),
    ("120[].pbsserver", Phase.RUNNING, None),
])
def test_every_active_state(job_id: str, phase: Phase, reason: str | None) -> None:
    o = obs(job_id)
    assert o.presence is Presence.PRESENT and o.phase is phase and o.outcome is None
    assert o.reason == reason


@pytest.mark.parametrize("job_id,outcome,text", [
    ("110.pbsserver", Outcome.COMPLETED, None),
    ("111.pbsserver", Outcome.FAILED, "finished"),
    ("112.pbsserver", Outcome.TIMEOUT, "walltime"),
    ("113.pbsserver", Outcome.OUT_OF_MEMORY, "JOB_EXEC_KILL_MEM"),
    ("114.pbsserver", Outcome.CANCELLED, "terminated"),
    ("115.pbsserver", Outcome.CANCELLED, "qdel"),
    ("116.pbsserver", Outcome.FAILED, "signal 9"),
    ("117.pbsserver", Outcome.NODE_FAIL, "JOB_EXEC_FAIL1"),
    ("120[0].pbsserver", Outcome.COMPLETED, None),
    ("120[1].pbsserver", Outcome.FAILED, "exit status 3"),
])
def test_finished_jobs_and_subjobs(job_id: str, outcome: Outcome, text: str | None) -> None:
    o = obs(job_id)
    assert o.phase is Phase.DONE and o.outcome is outcome, o
    if text:
        assert text in (o.reason or ""), o


def test_unknown_state_is_unknown_not_absent() -> None:
    o = pc.observe({"job_state": "Z"})
    assert o.presence is Presence.UNKNOWN and "Z" in (o.detail or "")


def test_array_subjobs_map_to_element_keys_and_unstarted_subjobs_follow_the_array() -> None:
    layouts = [ArrayLayout("120[].pbsserver", (0, 1, 2, 3)), ArrayLayout("130[].pbsserver", (5, 6), offset=5),
               ArrayLayout("110.pbsserver", None), ArrayLayout("999.pbsserver", None)]
    got = pc.observations(STATES, layouts)
    assert got["120[].pbsserver_0"].outcome is Outcome.COMPLETED
    assert got["120[].pbsserver_1"].outcome is Outcome.FAILED
    assert got["120[].pbsserver_2"].phase is Phase.RUNNING
    assert got["120[].pbsserver_3"].phase is Phase.QUEUED
    assert got["130[].pbsserver_0"].phase is Phase.QUEUED and got["130[].pbsserver_1"].phase is Phase.QUEUED
    assert got["110.pbsserver"].outcome is Outcome.COMPLETED
    assert "999.pbsserver" not in got  # absent: the caller decides from a successful query only


def test_text_format_gives_the_same_observations_as_json() -> None:
    text = pc.parse_qstat_text(data("qstat_f_text.txt"))
    assert set(text) == {"101.pbsserver", "106.pbsserver", "110.pbsserver", "112.pbsserver", "120[].pbsserver",
                         "120[0].pbsserver", "120[1].pbsserver", "120[2].pbsserver", "120[3].pbsserver"}
    for job_id, record in text.items():
        assert pc.observe(record) == obs(job_id), job_id
    assert text["101.pbsserver"]["Variable_List"].endswith("PBS_O_WORKDIR=/home/alice")


def test_short_and_long_server_names_are_the_same_job() -> None:
    records = {"7.pbsserver.example.org": {"job_state": "R"}}
    assert pc.observations(records, [ArrayLayout("7.pbsserver", None)])["7.pbsserver"].phase is Phase.RUNNING
    assert not pc.same_job("7.a", "8.a") and not pc.same_job("7[1].a", "7[2].a")


def test_qstat_errors_separate_unknown_jobs_from_a_server_that_does_not_answer() -> None:
    unknown, other = pc.qstat_errors(data("qstat_unknown_job.stderr"))
    assert unknown == {"9999.pbsserver"} and other == []
    unknown, other = pc.qstat_errors(data("qstat_server_down.stderr"))
    assert not unknown and any("cannot connect" in line for line in other)


def test_tags_found_by_job_name_skip_subjobs() -> None:
    found = pc.tagged_jobs(STATES, ["rfarray", "rfdone", "rfnone"])
    assert [(j.job_id, j.active) for j in found["rfarray"]] == [("120[].pbsserver", True)]
    assert [(j.job_id, j.active) for j in found["rfdone"]] == [("110.pbsserver", False)]
    assert found["rfnone"] == []


# ---------------------------------------------------------------------- probe


def test_flavour_detection_and_capabilities() -> None:
    assert pc.detect_flavour(data("qstat_version_pbspro.txt")) == ("pbspro", "2021.1.3.20220217134230")
    assert pc.detect_flavour(data("qstat_version_torque.txt")) == ("torque", "6.1.3")
    attrs = pc.parse_server_attributes(data("qstat_Bf.txt"))
    assert pc.max_array_size(attrs) == 10000 and pc.history_enabled(attrs)
    assert not pc.history_enabled(pc.parse_server_attributes(data("qstat_Bf_no_history.txt")))
    assert pc.supports_json("19.1.3") and pc.supports_json("2021.1.3") and not pc.supports_json("13.0.1")
    assert pc.supports_array_limit("2021.1.3") and pc.supports_array_limit("20.0.1")
    assert not pc.supports_array_limit("19.1.3")
    refusal = pc.TORQUE_REFUSAL.format(version="6.1.3")
    assert "Torque" in refusal and "-F json" in refusal and "PBS_ARRAYID" in refusal


def test_invalid_json_from_older_pbs_is_an_error_the_adapter_can_fall_back_from() -> None:
    """Values printed unescaped in -F json (a quote inside a variable) make invalid JSON; the adapter then uses text."""
    with pytest.raises(ValueError):
        pc.parse_qstat_json(data("qstat_f_json_invalid.json"))


# ---------------------------------------------------------------------- qdel of many subjobs


def test_qdel_folds_consecutive_subjobs_into_ranges() -> None:
    targets = [("123[].srv", p) for p in [4, 0, 1, 2, 3, 7, 9, 10]]
    assert pc.qdel_words(targets) == ["123[0-4].srv", "123[7].srv", "123[9-10].srv"]
    assert pc.render_qdel_commands(targets) == [["qdel", "123[0-4].srv", "123[7].srv", "123[9-10].srv"]]
    assert pc.qdel_words([("123[].srv", p) for p in range(10_000)]) == ["123[0-9999].srv"]
    assert pc.qdel_words([("77", p) for p in (5, 6)]) == ["77[5-6]"]  # no server suffix


def test_qdel_keeps_arrays_apart_and_takes_whole_jobs_whole() -> None:
    targets = [("124.srv", None), ("123[].srv", 3), ("125[].srv", 2), ("125[].srv", None), ("123[].srv", 4),
               ("126[].srv", 4)]
    # 125 whole takes its subjob 2 with it; 123 and 126 are separate arrays; a lone subjob stays a subjob id.
    assert pc.qdel_words(targets) == ["124.srv", "125[].srv", "123[3-4].srv", "126[4].srv"]
    assert pc.render_qdel_commands([]) == []


def test_qdel_of_many_runs_is_cut_into_commands_within_the_limit() -> None:
    targets = [("123[].srv", p) for p in range(0, 4000, 2)]  # 2000 runs of one subjob each
    words = pc.qdel_words(targets)
    commands = pc.render_qdel_commands(targets, limit=500)
    assert len(commands) > 1 and all(argv[0] == "qdel" for argv in commands)
    assert all(len(" ".join(argv[1:])) <= 500 for argv in commands)
    assert [w for argv in commands for w in argv[1:]] == words and len(words) == 2000
    assert len(pc.render_qdel_commands(targets)) == 1  # 2000 short words fit one real command


_QDEL_WORD = re.compile(r"(\d+)\[(\d+)(?:-(\d+))?\](.*)")


def _expand_qdel(word: str) -> tuple[set[str], set[str]]:
    """(whole jobs, subjob ids) one qdel operand names."""
    match = _QDEL_WORD.fullmatch(word)
    if match is None:
        return {word}, set()
    seq, first, last, rest = match.groups()
    assert last is None or int(first) < int(last), f"a one-subjob range {word}"
    return set(), {f"{seq}[{i}]{rest}" for i in range(int(first), int(last or first) + 1)}


def _targets(jobs: list[str]) -> st.SearchStrategy[list[tuple[str, int | None]]]:
    """Whole jobs and runs of 1-30 positions (overlapping, adjacent or apart), shuffled."""
    whole = st.sampled_from(jobs).map(lambda job: [(job, None)])
    run = st.tuples(st.sampled_from(jobs), st.integers(min_value=0, max_value=300), st.integers(min_value=1, max_value=30))
    runs = run.map(lambda t: [(t[0], p) for p in range(t[1], t[1] + t[2])])
    return st.lists(whole | runs, max_size=40).map(lambda groups: [t for g in groups for t in g]).flatmap(st.permutations)


@given(targets=_targets(["1[].a", "22[].pbs.example.org", "333.b"]), limit=st.integers(min_value=30, max_value=200))
@settings(max_examples=300, deadline=None)
def test_qdel_words_name_exactly_the_requested_targets(targets: list[tuple[str, int | None]], limit: int) -> None:
    commands = pc.render_qdel_commands(targets, limit=limit)
    whole_wanted = {job for job, position in targets if position is None}
    subjobs_wanted = {pc.subjob_id(job, p) for job, p in targets if p is not None and job not in whole_wanted}
    whole: set[str] = set()
    subjobs: set[str] = set()
    runs: list[tuple[str, int, int]] = []
    for argv in commands:
        assert argv[0] == "qdel" and len(" ".join(argv[1:])) <= limit
        for word in argv[1:]:
            named_whole, named = _expand_qdel(word)
            assert not (named & subjobs) and not (named_whole & whole), f"{word} named twice"
            whole |= named_whole
            subjobs |= named
            if (match := _QDEL_WORD.fullmatch(word)) is not None:
                runs.append((match.group(1), int(match.group(2)), int(match.group(3) or match.group(2))))
    assert whole == whole_wanted and subjobs == subjobs_wanted
    # Folded: no two words of one array that one range could have said.
    assert not any(seq == s2 and last + 1 == first2 for seq, _f, last in runs for s2, first2, _l in runs)


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 60), min_size=1, max_size=20), st.integers(0, 70), st.integers(0, 5))
def test_an_array_layout_finds_each_element_position_and_nothing_else(indices: set[int], probe: int, offset: int) -> None:
    from reflowd.schedulers.job_script import ArrayLayout

    ordered = tuple(sorted(i + offset for i in indices))
    layout = ArrayLayout("55[].srv", ordered, offset)
    for position, index in enumerate(ordered):
        assert layout.position_of(f"55[].srv_{index - offset}") == position
    expected = ordered.index(probe + offset) if probe + offset in ordered else None
    assert layout.position_of(f"55[].srv_{probe}") == expected
    assert layout.position_of("55[].srv") is None and layout.position_of("56[].srv_0") is None
