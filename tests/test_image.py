"""The server image, built from ``Dockerfile`` and run the way ``deploy/docker-compose.yml`` runs it.

Compose is the deployment document's main path, so the image is built here exactly from the
Dockerfile (the legacy builder, ``--network host``, with ``PYTHON_IMAGE`` pointing at a local stand-in
for ``python:3.11-slim-bookworm`` that ``deploy/ci/docker_engine.sh`` makes from Debian's packages:
no image can be pulled here). The container then gets the server service's environment, volume,
health check and stop grace *read from the Compose file*, not restated, on the host network (the
default bridge stays unused) against the machine's MariaDB and Redis and the S3 test server.

Without a Docker engine the module is skipped, unless ``CI`` is set: then it fails, so a broken
Dockerfile cannot pass CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import trio
import yaml
from minio import Minio

from bench.xiaoai_emulator import run_emulator
from tests.conftest import REPO_ROOT
from tests.service_fixtures import free_port
from voicegrow.audio import read_wav
from voicegrow.client import open_native_client, stream_wav_and_collect

pytestmark = pytest.mark.slow

COMPOSE = REPO_ROOT / "deploy" / "docker-compose.yml"
BASE_IMAGE = os.environ.get("VOICEGROW_CI_BASE_IMAGE", "voicegrow-ci/python:3.11-bookworm")
IMAGE = "voicegrow-server:ci"
FIGURES = REPO_ROOT / "tests" / "output" / "image-figures.json"


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def docker(*args: str, check: bool = True, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


# -- the Compose file as the source of truth --------------------------------------------------------------

def server_service() -> tuple[str, dict[str, Any]]:
    """The service that builds this repository's Dockerfile (its name may change; its build does not)."""
    services = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    for name, service in services.items():
        build = service.get("build") or {}
        if isinstance(build, dict) and build.get("dockerfile") == "Dockerfile":
            return name, service
    raise AssertionError("no service in deploy/docker-compose.yml builds the Dockerfile")


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` substitution (the forms the file uses)."""
    return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def compose_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value))


@dataclass
class RunSpec:
    """``docker run`` arguments equivalent to ``docker compose up`` of the server service."""

    environment: dict[str, str]
    #: (source, target, options): a named volume, or a path relative to the Compose file's folder.
    mounts: list[tuple[str, str, str]]
    health_cmd: list[str]
    health: dict[str, str]
    stop_grace_s: float
    limits: dict[str, str] = field(default_factory=dict)

    @property
    def health_shell(self) -> str:
        """``docker run`` takes a health command as a shell line only: the exec form, quoted for sh."""
        return shlex.join(self.health_cmd)

    @property
    def data_mount(self) -> tuple[str, str, str]:
        (mount,) = [m for m in self.mounts if m[1] == "/data"]
        return mount

    def argv(self, name: str, sources: dict[str, str], env_file: Path) -> list[str]:
        """``sources``: where each mount's source is on this machine (a volume name or a directory)."""
        args = ["run", "-d", "--name", name, "--network", "host", "--env-file", str(env_file),
                "--stop-timeout", str(int(self.stop_grace_s)), "--health-cmd", self.health_shell]
        for source, target, options in self.mounts:
            args += ["-v", ":".join(filter(None, [sources[source], target, options]))]
        for flag, value in self.health.items():
            args += [f"--health-{flag}", value]
        for key, value in self.environment.items():
            args += ["-e", f"{key}={value}"]
        if "memory" in self.limits:
            args += ["--memory", self.limits["memory"]]
        return [*args, IMAGE]


def run_spec(env: dict[str, str]) -> RunSpec:
    _, service = server_service()
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *options = str(volume).split(":")
        mounts.append((source, target, ",".join(options)))
    assert [m for m in mounts if m[1] == "/data"], f"no mount on the image's /data volume: {mounts}"
    check = service["healthcheck"]
    test = check["test"]
    health_cmd = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    health = {"interval": check["interval"], "timeout": check["timeout"], "retries": str(check["retries"]),
              "start-period": check["start_period"]}
    limits = ((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}
    return RunSpec({k: interpolate(str(v), env) for k, v in environment.items()}, mounts, health_cmd, health,
                   compose_seconds(service.get("stop_grace_period", "10s")), limits)


# -- engine, image, services -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine() -> None:
    if shutil.which("docker") is None:
        _unavailable("no docker client; .ci/run installs one with deploy/ci/docker_engine.sh")
    if docker("info", check=False, timeout=30).returncode != 0:
        _unavailable("no Docker engine answers; start one with deploy/ci/docker_engine.sh")
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        _unavailable(f"base image {BASE_IMAGE} missing; deploy/ci/docker_engine.sh makes it")


def _build(*, no_cache: bool = False) -> float:
    argv = ["docker", "build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "-t", IMAGE]
    if no_cache:
        argv.append("--no-cache")
    started = time.monotonic()
    result = subprocess.run([*argv, "."], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert result.returncode == 0, f"docker build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return time.monotonic() - started


@pytest.fixture(scope="module")
def image(engine: None) -> dict[str, float]:
    """The image built from the Dockerfile as it is now; its size and build time for the README."""
    figures = {"build_s": round(_build(), 1)}
    figures["size_mb"] = round(int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout) / 1e6, 1)
    return figures


@pytest.fixture(scope="module")
def backends(engine: None) -> Iterator[dict[str, str]]:
    """A database of its own on the machine's MariaDB, a Redis key prefix, a moto S3 server and the
    bench's fake LLM/TTS, all on loopback where the host-network container finds them."""
    import redis
    import trio_mysql

    database = f"vg_image_{uuid.uuid4().hex[:10]}"
    prefix = f"vgimage:{uuid.uuid4().hex[:10]}:"

    async def sql(statement: str) -> list[tuple[Any, ...]]:
        conn = trio_mysql.connect(host="127.0.0.1", user="root", password="", autocommit=True, charset="utf8mb4",
                                    use_unicode=True)
        await conn.connect()
        try:
            async with conn.cursor() as cur:
                await cur.execute(statement)
                return list(await cur.fetchall())
        finally:
            await conn.aclose()

    try:
        trio.run(sql, f"CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    except Exception as exc:  # noqa: BLE001 (any connection failure means: no MariaDB here)
        _unavailable(f"MariaDB not reachable at 127.0.0.1:3306: {exc}")
    s3_port, ai_port = free_port(), free_port()
    children = [
        subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "bench.fake_ai", "--port", str(ai_port), "--ttft-ms", "50",
                          "--tokens-per-s", "200"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}),
    ]
    try:
        for port in (s3_port, ai_port):
            _wait_http(f"http://127.0.0.1:{port}/", lambda r: r.status_code < 500, 30)
        yield {"database": database, "redis_prefix": prefix, "s3_endpoint": f"127.0.0.1:{s3_port}",
               "ai_url": f"http://127.0.0.1:{ai_port}", "sql": sql}  # type: ignore[dict-item]
    finally:
        for child in children:
            child.terminate()
            child.wait(10)
        trio.run(sql, f"DROP DATABASE IF EXISTS `{database}`")
        client = redis.Redis(host="127.0.0.1", port=6379)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


def _wait_http(url: str, ok: Any, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=2)
            if ok(response):
                return response
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {timeout} s")
        time.sleep(0.5)


@dataclass
class Container:
    name: str
    sources: dict[str, str]
    ws_url: str
    http_url: str
    spec: RunSpec
    env_file: Path
    admin_token: str

    def start(self) -> tuple[float, float]:
        """``docker run`` as Compose would, then wait for the health check.

        Returns seconds until the health endpoint first answered and until Docker called the container
        healthy (the latter is at least the Compose file's first ``interval``)."""
        started = time.monotonic()
        docker(*self.spec.argv(self.name, self.sources, self.env_file))
        deadline = started + compose_seconds(self.spec.health["start-period"]) + 120
        answering: float | None = None
        while (status := self.state()["Health"]["Status"]) != "healthy":
            assert status != "unhealthy" and self.state()["Running"], f"container {status}:\n{self.logs()}"
            assert time.monotonic() < deadline, f"not healthy in time:\n{self.logs()}"
            if answering is None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.http_url}/api/v1/health", timeout=1).status_code == 200:
                        answering = time.monotonic() - started
            time.sleep(0.2)
        healthy = time.monotonic() - started
        return (answering if answering is not None else healthy), healthy

    def state(self) -> dict[str, Any]:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-6000:]

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture(scope="module")
def container(image: dict[str, float], backends: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Container]:
    ws_port, http_port = free_port(), free_port()
    token = uuid.uuid4().hex
    env = {
        "SERVER_HOST": "127.0.0.1", "WS_PORT": str(ws_port), "HTTP_PORT": str(http_port),
        "LOG_FORMAT": "json", "ADMIN_TOKEN": token, "ASR_LANGUAGE": "auto", "SHUTDOWN_GRACE_S": "5",
        "MYSQL_HOST": "127.0.0.1", "MYSQL_PORT": "3306", "MYSQL_USER": "root", "MYSQL_PASSWORD": "",
        "MYSQL_DATABASE": backends["database"], "REDIS_HOST": "127.0.0.1", "REDIS_PORT": "6379",
        "REDIS_PASSWORD": "", "REDIS_KEY_PREFIX": backends["redis_prefix"],
        "MINIO_ENDPOINT": backends["s3_endpoint"], "MINIO_ACCESS_KEY": "testing", "MINIO_SECRET_KEY": "testing",
        "MINIO_BUCKET": f"vg-image-{uuid.uuid4().hex[:8]}", "MINIO_SECURE": "false",
        "LLM_BASE_URL": backends["ai_url"], "TTS_BASE_URL": backends["ai_url"],
    }
    env_file = tmp_path_factory.mktemp("image") / "server.env"  # Compose's env_file: .env
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()), encoding="utf-8")
    suffix = uuid.uuid4().hex[:8]
    spec = run_spec(env)
    home = tmp_path_factory.mktemp("voicegrow-home")  # the stack's folder (/opt/voicegrow), as deploy.sh lays it
    sources: dict[str, str] = {}
    for source, _target, _options in spec.mounts:
        if source.startswith((".", "/")):
            directory = (home / source).resolve()
            directory.mkdir(parents=True, exist_ok=True)
            if directory.relative_to(home).as_posix().startswith("data/server"):
                os.chown(directory, 10001, 10001)  # deploy/scripts/lib.sh: the server runs as uid 10001
            sources[source] = str(directory)
        else:
            sources[source] = f"voicegrow-ci-{source}-{suffix}"
    box = Container(f"voicegrow-ci-{suffix}", sources, f"ws://127.0.0.1:{ws_port}",
                    f"http://127.0.0.1:{http_port}", spec, env_file, token)
    try:
        answering, healthy = box.start()
        image.update(answering_s=round(answering, 1), healthy_s=round(healthy, 1))
        yield box
    finally:
        box.remove()
        for source, name in sources.items():
            if not source.startswith((".", "/")):
                docker("volume", "rm", "-f", name, check=False)
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(image, indent=2) + "\n", encoding="utf-8")


def _pcm(audio_fixtures: Path, clip: str) -> bytes:
    samples, _ = read_wav(audio_fixtures / f"{clip}.wav")
    return samples.astype("<i2").tobytes()


# -- the checks --------------------------------------------------------------------------------------------

def test_compose_server_definition_is_what_the_container_gets(container: Container) -> None:
    name, service = server_service()
    assert service["healthcheck"]["test"][1:] == container.spec.health_cmd
    inspected = json.loads(docker("inspect", container.name).stdout)[0]
    assert inspected["HostConfig"]["NetworkMode"] == "host"
    assert inspected["Config"]["Healthcheck"]["Test"] == ["CMD-SHELL", container.spec.health_shell]
    assert sorted(m["Destination"] for m in inspected["Mounts"]) == sorted(m[1] for m in container.spec.mounts)
    env = dict(item.split("=", 1) for item in inspected["Config"]["Env"])
    for key in (service.get("environment") or {}):
        assert key in env, f"{key} of the Compose service is missing in the container"


def test_the_server_runs_as_the_non_root_user(container: Container) -> None:
    assert docker("exec", container.name, "id", "-u").stdout.strip() == "10001"
    top = docker("top", container.name, "-o", "pid,uid,args").stdout.splitlines()[1:]
    assert top and all(line.split()[1] == "10001" for line in top), top  # the server and any child
    assert any("voicegrow serve" in line for line in top), top
    config_user = docker("inspect", "-f", "{{.Config.User}}", container.name).stdout.strip()
    assert config_user == "voicegrow"


async def test_a_native_speaker_is_answered_and_the_turn_lands_in_mysql_and_s3(
        container: Container, backends: dict[str, Any], audio_fixtures: Path) -> None:
    async with open_native_client(container.ws_url, device_id="image-native") as client:
        result = await stream_wav_and_collect(client, _pcm(audio_fixtures, "en-00"), speed=2.0, timeout_s=90)
    assert result.transcript and result.reply and len(result.reply_audio) > 24000
    headers = {"Authorization": f"Bearer {container.admin_token}"}
    async with httpx.AsyncClient(base_url=container.http_url, headers=headers, timeout=10) as http:
        with trio.fail_after(30):
            while not (turns := (await http.get("/api/v1/conversations",
                                                params={"device_id": "image-native"})).json()["turns"]):
                await trio.sleep(0.3)
        (turn,) = turns
        assert turn["transcript"] == result.transcript and turn["reply_text"] == result.reply
        assert (await http.get(turn["audio_out_url"])).status_code == 200
    rows = await backends["sql"](f"SELECT transcript, audio_in_key, audio_out_key FROM "
                                 f"`{backends['database']}`.turns WHERE device_id = 'image-native'")
    assert rows == [(result.transcript, turn["audio_in_key"], turn["audio_out_key"])]
    env = dict(line.split("=", 1) for line in container.env_file.read_text().splitlines())
    s3 = Minio(backends["s3_endpoint"], access_key="testing", secret_key="testing", secure=False,
               region="us-east-1")
    keys = {o.object_name for o in s3.list_objects(env["MINIO_BUCKET"], recursive=True)}
    assert {turn["audio_in_key"], turn["audio_out_key"]} <= keys


async def test_an_open_xiaoai_speaker_is_armed_and_answered(container: Container, audio_fixtures: Path) -> None:
    async with run_emulator(container.ws_url) as emu:
        await emu.wait_for_request("start_recording", timeout=30)
        await emu.wait_for_request("start_play", timeout=30)
        await emu.send_kws("小爱同学")  # LISTEN_MODE=auto: a speaker answers after its wake word
        await emu.stream_pcm(_pcm(audio_fixtures, "zh-00"), realtime=False)
        await emu.wait_until_played(24000, timeout=90)  # half a second of the reply has been heard
    assert emu.play_config is not None and emu.play_config.sample_rate == 24000


async def test_docker_stop_drains_sessions_and_exits_0_within_the_grace(container: Container) -> None:
    from voicegrow.protocol.native import Close

    close_codes: list[int] = []
    async with open_native_client(container.ws_url, device_id="image-drain") as client:
        async with trio.open_nursery() as nursery:

            async def hold() -> None:
                async for frame in client:  # until the session ends
                    if isinstance(frame, Close):
                        close_codes.append(frame.code)

            nursery.start_soon(hold)
            await trio.sleep(0.5)
            started = time.monotonic()
            result = await trio.to_thread.run_sync(
                lambda: docker("stop", container.name, timeout=container.spec.stop_grace_s + 30))
            stopped_in = time.monotonic() - started
    assert result.returncode == 0
    state = container.state()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], container.logs()
    assert stopped_in < container.spec.stop_grace_s, f"took {stopped_in:.1f} s"
    assert close_codes == [1001], close_codes  # the speaker was told the server is going away


def test_a_second_start_on_the_same_volume_reuses_model_cache_and_data(container: Container,
                                                                      image: dict[str, float]) -> None:
    first_logs = container.logs()
    assert "assembling ASR model" not in first_logs  # the image carries the assembled model already
    container.remove()
    answering, healthy = container.start()
    image.update(second_start_answering_s=round(answering, 1), second_start_healthy_s=round(healthy, 1))
    logs = container.logs()
    assert "assembling ASR model" not in logs and "corrupt" not in logs
    listing = httpx.get(f"{container.http_url}/api/v1/conversations", params={"device_id": "image-native"},
                        headers={"Authorization": f"Bearer {container.admin_token}"}, timeout=10).json()
    assert listing["turns"], "the first run's conversation is gone"
    files = docker("exec", container.name, "ls", "-A", "/data").stdout.split()
    assert "spool" in files, files  # the first run's data directory, on the same volume


def test_the_engine_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        _unavailable("shellcheck not installed (.ci/run installs Debian's shellcheck)")
    script = REPO_ROOT / "deploy" / "ci" / "docker_engine.sh"
    result = subprocess.run([shellcheck, str(script)], capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stdout
    text = script.read_text(encoding="utf-8")
    assert "--bridge=none" in text and "docker pull" not in text  # no bridge network, nothing pulled
