"""The open-xiaoai speaker emulator against a tiny in-test server that plays the server's part.

Golden strings are what the Rust client writes (client-rust ``src/services/connect/data.rs`` field
order and ``skip_serializing_if``; ``src/bin/client.rs`` and ``handler.rs`` for the answers).
"""

from __future__ import annotations

import json
import re
import sys
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from bench.xiaoai_emulator import (
    DEFAULT_MODEL,
    DEFAULT_SERIAL,
    EmulatorError,
    PlaybackPipe,
    SpeakerEmulator,
    recognize_result_line,
    run_emulator,
)
from voicegrow.audio import read_wav
from voicegrow.protocol import xiaoai as proto
from voicegrow.protocol.xiaoai import AudioConfig, Request, Response

UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
RECORD_FRAME = re.compile(rb'\{"id":"' + UUID4.encode() + rb'","tag":"record","bytes":\[[0-9,]+\]\}')


class ServerSide:
    """The server's end of one speaker connection: sends requests, sorts what comes back."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.texts: list[str] = []
        self.record_frames: list[bytes] = []
        self.closed = trio.Event()
        self._changed = trio.Event()

    async def read_forever(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                if isinstance(message, str):
                    self.texts.append(message)
                else:
                    self.record_frames.append(message)
                self._changed.set()
                self._changed = trio.Event()
        except ConnectionClosed:
            self.closed.set()

    async def _until(self, predicate, timeout: float = 5.0):
        with trio.fail_after(timeout):
            while (found := predicate()) is None:
                await self._changed.wait()
        return found

    async def call(self, request: Request) -> str:
        """Send ``request`` and return the raw text of the speaker's answer."""
        await self.ws.send_message(proto.encode_text(request))

        def answered() -> str | None:
            for text in self.texts:
                if text.startswith('{"Response":') and f'"id":{json.dumps(request.id)}' in text:
                    return text
            return None

        return await self._until(answered)

    async def next_event_text(self, index: int = 0) -> str:
        return await self._until(lambda: ([t for t in self.texts if t.startswith('{"Event":')] + [None] * (index + 1))[index])

    async def record_pcm(self, min_frames: int) -> bytes:
        await self._until(lambda: True if len(self.record_frames) >= min_frames else None)
        return b"".join(proto.decode_binary(frame).bytes for frame in self.record_frames)

    async def send_play(self, pcm: bytes) -> None:
        await self.ws.send_message(proto.encode_stream(proto.Stream(proto.new_id(), proto.PLAY_TAG, pcm)))


class SpeakerServer:
    """Accepts speakers; each connection is handed to the test as a :class:`ServerSide`."""

    def __init__(self) -> None:
        self.url = ""
        self._send, self._receive = trio.open_memory_channel[ServerSide](8)

    async def _handle(self, request: WebSocketRequest) -> None:
        side = ServerSide(await request.accept())
        await self._send.send(side)
        await side.read_forever()

    async def next_connection(self, timeout: float = 5.0) -> ServerSide:
        with trio.fail_after(timeout):
            return await self._receive.receive()


@asynccontextmanager
async def speaker_server() -> AsyncIterator[SpeakerServer]:
    server = SpeakerServer()
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(partial(serve_websocket, server._handle, "127.0.0.1", 0, ssl_context=None))
        server.url = f"ws://127.0.0.1:{listener.port}"
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture
def speech_pcm(audio_fixtures: Path) -> bytes:
    samples, rate = read_wav(audio_fixtures / "zh-00.wav")
    assert rate == 16000
    return samples.tobytes()


async def test_speaker_sends_nothing_until_it_has_an_event():
    async with speaker_server() as server, run_emulator(server.url) as emu:
        side = await server.next_connection()
        await trio.sleep(0.3)  # a window in which a chatty client would have said hello
        assert side.texts == [] and side.record_frames == []
        assert emu.connected and emu.connections == 1
        assert not emu.recording and not emu.playing


async def test_answers_requests_as_the_client_does():
    async with speaker_server() as server, run_emulator(server.url, serial="SN-1", model="OH2P") as emu:
        side = await server.next_connection()
        version = Request("v-1", "get_version", None)
        assert await side.call(version) == '{"Response":{"id":"v-1","data":"1.0.0"}}'
        info = Request("s-1", "run_shell", proto.DEVICE_INFO_COMMAND)
        text = await side.call(info)
        assert text == '{"Response":{"id":"s-1","data":{"exit_code":0,"stderr":"","stdout":"OH2P SN-1\\n"}}}'
        reply = proto.decode_text(text)
        assert isinstance(reply, Response)
        assert proto.parse_device_info(reply.data["stdout"]) == {"model": "OH2P", "serial": "SN-1"}
        assert await side.call(Request("x-1", "reboot", None)) == (
            '{"Response":{"id":"x-1","code":-1,"msg":"command not found"}}')
        assert await side.call(Request("s-2", "run_shell", None)) == (
            '{"Response":{"id":"s-2","code":-1,"msg":"empty command"}}')
        assert await side.call(Request("s-3", "run_shell", 5)) == (
            '{"Response":{"id":"s-3","code":-1,"msg":"invalid type: integer `5`, expected a string"}}')
        unknown = json.loads(await side.call(Request("s-4", "run_shell", "touch /tmp/pwned")))
        assert unknown["Response"]["data"]["exit_code"] == 127
        assert unknown["Response"]["data"]["stdout"] == ""
        assert [r.command for r in emu.requests_seen] == [
            "get_version", "run_shell", "reboot", "run_shell", "run_shell", "run_shell"]


async def test_records_in_1440_sample_frames_and_plays_only_after_start_play(speech_pcm: bytes):
    async with speaker_server() as server, run_emulator(server.url) as emu:
        side = await server.next_connection()
        start = proto.start_recording()
        assert await side.call(start) == f'{{"Response":{{"id":"{start.id}","code":0,"msg":"success"}}}}'
        await emu.wait_for_request("start_recording")
        assert emu.recording and emu.record_config == AudioConfig()

        sent = await emu.stream_pcm(speech_pcm, realtime=False)
        assert sent == len(speech_pcm)
        frames_needed = -(-len(speech_pcm) // 2880)
        recorded = await side.record_pcm(frames_needed)
        assert speech_pcm in recorded
        assert all(RECORD_FRAME.fullmatch(frame) for frame in side.record_frames)
        assert {len(proto.decode_binary(frame).bytes) for frame in side.record_frames} == {2880}

        early = bytes(range(256)) * 10
        await side.send_play(early)  # before start_play: the client has no player and drops it
        await emu.wait_until(lambda e: len(e.play_frames) == 1)
        assert emu.play_frames_dropped == 1 and emu.played_pcm == b""

        assert (await side.call(proto.start_play())).endswith('"code":0,"msg":"success"}}')
        assert emu.playing and emu.play_config == AudioConfig(sample_rate=24000)
        chunks = [bytes([i]) * 4800 for i in range(1, 6)]
        for chunk in chunks:
            await side.send_play(chunk)
        await emu.wait_until_played(sum(map(len, chunks)))
        assert emu.played_pcm == b"".join(chunks)
        assert [f.accepted for f in emu.play_frames] == [False, True, True, True, True, True]
        assert emu.play_bytes_cut == 0

        await side.call(proto.stop_recording())
        assert not emu.recording
        with pytest.raises(EmulatorError):
            await emu.stream_pcm(b"\x00\x00")
        await side.call(proto.stop_play())
        assert not emu.playing


async def test_second_start_recording_keeps_the_first_config():
    async with speaker_server() as server, run_emulator(server.url) as emu:
        side = await server.next_connection()
        await side.call(proto.start_recording())
        second = await side.call(proto.start_recording(buffer_size=480, period_size=160))
        assert second.endswith('"code":0,"msg":"success"}}')
        assert emu.record_config is not None and emu.record_config.buffer_size == 1440
        await side.call(proto.stop_recording())
        await side.call(Request(proto.new_id(), "start_recording", {"pcm": "noop"}))  # unparsable config
        assert emu.record_config == proto.CLIENT_DEFAULT_AUDIO_CONFIG


async def test_events_have_the_client_shape():
    async with speaker_server() as server, run_emulator(server.url) as emu:
        side = await server.next_connection()
        kws = await emu.send_kws("小爱同学")
        assert await side.next_event_text(0) == (
            f'{{"Event":{{"id":"{kws.id}","event":"kws","data":{{"Keyword":"小爱同学"}}}}}}')
        await emu.send_kws(None)
        assert proto.parse_event(proto.decode_text(await side.next_event_text(1))) == proto.KwsStarted()

        await emu.send_instruction(recognize_result_line("今天天气怎么样", is_final=True))
        line = proto.parse_event(proto.decode_text(await side.next_event_text(2)))
        assert isinstance(line, proto.InstructionLine)
        assert line.recognize == proto.RecognizeResult("今天天气怎么样", True, False, False)

        await emu.send_playing(proto.PlayingState.PAUSED)
        text = await side.next_event_text(3)
        assert text.endswith('"event":"playing","data":"Paused"}}')
        assert proto.parse_event(proto.decode_text(text)) is proto.PlayingState.PAUSED
        status = json.loads(await side.call(Request("m", "run_shell", proto.PLAYBACK_STATUS_COMMAND)))
        assert status["Response"]["data"]["stdout"] == "2\n"


async def test_reconnect_starts_a_fresh_connection_with_nothing_running():
    async with speaker_server() as server, run_emulator(server.url) as emu:
        first = await server.next_connection()
        await first.call(proto.start_recording())
        await first.call(proto.start_play())
        await emu.reconnect()
        second = await server.next_connection()
        with trio.fail_after(5):
            await first.closed.wait()
        assert emu.connections == 2 and emu.connected
        assert not emu.recording and not emu.playing  # the server has to start both again
        version = await second.call(proto.get_version())
        assert version.endswith('"data":"1.0.0"}}')


async def test_auto_reconnect_after_the_server_hangs_up():
    async with speaker_server() as server, run_emulator(server.url, auto_reconnect=True) as emu:
        first = await server.next_connection()
        await first.ws.aclose()
        await server.next_connection()
        await emu.wait_until(lambda e: e.connections == 2 and e.connected)


async def test_without_auto_reconnect_the_speaker_stays_away_until_asked():
    async with speaker_server() as server, run_emulator(server.url) as emu:
        first = await server.next_connection()
        await emu.disconnect()
        await first.closed.wait()
        assert not emu.connected
        with pytest.raises(EmulatorError):
            await emu.send_kws("小爱同学")
        await emu.reconnect()
        await server.next_connection()


async def test_connect_gives_up_after_the_timeout():
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(EmulatorError):
        async with run_emulator(f"ws://127.0.0.1:{port}", connect_timeout=0.5, retry_interval=0.2):
            pass


async def test_a_chunk_that_cannot_be_written_in_100ms_is_cut():
    async with speaker_server() as server, run_emulator(server.url, pipe_buffer_bytes=0) as emu:
        side = await server.next_connection()
        await side.call(proto.start_play())
        await side.send_play(b"\x01\x02" * 4800)  # 200 ms of audio into a 60 ms buffer
        await emu.wait_until(lambda e: len(e.play_writes) == 1)
        write = emu.play_writes[0]
        assert write.offered == 9600
        assert 0 < write.accepted < 9600 and write.accepted % 2 == 0
        assert emu.play_bytes_cut == 9600 - write.accepted


def test_playback_pipe_blocks_then_cuts():
    pipe = PlaybackPipe(AudioConfig(sample_rate=24000, buffer_size=1440), pipe_bytes=0, write_timeout=0.1)
    assert pipe.capacity_bytes == 2880  # 60 ms at 24 kHz s16 mono
    assert pipe.write(10.0, 2400) == (0.0, 2400)  # 50 ms fits at once
    blocked, accepted = pipe.write(10.0, 2400)  # 100 ms queued > 60 ms: waits 40 ms for room
    assert blocked == pytest.approx(0.04) and accepted == 2400
    assert pipe.backlog_seconds(10.0) == pytest.approx(0.1)
    blocked, accepted = pipe.write(10.0, 9600)  # would need 240 ms: only 60 - 100 + 100 ms fit
    assert blocked == pytest.approx(0.1)
    assert accepted == 2880
    assert pipe.backlog_seconds(11.0) == 0.0
    assert pipe.write(11.0, 4800) == (pytest.approx(0.04), 4800)


@pytest.mark.slow
async def test_realtime_record_frames_every_90ms(speech_pcm: bytes):
    async with speaker_server() as server, run_emulator(server.url) as emu:
        side = await server.next_connection()
        await side.call(proto.start_recording())
        clip = speech_pcm[: 5 * 2880]
        assert await emu.stream_pcm(clip) == len(clip)
        recorded = await side.record_pcm(5)
        assert clip in recorded
        # pacing itself is measured in bench/, not asserted here


@pytest.mark.slow
async def test_command_line_streams_a_wav_and_saves_what_it_played(audio_fixtures: Path, tmp_path: Path):
    out = tmp_path / "played.wav"
    played = bytes(range(1, 201)) * 24  # 100 ms at 24 kHz
    async with speaker_server() as server, trio.open_nursery() as nursery:
        async def drive() -> None:
            side = await server.next_connection(timeout=30)
            await side.call(proto.start_recording())
            await side.call(proto.start_play())
            await side.send_play(played)
            await side.record_pcm(3)

        nursery.start_soon(drive)
        result = await trio.run_process(
            [sys.executable, "-m", "bench.xiaoai_emulator", "--url", server.url, "--wav",
             str(audio_fixtures / "en-00.wav"), "--duration", "1.5", "--save-play", str(out), "--kws", "hi"],
            capture_stdout=True, cwd=Path(__file__).resolve().parents[1])
    summary = json.loads(result.stdout)
    assert summary["requests"] == ["start_recording", "start_play"]
    assert summary["events_sent"] == ["kws"]
    assert summary["record_frames_sent"] >= 3
    with wave.open(str(out), "rb") as wav:
        assert wav.getframerate() == 24000
        assert wav.readframes(wav.getnframes()) == played


def test_defaults_are_those_of_a_real_lx06():
    emu = SpeakerEmulator("ws://127.0.0.1:4399")
    assert (emu.model, emu.serial, emu.version) == (DEFAULT_MODEL, DEFAULT_SERIAL, "1.0.0")
    assert emu.play_queue_chunks == 50 and emu.play_write_timeout == 0.1
