"""An operator's listening mode for one device (``/api/v1/devices/<id>/listen-mode``), through a running
server: stored with the device, applied to its live session at once and to its next sessions, given back
to the settings by DELETE, refused with a reason on bad input, behind the admin credential."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from bench.xiaoai_emulator import run_emulator
from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.audio import read_wav
from voicegrow.client import open_native_client
from voicegrow.listening import ListenMode, resolve_listen_mode
from voicegrow.storage.errors import BackendUnavailable
from voicegrow.streaming.voice import listen_mode_override
from voicegrow.textmetrics import char_error_rate

TOKEN = "listen-mode-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(tmp_path: Path, **overrides: Any) -> Any:
    # No address skips the token here: every admin call below must carry it, as from another host.
    return make_settings(tmp_path, admin_token=TOKEN, admin_allow_from="none", **overrides)


async def _wait_for(predicate, *, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def _live_modes(http: httpx.AsyncClient, device_id: str) -> list[str]:
    sessions = (await http.get("/api/v1/sessions", headers=AUTH)).json()["sessions"]
    return [s["listen_mode"] for s in sessions if s["device_id"] == device_id]


async def test_a_device_listen_mode_is_stored_applied_live_and_to_its_next_sessions(tmp_path) -> None:
    settings = _settings(tmp_path)
    async with running_server(settings) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            url = "/api/v1/devices/kitchen/listen-mode"
            unknown = await http.put(url, json={"mode": "wake"}, headers=AUTH)
            assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"

            async with open_native_client(server.ws_url, device_id="kitchen",
                                          capabilities={"listen_mode": "always"}) as client:
                assert client.hello_ack.capabilities["listen_mode"] == "always"
                await _wait_for(lambda: any(s.device_id == "kitchen" and s.set_listen_mode is not None
                                            for s in server.services.registry))
                await server.services.persistence.wait_records_delivered()  # the device row exists

                refused = await http.put(url, json={"mode": "wake"})  # no credential
                assert refused.status_code == 401 and refused.json()["error"]
                for body, code in ((b"not json", "invalid_json"), (b"[1, 2]", "invalid_json"),
                                   (b'{"mode": "loud"}', "invalid_mode"), (b'{"mode": 3}', "invalid_mode"),
                                   (b'{}', "invalid_mode"), (b'{"mode": "wake", "x": 1}', "invalid_json")):
                    bad = await http.put(url, content=body, headers={**AUTH, "Content-Type": "application/json"})
                    assert bad.status_code == 400, body
                    assert bad.json()["error"] == code and bad.json()["reason"], body
                assert await _live_modes(http, "kitchen") == ["always"]  # nothing changed by bad input

                done = await http.put(url, json={"mode": "wake"}, headers=AUTH)
                assert done.status_code == 200, done.text
                assert done.json()["override"] == "wake"
                assert [a["listen_mode"] for a in done.json()["applied_to"]] == ["wake"]
                assert await _live_modes(http, "kitchen") == ["wake"]  # the live session, at once
                shown = (await http.get(url, headers=AUTH)).json()
                assert shown["override"] == "wake" and [s["listen_mode"] for s in shown["sessions"]] == ["wake"]

            # The next session of the device: the override wins over its hello's own choice.
            async with open_native_client(server.ws_url, device_id="kitchen",
                                          capabilities={"listen_mode": "always"}) as client:
                assert client.hello_ack.capabilities["listen_mode"] == "wake"
                await _wait_for(lambda: any(s.device_id == "kitchen" and s.set_listen_mode is not None
                                            for s in server.services.registry))
                assert await _live_modes(http, "kitchen") == ["wake"]

                cleared = await http.delete(url, headers=AUTH)
                assert cleared.status_code == 200 and cleared.json()["override"] is None
                assert await _live_modes(http, "kitchen") == ["always"]  # back to what the hello asked for
                again = await http.delete(url, headers=AUTH)
                assert again.status_code == 404 and again.json()["reason"]

            assert (await http.put(url, json={"mode": "push_to_talk"}, headers=AUTH)).status_code == 200

    # Stored with the device's record: a restarted server still has it.
    async with running_server(settings) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            shown = (await http.get("/api/v1/devices/kitchen/listen-mode", headers=AUTH)).json()
            assert shown == {"device_id": "kitchen", "override": "push_to_talk", "sessions": []}
            devices = (await http.get("/api/v1/devices", headers=AUTH)).json()["devices"]
            assert [(d["device_id"], d["listen_mode"]) for d in devices] == [("kitchen", "push_to_talk")]


def test_the_operator_override_wins_over_the_device_map_and_the_hello() -> None:
    chosen = resolve_listen_mode(setting="always", devices="kitchen=always", protocol="native", device_id="kitchen",
                                 requested=ListenMode.ALWAYS, override=ListenMode.PUSH_TO_TALK)
    assert chosen is ListenMode.PUSH_TO_TALK
    assert resolve_listen_mode(setting="always", devices="kitchen=wake", protocol="native", device_id="kitchen",
                               override=None) is ListenMode.WAKE


class _Persistence:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def listen_mode(self, device_id: str) -> str | None:
        if isinstance(self.answer, Exception):
            raise self.answer
        if self.answer == "hang":
            await trio.sleep_forever()
        return self.answer


class _Services:
    def __init__(self, answer: Any) -> None:
        self.persistence = _Persistence(answer)


@pytest.mark.parametrize("answer, expected", [
    ("wake", ListenMode.WAKE), (None, None), ("bogus", None),
    (BackendUnavailable("mysql down"), None), ("hang", None)])
async def test_a_record_store_that_cannot_answer_leaves_the_mode_to_the_settings(answer, expected) -> None:
    with trio.fail_after(5):
        assert await listen_mode_override(_Services(answer), "kitchen") is expected  # type: ignore[arg-type]


SHORT_REPLIES = FakeAiConfig(ttft_ms=100, tokens_per_s=80, tts_ms_per_char=10)


@pytest.mark.slow
async def test_a_speaker_set_to_always_answers_a_question_without_its_wake_word(tmp_path, audio_fixtures) -> None:
    samples, rate = read_wav(audio_fixtures / "zh-00.wav")
    question = np.asarray(samples, dtype="<i2").tobytes() + bytes(32000)
    async with run_fake_ai(SHORT_REPLIES) as ai:
        settings = _settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url, asr_preload="true",
                             listen_mode="auto", max_audio_rate="100")
        async with running_server(settings) as server, \
                httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            with trio.fail_after(120):
                await server.services.asr.warm_up()
            metrics = server.services.metrics
            async with run_emulator(server.ws_url) as emu:
                await emu.wait_for_request("start_play")
                await _wait_for(lambda: any(s.set_listen_mode is not None for s in server.services.registry))
                (session,) = list(server.services.registry)
                assert session.listen_mode == "wake"  # an open-xiaoai speaker's default
                await emu.stream_pcm(question, realtime=False)
                await _wait_for(lambda: metrics.utterances_ignored.labels("wake")._value.get() >= 1)
                assert session.turns == 0

                await server.services.persistence.wait_records_delivered()
                url = f"/api/v1/devices/{session.device_id}/listen-mode"
                assert (await http.put(url, json={"mode": "always"}, headers=AUTH)).status_code == 200
                assert session.listen_mode == "always"
                await emu.stream_pcm(question, realtime=False)  # no kws this time
                await _wait_for(lambda: metrics.turns.labels("completed")._value.get() == 1, timeout=60)
    (heard,) = [r["body"]["messages"][-1]["content"] for r in ai.requests if r["path"].endswith("/chat/completions")]
    assert char_error_rate("今天天气怎么样？", heard, "zh") <= 0.25, heard
