"""The embedded record store: one SQLite file, used when ``MYSQL_HOST`` is empty.

sqlite3 is blocking, so every call runs in a worker thread through a limiter of one: a single
connection, used by one thread at a time, is all SQLite wants. The schema comes from the same
migrations as MySQL, translated by :func:`voicegrow.storage.schema.sqlite_statements`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from voicegrow.storage.errors import BackendUnavailable, RecordRejected
from voicegrow.storage.schema import SCHEMA_VERSION_DDL, load_migrations, sqlite_statements
from voicegrow.storage.sqlstore import SQLITE, SqlStore, Statement

__all__ = ["SQLiteStore"]

T = TypeVar("T")


def open_wal(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection in WAL mode, autocommit, usable from the worker threads, waiting ``busy_timeout_s``
    for a lock: several processes (``WORKERS``) may share the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


class SQLiteStore(SqlStore):
    """Devices, sessions, turns and events in ``path`` (created with its directory if missing)."""

    dialect = SQLITE
    embedded = True

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._limiter = trio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        self.applied_migrations: list[int] = []

    def describe(self) -> str:
        return f"sqlite {self.path}"

    async def open(self) -> None:
        if self._conn is None:
            self.applied_migrations = await self._call(self._open_sync)

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except sqlite3.OperationalError as exc:  # locked, disk I/O, cannot open
            raise BackendUnavailable(f"SQLite unavailable: {exc}") from exc
        except sqlite3.Error as exc:
            raise RecordRejected(f"SQLite refused the statement: {exc}") from exc

    def _open_sync(self) -> list[int]:
        conn = open_wal(self.path, self._busy_timeout_s)
        try:
            applied = self._migrate_sync(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return applied

    @staticmethod
    def _migrate_sync(conn: sqlite3.Connection) -> list[int]:
        applied: list[int] = []
        conn.execute("BEGIN IMMEDIATE")  # the file lock: two processes never migrate at once
        try:
            for statement in sqlite_statements(SCHEMA_VERSION_DDL.rstrip(";")):
                conn.execute(statement)
            done = {row[0] for row in conn.execute("SELECT version FROM schema_version")}
            for m in load_migrations():
                if m.version in done:
                    continue
                for statement in m.statements:
                    for translated in sqlite_statements(statement):
                        conn.execute(translated)
                conn.execute("INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                             (m.version, m.name, time.time()))
                applied.append(m.version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return applied

    async def migrate(self) -> list[int]:
        """Apply what the file lacks (the versions applied now); :meth:`open` already did."""
        await self.open()
        assert self._conn is not None
        conn = self._conn
        return await self._call(lambda: self._migrate_sync(conn))

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BackendUnavailable("SQLite store is not open")
        return self._conn

    async def _write(self, statements: Sequence[Statement]) -> list[int]:
        conn = self._connection()

        def run() -> list[int]:
            counts = []
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    counts.append(conn.execute(sql.replace("%s", "?"), tuple(params)).rowcount)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return counts

        return await self._call(run)

    async def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        conn = self._connection()
        return await self._call(lambda: conn.execute(sql.replace("%s", "?"), tuple(params)).fetchall())
