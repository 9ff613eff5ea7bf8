"""The client protocol: newline-delimited JSON-RPC 2.0 over a Unix stream socket.

One request per line, one response per line (a ``watch`` streams
notifications until the client disconnects). Nothing is ever unpickled:
messages are JSON, capped at ``MAX_MESSAGE_BYTES``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

PROTOCOL_VERSION = 1
#: Largest accepted line (manifests of very large workflows fit comfortably).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Deepest nesting of arrays and objects in one message (a manifest needs about ten levels).
MAX_DEPTH = 100
#: Longest integer literal: numbers must stay within what a 64-bit float can hold (about 1e308).
MAX_NUMBER_DIGITS = 309

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
    """One line of JSON. Text that is not valid Unicode (lone surrogates, e.g. from an undecodable
    file name) is sent escaped (``\\udcff``), never lost and never a crash."""
    try:
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str)
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=True, default=str).encode("ascii") + b"\n"


class _Refused(ValueError):
    """A JSON value over the protocol's limits (raised from json's parse hooks)."""


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise _Refused(f"number with {digits} digits is too large (at most {MAX_NUMBER_DIGITS} digits, about 1e308)")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is too large (beyond about 1e308)")
    return value


def _parse_constant(text: str) -> float:
    raise _Refused(f"{text} is not a JSON number")


def loads(line: bytes | str) -> Any:
    """``json.loads`` within the protocol's limits; ValueError (or _Refused) says what is wrong.

    Bytes are decoded strictly first: ``json.loads`` on bytes lets a surrogate encoded as UTF-8 through
    (``b"\\xed\\xa0\\x80"``), which is not valid UTF-8 and would reach the store as a lone surrogate."""
    if isinstance(line, (bytes, bytearray)):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not valid UTF-8 at byte {exc.start} ({exc.reason}); send UTF-8 text") from None
    try:
        return json.loads(line, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise _Refused(f"nesting deeper than {MAX_DEPTH} levels") from None


#: Only a ``\uD800``-``\uDFFF`` escape can put a surrogate into parsed JSON (:func:`loads` refuses one encoded raw).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _path(parent: str, key: Any) -> str:
    if len(parent) > 200:
        return parent if parent.endswith("...") else parent + "..."
    return f"{parent}[{key}]" if isinstance(key, int) else f"{parent}.{key}" if parent else str(key)[:200]


def check_value(value: Any, where: str, *, strings: bool = True) -> str | None:
    """The first problem in a parsed value (too deep, text that is not valid Unicode), or None.

    ``strings=False`` skips the Unicode check (the caller knows no surrogate escape was sent).
    """
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= MAX_DEPTH:
                return f"{path or 'message'}: nesting deeper than {MAX_DEPTH} levels"
            for key, sub in item.items():
                if strings and not _encodable(key):
                    return f"{path or 'message'}: a key is not valid Unicode ({_escaped(key)})"
                stack.append((sub, _path(path, key), depth + 1))
        elif isinstance(item, list):
            if depth >= MAX_DEPTH:
                return f"{path or 'message'}: nesting deeper than {MAX_DEPTH} levels"
            stack.extend((sub, _path(path, i), depth + 1) for i, sub in enumerate(item))
        elif strings and isinstance(item, str) and not _encodable(item):
            return (f"{path or 'message'}: text is not valid Unicode (a lone surrogate, as an undecodable "
                    f"file name gives): {_escaped(item)}")
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _escaped(text: str) -> str:
    shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return repr(shown if len(shown) <= 60 else shown[:57] + "...")


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
        msg = loads(line)
    except _Refused as exc:
        raise RpcError(INVALID_REQUEST, f"request refused: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RpcError(PARSE_ERROR, f"not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object")
    msg_id = msg.get("id")
    if (msg_id is not None and not isinstance(msg_id, (str, int))) or isinstance(msg_id, bool):
        raise RpcError(INVALID_REQUEST, "id must be a string or an integer")
    if isinstance(msg_id, int) and not -(2**63) <= msg_id < 2**63:
        raise RpcError(INVALID_REQUEST, "id must fit in 64 bits")
    strings = _SURROGATE_ESCAPE.search(line if isinstance(line, bytes) else line.encode("utf-8", "replace"))
    problem = check_value(msg, "", strings=strings is not None)
    if problem:
        code = INVALID_PARAMS if problem.startswith("params") else INVALID_REQUEST
        raise RpcError(code, problem, None if problem.startswith("id:") else {"id": msg_id})
    if msg.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'missing "jsonrpc": "2.0"', {"id": msg_id})
    method = msg.get("method")
    if not isinstance(method, str):
        raise RpcError(INVALID_REQUEST, "method must be a string", {"id": msg_id})
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object (named parameters)", {"id": msg_id})
    return msg_id, method, params
