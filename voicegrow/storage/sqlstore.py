"""What the MySQL and the SQLite stores share: the queries, written once, and the row shapes.

Every write is idempotent (an upsert keyed by the record's own id, or a delete), because the spool
writer may hand the same record over again after a crash between the backend's acknowledgement and the
spool's removal of it; applying it twice must leave the tables as applying it once did. Queries use
``%s`` placeholders and only bound parameters; a subclass supplies the connection and the dialect.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from voicegrow.storage.errors import RecordRejected
from voicegrow.storage.records import TurnRecord

__all__ = ["Dialect", "MYSQL", "SQLITE", "SqlStore", "Statement"]

Statement = tuple[str, Sequence[Any]]


@dataclass(frozen=True)
class Dialect:
    name: str
    new_value: str  # how an upsert refers to the value it tried to insert: {col} is the column
    least: str
    greatest: str

    def upsert(self, table: str, key: str, columns: Sequence[str], assignments: Mapping[str, str]) -> str:
        """``INSERT`` that updates ``assignments`` (``col -> expr``, ``new(col)`` spelled ``{new:col}``)
        when a row with the same ``key`` exists, and does nothing when ``assignments`` is empty."""
        insert = (f"INSERT INTO {table} ({', '.join(columns)}) "
                  f"VALUES ({', '.join(['%s'] * len(columns))})")
        sets = ", ".join(f"{col} = {self._expr(expr)}" for col, expr in assignments.items())
        if self.name == "mysql":
            return f"{insert} ON DUPLICATE KEY UPDATE {sets or f'{key} = {key}'}"
        return f"{insert} ON CONFLICT ({key}) DO " + (f"UPDATE SET {sets}" if sets else "NOTHING")

    def _expr(self, expr: str) -> str:
        out = expr.replace("{least}", self.least).replace("{greatest}", self.greatest)
        while "{new:" in out:
            start = out.index("{new:")
            end = out.index("}", start)
            out = out[:start] + self.new_value.format(col=out[start + 5:end]) + out[end + 1:]
        return out


MYSQL = Dialect("mysql", new_value="VALUES({col})", least="LEAST", greatest="GREATEST")
SQLITE = Dialect("sqlite", new_value="excluded.{col}", least="MIN", greatest="MAX")

_TURN_COLUMNS = ("turn_id", "session_id", "device_id", "started_at", "transcript", "reply_text", "language",
                 "timings_json", "outcome", "error", "audio_in_key", "audio_out_key", "tool_calls_json")
_SESSION_COLUMNS = ("session_id", "device_id", "protocol", "remote_addr", "started_at", "ended_at",
                    "end_reason")
_DEVICE_COLUMNS = ("device_id", "first_seen_at", "last_seen_at", "info_json")
_EVENT_COLUMNS = ("event_id", "device_id", "session_id", "kind", "at", "data_json")
_TIMER_COLUMNS = ("timer_id", "device_id", "kind", "due_at", "created_at", "label", "language", "duration_s",
                  "state", "fired_at")
#: Tables holding a device's rows, erased together by ``delete_device``.
DEVICE_TABLES = ("turns", "sessions", "events", "timers", "devices")


def _text(value: Any) -> Any:
    """trio-mysql hands some columns (aggregates, binary collations) back as bytes."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def _number(value: Any) -> float | int | None:
    value = _text(value)
    if value is None or isinstance(value, (int, float)):
        return value
    number = float(value)
    return int(number) if number.is_integer() else number


class SqlStore:
    """Base of the record stores: apply spool operations, answer the admin API's reads."""

    component = "mysql"
    dialect: Dialect = MYSQL
    embedded = False

    # -- supplied by a subclass
    async def open(self) -> None:
        """Connect and bring the schema up to date; idempotent, raises BackendUnavailable."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def ping(self) -> None:
        await self._read("SELECT 1", ())

    async def _write(self, statements: Sequence[Statement]) -> list[int]:
        """Run ``statements`` in one transaction; the affected row count of each."""
        raise NotImplementedError

    async def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    # -- writes (spool operations)
    async def apply(self, op: Mapping[str, Any], payload: bytes = b"") -> dict[str, int] | None:
        """Apply one spooled operation; returns row counts for a deletion, else None."""
        del payload
        kind = op.get("op")
        if kind == "device_seen":
            await self._write([self._device_upsert(op)])
        elif kind == "session_started":
            await self._write([self._session_upsert(op["session"])])
        elif kind == "session_ended":
            await self._write([("UPDATE sessions SET ended_at = %s, end_reason = %s WHERE session_id = %s",
                                (op["ended_at"], op["reason"], op["session_id"]))])
        elif kind == "turn":
            await self._write([self._turn_upsert(op["turn"])])
        elif kind == "event":
            await self._write([self._event_insert(op)])
        elif kind == "timer":
            await self._write([self._timer_insert(op["timer"])])
        elif kind == "timer_state":
            await self._write([self._timer_transition(op["timer_id"], op["state"], op["at"])])
        elif kind == "delete_device":
            return await self._delete_device(op["device_id"])
        else:
            raise RecordRejected(f"unknown operation {kind!r} for the record store")
        return None

    def _device_upsert(self, op: Mapping[str, Any]) -> Statement:
        sql = self.dialect.upsert("devices", "device_id", _DEVICE_COLUMNS, {
            "first_seen_at": "{least}(first_seen_at, {new:first_seen_at})",
            "last_seen_at": "{greatest}(last_seen_at, {new:last_seen_at})",
            "info_json": "{new:info_json}",
        })
        info = json.dumps(op.get("info") or {}, ensure_ascii=False, sort_keys=True, default=str)
        return sql, (op["device_id"], op["seen_at"], op["seen_at"], info)

    def _session_upsert(self, s: Mapping[str, Any]) -> Statement:
        sql = self.dialect.upsert("sessions", "session_id", _SESSION_COLUMNS, {
            col: f"{{new:{col}}}" for col in ("device_id", "protocol", "remote_addr", "started_at")})
        return sql, tuple(s.get(col) for col in _SESSION_COLUMNS)

    def _turn_upsert(self, t: Mapping[str, Any]) -> Statement:
        sql = self.dialect.upsert("turns", "turn_id", _TURN_COLUMNS, {
            col: f"{{new:{col}}}" for col in _TURN_COLUMNS if col != "turn_id"})
        row = dict(t)
        row["timings_json"] = json.dumps(row.pop("timings_ms", {}) or {}, sort_keys=True)
        calls = row.pop("tool_calls", None)
        row["tool_calls_json"] = json.dumps(calls, ensure_ascii=False, default=str) if calls else None
        return sql, tuple(row.get(col) for col in _TURN_COLUMNS)

    def _timer_insert(self, t: Mapping[str, Any]) -> Statement:
        """A new timer; a replay of the same record changes nothing (its state may have moved on)."""
        sql = self.dialect.upsert("timers", "timer_id", _TIMER_COLUMNS, {})
        return sql, tuple(t.get(col) for col in _TIMER_COLUMNS)

    @staticmethod
    def _timer_transition(timer_id: str, state: str, at: float) -> Statement:
        """pending → ``state``; only a pending timer moves, so a late or repeated transition is a no-op."""
        fired = "fired_at = %s, " if state == "fired" else ""
        params = (at, state, timer_id) if state == "fired" else (state, timer_id)
        return f"UPDATE timers SET {fired}state = %s WHERE timer_id = %s AND state = 'pending'", params

    def _event_insert(self, op: Mapping[str, Any]) -> Statement:
        sql = self.dialect.upsert("events", "event_id", _EVENT_COLUMNS, {})
        data = json.dumps(op.get("data") or {}, ensure_ascii=False, sort_keys=True, default=str)
        return sql, (op["event_id"], op["device_id"], op.get("session_id"), op["kind"], op["at"], data)

    async def _delete_device(self, device_id: str) -> dict[str, int]:
        counts = await self._write([(f"DELETE FROM {t} WHERE device_id = %s", (device_id,)) for t in DEVICE_TABLES])
        return dict(zip(DEVICE_TABLES, counts))

    # -- timers (the timer book claims and loads directly; see voicegrow.tools.timers)
    async def claim_timer(self, timer_id: str, state: str, at: float) -> bool | None:
        """Move a pending timer to ``state``: True if this call did, False if it had already left
        pending, None if the row is not there yet (still in a spool)."""
        (changed,) = await self._write([self._timer_transition(timer_id, state, at)])
        if changed:
            return True
        rows = await self._read("SELECT state FROM timers WHERE timer_id = %s", (timer_id,))
        return False if rows else None

    async def list_timers(self, device_id: str | None, states: Sequence[str] | None = None,
                          limit: int = 1000) -> list[dict[str, Any]]:
        """Soonest first."""
        conditions, params = [], []
        if device_id is not None:
            conditions.append("device_id = %s")
            params.append(device_id)
        if states:
            conditions.append(f"state IN ({', '.join(['%s'] * len(states))})")
            params.extend(states)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._read(f"SELECT {', '.join(_TIMER_COLUMNS)} FROM timers {where} "
                                "ORDER BY due_at, timer_id LIMIT %s", (*params, limit))
        out = []
        for r in rows:
            row = dict(zip(_TIMER_COLUMNS, (_text(v) for v in r)))
            for col in ("due_at", "created_at", "fired_at"):
                row[col] = _number(row[col])
            row["duration_s"] = int(_number(row["duration_s"]) or 0)
            out.append(row)
        return out

    # -- device settings (the admin API writes them directly: an operator's change is answered as
    # stored or refused, never left in a spool)
    async def get_listen_mode(self, device_id: str) -> str | None:
        """The listening mode set for the device through the admin API, or None."""
        rows = await self._read("SELECT listen_mode FROM devices WHERE device_id = %s", (device_id,))
        return _text(rows[0][0]) if rows else None

    async def set_listen_mode(self, device_id: str, mode: str | None) -> bool:
        """Set (or with None clear) the device's listening mode; False when the device is unknown."""
        await self._write([("UPDATE devices SET listen_mode = %s WHERE device_id = %s", (mode, device_id))])
        # MySQL counts changed rows, not matched ones: an unchanged value reads as 0 there.
        return bool(await self._read("SELECT 1 FROM devices WHERE device_id = %s", (device_id,)))

    # -- reads
    async def list_devices(self, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        """By device id; ``after`` is the last device id of the previous page."""
        where, params = ("WHERE d.device_id > %s", [after]) if after is not None else ("", [])
        rows = await self._read(
            "SELECT d.device_id, d.first_seen_at, d.last_seen_at, d.info_json, d.listen_mode, "
            "(SELECT COUNT(*) FROM turns t WHERE t.device_id = d.device_id), "
            "(SELECT MAX(t.started_at) FROM turns t WHERE t.device_id = d.device_id) "
            f"FROM devices d {where} ORDER BY d.device_id LIMIT %s", (*params, limit + 1))
        items = [{
            "device_id": _text(r[0]), "first_seen_at": _number(r[1]), "last_seen_at": _number(r[2]),
            "info": json.loads(_text(r[3]) or "{}"), "listen_mode": _text(r[4]), "turn_count": int(_number(r[5]) or 0),
            "last_turn_at": _number(r[6]),
        } for r in rows]
        return items[:limit], len(items) > limit

    async def list_turns(self, device_id: str | None, since: float | None, limit: int,
                         after: tuple[float, str] | None, text: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the (started_at, turn_id) of the last row of the previous page;
        ``text`` keeps the turns whose transcript or reply contains it, ignoring case (LIKE with its
        wildcards escaped; the tables' binary collation would make MySQL's LIKE case-sensitive)."""
        conditions: list[str] = []
        params: list[Any] = []
        if device_id is not None:
            conditions.append("device_id = %s")
            params.append(device_id)
        if text:
            pattern = "%" + text.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
            conditions.append("(LOWER(transcript) LIKE %s ESCAPE '!' OR LOWER(reply_text) LIKE %s ESCAPE '!')")
            params.extend((pattern, pattern))
        if since is not None:
            conditions.append("started_at >= %s")
            params.append(since)
        if after is not None:
            conditions.append("(started_at < %s OR (started_at = %s AND turn_id < %s))")
            params.extend((after[0], after[0], after[1]))
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._read(
            f"SELECT {', '.join(_TURN_COLUMNS)} FROM turns {where} "
            "ORDER BY started_at DESC, turn_id DESC LIMIT %s", (*params, limit + 1))
        return [self._turn_row(r) for r in rows[:limit]], len(rows) > limit

    async def get_turn(self, turn_id: str) -> dict[str, Any] | None:
        rows = await self._read(f"SELECT {', '.join(_TURN_COLUMNS)} FROM turns WHERE turn_id = %s", (turn_id,))
        return self._turn_row(rows[0]) if rows else None

    async def count_rows(self, table: str, device_id: str) -> int:
        """Rows of ``table`` for a device (tests and the deletion report use it)."""
        if table not in DEVICE_TABLES:
            raise ValueError(f"unknown table {table!r}")
        rows = await self._read(f"SELECT COUNT(*) FROM {table} WHERE device_id = %s", (device_id,))
        return int(_number(rows[0][0]) or 0)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        rows = await self._read(
            f"SELECT {', '.join(_SESSION_COLUMNS)} FROM sessions WHERE session_id = %s", (session_id,))
        if not rows:
            return None
        row = dict(zip(_SESSION_COLUMNS, (_text(v) for v in rows[0])))
        for col in ("started_at", "ended_at"):
            row[col] = _number(row[col])
        return row

    @staticmethod
    def _turn_row(row: Sequence[Any]) -> dict[str, Any]:
        out = dict(zip(_TURN_COLUMNS, (_text(v) for v in row)))
        out["started_at"] = _number(out["started_at"])
        out["timings_ms"] = json.loads(out.pop("timings_json") or "{}")
        out["tool_calls"] = json.loads(out.pop("tool_calls_json") or "[]")
        return {f.name: out.get(f.name) for f in dataclasses.fields(TurnRecord)}
