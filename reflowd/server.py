"""The Unix-socket server: framing, limits, peer check, dispatch.

Bad input never hurts the daemon: malformed JSON, unknown methods, wrong
types, oversized lines, text that is not valid Unicode, deep nesting and huge
numbers each get a JSON-RPC error and the connection goes on; a client with
another uid is refused (``SO_PEERCRED``). Each connection is one task;
requests on a connection are answered in order. Nothing one connection does
can end the listener: an unexpected error closes that connection only, and
running out of file descriptors makes the accept loop shed the oldest idle
connection (or refuse the newest cheaply) and back off, never stop.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass, field
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

#: accept() failures that mean "no descriptor or memory for a new connection now".
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_STREAM_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
#: Most events of one watch sent in one write.
EVENT_BATCH = 256


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
            except _STREAM_GONE:
                self.eof = True
                continue
            self.buffer.extend(chunk)

    async def _skip_line(self) -> None:
        self.buffer.clear()
        while True:
            try:
                chunk = await self.stream.receive(65536)
            except _STREAM_GONE:
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


def connection_cap(limit: int = 256) -> int:
    """Connections to allow under this process's descriptor limit, keeping a quarter (at least 64) for
    the store, transports, job processes and connections on their way in or out."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limit
    return max(8, min(limit, soft - max(64, soft // 4)))


@dataclass(eq=False)
class Connection:
    """One client connection: what the server needs to pick the oldest idle one to close."""

    scope: anyio.CancelScope
    opened: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests under way; a watch stays busy while it streams
    spoke: bool = False  # has it sent a request? (a flood of silent connections goes first)
    seq: int = 0  # order of arrival


class _Spare:
    """One descriptor held in reserve: at EMFILE it is freed to accept, and close, a waiting connection."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.take()

    def take(self) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = None

    def refuse_one(self, raw: socket.socket | None) -> bool:
        """Accept and drop one waiting connection, so the backlog does not spin the loop."""
        if raw is None or self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        try:
            conn, _ = raw.accept()
            conn.close()
            return True
        except OSError:
            return False
        finally:
            self.take()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Server:
    def __init__(self, daemon: Daemon, *, max_connections: int = 256, idle_timeout: float = 3600.0,
                 max_message: int = MAX_MESSAGE_BYTES, send_timeout: float = 60.0, max_refusing: int = 16,
                 idle_grace: float = 0.5) -> None:
        self.daemon = daemon
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_message = max_message
        self.send_timeout = send_timeout
        self.max_refusing = max_refusing
        #: A connection quiet for less than this is not "idle" yet (its first request may be on the way).
        self.idle_grace = idle_grace
        self.live: set[Connection] = set()
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self.shed = 0
        self.accept_errors = 0
        self.handler_errors = 0
        self.refusing = 0
        self._arrivals = 0
        self._shed_warned = 0.0
        self.accepting = True
        self.active_requests = 0
        self._idle = anyio.Event()
        self._idle.set()

    @property
    def connections(self) -> int:
        return len(self.live)

    async def drain(self, timeout: float) -> None:
        """Stop taking requests and give the ones under way (a shutdown's own reply) time to finish."""
        self.accepting = False
        with anyio.move_on_after(timeout):
            await self._idle.wait()

    def stats(self) -> dict[str, Any]:
        return {"connections": self.connections, "max_connections": self.max_connections, "requests": self.requests,
                "errors": self.errors, "refused": self.refused, "idle_closed": self.shed,
                "accept_errors": self.accept_errors, "handler_errors": self.handler_errors}

    async def serve(self, listener: anyio.abc.Listener[SocketStream]) -> None:
        """Accept until cancelled; no error from ``accept`` or from a connection ends this loop."""
        spare = _Spare()
        raw = listener.extra(SocketAttribute.raw_socket, None)
        delay = 0.0
        starved = 0.0  # seconds the backlog has waited for a descriptor
        last_warning = 0.0
        try:
            async with listener, anyio.create_task_group() as tg:
                while True:
                    try:
                        stream = await listener.accept()
                    except anyio.ClosedResourceError:
                        return
                    except Exception as exc:  # noqa: BLE001 -- nothing may end the listener
                        self.accept_errors += 1
                        cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
                        code = getattr(cause, "errno", None)
                        if code in _RESOURCE_ERRNOS:
                            # Out of descriptors: make room by closing the oldest idle connection;
                            # with none idle, take the waiting one off the backlog and close it.
                            if self._shed_idle("out of file descriptors"):
                                delay = 0.01  # a descriptor is being freed: try again soon
                            elif starved >= 1.0:  # nothing idle for a while: refuse the waiting one
                                if spare.refuse_one(raw):
                                    self.refused += 1
                                starved = 0.0
                            else:
                                delay = min(max(delay * 2, 0.01), 1.0)
                            starved += delay
                        else:
                            delay = min(max(delay * 2, 0.001), 0.1)
                        now = time.monotonic()
                        if now - last_warning > 10:
                            last_warning = now
                            log.warning("accept failed; backing off", error=str(cause or exc),
                                        connections=self.connections, retry_in=delay)
                        await anyio.sleep(delay)
                        continue
                    delay = starved = 0.0
                    tg.start_soon(self.handle, stream)
        finally:
            spare.close()

    def _shed_idle(self, why: str) -> bool:
        """Close one idle connection (never one busy with a request or a watch); False if none is idle.

        Connections that never sent a request go first, oldest first, but not the newest few (their first
        request may still be unread) unless quiet for 0.1 s; then those quiet for at least
        ``idle_grace``, quiet the longest first.
        """
        now = time.monotonic()
        silent_grace = min(0.1, self.idle_grace)

        def eligible(c: Connection) -> bool:
            if c.busy:
                return False
            if c.spoke:
                return now - c.last_active >= self.idle_grace
            return self._arrivals - c.seq >= 8 or now - c.last_active >= silent_grace

        idle = [c for c in self.live if eligible(c)]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: (c.spoke, c.last_active))
        self.live.discard(oldest)
        oldest.scope.cancel()
        self.shed += 1
        log.debug("closed an idle connection", why=why, idle_for=round(now - oldest.last_active, 1))
        if now - self._shed_warned > 10:
            self._shed_warned = now
            log.warning("closing idle connections to make room", why=why, connections=len(self.live),
                        max_connections=self.max_connections, closed_so_far=self.shed)
        return True

    async def handle(self, stream: SocketStream) -> None:
        try:
            async with stream:
                try:
                    uid = peer_uid(stream)
                except OSError:
                    return  # the peer is already gone
                if uid is not None and uid != os.getuid():
                    self.refused += 1
                    log.warning("refused a connection from another user", peer_uid=uid)
                    await self._refuse(stream, "this reflowd serves only its own user")
                    return
                if len(self.live) >= self.max_connections and not self._shed_idle("connection limit reached"):
                    self.refused += 1
                    await self._refuse(stream, "too many connections, all busy; try again later")
                    return
                self._arrivals += 1
                conn = Connection(anyio.CancelScope(), seq=self._arrivals)
                self.live.add(conn)
                try:
                    with conn.scope:
                        await self._serve_connection(stream, conn)
                finally:
                    self.live.discard(conn)
        except Exception:  # a bug in one connection must not end the listener: log it, close that one
            self.handler_errors += 1
            log.exception("connection failed; closing it")

    async def _refuse(self, stream: SocketStream, message: str) -> None:
        """Say why, then let the peer finish sending so closing does not reset the connection.

        Cheap by design: a short wait, and under a flood (many refusals at once) just close.
        """
        if self.refusing >= self.max_refusing:
            return
        self.refusing += 1
        try:
            with anyio.move_on_after(1.0):
                await self._send(stream, error_response(None, RpcError(SERVER_ERROR, message)))
                await stream.send_eof()
                while len(await stream.receive(65536)):
                    pass
        except _STREAM_GONE:
            pass
        finally:
            self.refusing -= 1

    async def _send(self, stream: SocketStream, message: dict[str, Any] | list[dict[str, Any]]) -> bool:
        """Send one message (or several, one line each, in one write); False when the connection is done
        (gone, or not reading for send_timeout)."""
        data = b"".join(map(self._encode, message)) if isinstance(message, list) else self._encode(message)
        with anyio.move_on_after(self.send_timeout):
            try:
                await stream.send(data)
                return True
            except _STREAM_GONE:
                return False
        return False  # the client stopped reading

    def _encode(self, message: dict[str, Any]) -> bytes:
        try:
            return encode_message(message)
        except (ValueError, TypeError, RecursionError, OverflowError) as exc:
            self.errors += 1
            log.error("a reply could not be encoded", error=str(exc))
            return encode_message(error_response(message.get("id"),
                                                 RpcError(INTERNAL_ERROR, f"the reply could not be encoded: {exc}")))

    async def _serve_connection(self, stream: SocketStream, conn: Connection) -> None:
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
            conn.last_active = time.monotonic()
            conn.spoke = True
            if not line.strip():
                continue
            self.requests += 1
            self._begin()
            conn.busy += 1
            try:
                if not await self._answer(stream, reader, line, conn):
                    return
            finally:
                conn.busy -= 1
                conn.last_active = time.monotonic()
                self._end()

    def _begin(self) -> None:
        self.active_requests += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def _end(self) -> None:
        self.active_requests -= 1
        if self.active_requests == 0:
            self._idle.set()

    async def _answer(self, stream: SocketStream, reader: LineReader, line: bytes, conn: Connection) -> bool:
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
                        # Events come in bursts (a packed job's thousands of elements): what is already
                        # waiting goes out in one write, not one write (and one loop turn) per event.
                        batch = [notification("event", event)]
                        while len(batch) < EVENT_BATCH:
                            try:
                                batch.append(notification("event", sub.receive.receive_nowait()))
                            except (anyio.WouldBlock, anyio.EndOfStream):
                                break
                        if not await self._send(stream, batch):
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
