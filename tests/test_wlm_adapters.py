"""The PBS, LSF and Flux adapters against their emulators, without a daemon (quick, parametrised).

Dense arrays with non-contiguous retried elements, unknown job ids (absent), a
controller that does not answer (unknown, never absent), tags, probes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from reflowd.schedulers.base import Outcome, Phase, Scheduler, SubmitError, SubmitRequest
from reflowd.schedulers.flux import FluxScheduler
from reflowd.schedulers.lsf import LSFScheduler
from reflowd.schedulers.pbs import PBSScheduler
from reflowd.transports.base import TransportError
from reflowd.transports.local import LocalTransport

from .emulators.environments import SCHEDULERS, EmulatedScheduler
from .support import until_done

pytestmark = pytest.mark.anyio

ADAPTERS: dict[str, type[Scheduler]] = {"pbs": PBSScheduler, "lsf": LSFScheduler, "flux": FluxScheduler}
UNKNOWN_ID = {"pbs": "99999.emuserver", "lsf": "99999", "flux": "ƒ2bPbyXpq7n"}


@pytest.fixture(params=SCHEDULERS)
def emulated(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    emu = EmulatedScheduler(request.param, tmp_path / "wlm")
    for key, value in emu.env().items():
        monkeypatch.setenv(key, value)
    yield emu
    emu.close()


def make_request(tmp_path: Path, tag: str, indices: list[int] | None, **kw) -> SubmitRequest:
    job_dir = tmp_path / "jobs" / tag
    job_dir.mkdir(parents=True)
    (tmp_path / "logs").mkdir(exist_ok=True)
    # The "worker" exits with (index % 3): element 17 fails with 2, 3 and 42 succeed.
    argv = ["/bin/sh", "-c", 'exit $(( ${2:-0} % 3 ))', "worker"]
    return SubmitRequest(tag=tag, run_id="r", task="t", job_dir=str(job_dir), log_dir=str(tmp_path / "logs"),
                         workdir=str(tmp_path), worker_argv=argv, indices=indices, time="00:05:00", mem="100M",
                         **kw)


async def test_non_contiguous_array_elements_map_back_to_their_indices(emulated: EmulatedScheduler,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WLM_EMU_MAX_ARRAY", "2500")  # the site's limit, as the probe must learn it
    scheduler = ADAPTERS[emulated.kind](LocalTransport())
    caps = await scheduler.probe()
    assert caps["max_array_size"] == (1000 if emulated.kind == "flux" else 2500) and caps["version"]
    request = make_request(tmp_path, "rf00000000000000a1", [3, 17, 42], array_parallelism=2)
    job_id = await scheduler.submit(request)
    keys = [f"{job_id}_3", f"{job_id}_17", f"{job_id}_42"]
    got = await until_done(scheduler, job_id, keys)
    assert set(got) == set(keys), got
    assert got[keys[0]].outcome is Outcome.COMPLETED and got[keys[2]].outcome is Outcome.COMPLETED
    assert got[keys[1]].outcome is Outcome.FAILED, got[keys[1]]
    assert (tmp_path / "logs" / "t.rf00000000000000a1.17.out").exists()
    found = await scheduler.find_tags(["rf00000000000000a1", "rf_never_used"])
    assert [j.job_id for j in found["rf00000000000000a1"]] == [job_id] and found["rf_never_used"] == []
    # A new adapter (a restarted daemon) re-attaches from the request alone.
    again = ADAPTERS[emulated.kind](LocalTransport())
    await again.reattach(request, job_id)
    assert await again.query([job_id]) == got
    assert scheduler.stats()["queries"] >= 1


async def test_singleton_unknown_ids_and_a_controller_that_does_not_answer(emulated: EmulatedScheduler,
                                                                          tmp_path: Path) -> None:
    scheduler = ADAPTERS[emulated.kind](LocalTransport())
    request = make_request(tmp_path, "rf00000000000000b2", None)
    job_id = await scheduler.submit(request)
    got = await until_done(scheduler, job_id, [job_id])
    assert got[job_id].outcome is Outcome.COMPLETED and got[job_id].exit_code in ("0", None)
    assert await scheduler.query([UNKNOWN_ID[emulated.kind]]) == {}  # a successful query: absent
    emulated.set_down(True)
    with pytest.raises(TransportError):
        await scheduler.query([job_id])  # unknown, never absent
    with pytest.raises(TransportError):
        await scheduler.find_tags(["rf00000000000000b2"])
    with pytest.raises(SubmitError) as info:
        await scheduler.submit(make_request(tmp_path, "rf00000000000000c3", None))
    assert not info.value.permanent, info.value
    emulated.set_down(False)


async def test_cancel_one_element_of_a_running_array_after_a_restart(emulated: EmulatedScheduler, tmp_path: Path) -> None:
    scheduler = ADAPTERS[emulated.kind](LocalTransport())
    request = make_request(tmp_path, "rf00000000000000e5", [0, 1])
    request = SubmitRequest(**{**request.__dict__, "worker_argv": ["/bin/sh", "-c", "sleep 30", "worker"]})
    job_id = await scheduler.submit(request)
    scheduler = ADAPTERS[emulated.kind](LocalTransport())  # a restarted daemon cancels before it ever queried
    await scheduler.reattach(request, job_id)
    await scheduler.cancel([f"{job_id}_1"])
    deadline = time.monotonic() + 30
    while True:
        got = await scheduler.query([job_id])
        if f"{job_id}_1" in got and got[f"{job_id}_1"].phase is Phase.DONE:
            break
        assert time.monotonic() < deadline, got
        await anyio.sleep(0.3)
    assert got[f"{job_id}_1"].outcome is Outcome.CANCELLED, got
    assert got[f"{job_id}_0"].phase is not Phase.DONE, "only element 1 was cancelled"
    await scheduler.cancel([job_id])


def test_torque_is_refused_with_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site whose qstat is Torque's (recorded ``qstat --version`` output) gets a clear refusal."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorded = Path(__file__).parent / "data" / "pbs" / "qstat_version_torque.txt"
    (bin_dir / "qstat").write_text(f"#!/bin/sh\ncat {recorded}\n")
    (bin_dir / "qstat").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    scheduler = PBSScheduler(LocalTransport())
    request = make_request(tmp_path, "rf00000000000000f6", None)
    with pytest.raises(SubmitError) as info:
        anyio.run(scheduler.submit, request)
    assert info.value.permanent and "Torque" in str(info.value) and "6.1.3" in str(info.value)
    assert scheduler.stats()["refused"]


async def _finish_one(scheduler: Scheduler, tmp_path: Path, tag: str) -> str:
    job_id = await scheduler.submit(make_request(tmp_path, tag, None))
    await until_done(scheduler, job_id, [job_id])
    return job_id


async def test_lsf_asks_bhist_only_for_jobs_bjobs_has_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emulated = EmulatedScheduler("lsf", tmp_path / "wlm")
    for key, value in emulated.env().items():
        monkeypatch.setenv(key, value)
    try:
        scheduler = LSFScheduler(LocalTransport())
        job_id = await _finish_one(scheduler, tmp_path, "rf00000000000000a7")
        assert scheduler.stats()["history_queries"] == 0
        monkeypatch.setenv("WLM_EMU_CLEAN_PERIOD", "0")  # mbatchd has cleaned the finished job
        got = await scheduler.query([job_id])
        assert got[job_id].outcome is Outcome.COMPLETED and scheduler.stats()["history_queries"] == 1
        assert await scheduler.query(["99999"]) == {}  # in neither bjobs nor bhist: absent
    finally:
        emulated.close()


async def test_pbs_without_job_history_says_so_and_finished_jobs_are_absent(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    emulated = EmulatedScheduler("pbs", tmp_path / "wlm")
    for key, value in emulated.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WLM_EMU_HISTORY", "0")
    try:
        scheduler = PBSScheduler(LocalTransport())
        caps = await scheduler.probe()
        assert caps["finished_jobs_visible"] is False and caps["flavour"] == "pbspro"
        job_id = await scheduler.submit(make_request(tmp_path, "rf00000000000000b8", None))
        deadline = time.monotonic() + 60
        while job_id in await scheduler.query([job_id]):  # queued/running, then gone: no history to show it
            assert time.monotonic() < deadline
            await anyio.sleep(0.3)
        assert "-x" not in pc_render_for(scheduler, job_id)
    finally:
        emulated.close()


def pc_render_for(scheduler: PBSScheduler, job_id: str) -> list[str]:
    from reflowd.schedulers import pbs_commands

    return pbs_commands.render_qstat([job_id], json_output=scheduler.json_output, history=scheduler.history)


@pytest.mark.anyio
@pytest.mark.parametrize(("kind", "words"), [
    ("pbs", lambda job_id: ["qdel", f"{job_id.split('[', 1)[0]}[1-3].emuserver", f"{job_id.split('[', 1)[0]}[5].emuserver"]),
    ("lsf", lambda job_id: ["bkill", f"{job_id}[2-4,6]"]),
])
async def test_a_cancel_of_array_elements_goes_out_folded_and_ends_only_those(kind: str, words: Any, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Elements 4, 5, 6 and 10 of a non-contiguous array (positions 1-3 and 5) go out as one PBS subjob range
    and a lone subjob, or one LSF index list (positions + 1), and only they end, cancelled."""
    emu = EmulatedScheduler(kind, tmp_path / "wlm", slots=8)
    for key, value in emu.env().items():
        monkeypatch.setenv(key, value)
    try:
        scheduler = ADAPTERS[kind](LocalTransport())
        request = make_request(tmp_path, "rf00000000000000f6", [3, 4, 5, 6, 8, 10])
        job_id = await scheduler.submit(SubmitRequest(**{**request.__dict__, "worker_argv": ["/bin/sh", "-c", "sleep 30", "worker"]}))
        sent: list[list[str]] = []
        run = scheduler._run

        async def recording(argv: Any, **kw: Any) -> Any:
            sent.append(list(argv))
            return await run(argv, **kw)

        monkeypatch.setattr(scheduler, "_run", recording)
        cancelled = [f"{job_id}_{i}" for i in (4, 5, 6, 10)]
        await scheduler.cancel(cancelled)
        assert sent == [words(job_id)]
        got = await until_done(scheduler, job_id, cancelled, timeout=30)
        assert all(got[k].outcome is Outcome.CANCELLED for k in cancelled), got
        assert got[f"{job_id}_3"].phase is not Phase.DONE and got[f"{job_id}_8"].phase is not Phase.DONE, got
        await scheduler.cancel([job_id])
    finally:
        emu.close()
