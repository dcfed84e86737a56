"""Fixtures for MySQL, Redis and the S3 test server (owned by the persistence work).

Each test gets its own database, key prefix and bucket, removed afterwards, so tests can share the
machine's MariaDB and Redis with each other and with a developer's data. Where the services are:
``VOICEGROW_TEST_MYSQL_HOST/PORT/USER/PASSWORD`` (default root@127.0.0.1:3306, empty password),
``VOICEGROW_TEST_REDIS_HOST/PORT/PASSWORD`` (127.0.0.1:6379), ``VOICEGROW_TEST_S3_ENDPOINT`` (+
``_ACCESS_KEY``/``_SECRET_KEY``) for an S3 server already running; without it a moto server is started.
An unreachable MariaDB or Redis skips the test, unless ``CI`` is set: then it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import redis
import trio
import trio_mysql

from voicegrow.metrics import Metrics
from voicegrow.settings import Settings, load_settings, replace
from voicegrow.storage import Persistence

__all__ = ["ServerProcess", "StorageTarget", "FAST", "free_port", "mysql_admin", "running"]

MYSQL = {
    "mysql_host": os.environ.get("VOICEGROW_TEST_MYSQL_HOST", "127.0.0.1"),
    "mysql_port": int(os.environ.get("VOICEGROW_TEST_MYSQL_PORT", "3306")),
    "mysql_user": os.environ.get("VOICEGROW_TEST_MYSQL_USER", "root"),
    "mysql_password": os.environ.get("VOICEGROW_TEST_MYSQL_PASSWORD", ""),
}
REDIS = {
    "redis_host": os.environ.get("VOICEGROW_TEST_REDIS_HOST", "127.0.0.1"),
    "redis_port": int(os.environ.get("VOICEGROW_TEST_REDIS_PORT", "6379")),
    "redis_password": os.environ.get("VOICEGROW_TEST_REDIS_PASSWORD", ""),
}


def _unreachable(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A service started as a subprocess on a fixed port, which a fault test can stop and start again."""

    def __init__(self, argv: list[str], port: int, ready: Callable[[], bool], *, startup_s: float = 20.0) -> None:
        self.argv, self.port, self._ready, self._startup_s = argv, port, ready, startup_s
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self._startup_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self._proc.returncode} on port {self.port}")
            if self._ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{' '.join(self.argv)} did not answer within {self._startup_s} s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


def _http_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            return httpx.get(url, timeout=0.5).status_code < 500
        except httpx.HTTPError:
            return False
    return ready


def _moto(port: int) -> ServerProcess:
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return ServerProcess(argv, port, _http_ready(f"http://127.0.0.1:{port}/"))


def _s3_settings(endpoint: str, access_key: str = "testing", secret_key: str = "testing") -> dict[str, Any]:
    return {"minio_endpoint": endpoint, "minio_access_key": access_key, "minio_secret_key": secret_key,
            "minio_secure": False}


# -- MySQL
@pytest.fixture(scope="session")
def mysql_server() -> dict[str, Any]:
    """The server's connection settings, after checking that it accepts TCP connections."""
    try:
        socket.create_connection((MYSQL["mysql_host"], MYSQL["mysql_port"]), timeout=2).close()
    except OSError as exc:
        _unreachable(f"MariaDB not reachable at {MYSQL['mysql_host']}:{MYSQL['mysql_port']}: {exc}")
    return dict(MYSQL)


async def mysql_admin(server: dict[str, Any]) -> trio_mysql.Connection:
    """A root connection to the server (no database selected) for setting up and inspecting tests."""
    conn = trio_mysql.connect(host=server["mysql_host"], port=server["mysql_port"], user=server["mysql_user"],
                              password=server["mysql_password"], charset="utf8mb4", use_unicode=True,
                              autocommit=True, connect_timeout=5)
    await conn.connect()
    return conn


def _mysql_statement(server: dict[str, Any], sql: str) -> None:
    async def run() -> None:
        conn = await mysql_admin(server)
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql)
        finally:
            await conn.aclose()
    trio.run(run)


@pytest.fixture
def mysql_db(mysql_server: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Settings (``Settings`` field names) for a fresh, uniquely named database, dropped afterwards.

    A plain fixture (it runs its own short trio loop before the test's) so that parametrized fixtures
    can request it with ``request.getfixturevalue``."""
    name = f"vg_test_{uuid.uuid4().hex[:12]}"
    _mysql_statement(mysql_server, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    try:
        yield {**mysql_server, "mysql_database": name}
    finally:
        _mysql_statement(mysql_server, f"DROP DATABASE IF EXISTS `{name}`")


# -- Redis
@pytest.fixture(scope="session")
def redis_server() -> dict[str, Any]:
    client = redis.Redis(host=REDIS["redis_host"], port=REDIS["redis_port"], password=REDIS["redis_password"] or None,
                         socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unreachable(f"Redis not reachable at {REDIS['redis_host']}:{REDIS['redis_port']}: {exc}")
    finally:
        client.close()
    return dict(REDIS)


@pytest.fixture
def redis_prefix(redis_server: dict[str, Any]) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"vgtest:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis(host=redis_server["redis_host"], port=redis_server["redis_port"],
                         password=redis_server["redis_password"] or None, socket_timeout=2)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def private_redis() -> Iterator[ServerProcess]:
    """A redis-server of this test's own (no persistence), for tests that stop and restart it."""
    binary = shutil.which("redis-server")
    if binary is None:
        _unreachable("redis-server not found on PATH")
    port = free_port()

    def ready() -> bool:
        client = redis.Redis(port=port, socket_timeout=0.3, socket_connect_timeout=0.3)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    server = ServerProcess([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no"], port, ready)
    server.start()
    yield server
    server.stop()


# -- S3
@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """Settings for an S3 endpoint: ``VOICEGROW_TEST_S3_ENDPOINT``, or a moto server started here."""
    endpoint = os.environ.get("VOICEGROW_TEST_S3_ENDPOINT")
    if endpoint:
        yield _s3_settings(endpoint, os.environ.get("VOICEGROW_TEST_S3_ACCESS_KEY", "testing"),
                           os.environ.get("VOICEGROW_TEST_S3_SECRET_KEY", "testing"))
        return
    server = _moto(free_port())
    server.start()
    try:
        yield _s3_settings(f"127.0.0.1:{server.port}")
    finally:
        server.stop()


@pytest.fixture
def private_s3() -> Iterator[ServerProcess]:
    """A moto server of this test's own, for tests that stop it (it forgets everything when stopped)."""
    server = _moto(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``s3_server`` plus a bucket name of this test's own (not created: persistence creates it),
    emptied and removed afterwards."""
    from minio import Minio
    from minio.deleteobjects import DeleteObject

    bucket = f"vg-test-{uuid.uuid4().hex[:12]}"
    yield {**s3_server, "minio_bucket": bucket}
    endpoint = s3_server["minio_endpoint"].removeprefix("http://")
    client = Minio(endpoint, access_key=s3_server["minio_access_key"], secret_key=s3_server["minio_secret_key"],
                   secure=False, region="us-east-1")
    if client.bucket_exists(bucket):
        names = [o.object_name for o in client.list_objects(bucket, recursive=True)]
        list(client.remove_objects(bucket, [DeleteObject(n) for n in names]))
        client.remove_bucket(bucket)


# -- Persistence over embedded or real backends
#: Retry and probe intervals shrunk so that outages and recoveries show within a fraction of a second.
FAST = {"retry_initial_s": 0.02, "retry_max_s": 0.2, "probe_interval_s": 0.1, "state_timeout_s": 1.0,
        "startup_timeout_s": 5.0, "delete_wait_s": 5.0, "connect_timeout_s": 1.0}


@dataclass
class StorageTarget:
    """Where a test's Persistence keeps things: ``kind`` is "embedded" or "real"."""

    kind: str
    overrides: dict[str, Any]
    key_prefix: str
    spool_dir: Path

    def settings(self, **changes: Any) -> Settings:
        return replace(load_settings({}, env_file=None), **{**self.overrides, **changes})

    def persistence(self, *, settings: Settings | None = None, metrics: Metrics | None = None,
                    **tuning: Any) -> Persistence:
        return Persistence.from_settings(settings or self.settings(), metrics or Metrics(),
                                         key_prefix=self.key_prefix, spool_dir=self.spool_dir, **{**FAST, **tuning})


@asynccontextmanager
async def running(persistence: Persistence) -> AsyncIterator[Persistence]:
    """``persistence.run`` in a nursery for the duration of the block, cancelled afterwards."""
    async with trio.open_nursery() as nursery:
        await nursery.start(persistence.run)
        yield persistence
        nursery.cancel_scope.cancel()


@pytest.fixture
def embedded_target(tmp_path: Path) -> StorageTarget:
    return StorageTarget("embedded", {"data_dir": str(tmp_path / "data")}, "vg:", tmp_path / "spool")


@pytest.fixture(params=["embedded", "real"])
def storage_target(request: pytest.FixtureRequest, tmp_path: Path) -> StorageTarget:
    """The same behaviour tests run over the embedded stand-ins and over MariaDB + Redis + S3."""
    if request.param == "embedded":
        return request.getfixturevalue("embedded_target")
    overrides = {"data_dir": str(tmp_path / "data"), **request.getfixturevalue("mysql_db"),
                 **request.getfixturevalue("redis_server"), **request.getfixturevalue("s3_bucket")}
    return StorageTarget("real", overrides, request.getfixturevalue("redis_prefix"), tmp_path / "spool")
