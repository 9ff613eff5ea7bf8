"""Talking to reflowd: ``Client`` (blocking) and ``AsyncClient`` (anyio).

Errors from the daemon arrive as :class:`ReflowError` (with the daemon's
message); no daemon at the socket is :class:`DaemonNotRunning`, whose message
says how to start one.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from . import protocol
from .config import socket_path as default_socket_path
from .protocol import MAX_MESSAGE_BYTES, RpcError, encode_message

TERMINAL_RUN_STATES = ("succeeded", "failed", "cancelled")


class ReflowError(Exception):
    """The daemon answered with an error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class UnknownRunError(ReflowError):
    pass


class InvalidParamsError(ReflowError):
    pass


class ClusterUnavailableError(ReflowError):
    """The chosen cluster cannot be used now (unreachable, host key, credentials); nothing was submitted."""


class StoreUnavailableError(ReflowError):
    """reflowd cannot write its state database (disk full, I/O error); nothing was changed, reads still work."""


class DaemonNotRunning(ConnectionError):
    """Nothing answers on the socket."""

    def __init__(self, path: Path, cause: str = "") -> None:
        super().__init__(
            f"no reflowd is running at {path}{f' ({cause})' if cause else ''}. Start one with 'reflowd' "
            "(or 'reflow-client submit', which starts it in the background)."
        )
        self.path = path


def _error(err: dict[str, Any]) -> ReflowError:
    code = err.get("code", protocol.SERVER_ERROR)
    cls = {
        protocol.UNKNOWN_RUN: UnknownRunError,
        protocol.INVALID_PARAMS: InvalidParamsError,
        protocol.CLUSTER_UNAVAILABLE: ClusterUnavailableError,
        protocol.STORE_UNAVAILABLE: StoreUnavailableError,
    }.get(code, ReflowError)
    return cls(code, str(err.get("message", "unknown error")), err.get("data"))


def _build(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class SubmitResult:
    run_id: str
    run_dir: str
    cluster: str
    workflow: str


@dataclass
class RunInfo:
    id: str
    workflow: str
    state: str
    cluster: str
    run_dir: str
    created_at: float
    updated_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, dict[str, int]] | None = None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_RUN_STATES


@dataclass
class TaskStatus:
    name: str
    is_array: bool
    expanded: bool
    size: int | None
    counts: dict[str, int]
    blocked: str | None = None
    blocked_reason: str | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class InstanceStatus:
    task: str
    index: int | None
    state: str
    attempt: int = 1
    job_id: str | None = None
    reason: str | None = None
    error: str | None = None
    host: str | None = None
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    cached_from: str | None = None
    traceback: str | None = None
    output: str | None = None
    #: Why the attempt ended: {"kind": "time_limit", "text": "time limit reached (limit 00:01:00)", ...}.
    cause: dict[str, Any] | None = None
    #: This attempt's resources ({"cpus", "mem", "time"}), escalated after an out-of-memory or a time limit.
    resources: dict[str, Any] | None = None
    #: Earlier attempts: [{"attempt", "state", "cause", "resources", "counted"}].
    attempts: list[dict[str, Any]] | None = None

    @property
    def label(self) -> str:
        return self.task if self.index is None else f"{self.task}[{self.index}]"


@dataclass
class RunStatus:
    run: RunInfo
    tasks: list[TaskStatus]
    failures: list[InstanceStatus]
    instances: list[InstanceStatus] | None = None
    cluster: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def state(self) -> str:
        return self.run.state

    @property
    def finished(self) -> bool:
        return self.run.finished

    @property
    def ok(self) -> bool:
        return self.run.state == "succeeded"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunStatus:
        return cls(
            run=_build(RunInfo, data["run"]),
            tasks=[_build(TaskStatus, t) for t in data.get("tasks", [])],
            failures=[_build(InstanceStatus, f) for f in data.get("failures", [])],
            instances=[_build(InstanceStatus, i) for i in data["instances"]] if "instances" in data else None,
            cluster=data.get("cluster"),
            raw=data,
        )


def _runs_params(workflow: str | None, state: str | list[str] | None, since: Any, until: Any, limit: int) -> dict[str, Any]:
    return {"workflow": workflow, "state": state, "since": since, "until": until, "limit": limit}


def _submit_params(manifest: dict[str, Any], params: dict[str, Any], run_dir: str, cluster: str | None,
                   options: dict[str, Any] | None) -> dict[str, Any]:
    return {"manifest": manifest, "params": params, "run_dir": run_dir, "cluster": cluster, "options": options or {}}


class AsyncClient:
    """An anyio connection to reflowd; use ``async with AsyncClient() as c``."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout: float = 60.0) -> None:
        self.path = Path(socket) if socket else default_socket_path()
        self.timeout = timeout
        self._stream: anyio.abc.SocketStream | None = None
        self._reader: BufferedByteReceiveStream | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        try:
            with anyio.fail_after(self.timeout):
                self._stream = await anyio.connect_unix(self.path)
        except (OSError, TimeoutError) as exc:
            raise DaemonNotRunning(self.path, str(exc)) from None
        self._reader = BufferedByteReceiveStream(self._stream)

    async def _reconnect(self) -> None:
        await self.aclose()
        await self.connect()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            line = await self._reader.receive_until(b"\n", MAX_MESSAGE_BYTES)
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            raise DaemonNotRunning(self.path, f"connection closed: {exc!r}") from None
        return json.loads(line)

    async def call(self, method: str, **params: Any) -> Any:
        if self._stream is None:
            await self.connect()
        assert self._stream is not None
        msg_id = next(self._ids)
        data = encode_message(protocol.request(method, params, msg_id))
        with anyio.fail_after(self.timeout):
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._reconnect()  # see Client.call: a failed send reached no daemon
                try:
                    await self._stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                    raise DaemonNotRunning(self.path, f"connection lost: {exc!r}") from None
            while True:
                reply = await self._read()
                if reply.get("id") == msg_id or (reply.get("id") is None and "error" in reply):
                    break
        if "error" in reply:
            raise _error(reply["error"])
        return reply.get("result")

    async def hello(self) -> dict[str, Any]:
        return await self.call("hello", protocol=protocol.PROTOCOL_VERSION, client="reflow_client")

    async def ping(self) -> dict[str, Any]:
        return await self.call("ping")

    async def submit(self, manifest: dict[str, Any], params: dict[str, Any], run_dir: str, *,
                     cluster: str | None = None, options: dict[str, Any] | None = None) -> SubmitResult:
        return _build(SubmitResult, await self.call("submit", **_submit_params(manifest, params, run_dir, cluster,
                                                                                options)))

    async def status(self, run_id: str, task: str | None = None) -> RunStatus:
        return RunStatus.from_dict(await self.call("status", run_id=run_id, task=task))

    async def runs(self, *, workflow: str | None = None, state: str | list[str] | None = None, since: Any = None,
                   until: Any = None, limit: int = 50) -> list[RunInfo]:
        data = await self.call("runs", **_runs_params(workflow, state, since, until, limit))
        return [_build(RunInfo, r) for r in data["runs"]]

    async def cancel(self, run_id: str, task: str | None = None, index: int | None = None) -> int:
        """Cancel a run, one task, or (with *index*) one element of an array task."""
        extra = {} if index is None else {"index": index}
        return (await self.call("cancel", run_id=run_id, task=task, **extra))["cancelled"]

    async def retry(self, run_id: str, task: str | None = None, verify: bool = True) -> int:
        return (await self.call("retry", run_id=run_id, task=task, verify=verify))["retried"]

    async def logs(self, run_id: str, task: str, index: int | None = None, max_bytes: int = 65536) -> dict[str, Any]:
        return await self.call("logs", run_id=run_id, task=task, index=index, max_bytes=max_bytes)

    async def describe(self, run_id: str) -> dict[str, Any]:
        return await self.call("describe", run_id=run_id)

    async def resolve(self, ref: str, workflow: str | None = None) -> str:
        """The full run id for *ref*: a run id, an unambiguous prefix of one, or ``last``."""
        return (await self.call("resolve", ref=ref, workflow=workflow))["run_id"]

    async def results(self, run_id: str, task: str | None = None, index: int | None = None,
                      limit: int = 1000) -> dict[str, Any]:
        """Encoded outputs of the final tasks (or of *task*); decode with ``reflow_client.values``."""
        return await self.call("results", run_id=run_id, task=task, index=index, limit=limit)

    async def stats(self) -> dict[str, Any]:
        return await self.call("stats")

    async def shutdown(self) -> dict[str, Any]:
        return await self.call("shutdown")

    async def watch(self, run_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"type": "snapshot", ...}``, then events, then ``{"type": "end", ...}``; uses its own connection."""
        async with AsyncClient(self.path, timeout=self.timeout) as conn:
            assert conn._stream is not None
            msg_id = next(conn._ids)
            await conn._stream.send(encode_message(protocol.request("watch", {"run_id": run_id}, msg_id)))
            first = await conn._read()
            if "error" in first:
                raise _error(first["error"])
            yield {"type": "snapshot", **first["result"]}
            while True:
                msg = await conn._read()
                params = msg.get("params", {})
                if msg.get("method") == "end":
                    yield {"type": "end", **params}
                    return
                yield params

    async def wait(self, run_id: str, timeout: float | None = None) -> RunStatus:
        """Block until the run ends (or TimeoutError); returns its final status."""
        with anyio.fail_after(timeout):
            async for event in self.watch(run_id):
                if event["type"] == "snapshot" and event["status"]["run"]["state"] in TERMINAL_RUN_STATES:
                    break
                if event.get("type") == "end":
                    break
            return await self.status(run_id)


class Client:
    """A blocking connection to reflowd (one request at a time)."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, timeout: float = 60.0) -> None:
        self.path = Path(socket) if socket else default_socket_path()
        self.timeout = timeout
        self._sock: Any = None
        self._buffer = b""
        self._ids = itertools.count(1)

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise DaemonNotRunning(self.path, exc.strerror or str(exc)) from None
        self._sock = sock
        self._buffer = b""

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read(self, timeout: float | None) -> dict[str, Any]:
        self._sock.settimeout(timeout)
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(f"reflowd did not answer within {timeout} s") from None
            except ConnectionError as exc:  # reset by a daemon that stopped: the same as a closed connection
                raise DaemonNotRunning(self.path, f"connection lost: {exc.strerror or exc}") from None
            if not chunk:
                raise DaemonNotRunning(self.path, "connection closed")
            self._buffer += chunk
            if len(self._buffer) > MAX_MESSAGE_BYTES + 1:
                raise ReflowError(protocol.MESSAGE_TOO_LARGE, "reply too large")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def call(self, method: str, **params: Any) -> Any:
        if self._sock is None:
            self.connect()
        msg_id = next(self._ids)
        data = encode_message(protocol.request(method, params, msg_id))
        try:
            self._sock.sendall(data)
        except OSError:
            # The daemon closes a connection left idle (after its idle timeout, or to make room at its
            # connection cap), e.g. while a script waited for a long run on its own watch. A send that failed
            # reached no daemon (a cut-off request is never acted on), so it is sent once more, freshly
            # connected; with no daemon there, connect() says so.
            self.close()
            self.connect()
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self.close()
                raise DaemonNotRunning(self.path, str(exc)) from None
        while True:
            reply = self._read(self.timeout)
            if reply.get("id") == msg_id or (reply.get("id") is None and "error" in reply):
                break
        if "error" in reply:
            raise _error(reply["error"])
        return reply.get("result")

    def hello(self) -> dict[str, Any]:
        return self.call("hello", protocol=protocol.PROTOCOL_VERSION, client="reflow_client")

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def submit(self, manifest: dict[str, Any], params: dict[str, Any], run_dir: str, *, cluster: str | None = None,
               options: dict[str, Any] | None = None) -> SubmitResult:
        return _build(SubmitResult, self.call("submit", **_submit_params(manifest, params, run_dir, cluster, options)))

    def status(self, run_id: str, task: str | None = None) -> RunStatus:
        return RunStatus.from_dict(self.call("status", run_id=run_id, task=task))

    def runs(self, *, workflow: str | None = None, state: str | list[str] | None = None, since: Any = None,
             until: Any = None, limit: int = 50) -> list[RunInfo]:
        return [_build(RunInfo, r) for r in self.call("runs", **_runs_params(workflow, state, since, until, limit))["runs"]]

    def cancel(self, run_id: str, task: str | None = None, index: int | None = None) -> int:
        """Cancel a run, one task, or (with *index*) one element of an array task."""
        extra = {} if index is None else {"index": index}
        return self.call("cancel", run_id=run_id, task=task, **extra)["cancelled"]

    def retry(self, run_id: str, task: str | None = None, verify: bool = True) -> int:
        return self.call("retry", run_id=run_id, task=task, verify=verify)["retried"]

    def logs(self, run_id: str, task: str, index: int | None = None, max_bytes: int = 65536) -> dict[str, Any]:
        return self.call("logs", run_id=run_id, task=task, index=index, max_bytes=max_bytes)

    def describe(self, run_id: str) -> dict[str, Any]:
        return self.call("describe", run_id=run_id)

    def resolve(self, ref: str, workflow: str | None = None) -> str:
        """The full run id for *ref*: a run id, an unambiguous prefix of one, or ``last``."""
        return self.call("resolve", ref=ref, workflow=workflow)["run_id"]

    def results(self, run_id: str, task: str | None = None, index: int | None = None,
                limit: int = 1000) -> dict[str, Any]:
        """Encoded outputs of the final tasks (or of *task*); decode with ``reflow_client.values``."""
        return self.call("results", run_id=run_id, task=task, index=index, limit=limit)

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def shutdown(self) -> dict[str, Any]:
        return self.call("shutdown")

    def watch(self, run_id: str | None = None, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Like :meth:`AsyncClient.watch`, on a dedicated connection."""
        conn = Client(self.path, timeout=self.timeout)
        conn.connect()
        try:
            conn._sock.sendall(encode_message(protocol.request("watch", {"run_id": run_id}, 1)))
            first = conn._read(self.timeout)
            if "error" in first:
                raise _error(first["error"])
            yield {"type": "snapshot", **first["result"]}
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                left = None if deadline is None else max(0.001, deadline - time.monotonic())
                msg = conn._read(left)
                params = msg.get("params", {})
                if msg.get("method") == "end":
                    yield {"type": "end", **params}
                    return
                yield params
        finally:
            conn.close()

    def wait(self, run_id: str, timeout: float | None = None) -> RunStatus:
        for event in self.watch(run_id, timeout=timeout):
            if event["type"] == "snapshot" and event["status"]["run"]["state"] in TERMINAL_RUN_STATES:
                break
            if event.get("type") == "end":
                break
        return self.status(run_id)


__all__ = [
    "AsyncClient",
    "Client",
    "DaemonNotRunning",
    "InstanceStatus",
    "InvalidParamsError",
    "ReflowError",
    "RpcError",
    "RunInfo",
    "RunStatus",
    "SubmitResult",
    "TaskStatus",
    "UnknownRunError",
]
