"""The client protocol: newline-delimited JSON-RPC 2.0 over a Unix stream socket.

One request per line, one response per line (a ``watch`` streams
notifications until the client disconnects). Nothing is ever unpickled:
messages are JSON, capped at ``MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
#: Largest accepted line (manifests of very large workflows fit comfortably).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# JSON-RPC 2.0 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# reflow codes.
SERVER_ERROR = -32000
UNKNOWN_RUN = -32001
MESSAGE_TOO_LARGE = -32003
SHUTTING_DOWN = -32004
VERSION_MISMATCH = -32005
CLUSTER_UNAVAILABLE = -32006
#: The state database cannot be written (disk full, I/O error): changes are refused, reads work.
STORE_UNAVAILABLE = -32007


class RpcError(Exception):
    """An error reply from the daemon (or one to send to a client)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def encode_message(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8") + b"\n"


def request(method: str, params: dict[str, Any] | None, msg_id: int | str | None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if msg_id is not None:
        msg["id"] = msg_id
    return msg


def response(msg_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def error_response(msg_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": error.to_dict()}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def parse_request(line: bytes) -> tuple[Any, str, dict[str, Any]]:
    """(id, method, params) of one request line, or RpcError saying what is wrong with it."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RpcError(PARSE_ERROR, f"not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object")
    msg_id = msg.get("id")
    if msg.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'missing "jsonrpc": "2.0"', {"id": msg_id})
    if (msg_id is not None and not isinstance(msg_id, (str, int))) or isinstance(msg_id, bool):
        raise RpcError(INVALID_REQUEST, "id must be a string or an integer")
    method = msg.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, "method must be a string", {"id": msg_id})
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object (named parameters)", {"id": msg_id})
    return msg_id, method, params
