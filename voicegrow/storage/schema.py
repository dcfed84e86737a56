"""Numbered SQL migrations: reading them, splitting them into statements, and the SQLite dialect.

The migrations under ``migrations/NNNN_name.sql`` are written once, in MySQL/MariaDB dialect, and
applied in order by both the MySQL and the SQLite stores, each recording what it applied in
``schema_version``. Only the few MySQL-only constructs the migrations use are translated for SQLite
(index definitions inside ``CREATE TABLE`` and the table options); anything else passes through
unchanged, so a migration that needs more must extend :func:`sqlite_statements` and its test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from voicegrow.storage.errors import MigrationError

__all__ = ["Migration", "SCHEMA_VERSION_DDL", "load_migrations", "split_statements", "sqlite_statements",
           "render_init_sql"]

#: Created by the migrator itself (a migration cannot record itself in a table it creates).
SCHEMA_VERSION_DDL = """CREATE TABLE IF NOT EXISTS schema_version (
    version INT NOT NULL,
    name VARCHAR(200) NOT NULL,
    applied_at DOUBLE NOT NULL,
    PRIMARY KEY (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;"""

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def statements(self) -> list[str]:
        return split_statements(self.sql)


def load_migrations() -> list[Migration]:
    """Every migration shipped in the package, in version order (gaps and duplicates are errors)."""
    folder = resources.files("voicegrow.storage") / "migrations"
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if not found:  # an install that left the .sql files out (setup.cfg needs them as package data)
        raise MigrationError(f"no migrations found in {folder}: the package was installed without them")
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations must be numbered 0001, 0002, … without gaps: {[m.version for m in found]}")
    return found


def split_statements(sql: str) -> list[str]:
    """Statements of a script that holds no ``;`` inside literals (ours never do); comments dropped."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [stmt.strip() for stmt in "\n".join(lines).split(";") if stmt.strip()]


_CREATE_TABLE = re.compile(r"^CREATE TABLE (IF NOT EXISTS )?(\w+) \((.*)\)([^)]*)$", re.S | re.I)
_INDEX_ITEM = re.compile(r"^(UNIQUE )?(?:KEY|INDEX) (\w+) \(([^)]*)\)$", re.I)


def _top_level_items(body: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
            continue
        depth += (ch == "(") - (ch == ")")
        current.append(ch)
    items.append("".join(current).strip())
    return [item for item in items if item]


def sqlite_statements(statement: str) -> list[str]:
    """One MySQL statement as the SQLite statements with the same effect."""
    match = _CREATE_TABLE.match(statement.strip())
    if not match:
        return [statement]
    if_not_exists, table, body = match[1] or "", match[2], match[3]
    columns, indexes = [], []
    for item in _top_level_items(body):
        index = _INDEX_ITEM.match(item)
        if index:
            unique = "UNIQUE " if index[1] else ""
            indexes.append(f"CREATE {unique}INDEX IF NOT EXISTS {index[2]} ON {table} ({index[3]})")
        else:
            columns.append(item)
    joined = ",\n    ".join(columns)
    return [f"CREATE TABLE {if_not_exists}{table} (\n    {joined}\n)", *indexes]


def render_init_sql(migrations: list[Migration]) -> str:
    """The text of ``deploy/scripts/init.sql``: the whole schema plus its ``schema_version`` rows."""
    parts = [
        "-- VoiceGrow schema for a fresh MySQL/MariaDB database (run against the selected database,",
        "-- e.g. from /docker-entrypoint-initdb.d with MYSQL_DATABASE set). Generated from",
        "-- voicegrow/storage/migrations by voicegrow.storage.schema.render_init_sql; a test keeps",
        "-- the two in step. The server applies any later migration itself at start-up.",
        "",
        SCHEMA_VERSION_DDL,
        "",
    ]
    for m in migrations:
        parts.append(m.sql.strip())
        parts.append("")
    for m in migrations:
        parts.append(f"INSERT IGNORE INTO schema_version (version, name, applied_at) "
                     f"VALUES ({m.version}, '{m.name}', UNIX_TIMESTAMP());")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":  # python -m voicegrow.storage.schema > deploy/scripts/init.sql
    print(render_init_sql(load_migrations()), end="")
