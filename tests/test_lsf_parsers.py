"""IBM Spectrum LSF: rendering and parsing against outputs in the Command Reference's formats (tests/data/lsf/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflowd.schedulers import lsf_commands as lc
from reflowd.schedulers.base import OptionError, Outcome, Phase, Presence, SubmitError, SubmitRequest
from reflowd.schedulers.job_script import ArrayLayout


DATA = Path(__file__).parent / "data" / "lsf"


def data(name: str) -> str:
    return (DATA / name).read_text()


def request(**kw) -> SubmitRequest:
    base = dict(tag="rf0123456789abcdef", run_id="r1", task="work", job_dir="/runs/x/.reflow/r1/jobs/rf01",
                log_dir="/runs/x/logs", workdir="/runs/x", worker_argv=["python3", "-m", "reflow.worker", "/j"],
                time="00:30:00", mem="4G", cpus=2)
    base.update(kw)
    return SubmitRequest(**base)  # type: ignore[arg-type]


def test_script_directives_name_resources_and_limits_in_the_sites_unit() -> None:
    lines = lc.render_job_script(request(), mem_unit="MB").splitlines()
    assert '#BSUB -J "rf0123456789abcdef"' in lines
    assert "#BSUB -n 2" in lines
    assert '#BSUB -R "span[hosts=1] rusage[mem=4096]"' in lines and "#BSUB -M 4096" in lines
    assert "#BSUB -W 30" in lines
    kb = lc.render_job_script(request(), mem_unit="KB")
    assert "#BSUB -M 4194304" in kb
    assert "#BSUB -M 4" in lc.render_job_script(request(), mem_unit="GB").splitlines()


def test_time_limit_rounds_up_to_whole_minutes() -> None:
    assert "#BSUB -W 2" in lc.render_job_script(request(time="00:01:30"))
    assert "#BSUB -W 1500" in lc.render_job_script(request(time="1-01:00:00"))
    assert "-W" not in lc.render_job_script(request(time="UNLIMITED"))


def test_array_is_one_based_with_limit_and_maps_back_to_zero_based_elements() -> None:
    req = request(indices=list(range(100, 150)), index_offset=100, array_parallelism=8)
    script = lc.render_job_script(req)
    assert '#BSUB -J "rf0123456789abcdef[1-50]%8"' in script
    assert "index=$(( (LSB_JOBINDEX - 1) + 100 ))" in script
    assert "lsf.%J.%I.out" in script
    layout = ArrayLayout.of(req, "4712")
    records, _ = lc.parse_bjobs_json('{"RECORDS": [{"JOBID": "4712", "JOBINDEX": "1", "STAT": "DONE"},'
                                     '{"JOBID": "4712", "JOBINDEX": "50", "STAT": "RUN"}]}')
    got = lc.observations(records, [layout])
    assert got["4712_0"].outcome is Outcome.COMPLETED and got["4712_49"].phase is Phase.RUNNING
    assert lc.element_id("4712", 0) == "4712[1]"


def test_options_map_to_lsf_flags_and_refusals_name_key_system_and_accepted_keys() -> None:
    script = lc.render_job_script(request(options={"queue": "short", "account": "proj", "mail_user": "a@b.c",
                                                   "mail_type": "ALL", "signal": "B:USR1@90"}))
    assert "#BSUB -q short" in script and "#BSUB -P proj" in script and "#BSUB -u a@b.c" in script
    assert "#BSUB -B -N" in script and "#BSUB -wa USR1 -wt 2" in script
    with pytest.raises(OptionError) as info:
        lc.validate_options({"qos": "high"})
    assert "qos" in str(info.value) and "LSF" in str(info.value) and "queue" in str(info.value)
    with pytest.raises(OptionError, match="signal"):
        lc.validate_options({"signal": "now please"})
    assert lc.render_bsub(request(options={"native_args": "-x -app big"})) == ["bsub", "-x", "-app", "big"]


def test_bsub_output_and_refusals() -> None:
    assert lc.parse_bsub(data("bsub_ok.txt"), "", 0) == "4711"
    assert lc.parse_bsub(data("bsub_array_ok.txt"), "", 0) == "4712"
    for name in ("bsub_bad_queue.stderr", "bsub_bad_resreq.stderr"):
        with pytest.raises(SubmitError) as info:
            lc.parse_bsub("", data(name), 255)
        assert info.value.permanent and "Job not submitted" in str(info.value)
    with pytest.raises(SubmitError) as info:
        lc.parse_bsub("", data("bsub_mbatchd_down.stderr"), 255)
    assert not info.value.permanent


RECORDS, MISSING = lc.parse_bjobs_json(data("bjobs_json_states.json"))
BY_NAME = {r["JOB_NAME"]: lc.observe_record(r) for r in RECORDS}


@pytest.mark.parametrize("name,phase,reason", [
    ("rfpend", Phase.QUEUED, "New job is waiting for scheduling;"),
    ("rfpsusp", Phase.QUEUED, "suspended while pending"),
    ("rfwait", Phase.QUEUED, "waiting"),
    ("rfprov", Phase.QUEUED, "provisioning"),
    ("rfrun", Phase.RUNNING, None),
    ("rfususp", Phase.RUNNING, "suspended by user"),
    ("rfssusp", Phase.RUNNING, "suspended by LSF"),
    ("rfunkwn", Phase.RUNNING, "mbatchd lost contact with the execution host (UNKWN)"),
    ("rfzombi", Phase.RUNNING, "being killed after its host became unreachable (ZOMBI)"),
])
def test_every_active_state(name: str, phase: Phase, reason: str | None) -> None:
    o = BY_NAME[name]
    assert o.presence is Presence.PRESENT and o.phase is phase and o.reason == reason and o.outcome is None


@pytest.mark.parametrize("name,outcome,code", [
    ("rfdone", Outcome.COMPLETED, "0"),
    ("rfexit", Outcome.FAILED, "1"),
    ("rfrunlimit", Outcome.TIMEOUT, "140"),
    ("rfmem", Outcome.OUT_OF_MEMORY, "137"),
    ("rfowner", Outcome.CANCELLED, "130"),
    ("rfpreempt", Outcome.PREEMPTED, None),
    ("rfhost", Outcome.NODE_FAIL, "1"),
])
def test_finished_states_and_termination_reasons(name: str, outcome: Outcome, code: str | None) -> None:
    o = BY_NAME[name]
    assert o.phase is Phase.DONE and o.outcome is outcome and o.exit_code == code


def test_unknown_state_and_not_found_job() -> None:
    assert lc.observe("LIMBO").presence is Presence.UNKNOWN
    assert MISSING == {"299"}
    records, missing = lc.parse_bjobs_json(data("bjobs_json_not_found.json"))
    assert records == [] and missing == {"299"}
    with pytest.raises(ValueError):
        lc.parse_bjobs_json(data("bjobs_mbatchd_down.stderr"))


def test_text_form_matches_json() -> None:
    records, _ = lc.parse_bjobs_text(data("bjobs_text_states.txt"))
    assert {r["JOB_NAME"]: lc.observe_record(r) for r in records} == BY_NAME


def test_array_elements_in_bjobs() -> None:
    got = lc.observations(RECORDS, [ArrayLayout("220", (0, 1, 2, 3)), ArrayLayout("210", None),
                                    ArrayLayout("299", None)])
    assert got["220_0"].outcome is Outcome.COMPLETED and got["220_1"].outcome is Outcome.FAILED
    assert got["220_2"].phase is Phase.RUNNING and got["220_3"].reason.startswith("The job array has reached")
    assert got["210"].outcome is Outcome.COMPLETED and "299" not in got


def test_tags_by_job_name_one_entry_per_array() -> None:
    found = lc.tagged_jobs(RECORDS, ["rfarr", "rfdone", "rfrun", "nothing"])
    assert [(j.job_id, j.active) for j in found["rfarr"]] == [("220", True)]
    assert [(j.job_id, j.active) for j in found["rfdone"]] == [("210", False)]
    assert [(j.job_id, j.active) for j in found["rfrun"]] == [("205", True)]
    assert found["nothing"] == []


def test_bhist_long_format_for_jobs_that_left_bjobs() -> None:
    found = lc.parse_bhist(data("bhist_l.txt"))
    assert found[("4711", None)].outcome is Outcome.COMPLETED
    assert found[("4712", 2)].outcome is Outcome.FAILED and found[("4712", 2)].exit_code == "3"
    assert found[("4713", None)].outcome is Outcome.TIMEOUT and "TERM_RUNLIMIT" in (found[("4713", None)].reason or "")
    assert ("4714", None) not in found  # still pending in the history: not a conclusion
    got = lc.history_observations(found, [ArrayLayout("4712", (0, 1, 2)), ArrayLayout("4711", None)])
    assert got == {"4712_1": found[("4712", 2)], "4711": found[("4711", None)]}


def test_probe_outputs() -> None:
    assert lc.parse_lsid(data("lsid.txt")) == "10.1.0.13"
    params = lc.parse_params(data("bparams_a.txt"))
    assert lc.max_array_size(params) == 5000 and params["CLEAN_PERIOD"] == "3600"
    assert lc.unit_for_limits(lc.parse_params(data("badmin_showconf_mbd.txt"))) == "MB"
    assert lc.unit_for_limits({}) == "KB"
    assert lc.supports_json("10.1.0.13") and not lc.supports_json("10.1.0.3") and not lc.supports_json("9.1.3")


# ---------------------------------------------------------------------- bkill of many elements


def test_bkill_folds_each_arrays_indices_into_one_index_list() -> None:
    targets = [("4712", p) for p in [4, 0, 1, 2, 3, 6, 8, 9, 10, 11]]  # positions are 0-based, LSF indices 1-based
    assert lc.bkill_words(targets) == ["4712[1-5,7,9-12]"]
    assert lc.render_bkill_commands(targets) == [["bkill", "4712[1-5,7,9-12]"]]
    assert lc.bkill_words([("4712", p) for p in range(10_000)]) == ["4712[1-10000]"]


def test_bkill_keeps_arrays_apart_and_takes_whole_jobs_whole() -> None:
    targets = [("300", None), ("301", 2), ("302", 0), ("302", None), ("301", 3), ("303", 4)]
    # 302 whole takes its element with it; a lone element is the plain job_ID[index] of lc.element_id.
    assert lc.bkill_words(targets) == ["300", "302", "301[3-4]", lc.element_id("303", 4)]
    assert lc.render_bkill_commands([]) == []


def test_bkill_of_a_long_index_list_is_cut_into_words_and_commands_within_the_limits() -> None:
    targets = [("4712", p) for p in range(0, 4000, 2)]  # 2000 lone indices
    words = lc.bkill_words(targets)
    assert len(words) > 1 and all(len(w) <= lc.INDEX_WORD_CHARS and w.startswith("4712[") for w in words)
    commands = lc.render_bkill_commands(targets, limit=1000)
    assert len(commands) > 1 and all(len(" ".join(argv[1:])) <= 1000 for argv in commands)
    assert [w for argv in commands for w in argv[1:]] == words
    assert len(lc.render_bkill_commands(targets)) == 1


def _expand_bkill(word: str) -> tuple[set[str], set[tuple[str, int]]]:
    """(whole jobs, (job, 0-based position)) one bkill operand names."""
    match = re.fullmatch(r"(\d+)\[([\d,\-]+)\]", word)
    if match is None:
        return {word}, set()
    named: set[tuple[str, int]] = set()
    for part in match.group(2).split(","):
        first, _, last = part.partition("-")
        assert not last or int(first) < int(last), f"a one-index range in {word}"
        named |= {(match.group(1), i - 1) for i in range(int(first), int(last or first) + 1)}
    return set(), named


def _targets(jobs: list[str]) -> st.SearchStrategy[list[tuple[str, int | None]]]:
    """Whole jobs and runs of 1-30 positions (overlapping, adjacent or apart), shuffled."""
    whole = st.sampled_from(jobs).map(lambda job: [(job, None)])
    run = st.tuples(st.sampled_from(jobs), st.integers(min_value=0, max_value=300), st.integers(min_value=1, max_value=30))
    runs = run.map(lambda t: [(t[0], p) for p in range(t[1], t[1] + t[2])])
    return st.lists(whole | runs, max_size=40).map(lambda groups: [t for g in groups for t in g]).flatmap(st.permutations)


@given(targets=_targets(["7", "4712", "999999"]), word_limit=st.integers(min_value=16, max_value=32),
       extra=st.integers(min_value=0, max_value=100))
@settings(max_examples=300, deadline=None)
def test_bkill_words_name_exactly_the_requested_targets(targets: list[tuple[str, int | None]], word_limit: int,
                                                       extra: int) -> None:
    limit = word_limit + extra  # a command takes at least one word; a word at least one span (7 characters here)
    commands = lc.render_bkill_commands(targets, limit=limit, word_limit=word_limit)
    whole_wanted = {job for job, position in targets if position is None}
    elements_wanted = {(job, p) for job, p in targets if p is not None and job not in whole_wanted}
    whole: set[str] = set()
    elements: set[tuple[str, int]] = set()
    spans: list[tuple[str, int, int]] = []
    for argv in commands:
        assert argv[0] == "bkill" and len(" ".join(argv[1:])) <= limit
        for word in argv[1:]:
            assert len(word) <= word_limit, word
            named_whole, named = _expand_bkill(word)
            assert not (named & elements) and not (named_whole & whole), f"{word} named twice"
            whole |= named_whole
            elements |= named
            if "[" in word:
                job, _, rest = word.partition("[")
                for part in rest.rstrip("]").split(","):
                    first, _, last = part.partition("-")
                    spans.append((job, int(first), int(last or first)))
    assert whole == whole_wanted and elements == elements_wanted
    # Folded: no two spans of one array that one span could have said.
    assert not any(j1 == j2 and last + 1 == first2 for j1, _f, last in spans for j2, first2, _l in spans)
