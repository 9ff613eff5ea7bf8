"""The SSH transport against a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from reflowd.transports.base import AuthenticationError, CommandTimeout, HostKeyError, TransportError
from reflowd.transports.ssh import SSHSettings, SSHTransport, backoff_delay, parse_jump, remote_command

from .cluster.fixtures_ssh import SSHServer


def settings_for(server: SSHServer, **overrides: object) -> SSHSettings:
    base = dict(host=server.host, port=server.port, user=server.user, identity_file=str(server.key),
                known_hosts=str(server.known_hosts), backoff_initial=0.2, backoff_max=1.0, connect_timeout=10.0)
    base.update(overrides)
    return SSHSettings(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------- pure parts


def test_remote_command_quotes_every_word() -> None:
    assert remote_command(["echo", "a b", "$(id)", "it's"]) == "echo 'a b' '$(id)' 'it'\"'\"'s'"
    assert remote_command(["squeue"], {"A": "x y"}) == "env 'A=x y' squeue"
    with pytest.raises(ValueError):
        remote_command([])


def test_parse_jump() -> None:
    hops = parse_jump("alice@gw.example.org:2200, bastion")
    assert [(h.user, h.host, h.port) for h in hops] == [("alice", "gw.example.org", 2200), (None, "bastion", 22)]
    assert parse_jump("[::1]:2222")[0].host == "::1" and parse_jump("[::1]:2222")[0].port == 2222
    with pytest.raises(ValueError, match="not a port"):
        parse_jump("gw:http")
    with pytest.raises(ValueError, match="names no host"):
        parse_jump(" , ")


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, 1.0, 30.0, rng) for n in range(1, 9)]
    assert 0.5 <= delays[0] <= 1.0
    assert 4.0 <= delays[3] <= 8.0
    assert all(d <= 30.0 for d in delays) and delays[-1] >= 15.0
    assert len({round(backoff_delay(3, 1.0, 30.0, rng), 6) for _ in range(20)}) > 1, "jittered"


def test_too_few_channels_is_refused() -> None:
    with pytest.raises(ValueError, match="max_channels"):
        SSHTransport(SSHSettings(host="127.0.0.1", max_channels=1))


# ---------------------------------------------------------------- against sshd



@pytest.fixture
async def transport(sshd: SSHServer):
    t = SSHTransport(settings_for(sshd))
    yield t
    await t.aclose()


@pytest.mark.ssh
@pytest.mark.anyio
async def test_commands_run_with_exact_arguments(transport: SSHTransport) -> None:
    result = await transport.run(["printf", "%s|", "a b", "$(id)", "'q'", "*"])
    assert result.ok and result.stdout == "a b|$(id)|'q'|*|"
    result = await transport.run(["sh", "-c", 'echo "$GREETING"; cat; echo oops >&2; exit 3'],
                                 stdin=b"from stdin\n", env={"GREETING": "hello there"})
    assert (result.returncode, result.stdout, result.stderr) == (3, "hello there\nfrom stdin\n", "oops\n")
    assert transport.health.reachable and transport.health.last_ok


@pytest.mark.ssh
@pytest.mark.anyio
async def test_commands_without_stdin_do_not_wait_for_it(transport: SSHTransport) -> None:
    result = await transport.run(["cat"], timeout=10)
    assert result.ok and result.stdout == ""


@pytest.mark.ssh
@pytest.mark.anyio
async def test_more_commands_than_maxsessions_queue_instead_of_failing(sshd: SSHServer) -> None:
    """sshd allows 10 sessions per connection: 30 concurrent commands must all succeed under the cap."""
    t = SSHTransport(settings_for(sshd, max_channels=8))
    results: list[str] = []

    async def one(i: int) -> None:
        r = await t.run(["sh", "-c", f"sleep 0.3; echo {i}"], timeout=60)
        results.append(r.stdout.strip())

    try:
        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
    finally:
        await t.aclose()
    assert sorted(results, key=int) == [str(i) for i in range(30)]


@pytest.mark.ssh
@pytest.mark.anyio
async def test_without_the_cap_the_server_refuses_channels(sshd: SSHServer) -> None:
    """The reason for the cap, shown for real: above MaxSessions the server refuses, with a clear error."""
    t = SSHTransport(settings_for(sshd, max_channels=25))
    errors: list[str] = []

    async def one() -> None:
        try:
            await t.run(["sleep", "1"], timeout=60)
        except TransportError as exc:
            errors.append(str(exc))

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
    finally:
        await t.aclose()
    assert errors, "sshd should refuse channels beyond MaxSessions=10"
    assert all("max_channels" in e for e in errors), errors[:2]


@pytest.mark.ssh
@pytest.mark.anyio
async def test_timeout_closes_the_channel(sshd: SSHServer) -> None:
    """Timed-out commands give their channels back: a leak would make the server refuse the next ten."""
    t = SSHTransport(settings_for(sshd, max_channels=11))  # 10 command channels = the server's MaxSessions
    try:
        for _ in range(5):
            with pytest.raises(CommandTimeout, match="did not finish within"):
                await t.run(["sleep", "30"], timeout=0.3)
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(lambda: t.run(["sleep", "0.5"], timeout=30))
        assert (await t.run(["echo", "ok"])).stdout == "ok\n"
        # The server refuses to signal the abandoned commands, so each stranded session was shed with
        # its connection before the next command: one connection plus one recycle per timeout.
        assert t.stats["connects"] == 6
    finally:
        await t.aclose()


@pytest.mark.ssh
@pytest.mark.anyio
async def test_sftp_files_in_batches(transport: SSHTransport, tmp_path: Path) -> None:
    base = tmp_path / "remote" / "a" / "b"
    files = {str(base / f"f{i}.json"): f'{{"i": {i}}}'.encode() for i in range(50)}
    await transport.write_files(files, mode=0o640)
    got = await transport.read_files([*files, str(base / "missing.json"), str(tmp_path / "nodir" / "x")])
    assert {k: v for k, v in got.items() if k in files} == files
    assert got[str(base / "missing.json")] is None and got[str(tmp_path / "nodir" / "x")] is None
    assert stat.S_IMODE(os.stat(base / "f0.json").st_mode) == 0o640
    assert sorted(await transport.listdir(str(base))) == sorted(f"f{i}.json" for i in range(50))
    assert await transport.listdir(str(tmp_path / "absent")) == []
    assert not [n for n in os.listdir(base) if ".tmp-" in n], "no temporary files left"
    # Overwrite is atomic (rename over the old file) and keeps the new mode.
    await transport.write_file(str(base / "f0.json"), b"new", mode=0o755)
    assert (base / "f0.json").read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(base / "f0.json").st_mode) == 0o755
    await transport.makedirs([str(tmp_path / "m" / "n" / "o"), str(tmp_path / "m")])
    assert (tmp_path / "m" / "n" / "o").is_dir()
    exists = await transport.exists([str(base / "f1.json"), str(base / "nope")])
    assert exists == {str(base / "f1.json"): True, str(base / "nope"): False}


@pytest.mark.ssh
@pytest.mark.anyio
async def test_sftp_errors_are_clear(transport: SSHTransport, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(TransportError, match="writing 1 file"):
        await transport.write_file(str(tmp_path / "file" / "below"), b"y")
    assert (await transport.run(["true"])).ok, "the connection survives a failed file operation"


@pytest.mark.ssh
@pytest.mark.anyio
async def test_killed_connection_is_reestablished(transport: SSHTransport, sshd: SSHServer, tmp_path: Path) -> None:
    assert (await transport.run(["true"])).ok
    await transport.write_file(str(tmp_path / "x"), b"1")
    assert sshd.kill_connections(), "the daemon's connection is served by sshd processes"
    assert (await transport.run(["echo", "again"])).stdout == "again\n"
    assert await transport.read_file(str(tmp_path / "x")) == b"1"
    assert transport.health.reconnects == 1 and transport.health.reachable


async def _kill_when(path: Path, sshd: SSHServer) -> None:
    with anyio.fail_after(30):
        while not path.exists():
            await anyio.sleep(0.05)
    sshd.kill_connections()


@pytest.mark.ssh
@pytest.mark.anyio
async def test_in_flight_submission_is_not_rerun(transport: SSHTransport, sshd: SSHServer, tmp_path: Path) -> None:
    log = tmp_path / "ran.txt"
    script = f"echo run >> {log}; sleep 3; echo done"
    caught: list[TransportError] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_kill_when, log, sshd)
        try:
            await transport.run(["sh", "-c", script], idempotent=False, timeout=30)
        except TransportError as exc:
            caught.append(exc)
    assert caught and "connection lost" in str(caught[0])
    assert log.read_text().count("run") == 1
    assert (await transport.run(["true"])).ok, "the next call reconnects"


@pytest.mark.ssh
@pytest.mark.anyio
async def test_in_flight_query_is_retried(transport: SSHTransport, sshd: SSHServer, tmp_path: Path) -> None:
    marker = tmp_path / "first.txt"
    script = f"if [ -e {marker} ]; then echo second; else touch {marker}; sleep 5; echo first; fi"
    async with anyio.create_task_group() as tg:
        tg.start_soon(_kill_when, marker, sshd)
        result = await transport.run(["sh", "-c", script], timeout=30)
    assert result.stdout == "second\n", "re-run on the new connection"


@pytest.mark.ssh
@pytest.mark.anyio
async def test_outage_is_reported_and_heals(sshd: SSHServer) -> None:
    t = SSHTransport(settings_for(sshd, backoff_initial=0.2, backoff_max=1.0))
    try:
        assert (await t.run(["true"])).ok
        sshd.stop(drop_connections=True)
        started = time.monotonic()
        with pytest.raises(TransportError):
            await t.run(["true"])
        health = t.health.to_dict()
        assert health["reachable"] is False and health["down_since"] and "connect" in str(health["last_error"])
        with pytest.raises(TransportError, match="next attempt in"):
            await t.run(["true"])  # during backoff: fails fast, no new connection attempt
        assert time.monotonic() - started < 10
        sshd.start()
        with anyio.fail_after(30):
            while True:
                try:
                    if (await t.run(["echo", "back"])).stdout == "back\n":
                        break
                except TransportError:
                    await anyio.sleep(0.2)
        assert t.health.reachable and t.health.down_since is None
    finally:
        await t.aclose()
        if not sshd.running():
            sshd.start()


@pytest.mark.ssh
@pytest.mark.anyio
async def test_unknown_host_key_is_a_clear_error(sshd: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = SSHTransport(settings_for(sshd, known_hosts=str(empty)))
    try:
        with pytest.raises(HostKeyError) as info:
            await t.check(timeout=20)
    finally:
        await t.aclose()
    message = str(info.value)
    assert f"[127.0.0.1]:{sshd.port}" in message and str(empty) in message
    assert "ssh-keyscan -p" in message and "SHA256:" in message, message
    assert empty.read_text() == "", "never accepted silently"


@pytest.mark.ssh
@pytest.mark.anyio
async def test_changed_host_key_is_a_clear_error(sshd: SSHServer, tmp_path: Path) -> None:
    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    t = SSHTransport(settings_for(sshd, known_hosts=str(known)))
    try:
        with pytest.raises(HostKeyError, match="ssh-keygen -R"):
            await t.run(["true"])
    finally:
        await t.aclose()


@pytest.mark.ssh
@pytest.mark.anyio
async def test_wrong_user_key_is_a_clear_error(sshd: SSHServer, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    t = SSHTransport(settings_for(sshd, identity_file=str(wrong)))
    try:
        with pytest.raises(AuthenticationError) as info:
            await t.check(timeout=20)
        assert str(wrong) in str(info.value) and "authorized_keys" in str(info.value)
        assert not t.health.reachable
    finally:
        await t.aclose()


@pytest.mark.ssh
@pytest.mark.anyio
async def test_proxy_jump_through_a_bastion(sshd: SSHServer) -> None:
    """The same sshd serves as jump host and target: the connection really goes through a tunnel."""
    t = SSHTransport(settings_for(sshd, proxy_jump=f"{sshd.user}@127.0.0.1:{sshd.port}"))
    try:
        result = await t.run(["sh", "-c", "echo $SSH_CONNECTION"])
        assert result.ok
        # Through the tunnel the target sees the connection coming from the jump host's sshd (loopback).
        assert result.stdout.split()[2:4] == ["127.0.0.1", str(sshd.port)]
        assert len(t._tunnels) == 1
    finally:
        await t.aclose()


@pytest.mark.ssh
@pytest.mark.anyio
async def test_unknown_host_key_behind_a_jump_host(sshd: SSHServer, tmp_path: Path) -> None:
    """The jump host is trusted, the target is not: the error names the target and still shows its key."""
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts.read_text().replace("[127.0.0.1]", "[localhost]"))
    t = SSHTransport(settings_for(sshd, known_hosts=str(known), host="127.0.0.1",
                                  proxy_jump=f"{sshd.user}@localhost:{sshd.port}"))
    try:
        with pytest.raises(HostKeyError) as info:
            await t.check(timeout=20)
    finally:
        await t.aclose()
    assert f"[127.0.0.1]:{sshd.port}" in str(info.value) and "SHA256:" in str(info.value)


@pytest.mark.ssh
@pytest.mark.anyio
async def test_directory_removed_behind_our_back_is_made_again(transport: SSHTransport, tmp_path: Path) -> None:
    import shutil

    target = tmp_path / "run" / "jobs" / "a.json"
    await transport.write_file(str(target), b"1")
    shutil.rmtree(tmp_path / "run")
    with pytest.raises(TransportError):
        await transport.write_file(str(target), b"2")  # the directory cache still said it existed
    await transport.write_file(str(target), b"3")
    assert target.read_bytes() == b"3"
