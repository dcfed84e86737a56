"""Preemptive replies (LLM_PREEMPTIVE): the LLM starts on the speculative transcript during the hangover,
the device hears nothing until the end of the turn is confirmed, and a user who goes on talking costs a
wasted call that is counted, never a reply over their words.

A stand-in ASR (no Whisper: it names the audio's length) keeps these tests quick; the VAD, the turn, the
fake LLM/TTS service and the native client are the real ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.audio import read_wav, rms_dbfs
from voicegrow.client import open_native_client, stream_wav_and_collect
from voicegrow.streaming.events import ReplyStopped, ReplyText, TranscriptFinal
from voicegrow.streaming.native import control_event
from voicegrow.streaming.turn import HeldLink


@dataclasses.dataclass
class _Heard:
    text: str
    language: str = "en"
    dropped: int = 0


class _LengthAsr:
    """Transcribes any audio as its length in 20 ms units: each utterance prefix reads differently."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def transcribe(self, audio: bytes, *, language: str | None = None) -> _Heard:
        self.calls.append(len(audio))
        await trio.sleep(0)
        return _Heard(f"audio of {len(audio) // 640} frames")

    async def warm_up(self) -> None:
        return None

    def health(self) -> dict[str, object]:
        return {"status": "ok"}


def _speech(audio_fixtures: Path, manifest: list[dict]) -> bytes:
    entry = next(e for e in manifest if e["id"] == "en-05")  # "Tell me a joke."
    samples, rate = read_wav(audio_fixtures / entry["file"])
    assert rate == 16000
    loud = [i for i in range(0, len(samples) - 160, 160) if rms_dbfs(samples[i:i + 160]) > -45]
    return samples[loud[0]:loud[-1] + 160].astype("<i2").tobytes()  # no silence of its own at either end


def _counter(server, outcome: str) -> float:
    return server.services.metrics.llm_preemptive.labels(outcome)._value.get()


async def _talk(tmp_path: Path, pcm: bytes, **overrides: object):
    asr = _LengthAsr()
    async with run_fake_ai(FakeAiConfig(ttft_ms=50, tokens_per_s=200, tts_ms_per_char=5)) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url, llm_tools="false",
                                 **overrides)
        async with running_server(settings) as server:
            server.services.asr = asr
            async with open_native_client(server.ws_url, device_id="preemptive") as client:
                result = await stream_wav_and_collect(client, bytes(9600) + pcm, speed=2.0, tail_silence_s=6, timeout_s=60)
            chats = [r for r in ai.requests if r["path"].endswith("/chat/completions")]
            return result, asr, chats, {o: _counter(server, o) for o in ("used", "wasted")}


async def test_the_reply_is_prepared_during_the_hangover_and_played_after_it(tmp_path, audio_fixtures, manifest):
    speech = _speech(audio_fixtures, manifest)
    result, asr, chats, counted = await _talk(tmp_path, speech)
    assert result.failure is None and not result.timed_out
    assert result.stop_reason == "done" and result.reply_audio_s > 0.2
    assert counted == {"used": 1, "wasted": 0}
    assert len(chats) == 1  # on the speculation's transcript: word gaps under 200 ms preempt nothing
    assert chats[0]["body"]["messages"][-1]["content"] == f"audio of {asr.calls[-1] // 640} frames"
    # "used": this reply was started before the end of the turn was confirmed, and then played
    timings = result.timings_ms
    assert timings["speech_end"] <= timings["llm_first_token"] <= timings["first_audio_sent"]


async def test_a_user_who_goes_on_talking_is_not_answered_until_done(tmp_path, audio_fixtures, manifest):
    speech = _speech(audio_fixtures, manifest)
    pause = bytes(2 * 16000 * 300 // 1000)  # 300 ms: shorter than the 500 ms hangover
    result, asr, chats, counted = await _talk(tmp_path, speech + pause + speech)
    assert result.failure is None and not result.timed_out and result.stop_reason == "done"
    finals = [e.data["text"] for e in result.events if e.event == "asr_final"]
    # One turn, on the whole utterance: the device never heard of the reply prepared at the pause.
    assert finals == [f"audio of {max(asr.calls) // 640} frames"]
    assert [e.event for e in result.events].count("tts_start") == 1
    assert len(asr.calls) >= 2 and max(asr.calls) > len(speech) + len(pause)
    assert counted["used"] == 1 and counted["wasted"] >= 1
    assert chats[-1]["body"]["messages"][-1]["content"] == finals[0]
    # a wasted call counts from the moment the turn asks; it may be cancelled before the request is out
    assert 1 <= len(chats) <= 1 + counted["wasted"]


async def test_off_means_the_llm_waits_for_the_end_of_the_turn(tmp_path, audio_fixtures, manifest):
    speech = _speech(audio_fixtures, manifest)
    pause = bytes(2 * 16000 * 300 // 1000)
    result, _asr, chats, counted = await _talk(tmp_path, speech + pause + speech, llm_preemptive="false")
    assert result.stop_reason == "done"
    assert counted == {"used": 0, "wasted": 0} and len(chats) == 1


class _Link:
    protocol, output_rate, chunk_ms = "test", 16000, 20

    def __init__(self) -> None:
        self.sent: list[object] = []

    async def send_event(self, event) -> None:
        self.sent.append(control_event(event)[0])  # its native name, for short
        await trio.sleep(0)

    async def send_audio(self, pcm, turn_id) -> None:
        self.sent.append(pcm)

    async def interrupt(self, turn_id) -> None:
        self.sent.append("interrupt")


async def test_a_held_link_sends_nothing_until_released_then_everything_in_order():
    inner = _Link()
    held = HeldLink(inner)
    await held.send_event(TranscriptFinal(1, "", ""))
    await held.interrupt(1)
    assert inner.sent == []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held.send_audio, b"\x00\x00", 1)
        await trio.sleep(0.01)
        assert inner.sent == []
        nursery.start_soon(held.send_event, ReplyText(1, ""))  # arrives while the release is sending
        await held.release()
    assert inner.sent == ["asr_final", "llm_text", b"\x00\x00"]
    await held.send_event(ReplyStopped(1))
    assert inner.sent[-1] == "tts_stop"


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_the_setting_is_validated(tmp_path, value):
    from voicegrow.settings import ConfigError

    with pytest.raises(ConfigError, match="LLM_PREEMPTIVE"):
        make_settings(tmp_path, llm_preemptive=value)
