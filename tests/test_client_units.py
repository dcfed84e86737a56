"""The native client and ``voicegrow talk`` against a tiny in-test server that speaks the protocol."""

from __future__ import annotations

import json
import socket
import struct
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import trio
import trio_websocket

from voicegrow import talk
from voicegrow.client import (
    ConnectFailed,
    ConnectionClosed,
    HandshakeFailed,
    open_native_client,
    stream_wav_and_collect,
)
from voicegrow.protocol import (
    Audio,
    AudioFormat,
    Close,
    Control,
    Error,
    ErrorCode,
    HelloAck,
    Ping,
    Pong,
    ServerConnectionState,
    decode_message,
    encode,
)

CLIP_S = 0.3
REPLY_RATE = 24000
REPLY_CHUNKS = [struct.pack("<4h", i, -i, 2 * i, -2 * i) * 120 for i in range(1, 4)]  # 3 × 20 ms
TIMINGS = {"speech_start": 0, "speech_end": 300, "asr_done": 420, "llm_first_token": 500,
           "first_sentence": 520, "tts_first_audio": 600, "first_audio_sent": 601, "last_audio_sent": 700}


def tone_16k(seconds: float = CLIP_S) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


@dataclass
class FakeServer:
    """Answers HELLO, waits for ``trigger_bytes`` of audio, then plays a scripted turn.

    ``mode``: "reply" (a noise turn, then the real turn), "refuse" (ERROR AUTH_FAILED), "silent"
    (HELLO_ACK, then never answers), "text" (a text message instead of HELLO_ACK), "close" (CLOSE
    right after the first audio), "noise" (only an empty turn).
    """

    port: int = 0
    mode: str = "reply"
    trigger_bytes: int = len(tone_16k())
    hellos: list = field(default_factory=list)
    audio: list = field(default_factory=list)
    received: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        state = ServerConnectionState()
        try:
            await self._session(ws, state)
        except trio_websocket.ConnectionClosed:
            pass

    async def _send(self, ws: trio_websocket.WebSocketConnection, state: ServerConnectionState,
                    frame: object) -> None:
        state.send(frame)  # type: ignore[arg-type]
        await ws.send_message(encode(frame))  # type: ignore[arg-type]

    async def _session(self, ws: trio_websocket.WebSocketConnection, state: ServerConnectionState) -> None:
        hello = decode_message(await ws.get_message())  # type: ignore[arg-type]
        state.receive(hello)
        self.hellos.append(hello)
        if self.mode == "refuse":
            await self._send(ws, state, Error(ErrorCode.AUTH_FAILED, "unknown device"))
            await ws.aclose(ErrorCode.AUTH_FAILED.ws_close_code)
            return
        if self.mode == "text":
            await ws.send_message('{"Event": {"id": "1", "event": "kws", "data": "Started"}}')
            await ws.get_message()
            return
        await self._send(ws, state, HelloAck("s-test", hello.audio_in, hello.audio_out, "fake/1"))  # type: ignore[union-attr]
        replied = False
        while True:
            frame = decode_message(await ws.get_message())  # type: ignore[arg-type]
            state.receive(frame)
            self.received.append(frame)
            if isinstance(frame, Close):
                await self._send(ws, state, Close(1000))
                return
            if isinstance(frame, Audio):
                self.audio.append(frame)
                if self.mode == "close":
                    await self._send(ws, state, Close(1001, "shutting down"))
                    return
                if self.mode in ("reply", "noise") and not replied and (
                        sum(len(a.pcm) for a in self.audio) >= self.trigger_bytes):
                    replied = True
                    await self._play_turns(ws, state, self.SCRIPT_NOISE if self.mode == "noise" else None)

    SCRIPT_NOISE = [
        Control("asr_final", {"text": " ", "lang": ""}, 1),  # noise: must be ignored
        Control("turn_end", {"outcome": "empty", "error": None}, 1),
        Control("turn_timings", {"speech_start": 0}, 1),
    ]

    async def _play_turns(self, ws: trio_websocket.WebSocketConnection, state: ServerConnectionState,
                          script: list | None) -> None:
        script = script or [
            *self.SCRIPT_NOISE,
            Ping(77),
            Control("asr_final", {"text": "what time is it", "lang": "en"}, 2),
            Control("llm_text", {"text": "It is "}, 2),
            Control("llm_text", {"text": "nine."}, 2),
            Control("tts_start", {"sample_rate": REPLY_RATE}, 2),
            Control("tts_sentence", {"text": "It is nine."}, 2),
            *[Audio(chunk, 2, seq) for seq, chunk in enumerate(REPLY_CHUNKS)],
            Audio(b"\x01\x00" * 8, 9),  # another turn's audio: not part of the reply
            Control("future_event", {"anything": [1, 2]}, 2),
            Control("tts_stop", {"reason": "done"}, 2),
            Control("turn_end", {"outcome": "completed", "error": None}, 2),
            Control("turn_timings", TIMINGS, 2),
        ]
        for frame in script:
            await self._send(ws, state, frame)


@pytest.fixture
async def server(nursery: trio.Nursery) -> FakeServer:
    fake = FakeServer()
    listener = await nursery.start(trio_websocket.serve_websocket, fake.handler, "127.0.0.1", 0, None)
    fake.port = listener.port
    return fake


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------

async def test_a_turn_is_streamed_and_its_reply_collected(server: FakeServer) -> None:
    clip = tone_16k()
    seen = []
    async with open_native_client(server.url, device_id="test-dev", token="t0k") as client:
        assert client.hello_ack is not None and client.hello_ack.session_id == "s-test"
        assert client.audio_out == AudioFormat(24000)
        result = await stream_wav_and_collect(client, clip, speed=10, timeout_s=10, on_event=seen.append)

    assert result.transcript == "what time is it" and result.lang == "en"
    assert result.turn_id == 2
    assert result.reply == "It is nine."
    assert result.timings_ms == TIMINGS
    assert result.reply_audio == b"".join(REPLY_CHUNKS)
    assert result.reply_sample_rate == REPLY_RATE
    assert result.reply_audio_s == pytest.approx(0.06)
    assert result.stop_reason == "done" and result.outcome == "completed"
    assert result.failure is None and not result.timed_out
    assert result.client_first_audio_s is not None and result.client_first_audio_s >= 0
    assert result.clip_sent_s is not None
    assert [e.event for e in result.events] == [
        "asr_final", "turn_end", "turn_timings", "asr_final", "llm_text", "llm_text", "tts_start",
        "tts_sentence", "future_event", "tts_stop", "turn_end", "turn_timings"]
    assert seen == result.events

    hello = server.hellos[0]
    assert (hello.device_id, hello.token, hello.audio_in, hello.audio_out) == (
        "test-dev", "t0k", AudioFormat(16000), AudioFormat(24000))
    sent = b"".join(frame.pcm for frame in server.audio)
    assert sent[:len(clip)] == clip and not any(sent[len(clip):])  # the clip, then silence
    assert [frame.seq for frame in server.audio] == list(range(len(server.audio)))
    assert all(len(frame.pcm) == 640 for frame in server.audio[:-1])
    with trio.fail_after(5):  # the client said goodbye, after answering the server's PING
        while not any(isinstance(frame, Close) for frame in server.received):
            await trio.sleep(0.01)
    assert any(isinstance(frame, Pong) and frame.nonce == 77 for frame in server.received)


@pytest.mark.parametrize(("mode", "code", "message"), [
    ("refuse", ErrorCode.AUTH_FAILED, "unknown device"),  # ERROR frame instead of HELLO_ACK
    ("text", ErrorCode.BAD_PAYLOAD, "does not speak the native protocol"),  # e.g. an open-xiaoai peer
])
async def test_failed_handshakes_carry_a_code(server: FakeServer, mode: str, code: ErrorCode,
                                              message: str) -> None:
    server.mode = mode
    with pytest.raises(HandshakeFailed) as excinfo:
        async with open_native_client(server.url):
            pass
    assert excinfo.value.error_code is code
    assert message in str(excinfo.value)


async def test_unreachable_server_is_a_connect_failure() -> None:
    with pytest.raises(ConnectFailed) as excinfo:
        async with open_native_client(f"ws://127.0.0.1:{unused_port()}/", connect_timeout_s=5):
            pass
    assert excinfo.value.code == "connect_failed"
    assert "cannot connect" in str(excinfo.value)


async def test_no_reply_ends_in_a_timeout(server: FakeServer) -> None:
    server.mode = "silent"
    async with open_native_client(server.url) as client:
        result = await stream_wav_and_collect(client, tone_16k(0.1), speed=10, timeout_s=0.3)
    assert result.timed_out and result.transcript == "" and result.reply_audio == b""
    assert result.client_first_audio_s is None


async def test_server_close_ends_the_session(server: FakeServer) -> None:
    server.mode = "close"
    async with open_native_client(server.url) as client:
        result = await stream_wav_and_collect(client, tone_16k(0.1), speed=10, timeout_s=5)
        assert result.failure is not None and "1001" in result.failure
        with pytest.raises(ConnectionClosed) as excinfo:
            await client.next_frame()
        assert excinfo.value.close_code == 1001
        assert [frame async for frame in client] == []


async def test_raw_frames_and_iteration(server: FakeServer) -> None:
    server.trigger_bytes = 640
    async with open_native_client(server.url) as client:
        await client.send_control("listen_start")
        await client.send_audio(bytes(640))
        frames = []
        async for frame in client:
            frames.append(frame)
            if isinstance(frame, Control) and frame.event == "turn_timings" and frame.turn_id == 2:
                break
    assert isinstance(frames[3], Ping) and frames[3].nonce == 77
    assert sum(isinstance(frame, Audio) for frame in frames) == 4
    assert Control("listen_start", {}) in [
        Control(f.event, f.data, f.turn_id) for f in server.received if isinstance(f, Control)]


# ---------------------------------------------------------------------------------------------------
# voicegrow talk

def write_wav(path: Path, pcm16k: bytes, rate: int, channels: int) -> None:
    """The tone at another rate and channel count, to exercise talk's conversion."""
    samples = np.frombuffer(pcm16k, "<i2").astype(np.float64)
    positions = np.arange(int(len(samples) * rate / 16000)) * 16000 / rate
    resampled = np.interp(positions, np.arange(len(samples)), samples).astype("<i2")
    frames = np.repeat(resampled, channels) if channels > 1 else resampled
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(frames.tobytes())


async def test_talk_json_output(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = tmp_path / "clip.wav"
    write_wav(clip, tone_16k(), 22050, 2)
    reply = tmp_path / "reply.wav"
    argv = ["--url", server.url, "--wav", str(clip), "--json", "--speed", "10", "--timeout", "10",
            "--device-id", "cli-dev", "--save-reply", str(reply)]
    server.trigger_bytes = int(CLIP_S * 16000) * 2 - 64  # resampling may round the length
    code = await trio.to_thread.run_sync(talk.main, argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert out.strip().count("\n") == 0
    assert set(summary) == {"transcript", "reply", "timings_ms", "reply_audio_s"}
    assert summary["transcript"] == "what time is it" and summary["reply"] == "It is nine."
    assert summary["timings_ms"] == TIMINGS and summary["reply_audio_s"] == pytest.approx(0.06)
    assert server.hellos[0].device_id == "cli-dev"
    with wave.open(str(reply), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getnframes()) == (REPLY_RATE, 1, 3 * 480)
    sent = np.frombuffer(b"".join(frame.pcm for frame in server.audio), "<i2")
    assert abs(len(np.flatnonzero(sent)) - int(CLIP_S * 16000)) < 200  # ≈ the clip's length at 16 kHz


async def test_talk_text_output(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = tmp_path / "clip.wav"
    write_wav(clip, tone_16k(), 16000, 1)
    code = await trio.to_thread.run_sync(talk.main, ["--url", server.url, "--wav", str(clip), "--speed", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "heard:  what time is it  [en]" in out and "reply:  It is nine." in out
    assert "asr_done 420" in out and "first reply audio" in out


def test_talk_reports_a_connection_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = tmp_path / "clip.wav"
    write_wav(clip, tone_16k(0.05), 16000, 1)
    code = talk.main(["--url", f"ws://127.0.0.1:{unused_port()}/", "--wav", str(clip), "--json"])
    out, err = capsys.readouterr()
    assert code != 0 and out == ""
    assert "voicegrow talk: cannot connect to ws://127.0.0.1:" in err


def test_talk_rejects_an_unreadable_wav(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip = tmp_path / "clip.wav"
    with wave.open(str(clip), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(8000)
        wav.writeframes(bytes(100))
    assert talk.main(["--url", "ws://127.0.0.1:1/", "--wav", str(clip)]) == 2
    assert "16-bit" in capsys.readouterr().err
    assert talk.main(["--url", "ws://127.0.0.1:1/", "--wav", str(tmp_path / "missing.wav")]) == 2


def test_talk_argument_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as excinfo:
        talk.main(["--url", "ws://x/", "--wav", "a.wav", "--speed", "0"])
    assert excinfo.value.code == 2


async def test_only_noise_is_reported_as_such(server: FakeServer) -> None:
    server.mode = "noise"
    async with open_native_client(server.url) as client:
        result = await stream_wav_and_collect(client, tone_16k(0.1), speed=10, timeout_s=0.3)
    assert result.timed_out and result.transcript == ""
    assert result.failure == "the server heard nothing intelligible (only empty turns)"
