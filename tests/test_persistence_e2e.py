"""Persistence through the whole server: real MariaDB, Redis and an S3 server on loopback.

A conversation streamed with fixture clips must leave its turns in MySQL, two WAV objects per turn in
the bucket that play back as the audio sent and received, and the admin API must hand them out with
working presigned URLs. When a backend goes away mid-session, the session keeps answering, health says
degraded, and after recovery every record and object is there exactly once.
"""

from __future__ import annotations

import contextlib
import io
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from tests.conftest import make_settings
from voicegrow.app import ServerHandle, running_server
from voicegrow.audio import read_wav
from voicegrow.client import open_native_client, stream_wav_and_collect

pytestmark = pytest.mark.slow

FAST_RETRY = {"retry_initial_s": 0.1, "retry_max_s": 0.5, "probe_interval_s": 0.3, "state_timeout_s": 0.3}


def _clip(audio_fixtures: Path, clip_id: str) -> bytes:
    samples, _ = read_wav(audio_fixtures / f"{clip_id}.wav")
    return samples.astype("<i2").tobytes()


@contextlib.asynccontextmanager
async def _server(tmp_path: Path, **backends: Any) -> AsyncIterator[tuple[ServerHandle, Any]]:
    async with run_fake_ai(FakeAiConfig(ttft_ms=50, tokens_per_s=200, tts_ms_per_char=10)) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url, asr_preload="true",
                                 **backends)
        async with running_server(settings, persistence_options=FAST_RETRY) as server:
            with trio.fail_after(120):
                await server.services.asr.warm_up()
            yield server, ai


def _wav_pcm(data: bytes) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        return wav.readframes(wav.getnframes()), wav.getframerate()


async def _component(http: httpx.AsyncClient, name: str) -> dict[str, Any]:
    return (await http.get("/api/v1/health/detail")).json()["components"][name]


async def _wait_status(http: httpx.AsyncClient, name: str, status: str, timeout: float = 20) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while (component := await _component(http, name))["status"] != status:
            await trio.sleep(0.1)
    return component


async def test_a_conversation_lands_in_mysql_and_s3(tmp_path, audio_fixtures, mysql_db, redis_prefix,
                                                   redis_server, s3_bucket) -> None:
    clips = ["zh-00", "en-00"]
    async with _server(tmp_path, **mysql_db, **redis_server, redis_key_prefix=redis_prefix, **s3_bucket) as (
            server, _ai):
        sent: dict[str, bytes] = {}
        results = []
        async with open_native_client(server.ws_url, device_id="nursery-speaker") as client:
            for clip in clips:
                pcm = _clip(audio_fixtures, clip)
                sent[clip] = pcm
                results.append(await stream_wav_and_collect(client, pcm, speed=2.0, timeout_s=60))
        await server.services.persistence.wait_delivered()
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            listing = (await http.get("/api/v1/conversations", params={"device_id": "nursery-speaker"})).json()
            turns = sorted(listing["turns"], key=lambda t: t["started_at"])
            assert [t["transcript"] for t in turns] == [r.transcript for r in results]
            for turn, result, clip in zip(turns, results, clips):
                assert turn["reply_text"] == result.reply and turn["outcome"] == "completed"
                assert turn["timings_ms"]["first_audio_sent"] >= turn["timings_ms"]["speech_end"]
                assert turn["audio_in_key"].startswith("nursery-speaker/")
                assert turn["audio_in_key"].endswith("-in.wav") and turn["audio_out_key"].endswith("-out.wav")
                # The presigned URLs work and the WAVs are the audio heard and the audio played.
                heard, heard_rate = _wav_pcm((await http.get(turn["audio_in_url"])).content)
                played, played_rate = _wav_pcm((await http.get(turn["audio_out_url"])).content)
                assert heard_rate == 16000 and played_rate == 24000
                stream = sent[clip] + bytes(16000 * 2 * 30)  # the clip, then the microphone's silence
                assert len(heard) > 16000 and heard in stream  # a slice of what the device sent
                assert played == result.reply_audio
                one = (await http.get(f"/api/v1/conversations/{turn['turn_id']}")).json()
                assert one["transcript"] == turn["transcript"]
            devices = (await http.get("/api/v1/devices")).json()["devices"]
            assert [d["device_id"] for d in devices] == ["nursery-speaker"]
        # The conversation survives a reconnect: history comes back from Redis.
        history = await server.services.persistence.load_history("nursery-speaker")
        assert [m["content"] for m in history if m["role"] == "user"] == [r.transcript for r in results]


async def test_redis_stopped_mid_session(tmp_path, audio_fixtures, private_redis) -> None:
    async with _server(tmp_path, redis_host="127.0.0.1", redis_port=private_redis.port) as (server, _ai):
        async with httpx.AsyncClient(base_url=server.http_url) as http, \
                open_native_client(server.ws_url, device_id="redis-fault") as client:
            first = await stream_wav_and_collect(client, _clip(audio_fixtures, "en-00"), speed=2.0, timeout_s=60)
            assert first.reply
            private_redis.stop()
            during = await stream_wav_and_collect(client, _clip(audio_fixtures, "en-01"), speed=2.0, timeout_s=60)
            assert during.reply and during.reply_audio_s > 0.3  # the session keeps answering
            await _wait_status(http, "redis", "degraded")
            assert (await http.get("/api/v1/health/detail")).json()["status"] == "degraded"
            private_redis.start()
            await _wait_status(http, "redis", "ok")
            after = await stream_wav_and_collect(client, _clip(audio_fixtures, "en-02"), speed=2.0, timeout_s=60)
            assert after.reply
        history = await server.services.persistence.load_history("redis-fault")
        assert [m["content"] for m in history if m["role"] == "user"][-1] == after.transcript


async def test_s3_stopped_mid_session(tmp_path, audio_fixtures, private_s3) -> None:
    backends = {"minio_endpoint": f"127.0.0.1:{private_s3.port}", "minio_access_key": "testing",
                "minio_secret_key": "testing", "minio_bucket": "vg-fault"}
    async with _server(tmp_path, **backends) as (server, _ai):
        persistence = server.services.persistence
        async with httpx.AsyncClient(base_url=server.http_url) as http, \
                open_native_client(server.ws_url, device_id="s3-fault") as client:
            await stream_wav_and_collect(client, _clip(audio_fixtures, "en-00"), speed=2.0, timeout_s=60)
            await persistence.wait_delivered()
            private_s3.stop()  # moto forgets everything: only objects written from now on are checked
            outage = []
            for clip in ("en-01", "en-02"):
                result = await stream_wav_and_collect(client, _clip(audio_fixtures, clip), speed=2.0, timeout_s=60)
                assert result.reply  # the session keeps answering
                outage.append(result)
            minio = await _wait_status(http, "minio", "degraded")
            assert minio["spool_depth"] >= 1
            private_s3.start()
            with trio.fail_after(30):
                await persistence.wait_delivered()
            await _wait_status(http, "minio", "ok")
            listing = (await http.get("/api/v1/conversations", params={"device_id": "s3-fault"})).json()
        keys = {t["transcript"]: t for t in listing["turns"]}
        from minio import Minio

        client = Minio(backends["minio_endpoint"], access_key="testing", secret_key="testing", secure=False,
                       region="us-east-1")
        names = [o.object_name for o in client.list_objects("vg-fault", recursive=True)]
        for result in outage:
            turn = keys[result.transcript]
            for key in (turn["audio_in_key"], turn["audio_out_key"]):
                assert names.count(key) == 1  # present, exactly once
            played, _ = _wav_pcm(client.get_object("vg-fault", turn["audio_out_key"]).read())
            assert played == result.reply_audio
        assert len(names) == 2 * len(outage)


async def test_mysql_unreachable_then_back(tmp_path, audio_fixtures, mysql_db) -> None:
    """MySQL at a closed port first; the server answers anyway, then is pointed at the real one."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    down = {**mysql_db, "mysql_port": closed_port}
    async with _server(tmp_path, **down) as (server, _ai):
        async with httpx.AsyncClient(base_url=server.http_url) as http, \
                open_native_client(server.ws_url, device_id="mysql-fault") as client:
            results = [await stream_wav_and_collect(client, _clip(audio_fixtures, clip), speed=2.0, timeout_s=60)
                       for clip in ("zh-00", "en-00")]
            assert all(r.reply for r in results)
            mysql = await _wait_status(http, "mysql", "degraded")
            assert mysql["spool_depth"] >= 2
            assert (await http.get("/api/v1/health/detail")).json()["status"] == "degraded"
    # A restart pointed at the real MySQL replays the spool (same DATA_DIR), exactly once.
    async with _server(tmp_path, **mysql_db) as (server, _ai):
        await server.services.persistence.wait_delivered()
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            await _wait_status(http, "mysql", "ok")
            listing = (await http.get("/api/v1/conversations", params={"device_id": "mysql-fault"})).json()
    transcripts = [t["transcript"] for t in listing["turns"]]
    assert sorted(transcripts) == sorted(r.transcript for r in results)
