"""The PBS, LSF and Flux adapters through the real sshd on 127.0.0.1, their emulators on the login's PATH.

Every adapter reaches its system only through a transport, as argv lists and
file writes, so what SSH can change is how those travel: shell quoting of job
ids like ``123[].server`` and ``ƒ2bPbyXpq7n``, a job script on ``bsub``'s
standard input, SFTP writes of the scripts. The whole README pipeline over SSH
runs on the real Slurm and Grid Engine (``tests/test_scheduler_engine.py``);
here each emulated system submits an array, follows it, finds it by its tag
and cancels an element, with every command and file going through SSH.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import pytest

from reflowd.schedulers.base import Outcome, Phase, Scheduler, SubmitRequest
from reflowd.schedulers.flux import FluxScheduler
from reflowd.schedulers.lsf import LSFScheduler
from reflowd.schedulers.pbs import PBSScheduler
from reflowd.transports.base import CommandResult, Transport
from reflowd.transports.ssh import SSHSettings, SSHTransport

from .cluster.fixtures_ssh import SSHServer
from .emulators.environments import SCHEDULERS, EmulatedScheduler

pytestmark = [pytest.mark.ssh, pytest.mark.anyio]

ADAPTERS: dict[str, type[Scheduler]] = {"pbs": PBSScheduler, "lsf": LSFScheduler, "flux": FluxScheduler}


class LoginEnvironment(Transport):
    """An SSH transport whose commands see the environment a site's login shell would set up.

    (PATH to the batch system's commands and its settings; here the emulator's.)
    """

    def __init__(self, inner: SSHTransport, env: Mapping[str, str]) -> None:
        super().__init__()
        self.inner, self.env = inner, dict(env)
        self.name, self.health, self.stats = inner.name, inner.health, inner.stats

    async def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float = 30.0,
                  env: Mapping[str, str] | None = None, idempotent: bool = True) -> CommandResult:
        return await self.inner.run(argv, stdin=stdin, timeout=timeout, env={**self.env, **(env or {})},
                                    idempotent=idempotent)

    async def read_files(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bytes | None]:
        return await self.inner.read_files(paths, timeout=timeout)

    async def write_files(self, files: Mapping[str, bytes], *, timeout: float = 60.0, mode: int = 0o644) -> None:
        await self.inner.write_files(files, timeout=timeout, mode=mode)

    async def listdir(self, path: str, *, timeout: float = 30.0) -> list[str]:
        return await self.inner.listdir(path, timeout=timeout)

    async def exists(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bool]:
        return await self.inner.exists(paths, timeout=timeout)

    async def makedirs(self, paths: Sequence[str], *, timeout: float = 30.0) -> None:
        await self.inner.makedirs(paths, timeout=timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("kind", SCHEDULERS)
async def test_array_through_ssh_submitted_followed_found_and_cancelled(kind: str, sshd: SSHServer,
                                                                        tmp_path: Path) -> None:
    emulated = EmulatedScheduler(kind, tmp_path / "wlm")
    inner = SSHTransport(SSHSettings(host=sshd.host, port=sshd.port, user=sshd.user, identity_file=str(sshd.key),
                                     known_hosts=str(sshd.known_hosts), connect_timeout=20.0))
    transport = LoginEnvironment(inner, emulated.env())
    try:
        scheduler = ADAPTERS[kind](transport)
        assert (await scheduler.probe())["max_array_size"] >= 2
        tag = "rf0000000000055401"
        job_dir = tmp_path / "jobs" / tag
        await transport.makedirs([str(job_dir), str(tmp_path / "logs")])
        # Element 0 sleeps until cancelled, element 1 fails with exit code 3.
        argv = ["/bin/sh", "-c", 'if [ "$2" = 0 ]; then exec sleep 60; fi; exit 3', "worker"]
        request = SubmitRequest(tag=tag, run_id="r", task="t", job_dir=str(job_dir), log_dir=str(tmp_path / "logs"),
                                workdir=str(tmp_path), worker_argv=argv, indices=[0, 1], time="00:05:00",
                                mem="100M")
        job_id = await scheduler.submit(request)
        assert (job_dir / "job.sh").exists(), "the script went through SFTP"
        found = await scheduler.find_tags([tag])
        assert [j.job_id for j in found[tag]] == [job_id], found
        deadline = time.monotonic() + 60
        while True:
            got = await scheduler.query([job_id])
            if got.get(f"{job_id}_1") and got[f"{job_id}_1"].phase is Phase.DONE \
                    and got.get(f"{job_id}_0") and got[f"{job_id}_0"].phase is Phase.RUNNING:
                break
            assert time.monotonic() < deadline, got
            await anyio.sleep(0.3)
        assert got[f"{job_id}_1"].outcome is Outcome.FAILED, got
        await scheduler.cancel([f"{job_id}_0"])
        while (got := await scheduler.query([job_id]))[f"{job_id}_0"].phase is not Phase.DONE:
            assert time.monotonic() < deadline, got
            await anyio.sleep(0.3)
        assert got[f"{job_id}_0"].outcome is Outcome.CANCELLED, got
        assert transport.stats["commands"] >= 5 and inner.stats["connects"] == 1, inner.stats
    finally:
        await transport.aclose()
        emulated.close()
