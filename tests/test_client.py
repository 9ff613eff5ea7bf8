"""The client library against a real reflowd: AsyncClient, typed results, errors, filters."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from reflow.loader import load_workflow
from reflow_client.client import AsyncClient, Client, InvalidParamsError, ReflowError, RunStatus, UnknownRunError
from reflow_client.protocol import VERSION_MISMATCH

from .support import ROOT, DaemonProcess

COUNTING = ROOT / "tests" / "engine_workflows" / "counting.py"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    d = DaemonProcess(tmp_path_factory.mktemp("client"), config='[clusters.local]\nscheduler = "local"\n')
    d.start()
    yield d
    d.stop()


@pytest.mark.anyio
async def test_async_client_submit_watch_and_wait(daemon: DaemonProcess, tmp_path: Path) -> None:
    wf = load_workflow(COUNTING)
    params = wf.resolve_parameters({"n": 4})
    async with AsyncClient(daemon.socket) as client:
        hello = await client.hello()
        assert hello["protocol"] == 1 and hello["socket"] == str(daemon.socket)
        submitted = await client.submit(wf.describe(), params, str(tmp_path), options={"on_error": "stop"})
        seen: list[str] = []
        async for event in client.watch(submitted.run_id):
            seen.append(event["type"])
            if event["type"] == "end":
                assert event["state"] == "succeeded"
        assert seen[0] == "snapshot" and seen[-1] == "end" and "transition" in seen
        status = await client.wait(submitted.run_id, timeout=60)
        assert isinstance(status, RunStatus) and status.ok
        assert {t.name: t.total for t in status.tasks} == {"prepare": 1, "work": 4, "total": 1}
        manifest = await client.describe(submitted.run_id)
        assert manifest["workflow"] == "counting" and [t["name"] for t in manifest["tasks"]] == [
            "prepare", "work", "total"]
        with pytest.raises(UnknownRunError):
            await client.status("nope")
        stats = await client.stats()
        assert stats["runs_in_memory"] >= 1 and stats["server"]["requests"] >= 1


def test_hello_refuses_other_protocol_versions(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        with pytest.raises(ReflowError) as info:
            client.call("hello", protocol=99)
        assert info.value.code == VERSION_MISMATCH and "protocol 99" in info.value.message


def test_runs_filters(daemon: DaemonProcess, tmp_path: Path) -> None:
    wf = load_workflow(COUNTING)
    with Client(daemon.socket) as client:
        before = time.time()
        a = client.submit(wf.describe(), wf.resolve_parameters({"n": 1}), str(tmp_path / "a"))
        client.wait(a.run_id, timeout=60)
        ids = [r.id for r in client.runs(since=before)]
        assert ids[0] == a.run_id
        assert a.run_id not in [r.id for r in client.runs(until=before - 1)]
        assert a.run_id in [r.id for r in client.runs(workflow="counting", state="succeeded")]
        assert client.runs(workflow="other") == []
        assert len(client.runs(limit=1)) == 1
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(before - 1))
        assert a.run_id in [r.id for r in client.runs(since=iso)]
        with pytest.raises(InvalidParamsError, match="unknown state"):
            client.runs(state="bogus")
        with pytest.raises(InvalidParamsError, match="ISO"):
            client.runs(since="yesterday-ish")


def test_submit_refusals_are_clear(daemon: DaemonProcess, tmp_path: Path) -> None:
    wf = load_workflow(COUNTING)
    with Client(daemon.socket) as client:
        with pytest.raises(InvalidParamsError, match="unknown cluster 'nowhere'"):
            client.submit(wf.describe(), wf.resolve_parameters({}), str(tmp_path), cluster="nowhere")
        with pytest.raises(InvalidParamsError, match="must be an absolute path"):
            client.submit(wf.describe(), wf.resolve_parameters({}), "relative/dir")
        with pytest.raises(InvalidParamsError, match="unknown option"):
            client.submit(wf.describe(), {}, str(tmp_path), options={"forse": True})
        with pytest.raises(InvalidParamsError, match="unknown task"):
            client.submit(wf.describe(), {}, str(tmp_path), options={"force_tasks": ["nope"]})


def test_watch_everything_sees_events_of_new_runs(daemon: DaemonProcess, tmp_path: Path) -> None:
    wf = load_workflow(COUNTING)
    with Client(daemon.socket) as client:
        stream = client.watch(None, timeout=60)
        assert next(stream)["type"] == "snapshot"
        run = client.submit(wf.describe(), wf.resolve_parameters({"n": 2}), str(tmp_path))
        for event in stream:
            if event.get("type") == "run" and event["run_id"] == run.run_id and event["to"] == "succeeded":
                break
        stream.close()


@pytest.mark.anyio
async def test_concurrent_async_clients(daemon: DaemonProcess) -> None:
    results: list[float] = []

    async def one() -> None:
        async with AsyncClient(daemon.socket) as c:
            for _ in range(20):
                results.append((await c.ping())["time"])

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(one)
    assert len(results) == 400
