"""The Unix-socket server: framing, limits, peer check, dispatch.

Bad input never hurts the daemon: malformed JSON, unknown methods, wrong
types and oversized lines each get a JSON-RPC error and the connection goes
on; a client with another uid is refused (``SO_PEERCRED``). Each connection
is one task; requests on a connection are answered in order.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketStream

from reflow_client.protocol import (
    INTERNAL_ERROR,
    MAX_MESSAGE_BYTES,
    MESSAGE_TOO_LARGE,
    SERVER_ERROR,
    SHUTTING_DOWN,
    RpcError,
    encode_message,
    error_response,
    notification,
    parse_request,
    response,
)

from . import commands
from .engine.states import RUN_TERMINAL

if TYPE_CHECKING:
    from .daemon import Daemon

log = structlog.get_logger("reflowd.server")


class LineReader:
    """Newline-framed reader that survives oversized lines by skipping them."""

    def __init__(self, stream: SocketStream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.buffer = bytearray()
        self.eof = False

    async def next(self) -> bytes | None:
        """The next line (without newline); None at end of stream; raises RpcError for an oversized line."""
        while True:
            pos = self.buffer.find(b"\n")
            if pos >= 0:
                line = bytes(self.buffer[:pos])
                del self.buffer[: pos + 1]
                if len(line) > self.limit:
                    raise RpcError(MESSAGE_TOO_LARGE, f"message of {len(line)} bytes exceeds the {self.limit}-byte limit")
                return line
            if len(self.buffer) > self.limit:
                size = len(self.buffer)
                await self._skip_line()
                raise RpcError(MESSAGE_TOO_LARGE, f"message of more than {size} bytes exceeds the "
                                                  f"{self.limit}-byte limit")
            if self.eof:
                if self.buffer.strip():
                    self.buffer.clear()
                    raise RpcError(SERVER_ERROR, "connection closed in the middle of a message (truncated frame)")
                return None
            try:
                chunk = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.eof = True
                continue
            self.buffer.extend(chunk)

    async def _skip_line(self) -> None:
        self.buffer.clear()
        while True:
            try:
                chunk = await self.stream.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.eof = True
                return
            pos = chunk.find(b"\n")
            if pos >= 0:
                self.buffer.extend(chunk[pos + 1 :])
                return


def peer_uid(stream: SocketStream) -> int | None:
    raw = stream.extra(SocketAttribute.raw_socket, None)
    if raw is None:
        return None
    creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class Server:
    def __init__(self, daemon: Daemon, *, max_connections: int = 256, idle_timeout: float = 3600.0,
                 max_message: int = MAX_MESSAGE_BYTES) -> None:
        self.daemon = daemon
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_message = max_message
        self.connections = 0
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self.accepting = True
        self.active_requests = 0
        self._idle = anyio.Event()
        self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Stop taking requests and give the ones under way (a shutdown's own reply) time to finish."""
        self.accepting = False
        with anyio.move_on_after(timeout):
            await self._idle.wait()

    def stats(self) -> dict[str, Any]:
        return {"connections": self.connections, "requests": self.requests, "errors": self.errors,
                "refused": self.refused}

    async def serve(self, listener: anyio.abc.Listener[SocketStream]) -> None:
        async with listener:
            await listener.serve(self.handle)

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            uid = peer_uid(stream)
            if uid is not None and uid != os.getuid():
                self.refused += 1
                log.warning("refused a connection from another user", peer_uid=uid)
                await self._refuse(stream, "this reflowd serves only its own user")
                return
            if self.connections >= self.max_connections:
                self.refused += 1
                await self._refuse(stream, "too many connections; try again later")
                return
            self.connections += 1
            try:
                await self._serve_connection(stream)
            finally:
                self.connections -= 1

    async def _refuse(self, stream: SocketStream, message: str) -> None:
        """Say why, then let the peer finish sending so closing does not reset the connection."""
        await self._send(stream, error_response(None, RpcError(SERVER_ERROR, message)))
        try:
            await stream.send_eof()
            with anyio.move_on_after(2.0):
                while len(await stream.receive(65536)):
                    pass
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def _send(self, stream: SocketStream, message: dict[str, Any]) -> bool:
        try:
            await stream.send(encode_message(message))
            return True
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False

    async def _serve_connection(self, stream: SocketStream) -> None:
        reader = LineReader(stream, self.max_message)
        while True:
            try:
                with anyio.fail_after(self.idle_timeout):
                    line = await reader.next()
            except TimeoutError:
                return
            except RpcError as exc:
                self.errors += 1
                if not await self._send(stream, error_response(None, exc)):
                    return
                continue
            if line is None:
                return
            if not line.strip():
                continue
            self.requests += 1
            self._begin()
            try:
                if not await self._answer(stream, reader, line):
                    return
            finally:
                self._end()

    def _begin(self) -> None:
        self.active_requests += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def _end(self) -> None:
        self.active_requests -= 1
        if self.active_requests == 0:
            self._idle.set()

    async def _answer(self, stream: SocketStream, reader: LineReader, line: bytes) -> bool:
        """Answer one request; False when the connection is done."""
        msg_id: Any = None
        try:
            msg_id, method, params = parse_request(line)
            cmd = commands.lookup(method)
            if not self.accepting and method not in ("ping", "hello"):
                raise RpcError(SHUTTING_DOWN, "reflowd is shutting down")
            checked = cmd.validate(params)
            result = await cmd.handler(self.daemon, checked)
        except RpcError as exc:
            self.errors += 1
            if msg_id is None and isinstance(exc.data, dict):
                msg_id = exc.data.get("id")
                exc.data = None
            return await self._send(stream, error_response(msg_id, exc))
        except Exception as exc:  # a bug: report it, keep the daemon and the connection alive
            self.errors += 1
            log.exception("request failed", request=line[:200].decode("utf-8", "replace"))
            return await self._send(stream, error_response(msg_id, RpcError(INTERNAL_ERROR, f"internal error: {exc}")))
        if cmd.streaming:
            self._end()  # a watch lasts; it must not hold up a shutdown
            try:
                await self._stream_watch(stream, reader, msg_id, result)
            finally:
                self._begin()
            return False
        if msg_id is None:
            return True
        return await self._send(stream, response(msg_id, result))

    async def _stream_watch(self, stream: SocketStream, reader: LineReader, msg_id: Any, first: dict[str, Any]) -> None:
        """Send the snapshot, then every event, until the run ends or the client goes away."""
        engine = self.daemon.engine
        run_id = first.get("watching")
        run = engine.runs.get(run_id) if run_id else None
        finished = run_id is not None and (run is None or run.state in RUN_TERMINAL)
        sub = None if finished else engine.subscribe(run_id)
        if not await self._send(stream, response(msg_id, first)):
            if sub is not None:
                engine.events.unsubscribe(sub)
            return
        if sub is None:
            await self._send(stream, notification("end", {"run_id": run_id, "state": first["status"]["run"]["state"]}))
            return
        async with anyio.create_task_group() as tg:

            async def client_gone() -> None:
                try:
                    while (await reader.next()) is not None:
                        pass
                except RpcError:
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(client_gone)
            try:
                async with sub.receive:
                    async for event in sub.receive:
                        if not await self._send(stream, notification("event", event)):
                            break
                if sub.overflowed:
                    await self._send(stream, notification("end", {"run_id": run_id, "error": "watch fell behind; "
                                                                   "reconnect to continue"}))
                elif run is not None:
                    await self._send(stream, notification("end", {"run_id": run_id, "state": run.state.value,
                                                                  "at": time.time()}))
            finally:
                engine.events.unsubscribe(sub)
                tg.cancel_scope.cancel()
