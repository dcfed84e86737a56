"""The OpenAI audio API (docs/audio-api.md): the unmodified ``openai`` client against an in-process server,
OpenAI-shaped errors for bad input, API keys through the shared throttle, and live turns before batch work."""

from __future__ import annotations

import io
import threading
import wave
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.pipeline.asr import BATCH, LIVE, AsrService, PriorityLimiter, Transcript
from voicegrow.http.audio_api import ApiError, decode_audio, format_transcript
from voicegrow.textmetrics import char_error_rate
from voicegrow.pipeline.tts import PcmStreamDecoder

ADMIN = "admin-token-for-audio-api-tests"
KEYS = ("key-one-0123456789abcdef", "key-two-0123456789abcdef")


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return out.getvalue()


def _clip(manifest: list[dict], lang: str) -> dict:
    return next(c for c in manifest if c["lang"] == lang)


# -- units ----------------------------------------------------------------------------------------------


async def test_priority_limiter_serves_live_waiters_before_batch() -> None:
    limiter = PriorityLimiter(1)
    order: list[str] = []
    await limiter.acquire_on_behalf_of("running", BATCH)

    async def wait(name: str, priority: int) -> None:
        await limiter.acquire_on_behalf_of(name, priority)
        order.append(name)
        limiter.release_on_behalf_of(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "batch-1", BATCH)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait, "live-1", LIVE)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait, "live-2", LIVE)
        await trio.testing.wait_all_tasks_blocked()
        assert (limiter.waiting(LIVE), limiter.waiting(BATCH)) == (2, 1)
        limiter.release_on_behalf_of("running")
    assert order == ["live-1", "live-2", "batch-1"]
    assert limiter.borrowed_tokens == 0


async def test_priority_limiter_cancelled_waiter_leaves_no_slot_behind() -> None:
    limiter = PriorityLimiter(1)
    await limiter.acquire_on_behalf_of("running")
    with trio.move_on_after(0.01):
        await limiter.acquire_on_behalf_of("gives-up", BATCH)
    assert limiter.waiting(BATCH) == 0
    limiter.release_on_behalf_of("running")
    assert limiter.borrowed_tokens == 0
    await limiter.acquire_on_behalf_of("next", BATCH)  # the slot is free again
    assert limiter.borrowed_tokens == 1


class _GatedEngine:
    """Blocks each transcription until the test lets it go; records the order the worker took them."""

    name = "gated"

    def __init__(self) -> None:
        self.taken: list[str] = []
        self.release = threading.Event()

    def transcribe(self, pcm16k: np.ndarray, language: str | None = None) -> Transcript:
        self.taken.append(language or "")
        self.release.wait(10)
        return Transcript(language or "", language or "", pcm16k.size / 16000, 0.0, self.name)


async def test_asr_service_takes_a_speakers_turn_before_queued_uploads() -> None:
    engine = _GatedEngine()
    service = AsrService(engine, workers=1)
    audio = np.zeros(1600, dtype=np.int16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: service.transcribe(audio, language="first", priority=BATCH))
        while not engine.taken:
            await trio.sleep(0.01)
        nursery.start_soon(lambda: service.transcribe(audio, language="upload", priority=BATCH))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lambda: service.transcribe(audio, language="live"))
        await trio.testing.wait_all_tasks_blocked()
        assert service.queue_depth == 2
        engine.release.set()
    assert engine.taken == ["first", "live", "upload"]


def test_transcript_formats() -> None:
    t = Transcript("hello there", "en", 2.5, 0.1, "fast", no_speech_prob=0.01, avg_logprob=-0.2)
    assert format_transcript(t, "srt", 2.5)[0] == "1\n00:00:00,000 --> 00:00:02,500\nhello there\n\n"
    assert format_transcript(t, "vtt", 2.5)[0] == "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nhello there\n\n"
    assert format_transcript(t, "text", 2.5) == ("hello there", "text/plain; charset=utf-8")
    import json

    verbose = json.loads(format_transcript(t, "verbose_json", 2.5)[0])
    assert verbose["language"] == "english" and verbose["duration"] == 2.5
    assert verbose["segments"][0]["end"] == 2.5 and verbose["segments"][0]["avg_logprob"] == -0.2
    silent = Transcript("", "en", 1.0, 0.1, "fast", dropped="silence")
    assert json.loads(format_transcript(silent, "verbose_json", 1.0)[0])["segments"] == []


def test_decode_audio_resamples_and_refuses_bad_files() -> None:
    tone = (8000 * np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000)).astype(np.int16)  # 1 s at 8 kHz
    pcm = decode_audio(_wav(tone, 8000), max_duration_s=10)
    assert pcm.dtype == np.int16 and abs(pcm.size - 16000) < 400
    with pytest.raises(ApiError) as too_long:
        decode_audio(_wav(tone, 8000), max_duration_s=0.5)
    assert too_long.value.code == "audio_too_long"
    with pytest.raises(ApiError) as garbage:
        decode_audio(b"this is not audio at all" * 50, max_duration_s=10)
    assert garbage.value.code == "invalid_file_format" and garbage.value.param == "file"


# -- the real client against a server ---------------------------------------------------------------


def _assert_openai_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code and error["param"] == param


async def _stream_speech(client: openai.AsyncOpenAI, text: str, response_format: str) -> bytes:
    async with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=text, response_format=response_format) as response:
        chunks = [chunk async for chunk in response.iter_bytes()]
    assert len(chunks) >= 1
    return b"".join(chunks)


async def test_openai_client_with_admin_credential_and_bad_input(tmp_path: Path, audio_fixtures: Path,
                                                                  manifest: list[dict]) -> None:
    """API_KEYS empty: the admin rule applies; transcription (json, srt), streamed speech, every error."""
    async with run_fake_ai(FakeAiConfig(tts_ms_per_char=5, tts_first_chunk_ms=0)) as fake, \
            running_server(make_settings(tmp_path, ADMIN_TOKEN=ADMIN, TTS_BASE_URL=fake.url,
                                         AUDIO_MAX_UPLOAD_BYTES=400_000, AUDIO_MAX_DURATION_S=10)) as server:
        client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=ADMIN, max_retries=0)
        en = _clip(manifest, "en")
        with open(audio_fixtures / en["file"], "rb") as handle:
            result = await client.audio.transcriptions.create(model="whisper-1", file=handle)
        assert char_error_rate(en["text"], result.text, "en") <= 0.15, result.text
        zh = _clip(manifest, "zh")
        with open(audio_fixtures / zh["file"], "rb") as handle:
            srt = await client.audio.transcriptions.create(model="whisper-1", file=handle, language="zh",
                                                           response_format="srt")
        assert srt.startswith("1\n00:00:00,000 --> 00:00:0")
        assert char_error_rate(zh["text"], srt.split("\n")[2], "zh") <= 0.15, srt

        wav = await _stream_speech(client, "Hello from the speech endpoint.", "wav")
        decoder = PcmStreamDecoder()
        samples = decoder.feed(wav) + decoder.close()
        assert wav.startswith(b"RIFF") and decoder.sample_rate == 24000 and len(samples) > 2400
        pcm = await _stream_speech(client, "你好，这是语音接口。", "pcm")
        assert len(pcm) >= 2000 and len(pcm) % 2 == 0

        with pytest.raises(openai.AuthenticationError) as wrong:
            await openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="not-the-admin-token",
                                     max_retries=0).audio.speech.create(model="tts-1", voice="a", input="hi")
        assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"

        auth = {"Authorization": f"Bearer {ADMIN}"}
        clip = (audio_fixtures / en["file"]).read_bytes()
        async with httpx.AsyncClient(base_url=server.http_url, headers=auth) as http:
            url = "/v1/audio/transcriptions"
            _assert_openai_error(await http.post(url, data={"model": "whisper-1"}), 400,
                                 "missing_required_parameter", "file")
            _assert_openai_error(await http.post(url, files={"file": ("a.wav", clip)}), 400,
                                 "missing_required_parameter", "model")
            _assert_openai_error(await http.post(url, data={"model": "m", "response_format": "xml"},
                                                 files={"file": ("a.wav", clip)}), 400, "invalid_value",
                                 "response_format")
            _assert_openai_error(await http.post(url, data={"model": "m", "temperature": "7"},
                                                 files={"file": ("a.wav", clip)}), 400, "invalid_value",
                                 "temperature")
            _assert_openai_error(await http.post(url, data={"model": "m"}, files={"file": ("a.txt", b"hello" * 99)}),
                                 400, "invalid_file_format", "file")
            long_clip = _wav(np.zeros(16000 * 11, dtype=np.int16) + 300)  # 11 s, 352 kB: under the size limit
            _assert_openai_error(await http.post(url, data={"model": "m"}, files={"file": ("a.wav", long_clip)}),
                                 400, "audio_too_long", "file")
            big = _wav(np.zeros(16000 * 13, dtype=np.int16))  # 416 kB
            _assert_openai_error(await http.post(url, data={"model": "m"}, files={"file": ("a.wav", big)}),
                                 413, "file_too_large", "file")
            speech = "/v1/audio/speech"
            _assert_openai_error(await http.post(speech, json={"model": "tts-1", "voice": "a", "input": "  "}),
                                 400, "missing_required_parameter", "input")
            _assert_openai_error(await http.post(speech, json={"input": "hi", "response_format": "flac"}),
                                 400, "invalid_value", "response_format")
            _assert_openai_error(await http.post(speech, json={"input": "hi", "speed": 9}), 400,
                                 "invalid_value", "speed")
            _assert_openai_error(await http.post(speech, content=b"{not json"), 400, "invalid_json")
            metrics = (await http.get("/metrics")).text
        assert 'voicegrow_audio_api_requests_total{endpoint="transcriptions",outcome="ok"} 2.0' in metrics
        assert 'voicegrow_audio_api_requests_total{endpoint="speech",outcome="ok"} 2.0' in metrics


async def test_openai_client_with_api_keys_and_throttle(tmp_path: Path, audio_fixtures: Path,
                                                         manifest: list[dict]) -> None:
    """API_KEYS set: either key or the admin token works; wrong keys are 401, then the shared lock-out."""
    async with run_fake_ai(FakeAiConfig(tts_ms_per_char=5, tts_first_chunk_ms=0)) as fake, \
            running_server(make_settings(tmp_path, ADMIN_TOKEN=ADMIN, TTS_BASE_URL=fake.url,
                                         API_KEYS=",".join(KEYS), AUTH_MAX_FAILURES=3)) as server:
        base = f"{server.http_url}/v1"
        en = _clip(manifest, "en")
        with open(audio_fixtures / en["file"], "rb") as handle:
            result = await openai.AsyncOpenAI(base_url=base, api_key=KEYS[1], max_retries=0
                                              ).audio.transcriptions.create(model="whisper-1", file=handle)
        assert char_error_rate(en["text"], result.text, "en") <= 0.15, result.text
        for key in (KEYS[0], ADMIN):
            client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)
            assert len(await _stream_speech(client, "Keys work.", "wav")) > 44
        mp3 = await _stream_speech(client, "Compressed speech, streamed.", "mp3")
        assert mp3[:3] == b"ID3" or (mp3[0] == 0xFF and mp3[1] & 0xE0 == 0xE0)
        opus = await _stream_speech(client, "Compressed speech, streamed.", "opus")
        assert opus.startswith(b"OggS") and b"OpusHead" in opus[:64] and len(opus) > 200
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            _assert_openai_error(await http.post("/v1/audio/speech", json={"input": "hi"}), 401, "invalid_api_key")
            for guess in ("wrong-1", "wrong-2"):
                _assert_openai_error(await http.post("/v1/audio/speech", json={"input": "hi"},
                                                     headers={"Authorization": f"Bearer {guess}"}),
                                     401, "invalid_api_key")
            locked = await http.post("/v1/audio/speech", json={"input": "hi"},
                                     headers={"Authorization": "Bearer wrong-3"})
            _assert_openai_error(locked, 429, "rate_limit_exceeded")
            assert int(locked.headers["Retry-After"]) > 0
            # Locked out: a right key is refused too, so the lock tells a guesser nothing.
            still = await http.post("/v1/audio/speech", json={"input": "hi"},
                                    headers={"Authorization": f"Bearer {KEYS[0]}"})
            assert still.status_code == 429
