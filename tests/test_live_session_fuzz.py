"""Hostile frame sequences against a live server over a real WebSocket on loopback.

Hypothesis draws sequences of messages — valid frames, frames out of order, audio before hello, a
second hello, huge and deeply nested JSON, invalid UTF-8, text messages, truncated frames and random
bytes — and each one goes to a fresh connection of one running server. What the server must do is
predicted by running the same messages through the sans-IO codec and state machine
(:func:`predict`): the first message the protocol refuses gets an ERROR frame with its code and a
close with the documented close code; what the protocol allows is answered (HELLO_ACK, PONG) or
ignored. After every sequence the session must be gone from the registry (no stuck task), a
well-behaved client must still get a PONG, and the server's log must hold no crash.

The examples run in a worker thread that calls back into the test's trio run
(``trio.from_thread.run``), so hypothesis keeps its shrinking while one server serves them all. A
failure prints the shrunk sequence and a ``@reproduce_failure`` blob.

The server runs with a minimum utterance longer than any sequence's audio: no turn (and so no ASR
model load) ever starts, which keeps 200 sequences within seconds; turns are exercised elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.conftest import make_settings
from voicegrow.app import ServerHandle, running_server
from voicegrow.client import open_native_client
from voicegrow.protocol import native as wire
from voicegrow.protocol import xiaoai as xproto
from voicegrow.protocol.errors import ErrorCode, ProtocolError

#: No turns (minimum speech longer than any sequence's audio), no speculative ASR, no connect-rate
#: limit (a run opens ~400 connections from one address within seconds).
MAX_FRAME_BYTES = 256 * 1024
SERVER_OVERRIDES = {"vad_min_speech_ms": 10_000, "asr_speculative": "false",
                    "max_connects_per_ip_per_min": 1_000_000, "max_frame_bytes": MAX_FRAME_BYTES}
#: The WebSocket layer's own message limit in server.py (room for open-xiaoai JSON audio).
WS_MAX_MESSAGE = max(4 * MAX_FRAME_BYTES, 1 << 20)
PROBE_NONCE = 0xFEED_F00D_0000_0001
STEP_TIMEOUT_S = 10.0
HYPOTHESIS = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])


# -- building messages ------------------------------------------------------------------------------

def raw_frame(frame_type: int, payload: bytes, *, flags: int = 0, turn_id: int = 0, seq: int = 0,
              timestamp_ms: int = 0, declared: int | None = None, magic: bytes = wire.MAGIC,
              version: int = wire.VERSION) -> bytes:
    """A frame built byte by byte, so that it can break any rule the encoder would refuse to break."""
    length = len(payload) if declared is None else declared
    return struct.pack("!2sBBIIIII", magic, version, frame_type, flags, turn_id, seq, timestamp_ms,
                       length) + payload


def json_frame(frame_type: int, text: str | bytes) -> bytes:
    return raw_frame(frame_type, text.encode("utf-8") if isinstance(text, str) else text)


class Blob(bytes):
    """A big message that prints as its size, so that a failure report shows the sequence, not megabytes."""

    def __repr__(self) -> str:
        return f"Blob({bytes(self[:32])!r} + {len(self) - 32} more bytes)"


u32 = st.integers(0, 0xFFFF_FFFF)
device_ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,20}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
audio_formats = st.builds(wire.AudioFormat, sample_rate=st.sampled_from([8000, 16000, 22050, 24000, 44100, 48000])
                          | st.integers(8000, 48000), channels=st.sampled_from([1, 2]))
format_json = st.fixed_dictionaries({"sample_rate": st.integers(-10, 100_000) | json_values},
                                    optional={"channels": st.integers(0, 3), "sample_width": st.integers(0, 4),
                                              "codec": st.sampled_from(["pcm_s16le", "opus", ""])})
events = st.sampled_from(sorted(wire.DEVICE_EVENTS | wire.SERVER_EVENTS) + ["auth", "future_event", "Bad-Name", ""])


@st.composite
def valid_hello(draw: st.DrawFn) -> bytes:
    return wire.encode(wire.Hello(draw(device_ids), draw(audio_formats), draw(audio_formats),
                                  token=draw(st.none() | st.text(max_size=20)), client=draw(st.text(max_size=20)),
                                  timestamp_ms=draw(u32)))


@st.composite
def odd_hello(draw: st.DrawFn) -> bytes:
    """HELLO JSON with any keys missing, mistyped or out of range."""
    obj = draw(st.fixed_dictionaries({}, optional={
        "device_id": device_ids | json_values, "audio_in": format_json | json_values,
        "audio_out": format_json | json_values, "token": json_values, "capabilities": json_values,
        "client": json_values}))
    return json_frame(wire.FrameType.HELLO, wire_json(obj))


def wire_json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


@st.composite
def control(draw: st.DrawFn) -> bytes:
    data = draw(st.dictionaries(st.sampled_from(["text", "lang", "reason", "sample_rate", "outcome", "hmac"])
                                | st.text(max_size=6), json_values, max_size=4) | json_values)
    body = {"event": draw(events | json_values), "data": data}
    if draw(st.booleans()):
        del body["data"]
    return raw_frame(wire.FrameType.CONTROL, wire_json(body).encode(), turn_id=draw(u32), seq=draw(u32),
                     timestamp_ms=draw(u32))


@st.composite
def audio(draw: st.DrawFn) -> bytes:
    """Small PCM (odd lengths included); at most 3200 bytes, so no sequence nears the audio-rate burst."""
    pcm = draw(st.binary(max_size=3200) | st.integers(0, 1600).map(lambda n: bytes(2 * n)))
    return raw_frame(wire.FrameType.AUDIO, pcm, flags=draw(u32), turn_id=draw(u32), seq=draw(u32),
                     timestamp_ms=draw(u32))


@st.composite
def nonce_frame(draw: st.DrawFn) -> bytes:
    frame_type = draw(st.sampled_from([wire.FrameType.PING, wire.FrameType.PONG]))
    payload = draw(st.integers(0, 2**64 - 1).map(lambda n: n.to_bytes(8, "big")) | st.binary(max_size=12))
    return raw_frame(frame_type, payload, timestamp_ms=draw(u32))


@st.composite
def code_reason_frame(draw: st.DrawFn) -> bytes:
    frame_type = draw(st.sampled_from([wire.FrameType.ERROR, wire.FrameType.CLOSE]))
    reason = draw(st.text(max_size=40).map(str.encode) | st.binary(max_size=40)
                  | st.just(b"x" * (wire.MAX_REASON_BYTES + 1)))
    code = draw(st.integers(0, 0xFFFF).map(lambda c: c.to_bytes(2, "big")) | st.binary(max_size=1))
    return raw_frame(frame_type, code + reason)


@st.composite
def hello_ack_from_device(draw: st.DrawFn) -> bytes:
    return wire.encode(wire.HelloAck(draw(device_ids), draw(audio_formats), draw(audio_formats), server="fake"))


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    whole = draw(valid_frame)
    return whole[: draw(st.integers(0, len(whole) - 1))]


@st.composite
def trailing(draw: st.DrawFn) -> bytes:
    return draw(valid_frame) + draw(st.binary(min_size=1, max_size=30))


@st.composite
def broken_header(draw: st.DrawFn) -> bytes:
    """Wrong magic or version, an unknown type, or a declared length beyond the limit."""
    kind = draw(st.sampled_from(["magic", "version", "type", "length"]))
    payload = draw(st.binary(max_size=16))
    if kind == "magic":
        return raw_frame(wire.FrameType.PING, payload, magic=draw(st.binary(min_size=2, max_size=2)))
    if kind == "version":
        return raw_frame(wire.FrameType.PING, payload, version=draw(st.integers(0, 255)))
    if kind == "type":
        return raw_frame(draw(st.integers(0, 255)), payload)
    return raw_frame(draw(st.sampled_from(list(wire.FrameType))), payload,
                     declared=draw(st.integers(MAX_FRAME_BYTES + 1, 0xFFFF_FFFF)))


@st.composite
def huge_json(draw: st.DrawFn) -> bytes:
    """Over the 64 KiB JSON limit (but under the frame limit)."""
    size = draw(st.integers(wire.MAX_JSON_BYTES - 40, wire.MAX_JSON_BYTES + 4096))
    frame_type = draw(st.sampled_from([wire.FrameType.CONTROL, wire.FrameType.HELLO]))
    return Blob(json_frame(frame_type, '{"event":"llm_text","data":{"text":"' + "x" * size + '"}}'))


@st.composite
def deep_json(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(14, 20) | st.integers(1000, 30_000))
    frame_type = draw(st.sampled_from([wire.FrameType.CONTROL, wire.FrameType.HELLO]))
    return Blob(json_frame(frame_type, '{"event":"x","data":{"d":' + "[" * depth + "]" * depth + "}}"))


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"]))
    frame_type = draw(st.sampled_from([wire.FrameType.CONTROL, wire.FrameType.HELLO, wire.FrameType.ERROR]))
    if frame_type == wire.FrameType.ERROR:
        return raw_frame(frame_type, b"\x00\x07" + bad)
    return json_frame(frame_type, b'{"event":"llm_text","data":{"text":"' + bad + b'"}}')


valid_frame = st.one_of(
    valid_hello(), audio().filter(lambda m: len(m) % 2 == 0),
    st.builds(lambda n: wire.encode(wire.Ping(n)), st.integers(0, 2**64 - 1)),
    st.builds(lambda n: wire.encode(wire.Pong(n)), st.integers(0, 2**64 - 1)),
    st.builds(lambda e: wire.encode(wire.Control(e)), st.sampled_from(sorted(wire.DEVICE_EVENTS))),
    st.builds(lambda c, r: wire.encode(wire.Error(c, r)), st.integers(0, 0xFFFF), st.text(max_size=20)),
    st.builds(lambda c: wire.encode(wire.Close(c, "bye")), st.sampled_from([1000, 1001, 4000])),
)

#: The WebSocket layer's limit, one byte over: refused before any frame is decoded.
GIANT_MESSAGE = Blob(b"VG" + bytes(WS_MAX_MESSAGE - 1))
giant_message = st.just(GIANT_MESSAGE)

message = st.one_of(
    valid_frame, valid_frame, odd_hello(), control(), audio(), nonce_frame(), code_reason_frame(),
    hello_ack_from_device(), truncated(), trailing(), broken_header(), huge_json(), deep_json(),
    invalid_utf8(), st.text(max_size=40), st.binary(max_size=64), giant_message,
)


def _native_first(messages: list[bytes | str]) -> list[bytes | str]:
    """A first message that is text or starts with '{' would select the open-xiaoai protocol."""
    first = messages[0]
    if isinstance(first, str) or first[:1] == b"{":
        return [b"\x00" + (first.encode("utf-8") if isinstance(first, str) else first), *messages[1:]]
    return messages


native_sequences = st.lists(message, min_size=1, max_size=8).map(_native_first)


# -- what the server must do ------------------------------------------------------------------------

@dataclasses.dataclass
class Prediction:
    """The server's answers in order, ``("hello_ack", formats)``, ``("pong", nonce)``, ``("error",
    code)``, and how the connection ends: its close code, or None if the session stays open."""

    answers: list[tuple[str, Any]]
    close_code: int | None = None
    handshaken: bool = False
    #: Closing frames the server may add before ``close_code`` (the docs let a peer answer CLOSE).
    optional_last: tuple[tuple[str, Any], ...] = ()


def _size(message: bytes | str) -> int:
    return len(message.encode("utf-8")) if isinstance(message, str) else len(message)


def predict(messages: list[bytes | str]) -> Prediction:
    """Run the messages through the codec and the state machine, as the server must."""
    state = wire.ServerConnectionState()
    answers: list[tuple[str, Any]] = []
    for message in messages:
        if _size(message) > WS_MAX_MESSAGE:  # refused by the WebSocket layer, before the protocol sees it
            return Prediction(answers, 1009)
        try:
            if isinstance(message, str):
                raise ProtocolError(ErrorCode.BAD_PAYLOAD, "text message")
            frame = wire.decode_message(message, max_payload=MAX_FRAME_BYTES)
            state.receive(frame)
        except ProtocolError as exc:
            answers.append(("error", exc.code))
            return Prediction(answers, exc.ws_close_code)
        if isinstance(frame, wire.Hello):
            answers.append(("hello_ack", (frame.audio_in, frame.audio_out)))
        elif isinstance(frame, wire.Ping):
            answers.append(("pong", frame.nonce))
        elif isinstance(frame, wire.Close):
            return Prediction(answers, 1000, optional_last=(("close", 1000),))
    return Prediction(answers, None, handshaken=state.hello is not None)


def observed(frame: wire.Frame) -> tuple[str, Any]:
    if isinstance(frame, wire.HelloAck):
        assert frame.session_id and frame.capabilities.get("max_payload") == MAX_FRAME_BYTES
        return ("hello_ack", (frame.audio_in, frame.audio_out))
    if isinstance(frame, wire.Pong):
        return ("pong", frame.nonce)
    if isinstance(frame, wire.Error):
        assert frame.reason, "an ERROR frame without a reason"
        return ("error", frame.code)
    if isinstance(frame, wire.Close):
        return ("close", frame.code)
    return (type(frame).__name__, frame)


PROBE_HELLO = wire.Hello("probe", wire.AudioFormat(16000), wire.AudioFormat(24000))


# -- the live checks --------------------------------------------------------------------------------

class CrashLog(logging.Handler):
    """ERROR records of the server and of trio-websocket: a crashed session or handler shows here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        lines = [f"{r.name}: {r.getMessage()}" + (f" ({r.exc_info[1]!r})" if r.exc_info else "")
                 for r in self.records]
        self.records.clear()
        return lines


@contextlib.contextmanager
def crash_log() -> Iterator[CrashLog]:
    handler = CrashLog()
    loggers = [logging.getLogger("voicegrow"), logging.getLogger("trio-websocket")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


async def _send_all(ws: WebSocketConnection, messages: list[bytes | str]) -> None:
    for item in messages:
        try:
            await ws.send_message(item)
        except (ConnectionClosed, trio.BrokenResourceError):
            return  # the server has hung up: what it answered is checked next


async def _frames_until(ws: WebSocketConnection, stop: Any) -> tuple[list[tuple[str, Any]], int | None]:
    """Decoded server frames until ``stop(frame)`` or the close; and the close code (None if open)."""
    got: list[tuple[str, Any]] = []
    try:
        while True:
            frame = wire.decode_message(await ws.get_message())  # a server frame that does not decode fails here
            got.append(observed(frame))
            if stop(frame):
                return got, None
    except ConnectionClosed:
        assert ws.closed is not None
        return got, ws.closed.code


async def check_native_sequence(server: ServerHandle, log: CrashLog, messages: list[bytes | str]) -> None:
    expected = predict(messages)
    with trio.fail_after(STEP_TIMEOUT_S):
        async with open_websocket_url(server.ws_url, message_queue_size=64,
                                      max_message_size=2 * WS_MAX_MESSAGE) as ws:
            await _send_all(ws, messages)
            answers = list(expected.answers)
            if expected.close_code is None:  # the session must still be alive and in step
                if not expected.handshaken:
                    await ws.send_message(wire.encode(PROBE_HELLO))
                    answers.append(("hello_ack", (PROBE_HELLO.audio_in, PROBE_HELLO.audio_out)))
                await ws.send_message(wire.encode(wire.Ping(PROBE_NONCE)))
                answers.append(("pong", PROBE_NONCE))
            got, close_code = await _frames_until(
                ws, lambda f: isinstance(f, wire.Pong) and f.nonce == PROBE_NONCE)
        if got[len(answers):] and tuple(got[len(answers):]) == expected.optional_last:
            got = got[: len(answers)]
        if close_code == 1009 and any(_size(m) > WS_MAX_MESSAGE for m in messages):
            # trio-websocket reads ahead of the session: a message over its limit closes the
            # connection at once, before the session has answered the messages sent before it.
            answers = answers[: len(got)]
            expected = dataclasses.replace(expected, close_code=1009)
        assert (got, close_code) == (answers, expected.close_code), (
            f"server answered {got} and closed with {close_code}; expected {answers} and {expected.close_code}")
    await check_server_healthy(server, log)


async def check_server_healthy(server: ServerHandle, log: CrashLog) -> None:
    """No session left behind, nothing crashed, and a new, well-behaved client is served."""
    registry = server.services.registry
    with trio.fail_after(STEP_TIMEOUT_S):
        await registry.wait_empty()
        async with open_native_client(server.ws_url, device_id="checker") as client:
            await client.send(wire.Ping(nonce=42))
            while not isinstance(frame := await client.next_frame(), wire.Pong):
                pass
            assert frame.nonce == 42
        await registry.wait_empty()
    assert not (crashes := log.take()), f"the server logged errors: {crashes}"


async def test_random_frame_sequences_end_in_an_error_or_are_ignored(tmp_path) -> None:
    with crash_log() as log:
        async with running_server(make_settings(tmp_path, **SERVER_OVERRIDES)) as server:

            @settings(max_examples=200, **HYPOTHESIS)
            @given(native_sequences)
            def every_sequence(messages: list[bytes | str]) -> None:
                trio.from_thread.run(check_native_sequence, server, log, messages)

            await trio.to_thread.run_sync(every_sequence)  # each example calls back into this trio run
            assert len(server.services.registry) == 0


@pytest.mark.parametrize("first", [wire.Error(int(ErrorCode.BAD_AUDIO), "device-side error"), wire.Close(1000, "bye")],
                         ids=["error", "close"])
async def test_error_or_close_before_hello_does_not_crash_the_session(tmp_path, first: wire.Frame) -> None:
    """docs/protocol.md: "The device's first frame is HELLO, sent once. Before it, only ERROR and CLOSE
    are allowed." An ERROR is ignored (the HELLO after it is answered); a CLOSE ends the session with
    a normal close (1000)."""
    with crash_log() as log:
        async with running_server(make_settings(tmp_path, **SERVER_OVERRIDES)) as server:
            await check_native_sequence(server, log, [wire.encode(first)])


async def test_an_oversized_message_while_the_server_closes_does_not_stop_the_server(tmp_path) -> None:
    """Found by the sequence test: a protocol error (here an empty message) makes the session close
    the WebSocket; a message over the WebSocket size limit arriving during that close makes
    trio-websocket send a 1009 close in the CLOSING state, and wsproto's LocalProtocolError escapes
    its reader task into the server's handler nursery, which takes the whole server down."""
    with crash_log() as log:
        async with running_server(make_settings(tmp_path, **SERVER_OVERRIDES)) as server:
            await check_native_sequence(server, log, [b"", GIANT_MESSAGE])


# -- the open-xiaoai side ------------------------------------------------------------------------------

texts = st.text(max_size=60)  # hypothesis leaves out lone surrogates, which a text message cannot carry
ids = st.text(max_size=10) | st.uuids().map(str)
xiaoai_text_junk = st.one_of(
    texts,
    json_values.map(wire_json),
    st.builds(lambda i, c, m, d: wire_json({"Response": {"id": i, "code": c, "msg": m, "data": d}}),
              ids | json_values, st.integers(-(2**40), 2**40) | json_values, json_values, json_values),
    st.builds(lambda i, e, d: wire_json({"Event": {"id": i, "event": e, "data": d}}), ids,
              st.sampled_from(["kws", "instruction", "playing", "other"]) | json_values,
              st.sampled_from(["Started", "NewFile", "Idle", "Playing", "Bogus"]) | json_values
              | st.builds(lambda t: {"Keyword": t}, texts) | st.builds(lambda t: {"NewLine": t}, texts)),
    st.builds(lambda i, c, p: wire_json({"Request": {"id": i, "command": c, "payload": p}}), ids,
              st.sampled_from(["get_version", "run_shell", "start_play"]) | texts, json_values),
    st.integers(1000, 30_000).map(lambda n: "[" * n + "]" * n),
    st.just('{"Event":{"id":"x","event":"kws","data":"' + "x" * 300_000 + '"}}'),
)
xiaoai_binary_junk = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda t, b: xproto.encode_stream(xproto.Stream(xproto.new_id(), t, b)),
              st.sampled_from([xproto.RECORD_TAG, xproto.PLAY_TAG, "other"]), st.binary(max_size=2880)),
    st.builds(lambda v: b'{"id":"s","tag":"record","bytes":' + wire_json(v).encode() + b"}", json_values),
    st.builds(lambda b: b'{"id":"s","tag":"record","bytes":[' + b + b"]}", st.binary(max_size=40)),
    xiaoai_text_junk.map(str.encode),
)
xiaoai_junk = st.one_of(xiaoai_text_junk, xiaoai_binary_junk)


def _xiaoai_first(junk: bytes | str) -> bytes | str:
    """What selects the open-xiaoai protocol at once: text, or a binary message starting with '{'."""
    return junk if isinstance(junk, str) or junk[:1] == b"{" else b"{" + junk


class SpeakerStandIn:
    """Our side of an open-xiaoai connection: every server message must decode; requests are noted."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.requests: list[xproto.Request] = []
        self.responses: list[xproto.Response] = []

    async def next_request(self, command: str) -> xproto.Request:
        while not (self.requests and self.requests[-1].command == command):
            await self._read_one()
        return self.requests[-1]

    async def response_to(self, request_id: str) -> xproto.Response:
        while not any(r.id == request_id for r in self.responses):
            await self._read_one()
        return next(r for r in self.responses if r.id == request_id)

    async def _read_one(self) -> None:
        raw = await self.ws.get_message()
        if isinstance(raw, bytes):
            xproto.decode_binary(raw)  # a play frame must at least decode
            return
        message = xproto.decode_text(raw)
        (self.requests if isinstance(message, xproto.Request) else self.responses).append(message)


async def check_xiaoai_sequence(server: ServerHandle, log: CrashLog, serial: str,
                                before: list[bytes | str], after: list[bytes | str]) -> None:
    """Junk before the speaker has identified itself and after its session is up; both ignored."""
    with trio.fail_after(STEP_TIMEOUT_S):
        async with open_websocket_url(server.ws_url, message_queue_size=64) as ws:
            speaker = SpeakerStandIn(ws)
            await ws.send_message(_xiaoai_first(before[0]))
            await _send_all(ws, before[1:])
            device_info = await speaker.next_request("run_shell")
            assert device_info.payload == xproto.DEVICE_INFO_COMMAND
            await ws.send_message(xproto.encode_text(xproto.Response(
                device_info.id, data={"exit_code": 0, "stdout": f"LX06 {serial}\n", "stderr": ""})))
            for command in ("start_recording", "start_play"):  # the session got established
                request = await speaker.next_request(command)
                await ws.send_message(xproto.encode_text(xproto.Response(request.id, 0, "success")))
            await _send_all(ws, after)
            # Still alive and reading: the client calls nothing on the server, which answers as the
            # client answers an unknown command.
            await ws.send_message(xproto.encode_text(xproto.Request("probe", "get_version")))
            answer = await speaker.response_to("probe")
            assert (answer.code, answer.msg) == (-1, "command not found")
    await check_server_healthy(server, log)


async def test_open_xiaoai_junk_is_ignored_without_a_crash(tmp_path) -> None:
    with crash_log() as log:
        async with running_server(make_settings(tmp_path, **SERVER_OVERRIDES)) as server:
            count = 0

            @settings(max_examples=50, **HYPOTHESIS)
            @given(st.lists(xiaoai_junk, min_size=1, max_size=5), st.lists(xiaoai_junk, max_size=5))
            def every_sequence(before: list[bytes | str], after: list[bytes | str]) -> None:
                nonlocal count
                count += 1  # a serial of its own: no session supersedes another one
                trio.from_thread.run(check_xiaoai_sequence, server, log, f"FUZZ{count}", before, after)

            await trio.to_thread.run_sync(every_sequence)  # each example calls back into this trio run
