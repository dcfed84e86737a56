"""The native codec: round trips, hostile bytes, exact error codes, and the frame-order rules."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voicegrow.protocol import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    Audio,
    AudioFormat,
    ClientConnectionState,
    Close,
    Control,
    ControlEvent,
    Error,
    ErrorCode,
    FrameDecoder,
    FrameType,
    Hello,
    HelloAck,
    Ping,
    Pong,
    ProtocolError,
    ServerConnectionState,
    decode_message,
    encode,
)
from voicegrow.protocol.native import MAX_JSON_BYTES, MAX_JSON_DEPTH, TIMING_KEYS, TTS_STOP_REASONS

# The header written out independently of the codec, as docs/protocol.md describes it.
HEADER = struct.Struct(">2sBBIIIII")
FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def raw_frame(frame_type: int, payload: bytes = b"", *, magic: bytes = b"VG", version: int = 1,
              flags: int = 0, turn_id: int = 0, seq: int = 0, timestamp_ms: int = 0,
              length: int | None = None) -> bytes:
    declared = len(payload) if length is None else length
    return HEADER.pack(magic, version, frame_type, flags, turn_id, seq, timestamp_ms, declared) + payload


def error_code(excinfo: pytest.ExceptionInfo[ProtocolError]) -> ErrorCode:
    return excinfo.value.code


# ---------------------------------------------------------------------------------------------------
# Strategies

u32 = st.integers(0, 2**32 - 1)
ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,128}", fullmatch=True)
text = st.text(max_size=40)
json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63)
                | st.floats(allow_nan=False, allow_infinity=False) | text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)
audio_formats = st.builds(AudioFormat, sample_rate=st.integers(8000, 48000), channels=st.sampled_from([1, 2]))
even_pcm = st.binary(max_size=2048).map(lambda b: b[: len(b) // 2 * 2])

hellos = st.builds(Hello, device_id=ids, audio_in=audio_formats, audio_out=audio_formats,
                   token=st.none() | text, capabilities=json_objects, client=text, timestamp_ms=u32)
hello_acks = st.builds(HelloAck, session_id=ids, audio_in=audio_formats, audio_out=audio_formats,
                       server=text, nonce=text, capabilities=json_objects, timestamp_ms=u32)
audios = st.builds(Audio, pcm=even_pcm, turn_id=u32, seq=u32, timestamp_ms=u32, last=st.booleans())

known_event_data = {
    "listen_start": json_objects,
    "listen_stop": json_objects,
    "abort": json_objects,
    "asr_partial": st.fixed_dictionaries({"text": text}),
    "asr_final": st.fixed_dictionaries({"text": text, "lang": st.sampled_from(["zh", "en", ""])}),
    "llm_text": st.fixed_dictionaries({"text": text}),
    "tts_start": st.fixed_dictionaries({"sample_rate": st.integers(8000, 48000)}),
    "tts_sentence": st.fixed_dictionaries({"text": text}),
    "tts_stop": st.fixed_dictionaries({"reason": st.sampled_from(TTS_STOP_REASONS)}),
    "turn_timings": st.dictionaries(st.sampled_from(TIMING_KEYS),
                                    st.none() | st.integers(0, 10**7) | st.floats(0, 1e7)),
    "error_spoken": st.fixed_dictionaries({"reason": text}, optional={"text": text}),
    "turn_end": st.fixed_dictionaries({"outcome": st.sampled_from(["completed", "interrupted", "failed", "empty"])},
                                      optional={"error": st.none() | text}),
}
assert set(known_event_data) == {e.value for e in ControlEvent}
unknown_events = st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True).filter(
    lambda name: name not in known_event_data)
event_and_data = st.one_of(
    *(st.tuples(st.just(name), data) for name, data in known_event_data.items()),
    st.tuples(unknown_events, json_objects),
)
controls = st.builds(lambda ed, turn, seq, ts: Control(ed[0], ed[1], turn, seq=seq, timestamp_ms=ts),
                     event_and_data, u32, u32, u32)
nonces = st.integers(0, 2**64 - 1)
pings = st.builds(Ping, nonces, timestamp_ms=u32)
pongs = st.builds(Pong, nonces, timestamp_ms=u32)
codes = st.sampled_from(list(ErrorCode)) | st.integers(0, 0xFFFF)
reasons = st.text(max_size=200)
errors = st.builds(Error, codes, reasons, turn_id=u32, timestamp_ms=u32)
closes = st.builds(Close, st.integers(0, 0xFFFF), reasons, timestamp_ms=u32)
frames = st.one_of(hellos, hello_acks, audios, controls, pings, pongs, errors, closes)


# ---------------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("strategy", [hellos, hello_acks, audios, controls, pings, pongs, errors, closes],
                         ids=["hello", "hello_ack", "audio", "control", "ping", "pong", "error", "close"])
@ROUND_TRIP
@given(data=st.data())
def test_every_frame_type_round_trips(strategy: st.SearchStrategy, data: st.DataObject) -> None:
    frame = data.draw(strategy)
    message = encode(frame)
    decoded = decode_message(message)
    assert decoded == frame
    assert type(decoded) is type(frame)
    assert message[:2] == b"VG" and message[2] == 1 and message[3] == frame.frame_type
    assert HEADER.unpack_from(message)[-1] == len(message) - HEADER_SIZE


@ROUND_TRIP
@given(batch=st.lists(frames, max_size=8), data=st.data())
def test_stream_split_anywhere_yields_the_same_frames(batch: list, data: st.DataObject) -> None:
    stream = b"".join(encode(frame) for frame in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = FrameDecoder()
    received = []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)]):
        decoder.receive_data(stream[start:stop])
        received.extend(decoder)
    decoder.receive_eof()
    assert decoder.next_frame() is None
    assert received == batch
    assert decoder.buffered == 0


def test_header_fields_land_where_the_spec_says() -> None:
    message = encode(Audio(b"\x01\x00\xff\x7f", turn_id=7, seq=9, timestamp_ms=123456, last=True))
    assert HEADER.unpack_from(message) == (b"VG", 1, 0x10, 1, 7, 9, 123456, 4)
    assert message[HEADER_SIZE:] == b"\x01\x00\xff\x7f"
    ping = encode(Ping(0x0102030405060708))
    assert ping[HEADER_SIZE:] == bytes(range(1, 9))
    error = encode(Error(ErrorCode.AUTH_FAILED, "no", turn_id=3))
    assert HEADER.unpack_from(error)[4] == 3 and error[HEADER_SIZE:] == b"\x00\x0bno"


def test_header_values_a_frame_does_not_keep_are_ignored() -> None:
    ping = decode_message(raw_frame(FrameType.PING, bytes(8), turn_id=5, seq=6, flags=0xFF))
    assert ping == Ping(0)


def test_unknown_error_codes_stay_integers_and_known_ones_become_enum_members() -> None:
    assert decode_message(encode(Error(4242, "new"))).code == 4242
    assert decode_message(encode(Error(8, "odd"))).code is ErrorCode.BAD_AUDIO


def test_token_never_shows_in_repr() -> None:
    hello = Hello("dev", AudioFormat(), AudioFormat(24000), token="s3cret-token")
    assert "s3cret" not in repr(hello)


# ---------------------------------------------------------------------------------------------------
# Hostile input: only ProtocolError, with the right code

def assert_only_protocol_errors(message: bytes) -> None:
    try:
        decode_message(message)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.ws_close_code in (1002, 1003, 1007, 1009, 4401, 4403)


@FUZZ
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_error(message: bytes) -> None:
    assert_only_protocol_errors(message)


@FUZZ
@given(frame_type=st.sampled_from(list(FrameType)), flags=u32, payload=st.binary(max_size=300))
def test_random_payloads_behind_a_valid_header_raise_only_protocol_error(
        frame_type: FrameType, flags: int, payload: bytes) -> None:
    assert_only_protocol_errors(raw_frame(frame_type, payload, flags=flags))


json_keys = st.sampled_from(["device_id", "session_id", "audio_in", "audio_out", "token", "capabilities",
                             "client", "server", "nonce", "event", "data", "sample_rate", "channels",
                             "sample_width", "codec", "text", "lang", "reason"])
json_shapes = st.recursive(
    json_scalars | json_keys,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=6),
    max_leaves=20,
)


@FUZZ
@given(frame_type=st.sampled_from([FrameType.HELLO, FrameType.HELLO_ACK, FrameType.CONTROL]),
       value=json_shapes)
def test_wrongly_shaped_json_raises_only_protocol_error(frame_type: FrameType, value: object) -> None:
    assert_only_protocol_errors(raw_frame(frame_type, json.dumps(value).encode()))


@FUZZ
@given(frame=frames, data=st.data())
def test_mutated_frames_raise_only_protocol_error(frame: object, data: st.DataObject) -> None:
    message = bytearray(encode(frame))  # type: ignore[arg-type]
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(message) - 1))
        message[index] = data.draw(st.integers(0, 255))
    assert_only_protocol_errors(bytes(message))


@FUZZ
@given(chunks=st.lists(st.binary(max_size=64), max_size=10), prefix=st.sampled_from([b"", b"VG\x01"]))
def test_stream_decoder_raises_only_protocol_error(chunks: list[bytes], prefix: bytes) -> None:
    decoder = FrameDecoder(max_payload=1024)
    try:
        for chunk in [prefix, *chunks]:
            decoder.receive_data(chunk)
            list(decoder)
        decoder.receive_eof()
        list(decoder)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@ROUND_TRIP
@given(frame=frames, data=st.data())
def test_every_proper_prefix_is_truncated(frame: object, data: st.DataObject) -> None:
    message = encode(frame)  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, len(message) - 1))
    with pytest.raises(ProtocolError) as excinfo:
        decode_message(message[:cut])
    assert error_code(excinfo) is ErrorCode.TRUNCATED
    decoder = FrameDecoder()
    decoder.receive_data(message[:cut])
    assert decoder.next_frame() is None
    decoder.receive_eof()
    if cut:
        with pytest.raises(ProtocolError) as excinfo:
            decoder.next_frame()
        assert error_code(excinfo) is ErrorCode.TRUNCATED
    else:
        assert decoder.next_frame() is None


def test_oversized_declared_length_is_rejected_before_the_payload_is_buffered() -> None:
    header = raw_frame(FrameType.AUDIO, length=DEFAULT_MAX_PAYLOAD + 2)
    with pytest.raises(ProtocolError) as excinfo:
        decode_message(header)
    assert error_code(excinfo) is ErrorCode.OVERSIZED
    assert excinfo.value.ws_close_code == 1009

    decoder = FrameDecoder(max_payload=1000)
    with pytest.raises(ProtocolError) as excinfo:
        decoder.receive_data(raw_frame(FrameType.AUDIO, bytes(2000)))
    assert error_code(excinfo) is ErrorCode.OVERSIZED
    assert decoder.buffered == 0

    decoder = FrameDecoder(max_payload=1000)
    decoder.receive_data(header[:10])
    with pytest.raises(ProtocolError) as excinfo:
        decoder.receive_data(header[10:] + bytes(500))
    assert error_code(excinfo) is ErrorCode.OVERSIZED
    assert decoder.buffered == 10


def test_a_frame_of_exactly_max_payload_is_accepted() -> None:
    frame = Audio(bytes(1000))
    assert FrameDecoder(max_payload=1000).decode_message(encode(frame, max_payload=1000)) == frame
    with pytest.raises(ProtocolError) as excinfo:
        encode(Audio(bytes(1002)), max_payload=1000)
    assert error_code(excinfo) is ErrorCode.OVERSIZED


def test_trailing_bytes_after_a_frame() -> None:
    with pytest.raises(ProtocolError) as excinfo:
        decode_message(encode(Ping(1)) + b"\x00")
    assert error_code(excinfo) is ErrorCode.TRAILING_DATA


@pytest.mark.parametrize(("message", "code"), [
    (raw_frame(FrameType.PING, bytes(8), magic=b"GV"), ErrorCode.BAD_MAGIC),
    (b"X", ErrorCode.BAD_MAGIC),
    (raw_frame(FrameType.PING, bytes(8), version=2), ErrorCode.UNSUPPORTED_VERSION),
    (b"VG\x00", ErrorCode.UNSUPPORTED_VERSION),
    (raw_frame(0x7F, b""), ErrorCode.UNKNOWN_FRAME_TYPE),
    (b"VG\x01\x00", ErrorCode.UNKNOWN_FRAME_TYPE),
    (b"", ErrorCode.TRUNCATED),
    (b"VG\x01\x20", ErrorCode.TRUNCATED),
    (raw_frame(FrameType.AUDIO, b"\x00\x00\x00"), ErrorCode.BAD_AUDIO),
    (raw_frame(FrameType.PING, bytes(7)), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.ERROR, b"\x00"), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CLOSE, b"\x03\xe8\xff\xfe"), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b"\xc3\x28"), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'["listen_start"]'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": 5}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "Bad Name"}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "x", "data": [1]}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "x", "data": {"v": NaN}}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "x", "data": {"v": 1e999}}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "x", "data": {"v": "\\ud800"}}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "x", "data": {"v": ' + b"9" * 5000 + b"}}"),
     ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "asr_final", "data": {"text": "hi"}}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "tts_stop", "data": {"reason": "bored"}}'),
     ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "tts_start", "data": {"sample_rate": true}}'),
     ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.CONTROL, b'{"event": "turn_timings", "data": {"asr_done": "5"}}'),
     ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.HELLO, b'{"device_id": "a/b", "audio_in": {"sample_rate": 16000},'
                                b' "audio_out": {"sample_rate": 16000}}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.HELLO, b'{"device_id": "d", "audio_in": {"sample_rate": 96000},'
                                b' "audio_out": {"sample_rate": 16000}}'), ErrorCode.UNSUPPORTED_AUDIO_FORMAT),
    (raw_frame(FrameType.HELLO, b'{"device_id": "d", "audio_in": {"sample_rate": "16000"},'
                                b' "audio_out": {"sample_rate": 16000}}'), ErrorCode.BAD_PAYLOAD),
    (raw_frame(FrameType.HELLO, b'{"device_id": "d", "audio_in": {"sample_rate": 16000}}'),
     ErrorCode.BAD_PAYLOAD),
], ids=lambda value: "" if isinstance(value, bytes) else value.name)
def test_bad_messages_get_their_specific_code(message: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        decode_message(message)
    assert error_code(excinfo) is code


def test_json_nesting_and_size_limits() -> None:
    def control(data_json: str) -> bytes:
        return raw_frame(FrameType.CONTROL, ('{"event":"x","data":%s}' % data_json).encode())

    ok_depth = MAX_JSON_DEPTH - 2  # the control object and its data object take two levels
    assert decode_message(control('{"a":' + "[" * ok_depth + "]" * ok_depth + "}")).event == "x"
    too_deep = ok_depth + 1
    for data_json in ('{"a":' + "[" * too_deep + "]" * too_deep + "}",
                      '{"a":' + "[" * 30_000 + "]" * 30_000 + "}"):
        with pytest.raises(ProtocolError) as excinfo:
            decode_message(control(data_json))
        assert error_code(excinfo) is ErrorCode.BAD_PAYLOAD
    with pytest.raises(ProtocolError) as excinfo:
        decode_message(control('{"a":"%s"}' % ("x" * MAX_JSON_BYTES)))
    assert error_code(excinfo) is ErrorCode.OVERSIZED
    with pytest.raises(ProtocolError) as excinfo:
        encode(Control("x", {"a": [[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]}))
    assert error_code(excinfo) is ErrorCode.BAD_PAYLOAD


def test_a_failed_stream_decoder_keeps_failing() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.receive_data(b"XX")
    for call in (decoder.next_frame, lambda: decoder.receive_data(encode(Ping(1)))):
        with pytest.raises(ProtocolError) as excinfo:
            call()
        assert error_code(excinfo) is ErrorCode.BAD_MAGIC


def test_text_messages_are_not_frames() -> None:
    with pytest.raises(ProtocolError) as excinfo:
        decode_message('{"Event": {}}')  # type: ignore[arg-type]
    assert error_code(excinfo) is ErrorCode.BAD_PAYLOAD


def test_unknown_control_events_still_decode() -> None:
    frame = decode_message(raw_frame(FrameType.CONTROL, b'{"event": "emotion", "data": {"face": ":)"}}',
                                     turn_id=4))
    assert frame == Control("emotion", {"face": ":)"}, turn_id=4)
    assert decode_message(raw_frame(FrameType.CONTROL, b'{"event": "listen_stop"}')) == Control("listen_stop", {})


def test_frames_validate_their_fields_when_built() -> None:
    cases = [
        (lambda: AudioFormat(7000), ErrorCode.UNSUPPORTED_AUDIO_FORMAT),
        (lambda: AudioFormat(16000, channels=3), ErrorCode.UNSUPPORTED_AUDIO_FORMAT),
        (lambda: AudioFormat(16000, sample_width=3), ErrorCode.UNSUPPORTED_AUDIO_FORMAT),
        (lambda: AudioFormat(16000, codec="opus"), ErrorCode.UNSUPPORTED_AUDIO_FORMAT),
        (lambda: AudioFormat(16000.0), ErrorCode.BAD_PAYLOAD),  # type: ignore[arg-type]
        (lambda: Audio(b"\x00"), ErrorCode.BAD_AUDIO),
        (lambda: Audio(b"", turn_id=2**32), ErrorCode.BAD_PAYLOAD),
        (lambda: Ping(-1), ErrorCode.BAD_PAYLOAD),
        (lambda: Close(70000), ErrorCode.BAD_PAYLOAD),
        (lambda: Error(1, "x" * 2000), ErrorCode.BAD_PAYLOAD),
        (lambda: Control("asr_final", {"text": "hi"}), ErrorCode.BAD_PAYLOAD),
        (lambda: Hello("", AudioFormat(), AudioFormat()), ErrorCode.BAD_PAYLOAD),
    ]
    for build, code in cases:
        with pytest.raises(ProtocolError) as excinfo:
            build()
        assert error_code(excinfo) is code
    with pytest.raises(ProtocolError) as excinfo:
        encode(Control("x", {"obj": object()}))
    assert error_code(excinfo) is ErrorCode.BAD_PAYLOAD
    assert Control(ControlEvent.LISTEN_START, {}).event == "listen_start"


def test_error_codes_map_to_websocket_close_codes() -> None:
    assert len({code.value for code in ErrorCode}) == len(ErrorCode)
    expected = {
        ErrorCode.BAD_MAGIC: 1002, ErrorCode.UNSUPPORTED_VERSION: 1002, ErrorCode.UNKNOWN_FRAME_TYPE: 1002,
        ErrorCode.TRUNCATED: 1002, ErrorCode.TRAILING_DATA: 1002, ErrorCode.UNEXPECTED_FRAME: 1002,
        ErrorCode.BAD_PAYLOAD: 1007, ErrorCode.BAD_AUDIO: 1007, ErrorCode.OVERSIZED: 1009,
        ErrorCode.AUTH_REQUIRED: 4401, ErrorCode.AUTH_FAILED: 4403,
    }
    for code, ws_code in expected.items():
        assert ProtocolError(code, "x").ws_close_code == ws_code
    assert all(1000 <= code.ws_close_code <= 4999 for code in ErrorCode)


# ---------------------------------------------------------------------------------------------------
# Frame order

HELLO = Hello("dev", AudioFormat(), AudioFormat(24000))
ACK = HelloAck("s-1", AudioFormat(), AudioFormat(24000), "voicegrow")


def unexpected(call, frame) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError) as excinfo:
        call(frame)
    assert error_code(excinfo) is ErrorCode.UNEXPECTED_FRAME


def test_server_accepts_a_normal_session() -> None:
    state = ServerConnectionState()
    state.receive(HELLO)
    state.send(ACK)
    assert state.is_open
    for frame in (Audio(bytes(640)), Control("listen_start", {}), Ping(1), Pong(2), Error(1, "x")):
        state.receive(frame)
    for frame in (Control("asr_final", {"text": "hi", "lang": "en"}), Audio(bytes(4)), Ping(3)):
        state.send(frame)
    state.receive(Close(1000))
    assert not state.is_open
    state.send(Close(1000))


@pytest.mark.parametrize("frame", [Audio(b""), Control("listen_start", {}), Ping(1), Pong(1), ACK])
def test_server_rejects_anything_but_hello_first(frame) -> None:  # type: ignore[no-untyped-def]
    unexpected(ServerConnectionState().receive, frame)


def test_server_rejects_a_second_hello_and_a_hello_ack_from_the_device() -> None:
    state = ServerConnectionState()
    state.receive(HELLO)
    unexpected(state.receive, HELLO)
    unexpected(state.receive, ACK)


def test_server_rejects_frames_after_the_devices_close() -> None:
    state = ServerConnectionState()
    state.receive(HELLO)
    state.receive(Close(1000))
    for frame in (Audio(b""), Control("abort", {}), Ping(1), Error(1, "x"), Close(1000), HELLO):
        unexpected(state.receive, frame)


def test_device_may_close_or_report_an_error_before_hello() -> None:
    state = ServerConnectionState()
    state.receive(Error(ErrorCode.INTERNAL_ERROR, "mic broke"))
    state.receive(Close(1001))


def test_server_may_not_speak_before_its_hello_ack() -> None:
    state = ServerConnectionState()
    unexpected(state.send, ACK)  # before HELLO
    state.receive(HELLO)
    unexpected(state.send, Audio(b""))
    unexpected(state.send, HELLO)
    state.send(Error(ErrorCode.AUTH_FAILED, "bad token"))
    state.send(Close(4403))
    unexpected(state.send, ACK)


def test_client_side_rules_mirror_the_server() -> None:
    state = ClientConnectionState()
    unexpected(state.send, Audio(b""))
    state.send(HELLO)
    unexpected(state.send, HELLO)
    unexpected(state.receive, Control("asr_final", {"text": "", "lang": ""}))
    state.receive(ACK)
    unexpected(state.receive, ACK)
    state.receive(Audio(b"\x00\x00"))
    state.send(Audio(bytes(640)))
