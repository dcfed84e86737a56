"""``POST /xiaozhi/ota/``: a stock board finds the speaker port from one URL (docs/xiaozhi.md)."""

from __future__ import annotations

import time

import httpx
import pytest

from bench.xiaozhi_emulator import DEFAULT_DEVICE_ID, run_xiaozhi_emulator
from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.settings import ConfigError, load_settings
from voicegrow.http.xiaozhi_ota import ota_answer, public_ws_url

#: What ``Board::GetSystemInfoJson`` sends (abridged) and the headers ``Ota::SetupHttp`` sets.
SYSTEM_INFO = {"version": 2, "flash_size": 16777216, "mac_address": DEFAULT_DEVICE_ID, "uuid": "c-1",
               "chip_model_name": "esp32s3", "application": {"name": "xiaozhi", "version": "1.9.2"},
               "board": {"type": "bread-compact-wifi"}}
BOARD_HEADERS = {"Activation-Version": "1", "Device-Id": DEFAULT_DEVICE_ID, "Client-Id": "c-1",
                 "User-Agent": "bread-compact-wifi/1.9.2", "Accept-Language": "zh-CN",
                 "Content-Type": "application/json"}


async def test_the_answer_points_the_board_at_the_speaker_port_and_the_board_connects(tmp_path) -> None:
    settings = make_settings(tmp_path, admin_token="admin-s3cret", xiaozhi_token="board-t0ken")
    async with running_server(settings) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        before = time.time()
        response = await http.post("/xiaozhi/ota/", json=SYSTEM_INFO, headers=BOARD_HEADERS)
        assert response.status_code == 200, response.text  # public: the board has no admin token
        answer = response.json()
        assert answer["websocket"] == {"url": f"ws://127.0.0.1:{server.ws_port}/xiaozhi/v1/", "token": "board-t0ken"}
        assert before * 1000 <= answer["server_time"]["timestamp"] <= time.time() * 1000
        assert isinstance(answer["server_time"]["timezone_offset"], int)
        assert answer["firmware"] == {"version": "1.9.2", "url": ""}  # up to date: nothing to download
        assert "activation" not in answer and "mqtt" not in answer
        # Without a body the firmware uses GET; the URL may lack the slash.
        assert (await http.get("/xiaozhi/ota", headers={"Device-Id": DEFAULT_DEVICE_ID})).status_code == 200
        # The board stores websocket.url and websocket.token and connects with them.
        async with run_xiaozhi_emulator(answer["websocket"]["url"], token=answer["websocket"]["token"],
                                        mcp=False) as board:
            assert board.session_id
        # The rest of the API still wants the admin token.
        assert (await http.get("/api/v1/sessions")).status_code == 401


async def test_bad_requests_and_the_allowlist_get_json_reasons(tmp_path) -> None:
    settings = make_settings(tmp_path, xiaozhi_allowlist=DEFAULT_DEVICE_ID)
    async with running_server(settings) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        missing = await http.post("/xiaozhi/ota/", json=SYSTEM_INFO)
        assert missing.status_code == 400 and missing.json()["error"] == "device_id_required"
        stranger = await http.post("/xiaozhi/ota/", json=SYSTEM_INFO, headers={"Device-Id": "a0:00:00:00:00:09"})
        assert stranger.status_code == 403 and stranger.json()["error"] == "not_allowlisted"
        garbage = await http.post("/xiaozhi/ota/", content=b"{not json", headers=BOARD_HEADERS)
        assert garbage.status_code == 400 and garbage.json()["error"] == "invalid_json"
        listed = await http.post("/xiaozhi/ota/", json=SYSTEM_INFO, headers=BOARD_HEADERS)
        assert listed.status_code == 200 and listed.json()["websocket"]["token"] == ""


def test_firmware_is_offered_only_when_configured() -> None:
    offered = load_settings({"XIAOZHI_FIRMWARE_VERSION": "2.0.0",
                             "XIAOZHI_FIRMWARE_URL": "https://fw.example/xiaozhi-2.0.0.bin"}, env_file=None)
    assert ota_answer(offered, ws_url="ws://h:4399/xiaozhi/v1/", device_version="1.9.2", now=0)["firmware"] == {
        "version": "2.0.0", "url": "https://fw.example/xiaozhi-2.0.0.bin"}
    plain = load_settings({}, env_file=None)
    assert "firmware" not in ota_answer(plain, ws_url="ws://h/", device_version=None, now=0)
    for env in ({"XIAOZHI_FIRMWARE_VERSION": "2.0.0"}, {"XIAOZHI_FIRMWARE_URL": "https://x/fw.bin"},
                {"XIAOZHI_FIRMWARE_VERSION": "2", "XIAOZHI_FIRMWARE_URL": "ftp://x"},
                {"XIAOZHI_WS_URL": "http://host:4399/xiaozhi/v1/"}):
        with pytest.raises(ConfigError, match="XIAOZHI_"):
            load_settings(env, env_file=None)


def test_the_websocket_url_follows_the_host_the_board_used() -> None:
    plain = load_settings({}, env_file=None)
    assert public_ws_url(plain, "192.168.1.5:8000", 4399, False) == "ws://192.168.1.5:4399/xiaozhi/v1/"
    assert public_ws_url(plain, "[fd00::5]:8000", 4399, True) == "wss://[fd00::5]:4399/xiaozhi/v1/"
    fixed = load_settings({"XIAOZHI_WS_URL": "wss://voice.example/xiaozhi/v1/"}, env_file=None)
    assert public_ws_url(fixed, "192.168.1.5:8000", 4399, False) == "wss://voice.example/xiaozhi/v1/"
