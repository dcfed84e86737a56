"""Remote ASR (``ASR_BASE_URL``): server A sends its speakers' utterances to server B's OpenAI audio API.

B is a ``voicegrow serve`` process, A runs in the test; B is stopped half-way, and A's speaker then hears
the apology, or, with ``ASR_REMOTE_FALLBACK=local``, A's own model answers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.pipeline.asr import AsrError, Transcript
from voicegrow.audio import read_wav
from voicegrow.client import open_native_client, stream_wav_and_collect
from voicegrow.pipeline.remote_asr import RemoteAsr
from voicegrow.textmetrics import char_error_rate

ADMIN = "admin-token-for-remote-asr-tests"
KEY = "remote-asr-key-0123456789"


def _clip(audio_fixtures: Path, entry: dict) -> bytes:
    samples, rate = read_wav(audio_fixtures / entry["file"])
    assert rate == 16000
    return samples.astype("<i2").tobytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def _server_process(tmp_path: Path, **env_overrides: str) -> AsyncIterator[tuple[str, subprocess.Popen]]:
    """``voicegrow serve`` in its own process on free ports; yields its HTTP URL once it answers health."""
    ws_port, http_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MYSQL_", "REDIS_", "MINIO_", "LLM_", "TTS_", "ASR_", "API_KEYS"))}
    env.update(WS_PORT=str(ws_port), HTTP_PORT=str(http_port), SERVER_HOST="127.0.0.1", LOG_FORMAT="text",
               DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1", ASR_MODEL_SIZE="base", ASR_PRELOAD="false",
               **env_overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "voicegrow", "--env-file", "/nonexistent", "serve"], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{http_port}"
    try:
        async with httpx.AsyncClient() as http:
            with trio.fail_after(60):
                while True:
                    assert process.poll() is None, process.stdout.read()
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(f"{url}/api/v1/health", timeout=2)).status_code == 200:
                            break
                    await trio.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        await trio.to_thread.run_sync(process.wait)
        process.stdout.close()


async def test_speaker_on_a_is_transcribed_by_process_b_then_apologised_to_or_answered_locally(
        tmp_path: Path, audio_fixtures: Path, manifest: list[dict]) -> None:
    """The issue's two processes: B is ``voicegrow serve`` in the pool's ASR-only role, A this test's
    in-process edge."""
    en = next(e for e in manifest if e["lang"] == "en")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with run_fake_ai(FakeAiConfig(ttft_ms=0, tokens_per_s=400, tts_ms_per_char=5)) as ai, \
            _server_process(tmp_path / "b", ADMIN_TOKEN=ADMIN, API_KEYS=KEY, SERVER_ROLE="asr") as (b_url, b_process):
        remote = dict(ASR_BASE_URL=f"{b_url}/v1", ASR_API_KEY=KEY, ASR_REMOTE_TIMEOUT_S=60, ASR_TIMEOUT=90,
                      ASR_LANGUAGE="en", LLM_BASE_URL=ai.url, TTS_BASE_URL=ai.url, ADMIN_TOKEN=ADMIN)
        async with running_server(make_settings(tmp_path / "a", **remote)) as a:
            assert isinstance(a.services.asr, RemoteAsr) and a.services.asr.fallback is None
            async with open_native_client(a.ws_url, device_id="edge-speaker") as client:
                answered = await stream_wav_and_collect(client, _clip(audio_fixtures, en), speed=2.0, timeout_s=120)
                assert answered.failure is None and answered.reply.strip() and answered.reply_audio_s > 0
                assert char_error_rate(en["text"], answered.transcript, "en") <= 0.15, answered.transcript
                async with httpx.AsyncClient(headers=auth) as http:
                    b_metrics = (await http.get(f"{b_url}/metrics")).text
                    detail = (await http.get(f"{a.http_url}/api/v1/health/detail")).json()
                assert 'voicegrow_audio_api_requests_total{endpoint="transcriptions",outcome="ok"} 1.0' in b_metrics
                asr = detail["components"]["asr"]
                assert asr["engine"] == "remote" and asr["remote"] == f"{b_url}/v1"
                assert asr["status"] == "ok" and asr["last_latency_ms"] > 0

                b_process.terminate()  # B stops (SIGTERM: a graceful stop, its port closes)
                await trio.to_thread.run_sync(b_process.wait)
                failed = await stream_wav_and_collect(client, _clip(audio_fixtures, en), speed=2.0, timeout_s=60)
                spoken = [e for e in failed.events if e.event == "error_spoken"]
                assert spoken and spoken[0].data["reason"] == "asr_error", failed.events
                assert spoken[0].data["text"].startswith("Sorry") and failed.reply_audio_s > 0
            async with httpx.AsyncClient(headers=auth) as http:
                down = (await http.get(f"{a.http_url}/api/v1/health/detail")).json()["components"]["asr"]
            assert down["status"] == "down" and "remote ASR" in down["detail"]

        # The same edge with the local fallback: B is still down, A's own model answers.
        async with running_server(make_settings(tmp_path / "a2", **remote, ASR_REMOTE_FALLBACK="local")) as a2:
            async with open_native_client(a2.ws_url, device_id="edge-speaker-2") as client:
                local = await stream_wav_and_collect(client, _clip(audio_fixtures, en), speed=2.0, timeout_s=90)
            assert local.failure is None and local.reply.strip()
            assert not [e for e in local.events if e.event == "error_spoken"]
            assert char_error_rate(en["text"], local.transcript, "en") <= 0.15, local.transcript


async def test_the_asr_role_serves_the_audio_api_and_takes_no_speakers(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, server_role="asr", admin_token=ADMIN, api_keys=KEY)) as pool:
        assert pool.ws_port == 0 and pool.services.ws_port == 0  # no speaker port is served
        async with httpx.AsyncClient(base_url=pool.http_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            assert (await http.get("/api/v1/health")).status_code == 200
            missing_file = await http.post("/v1/audio/transcriptions", data={"model": "whisper-1"})
            assert missing_file.status_code == 400 and missing_file.json()["error"]["type"] == "invalid_request_error"


class _Flaky:
    """A transport that fails ``failures`` times, then answers like an OpenAI transcription endpoint."""

    def __init__(self, failures: int, status: int = 503) -> None:
        self.failures, self.status, self.calls = failures, status, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert b'name="file"; filename="utterance.wav"' in request.content
        if self.calls <= self.failures:
            return httpx.Response(self.status, json={"error": {"message": "busy"}})
        return httpx.Response(200, json={"text": " turn on the lights "})


_SPEECH = (3000 * np.sin(np.arange(16000) * 0.05)).astype(np.int16)


async def test_remote_asr_retries_once_then_fails_or_falls_back() -> None:
    flaky = _Flaky(failures=1)
    async with httpx.AsyncClient(transport=httpx.MockTransport(flaky)) as http:
        asr = RemoteAsr(http, "http://pool:8000/v1", api_key=KEY, retries=1)
        transcript = await asr.transcribe(_SPEECH)
        assert (transcript.text, transcript.language, flaky.calls) == ("turn on the lights", "en", 2)
        silent = await asr.transcribe(np.zeros(16000, dtype=np.int16))
        assert silent.dropped == "silence" and flaky.calls == 2  # silence never leaves the box

    refused = _Flaky(failures=9, status=401)
    async with httpx.AsyncClient(transport=httpx.MockTransport(refused)) as http:
        asr = RemoteAsr(http, "http://pool:8000", api_key=KEY, retries=3)
        with pytest.raises(AsrError, match="HTTP 401"):
            await asr.transcribe(_SPEECH)
        assert refused.calls == 1  # a 4xx is not retried
        assert asr.health()["status"] == "down"

    class Local:
        workers = 1

        async def transcribe(self, pcm, *, language=None, priority=0, timeout_s=None) -> Transcript:
            return Transcript("local answer", "en", 1.0, 0.0, "fast")

    down = _Flaky(failures=9)
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        asr = RemoteAsr(http, "http://pool:8000", api_key=KEY, retries=1, fallback=Local())
        assert (await asr.transcribe(_SPEECH)).text == "local answer"
        assert down.calls == 2 and asr.health()["status"] == "degraded"
