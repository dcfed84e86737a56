"""The record store on MySQL/MariaDB through trio-mysql (native trio, no threads).

A small pool of autocommit connections; a connection that saw any error (or a cancellation mid-query)
is closed rather than returned, so a half-read result can never leak into the next query. Migrations
run under ``GET_LOCK('voicegrow_migrations', 30)``, so two replicas starting together apply each
migration once: the second waits, then finds it recorded in ``schema_version``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_mysql
import trio_mysql.err

from voicegrow.storage.errors import BackendUnavailable, MigrationError, RecordRejected
from voicegrow.storage.schema import SCHEMA_VERSION_DDL, load_migrations
from voicegrow.storage.sqlstore import SqlStore, Statement

__all__ = ["MySQLStore", "MIGRATION_LOCK"]

log = logging.getLogger(__name__)

MIGRATION_LOCK = "voicegrow_migrations"

# Server errors that say "not now" rather than "not this record": too many connections, access
# denied / unknown database (an operator may still be creating it), shutdown, lock waits, deadlocks,
# killed or interrupted queries, read-only replicas.
_TRANSIENT_SERVER_ERRORS = {1040, 1044, 1045, 1049, 1053, 1205, 1213, 1290, 1317, 1836, 1927, 4031}


def _classify(exc: BaseException) -> Exception:
    if isinstance(exc, (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                        trio_mysql.err.InterfaceError)):
        return BackendUnavailable(f"MySQL unreachable: {exc!r}")
    if isinstance(exc, trio_mysql.err.MySQLError):
        errno = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        if isinstance(exc, trio_mysql.err.OperationalError) and (errno >= 2000 or errno in _TRANSIENT_SERVER_ERRORS):
            return BackendUnavailable(f"MySQL unavailable: {exc.args}")
        return RecordRejected(f"MySQL refused the statement: {exc.args}")
    raise exc


class MySQLStore(SqlStore):
    """Devices, sessions, turns and events in MySQL/MariaDB (utf8mb4)."""

    def __init__(self, *, host: str, port: int, user: str, password: str, database: str,
                 pool_size: int = 4, connect_timeout_s: float = 3.0, query_timeout_s: float = 10.0,
                 migration_lock_timeout_s: int = 30) -> None:
        self._params = dict(host=host, port=port, user=user, password=password, database=database)
        self._connect_timeout_s = connect_timeout_s
        self._query_timeout_s = query_timeout_s
        self._lock_timeout_s = migration_lock_timeout_s
        self._slots = trio.Semaphore(pool_size)
        self._idle: list[trio_mysql.Connection] = []
        self._migrated = False
        self.applied_migrations: list[int] = []

    def describe(self) -> str:
        p = self._params
        return f"mysql {p['host']}:{p['port']}/{p['database']}"

    async def open(self) -> None:
        if self._migrated:
            return
        self.applied_migrations = await self.migrate()
        self._migrated = True

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[trio_mysql.Connection]:
        async with self._slots:
            try:
                if self._idle:
                    conn = self._idle.pop()
                else:
                    conn = trio_mysql.connect(charset="utf8mb4", use_unicode=True, autocommit=True,
                                              connect_timeout=self._connect_timeout_s, **self._params)
                    await conn.connect()
            except (OSError, trio_mysql.err.MySQLError, trio.TooSlowError) as exc:
                raise _classify(exc) from exc
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if conn.open:
                self._idle.append(conn)

    async def _run(self, statements: Sequence[Statement], *, transaction: bool) -> tuple[list[int], list[Any]]:
        try:
            with trio.fail_after(self._query_timeout_s):
                async with self._connection() as conn:
                    counts, rows = [], []
                    if transaction:
                        await conn.begin()
                    async with conn.cursor() as cur:
                        for sql, params in statements:
                            counts.append(await cur.execute(sql, tuple(params)))
                            rows = list(await cur.fetchall())
                    if transaction:
                        await conn.commit()
                    return counts, rows
        except (OSError, trio_mysql.err.MySQLError, trio.TooSlowError, trio.BrokenResourceError,
                trio.ClosedResourceError) as exc:
            raise _classify(exc) from exc

    async def _write(self, statements: Sequence[Statement]) -> list[int]:
        counts, _ = await self._run(statements, transaction=len(statements) > 1)
        return counts

    async def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        _, rows = await self._run([(sql, params)], transaction=False)
        return [tuple(r) for r in rows]

    async def migrate(self) -> list[int]:
        """Apply the migrations this database lacks; the versions applied now (empty when up to date)."""
        migrations = load_migrations()
        applied_now: list[int] = []
        try:
            with trio.fail_after(self._lock_timeout_s + self._query_timeout_s):
                async with self._connection() as conn, conn.cursor() as cur:
                    await cur.execute("SELECT GET_LOCK(%s, %s)", (MIGRATION_LOCK, self._lock_timeout_s))
                    got = (await cur.fetchone())[0]
                    if int(got or 0) != 1:
                        raise BackendUnavailable(f"could not take the {MIGRATION_LOCK} lock in "
                                                 f"{self._lock_timeout_s} s (another replica migrating?)")
                    try:
                        await cur.execute("SELECT COUNT(*) FROM information_schema.tables WHERE "
                                          "table_schema = DATABASE() AND table_name = 'schema_version'")
                        if not int((await cur.fetchone())[0] or 0):  # (IF NOT EXISTS would warn)
                            await cur.execute(SCHEMA_VERSION_DDL.rstrip(";"))
                        await cur.execute("SELECT version FROM schema_version")
                        done = {int(r[0]) for r in await cur.fetchall()}
                        for m in migrations:
                            if m.version in done:
                                continue
                            log.info("applying migration %04d_%s to %s", m.version, m.name, self.describe())
                            for statement in m.statements:
                                await cur.execute(statement)
                            await cur.execute(
                                "INSERT INTO schema_version (version, name, applied_at) VALUES (%s, %s, %s)",
                                (m.version, m.name, time.time()))
                            applied_now.append(m.version)
                    finally:
                        await self._release_lock(conn, cur)
        except (OSError, trio_mysql.err.MySQLError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            classified = _classify(exc)
            if isinstance(classified, RecordRejected):
                raise MigrationError(f"migration failed on {self.describe()}: {exc.args}") from exc
            raise classified from exc
        return applied_now

    @staticmethod
    async def _release_lock(conn: trio_mysql.Connection, cur: Any) -> None:
        """Release even when cancelled; if the connection is broken, closing it released the lock."""
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await cur.execute("SELECT RELEASE_LOCK(%s)", (MIGRATION_LOCK,))
                await cur.fetchall()
            except (OSError, trio_mysql.err.MySQLError, trio.BrokenResourceError) as exc:
                log.debug("RELEASE_LOCK failed (%r); closing the connection releases the lock", exc)
                conn.close()
