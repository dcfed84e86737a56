"""The voice pipeline end to end: fixture clips through a real server on loopback.

Real VAD, real Whisper (``base`` from the offline packages), the fake LLM/TTS service of ``bench``,
and the native client a device would use.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from tests.conftest import make_settings
from voicegrow.app import ServerHandle, running_server
from voicegrow.audio import read_wav, rms_dbfs
from voicegrow.client import open_native_client, stream_wav_and_collect
from voicegrow.protocol import native as wire
from voicegrow.streaming.turn import TIMING_ORDER
from voicegrow.textmetrics import char_error_rate

pytestmark = pytest.mark.slow

CLIPS_PER_LANGUAGE = 4


def _clip(audio_fixtures: Path, entry: dict) -> bytes:
    samples, rate = read_wav(audio_fixtures / entry["file"])
    assert rate == 16000
    return samples.astype("<i2").tobytes()


@contextlib.asynccontextmanager
async def _server_with_fake_ai(tmp_path: Path, fake: FakeAiConfig | None = None,
                               **overrides: object) -> AsyncIterator[tuple[ServerHandle, object]]:
    # Short replies (15 ms of audio per character) keep real-time playback from dominating the run.
    async with run_fake_ai(fake or FakeAiConfig(ttft_ms=100, tokens_per_s=80, tts_ms_per_char=15)) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url, asr_preload="true",
                                 **overrides)
        async with running_server(settings) as server:
            with trio.fail_after(120):
                await server.services.asr.warm_up()
            yield server, ai


@pytest.mark.parametrize("lang", ["zh", "en"])
async def test_clips_are_transcribed_answered_and_spoken(tmp_path, audio_fixtures, manifest, lang) -> None:
    entries = [e for e in manifest if e["lang"] == lang][:CLIPS_PER_LANGUAGE]
    cers = []
    async with _server_with_fake_ai(tmp_path) as (server, ai):
        async with open_native_client(server.ws_url, device_id=f"e2e-{lang}",
                                      audio_out=wire.AudioFormat(24000)) as client:
            for entry in entries:
                result = await stream_wav_and_collect(client, _clip(audio_fixtures, entry), speed=2.0,
                                                      timeout_s=60)
                assert result.failure is None and not result.timed_out, entry["id"]
                cers.append(char_error_rate(entry["text"], result.transcript, lang))
                # The reply text came back, and its audio at the rate asked for in hello.
                assert result.reply.strip(), entry["id"]
                assert result.reply_sample_rate == 24000
                assert result.reply_audio_s > 0.5
                assert result.stop_reason == "done"
                # Timings: every stage present, in order.
                timings = result.timings_ms
                assert list(timings) == list(TIMING_ORDER), timings
                values = [timings[name] for name in TIMING_ORDER]
                assert values == sorted(values), timings
        heard = [r["body"]["messages"][-1]["content"] for r in ai.requests
                 if r["path"].endswith("/chat/completions")]
    assert len(heard) == len(entries)
    assert sum(cers) / len(cers) <= 0.15, list(zip([e["text"] for e in entries], heard, cers))


async def test_reply_audio_follows_the_rate_asked_for(tmp_path, audio_fixtures, manifest) -> None:
    entry = next(e for e in manifest if e["lang"] == "en")
    async with _server_with_fake_ai(tmp_path) as (server, _ai):
        async with open_native_client(server.ws_url, audio_out=wire.AudioFormat(16000)) as client:
            assert client.audio_out.sample_rate == 16000
            result = await stream_wav_and_collect(client, _clip(audio_fixtures, entry), speed=2.0, timeout_s=60)
    assert result.reply_sample_rate == 16000 and result.reply_audio_s > 0.5
    # The fake speaks 15 ms per character at 24 kHz: resampled to 16 kHz, the audio keeps its duration.
    assert result.reply_audio_s == pytest.approx(len(result.reply) * 0.015, rel=0.15)


@pytest.mark.parametrize("failure", ["http_500", "timeout", "broken_sse"])
async def test_llm_failure_is_apologised_for_and_the_session_goes_on(tmp_path, audio_fixtures, manifest,
                                                                    failure) -> None:
    zh = next(e for e in manifest if e["lang"] == "zh")
    en = next(e for e in manifest if e["lang"] == "en")
    async with _server_with_fake_ai(tmp_path, llm_timeout=3) as (server, ai):
        async with open_native_client(server.ws_url, device_id="unlucky") as client:
            ai.config.llm_mode = failure
            failed = await stream_wav_and_collect(client, _clip(audio_fixtures, zh), speed=2.0, timeout_s=60)
            spoken = [e for e in failed.events if e.event == "error_spoken"]
            assert spoken and spoken[0].data["reason"] in ("http_5xx", "timeout", "bad_stream")
            assert "抱歉" in spoken[0].data["text"]  # the apology is in the user's language
            # ... and it is spoken (the fake speaks 15 ms per character)
            assert failed.reply_audio_s >= 0.8 * len(spoken[0].data["text"]) * 0.015
            assert failed.stop_reason == "done"
            ai.config.llm_mode = "ok"
            ok = await stream_wav_and_collect(client, _clip(audio_fixtures, en), speed=2.0, timeout_s=60)
            assert ok.failure is None and ok.reply.strip() and ok.reply_audio_s > 0.5
            assert not [e for e in ok.events if e.event == "error_spoken"]


def _speech_onset_s(pcm: bytes) -> float:
    """Where speech starts in a clip: the first 10 ms frame louder than -40 dBFS."""
    samples = np.frombuffer(pcm, dtype="<i2")
    for start in range(0, len(samples) - 160, 160):
        if rms_dbfs(samples[start:start + 160]) > -40:
            return start / 16000
    raise AssertionError("no speech in clip")


async def test_barge_in_stops_the_reply_at_once(tmp_path, audio_fixtures, manifest) -> None:
    first = next(e for e in manifest if e["id"] == "en-01")
    second = next(e for e in manifest if e["id"] == "en-02")
    long_reply = " ".join(f"This is sentence number {i} of a very long story about a small rabbit."
                          for i in range(30))
    fake = FakeAiConfig(ttft_ms=100, tokens_per_s=200, tts_ms_per_char=60, reply=long_reply)
    barge_in_ms = 300
    async with _server_with_fake_ai(tmp_path, fake, barge_in_min_ms=barge_in_ms) as (server, _ai):
        async with open_native_client(server.ws_url, device_id="interrupter") as client:
            frames: list[tuple[float, wire.Frame]] = []
            first_pcm, second_pcm = _clip(audio_fixtures, first), _clip(audio_fixtures, second)
            reply_playing = trio.Event()
            second_started_at: list[float] = []
            done = trio.Event()

            async def microphone() -> None:
                frame = 640  # 20 ms
                audio = first_pcm
                at = trio.current_time()
                position = 0
                while not done.is_set():
                    if position < len(audio):
                        chunk = audio[position:position + frame]
                        position += frame
                    else:
                        chunk = bytes(frame)
                        if reply_playing.is_set() and not second_started_at:
                            await trio.sleep(1.0)  # let the reply play a while, then talk over it
                            audio, position = second_pcm, 0
                            second_started_at.append(trio.current_time())
                            at = trio.current_time()
                            continue
                    await client.send_audio(chunk.ljust(frame, b"\0"))
                    at += 0.02
                    await trio.sleep_until(at)

            async def speaker() -> None:
                while True:
                    frame = await client.next_frame()
                    frames.append((trio.current_time(), frame))
                    if isinstance(frame, wire.Audio) and frame.turn_id == 1:
                        reply_playing.set()
                    if isinstance(frame, wire.Audio) and frame.turn_id == 2:
                        done.set()  # the interrupting utterance is being answered
                        return

            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(microphone)
                    await speaker()
                    nursery.cancel_scope.cancel()

    onset = second_started_at[0] + _speech_onset_s(second_pcm)
    stop_at = next(t for t, f in frames if isinstance(f, wire.Control) and f.event == "tts_stop" and f.turn_id == 1)
    stop = next(f for _, f in frames if isinstance(f, wire.Control) and f.event == "tts_stop" and f.turn_id == 1)
    assert stop.data["reason"] == "aborted"
    last_old_audio = max(t for t, f in frames if isinstance(f, wire.Audio) and f.turn_id == 1)
    # The old reply stops within BARGE_IN_MIN_MS + 300 ms of the new speech onset ...
    assert stop_at - onset <= (barge_in_ms + 300) / 1000, (stop_at - onset)
    # ... and nothing of it arrives after the stop.
    assert last_old_audio <= stop_at
    assert not [f for t, f in frames if t > stop_at and f.turn_id == 1 and not
                (isinstance(f, wire.Control) and f.event in ("turn_end", "turn_timings", "asr_final"))]
    # The interrupting utterance became the next turn and is being answered.
    assert any(isinstance(f, wire.Control) and f.event == "asr_final" and f.turn_id == 2 and "volume" in
               f.data["text"].lower() for _, f in frames)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whisper_transcript(wav: Path, lang: str) -> str:
    """The reply audio transcribed back with the project's Whisper (``base``, the fast engine)."""
    from voicegrow.pipeline.asr import FastEngine, get_model
    from voicegrow.pipeline.asr_models import resolve_model
    from voicegrow.audio import resample

    samples, rate = read_wav(wav)
    model = get_model(resolve_model("base"), "cpu", "int8", 2, num_workers=1)
    return FastEngine(model, lang).transcribe(resample(samples, rate, 16000)).text


def test_embedded_default_answers_spoken_chinese_and_english_offline(tmp_path, audio_fixtures, manifest) -> None:
    """``voicegrow serve`` with nothing configured, and ``voicegrow talk`` against it, in both languages."""
    from voicegrow.pipeline.textnorm import normalize

    ws_port, http_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MYSQL_", "REDIS_", "MINIO_", "LLM_", "TTS_", "ASR_"))}
    env.update(WS_PORT=str(ws_port), HTTP_PORT=str(http_port), SERVER_HOST="127.0.0.1",
               DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1")
    server = subprocess.Popen([sys.executable, "-m", "voicegrow", "--env-file", "/nonexistent", "serve"], env=env,
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    answers = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                detail = httpx.get(f"http://127.0.0.1:{http_port}/api/v1/health/detail", timeout=5).json()
                voices = detail["components"]["tts"].get("components", {})
                if detail["components"]["asr"].get("state") is None and all(
                        v.get("loaded") for v in voices.values()):  # models loaded
                    break
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        assert detail["components"]["llm"]["status"] == "embedded"
        tts = detail["components"]["tts"]
        assert tts["status"] == "ok" and set(tts["voices"]) == {"zh", "en"}
        assert "kokoro" in tts["voices"]["zh"] and "piper" in tts["voices"]["en"]
        for lang in ("zh", "en"):
            entry = next(e for e in manifest if e["id"] == f"{lang}-00")
            reply_wav = tmp_path / f"reply-{lang}.wav"
            talk = subprocess.run(
                [sys.executable, "-m", "voicegrow", "talk", "--url", f"ws://127.0.0.1:{ws_port}", "--wav",
                 str(audio_fixtures / entry["file"]), "--json", "--save-reply", str(reply_wav), "--timeout", "90"],
                env=env, capture_output=True, text=True, timeout=150)
            assert talk.returncode == 0, talk.stderr
            answers[lang] = (entry, json.loads(talk.stdout), reply_wav)
    finally:
        server.terminate()
        server.wait(timeout=20)
    for lang, (entry, answer, reply_wav) in answers.items():
        assert char_error_rate(entry["text"], answer["transcript"], lang) <= 0.15
        assert set(TIMING_ORDER) <= set(answer["timings_ms"])
        assert answer["reply_audio_s"] > 1.0
        samples, rate = read_wav(reply_wav)
        assert rate == 24000 and rms_dbfs(samples) > -40  # spoken audio, not silence
        # The offline responder echoes what it heard, in the user's language ...
        assert ("天气" if lang == "zh" else "weather") in answer["reply"].lower()
        # ... and the reply audio says the reply: transcribed back, it reads as the reply text.
        heard = _whisper_transcript(reply_wav, lang)
        cer = char_error_rate(normalize(answer["reply"], lang), normalize(heard, lang), lang)
        print(f"{lang}: reply {answer['reply']!r}, heard {heard!r}, round-trip CER {cer:.3f}")
        assert cer <= 0.15, (lang, answer["reply"], heard, cer)


async def test_a_stereo_device_is_heard_as_one_microphone_and_answered_in_stereo(tmp_path, audio_fixtures,
                                                                                 manifest) -> None:
    """The native HELLO allows 2 interleaved channels each way: the core hears their mean, and the mono
    reply goes out on both channels at the rate asked for."""
    entry = next(e for e in manifest if e["lang"] == "en")
    mono = np.frombuffer(_clip(audio_fixtures, entry), dtype="<i2")
    # Left the clip, right the clip at half level: only a downmix (not "take the left channel" nor
    # "read the interleaved bytes as mono") hears it at 3/4 level and at the right speed.
    stereo = np.stack([mono, mono // 2], axis=1).astype("<i2").tobytes()
    frame_bytes = 4 * 16000 * 20 // 1000
    silence = bytes(frame_bytes)
    transcript, reply_frames, stopped = "", [], trio.Event()
    async with _server_with_fake_ai(tmp_path) as (server, _ai):
        async with open_native_client(server.ws_url, device_id="stereo",
                                      audio_in=wire.AudioFormat(16000, channels=2),
                                      audio_out=wire.AudioFormat(24000, channels=2)) as client:
            assert client.audio_in.channels == 2 and client.audio_out.channels == 2

            async def microphone() -> None:
                frames = [stereo[i:i + frame_bytes] for i in range(0, len(stereo), frame_bytes)]
                for chunk in [*frames, *[silence] * 500]:
                    if stopped.is_set():
                        return
                    await client.send_audio(chunk)
                    await trio.sleep(0.01)  # twice real time

            with trio.fail_after(90):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(microphone)
                    async for frame in client:
                        if isinstance(frame, wire.Audio):
                            reply_frames.append(frame.pcm)
                        elif isinstance(frame, wire.Control) and frame.event == "asr_final":
                            transcript = frame.data["text"]
                        elif isinstance(frame, wire.Control) and frame.event == "tts_stop":
                            stopped.set()
                            break
    assert char_error_rate(entry["text"], transcript, "en") <= 0.15, transcript
    reply = np.frombuffer(b"".join(reply_frames), dtype="<i2")
    assert all(len(pcm) % 4 == 0 for pcm in reply_frames)
    left, right = reply[0::2], reply[1::2]
    assert len(left) / 24000 > 0.5 and np.any(left != 0)
    assert np.array_equal(left, right)
