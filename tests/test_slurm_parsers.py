"""Slurm builders and parsers against outputs recorded from the real test cluster (tests/data/slurm/)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflowd.schedulers import slurm_commands as sc
from reflowd.schedulers.base import OptionError, Outcome, Phase, Presence, SubmitError, SubmitRequest

DATA = Path(__file__).parent / "data" / "slurm"


def read(name: str) -> str:
    return "\n".join(line for line in (DATA / name).read_text().splitlines() if not line.startswith("#"))


# ---------------------------------------------------------------------- sbatch


def test_sbatch_success_and_cluster_suffix() -> None:
    assert sc.parse_sbatch(read("sbatch_ok.txt"), "", 0) == "661"
    assert sc.parse_sbatch("12345;reflowtest\n", "", 0) == "12345"


@pytest.mark.parametrize(
    "name,permanent,fragment",
    [
        ("sbatch_invalid_account.stderr", True, "Invalid account"),
        ("sbatch_invalid_partition.stderr", True, "invalid partition"),
        ("sbatch_unrecognized_option.stderr", True, "unrecognized option"),
        ("sbatch_controller_down.stderr", False, "Unable to contact slurm controller"),
        ("sbatch_socket_timeout.stderr", False, "Socket timed out on send/recv operation"),
    ],
)
def test_sbatch_errors(name: str, permanent: bool, fragment: str) -> None:
    with pytest.raises(SubmitError) as info:
        sc.parse_sbatch("", read(name), 1)
    assert info.value.permanent is permanent
    assert fragment in str(info.value)


def test_sbatch_empty_output_is_an_unknown_outcome() -> None:
    with pytest.raises(SubmitError) as info:
        sc.parse_sbatch("", "", 1)
    assert info.value.permanent is False
    with pytest.raises(SubmitError) as info:
        sc.parse_sbatch("garbage\n", "", 0)
    assert info.value.permanent is False


# ---------------------------------------------------------------------- squeue


def test_squeue_elements_states_and_reasons() -> None:
    obs = sc.parse_squeue(read("squeue_mixed.txt"))
    assert obs["657"].outcome is Outcome.CANCELLED and obs["657"].phase is Phase.DONE
    assert obs["656"].outcome is Outcome.FAILED and obs["656"].reason == "NonZeroExitCode"
    assert obs["655_0"].phase is Phase.RUNNING and obs["655_0"].reason is None
    assert obs["655_5"].phase is Phase.QUEUED and obs["655_5"].reason == "JobArrayTaskLimit"
    assert obs["658"].phase is Phase.QUEUED and obs["658"].reason == "PartitionDown"
    assert set(obs) == {"657", "656", "658"} | {f"655_{i}" for i in range(6)}


def test_squeue_compressed_pending_range_is_expanded() -> None:
    obs = sc.parse_squeue(read("squeue_array_compressed.txt"))
    assert {f"655_{i}" for i in range(2, 6)} <= set(obs)
    assert obs["655_4"].reason == "JobArrayTaskLimit"


def test_squeue_timeout_and_invalid_ids() -> None:
    obs = sc.parse_squeue(read("squeue_timeout.txt"))
    assert obs["651"].outcome is Outcome.TIMEOUT and obs["651"].reason == "TimeLimit"
    assert sc.squeue_all_absent(read("squeue_invalid_job_id.stderr"), 1)
    assert not sc.squeue_all_absent(read("squeue_controller_down.stderr"), 1)
    assert sc.parse_squeue("") == {}


def test_squeue_argv_is_one_query_for_all_jobs() -> None:
    argv = sc.render_squeue(["5", "7", "9"])
    assert argv.count("-j") == 1 and "5,7,9" in argv and "-r" in argv and "all" in argv


# ---------------------------------------------------------------------- sacct


def test_sacct_mixed_with_pending_array_range() -> None:
    obs = sc.parse_sacct(read("sacct_mixed.txt"))
    assert obs["656"].outcome is Outcome.FAILED and obs["656"].exit_code == "3:0"
    assert obs["657"].outcome is Outcome.CANCELLED and obs["657"].reason == "CANCELLED by 0"
    assert obs["658"].phase is Phase.QUEUED and obs["658"].reason == "PartitionDown"
    assert [obs[f"655_{i}"].phase for i in range(6)] == [Phase.RUNNING] * 2 + [Phase.QUEUED] * 4


def test_sacct_timeouts_and_cancellations() -> None:
    obs = sc.parse_sacct(read("sacct_timeout_cancel_fail.txt"))
    assert obs["651"].outcome is Outcome.TIMEOUT
    assert obs["220"].outcome is Outcome.CANCELLED
    assert obs["223"].outcome is Outcome.FAILED and obs["223"].exit_code == "0:9"


def test_every_documented_state_maps() -> None:
    obs = sc.parse_sacct(read("sacct_documented_states.txt"))
    assert obs["901"].outcome is Outcome.OUT_OF_MEMORY
    assert obs["902"].outcome is Outcome.NODE_FAIL
    assert obs["903"].outcome is Outcome.PREEMPTED
    assert obs["904"].outcome is Outcome.BOOT_FAIL
    assert obs["905"].outcome is Outcome.DEADLINE
    assert obs["906"].phase is Phase.QUEUED
    assert obs["907"].phase is Phase.RUNNING and obs["907"].reason == "suspended"
    assert obs["908"].outcome is Outcome.CANCELLED and obs["908"].reason == "CANCELLED by 1000"
    assert obs["909_3"].phase is Phase.RUNNING
    assert obs["910"].phase is Phase.QUEUED
    assert obs["911"].outcome is Outcome.CANCELLED
    assert obs["912"].outcome is Outcome.FAILED
    assert sc.observe("WEIRD_NEW_STATE").presence is Presence.UNKNOWN
    assert sc.parse_sacct("") == {}


def test_find_by_name() -> None:
    squeue = sc.tagged_jobs(read("squeue_by_name.txt"), "squeue", ["rfdemoarray", "rfdemofail", "nosuchtag"])
    assert [j.job_id for j in squeue["rfdemoarray"]] == ["655"] and squeue["rfdemoarray"][0].active
    assert [j.job_id for j in squeue["rfdemofail"]] == ["656"] and not squeue["rfdemofail"][0].active
    assert squeue["nosuchtag"] == []
    sacct = sc.tagged_jobs(read("sacct_by_name.txt"), "sacct", ["rfdemoarray", "rfdemofail"])
    assert [j.job_id for j in sacct["rfdemoarray"]] == ["655"]


# ---------------------------------------------------------------------- scontrol


def test_scontrol_show_config() -> None:
    config = sc.parse_scontrol_show_config(read("scontrol_show_config.txt"))
    assert sc.max_array_size(config) == 1001
    assert config["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert config["MinJobAge"].startswith("300")
    assert sc.max_array_size({}) == 1001 and sc.max_array_size({"MaxArraySize": "5000"}) == 5000


# ---------------------------------------------------------------------- rendering


def _request(**kw: object) -> SubmitRequest:
    base = dict(tag="rfabc", run_id="r1", task="t", job_dir="/run/.reflow/r1/jobs/rfabc", log_dir="/run/logs",
                workdir="/run", worker_argv=["/usr/bin/python3", "-m", "reflow.worker", "/run/.reflow/r1/jobs/rfabc"])
    base.update(kw)
    return SubmitRequest(**base)  # type: ignore[arg-type]


def test_compress_indices() -> None:
    assert sc.compress_indices(range(100)) == "0-99"
    assert sc.compress_indices([3, 17, 20, 21, 22, 25]) == "3,17,20-22,25"
    assert sc.compress_indices([5]) == "5"
    with pytest.raises(ValueError):
        sc.compress_indices([])


def test_sbatch_argv_for_an_array_with_offset_and_parallelism() -> None:
    req = _request(indices=list(range(1000, 1500)), index_offset=1000, array_parallelism=50, cpus=4, time="01:00:00",
                   mem="2G", options={"partition": "gpu", "exclusive": True, "gres": ["gpu:1", "tmp:10G"],
                                      "no_requeue": False})
    argv = sc.render_sbatch(req, "/run/job.sh")
    assert argv[0] == "sbatch" and "--parsable" in argv and argv[-1] == "/run/job.sh"
    assert "--job-name=rfabc" in argv and "--array=0-499%50" in argv
    assert "--cpus-per-task=4" in argv and "--time=01:00:00" in argv and "--mem=2G" in argv
    assert "--output=/run/logs/t.rfabc.%a.out" in argv and "--error=/run/logs/t.rfabc.%a.err" in argv
    assert "--partition=gpu" in argv and "--exclusive" in argv and "--gres=gpu:1,tmp:10G" in argv
    assert not any(a.startswith("--no-requeue") for a in argv)
    native = sc.render_sbatch(_request(options={"native_args": "--hint=nomultithread -L matlab"}), "/run/job.sh")
    assert native[-4:] == ["--hint=nomultithread", "-L", "matlab", "/run/job.sh"], "native_args last, as given"
    script = sc.render_script(req)
    assert 'exec /usr/bin/python3 -m reflow.worker /run/.reflow/r1/jobs/rfabc --index "$((SLURM_ARRAY_TASK_ID + 1000))"' \
        in script


def test_script_quotes_hostile_values(tmp_path: Path) -> None:
    evil = "a'b; rm -rf / $(touch pwned) `x`"
    req = _request(worker_argv=["printf", "%s\\n", evil], env={"REFLOW_X": evil})
    script = sc.render_script(req)
    path = tmp_path / "job.sh"
    path.write_text(script)
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert out.stdout == evil + "\n"
    assert not (tmp_path / "pwned").exists()
    assert f"export REFLOW_X={shlex.quote(evil)}" in script
    with pytest.raises(OptionError):
        sc.render_script(_request(env={"BAD NAME": "x"}))


def test_option_validation() -> None:
    sc.validate_options({"partition": "debug", "account": "a", "qos": "q", "constraint": "x", "gres": "gpu:1",
                         "reservation": "r", "nodes": 1, "ntasks": 4, "mail_type": "END", "mail-user": "a@b",
                         "signal": "B:USR1@60", "exclusive": True, "ntasks_per_node": 2})
    with pytest.raises(OptionError, match="did you mean 'partition'"):
        sc.validate_options({"partiton": "debug"})
    with pytest.raises(OptionError, match="no option --frobnicate"):
        sc.validate_options({"frobnicate": 1})
    with pytest.raises(OptionError, match="job\\(time=...\\)"):
        sc.validate_options({"time": "10"})
    with pytest.raises(OptionError, match="submission tag"):
        sc.validate_options({"job_name": "x"})
    with pytest.raises(OptionError, match="one non-empty line"):
        sc.validate_options({"comment": "a\nb"})
    with pytest.raises(OptionError, match="sbatch --array cannot be set here"):
        sc.validate_options({"native_args": ["--array=0-3"]})


def test_scancel_takes_elements_and_jobs() -> None:
    assert sc.render_scancel(["12", "13_4"]) == [["scancel", "12", "13_4"]]
    assert sc.render_scancel(["13_5", "13_4", "13_6", "13_9", "14_0", "12", "12_3"]) == [
        ["scancel", "12", "13_[4-6,9]", "14_0"]]  # (a job cancelled whole takes its tasks with it)
    assert sc.render_scancel([]) == []


def expand(commands: list[list[str]]) -> set[str]:
    """The job keys *commands* cancel, ranges expanded (as scancel reads them)."""
    out: set[str] = set()
    for command in commands:
        assert command[0] == "scancel"
        for key in command[1:]:
            job, _, tasks = key.partition("_")
            if not tasks.startswith("["):
                out.add(key)
                continue
            for span in tasks[1:-1].split(","):
                a, _, b = span.partition("-")
                out.update(f"{job}_{t}" for t in range(int(a), int(b or a) + 1))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.one_of(st.none(), st.integers(0, 3000))), max_size=300))
def test_folded_scancel_commands_cancel_exactly_the_keys_given(keys: list[tuple[int, int | None]]) -> None:
    given_keys = [str(job) if task is None else f"{job}_{task}" for job, task in keys]
    whole = {k for k in given_keys if "_" not in k}
    wanted = whole | {k for k in given_keys if k.split("_")[0] not in whole}
    assert expand(sc.render_scancel(given_keys)) == wanted


def test_a_cancel_of_10_5_scattered_elements_stays_within_what_one_shell_argument_takes() -> None:
    """Over SSH the whole command is one argument of the remote ``sh -c`` (128 KiB at most on Linux): key by key,
    10^5 elements were 1.3 MB in one command."""
    keys = [f"4242_{t}" for t in range(0, 200_000, 2)]  # (every other task: no range folds more than one)
    commands = sc.render_scancel(keys)
    assert len(commands) > 1
    assert all(len(shlex.join(command)) < 128 * 1024 for command in commands)
    assert expand(commands) == set(keys)
    assert sc.render_scancel([f"4242_{t}" for t in range(100_000)]) == [["scancel", "4242_[0-99999]"]]


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("s*.txt") if p.name.startswith(("squeue", "sacct"))))
def test_answers_job_by_job_read_like_the_flat_parse(name: str) -> None:
    """``query`` answers job by job (a collapsed pending array stays one span); read key by key, the
    answer is exactly the flat parse of the same output."""
    text = (DATA / name).read_text()
    flat, answers = (sc.parse_sacct(text), sc.parse_sacct_answers(text)) if name.startswith("sacct") \
        else (sc.parse_squeue(text), sc.parse_squeue_answers(text))
    assert dict(answers.items()) == flat
    assert all(answers.get(k) == obs for k, obs in flat.items())
    assert answers.get("424242_1") is None and "424242" not in answers


def test_a_collapsed_pending_array_is_one_span() -> None:
    answers = sc.parse_squeue_answers((DATA / "squeue_array_compressed.txt").read_text())
    job = answers.job("655")
    assert job is not None and [(a, b) for a, b, _ in job.spans] == [(2, 5)]
    assert job.spans[0][2].reason == "JobArrayTaskLimit" and answers["655_4"] is job.spans[0][2]
    assert answers.get("655_6") is None, "outside every span and line: absent"
    assert "-r" not in sc.render_squeue(["5"], expand=False)


def test_live_reasons_fill_sacct_pending_spans_and_elements() -> None:
    """sacct keeps a pending job's reason from submission ("None"); squeue's live reason replaces it, a span
    as a whole where squeue prints the same span, element by element where it splits it differently."""
    from reflowd.schedulers.slurm import with_live_reasons

    sacct = sc.parse_sacct_answers("77_[0-9]|rfx|PENDING|0:0|None\n77_10|rfx|PENDING|0:0|None\n"
                                   "77_11|rfx|COMPLETED|0:0|None\n")
    squeue = sc.parse_squeue_answers("77_[0-9]|PENDING|Priority|rfx\n77_10|PENDING|Resources|rfx\n")
    job = with_live_reasons("77", sacct.job("77"), squeue.job("77"))
    assert [(a, b, o.reason) for a, b, o in job.spans] == [(0, 9, "Priority")]
    assert job.get("77_10", "77").reason == "Resources" and job.get("77_11", "77").phase is Phase.DONE
    split = sc.parse_squeue_answers("77_[0-4]|PENDING|Priority|rfx\n77_[5-9]|PENDING|JobHeldUser|rfx\n")
    job = with_live_reasons("77", sacct.job("77"), split.job("77"))
    assert job.get("77_3", "77").reason == "Priority" and job.get("77_7", "77").reason == "JobHeldUser"
