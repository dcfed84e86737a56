"""Short-lived device state in a SQLite file, for several worker processes without Redis.

:class:`~voicegrow.storage.state.MemoryState` lives in one process: with ``WORKERS`` over 1 a speaker
that reconnects lands on any worker, and its conversation history must be there too. This store keeps
the same entries (history and live-session claims, each with an expiry time) in
``{DATA_DIR}/state.sqlite3``, which every worker opens: WAL, so readers never wait for the writer, and a
busy timeout, so two workers writing at once queue instead of failing. Expiry uses wall-clock time,
the one clock all processes share.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from voicegrow.storage.errors import BackendUnavailable
from voicegrow.storage.sqlite import open_wal
from voicegrow.storage.state import StateStore, _decode_history

__all__ = ["SQLiteState"]

T = TypeVar("T")

_SCHEMA = """CREATE TABLE IF NOT EXISTS live_state (
    kind TEXT NOT NULL, device_id TEXT NOT NULL, owner TEXT, value TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (kind, device_id))"""
_PURGE_EVERY = 200  # writes between sweeps of expired rows (reads skip them anyway)


class SQLiteState(StateStore):
    embedded = True

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._clock = clock
        self._limiter = trio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        self._writes = 0

    def describe(self) -> str:
        return f"sqlite {self.path} (shared by the workers)"

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = open_wal(self.path, self._busy_timeout_s)
            try:
                conn.execute(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await trio.to_thread.run_sync(lambda: fn(self._connection()), limiter=self._limiter)
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"SQLite state unavailable: {exc}") from exc

    def _put(self, conn: sqlite3.Connection, kind: str, device_id: str, value: str, ttl_s: float,
             owner: str | None = None) -> None:
        now = self._clock()
        conn.execute("INSERT OR REPLACE INTO live_state (kind, device_id, owner, value, expires_at) "
                     "VALUES (?, ?, ?, ?, ?)", (kind, device_id, owner, value, now + ttl_s))
        self._writes += 1
        if self._writes % _PURGE_EVERY == 0:
            conn.execute("DELETE FROM live_state WHERE expires_at <= ?", (now,))

    def _get(self, conn: sqlite3.Connection, kind: str, device_ids: list[str]) -> dict[str, str]:
        marks = ",".join("?" * len(device_ids))
        rows = conn.execute(f"SELECT device_id, value FROM live_state WHERE kind = ? AND device_id IN ({marks}) "
                            "AND expires_at > ?", (kind, *device_ids, self._clock())).fetchall()
        return dict(rows)

    async def ping(self) -> None:
        await self._call(lambda conn: conn.execute("SELECT 1").fetchone())

    async def load_history(self, device_id: str) -> list[dict[str, Any]]:
        found = await self._call(lambda conn: self._get(conn, "history", [device_id]))
        return _decode_history(found.get(device_id))

    async def save_history(self, device_id: str, messages: list[dict[str, Any]], ttl_s: int) -> None:
        text = json.dumps(messages, ensure_ascii=False)
        await self._call(lambda conn: self._put(conn, "history", device_id, text, ttl_s))

    async def claim(self, device_id: str, session_id: str, replica_id: str, ttl_s: int) -> None:
        claim = json.dumps({"session_id": session_id, "replica_id": replica_id, "claimed_at": repr(time.time())})
        await self._call(lambda conn: self._put(conn, "live", device_id, claim, ttl_s, owner=session_id))

    async def release(self, device_id: str, session_id: str) -> bool:
        """Only the claim of ``session_id``: a device that reconnected elsewhere keeps its new claim."""
        return bool(await self._call(lambda conn: conn.execute(
            "DELETE FROM live_state WHERE kind = 'live' AND device_id = ? AND owner = ?",
            (device_id, session_id)).rowcount))

    async def live(self, device_ids: list[str]) -> dict[str, dict[str, str]]:
        if not device_ids:
            return {}
        found = await self._call(lambda conn: self._get(conn, "live", device_ids))
        return {device_id: json.loads(value) for device_id, value in found.items()}

    async def delete_device(self, device_id: str) -> int:
        return int(await self._call(lambda conn: conn.execute(
            "DELETE FROM live_state WHERE kind = 'history' AND device_id = ? AND expires_at > ?",
            (device_id, self._clock())).rowcount))

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await trio.to_thread.run_sync(conn.close, limiter=self._limiter)
