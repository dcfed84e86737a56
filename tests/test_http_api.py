"""The HTTP API: health, detail, sessions, metrics, admin auth, and JSON errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import trio

from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.client import open_native_client

COMPONENTS = {"asr", "llm", "tts", "mysql", "redis", "minio"}


async def test_health_and_detail(embedded_server) -> None:
    async with httpx.AsyncClient(base_url=embedded_server.http_url) as http:
        health = await http.get("/api/v1/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        detail = (await http.get("/api/v1/health/detail")).json()
    assert detail["status"] == "ok"
    assert detail["version"] and detail["uptime_s"] >= 0 and detail["sessions"] == 0
    assert set(detail["components"]) >= COMPONENTS
    assert detail["components"]["llm"]["status"] == "embedded"
    assert "offline responder" in detail["components"]["llm"]["detail"]
    for name in ("mysql", "redis", "minio"):
        assert detail["components"][name]["status"] == "embedded"
    for component in detail["components"].values():
        assert component["status"] in ("ok", "embedded", "disabled", "degraded", "down")


async def test_sessions_lists_live_sessions(embedded_server) -> None:
    async with httpx.AsyncClient(base_url=embedded_server.http_url) as http:
        async with open_native_client(embedded_server.ws_url, device_id="living-room"):
            with trio.fail_after(5):
                while not (listing := (await http.get("/api/v1/sessions")).json())["count"]:
                    await trio.sleep(0.02)
            (session,) = listing["sessions"]
            assert session["device_id"] == "living-room"
            assert session["protocol"] == "native"
            assert session["remote_addr"].startswith("127.0.0.1:")
            assert session["turns"] == 0 and session["since"] > 0
            detail = (await http.get("/api/v1/health/detail")).json()
            assert detail["sessions"] == 1


async def test_metrics_are_exported(embedded_server) -> None:
    async with httpx.AsyncClient(base_url=embedded_server.http_url) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("voicegrow_up 1.0", "voicegrow_sessions_active", "voicegrow_turns_total",
                 "voicegrow_stage_latency_seconds", "voicegrow_asr_queue_depth", "voicegrow_spool_depth"):
        assert name in text


async def test_errors_are_json_not_html(embedded_server) -> None:
    async with httpx.AsyncClient(base_url=embedded_server.http_url) as http:
        missing = await http.get("/api/v1/nothing-here")
        wrong_method = await http.post("/api/v1/health")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert wrong_method.status_code == 405 and "reason" in wrong_method.json()
    assert "<html" not in missing.text.lower()


async def test_admin_token_protects_everything_but_health(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, admin_token="s3cret-token")) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await http.get("/api/v1/health")).status_code == 200
            for path in ("/api/v1/health/detail", "/api/v1/sessions", "/metrics", "/api/v1/devices"):
                refused = await http.get(path)
                assert refused.status_code == 401, path
                assert refused.json()["error"] == "unauthorized"
                assert refused.headers["www-authenticate"].startswith("Bearer")
                wrong = await http.get(path, headers={"Authorization": "Bearer s3cret-tokem"})
                assert wrong.status_code == 401
                ok = await http.get(path, headers={"Authorization": "Bearer s3cret-token"})
                assert ok.status_code == 200, path


async def test_request_body_limit_is_a_json_413(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, http_max_body_bytes=1024)) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            response = await http.request("DELETE", "/api/v1/devices/x/data", content=b"x" * 4096)
    assert response.status_code == 413
    assert response.json()["error"]


def test_serve_starts_both_ports_and_exits_0_on_sigterm(tmp_path) -> None:
    """The README's server command on embedded defaults, then SIGTERM: exit 0 within the grace period."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {**os.environ, "WS_PORT": str(ports[0]), "HTTP_PORT": str(ports[1]), "SERVER_HOST": "127.0.0.1",
           "DATA_DIR": str(tmp_path / "data"), "ASR_MODEL_SIZE": "base", "SHUTDOWN_GRACE_S": "3"}
    for key in [k for k in env if k.startswith(("MYSQL_", "REDIS_", "MINIO_", "LLM_", "TTS_"))]:
        del env[key]
    proc = subprocess.Popen([sys.executable, "-m", "voicegrow", "--env-file", "/nonexistent", "serve"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{ports[1]}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", ports[0]), timeout=5):
            pass  # the WebSocket port accepts connections too
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=3 + 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert '"message": "stopped"' in output
