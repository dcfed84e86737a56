"""Monitoring as section 7 of the deployment document draws it: every section 7.3 threshold as a
Prometheus alert with promtool unit tests, AlertManager (amtool, Debian prometheus-alertmanager) with its
mail template and the DingTalk / WeCom bridge, Loki and promtail (Debian packages neither: their files
are parsed and checked against the configuration keys of Loki 3.0), and the section 7.4 log format.
A missing promtool or amtool fails the test when ``CI`` is set and skips it otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import importlib.util
import io
import json
import logging
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.test_deploy import DEPLOY, compose, require_tool, serving
from tests.test_deploy_document import section

PROMETHEUS = DEPLOY / "prometheus"
ALERTMANAGER = DEPLOY / "alertmanager"

#: Section 7.3's rows (the document's names) and the alert that implements each threshold.
THRESHOLDS = {
    "CPU 使用率": ("HostCPUHigh", "> 80"),
    "内存使用率": ("HostMemoryHigh", "> 85"),
    "磁盘使用率": ("HostDiskFull", "> 90"),
    "服务可用性": ("VoiceGrowAvailabilityLow", "< 0.999"),
    "响应时间": ("VoiceGrowResponseSlow", "> 3"),
    "ASR 成功率": ("VoiceGrowASRSuccessRateLow", "< 0.95"),
    "TTS 成功率": ("VoiceGrowTTSSuccessRateLow", "< 0.99"),
    "并发连接数": ("VoiceGrowTooManyConnections", "> 100"),
}


def rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text(encoding="utf-8"))
    return {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}


def test_every_threshold_of_section_7_3_is_an_alert_with_firing_and_quiet_unit_tests() -> None:
    table = re.findall(r"^\| (\S+) \| ([^|]+?) \| ([<>]) ([\d.]+)(%|s)? \|$", section(7), re.M)
    documented = {name.strip(): (op, float(value) / (100 if unit == "%" and name.strip() not in
                                                     ("CPU 使用率", "内存使用率", "磁盘使用率") else 1))
                  for _, name, op, value, unit in table}
    assert set(documented) == set(THRESHOLDS), documented
    expressions = {name: " ".join(rule["expr"].split()) for name, rule in rules().items()}
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text(encoding="utf-8"))["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for row, (op, value) in documented.items():
        alert, ending = THRESHOLDS[row]
        assert ending == f"{op} {value:g}", f"{row}: the document says {op} {value:g}"
        assert expressions[alert].endswith(ending), f"{alert} does not end with {ending}"
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), f"no test fires {alert}"
        assert any(c["alertname"] == alert and not c["exp_alerts"] for c in cases), f"no test keeps {alert} quiet"


def test_host_rules_use_node_exporter_which_the_stack_runs_and_scrapes() -> None:
    services = compose("docker-compose.yml")["services"]
    assert "monitoring" in services["node-exporter"]["profiles"]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text(encoding="utf-8"))
    node = next(job for job in config["scrape_configs"] if job["job_name"] == "node")
    assert node["static_configs"][0]["targets"] == ["node-exporter:9100"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    for alert in ("HostCPUHigh", "HostMemoryHigh", "HostDiskFull"):
        assert re.search(r"\bnode_\w+", rules()[alert]["expr"]), alert


def test_monitoring_profile_has_the_services_of_section_7_1() -> None:
    services = compose("docker-compose.yml")["services"]
    for name in ("prometheus", "grafana", "alertmanager", "loki", "promtail", "chat-webhook", "node-exporter"):
        assert services[name]["profiles"] == ["monitoring"], name
    assert services["promtail"]["depends_on"] == {"loki": {"condition": "service_healthy"}}
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert {d["type"]: d["url"] for d in datasources["datasources"]} == {
        "prometheus": "http://prometheus:9090", "loki": "http://loki:3100"}


# --- AlertManager ----------------------------------------------------------------------------------------

def test_alertmanager_config_passes_amtool(tmp_path: Path) -> None:
    amtool = require_tool("amtool", "prometheus-alertmanager")
    # The container paths, pointed at the repository's files.
    text = (ALERTMANAGER / "alertmanager.yml").read_text(encoding="utf-8")
    text = text.replace("/etc/alertmanager/templates", str(ALERTMANAGER / "templates"))
    text = text.replace("/etc/alertmanager/smtp_password", str(tmp_path / "smtp_password"))
    (tmp_path / "smtp_password").write_text("secret\n")
    (tmp_path / "alertmanager.yml").write_text(text)
    checked = subprocess.run([amtool, "check-config", str(tmp_path / "alertmanager.yml")], capture_output=True,
                             encoding="utf-8", timeout=60)
    assert checked.returncode == 0 and "1 templates" in checked.stdout, checked.stdout + checked.stderr
    config = yaml.safe_load(text)
    receiver = next(r for r in config["receivers"] if r["name"] == config["route"]["receiver"])
    assert receiver["email_configs"][0]["to"] and receiver["webhook_configs"][0]["url"] == "http://chat-webhook:8060/alert"
    rendered = subprocess.run(
        [amtool, "template", "render", f"--template.glob={ALERTMANAGER / 'templates'}/*.tmpl",
         "--template.text", '{{ template "voicegrow.mail.subject" . }}|{{ template "voicegrow.mail.html" . }}'],
        capture_output=True, encoding="utf-8", timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.startswith("[VoiceGrow ") and "<table" in rendered.stdout


def load_bridge() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chat_webhook", ALERTMANAGER / "chat_webhook.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAYLOAD = {
    "version": "4", "status": "firing", "commonLabels": {"alertname": "VoiceGrowTTSSuccessRateLow"},
    "alerts": [{"status": "firing", "startsAt": "2026-12-01T09:00:00Z",
                "labels": {"alertname": "VoiceGrowTTSSuccessRateLow", "severity": "warning", "instance": "server:8000"},
                "annotations": {"summary": "TTS success rate is 97% (below 99%)"}},
               {"status": "resolved", "labels": {"alertname": "HostDiskFull", "severity": "warning"},
                "annotations": {"summary": "Disk / is 95% full"}}],
}


class Robot:
    """A stand-in robot: records what it was sent and answers like DingTalk/WeCom (errcode)."""

    def __init__(self, errcode: int = 0) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        robot = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                robot.received.append((self.path, json.loads(body)))
                data = json.dumps({"errcode": errcode, "errmsg": "ok" if not errcode else "bad token"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.handler = Handler


def post(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/alert", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("kind", ["dingtalk", "wecom"])
def test_chat_webhook_turns_alerts_into_a_robot_message(kind: str) -> None:
    bridge = load_bridge()
    # The robots' hosts, pointed at a local stand-in.
    setattr(bridge, "DINGTALK_HOSTS" if kind == "dingtalk" else "WECOM_HOSTS", ("127.0.0.1",))
    robot = Robot()
    with serving(robot.handler) as robot_port:
        url = f"http://127.0.0.1:{robot_port}/robot/send?access_token=t0k3n"
        server = bridge.make_server(url, "SECret" if kind == "dingtalk" else "", 0, host="127.0.0.1")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            port = server.server_address[1]
            assert post(port, json.dumps(PAYLOAD).encode()) == (200, {"status": "sent"})
            assert post(port, b"not json")[0] == 400
        finally:
            server.shutdown()
            server.server_close()
    path, message = robot.received[0]
    assert message["msgtype"] == "markdown"
    text = message["markdown"]["text" if kind == "dingtalk" else "content"]
    assert "[FIRING] VoiceGrowTTSSuccessRateLow" in text and "TTS success rate is 97% (below 99%)" in text
    assert "[RESOLVED] HostDiskFull" in text and "1 firing, 1 resolved" in text
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    if kind == "dingtalk":
        assert message["markdown"]["title"] == "VoiceGrow FIRING: VoiceGrowTTSSuccessRateLow"
        timestamp = query["timestamp"][0]
        expected = base64.b64encode(hmac.new(b"SECret", f"{timestamp}\nSECret".encode(), hashlib.sha256).digest())
        assert query["sign"][0] == expected.decode(), "DingTalk's signature"
    else:
        assert "sign" not in query


def test_chat_webhook_refuses_other_urls_and_reports_a_refusing_robot() -> None:
    bridge = load_bridge()
    with pytest.raises(ValueError, match="ALERT_WEBHOOK_URL="):
        bridge.make_server("https://example.com/hook", "", 0, host="127.0.0.1")
    bridge.WECOM_HOSTS = ("127.0.0.1",)
    robot = Robot(errcode=93000)
    with serving(robot.handler) as robot_port:
        server = bridge.make_server(f"http://127.0.0.1:{robot_port}/cgi-bin/webhook/send?key=k", "", 0, host="127.0.0.1")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            status, body = post(server.server_address[1], json.dumps(PAYLOAD).encode())
        finally:
            server.shutdown()
            server.server_close()
    assert status == 502 and "refused" in body["reason"], "AlertManager must retry"
    # Without a robot configured, alerts are accepted (mail still goes) and dropped with a warning.
    server = bridge.make_server("", "", 0, host="127.0.0.1")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert post(server.server_address[1], json.dumps(PAYLOAD).encode()) == (200, {"status": "dropped"})
    finally:
        server.shutdown()
        server.server_close()


# --- Loki and promtail: no Debian package, so the files are checked against Loki 3.0's keys ---------------

LOKI_TOP = {"target", "auth_enabled", "ballast_bytes", "server", "distributor", "querier", "query_scheduler",
            "frontend", "query_range", "ruler", "ingester_client", "ingester", "pattern_ingester", "index_gateway",
            "bloom_build", "bloom_gateway", "storage_config", "chunk_store_config", "schema_config", "compactor",
            "limits_config", "frontend_worker", "table_manager", "memberlist", "runtime_config", "operational_config",
            "tracing", "analytics", "common", "shutdown_delay", "metrics_namespace"}
LOKI_SECTIONS = {
    "server": {"http_listen_port", "grpc_listen_port", "log_level", "http_listen_address", "grpc_listen_address"},
    "common": {"instance_addr", "path_prefix", "storage", "replication_factor", "ring", "compactor_address"},
    "limits_config": {"retention_period", "reject_old_samples", "reject_old_samples_max_age", "ingestion_rate_mb",
                      "ingestion_burst_size_mb", "allow_structured_metadata", "max_query_lookback"},
    "compactor": {"working_directory", "compaction_interval", "retention_enabled", "retention_delete_delay",
                  "delete_request_store", "retention_delete_worker_count"},
    "analytics": {"reporting_enabled"},
}
PROMTAIL_TOP = {"server", "positions", "clients", "scrape_configs", "limits_config", "target_config", "options",
                "tracing", "global"}
PROMTAIL_STAGES = {"docker", "cri", "regex", "json", "logfmt", "replace", "multiline", "timestamp", "output",
                   "labels", "labelallow", "labeldrop", "static_labels", "metrics", "tenant", "match", "drop",
                   "pack", "template", "limit", "structured_metadata", "decolorize", "sampling", "geoip"}


def test_loki_config_has_only_loki_keys_and_a_usable_schema() -> None:
    config = yaml.safe_load((DEPLOY / "loki" / "loki.yml").read_text(encoding="utf-8"))
    assert set(config) <= LOKI_TOP, set(config) - LOKI_TOP
    for name, keys in LOKI_SECTIONS.items():
        assert set(config[name]) <= keys, (name, set(config[name]) - keys)
    assert config["auth_enabled"] is False
    [period] = config["schema_config"]["configs"]
    assert set(period) == {"from", "store", "object_store", "schema", "index"}
    assert (period["store"], period["schema"], period["object_store"]) == ("tsdb", "v13", "filesystem")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", str(period["from"])) and period["index"]["period"] == "24h"
    # Retention needs the compactor to know where delete requests live (Loki 3.0 refuses otherwise).
    assert config["compactor"]["retention_enabled"] and config["compactor"]["delete_request_store"] == "filesystem"
    assert config["common"]["path_prefix"] == "/loki"
    loki = compose("docker-compose.yml")["services"]["loki"]
    assert "./loki/loki.yml:/etc/loki/loki.yml:ro" in loki["volumes"] and "loki-data:/loki" in loki["volumes"]
    assert f"http_listen_port: {config['server']['http_listen_port']}" in (DEPLOY / "loki" / "loki.yml").read_text()
    assert loki["healthcheck"]["test"][-1] == f"http://127.0.0.1:{config['server']['http_listen_port']}/ready"


def stages(pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for stage in pipeline:
        assert len(stage) == 1, stage
        found.append(stage)
        if "match" in stage and "stages" in stage["match"]:
            found += stages(stage["match"]["stages"])
    return found


def test_promtail_ships_this_stacks_container_logs_to_loki() -> None:
    config = yaml.safe_load((DEPLOY / "loki" / "promtail.yml").read_text(encoding="utf-8"))
    assert set(config) <= PROMTAIL_TOP
    assert config["clients"] == [{"url": "http://loki:3100/loki/api/v1/push"}]
    [job] = config["scrape_configs"]
    assert job["static_configs"][0]["labels"]["__path__"] == "/var/lib/docker/containers/*/*-json.log"
    used = stages(job["pipeline_stages"])
    assert {next(iter(s)) for s in used} <= PROMTAIL_STAGES
    drops = [s["match"] for s in used if "match" in s and s["match"].get("action") == "drop"]
    assert drops == [{"selector": '{project!="voicegrow"}', "action": "drop", "drop_counter_reason": "other_project"}]
    # The labels it reads are the ones the Compose logging options put into every line's attrs.
    services = compose("docker-compose.yml")["services"]
    for name, service in services.items():
        assert service["logging"]["options"]["labels"] == "com.docker.compose.service,com.docker.compose.project", name
    promtail = services["promtail"]
    assert "/var/lib/docker/containers:/var/lib/docker/containers:ro" in promtail["volumes"]


# --- section 7.4: the log format and its rotation ------------------------------------------------------

def test_server_log_lines_carry_the_fields_of_section_7_4_1() -> None:
    from voicegrow.logsetup import JsonFormatter

    documented = re.findall(r'^\s+"(\w+)": ', code_blocks_python(section(7)), re.M)
    assert documented == ["timestamp", "level", "logger", "message", "module", "function", "line"]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("voicegrow.test.deploy")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.error("一条日志", exc_info=True)
    finally:
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert set(documented) | {"exception"} <= set(entry)
    assert entry["message"] == "一条日志" and entry["level"] == "ERROR" and "RuntimeError: boom" in entry["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["timestamp"])


def code_blocks_python(text: str) -> str:
    return "".join(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M))


def test_log_rotation_is_section_7_4_2() -> None:
    documented = yaml.safe_load(re.findall(r"^```yaml\n(.*?)^```", section(7), re.S | re.M)[-1])
    wanted = documented["services"]["server"]["logging"]
    ours = compose("docker-compose.yml")["services"]["server"]["logging"]
    assert ours["driver"] == wanted["driver"]
    assert {k: ours["options"][k] for k in ("max-size", "max-file")} == wanted["options"]



# --- appendix A: the checklists ----------------------------------------------------------------------

CHECKLIST_TOKEN = "checklist-token-" + "x" * 16


@pytest.fixture
async def token_server(tmp_path: Path):
    """The real server (embedded backends) with an admin token, on free ports."""
    from tests.conftest import make_settings
    from voicegrow.app import running_server

    async with running_server(make_settings(tmp_path, admin_token=CHECKLIST_TOKEN)) as handle:
        yield handle


async def run_checklist(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import trio

    from tests.test_deploy import run_script

    return await trio.to_thread.run_sync(lambda: run_script("checklist.sh", *args, env=env))


def checks(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """{check name: its status word} from checklist.sh's lines."""
    return {line[6:28].strip(): line[:5].strip() for line in result.stdout.splitlines() if line.strip()}


async def test_checklist_after_against_the_real_server(token_server, tmp_path: Path) -> None:
    from tests.test_deploy import script_env

    require_tool("curl", "curl")
    env = script_env(tmp_path, WS_PORT=str(token_server.ws_port), HTTP_PORT=str(token_server.http_port),
                     ADMIN_TOKEN=CHECKLIST_TOKEN)
    result = await run_checklist("--after", "--local", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert checks(result) == {"containers": "SKIP", "health check": "ok", "websocket": "ok", "HTTP API": "ok",
                              "MinIO console": "SKIP", "logs": "SKIP"}
    assert "101 Switching Protocols" in result.stdout
    wrong = await run_checklist("--after", "--local", env={**env, "ADMIN_TOKEN": "not-the-token-" + "y" * 12})
    assert wrong.returncode == 1 and checks(wrong)["HTTP API"] == "FAIL" and checks(wrong)["websocket"] == "ok"


async def test_checklist_before_finds_busy_ports_placeholders_and_missing_keys(token_server, tmp_path: Path) -> None:
    from tests.test_deploy import free_port, script_env

    require_tool("curl", "curl")
    busy = str(token_server.http_port)  # something listens there already
    env = script_env(tmp_path, WS_PORT=str(free_port()), HTTP_PORT=busy, ADMIN_TOKEN="change-me",
                     LLM_BASE_URL="http://ai-manager:8000", LLM_API_KEY="", TTS_BASE_URL="http://ai-manager:8000",
                     TTS_API_KEY="ak_test")
    result = await run_checklist("--before", "--local", env=env)
    found = checks(result)
    assert result.returncode == 1
    assert found[f"port {busy}"] == "FAIL" and found[f"port {env['WS_PORT']}"] == "ok"
    assert found[".env"] == "FAIL" and "ADMIN_TOKEN is still the placeholder" in result.stdout
    assert found["LLM API key"] == "FAIL" and found["TTS API key"] == "ok"
    assert "ak_" in result.stdout and "ak_test" not in result.stdout, "the key itself is never printed"


def test_checklist_before_checks_docker_and_compose_versions(tmp_path: Path) -> None:
    from tests.test_deploy import STACK_SECRETS, env_example, free_port, script_env

    require_tool("curl", "curl")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/usr/bin/env bash\n'
                                    'case "$*" in\n'
                                    '  "version --format {{.Server.Version}}") echo 23.0.6 ;;\n'
                                    '  "compose version --short") echo v2.29.1 ;;\n'
                                    '  *) exit 1 ;;\n'
                                    'esac\n')
    (bin_dir / "docker").chmod(0o755)
    env_file = tmp_path / "stack.env"
    values = {**env_example(), **STACK_SECRETS, "WS_PORT": str(free_port()), "HTTP_PORT": str(free_port())}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env = script_env(tmp_path, ENV_FILE=str(env_file))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run([str(DEPLOY / "scripts" / "checklist.sh"), "--before"], env=env, capture_output=True,
                            encoding="utf-8", timeout=60)
    found = checks(result)
    assert result.returncode == 1, result.stdout + result.stderr
    assert found["docker"] == "FAIL" and "23.0.6: 24.0 or newer is needed" in result.stdout
    assert found["compose"] == "ok" and found["docker-compose"] == "WARN"
    assert found[".env"] == "ok" and {found["cpu"], found["memory"], found["disk"]} <= {"ok", "WARN"}
    assert found["LLM service"] == "WARN", "no LLM_BASE_URL in the example: offline replies only"
