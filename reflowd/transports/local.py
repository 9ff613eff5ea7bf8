"""Commands and files on the daemon's own machine, off the event loop."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence

import anyio

from reflow_client.jobfiles import write_bytes_atomic

from .base import CommandResult, CommandTimeout, Transport, TransportError


def _read_many(paths: Sequence[str]) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for path in paths:
        try:
            with open(path, "rb") as fh:
                out[path] = fh.read()
        except (FileNotFoundError, NotADirectoryError):
            out[path] = None
    return out


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


class LocalTransport(Transport):
    """Run on this machine; files through a worker thread so the loop never blocks."""

    name = "local"

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> CommandResult:
        full_env = None
        if env:
            full_env = dict(os.environ)
            full_env.update(env)
        try:
            with anyio.fail_after(timeout):
                proc = await anyio.run_process(
                    list(argv), input=stdin, check=False, env=full_env, stdin=None if stdin else subprocess.DEVNULL
                )
        except TimeoutError as exc:
            raise CommandTimeout(f"{argv[0]} did not finish within {timeout:.0f} s") from exc
        except OSError as exc:
            raise TransportError(f"cannot run {argv[0]}: {exc}") from exc
        self.health.mark_ok()
        return CommandResult(
            proc.returncode,
            proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"),
        )

    async def read_files(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bytes | None]:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(_read_many, list(paths))

    async def write_files(self, files: Mapping[str, bytes], *, timeout: float = 60.0, mode: int = 0o644) -> None:
        items = list(files.items())

        def write_all() -> None:
            for path, data in items:
                write_bytes_atomic(path, data, mode, durable=False)

        with anyio.fail_after(timeout):
            await anyio.to_thread.run_sync(write_all)

    async def listdir(self, path: str, *, timeout: float = 30.0) -> list[str]:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(_listdir, path)

    async def exists(self, paths: Sequence[str], *, timeout: float = 30.0) -> dict[str, bool]:
        items = list(paths)
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(lambda: {p: os.path.exists(p) for p in items})

    async def makedirs(self, paths: Sequence[str], *, timeout: float = 30.0) -> None:
        items = list(paths)

        def make() -> None:
            for p in items:
                os.makedirs(p, exist_ok=True)

        with anyio.fail_after(timeout):
            await anyio.to_thread.run_sync(make)
