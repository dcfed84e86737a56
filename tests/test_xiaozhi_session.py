"""xiaozhi-esp32 boards served end to end: the emulated firmware against a real in-process server.

The emulator (``bench/xiaozhi_emulator.py``) speaks the firmware's JSON and Opus framing and models
its playback queue; raw WebSocket peers stand in for broken or hostile boards. Tests that hold a
conversation use real VAD and Whisper with the fake LLM/TTS service of ``bench``.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from bench.fake_ai import FakeAiConfig
from bench.xiaoai_emulator import run_emulator
from bench.xiaozhi_emulator import DEFAULT_DEVICE_ID, EmulatorError, XiaozhiEmulator, run_xiaozhi_emulator
from tests.session_support import SHORT_REPLIES, server_with_fake_ai
from tests.session_support import completed_turns as _completed_turns
from tests.session_support import counter_value as _count
from tests.session_support import plain_server as _server
from tests.session_support import wait_for as _wait_for
from voicegrow.app import ServerHandle
from voicegrow.audio import read_wav, rms_dbfs
from voicegrow.client import open_native_client, stream_wav_and_collect
from voicegrow.opus import OpusEncoder
from voicegrow.protocol import xiaozhi as wire
from voicegrow.streaming.device_mcp import DeviceToolError
from voicegrow.textmetrics import char_error_rate

HEADERS = [(b"Protocol-Version", b"1"), (b"Device-Id", DEFAULT_DEVICE_ID.encode()), (b"Client-Id", b"c-1")]
HELLO = wire.encode_text(wire.Hello(features={"mcp": True}))


def _clip(audio_fixtures: Path, entry: dict, trailing_silence_s: float = 1.0) -> bytes:
    samples, rate = read_wav(audio_fixtures / entry["file"])
    assert rate == 16000
    return samples.astype("<i2").tobytes() + bytes(int(32000 * trailing_silence_s))


def _errors(server: ServerHandle) -> dict[str, float]:
    return {s.labels["code"]: s.value for metric in server.services.metrics.protocol_errors.collect()
            for s in metric.samples if s.name.endswith("_total")}


def _board_url(server: ServerHandle) -> str:
    return server.ws_url + wire.DEFAULT_PATH


def _server_with_fake_ai(tmp_path: Path, fake: FakeAiConfig = SHORT_REPLIES,
                         **overrides: object) -> AbstractAsyncContextManager[tuple[ServerHandle, object]]:
    """The shared conversation server, with ``MAX_AUDIO_RATE`` high: a board's audio may come in fast."""
    return server_with_fake_ai(tmp_path, fake, **{"max_audio_rate": 100, **overrides})


async def _closed_with(ws, timeout: float = 5.0) -> tuple[int | None, list[dict]]:
    """Read until the server closes; the close code and the ``error`` messages seen on the way."""
    errors = []
    with trio.fail_after(timeout):
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, str) and json.loads(message).get("type") == "error":
                    errors.append(json.loads(message))
        except ConnectionClosed as exc:
            return exc.reason.code, errors


# -- handshake, access, malformed input (no model needed) ------------------------------------------


async def test_hello_is_answered_and_the_boards_tools_are_listed_and_called(tmp_path) -> None:
    async with _server(tmp_path) as server, run_xiaozhi_emulator(_board_url(server), tools_page_size=1) as board:
        (session,) = list(server.services.registry)
        assert session.protocol == "xiaozhi" and session.device_id == "xiaozhi-" + DEFAULT_DEVICE_ID
        assert board.session_id == session.session_id
        assert board.server_audio == wire.AudioParams(sample_rate=24000, frame_duration=60)
        tools = session.device_tools
        with trio.fail_after(5):
            await tools.ready.wait()
        # initialize, then two pages of one tool each (nextCursor followed).
        assert [r["method"] for r in board.mcp_requests] == ["initialize", "tools/list", "tools/list"]
        assert [t.name for t in tools.tools] == ["self.get_device_status", "self.audio_speaker.set_volume"]
        assert tools.tools[1].input_schema["required"] == ["volume"]
        result = await tools.call("self.audio_speaker.set_volume", {"volume": 30})
        assert result.text == "true" and not result.is_error and board.state["volume"] == 30
        status = await tools.call("self.get_device_status")
        assert json.loads(status.text)["audio_speaker"]["volume"] == 30
        with pytest.raises(DeviceToolError) as failed:
            await tools.call("self.teleport")
        assert failed.value.reason == "error" and "Unknown tool: self.teleport" in failed.value.message
        assert board.tool_calls == [("self.audio_speaker.set_volume", {"volume": 30}), ("self.get_device_status", {})]
        listed = server.services.registry.get(session.session_id).public()["device_tools"]
        assert listed == ["self.get_device_status", "self.audio_speaker.set_volume"]


async def test_a_device_tool_call_times_out_when_the_board_does_not_answer(tmp_path) -> None:
    async with _server(tmp_path, xiaozhi_mcp_timeout_s=0.3) as server, \
            open_websocket_url(_board_url(server), extra_headers=HEADERS) as ws:
        await ws.send_message(HELLO)
        hello = wire.decode_server_text(await ws.get_message())
        assert isinstance(hello, wire.ServerHello)
        (session,) = list(server.services.registry)
        with trio.fail_after(5):
            await session.device_tools.ready.wait()  # initialize timed out: no tools, no hang
        assert session.device_tools.tools == []
        with pytest.raises(DeviceToolError) as failed:
            await session.device_tools.call("self.get_device_status")
        assert failed.value.reason == "timeout"


async def test_a_silent_board_is_closed_at_the_handshake_deadline(tmp_path) -> None:
    async with _server(tmp_path, handshake_timeout_s=0.5) as server, \
            open_websocket_url(_board_url(server), extra_headers=HEADERS) as ws:
        code, errors = await _closed_with(ws)
        assert code == 1008 and [e["code"] for e in errors] == ["hello_timeout"]
        assert _errors(server)["xiaozhi_hello_timeout"] == 1


@pytest.mark.parametrize(("first", "close_code", "error"), [
    (b"\x01\x02\x03", 1002, "hello_expected"),
    ("not json", 1007, "invalid_json"),
    ('{"type":"listen","state":"start","mode":"auto"}', 1002, "hello_expected"),
    ('{"type":"hello","version":1,"transport":"mqtt"}', 1003, "bad_transport"),
    ('{"type":"hello","version":7,"transport":"websocket"}', 1003, "unsupported_version"),
    ('{"type":"hello","version":1,"transport":"websocket","audio_params":{"format":"pcm"}}', 1003,
     "unsupported_audio"),
])
async def test_anything_but_hello_first_is_answered_and_closed(tmp_path, first, close_code, error) -> None:
    async with _server(tmp_path) as server, open_websocket_url(_board_url(server), extra_headers=HEADERS) as ws:
        await ws.send_message(first)
        code, errors = await _closed_with(ws)
        assert code == close_code and [e["code"] for e in errors] == [error]


async def test_malformed_input_after_hello_is_answered_and_the_session_goes_on(tmp_path) -> None:
    async with _server(tmp_path, max_frame_bytes=4096) as server, \
            run_xiaozhi_emulator(_board_url(server), mcp=False, version=2) as board, \
            run_xiaozhi_emulator(_board_url(server), mcp=False, device_id="a0:85:e3:00:00:02") as bystander:
        metrics = server.services.metrics
        garbage: list[str | bytes] = [
            "not json", '{"type":"teleport"}', '{"type":"listen","state":"sing"}', "[" * 100 + "]" * 100,
            wire.encode_text(board.hello_message()),  # a second hello
            b"\x00\x02\x00",  # a truncated v2 header
            wire.encode_binary(b"\xff\xfe\xfd\xfc", 2),  # not Opus
        ]
        for message in garbage:
            await board.send_raw(message)
        await board.wait_until(lambda b: len(b.errors) == 5)  # five answered, the rest only counted
        assert [e["code"] for e in board.errors] == ["invalid_json", "unknown_type", "bad_field", "too_deep",
                                                    "unexpected_hello"]
        errors = _errors(server)
        assert errors["xiaozhi_truncated"] == 1 and errors["xiaozhi_bad_opus"] == 1
        # Still served: good Opus is taken.
        await board.listen_start("auto")
        await board.stream_pcm(bytes(32000), realtime=False)
        await _wait_for(lambda: _count(metrics.audio_frames_received.labels("xiaozhi")) >= 16)
        assert board.connected
        # An oversized frame ends that board's session only.
        await board.send_raw(b"\x00" * 8000)
        await board.wait_until(lambda b: not b.connected)
        assert board.close_code == 1009
        await _wait_for(lambda: len(server.services.registry) == 1)
        assert bystander.connected


async def test_token_and_allowlist(tmp_path) -> None:
    async with _server(tmp_path, xiaozhi_token="s3cret", xiaozhi_allowlist=f"{DEFAULT_DEVICE_ID},c-other") as server:
        url = _board_url(server)
        for token, device_id, reason in (("", DEFAULT_DEVICE_ID, "missing_token"),
                                         ("wrong", DEFAULT_DEVICE_ID, "bad_token"),
                                         ("s3cret", "a0:85:e3:00:00:99", "not_allowlisted")):
            board = XiaozhiEmulator(url, token=token, device_id=device_id, client_id="c-x")
            with pytest.raises(EmulatorError):
                await board.run()
            assert board.close_code == (4401 if reason == "missing_token" else 4403)
            assert board.close_reason == reason
        async with run_xiaozhi_emulator(url, token="s3cret", mcp=False) as board:  # the firmware adds "Bearer "
            assert board.session_id
        async with run_xiaozhi_emulator(url, token="s3cret", device_id="x", client_id="c-other", mcp=False):
            pass
        refusals = {s.labels["reason"]: s.value for metric in server.services.metrics.auth_refusals.collect()
                    for s in metric.samples if s.name.endswith("_total") and s.labels["protocol"] == "xiaozhi"}
        assert refusals == {"missing_token": 1, "bad_token": 1, "not_allowlisted": 1}


@pytest.mark.parametrize("version", wire.PROTOCOL_VERSIONS)
async def test_opus_up_is_decoded_in_every_framing_version(tmp_path, version) -> None:
    async with _server(tmp_path) as server, run_xiaozhi_emulator(_board_url(server), version=version,
                                                                  mcp=False) as board:
        await board.listen_start("auto")
        tone = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 8000).astype("<i2").tobytes()
        sent = await board.stream_pcm(tone, realtime=False)
        frames = server.services.metrics.audio_frames_received.labels("xiaozhi")
        await _wait_for(lambda: _count(frames) >= sent)  # and the live microphone's silence after it
        assert _errors(server) == {}


# -- conversations (Whisper) ----------------------------------------------------------------------------


def _reply_pcm(board: XiaozhiEmulator) -> np.ndarray:
    return np.frombuffer(bytes(board.played_pcm), dtype="<i2")


@pytest.mark.slow
async def test_a_chinese_question_as_opus_is_heard_and_answered_in_opus(tmp_path, audio_fixtures, manifest) -> None:
    entry = next(e for e in manifest if e["id"] == "zh-00")
    async with _server_with_fake_ai(tmp_path) as (server, ai), \
            run_xiaozhi_emulator(_board_url(server), mcp=False) as board:
        await board.listen_start("auto")
        await board.stream_pcm(_clip(audio_fixtures, entry), realtime=False)
        await board.wait_for_tts("stop", timeout=60)
        await _wait_for(lambda: _completed_turns(server) == 1)
        (stt,) = board.of_type(wire.Stt)
        assert char_error_rate(entry["text"], stt.text, "zh") <= 0.15, stt.text
        # Order: stt, then tts start, sentences (each sentence_start closed by its sentence_end), stop.
        kinds = [(type(m.message).__name__, getattr(m.message, "state", None)) for m in board.messages
                 if not isinstance(m.message, (wire.ServerHello, wire.Llm))]
        assert kinds[0] == ("Stt", None) and kinds[1] == ("Tts", "start") and kinds[-1] == ("Tts", "stop")
        states = [state for _, state in kinds[2:-1]]
        assert states and states == ["sentence_start", "sentence_end"] * (len(states) // 2)
        sentences = [m.text for m in board.of_type(wire.Tts) if m.state == "sentence_start"]
        assert "".join(sentences) == "".join(r["body"]["input"] for r in ai.requests
                                             if r["path"].endswith("/audio/speech"))
        assert [m.emotion for m in board.of_type(wire.Llm)] == ["thinking", "happy"]
        # Audio came between tts start and stop only, all of it played, at the rate the hello announced.
        assert board.packets_dropped_not_speaking == 0 and board.packets_dropped_queue_full == 0
        assert board.opus_errors == 0 and board.packets_played == board.packets_received > 0
        reply = _reply_pcm(board)
        assert board.server_audio.sample_rate == 24000 and rms_dbfs(reply) > -40
        reply_text = "".join(sentences)
        assert len(reply) / 24000 == pytest.approx(len(reply_text) * 0.015, rel=0.2, abs=0.2)


@pytest.mark.slow
async def test_the_llm_calls_the_boards_own_tool(tmp_path, audio_fixtures, manifest) -> None:
    entry = next(e for e in manifest if e["id"] == "zh-00")
    fake = dataclasses.replace(SHORT_REPLIES, tool_calls=[
        {"name": "device__self_audio_speaker_set_volume", "arguments": {"volume": 30}}])
    async with _server_with_fake_ai(tmp_path, fake, llm_tools="true") as (server, ai), \
            run_xiaozhi_emulator(_board_url(server)) as board:
        (session,) = list(server.services.registry)
        with trio.fail_after(10):
            await session.device_tools.ready.wait()
        await board.listen_start("auto")
        await board.stream_pcm(_clip(audio_fixtures, entry), realtime=False)
        await board.wait_for_tts("stop", timeout=60)
        assert board.tool_calls == [("self.audio_speaker.set_volume", {"volume": 30})] and board.state["volume"] == 30
        chats = [r["body"] for r in ai.requests if r["path"].endswith("/chat/completions")]
        offered = {t["function"]["name"] for t in chats[0]["tools"]}
        assert {"device__self_get_device_status", "device__self_audio_speaker_set_volume"} <= offered
        assert chats[-1]["messages"][-1] == {"role": "tool", "tool_call_id": chats[-1]["messages"][-1]["tool_call_id"],
                                             "content": "true"}


@pytest.mark.slow
async def test_manual_mode_waits_for_listen_stop_and_abort_stops_the_reply(tmp_path, audio_fixtures,
                                                                             manifest) -> None:
    entry = next(e for e in manifest if e["id"] == "zh-01")
    long_reply = "这是一个关于小兔子的很长的故事。" * 12
    fake = FakeAiConfig(ttft_ms=100, tokens_per_s=200, tts_ms_per_char=60, reply=long_reply)
    async with _server_with_fake_ai(tmp_path, fake) as (server, ai), \
            run_xiaozhi_emulator(_board_url(server), mcp=False, version=3) as board:
        await board.listen_start("manual")
        # Two seconds of silence after the speech: in auto mode the VAD would have ended it long ago.
        await board.stream_pcm(_clip(audio_fixtures, entry, trailing_silence_s=2.0), realtime=False)
        await trio.sleep(1.5)
        assert board.of_type(wire.Stt) == [] and server.services.registry.get(board.session_id).turns == 0
        await board.listen_stop()
        await board.wait_until(lambda b: len(b.of_type(wire.Stt)) == 1, timeout=60)
        assert char_error_rate(entry["text"], board.of_type(wire.Stt)[0].text, "zh") <= 0.15
        # A long reply: the board aborts it after half a second of audio.
        await board.wait_until(lambda b: b.packets_played >= 8, timeout=30)
        await board.abort()
        await board.wait_for_tts("stop", timeout=5)
        stopped_at = trio.current_time()
        received = board.packets_received
        await trio.sleep(1.0)
        assert board.packets_received - received <= 1  # nothing of the old reply after stop
        await _wait_for(lambda: _count(server.services.metrics.turns.labels("interrupted")) == 1)
        assert trio.current_time() - stopped_at < 5
        assert len(_reply_pcm(board)) / 24000 < len(long_reply) * 0.06 / 2


@pytest.mark.slow
async def test_barge_in_in_realtime_mode_stops_the_reply(tmp_path, audio_fixtures, manifest) -> None:
    first, second = (next(e for e in manifest if e["id"] == i) for i in ("zh-00", "zh-02"))
    long_reply = "这是一个关于小兔子的很长的故事。" * 12
    fake = FakeAiConfig(ttft_ms=100, tokens_per_s=200, tts_ms_per_char=60, reply=long_reply)
    async with _server_with_fake_ai(tmp_path, fake) as (server, ai), \
            run_xiaozhi_emulator(_board_url(server), mcp=False, version=2) as board:
        await board.listen_start("realtime")
        await board.stream_pcm(_clip(audio_fixtures, first), realtime=False)
        await board.wait_until(lambda b: b.packets_played >= 8, timeout=60)
        # The board keeps its microphone open while it speaks (on-device AEC): the user talks over it.
        await board.stream_pcm(_clip(audio_fixtures, second), realtime=True)
        await board.wait_for_tts("stop", timeout=10)
        await _wait_for(lambda: _count(server.services.metrics.turns.labels("interrupted")) >= 1, timeout=10)
        await board.wait_until(lambda b: len(b.of_type(wire.Stt)) == 2, timeout=60)
        assert char_error_rate(second["text"], board.of_type(wire.Stt)[1].text, "zh") <= 0.15


@pytest.mark.slow
async def test_xiaozhi_native_and_xiaoai_sessions_are_served_at_once(tmp_path, audio_fixtures, manifest) -> None:
    entries = [next(e for e in manifest if e["id"] == i) for i in ("zh-00", "zh-01", "zh-02")]
    async with _server_with_fake_ai(tmp_path) as (server, ai):
        results: dict[str, str] = {}

        async def xiaozhi() -> None:
            async with run_xiaozhi_emulator(_board_url(server), mcp=False) as board:
                await board.listen_start("auto")
                await board.stream_pcm(_clip(audio_fixtures, entries[0]))
                await board.wait_for_tts("stop", timeout=90)
                results["xiaozhi"] = board.of_type(wire.Stt)[0].text
                assert rms_dbfs(_reply_pcm(board)) > -40

        async def xiaoai() -> None:
            async with run_emulator(server.ws_url) as emu:
                await emu.wait_for_request("start_recording")
                await emu.wait_for_request("start_play")
                await emu.stream_pcm(_clip(audio_fixtures, entries[1]))
                await emu.wait_until_played(24000, timeout=90)
                results["xiaoai"] = "played"

        async def native() -> None:
            async with open_native_client(server.ws_url, device_id="native-1") as client:
                outcome = await stream_wav_and_collect(client, _clip(audio_fixtures, entries[2], 0), speed=2.0,
                                                       timeout_s=60)
                assert outcome.failure is None and outcome.reply_audio_s > 0.3
                results["native"] = outcome.transcript

        async with trio.open_nursery() as nursery:
            for run in (xiaozhi, xiaoai, native):
                nursery.start_soon(run)
            await _wait_for(lambda: server.services.registry.count_by_protocol() == {
                "xiaozhi": 1, "xiaoai": 1, "native": 1}, timeout=30)
    assert char_error_rate(entries[0]["text"], results["xiaozhi"], "zh") <= 0.15
    assert results["xiaoai"] == "played"
    assert char_error_rate(entries[2]["text"], results["native"], "zh") <= 0.15


def test_the_encoder_makes_one_packet_per_60_ms_frame() -> None:
    encoder = OpusEncoder(24000)
    assert encoder.frame_samples == 1440
    packet = encoder.encode(bytes(1000))  # a short last frame is padded
    assert 0 < len(packet) < 400


def test_opus_cost_is_measured_per_second_of_audio() -> None:
    from bench.opus_cost import measure

    tone = (np.sin(np.arange(16000) * 2 * np.pi * 300 / 16000) * 6000).astype("<i2")
    report = measure(tone, repeat=1)
    assert report["audio_s"] == pytest.approx(0.96)  # whole 60 ms frames
    pyav = report["ms_cpu_per_audio_s"]["pyav complexity 5"]
    assert pyav["decode"] > 0 and pyav["encode"] > 0
