"""The talk page and the console in a real browser (headless Debian Chromium through Selenium).

One server for the module (real VAD and Whisper, the fake LLM/TTS of ``bench``), no ADMIN_TOKEN. The
browser's fake microphone says a fixture question; the talk page must show what was heard, the reply
and its timings, and play the reply; the console must list the session while it is live and the turn
afterwards, and play the turn's audio. The turn must be stored like any device's.
Screenshots: tests/output/browser-*.png.
"""

from __future__ import annotations

import io
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.browser_support import (ServerThread, chromium, padded_clip, require_chromium, screenshot,
                                   wait_for)

pytestmark = pytest.mark.slow

DEVICE = "browser-test-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    require_chromium()
    with ServerThread(tmp_path_factory.mktemp("browser-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def question(tmp_path_factory: pytest.TempPathFactory, audio_fixtures: Path, manifest: list[dict]) -> tuple[Path, str]:
    entry = next(e for e in manifest if e["id"] == "en-00")
    return padded_clip(audio_fixtures / entry["file"], tmp_path_factory.mktemp("clip") / "question.wav"), entry["text"]


def _similarity(wav: bytes, clip: Path) -> float:
    """Peak normalised cross-correlation of a recording with the clip's speech (1: the same samples)."""
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getframerate() == 16000
        got = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    with wave.open(str(clip)) as w:
        ref = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    ref = ref[np.flatnonzero(ref)[0]:np.flatnonzero(ref)[-1] + 1]  # the speech, without the padding
    short, long_ = (got, ref) if len(got) <= len(ref) else (ref, got)
    corr = np.correlate(long_, short, "valid")
    at = int(np.argmax(np.abs(corr)))
    return float(abs(corr[at]) / (np.linalg.norm(short) * np.linalg.norm(long_[at:at + len(short)]) + 1e-9))


def _text(driver, css: str) -> str:
    return " ".join(e.text for e in driver.find_elements("css selector", css))


def _start_talking(driver, url: str, device: str) -> None:
    driver.get(f"{url}/talk")
    button = wait_for(lambda: driver.find_element("id", "talk"), 10, "the talk button", driver)
    wait_for(lambda: button.is_enabled(), 10, "the talk button enabled", driver)
    field = driver.find_element("id", "device-id")
    field.clear()
    field.send_keys(device)
    button.click()


def test_talk_page_answers_and_console_shows_the_session_and_the_turn(server, question) -> None:
    clip, said = question
    with chromium(clip) as driver:
        _start_talking(driver, server.url, DEVICE)
        talk_tab = driver.current_window_handle
        button = driver.find_element("id", "talk")
        assert button.accessible_name == "Talk"
        assert button.get_attribute("aria-pressed") == "true"
        assert driver.find_element("id", "log").aria_role == "log"

        # The console, in a second tab, lists the session while it is live.
        driver.switch_to.new_window("tab")
        driver.get(f"{server.url}/")
        row = wait_for(lambda: driver.find_element("css selector", f'#sessions tr[data-session-id] td'), 15,
                       "a live session row", driver)
        assert row
        live = wait_for(lambda: DEVICE in _text(driver, "#sessions tbody") and _text(driver, "#sessions tbody"),
                        15, "the talk page's session in the console", driver)
        assert "native" in live
        screenshot(driver, "browser-console-live")

        # Back on the talk page: the transcript, the streamed reply, its timings, and audio played.
        driver.switch_to.window(talk_tab)
        heard = wait_for(lambda: _text(driver, "#log .entry.user .text"), 60, "the transcript", driver)
        assert "weather" in heard.lower(), (heard, said)
        reply = wait_for(lambda: "fake assistant" in _text(driver, "#log .entry.assistant .text")
                         and _text(driver, "#log .entry.assistant .text"), 30, "the reply text", driver)
        assert "weather" in reply.lower()
        timings = wait_for(lambda: driver.find_element("css selector", "#log .entry.timings").get_attribute(
            "data-timings"), 30, "the turn's timings", driver)
        assert '"first_audio_sent"' in timings
        played = wait_for(lambda: int(driver.find_element("id", "meter").get_attribute("data-played-ms")) > 1000
                          and driver.find_element("id", "meter").get_attribute("data-played-ms"),
                          30, "reply audio played", driver)
        assert int(played) > 1000
        screenshot(driver, "browser-talk")
        button.click()  # hang up
        wait_for(lambda: button.get_attribute("aria-pressed") == "false", 5, "the call ended", driver)

        # The turn is stored and listed like any device's.
        turns = wait_for(lambda: httpx.get(f"{server.url}/api/v1/conversations",
                                           params={"device_id": DEVICE}).json()["turns"], 15, "the stored turn")
        turn = turns[0]
        assert "weather" in turn["transcript"].lower() and turn["outcome"] == "completed"
        assert turn["audio_in_url"] and turn["audio_out_url"]
        # What the page captured (the browser's rate, resampled to 16 kHz in the worklet) is the clip.
        recorded = httpx.get(f"{server.url}{turn['audio_in_url']}").content
        assert _similarity(recorded, clip) > 0.6
        devices = httpx.get(f"{server.url}/api/v1/devices").json()["devices"]
        assert DEVICE in [d["device_id"] for d in devices]
        found = httpx.get(f"{server.url}/api/v1/conversations", params={"q": "weather"}).json()["turns"]
        assert turn["turn_id"] in [t["turn_id"] for t in found]

        # The console lists the turn afterwards, and its reply audio plays.
        driver.switch_to.window(driver.window_handles[-1])
        node = wait_for(lambda: driver.find_element("css selector", f'#turns li[data-turn-id="{turn["turn_id"]}"]'),
                        15, "the turn in the console", driver)
        assert "weather" in node.text.lower()
        wait_for(lambda: DEVICE not in _text(driver, "#sessions tbody"), 10, "the session gone from the live list",
                 driver)
        play = node.find_elements("css selector", "button.play")[-1]
        play.click()
        audio = node.find_elements("css selector", "audio")[-1]
        wait_for(lambda: driver.execute_script("return arguments[0].currentTime", audio) > 0.3, 15,
                 "the console's audio element playing", driver)
        assert driver.execute_script("return arguments[0].src", audio).startswith("blob:")
        screenshot(driver, "browser-console-turn")
        assert "browser-test-1" in _text(driver, "#devices tbody")
        chart = driver.find_elements("css selector", "#latency svg polyline")
        assert len(chart) >= 4  # one line per stage from the server's timings


def test_console_search_and_delete_a_device(server) -> None:
    """Search the stored turns by text; delete the browser device's data from the console."""
    with chromium() as driver:
        driver.get(f"{server.url}/")
        wait_for(lambda: DEVICE in _text(driver, "#devices tbody"), 15, "the device listed", driver)
        box = driver.find_element("id", "q")
        box.send_keys("no such words anywhere")
        box.submit()
        wait_for(lambda: driver.find_element("id", "turns-empty").is_displayed(), 10, "an empty search", driver)
        box.clear()
        box.send_keys("weather")
        box.submit()
        wait_for(lambda: "weather" in _text(driver, "#turns").lower(), 10, "the search hit", driver)
        row = driver.find_element("css selector", f'#devices tr[data-device-id="{DEVICE}"]')
        row.find_element("css selector", "button.danger").click()
        driver.switch_to.alert.accept()
        wait_for(lambda: DEVICE not in _text(driver, "#devices tbody"), 15, "the device deleted", driver)
        screenshot(driver, "browser-console-deleted")
    assert httpx.get(f"{server.url}/api/v1/conversations", params={"device_id": DEVICE}).json()["turns"] == []


def test_pages_fit_a_phone_screen_in_chinese(server) -> None:
    with chromium() as driver:
        # A phone's viewport (Chromium's window has a minimum width; the emulated one has not).
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        for path, name in (("/talk", "talk"), ("/", "console")):
            driver.get(f"{server.url}{path}")
            switch = wait_for(lambda: driver.find_element("id", "lang"), 10, "the language button", driver)
            if driver.execute_script("return document.documentElement.lang") != "zh-CN":
                switch.click()
            wait_for(lambda: driver.execute_script("return document.documentElement.lang") == "zh-CN", 5,
                     "the Chinese UI", driver)
            if path == "/talk":
                assert driver.find_element("id", "talk").accessible_name == "对话"
            else:
                wait_for(lambda: driver.find_element("id", "console").is_displayed(), 10, "the console", driver)
                assert driver.find_element("id", "sessions-title").text == "在线会话"
                time.sleep(1.5)  # a poll or two drew the panels
            overflow = driver.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 0, f"{path} is {overflow} px wider than a phone screen"
            screenshot(driver, f"browser-phone-zh-{name}")


LONG_REPLY = ("Here is a long answer, so that there is time to interrupt it. " * 16).strip()


@pytest.fixture
def long_replies(server):
    server.fake_ai.reply = LONG_REPLY  # about 15 s of reply audio
    yield
    server.fake_ai.reply = None


def _stored(server, device: str) -> list[dict]:
    return httpx.get(f"{server.url}/api/v1/conversations", params={"device_id": device}).json()["turns"]


def test_stop_button_silences_the_reply(server, long_replies, audio_fixtures: Path, tmp_path: Path) -> None:
    device = "browser-stop"
    with chromium(padded_clip(audio_fixtures / "en-02.wav", tmp_path / "q.wav")) as driver:
        _start_talking(driver, server.url, device)
        stop = driver.find_element("id", "stop")
        meter = driver.find_element("id", "meter")
        wait_for(lambda: stop.is_enabled() and int(meter.get_attribute("data-played-ms")) > 300, 60,
                 "the reply playing", driver)
        stop.click()
        wait_for(lambda: "(interrupted)" in _text(driver, "#log .entry.assistant"), 10, "the reply marked", driver)
        wait_for(lambda: not stop.is_enabled(), 5, "nothing left to stop", driver)
        played = int(meter.get_attribute("data-played-ms"))
        time.sleep(1.0)
        assert int(meter.get_attribute("data-played-ms")) == played  # silent at once, nothing queued plays on
        assert played < 5000
        screenshot(driver, "browser-talk-stopped")
    turn = wait_for(lambda: _stored(server, device), 15, "the stored turn")[0]
    assert turn["outcome"] == "interrupted"


def test_talking_over_the_reply_interrupts_it(server, long_replies, audio_fixtures: Path, tmp_path: Path) -> None:
    """The microphone says the question over and over (a 15 s reply each time): a repetition that comes
    while a reply plays interrupts it, and the page silences it. Looping keeps this independent of how
    fast the machine transcribes: a repetition that comes before the reply started merely supersedes."""
    device = "browser-barge"
    clip = padded_clip(audio_fixtures / "en-00.wav", tmp_path / "q.wav", lead_s=0.5, tail_s=7.0)
    with chromium(clip, loop=True) as driver:
        _start_talking(driver, server.url, device)
        barged = wait_for(lambda: driver.find_elements("css selector", '#log .turn[data-stopped="barge_in"]'), 90,
                          "a reply interrupted by talking", driver)[0]
        number = int(barged.get_attribute("data-turn-id"))
        assert "(interrupted)" in barged.find_element("css selector", ".entry.assistant").text
        def heard_after() -> list[str]:  # turn ids may skip one superseded before it began
            return [turn.find_element("css selector", ".entry.user .text").text
                    for turn in driver.find_elements("css selector", "#log .turn")
                    if int(turn.get_attribute("data-turn-id")) > number]

        following = wait_for(lambda: [text for text in heard_after() if text], 60,
                             "the question that interrupted it, heard", driver)
        assert "weather" in following[0].lower()
        screenshot(driver, "browser-talk-barge-in")
        driver.find_element("id", "talk").click()
    outcomes = [t["outcome"] for t in wait_for(lambda: _stored(server, device), 30, "the turns stored")]
    assert "interrupted" in outcomes
