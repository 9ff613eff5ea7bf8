"""The part of aiosqlite the store uses, run inline on the event loop (no thread).

aiosqlite runs SQLite in a thread, which would let real time and thread
scheduling into the simulation. Here each call runs synchronously and then
yields once, so a crash can fall between a statement and its commit (the
transaction is then rolled back, as after ``kill -9``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio


class Dead(RuntimeError):
    """The simulated process died; its connection is gone."""


class _Cursor:
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def __aiter__(self) -> AsyncIterator[Any]:
        for row in self._cursor:
            yield row

    async def close(self) -> None:
        self._cursor.close()

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid


class _Result:
    """Awaitable and an async context manager, like aiosqlite's."""

    def __init__(self, conn: InlineConnection, sql: str, params: Iterable[Any]) -> None:
        self._conn = conn
        self._sql = sql
        self._params = tuple(params)
        self._cursor: _Cursor | None = None

    async def _run(self) -> _Cursor:
        await self._conn._yield()
        self._cursor = _Cursor(self._conn._live().execute(self._sql, self._params))
        return self._cursor

    def __await__(self) -> Any:
        return self._run().__await__()

    async def __aenter__(self) -> _Cursor:
        return await self._run()

    async def __aexit__(self, *exc: object) -> None:
        if self._cursor is not None:
            await self._cursor.close()


class InlineConnection:
    def __init__(self, path: str) -> None:
        self._db: sqlite3.Connection | None = sqlite3.connect(path, isolation_level="")
        self._dead = False

    def _live(self) -> sqlite3.Connection:
        if self._dead or self._db is None:
            raise Dead("connection of a crashed daemon")
        return self._db

    async def _yield(self) -> None:
        self._live()
        await anyio.sleep(0)
        self._live()

    @property
    def row_factory(self) -> Any:
        return self._live().row_factory

    @row_factory.setter
    def row_factory(self, factory: Any) -> None:
        self._live().row_factory = factory

    @property
    def in_transaction(self) -> bool:
        return self._live().in_transaction

    @property
    def total_changes(self) -> int:
        return self._live().total_changes

    def execute(self, sql: str, params: Iterable[Any] = ()) -> _Result:
        return _Result(self, sql, params)

    async def executemany(self, sql: str, rows: Iterable[Any]) -> _Cursor:
        await self._yield()
        return _Cursor(self._live().executemany(sql, rows))

    async def executescript(self, script: str) -> _Cursor:
        await self._yield()
        return _Cursor(self._live().executescript(script))

    async def commit(self) -> None:
        self._live().commit()
        await self._yield()

    async def rollback(self) -> None:
        self._live().rollback()

    async def close(self) -> None:
        if self._db is not None and not self._dead:
            self._db.close()
        self._db = None

    def crash(self) -> None:
        """The process died: what is not committed is lost, and nothing more can be done here."""
        if self._db is not None:
            self._db.close()  # sqlite3 rolls back an open transaction on close
        self._db = None
        self._dead = True

    def __await__(self) -> Any:
        async def ready() -> InlineConnection:
            return self

        return ready().__await__()


class Connector:
    """``connect(path)`` for the store, remembering every connection so a crash can kill them all."""

    def __init__(self) -> None:
        self.connections: list[InlineConnection] = []

    def __call__(self, path: Any, **kw: Any) -> InlineConnection:
        conn = InlineConnection(str(path))
        self.connections.append(conn)
        return conn

    def crash(self) -> None:
        for conn in self.connections:
            conn.crash()
        self.connections.clear()


async def inline(func: Callable[..., Any], *args: Any) -> Any:
    """``Store(offload=...)`` for the simulation: blocking file work runs on the simulated loop, no thread."""
    return func(*args)
