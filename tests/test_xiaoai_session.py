"""open-xiaoai speakers served end to end: the emulated Rust client against a real in-process server.

The emulator (``bench/xiaoai_emulator.py``) speaks the client's exact JSON and models its recorder and
player; raw WebSocket peers stand in for broken or hostile ones. Tests that hold a conversation use
real VAD and Whisper with the fake LLM/TTS service of ``bench``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from bench.fake_ai import FakeAiConfig
from bench.xiaoai_emulator import DEFAULT_MODEL, DEFAULT_SERIAL, SpeakerEmulator, recognize_result_line, run_emulator
from tests.session_support import completed_turns as _completed_turns
from tests.session_support import counter_value as _count
from tests.session_support import plain_server as _server
from tests.session_support import server_with_fake_ai as _server_with_fake_ai
from tests.session_support import wait_for as _wait_for
from tests.test_pipeline_e2e import _speech_onset_s  # the same onset rule as the native barge-in test
from voicegrow.audio import read_wav
from voicegrow.client import open_native_client, stream_wav_and_collect
from voicegrow.protocol import xiaoai as proto
from voicegrow.protocol.xiaoai import AudioConfig, Request, Response
from voicegrow.streaming.xiaoai import (
    CLOSE_REFUSED,
    RequestFailure,
    SpeakerRequestError,
    XiaoaiAccessPolicy,
    parse_silence_commands,
    speaker_identity,
)
from voicegrow.textmetrics import char_error_rate

RECORD_CONFIG = AudioConfig(sample_rate=16000, period_size=360, buffer_size=1440)
PLAY_CONFIG = AudioConfig(sample_rate=24000, period_size=360, buffer_size=1440)
DEVICE_ID = "xiaoai-" + DEFAULT_SERIAL.replace("/", "_")


def _clip(audio_fixtures: Path, entry: dict) -> bytes:
    samples, rate = read_wav(audio_fixtures / entry["file"])
    assert rate == 16000
    return samples.astype("<i2").tobytes()


def _chat_requests(ai) -> list[list[dict]]:
    return [r["body"]["messages"] for r in ai.requests if r["path"].endswith("/chat/completions")]


async def _armed(emu: SpeakerEmulator) -> None:
    """The speaker's microphone and player were started (answered) on its latest connection."""
    await emu.wait_for_request("start_recording")
    await emu.wait_for_request("start_play")


# -- raw peers --------------------------------------------------------------------------------------


async def _next_request(ws: WebSocketConnection, timeout: float = 5.0) -> Request:
    with trio.fail_after(timeout):
        while True:
            message = await ws.get_message()
            if isinstance(message, str):
                decoded = proto.decode_text(message)
                if isinstance(decoded, Request):
                    return decoded


async def _answer(ws: WebSocketConnection, request: Request, response: Response | None = None) -> None:
    await ws.send_message(proto.encode_text(response or Response(request.id, code=0, msg="success")))


async def _handshake_by_hand(ws: WebSocketConnection, serial: str = "RAW-1") -> list[Request]:
    """Play the speaker's part up to an armed session; returns the requests seen."""
    info = await _next_request(ws)
    assert info.command == "run_shell" and info.payload == proto.DEVICE_INFO_COMMAND
    await _answer(ws, info, Response(info.id, data={"exit_code": 0, "stderr": "", "stdout": f"LX06 {serial}\n"}))
    seen = [info]
    while not {"start_recording", "start_play"} <= {r.command for r in seen}:
        request = await _next_request(ws)
        seen.append(request)
        await _answer(ws, request)
    return seen


async def _expect_close(ws: WebSocketConnection, timeout: float = 5.0) -> int:
    with trio.fail_after(timeout), pytest.raises(ConnectionClosed):
        while True:
            await ws.get_message()
    return ws.closed.code


def _record_frame(pcm: bytes) -> bytes:
    return proto.encode_stream(proto.Stream(proto.new_id(), proto.RECORD_TAG, pcm))


# -- pure parts -------------------------------------------------------------------------------------


def test_identity_from_the_device_info_answer_or_the_address() -> None:
    answer = Response("r", data={"exit_code": 0, "stderr": "", "stdout": "LX06 27473/716890001\n"})
    identity = speaker_identity(answer, "10.0.0.7")
    assert (identity.device_id, identity.model, identity.serial) == ("xiaoai-27473_716890001", "LX06",
                                                                      "27473/716890001")
    failed = Response("r", data={"exit_code": 127, "stderr": "not found", "stdout": ""})
    for answer in (failed, Response("r", code=-1, msg="empty command"), None,
                   Response("r", data={"exit_code": 0, "stdout": "LX06"}), Response("r", data="junk")):
        assert speaker_identity(answer, "10.0.0.7").device_id == "xiaoai-ip-10.0.0.7"
    hostile = Response("r", data={"exit_code": 0, "stdout": "X ../../etc/" + "9" * 300})
    device_id = speaker_identity(hostile, "::1").device_id
    assert len(device_id) == 128 and "/" not in device_id


def test_access_policy_token_and_allowlist() -> None:
    open_door = XiaoaiAccessPolicy.from_settings_text("", "")
    assert open_door.url_refusal("/") is None and open_door.device_refusal("1.2.3.4", None) is None
    token = XiaoaiAccessPolicy.from_settings_text("s3cret", "")
    assert token.url_refusal("/") == "missing_token"
    assert token.url_refusal("/?token=wrong") == "bad_token"
    assert token.url_refusal("/?token=s3cret") is None
    assert token.url_refusal("/speaker?x=1&token=s3cret") is None
    listed = XiaoaiAccessPolicy.from_settings_text("", " 192.168.1.20 , SN-1,")
    assert listed.allowlist == {"192.168.1.20", "SN-1"}
    assert listed.device_refusal("192.168.1.20", None) is None
    assert listed.device_refusal("192.168.1.21", "SN-1") is None
    assert listed.device_refusal("192.168.1.21", "SN-2") == "not_allowlisted"
    assert listed.device_refusal("192.168.1.21", None) == "not_allowlisted"


def test_silence_commands_come_from_the_setting_or_the_codec() -> None:
    assert parse_silence_commands("") == proto.SILENCE_BUILTIN_COMMANDS
    assert parse_silence_commands(" echo a ;; ;;echo b") == ("echo a", "echo b")


# -- the driver against the emulator, no model --------------------------------------------------------


async def test_connect_identifies_then_arms_recording_and_playback(tmp_path) -> None:
    async with _server(tmp_path) as server, run_emulator(server.ws_url) as emu:
        await _armed(emu)
        first = emu.requests_seen[0]
        assert first.command == "run_shell" and first.payload == proto.DEVICE_INFO_COMMAND
        assert AudioConfig.from_payload(emu.requests_seen[1].payload) == RECORD_CONFIG
        assert emu.record_config == RECORD_CONFIG and emu.play_config == PLAY_CONFIG
        assert emu.recording and emu.playing
        (session,) = list(server.services.registry)
        assert (session.protocol, session.device_id) == ("xiaoai", DEVICE_ID)
        await emu.wait_until(lambda e: e.record_frames_sent >= 3)
        await _wait_for(lambda: _count(server.services.metrics.audio_frames_received.labels("xiaoai")) >= 3)


async def test_watchdog_restarts_a_recorder_that_went_silent(tmp_path) -> None:
    async with _server(tmp_path, xiaoai_record_watchdog_s=0.5) as server, run_emulator(server.ws_url) as emu:
        await _armed(emu)
        await emu.wait_until(lambda e: e.record_frames_sent >= 2)
        emu.stall_recorder()  # arecord went quiet: the client stops recording without a word
        assert not emu.recording
        await emu.wait_for_request("stop_recording", timeout=5)
        await emu.wait_for_request("start_recording", timeout=5)
        assert emu.recording
        before = emu.record_frames_sent
        await emu.wait_until(lambda e: e.record_frames_sent >= before + 3)
        # A recorder that keeps sending is left alone.
        await trio.sleep(1.0)
        assert [r.command for r in emu.requests_seen].count("stop_recording") == 1
        assert len(server.services.registry) == 1


async def test_malformed_messages_are_ignored_or_answered_and_the_session_goes_on(tmp_path) -> None:
    async with _server(tmp_path) as server, open_websocket_url(server.ws_url) as ws:
        metrics = server.services.metrics
        await ws.send_message("this is no JSON")  # also the first message: JSON text or not, open-xiaoai
        seen = await _handshake_by_hand(ws)
        garbage: list[str | bytes] = [
            '{"Event":{"id":"e1","event":"kws","data":42}}',  # wrong data shape
            '{"Event":{"id":"e2","event":"teleport","data":{}}}',  # unknown event
            '{"Event":{"id":"e3","event":"instruction","data":{"NewLine":"not json either"}}}',
            '{"Response":{"id":"nobody-asked","code":0,"msg":"success"}}',  # answers no request
            '{"Stream":{"id":"s","tag":"record","bytes":[1,2]}}',  # a Stream in a text message
            '[1,2,3]', '{"Request":{"id":"x"}}', "[" * 5000 + "]" * 5000,
            b"\xff\xfe not even UTF-8", b'{"id":"a","tag":"record","bytes":[1,2,300]}',
            b'{"id":"a","tag":"play","bytes":[1,2]}', b'{"id":"a","tag":"record"}',
        ]
        for message in garbage:
            await ws.send_message(message)
        # A request from the speaker (it has none): answered like the client answers unknown commands,
        # and nothing of it is ever run.
        await ws.send_message(proto.encode_text(Request("r-1", "run_shell", "rm -rf /")))
        with trio.fail_after(5):
            while True:
                message = await ws.get_message()
                if isinstance(message, str) and isinstance(answer := proto.decode_text(message), Response):
                    break
        assert answer == Response("r-1", code=-1, msg="command not found")
        # Still served: microphone audio is taken ...
        for _ in range(5):
            await ws.send_message(_record_frame(bytes(2880)))
        await _wait_for(lambda: _count(metrics.audio_frames_received.labels("xiaoai")) == 5)
        # ... and the built-in assistant's wake is still acted on, with the fixed script only.
        await ws.send_message(proto.encode_text(proto.Event("e4", "instruction", {
            "NewLine": recognize_result_line("", is_final=False)})))
        silence = await _next_request(ws)
        assert silence.command == "run_shell" and silence.payload == proto.ABORT_XIAOAI_COMMAND
        await _answer(ws, silence, Response(silence.id, data={"exit_code": 0, "stderr": "", "stdout": ""}))
        assert len(server.services.registry) == 1
        errors = {labels[0]: value for labels, value in _labelled(metrics.protocol_errors)}
        assert errors["xiaoai_invalid_json"] >= 1 and errors["xiaoai_bad_event"] == 1
        assert errors["xiaoai_unknown_event"] == 1 and errors["xiaoai_unexpected_request"] == 1
        assert errors["xiaoai_unexpected_stream"] == 1 and errors["xiaoai_byte_out_of_range"] == 1
        # Every bad message counted once: the garbage but the non-JSON log line and the stray answer
        # (no errors: the log is the assistant's, a late answer is normal), the first message, the request.
        assert sum(errors.values()) == len(garbage) - 2 + 2
        assert [r.command for r in seen] == ["run_shell", "start_recording", "start_play"]


def _labelled(counter) -> list[tuple[tuple[str, ...], float]]:
    found = []
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                found.append((tuple(sample.labels.values()), sample.value))
    return found


async def test_a_silent_peer_is_closed_at_the_handshake_deadline(tmp_path) -> None:
    async with _server(tmp_path, handshake_timeout_s=1.0) as server, open_websocket_url(server.ws_url) as ws:
        request = await _next_request(ws)  # it is asked who it is, and never answers
        assert request.command == "run_shell" and request.payload == proto.DEVICE_INFO_COMMAND
        assert await _expect_close(ws) == 1008
        await _wait_for(lambda: len(server.services.registry) == 0)
        assert _count(server.services.metrics.protocol_errors.labels("xiaoai_handshake_timeout")) == 1


async def test_allowlist_refuses_unknown_speakers_and_admits_listed_ones(tmp_path) -> None:
    async with _server(tmp_path, xiaoai_allowlist="192.0.2.1, SN-LISTED") as server:
        metrics = server.services.metrics
        async with run_emulator(server.ws_url, serial="SN-STRANGER") as stranger:
            await stranger.wait_until(lambda e: not e.connected)
            assert [r.command for r in stranger.requests_seen] == ["run_shell"]  # identified, never armed
            assert not stranger.recording
        assert _count(metrics.auth_refusals.labels("xiaoai", "not_allowlisted")) == 1
        async with open_websocket_url(server.ws_url) as ws:  # and the close code says why
            await ws.send_message('{"Event":{"id":"e","event":"playing","data":"Idle"}}')
            info = await _next_request(ws)
            await _answer(ws, info, Response(info.id, data={"exit_code": 0, "stderr": "", "stdout": "LX06 SN-X\n"}))
            assert await _expect_close(ws) == CLOSE_REFUSED
        async with run_emulator(server.ws_url, serial="SN-LISTED") as listed:
            await _armed(listed)
            assert listed.recording and listed.playing


async def test_token_in_the_url_when_one_is_configured(tmp_path) -> None:
    async with _server(tmp_path, xiaoai_token="s3cret") as server:
        metrics = server.services.metrics
        async with open_websocket_url(server.ws_url) as ws:
            assert await _expect_close(ws) == CLOSE_REFUSED
        async with open_websocket_url(server.ws_url + "/?token=guess") as ws:
            assert await _expect_close(ws) == CLOSE_REFUSED
        assert _count(metrics.auth_refusals.labels("xiaoai", "missing_token")) == 1
        assert _count(metrics.auth_refusals.labels("xiaoai", "bad_token")) == 1
        async with run_emulator(server.ws_url + "/?token=s3cret") as emu:
            await _armed(emu)
        # The token guards open-xiaoai only; native devices authenticate in HELLO.
        async with open_native_client(server.ws_url, device_id="native-next-door") as client:
            assert client.audio_out.sample_rate == 24000


async def test_a_reconnect_supersedes_the_old_session_and_rearms(tmp_path) -> None:
    async with _server(tmp_path) as server, run_emulator(server.ws_url) as emu:
        await _armed(emu)
        await emu.reconnect()
        await _armed(emu)
        assert emu.recording and emu.playing and emu.connections == 2
        await _wait_for(lambda: len(server.services.registry) == 1)
        (session,) = list(server.services.registry)
        assert session.device_id == DEVICE_ID


async def test_server_shutdown_closes_speaker_sessions_with_1001(tmp_path) -> None:
    codes: list[int] = []
    async with trio.open_nursery() as nursery:
        async with _server(tmp_path) as server:
            armed = trio.Event()

            async def speaker() -> None:
                async with open_websocket_url(server.ws_url) as ws:
                    await _handshake_by_hand(ws)
                    armed.set()
                    codes.append(await _expect_close(ws, timeout=10))

            nursery.start_soon(speaker)
            with trio.fail_after(5):
                await armed.wait()
    assert codes == [1001]


async def test_speaker_rpc_times_out_and_reports_refusals(tmp_path) -> None:
    from voicegrow.streaming.outbox import Outbox
    from voicegrow.streaming.xiaoai import SpeakerRpc

    sent: list[str] = []

    async def send(message: bytes | str) -> None:
        sent.append(message)

    outbox = Outbox(send, size=8, slow_reader_timeout_s=1.0)
    rpc = SpeakerRpc(outbox, timeout_s=0.2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        with pytest.raises(SpeakerRequestError) as timed_out:
            await rpc.call(proto.get_version())
        assert timed_out.value.code is RequestFailure.TIMEOUT
        late = proto.decode_text(sent[-1])
        assert not rpc.on_response(Response(late.id, data="1.0.0"))  # too late: nobody waits for it

        async def answer_last(response: Response) -> None:
            await _wait_for(lambda: len(sent) == 2, timeout=2)
            request = proto.decode_text(sent[-1])
            assert rpc.on_response(dataclasses.replace(response, id=request.id))

        nursery.start_soon(answer_last, Response("?", code=-1, msg="command not found"))
        with pytest.raises(SpeakerRequestError) as refused:
            await rpc.call(Request(proto.new_id(), "reboot"))
        assert refused.value.code is RequestFailure.REFUSED and "command not found" in refused.value.reason
        nursery.cancel_scope.cancel()


# -- conversations: real VAD and Whisper, the fake LLM/TTS ----------------------------------------------


@pytest.mark.slow
async def test_a_speaker_is_heard_answered_and_spoken_to(tmp_path, audio_fixtures, manifest) -> None:
    entry = next(e for e in manifest if e["id"] == "zh-00")
    async with _server_with_fake_ai(tmp_path) as (server, ai):
        assert "/" not in server.ws_url.removeprefix("ws://")  # the speaker's URL has no path
        async with run_emulator(server.ws_url) as emu:
            await _armed(emu)
            await emu.stream_pcm(_clip(audio_fixtures, entry), realtime=False)
            await _wait_for(lambda: _completed_turns(server) == 1, timeout=60)
            (messages,) = _chat_requests(ai)
            heard = messages[-1]["content"]
            assert char_error_rate(entry["text"], heard, "zh") <= 0.15, heard
            # The reply came back as play frames at 24 kHz, all of it, none dropped or cut.
            assert emu.play_writes and emu.play_config.sample_rate == 24000
            assert emu.play_frames_dropped == 0 and emu.play_bytes_cut == 0
            played_s = len(emu.played_pcm) / 48000
            (session,) = list(server.services.registry)
            assert session.turns == 1
        frames = server.services.metrics.audio_frames_received.labels("xiaoai")
        assert _count(frames) >= len(_clip(audio_fixtures, entry)) // 2880
    # The fake speaks 15 ms per character of what it was asked to say.
    reply_text = "".join(r["body"]["input"] for r in ai.requests if r["path"].endswith("/audio/speech"))
    assert played_s == pytest.approx(len(reply_text) * 0.015, rel=0.15)


@pytest.mark.slow
async def test_a_reconnect_mid_reply_rearms_and_the_conversation_goes_on(tmp_path, audio_fixtures,
                                                                         manifest) -> None:
    first, second = (next(e for e in manifest if e["id"] == i) for i in ("zh-00", "zh-02"))
    fake = FakeAiConfig(ttft_ms=100, tokens_per_s=80, tts_ms_per_char=40)  # ~1.8 s of reply
    async with _server_with_fake_ai(tmp_path, fake) as (server, ai):
        async with run_emulator(server.ws_url) as emu:
            await _armed(emu)
            await emu.stream_pcm(_clip(audio_fixtures, first), realtime=False)
            await emu.wait_until_played(48000, timeout=60)  # one second of the reply has been heard
            assert _completed_turns(server) == 0
            await emu.reconnect()
            await _armed(emu)  # a new connection is a new session: armed again
            assert emu.recording and emu.playing
            await emu.stream_pcm(_clip(audio_fixtures, second), realtime=False)
            await _wait_for(lambda: _completed_turns(server) == 1, timeout=60)
        with trio.fail_after(5):  # the turn saves the conversation after it is counted
            while len(stored := await server.services.persistence.load_history(DEVICE_ID)) < 4:
                await trio.sleep(0.05)
    first_messages, second_messages = _chat_requests(ai)
    heard_first = first_messages[-1]["content"]
    roles = [m["role"] for m in second_messages]
    assert roles[-3:] == ["user", "assistant", "user"]
    assert second_messages[-3]["content"] == heard_first  # the first exchange, carried over
    assert second_messages[-2]["content"]  # what was played of the interrupted reply
    assert char_error_rate(second["text"], second_messages[-1]["content"], "zh") <= 0.15
    assert [m["content"] for m in stored if m["role"] == "user"] == [heard_first, second_messages[-1]["content"]]


@pytest.mark.slow
async def test_barge_in_stops_the_speakers_playback_at_once(tmp_path, audio_fixtures, manifest) -> None:
    first, second = (next(e for e in manifest if e["id"] == i) for i in ("en-01", "en-02"))
    long_reply = " ".join(f"This is sentence number {i} of a very long story about a small rabbit."
                          for i in range(30))
    fake = FakeAiConfig(ttft_ms=100, tokens_per_s=200, tts_ms_per_char=60, reply=long_reply)
    barge_in_ms = 300
    async with _server_with_fake_ai(tmp_path, fake, barge_in_min_ms=barge_in_ms) as (server, ai):
        async with run_emulator(server.ws_url) as emu:
            await _armed(emu)
            await emu.stream_pcm(_clip(audio_fixtures, first), realtime=False)
            await emu.wait_until_played(24000, timeout=60)  # the reply is playing
            await trio.sleep(1.0)
            stopped_at: list[float] = []

            async def watch_for_stop() -> None:
                await emu.wait_for_request("stop_play", timeout=30)
                stopped_at.append(trio.current_time())

            interrupting = _clip(audio_fixtures, second)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_for_stop)
                talk_started = trio.current_time()
                await emu.stream_pcm(interrupting, realtime=True)  # talk over the reply, at speaking pace
            await emu.wait_for_request("start_play", timeout=10)  # the player is ready for the next reply
            await _wait_for(lambda: len(_chat_requests(ai)) == 2, timeout=60)
            assert emu.playing
    onset = talk_started + _speech_onset_s(interrupting)
    assert stopped_at[0] - onset <= (barge_in_ms + 300) / 1000, stopped_at[0] - onset
    # stop_play then start_play, in that order, and no stale audio in between.
    commands = [r.command for r in emu.requests_seen]
    assert commands.count("stop_play") == 1 and commands.index("stop_play") < len(commands) - 1
    assert emu.play_frames_dropped == 0
    assert "volume" in _chat_requests(ai)[-1][-1]["content"].lower()


@pytest.mark.slow
async def test_wake_word_interrupts_and_the_builtin_assistant_is_silenced(tmp_path, audio_fixtures,
                                                                          manifest) -> None:
    entry = next(e for e in manifest if e["id"] == "zh-01")
    fake = FakeAiConfig(ttft_ms=100, tokens_per_s=80, tts_ms_per_char=60)
    silence = "echo silence-one;;echo silence-two"
    async with _server_with_fake_ai(tmp_path, fake, xiaoai_silence_commands=silence) as (server, _ai):
        outputs = {"echo silence-one": ("", "", 0), "echo silence-two": ("", "", 0),
                   proto.DEVICE_INFO_COMMAND: (f"{DEFAULT_MODEL} {DEFAULT_SERIAL}\n", "", 0)}
        async with run_emulator(server.ws_url, shell_outputs=outputs) as emu:
            await _armed(emu)
            await emu.stream_pcm(_clip(audio_fixtures, entry), realtime=False)
            await emu.wait_until_played(24000, timeout=60)
            await emu.send_kws("小爱同学")
            await emu.wait_for_request("stop_play")
            await emu.wait_for_request("start_play")
            await _wait_for(lambda: _count(server.services.metrics.turns.labels("interrupted")) == 1)
            # The built-in assistant wakes: it is silenced with the operator's scripts, in order.
            await emu.send_instruction(recognize_result_line("", is_final=False))
            await emu.wait_until(lambda e: sum(r.command == "run_shell" for r in e.requests_seen) == 3)
    scripts = [r.payload for r in emu.requests_seen if r.command == "run_shell"]
    assert scripts == [proto.DEVICE_INFO_COMMAND, "echo silence-one", "echo silence-two"]


@pytest.mark.slow
async def test_native_and_xiaoai_sessions_are_served_at_the_same_time(tmp_path, audio_fixtures,
                                                                      manifest) -> None:
    zh = next(e for e in manifest if e["id"] == "zh-02")
    en = next(e for e in manifest if e["id"] == "en-00")
    async with _server_with_fake_ai(tmp_path) as (server, ai):
        results: dict[str, object] = {}

        async def native() -> None:
            async with open_native_client(server.ws_url, device_id="native-1") as client:
                results["native"] = await stream_wav_and_collect(client, _clip(audio_fixtures, en), speed=2.0,
                                                                 timeout_s=60)

        async def speaker() -> None:
            async with run_emulator(server.ws_url) as emu:
                await _armed(emu)
                await emu.stream_pcm(_clip(audio_fixtures, zh), realtime=False)
                await emu.wait_until(lambda e: len(e.played_pcm) >= 24000, timeout=60)
                results["xiaoai"] = emu

        async with trio.open_nursery() as nursery:
            nursery.start_soon(native)
            nursery.start_soon(speaker)
            await _wait_for(lambda: server.services.registry.count_by_protocol() == {"native": 1, "xiaoai": 1})
    native_result = results["native"]
    assert native_result.failure is None and native_result.reply_audio_s > 0.5
    assert char_error_rate(en["text"], native_result.transcript, "en") <= 0.15
    heard = {m[-1]["content"] for m in _chat_requests(ai)}
    assert any(char_error_rate(zh["text"], text, "zh") <= 0.15 for text in heard), heard
    assert results["xiaoai"].play_config.sample_rate == 24000
