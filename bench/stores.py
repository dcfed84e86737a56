"""The stores a bench server writes to: the embedded ones, or MySQL, Redis and S3 of its own.

``services`` gives the server a fresh MySQL database, a Redis key prefix and an S3 bucket (a moto
server started here, unless ``VOICEGROW_BENCH_S3_ENDPOINT`` names one), and removes all three
afterwards, so a soak against the real backends leaves the machine's MariaDB and Redis as it found
them. Where they are: ``VOICEGROW_BENCH_MYSQL_HOST/PORT/USER/PASSWORD`` (default root@127.0.0.1:3306,
empty password), ``VOICEGROW_BENCH_REDIS_HOST/PORT/PASSWORD`` (127.0.0.1:6379).
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from bench.common import BenchError, child_process, free_port, wait_for_port

__all__ = ["STORE_KINDS", "bench_stores"]

STORE_KINDS = ("embedded", "services")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"VOICEGROW_BENCH_{name}", default)


@contextlib.asynccontextmanager
async def bench_stores(kind: str, work_dir: Path) -> AsyncIterator[dict[str, str]]:
    """Server settings (environment names) for ``kind``; whatever was created is removed on exit."""
    if kind == "embedded":
        yield {}
        return
    if kind != "services":
        raise BenchError("bad_option", f"unknown stores {kind!r}: expected one of {', '.join(STORE_KINDS)}")
    tag = uuid.uuid4().hex[:10]
    mysql = {"MYSQL_HOST": _env("MYSQL_HOST", "127.0.0.1"), "MYSQL_PORT": _env("MYSQL_PORT", "3306"),
             "MYSQL_USER": _env("MYSQL_USER", "root"), "MYSQL_PASSWORD": _env("MYSQL_PASSWORD", ""),
             "MYSQL_DATABASE": f"vg_bench_{tag}"}
    redis_env = {"REDIS_HOST": _env("REDIS_HOST", "127.0.0.1"), "REDIS_PORT": _env("REDIS_PORT", "6379"),
                 "REDIS_PASSWORD": _env("REDIS_PASSWORD", ""), "REDIS_KEY_PREFIX": f"vgbench:{tag}:"}
    async with contextlib.AsyncExitStack() as stack:
        await _mysql(mysql, f"CREATE DATABASE `{mysql['MYSQL_DATABASE']}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        stack.push_async_callback(_mysql, mysql, f"DROP DATABASE IF EXISTS `{mysql['MYSQL_DATABASE']}`")
        await trio.to_thread.run_sync(_redis_ping, redis_env)
        stack.push_async_callback(trio.to_thread.run_sync, _redis_forget, redis_env)
        endpoint = os.environ.get("VOICEGROW_BENCH_S3_ENDPOINT")
        if not endpoint:
            endpoint = await stack.enter_async_context(_moto(work_dir / "moto.log"))
        s3 = {"MINIO_ENDPOINT": endpoint, "MINIO_ACCESS_KEY": _env("S3_ACCESS_KEY", "testing"),
              "MINIO_SECRET_KEY": _env("S3_SECRET_KEY", "testing"), "MINIO_SECURE": "false",
              "MINIO_BUCKET": f"vg-bench-{tag}"}
        yield {**mysql, **redis_env, **s3}


async def _mysql(env: dict[str, str], sql: str) -> None:
    import trio_mysql

    conn = trio_mysql.connect(host=env["MYSQL_HOST"], port=int(env["MYSQL_PORT"]), user=env["MYSQL_USER"],
                              password=env["MYSQL_PASSWORD"], charset="utf8mb4", autocommit=True, connect_timeout=5)
    try:
        await conn.connect()
    except Exception as exc:
        raise BenchError("no_mysql", f"MySQL at {env['MYSQL_HOST']}:{env['MYSQL_PORT']}: {exc}") from exc
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql)
    finally:
        await conn.aclose()


def _redis_client(env: dict[str, str]):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis(host=env["REDIS_HOST"], port=int(env["REDIS_PORT"]), password=env["REDIS_PASSWORD"] or None,
                       socket_timeout=3, socket_connect_timeout=3)


def _redis_ping(env: dict[str, str]) -> None:
    import redis

    client = _redis_client(env)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise BenchError("no_redis", f"Redis at {env['REDIS_HOST']}:{env['REDIS_PORT']}: {exc}") from exc
    finally:
        client.close()


def _redis_forget(env: dict[str, str]) -> None:
    client = _redis_client(env)
    try:
        keys = list(client.scan_iter(match=env["REDIS_KEY_PREFIX"] + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@contextlib.asynccontextmanager
async def _moto(log_path: Path) -> AsyncIterator[str]:
    """A moto S3 server on a free port for the run (it keeps objects in memory: the bucket goes with it)."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    async with child_process(argv, dict(os.environ), log_path):
        await wait_for_port(port, 30.0, log_path)
        yield f"127.0.0.1:{port}"
