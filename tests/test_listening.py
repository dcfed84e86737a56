"""Listening modes (LISTEN_MODE): a speaker in a living room answers the person who speaks to it.

The gate's rules are tested on their own (sans-IO); ten minutes of television go through the real
session core (VAD included) faster than real time; the wake → question → follow-up conversation runs
end to end through both protocols that have a wake signal (open-xiaoai's ``kws``, native
``listen_start``) with real Whisper and the fake LLM/TTS.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from bench.acoustics import db_to_gain, television
from bench.xiaoai_emulator import run_emulator
from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.audio import read_wav
from voicegrow.client import open_native_client
from voicegrow.metrics import Metrics
from voicegrow.protocol import native as wire
from voicegrow.settings import ConfigError
from voicegrow.listening import ListenGate, ListenMode, ListenModeError, parse_listen_mode_devices, resolve_listen_mode
from voicegrow.sessions.registry import SessionInfo
from voicegrow.streaming.voice import VoiceSession
from voicegrow.textmetrics import char_error_rate

SHORT_REPLIES = FakeAiConfig(ttft_ms=100, tokens_per_s=80, tts_ms_per_char=10)


def _clip(audio_fixtures: Path, clip_id: str) -> np.ndarray:
    samples, rate = read_wav(audio_fixtures / f"{clip_id}.wav")
    assert rate == 16000
    return samples


def to_pcm(samples: np.ndarray) -> bytes:
    return np.clip(np.round(np.asarray(samples, dtype=np.float64)), -32768, 32767).astype("<i2").tobytes()


def _tv(audio_fixtures: Path, manifest: list[dict], seconds: float, dbfs: float = -30.0) -> bytes:
    """The television (every fixture voice, one sentence after another) 10 dB under the user's -20 dBFS."""
    clips = [_clip(audio_fixtures, e["id"]) for e in manifest]
    n = int(seconds * 16000)
    hiss = np.random.default_rng(8).standard_normal(n) * db_to_gain(-60.0)  # the room's own noise
    return to_pcm((television(n, np.random.default_rng(7), clips) * db_to_gain(dbfs) + hiss) * 32768)


# -- the gate's rules -----------------------------------------------------------------------------------


def test_wake_mode_hears_only_speech_around_a_wake_signal_and_follow_ups() -> None:
    gate = ListenGate(ListenMode.WAKE, follow_up_s=8.0, wake_preroll_s=1.5)
    assert gate.admit(1.0, 3.0) is None  # no wake signal: the TV
    assert not gate.may_be_heard(4.0) and not gate.allows_barge_in
    gate.wake(10.0)
    assert gate.may_be_heard(9.0)
    assert gate.admit(9.2, 12.0) == pytest.approx(8.5)  # began with the wake word: kept from the pre-roll
    assert gate.admit(13.0, 15.0) is None  # the window was used up by the question
    gate.reply_ended(20.0)
    assert gate.admit(19.0, 21.0) is None  # began while the reply played: its echo, not an answer
    gate.reply_ended(20.0)
    assert gate.admit(25.0, 27.0) == 0.0  # a follow-up within FOLLOW_UP_S, no wake word
    gate.reply_ended(30.0)
    assert gate.admit(38.5, 40.0) is None  # too late: asleep again
    gate.wake(50.0)
    assert gate.admit(58.5, 60.0) is None  # nobody spoke within FOLLOW_UP_S of the wake word
    assert gate.ignored == 5


def test_a_wake_during_the_reply_is_not_undone_by_the_reply_ending() -> None:
    gate = ListenGate(ListenMode.WAKE, follow_up_s=8.0, wake_preroll_s=1.5)
    gate.wake(10.0)  # interrupts the reply
    gate.reply_ended(10.2)  # the interrupted turn winds down
    assert gate.admit(9.9, 13.0) == pytest.approx(8.5)


def test_push_to_talk_hears_what_is_said_while_the_button_is_held() -> None:
    gate = ListenGate(ListenMode.PUSH_TO_TALK, follow_up_s=8.0, wake_preroll_s=0.3)
    assert gate.admit(0.0, 2.0) is None
    gate.wake(5.0)
    gate.release(9.0)
    assert gate.admit(9.5, 10.0) is None  # began after the release
    gate.wake(20.0)
    assert gate.admit(20.1, 35.0) == pytest.approx(19.7)  # held for long: no window end while pressed
    gate.reply_ended(40.0)
    assert gate.admit(41.0, 42.0) is None  # no follow-ups without the button


def test_always_mode_hears_everything() -> None:
    gate = ListenGate(ListenMode.ALWAYS, follow_up_s=8.0, wake_preroll_s=1.5)
    assert gate.admit(1.0, 3.0) == 0.0 and gate.allows_barge_in and gate.listening(0.0)


def test_the_mode_comes_from_the_device_map_then_the_hello_then_the_setting_then_the_kind() -> None:
    def mode(setting: str = "auto", devices: str = "", protocol: str = "xiaoai", requested=None) -> ListenMode:
        return resolve_listen_mode(setting=setting, devices=devices, protocol=protocol, device_id="d1",
                                   requested=requested)

    assert mode() is ListenMode.WAKE  # open-xiaoai speakers sit in living rooms
    assert mode(protocol="native") is ListenMode.ALWAYS and mode(protocol="xiaozhi") is ListenMode.ALWAYS
    assert mode(setting="push_to_talk") is ListenMode.PUSH_TO_TALK
    assert mode(setting="always", requested=ListenMode.WAKE) is ListenMode.WAKE
    assert mode(devices="d2=wake, d1=always", requested=ListenMode.WAKE) is ListenMode.ALWAYS
    assert parse_listen_mode_devices("") == {}
    with pytest.raises(ListenModeError):
        parse_listen_mode_devices("d1=sometimes")


def test_bad_listen_settings_name_the_variable(tmp_path) -> None:
    with pytest.raises(ConfigError, match="LISTEN_MODE="):
        make_settings(tmp_path, listen_mode="sometimes")
    with pytest.raises(ConfigError, match="LISTEN_MODE_DEVICES=.*expected device_id=mode"):
        make_settings(tmp_path, listen_mode_devices="xiaoai-1")
    with pytest.raises(ConfigError, match="FOLLOW_UP_S="):
        make_settings(tmp_path, follow_up_s="-1")


# -- ten minutes of television through the session core ---------------------------------------------------


class _Link:
    protocol = "test"
    output_rate = 24000
    chunk_ms = 40

    async def send_event(self, event) -> None: ...

    async def send_audio(self, pcm, turn_id) -> None: ...

    async def interrupt(self, turn_id) -> None: ...


async def _turns_started(tmp_path: Path, mode: ListenMode, pcm: bytes, wake_at_s: float | None = None,
                         vad_engine: str = "webrtc_floor", **settings: object) -> tuple[list, VoiceSession]:
    """Feed ``pcm`` to a session core in 90 ms chunks as fast as it takes them; return the utterances
    that would have started turns (the turn itself is not run)."""
    # BARGE_IN=vad: no echo canceller (its noise suppression) in front: the gate and the VAD alone.
    settings.setdefault("barge_in", "vad")
    services = types.SimpleNamespace(settings=make_settings(tmp_path, asr_speculative="false", vad_engine=vad_engine,
                                                            **settings),
                                     metrics=Metrics(), timers=None)
    session = VoiceSession(services, _Link(), SessionInfo("s1", "127.0.0.1:1", device_id="living-room"),
                           listen_mode=mode)
    started: list = []

    async def start_turn(utterance, transcribe, announcement=None) -> None:
        started.append(utterance)

    session._start_turn = start_turn  # type: ignore[method-assign]
    chunk = 2880
    async with trio.open_nursery() as nursery:
        await nursery.start(session.run)
        for offset in range(0, len(pcm), chunk):
            if wake_at_s is not None and offset >= wake_at_s * 32000:
                await session.wake()
                wake_at_s = None
            await session.feed_audio(pcm[offset: offset + chunk])
        nursery.cancel_scope.cancel()
    return started, session


async def test_ten_minutes_of_television_start_no_turn_in_wake_mode(tmp_path, audio_fixtures, manifest) -> None:
    # As loud as the user, and webrtcvad alone: every sentence of it is speech to the segmenter.
    tv = _tv(audio_fixtures, manifest, 600.0, dbfs=-20.0) + bytes(32000)
    heard, _ = await _turns_started(tmp_path, ListenMode.ALWAYS, tv, vad_engine="webrtc")
    started, session = await _turns_started(tmp_path, ListenMode.WAKE, tv, vad_engine="webrtc")
    assert len(heard) >= 100  # the VAD hears the television as speech: in always mode, a turn each time
    assert started == []
    assert session.gate.ignored == len(heard)
    assert session.services.metrics.utterances_ignored.labels("wake")._value.get() == len(heard)


async def test_a_wake_signal_lets_the_question_after_it_through_with_its_first_words(
        tmp_path, audio_fixtures, manifest) -> None:
    question = to_pcm(_clip(audio_fixtures, "en-03"))
    pcm = _tv(audio_fixtures, manifest, 30.0) + bytes(32000) + question + bytes(32000)
    wake_at = (len(pcm) - len(question) - 32000) / 32000 + 0.2  # the signal arrives as the user speaks
    started, _ = await _turns_started(tmp_path, ListenMode.WAKE, pcm, wake_at_s=wake_at)
    (utterance,) = started
    # The question's first sound is kept (pre-roll: it began before the signal), the television not.
    first_sound = 2 * int(np.argmax(np.abs(np.frombuffer(question, "<i2")) > 1000))
    assert question[first_sound: first_sound + 3200] in utterance.audio
    assert len(utterance.audio) <= len(question) + 32000


async def test_in_always_mode_a_television_far_under_the_user_starts_no_turn_once_the_user_was_heard(
        tmp_path, audio_fixtures, manifest) -> None:
    question = to_pcm(_clip(audio_fixtures, "zh-01"))  # the user, at the fixture's -17.5 dBFS
    pcm = question + bytes(32000) + _tv(audio_fixtures, manifest, 60.0, dbfs=-40.0) + bytes(32000)
    started, session = await _turns_started(tmp_path, ListenMode.ALWAYS, pcm)
    # The user's question, and at most the first sentence of the television: before the room's noise
    # is learnt (a few seconds) a quiet room has no background to tell apart.
    assert 1 <= len(started) <= 2 and len(started[0].audio) >= len(question) // 2
    assert session.services.metrics.utterances_ignored.labels("background")._value.get() >= 5
    everything, _ = await _turns_started(tmp_path, ListenMode.ALWAYS, pcm, vad_relative_db="0")
    assert len(everything) >= 6  # without VAD_RELATIVE_DB the television is answered


# -- end to end: both protocols ---------------------------------------------------------------------------


async def _wait_for(predicate, *, timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def _chat_requests(ai) -> list[list[dict]]:
    return [r["body"]["messages"] for r in ai.requests if r["path"].endswith("/chat/completions")]


def _state(server) -> str:
    (session,) = list(server.services.registry)
    return session.public()["state"]


@pytest.mark.slow
async def test_an_open_xiaoai_speaker_answers_after_kws_and_a_follow_up_without_it(
        tmp_path, audio_fixtures, manifest) -> None:
    tv = _tv(audio_fixtures, manifest, 12.0) + bytes(32000)
    question, follow_up = (to_pcm(_clip(audio_fixtures, i)) for i in ("zh-00", "zh-02"))
    async with run_fake_ai(SHORT_REPLIES) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url, asr_preload="true",
                                 listen_mode="auto", follow_up_s="8", max_audio_rate="100")
        async with running_server(settings) as server:
            with trio.fail_after(120):
                await server.services.asr.warm_up()
            metrics = server.services.metrics
            async with run_emulator(server.ws_url) as emu:
                await emu.wait_for_request("start_recording")
                await emu.wait_for_request("start_play")
                await _wait_for(lambda: len(list(server.services.registry)) == 1)
                (session,) = list(server.services.registry)
                assert session.listen_mode == "wake"  # LISTEN_MODE=auto: the default of a speaker
                await emu.stream_pcm(tv, realtime=False)
                await _wait_for(lambda: metrics.utterances_ignored.labels("wake")._value.get() >= 1)
                await _wait_for(lambda: _state(server) == "waiting_for_wake")  # the TV's last sentence ended
                assert session.turns == 0
                await emu.send_kws("小爱同学")
                await emu.stream_pcm(question, realtime=False)
                await _wait_for(lambda: metrics.turns.labels("completed")._value.get() == 1)
                await _wait_for(lambda: _state(server) == "listening")  # the reply is over: follow-up window
                await emu.stream_pcm(follow_up, realtime=False)
                await _wait_for(lambda: metrics.turns.labels("completed")._value.get() == 2)
                assert session.turns == 2
    first, second = (m[-1]["content"] for m in _chat_requests(ai))
    assert char_error_rate("今天天气怎么样？", first, "zh") <= 0.25, first
    assert char_error_rate("请把音量调小一点。", second, "zh") <= 0.25, second


@pytest.mark.slow
async def test_a_native_device_in_wake_mode_answers_after_listen_start_and_a_follow_up(
        tmp_path, audio_fixtures, manifest) -> None:
    tv = _tv(audio_fixtures, manifest, 12.0) + bytes(32000)
    question, follow_up = (to_pcm(_clip(audio_fixtures, i)) for i in ("en-00", "en-02"))
    heard: list[str] = []
    async with run_fake_ai(SHORT_REPLIES) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url, asr_preload="true",
                                 listen_mode="always", max_audio_rate="50")
        async with running_server(settings) as server:
            with trio.fail_after(120):
                await server.services.asr.warm_up()
            metrics = server.services.metrics
            async with open_native_client(server.ws_url, device_id="living-room",
                                          capabilities={"listen_mode": "wake"}) as client:
                assert client.hello_ack.capabilities["listen_mode"] == "wake"  # the hello's choice wins

                async def send(pcm: bytes, speed: float = 30.0) -> None:
                    for offset in range(0, len(pcm), 2880):  # 90 ms frames, within MAX_AUDIO_RATE
                        await client.send_audio(pcm[offset: offset + 2880])
                        await trio.sleep(0.09 / speed)

                async def receive() -> None:
                    while True:
                        frame = await client.next_frame()
                        if isinstance(frame, wire.Control) and frame.event == "asr_final":
                            heard.append(frame.data["text"])

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(receive)
                    await send(tv)
                    await _wait_for(lambda: metrics.utterances_ignored.labels("wake")._value.get() >= 1)
                    assert server.services.metrics.turns.labels("completed")._value.get() == 0
                    await client.send_control("listen_start", {})
                    await send(question + bytes(32000))
                    await _wait_for(lambda: metrics.turns.labels("completed")._value.get() == 1)
                    await _wait_for(lambda: _state(server) == "listening")
                    await send(follow_up + bytes(32000))
                    await _wait_for(lambda: metrics.turns.labels("completed")._value.get() == 2)
                    nursery.cancel_scope.cancel()
    assert len(heard) == 2
    assert char_error_rate("What is the weather like today?", heard[0], "en") <= 0.25, heard
