"""The fake LLM/TTS service: its HTTP surface in-process, and its command line in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from bench.fake_ai import FakeAi, FakeAiConfig, canned_reply, run_fake_ai, split_tokens, tone, wav_header
from voicegrow.aiauth import auth_headers

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def fake() -> AsyncIterator[FakeAi]:
    async with run_fake_ai(FakeAiConfig(ttft_ms=0, tokens_per_s=5000, tts_first_chunk_ms=0,
                                        tts_speedup=1000)) as server:
        yield server


async def sse_texts(response: httpx.Response) -> list[str]:
    texts = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            texts.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    return texts


async def test_chat_streams_tokens_and_done(fake: FakeAi) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post("/v1/chat/completions", json={
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "讲个笑话"}]})
    assert response.headers["content-type"] == "text/event-stream"
    assert response.text.rstrip().endswith("data: [DONE]")
    assert "".join(await sse_texts(response)) == canned_reply("讲个笑话")
    assert fake.requests[0]["body"]["messages"][0]["content"] == "讲个笑话"


async def test_chat_without_stream_answers_one_json(fake: FakeAi) -> None:
    fake.config.reply = "Fixed reply."
    async with httpx.AsyncClient(base_url=fake.url) as http:
        response = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert response.json()["choices"][0]["message"]["content"] == "Fixed reply."


async def test_speech_is_a_tone_of_the_right_length(fake: FakeAi) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        pcm = await http.post("/v1/audio/speech", json={"input": "abcd", "response_format": "pcm"})
        wav = await http.post("/v1/audio/speech", json={"input": "abcd", "response_format": "wav"})
    assert len(pcm.content) == 2 * round(4 * 0.060 * 24000)
    assert pcm.content == tone(round(4 * 0.060 * 24000), 24000)
    assert wav.content == wav_header(len(pcm.content), 24000) + pcm.content
    assert max(abs(int.from_bytes(pcm.content[i:i + 2], "little", signed=True))
               for i in range(0, len(pcm.content), 2)) > 5000


async def test_auth_is_checked_when_configured(fake: FakeAi) -> None:
    fake.config.api_key, fake.config.secret_key = "key", "sec"
    body = json.dumps({"input": "hi"}).encode()
    async with httpx.AsyncClient(base_url=fake.url) as http:
        unsigned = await http.post("/v1/audio/speech", content=body, headers={"Authorization": "Bearer key"})
        signed = await http.post("/v1/audio/speech", content=body,
                                 headers=auth_headers("POST", "/v1/audio/speech", body, "key", "sec"))
        models = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert unsigned.status_code == 401
    assert signed.status_code == 200
    assert models.status_code == 401
    assert [r["auth_error"] for r in fake.requests] == [
        "missing X-Timestamp, X-Nonce or X-Signature", None, "bad or missing bearer token"]


async def test_control_endpoints_record_reset_and_configure(fake: FakeAi) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        await http.get("/v1/models")
        recorded = (await http.get("/_fake/requests")).json()
        assert [(r["method"], r["path"]) for r in recorded] == [("GET", "/v1/models")]
        assert (await http.delete("/_fake/requests")).status_code == 200
        assert (await http.get("/_fake/requests")).json() == []
        config = (await http.post("/_fake/config", json={"llm_mode": "http_500", "ttft_ms": 5})).json()
        assert (config["llm_mode"], config["ttft_ms"]) == ("http_500", 5)
        failed = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert failed.status_code == 500
        assert (await http.post("/_fake/config", json={"llm_mode": "explode"})).status_code == 400
        assert (await http.post("/_fake/config", json={"port": 1})).status_code == 400
        assert (await http.get("/nowhere")).status_code == 404
        assert (await http.get("/v1/audio/speech")).status_code == 405
        assert (await http.post("/v1/audio/speech", json={"input": ""})).status_code == 400
    assert fake.config.llm_mode == "http_500"


def test_split_tokens_joins_back_and_reply_follows_the_language() -> None:
    for text in (canned_reply("hello there"), canned_reply("你好"), "Mixed 中文 text, 好的!"):
        assert "".join(split_tokens(text)) == text
    assert "你好" in canned_reply("你好。") and canned_reply("hello").startswith('You said: "hello"')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_cli_starts_and_answers() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_ai", "--port", str(port), "--ttft-ms", "0", "--tokens-per-s", "1000",
         "--reply", "CLI reply. Two sentences.", "--api-key", "k"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(30):
            banner = await trio.to_thread.run_sync(process.stdout.readline, abandon_on_cancel=True)
        assert banner.strip() == f"fake_ai listening on http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     headers={"Authorization": "Bearer k"}) as http:
            assert (await http.get("/v1/models")).json()["data"][0]["id"] == "fake-llm"
            chat = await http.post("/v1/chat/completions", json={
                "stream": True, "messages": [{"role": "user", "content": "hi"}]})
            assert "".join(await sse_texts(chat)) == "CLI reply. Two sentences."
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()
