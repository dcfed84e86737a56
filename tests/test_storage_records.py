"""Object keys, cursors and the SQLite translation of the migrations."""

from __future__ import annotations

import sqlite3

import pytest

from voicegrow.storage.blobs import check_key
from voicegrow.storage.errors import InvalidCursor, InvalidKey
from voicegrow.storage.records import TurnRecord, audio_keys, decode_cursor, device_prefix, encode_cursor, key_part
from voicegrow.storage.schema import load_migrations, split_statements, sqlite_statements


def _turn(**changes: object) -> TurnRecord:
    base = dict(turn_id="ab" * 16, session_id="sess1", device_id="dev-1", started_at=1_700_000_000.5,
                transcript="t", reply_text="r", language="zh", timings_ms={}, outcome="completed")
    return TurnRecord(**{**base, **changes})  # type: ignore[arg-type]


def test_audio_keys_follow_the_documented_layout() -> None:
    assert audio_keys(_turn()) == (f"dev-1/2023/11/14/sess1/{'ab' * 16}-in.wav",
                                   f"dev-1/2023/11/14/sess1/{'ab' * 16}-out.wav")


@pytest.mark.parametrize("device", ["../etc", "a/b", ".hidden", "", "x" * 300, "dev 1"])
def test_unsafe_ids_become_safe_distinct_key_parts(device: str) -> None:
    part = key_part(device)
    check_key(part)
    assert "/" not in part and not part.startswith(".") and len(part) < 130
    in_key, _ = audio_keys(_turn(device_id=device))
    assert in_key.startswith(device_prefix(device))
    check_key(in_key)


def test_ids_that_differ_only_in_unsafe_characters_never_share_a_prefix() -> None:
    assert device_prefix("a/b") != device_prefix("a_b") != device_prefix("a b")
    prefixes = [device_prefix(d) for d in ("a/b", "a_b", "a b", "a")]
    assert all(not p.startswith(q) for p in prefixes for q in prefixes if p != q)


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a\\b", "./a", "a/."])
def test_bad_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidKey):
        check_key(key)


def test_cursor_round_trip_and_tampering() -> None:
    token = encode_cursor((1_700_000_000.25, "abc"))
    assert decode_cursor(token, (float, str)) == (1_700_000_000.25, "abc")
    for bad in ("", "!!!", encode_cursor(("x", "abc")), encode_cursor((1.0,)), encode_cursor((True, "a"))):
        with pytest.raises(InvalidCursor):
            decode_cursor(bad, (float, str))


def test_migrations_are_numbered_and_translate_to_sqlite() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    conn = sqlite3.connect(":memory:")
    for m in migrations:
        for statement in m.statements:
            for translated in sqlite_statements(statement):
                conn.execute(translated)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"devices", "sessions", "turns", "events"} <= tables
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"turns_device_time", "sessions_device_time", "events_device_time"} <= indexes


def test_split_statements_ignores_comment_semicolons() -> None:
    assert split_statements("-- a; b\nSELECT 1;\n\nSELECT 2;") == ["SELECT 1", "SELECT 2"]
