"""The pages with ADMIN_TOKEN set, in a real browser: nothing before sign-in, the token on every call.

One server for the module (ADMIN_TOKEN set, DEVICE_AUTH=hmac). The talk page opens its session for the
signed-in operator (the token travels as a WebSocket subprotocol) or with a device credential (the
HMAC proof computed by the page); the console shows no data before sign-in, and afterwards every API
request it sends, the audio download included, carries ``Authorization: Bearer`` while no URL ever
contains the token. Screenshots: tests/output/auth-*.png.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from tests.browser_support import (ServerThread, chromium, network_requests, padded_clip, require_chromium,
                                   screenshot, wait_for)

pytestmark = pytest.mark.slow

TOKEN = "s3cret-operator-token"
DEVICE = "browser-auth-1"
TABLET, TABLET_SECRET = "kitchen-tablet", "tablet-secret-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    require_chromium()
    tmp = tmp_path_factory.mktemp("browser-auth")
    credentials = tmp / "devices.json"
    credentials.write_text(json.dumps({TABLET: TABLET_SECRET}), encoding="utf-8")
    with ServerThread(tmp, admin_token=TOKEN, device_auth="hmac", device_credentials_file=credentials) as srv:
        yield srv


def _api(server, path: str, **params: str) -> dict:
    response = httpx.get(f"{server.url}{path}", params=params, headers={"Authorization": f"Bearer {TOKEN}"})
    response.raise_for_status()
    return response.json()


def _sign_in(driver, token: str) -> None:
    form = wait_for(lambda: driver.find_element("id", "signin-form").is_displayed() and
                    driver.find_element("id", "signin-form"), 10, "the sign-in form", driver)
    form.find_element("name", "token").send_keys(token)
    form.submit()


def _device(driver, device: str, secret: str) -> None:
    for name, value in (("device-id", device), ("device-secret", secret)):
        field = driver.find_element("id", name)
        field.clear()
        field.send_keys(value)


def test_talk_page_with_a_device_credential(server, audio_fixtures: Path, tmp_path: Path) -> None:
    """Not signed in: the device id and secret typed in authenticate with the HMAC challenge."""
    clip = padded_clip(audio_fixtures / "en-03.wav", tmp_path / "question.wav")
    with chromium(clip) as driver:
        driver.get(f"{server.url}/talk")
        wait_for(lambda: driver.find_element("id", "signin").is_displayed(), 10, "the sign-in form", driver)
        button = driver.find_element("id", "talk")
        assert button.is_enabled() and driver.find_element("id", "secret-field").is_displayed()
        screenshot(driver, "auth-talk-before-signin")
        _device(driver, TABLET, "not-the-secret")
        button.click()
        status = wait_for(lambda: "Refused" in driver.find_element("id", "status").text
                          and driver.find_element("id", "status").text, 15, "the wrong secret refused", driver)
        assert "wrong HMAC" in status
        assert button.get_attribute("aria-pressed") == "false"
        _device(driver, TABLET, TABLET_SECRET)
        button.click()
        heard = wait_for(lambda: driver.find_element("css selector", "#log .entry.user .text").text, 60,
                         "the transcript", driver)
        assert "seven" in heard.lower() or "7" in heard
        wait_for(lambda: int(driver.find_element("id", "meter").get_attribute("data-played-ms")) > 500, 30,
                 "reply audio played", driver)
        screenshot(driver, "auth-talk-device")
        button.click()
    assert wait_for(lambda: _api(server, "/api/v1/conversations", device_id=TABLET)["turns"], 15, "the stored turn")


def test_talk_page_for_the_operator(server, audio_fixtures: Path, tmp_path: Path) -> None:
    clip = padded_clip(audio_fixtures / "en-01.wav", tmp_path / "question.wav")
    with chromium(clip) as driver:
        driver.get(f"{server.url}/talk")
        button = wait_for(lambda: driver.find_element("id", "talk"), 10, "the talk button", driver)
        _sign_in(driver, TOKEN)
        wait_for(lambda: not driver.find_element("id", "signin").is_displayed(), 10, "signed in", driver)
        assert not driver.find_element("id", "secret-field").is_displayed()  # the operator needs no device secret
        field = driver.find_element("id", "device-id")
        field.clear()
        field.send_keys(DEVICE)
        driver.get_log("performance")  # forget the requests so far
        button.click()
        heard = wait_for(lambda: driver.find_element("css selector", "#log .entry.user .text").text, 60,
                         "the transcript", driver)
        assert "rabbit" in heard.lower()
        wait_for(lambda: "fake assistant" in driver.find_element("css selector", "#log .entry.assistant").text,
                 30, "the reply", driver)
        wait_for(lambda: int(driver.find_element("id", "meter").get_attribute("data-played-ms")) > 500, 30,
                 "reply audio played", driver)
        screenshot(driver, "auth-talk")
        sockets = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        handshakes = [m["params"] for m in sockets if m["method"] == "Network.webSocketWillSendHandshakeRequest"]
        assert handshakes, "the talk page opened no WebSocket"
        for shake in handshakes:
            assert TOKEN not in shake["request"].get("url", "") and "token" not in shake["request"].get("url", "")
            offered = {k.lower(): v for k, v in shake["request"]["headers"].items()}["sec-websocket-protocol"]
            assert "voicegrow.bearer." + base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=") in offered
        button.click()
    turns = wait_for(lambda: _api(server, "/api/v1/conversations", device_id=DEVICE)["turns"], 15, "the stored turn")
    assert "rabbit" in turns[0]["transcript"].lower()


def test_console_shows_nothing_before_sign_in_and_sends_the_token_on_every_call(server) -> None:
    assert _api(server, "/api/v1/conversations", device_id=DEVICE)["turns"], "the talk test stores a turn first"
    with chromium() as driver:
        driver.get(f"{server.url}/")
        wait_for(lambda: driver.find_element("id", "signin").is_displayed(), 10, "the sign-in form", driver)
        assert not driver.find_element("id", "console").is_displayed()
        body = driver.find_element("tag name", "body").text
        assert DEVICE not in body and "rabbit" not in body.lower()
        before = [r for r in network_requests(driver) if r["url"] and "/api/" in r["url"]]
        assert {r["url"].split("/api/")[1] for r in before} <= {"v1/web/config", "v1/sessions"}
        screenshot(driver, "auth-console-before-signin")

        _sign_in(driver, "not-the-token")
        wait_for(lambda: driver.find_element("id", "signin-error").is_displayed(), 10, "the refusal", driver)
        assert not driver.find_element("id", "console").is_displayed()
        refused = [r for r in network_requests(driver) if r["url"] and "/api/v1/sessions" in r["url"]]
        assert refused and all(r["headers"].get("Authorization") == "Bearer not-the-token" for r in refused)
        _sign_in(driver, TOKEN)
        wait_for(lambda: driver.find_element("id", "console").is_displayed(), 10, "the console", driver)
        node = wait_for(lambda: driver.find_element("css selector", "#turns li.turn"), 15, "the turn listed", driver)
        node.find_elements("css selector", "button.play")[-1].click()
        audio = node.find_elements("css selector", "audio")[-1]
        wait_for(lambda: driver.execute_script("return arguments[0].currentTime", audio) > 0.2, 15,
                 "the reply audio playing", driver)
        driver.set_window_size(1280, 2200)
        screenshot(driver, "auth-console")

        requests = [r for r in network_requests(driver) if r["url"] and "/api/" in r["url"]]
        paths = {r["url"].split("/api/")[1].split("?")[0].split("/")[1] for r in requests}
        assert {"sessions", "devices", "conversations", "health", "audio"} <= paths, paths
        for r in requests:
            assert TOKEN not in r["url"]
            if r["url"].endswith("/api/v1/web/config"):
                continue
            assert r["headers"].get("Authorization") == f"Bearer {TOKEN}", r

        driver.refresh()  # the token stays for this tab (sessionStorage), not in a cookie or the URL
        wait_for(lambda: driver.find_element("id", "console").is_displayed(), 10, "the console after reload", driver)
        assert driver.get_cookies() == []
        assert driver.execute_script("return localStorage.getItem('voicegrow.admin_token')") is None
        driver.find_element("id", "signout").click()
        assert not driver.find_element("id", "console").is_displayed()
        assert DEVICE not in driver.find_element("tag name", "body").text
