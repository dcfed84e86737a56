"""The Wyoming listener, tested with the ``wyoming`` package's own asyncio client.

The client runs in a thread with its own asyncio loop (``trio.to_thread.run_sync``), against a whole
in-process VoiceGrow server: real Whisper ``base`` for the transcripts, the bench's fake TTS service
(a tone, so the audio is certainly not silent) for speech.
"""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, read_event, write_event
from wyoming.info import Describe, Info
from wyoming.tts import (Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped,
                         SynthesizeVoice)

from bench.fake_ai import FakeAiConfig, run_fake_ai
from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.audio import read_wav, resample, rms_dbfs, to_mono_int16
from voicegrow.protocol.wyoming import WyomingDecoder, WyomingProtocolError, encode_event
from voicegrow.settings import ConfigError, load_settings
from voicegrow.streaming import wyoming as wyoming_server
from voicegrow.textmetrics import char_error_rate
from voicegrow.pipeline.tts import PiperTts, RemoteTts


# -- the sans-IO codec against the package's own reader and writer ---------------------------------------

def _package_bytes(event: Event) -> bytes:
    out = io.BytesIO()
    write_event(event, out)
    return out.getvalue()


def test_decoder_reads_what_the_package_writes_byte_by_byte() -> None:
    events = [Describe().event(), Transcribe(language="zh").event(),
              AudioChunk(rate=16000, width=2, channels=1, audio=b"\x01\x02" * 300).event(),
              Synthesize(text="你好，世界", voice=SynthesizeVoice(name="v")).event()]
    wire = b"".join(_package_bytes(e) for e in events)
    decoder = WyomingDecoder(max_payload_bytes=4096)
    got: list[Event] = []
    for i in range(len(wire)):
        got += decoder.feed(wire[i:i + 1])
    assert [(e.type, e.payload) for e in got] == [(e.type, e.payload) for e in events]
    assert Synthesize.from_event(got[3]).text == "你好，世界"
    assert AudioChunk.from_event(got[2]).rate == 16000
    assert decoder.buffered == 0


def test_package_reads_what_the_encoder_writes() -> None:
    chunk = AudioChunk(rate=24000, width=2, channels=1, audio=b"\x00\x10" * 50)
    back = read_event(io.BytesIO(encode_event(chunk.event()) + encode_event(AudioStop().event())))
    assert back is not None and AudioChunk.is_type(back.type) and back.payload == chunk.audio
    assert AudioChunk.from_event(back).rate == 24000


@pytest.mark.parametrize("wire, code", [
    (b"not json\n", "bad_header"),
    (b'{"data": {}}\n', "bad_header"),
    (b'{"type": "audio-chunk", "payload_length": 999999}\n', "oversized"),
    (b'{"type": "x", "data_length": -1}\n', "bad_header"),
    (b'{"type": "x", "data_length": 2}\n[]', "bad_data"),
    (b"x" * 70000, "oversized"),
    (b"[" * 5000 + b"\n", "bad_header"),  # nested too deep for json: RecursionError, not ValueError
])
def test_decoder_refuses_bad_framing_with_a_code(wire: bytes, code: str) -> None:
    with pytest.raises(WyomingProtocolError) as caught:
        WyomingDecoder(max_payload_bytes=4096).feed(wire)
    assert caught.value.code == code


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.sampled_from([
    b"\n", b'{"type": "x"}\n', b'{"type": "audio-chunk", "payload_length": 4}\n', b'{"type": "t", "data_length": 2}\n',
    b"{}", b"[" * 5000, b'{"type": "x", "data": 1}\n'])), max_size=12))
def test_any_bytes_decode_or_raise_the_protocol_error(parts: list[bytes]) -> None:
    decoder = WyomingDecoder(max_payload_bytes=1024)
    try:
        for part in parts:
            for event in decoder.feed(part):
                assert isinstance(event.type, str) and isinstance(event.data, dict)
    except WyomingProtocolError as exc:
        assert exc.code in ("bad_header", "bad_data", "oversized")


def test_to_mono_int16_layouts() -> None:
    stereo = np.array([[1000, 3000], [-2000, -4000]], dtype="<i2").tobytes()
    assert to_mono_int16(stereo, 2, 2).tolist() == [2000, -3000]
    assert to_mono_int16(np.array([128, 255, 0], dtype=np.uint8).tobytes(), 1, 1).tolist() == [0, 32512, -32768]
    s24 = b"".join(int(v).to_bytes(3, "little", signed=True) for v in (0x123456, -0x123456))
    assert to_mono_int16(s24, 3, 1).tolist() == [0x1234, -0x1235]
    assert to_mono_int16(np.array([65536 * 7, -65536 * 7], dtype="<i4").tobytes(), 4, 1).tolist() == [7, -7]
    with pytest.raises(ValueError):
        to_mono_int16(b"\x00\x00\x00", 2, 1)


def test_wyoming_port_setting() -> None:
    assert load_settings({"WYOMING_PORT": ""}, env_file=None).wyoming_port == 0
    assert load_settings({}, env_file=None).wyoming_port == 0
    with pytest.raises(ConfigError, match="WYOMING_PORT"):
        load_settings({"WYOMING_PORT": "4399"}, env_file=None)
    with pytest.raises(ConfigError, match="WYOMING_PORT"):
        load_settings({"WYOMING_PORT": "70000"}, env_file=None)


def test_voices_listed_for_each_engine() -> None:
    piper = PiperTts()  # reads the voice's JSON config only; the model is not loaded
    assert wyoming_server._tts_voices(piper) == [("en_US-joe-medium", "en", piper.describe())]

    class Kokoro:
        voice = "jf_nezumi"

        def describe(self) -> str:
            return "kokoro"

    class Embedded:
        zh, en = Kokoro(), piper

    assert [v[:2] for v in wyoming_server._tts_voices(Embedded())] == [("jf_nezumi", "zh"), ("en_US-joe-medium", "en")]
    remote = RemoteTts("http://127.0.0.1:9", "", "", "tts-1", "same", "same", 1.0, 0.0, 5.0)

    class Fake:
        settings = load_settings({}, env_file=None)
        tts = remote

        class asr:
            @staticmethod
            def health() -> dict:
                return {"model": "base"}

    info = wyoming_server.describe_info(Fake())
    assert [(v.name, v.languages) for v in info.tts[0].voices] == [("same", ["zh", "en"])]
    assert info.asr[0].models[0].name == "base"


# -- a whole server through the package's client ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Run an asyncio coroutine function with the wyoming client in a thread of its own."""
    return await trio.to_thread.run_sync(lambda: asyncio.run(asyncio.wait_for(fn(*args), 120)))


async def _exchange(port: int, events: list[Event], until: str) -> list[Event]:
    """Send ``events``, then read until an event of type ``until`` (or ``error``) arrives."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        for event in events:
            await client.write_event(event)
        answers = []
        while (event := await client.read_event()) is not None:
            answers.append(event)
            if event.type in (until, "error"):
                break
        return answers


def _transcribe_events(audio_fixtures: Path, entry: dict, rate: int, channels: int) -> list[Event]:
    """The clip at another rate and channel count than the model's, as a microphone might send it."""
    samples, clip_rate = read_wav(audio_fixtures / entry["file"])
    pcm = np.repeat(resample(samples, clip_rate, rate)[:, None], channels, axis=1).astype("<i2").tobytes()
    step = rate * channels * 2 // 10  # 100 ms chunks
    chunks = [AudioChunk(rate=rate, width=2, channels=channels, audio=pcm[i:i + step]).event()
              for i in range(0, len(pcm), step)]
    return [Transcribe(language=entry["lang"]).event(), AudioStart(rate=rate, width=2, channels=channels).event(),
            *chunks, AudioStop().event()]


def _audio(answers: list[Event]) -> tuple[int, bytes]:
    types = [e.type for e in answers]
    assert types[0] == "audio-start" and "audio-stop" in types, types
    rate = AudioStart.from_event(answers[0]).rate
    pcm = b"".join(AudioChunk.from_event(e).audio for e in answers if e.type == "audio-chunk")
    return rate, pcm


@pytest.mark.slow
async def test_describe_transcribe_and_synthesize_two_clients_at_once(tmp_path: Path, audio_fixtures: Path,
                                                                       manifest: list[dict]) -> None:
    async with run_fake_ai(FakeAiConfig(tts_speedup=50.0)) as ai:
        settings = make_settings(tmp_path, wyoming_port=_free_port(), tts_base_url=ai.url, llm_base_url=ai.url,
                                 tts_voice_zh="zh-voice", tts_voice_en="en-voice")
        async with running_server(settings) as server:
            port = server.wyoming_port
            assert port == settings.wyoming_port

            answers = await _in_thread(_exchange, port, [Describe().event()], "info")
            info = Info.from_event(answers[-1])
            assert set(info.asr[0].models[0].languages) == {"zh", "en"}
            assert {(v.name, tuple(v.languages)) for v in info.tts[0].voices} == {("zh-voice", ("zh",)),
                                                                                  ("en-voice", ("en",))}
            assert info.tts[0].supports_synthesize_streaming

            clips = [next(e for e in manifest if e["lang"] == "zh"), next(e for e in manifest if e["lang"] == "en")]
            results: dict[str, list[Event]] = {}

            async def transcribe(entry: dict, rate: int, channels: int) -> None:
                results[entry["id"]] = await _in_thread(
                    _exchange, port, _transcribe_events(audio_fixtures, entry, rate, channels), "transcript")

            async def synthesize(name: str, events: list[Event], until: str) -> None:
                results[name] = await _in_thread(_exchange, port, events, until)

            async with trio.open_nursery() as nursery:  # four clients at once
                nursery.start_soon(transcribe, clips[0], 44100, 2)
                nursery.start_soon(transcribe, clips[1], 16000, 1)
                nursery.start_soon(synthesize, "plain",
                                   [Synthesize(text="Turn on the kitchen light.").event()], "audio-stop")
                nursery.start_soon(synthesize, "streamed", [
                    SynthesizeStart(voice=SynthesizeVoice(name="zh-voice")).event(),
                    SynthesizeChunk(text="好的，").event(), SynthesizeChunk(text="客厅的灯开了。现在").event(),
                    Synthesize(text="好的，客厅的灯开了。现在二十度。").event(),  # Home Assistant's copy: ignored
                    SynthesizeChunk(text="二十度。").event(), SynthesizeStop().event()], "synthesize-stopped")

            for entry in clips:
                transcript = Transcript.from_event(results[entry["id"]][-1])
                cer = char_error_rate(entry["text"], transcript.text, entry["lang"])
                assert cer <= 0.15, (entry["text"], transcript.text, cer)
                assert transcript.language == entry["lang"]

            rate, pcm = _audio(results["plain"])
            assert rate == 24000 and len(pcm) > 0.5 * rate * 2 and rms_dbfs(pcm) > -30
            streamed = results["streamed"]
            assert [e.type for e in streamed][-2:] == ["audio-stop", "synthesize-stopped"]
            assert [e.type for e in streamed].count("audio-start") == 1
            rate, pcm = _audio(streamed)
            assert len(pcm) > 0.5 * rate * 2 and rms_dbfs(pcm) > -30
            spoken = [r["body"]["input"] for r in ai.requests if r["path"] == "/v1/audio/speech"]
            assert "Turn on the kitchen light." in spoken
            # the streamed request went sentence by sentence; Home Assistant's whole copy was not spoken
            assert "好的，客厅的灯开了。现在二十度。" not in spoken and "现在二十度。" in spoken


async def test_bad_input_gets_error_events_and_the_listener_keeps_serving(tmp_path: Path) -> None:
    async with run_fake_ai(FakeAiConfig(tts_speedup=50.0)) as ai:
        settings = make_settings(tmp_path, wyoming_port=_free_port(), tts_base_url=ai.url, llm_base_url=ai.url,
                                 wyoming_max_audio_s=1)
        async with running_server(settings) as server:
            port = server.wyoming_port

            # broken framing: an error event, then that connection closes
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"this is not json\n")
            received = b""
            while chunk := await stream.receive_some(4096):
                received += chunk
            await stream.aclose()
            (event,) = WyomingDecoder(max_payload_bytes=1024).feed(received)
            assert Error.from_event(event).code == "bad_header"

            # request errors keep the connection: each answered, then a good request on the same one
            too_long = AudioChunk(rate=16000, width=2, channels=1, audio=b"\x00\x01" * 16000).event()
            answers = await _in_thread(_exchange, port, [
                Transcribe().event(), AudioStart(rate=16000, width=2, channels=1).event(), too_long, too_long,
                AudioStop().event()], "transcript")
            assert [Error.from_event(e).code for e in answers] == ["audio_too_long"]

            async def rest() -> list[Event]:
                async with AsyncTcpClient("127.0.0.1", port) as client:
                    for event in [AudioStart(rate=1, width=2, channels=1).event(),
                                  Synthesize(text="hi", voice=SynthesizeVoice(name="nobody")).event(),
                                  SynthesizeChunk(text="no start").event(),
                                  Event(type="synthesize", data={}),
                                  Synthesize(text="x" * 6000).event(),
                                  Synthesize(text="Still here.").event()]:
                        await client.write_event(event)
                    got = []
                    while (event := await client.read_event()) is not None:
                        got.append(event)
                        if event.type == "audio-stop":
                            return got
                    return got

            got = await _in_thread(rest)
            assert [Error.from_event(e).code for e in got if e.type == "error"] == [
                "bad_audio_format", "unknown_voice", "unexpected_event", "bad_event", "text_too_long"]
            rate, pcm = _audio([e for e in got if e.type != "error"])
            assert rms_dbfs(pcm) > -30


async def test_connections_over_the_cap_are_refused_with_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wyoming_server, "MAX_CONNECTIONS", 1)
    settings = make_settings(tmp_path, wyoming_port=_free_port(), tts_base_url="http://127.0.0.1:9")
    async with running_server(settings) as server:
        first = await trio.open_tcp_stream("127.0.0.1", server.wyoming_port)
        try:
            answers = await _in_thread(_exchange, server.wyoming_port, [Describe().event()], "info")
            assert Error.from_event(answers[-1]).code == "busy"
        finally:
            await first.aclose()
        for _ in range(200):  # until the first connection's task has seen the close
            answers = await _in_thread(_exchange, server.wyoming_port, [Describe().event()], "info")
            if Info.is_type(answers[-1].type):
                break
            await trio.sleep(0.05)
        assert Info.is_type(answers[-1].type)


@pytest.mark.slow
async def test_with_two_workers_worker_0_alone_serves_wyoming(tmp_path: Path) -> None:
    from tests.test_workers import running_box

    port = _free_port()
    async with running_box(tmp_path, WYOMING_PORT=str(port)) as box:
        answers = await _in_thread(_exchange, port, [Describe().event()], "info")
        assert set(Info.from_event(answers[-1]).asr[0].models[0].languages) == {"zh", "en"}
        listening = [line for line in box.output().splitlines() if "Wyoming listening" in line]
        assert len(listening) == 1, listening


@pytest.mark.slow
async def test_the_embedded_english_voice_speaks_through_wyoming(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, wyoming_port=_free_port())) as server:
        answers = await _in_thread(_exchange, server.wyoming_port, [Describe().event()], "info")
        voices = {v.name: v.languages for v in Info.from_event(answers[-1]).tts[0].voices}
        assert voices["en_US-joe-medium"] == ["en"]
        answers = await _in_thread(_exchange, server.wyoming_port, [
            Synthesize(text="The timer is set.", voice=SynthesizeVoice(name="en_US-joe-medium")).event()],
            "audio-stop")
        rate, pcm = _audio(answers)
        assert rate == server.services.tts.output_rate
        assert len(pcm) > 0.5 * rate * 2 and rms_dbfs(pcm) > -40
