"""Migrations against MariaDB: idempotent, safe when two replicas start together, and equal to init.sql."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import trio

from tests.service_fixtures import mysql_admin
from voicegrow.storage.mysql import MySQLStore
from voicegrow.storage.schema import load_migrations, render_init_sql, split_statements
from voicegrow.storage.sqlite import SQLiteStore

INIT_SQL = Path(__file__).resolve().parents[1] / "deploy" / "scripts" / "init.sql"


def _store(db: dict[str, Any]) -> MySQLStore:
    return MySQLStore(host=db["mysql_host"], port=db["mysql_port"], user=db["mysql_user"],
                      password=db["mysql_password"], database=db["mysql_database"])


async def _schema(server: dict[str, Any], database: str) -> dict[str, Any]:
    conn = await mysql_admin(server)
    try:
        async with conn.cursor() as cur:
            await cur.execute(
                "SELECT table_name, column_name, column_type, is_nullable, column_key FROM information_schema.columns "
                "WHERE table_schema = %s ORDER BY table_name, ordinal_position", (database,))
            columns = [tuple(r) for r in await cur.fetchall()]
            await cur.execute(
                "SELECT table_name, index_name, seq_in_index, column_name FROM information_schema.statistics "
                "WHERE table_schema = %s ORDER BY table_name, index_name, seq_in_index", (database,))
            indexes = [tuple(r) for r in await cur.fetchall()]
            await cur.execute("SELECT version, name FROM `%s`.schema_version ORDER BY version" % database)
            versions = [tuple(r) for r in await cur.fetchall()]
    finally:
        await conn.aclose()
    return {"columns": columns, "indexes": indexes, "versions": versions}


async def test_migrations_apply_once_and_a_second_run_is_a_no_op(mysql_db: dict[str, Any]) -> None:
    expected = [m.version for m in load_migrations()]
    store = _store(mysql_db)
    try:
        assert await store.migrate() == expected
        before = await _schema(mysql_db, mysql_db["mysql_database"])
        assert await store.migrate() == []
        assert await _schema(mysql_db, mysql_db["mysql_database"]) == before
    finally:
        await store.aclose()
    assert [v for v, _ in before["versions"]] == expected


async def test_two_replicas_migrating_together_apply_each_migration_once(mysql_db: dict[str, Any]) -> None:
    stores = [_store(mysql_db) for _ in range(2)]
    results: list[list[int]] = []

    async def migrate(store: MySQLStore) -> None:
        results.append(await store.migrate())

    try:
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(migrate, store)
    finally:
        for store in stores:
            await store.aclose()
    expected = [m.version for m in load_migrations()]
    assert sorted(results) == [[], expected]
    schema = await _schema(mysql_db, mysql_db["mysql_database"])
    assert [v for v, _ in schema["versions"]] == expected


def test_init_sql_is_generated_from_the_migrations() -> None:
    assert INIT_SQL.read_text(encoding="utf-8") == render_init_sql(load_migrations()), (
        "deploy/scripts/init.sql is stale: python -m voicegrow.storage.schema > deploy/scripts/init.sql")


async def test_init_sql_and_migrations_build_the_same_schema(mysql_db: dict[str, Any]) -> None:
    from_init = f"{mysql_db['mysql_database']}_init"
    conn = await mysql_admin(mysql_db)
    try:
        async with conn.cursor() as cur:
            await cur.execute(f"CREATE DATABASE `{from_init}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            await cur.execute(f"USE `{from_init}`")
            for statement in split_statements(INIT_SQL.read_text(encoding="utf-8")):
                await cur.execute(statement)
        store = _store(mysql_db)
        try:
            await store.migrate()
        finally:
            await store.aclose()
        migrated = await _schema(mysql_db, mysql_db["mysql_database"])
        initialised = await _schema(mysql_db, from_init)
        assert initialised == migrated
        assert {t for t, *_ in migrated["columns"]} == {"schema_version", "devices", "sessions", "turns", "events", "timers"}
        # a server started on an init.sql database finds nothing to do
        store = _store({**mysql_db, "mysql_database": from_init})
        try:
            assert await store.migrate() == []
        finally:
            await store.aclose()
    finally:
        async with conn.cursor() as cur:
            await cur.execute(f"DROP DATABASE IF EXISTS `{from_init}`")
        await conn.aclose()


async def test_sqlite_gets_the_same_tables_and_columns(mysql_db: dict[str, Any], tmp_path: Path) -> None:
    store = _store(mysql_db)
    try:
        await store.migrate()
    finally:
        await store.aclose()
    mysql_columns = {(t, c) for t, c, *_ in (await _schema(mysql_db, mysql_db["mysql_database"]))["columns"]}

    lite = SQLiteStore(tmp_path / "x.sqlite3")
    await lite.open()
    assert await lite.migrate() == []
    await lite.aclose()
    conn = sqlite3.connect(tmp_path / "x.sqlite3")
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    sqlite_columns = {(t, r[1]) for t in tables for r in conn.execute(f"PRAGMA table_info({t})")}
    conn.close()
    assert sqlite_columns == mysql_columns
