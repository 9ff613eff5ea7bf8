"""Fan-out of transition events to ``watch`` clients.

Each subscriber gets a bounded stream; one that falls too far behind is
closed (its client is told) instead of slowing the engine down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream


@dataclass(eq=False)
class Subscription:
    run_id: str | None
    send: MemoryObjectSendStream[dict[str, Any]]
    receive: MemoryObjectReceiveStream[dict[str, Any]]
    overflowed: bool = False
    closed: bool = field(default=False)


class EventHub:
    def __init__(self, buffer: int = 10_000) -> None:
        self.buffer = buffer
        self._subs: set[Subscription] = set()

    def subscribe(self, run_id: str | None) -> Subscription:
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](self.buffer)
        sub = Subscription(run_id, send, receive)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        if not sub.closed:
            sub.closed = True
            sub.send.close()

    def wants(self, run_id: str) -> bool:
        """Does anyone watch *run_id*? (Callers skip building events nobody reads.)"""
        if not self._subs:
            return False
        return any(sub.run_id is None or sub.run_id == run_id for sub in self._subs)

    def publish(self, event: dict[str, Any]) -> None:
        for sub in list(self._subs):
            if sub.run_id is not None and sub.run_id != event.get("run_id"):
                continue
            try:
                sub.send.send_nowait(event)
            except anyio.WouldBlock:
                sub.overflowed = True
                self.unsubscribe(sub)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self.unsubscribe(sub)

    def end_run(self, run_id: str) -> None:
        """Close the streams of subscribers that watch only *run_id*, after its final event."""
        for sub in list(self._subs):
            if sub.run_id == run_id:
                self.unsubscribe(sub)

    @property
    def count(self) -> int:
        return len(self._subs)
