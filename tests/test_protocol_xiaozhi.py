"""The xiaozhi-esp32 codec, byte for byte against what the firmware writes (docs/xiaozhi.md)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voicegrow.protocol import xiaozhi as wire
from voicegrow.protocol.detect import detect_from_handshake, detect_protocol
from voicegrow.protocol.xiaozhi import XiaozhiError, XiaozhiErrorCode

#: Messages exactly as the firmware's code builds them (protocol.cc, websocket_protocol.cc), and the
#: messages they decode to.
FIRMWARE_TEXT = [
    ('{"type":"hello","version":1,"features":{"mcp":true},"transport":"websocket",'
     '"audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}',
     wire.Hello(version=1, features={"mcp": True})),
    ('{"session_id":"s1","type":"listen","state":"start","mode":"auto"}',
     wire.Listen(state="start", mode="auto", session_id="s1")),
    ('{"session_id":"s1","type":"listen","state":"start","mode":"manual"}',
     wire.Listen(state="start", mode="manual", session_id="s1")),
    ('{"session_id":"s1","type":"listen","state":"start","mode":"realtime"}',
     wire.Listen(state="start", mode="realtime", session_id="s1")),
    ('{"session_id":"s1","type":"listen","state":"stop"}', wire.Listen(state="stop", session_id="s1")),
    ('{"session_id":"s1","type":"listen","state":"detect","text":"你好小智"}',
     wire.Listen(state="detect", text="你好小智", session_id="s1")),
    ('{"session_id":"s1","type":"abort"}', wire.Abort(session_id="s1")),
    ('{"session_id":"s1","type":"abort","reason":"wake_word_detected"}',
     wire.Abort(reason="wake_word_detected", session_id="s1")),
    ('{"session_id":"s1","type":"mcp","payload":{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}}',
     wire.Mcp(payload={"jsonrpc": "2.0", "id": 1, "result": {"content": [], "isError": False}}, session_id="s1")),
]

SERVER_TEXT = [
    (wire.ServerHello(session_id="abc"),
     '{"type":"hello","transport":"websocket","session_id":"abc",'
     '"audio_params":{"format":"opus","sample_rate":24000,"channels":1,"frame_duration":60}}'),
    (wire.Stt(text="今天天气怎么样", session_id="abc"), '{"session_id":"abc","type":"stt","text":"今天天气怎么样"}'),
    (wire.Llm(emotion="happy", text="🙂", session_id="abc"),
     '{"session_id":"abc","type":"llm","text":"🙂","emotion":"happy"}'),
    (wire.Tts(state="start", session_id="abc"), '{"session_id":"abc","type":"tts","state":"start"}'),
    (wire.Tts(state="sentence_start", text="好的。", session_id="abc"),
     '{"session_id":"abc","type":"tts","state":"sentence_start","text":"好的。"}'),
    (wire.Tts(state="stop", session_id="abc"), '{"session_id":"abc","type":"tts","state":"stop"}'),
    (wire.mcp_call(3, "tools/call", {"name": "self.audio_speaker.set_volume", "arguments": {"volume": 50}},
                   session_id="abc"),
     '{"session_id":"abc","type":"mcp","payload":{"jsonrpc":"2.0","method":"tools/call","params":'
     '{"name":"self.audio_speaker.set_volume","arguments":{"volume":50}},"id":3}}'),
    (wire.System(command="reboot", session_id="abc"), '{"session_id":"abc","type":"system","command":"reboot"}'),
]


@pytest.mark.parametrize(("text", "message"), FIRMWARE_TEXT)
def test_firmware_messages_decode_and_encode_to_the_same_bytes(text: str, message: wire.DeviceMessage) -> None:
    assert wire.decode_device_text(text) == message
    assert wire.decode_device_text(text.encode()) == message
    assert wire.encode_text(message) == text


@pytest.mark.parametrize(("message", "text"), SERVER_TEXT)
def test_server_messages_are_what_the_firmware_parses(message: wire.ServerMessage, text: str) -> None:
    assert wire.encode_text(message) == text
    assert wire.decode_server_text(text) == message


def test_hello_with_unknown_fields_and_text_font_is_accepted() -> None:
    text = ('{"type":"hello","version":3,"features":{"aec":true,"mcp":true,"glyph_push":true},'
            '"text_font":{"bundle":"noto-v1","charset":"common","size":20,"bpp":4},"transport":"websocket",'
            '"audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}')
    hello = wire.decode_device_text(text)
    assert isinstance(hello, wire.Hello) and hello.version == 3 and hello.mcp
    assert hello.audio_params == wire.AudioParams()


def test_server_hello_without_audio_params_keeps_the_firmware_default_rate() -> None:
    hello = wire.decode_server_text('{"type":"hello","transport":"websocket"}')
    assert isinstance(hello, wire.ServerHello) and hello.audio_params.sample_rate == 24000


@pytest.mark.parametrize(("text", "code"), [
    ("not json", XiaozhiErrorCode.INVALID_JSON),
    ("[1,2]", XiaozhiErrorCode.BAD_SHAPE),
    ('{"state":"start"}', XiaozhiErrorCode.BAD_FIELD),
    ('{"type":7}', XiaozhiErrorCode.BAD_FIELD),
    ('{"type":"iot","descriptors":[]}', XiaozhiErrorCode.UNKNOWN_TYPE),
    ('{"type":"listen","state":"sing"}', XiaozhiErrorCode.BAD_FIELD),
    ('{"type":"listen","state":"start","mode":"always"}', XiaozhiErrorCode.BAD_FIELD),
    ('{"type":"hello","audio_params":{"sample_rate":"16k"}}', XiaozhiErrorCode.BAD_FIELD),
    ('{"type":"hello","audio_params":{"sample_rate":1e400}}', XiaozhiErrorCode.BAD_FIELD),
    ('{"type":"hello","features":[]}', XiaozhiErrorCode.BAD_FIELD),
    ('{"type":"mcp","payload":"x"}', XiaozhiErrorCode.BAD_FIELD),
    ('{"type":"abort","x":NaN}', XiaozhiErrorCode.INVALID_JSON),
    ("[" * 40 + "]" * 40, XiaozhiErrorCode.TOO_DEEP),
    ('{"type":"listen","state":"\ud800"}', XiaozhiErrorCode.INVALID_UTF8),
])
def test_bad_text_is_refused_with_a_precise_code(text: str, code: XiaozhiErrorCode) -> None:
    with pytest.raises(XiaozhiError) as refused:
        wire.decode_device_text(text)
    assert refused.value.code is code


def test_oversized_and_invalid_utf8_messages_are_refused() -> None:
    with pytest.raises(XiaozhiError) as refused:
        wire.decode_device_text(b'{"type":"abort"}' + b" " * 100, max_bytes=64)
    assert refused.value.code is XiaozhiErrorCode.TOO_LARGE
    assert refused.value.code.ws_close_code == 1009
    with pytest.raises(XiaozhiError) as refused:
        wire.decode_device_text(b'{"type":"\xff"}')
    assert refused.value.code is XiaozhiErrorCode.INVALID_UTF8


# -- binary framing -----------------------------------------------------------------------------------


def test_v2_header_is_the_firmware_struct_in_network_order() -> None:
    packet = b"\xf8\x01\x02"
    frame = wire.encode_binary(packet, 2, timestamp=0x01020304)
    # BinaryProtocol2 {u16 version, u16 type, u32 reserved, u32 timestamp, u32 payload_size}, htons/htonl.
    assert frame == b"\x00\x02" + b"\x00\x00" + b"\x00\x00\x00\x00" + b"\x01\x02\x03\x04" + b"\x00\x00\x00\x03" + packet
    assert wire.decode_binary(frame, 2) == wire.BinaryFrame(packet, wire.BINARY_TYPE_OPUS, 0x01020304)


def test_v3_header_and_v1_raw() -> None:
    packet = bytes(range(200))
    frame = wire.encode_binary(packet, 3)
    assert frame == b"\x00\x00\x00\xc8" + packet  # {u8 type, u8 reserved, u16 payload_size (htons)}
    assert wire.decode_binary(frame, 3).payload == packet
    assert wire.encode_binary(packet, 1) == packet
    assert wire.decode_binary(packet, 1) == wire.BinaryFrame(packet)


@pytest.mark.parametrize(("data", "version", "code"), [
    (b"\x00\x02\x00", 2, XiaozhiErrorCode.TRUNCATED),
    (b"\x00", 3, XiaozhiErrorCode.TRUNCATED),
    (struct.pack(">HHIII", 2, 0, 0, 0, 10) + b"abc", 2, XiaozhiErrorCode.LENGTH_MISMATCH),
    (struct.pack(">BBH", 0, 0, 1) + b"abc", 3, XiaozhiErrorCode.LENGTH_MISMATCH),
    (struct.pack(">HHIII", 3, 0, 0, 0, 0), 2, XiaozhiErrorCode.UNSUPPORTED_VERSION),
    (struct.pack(">HHIII", 2, 9, 0, 0, 0), 2, XiaozhiErrorCode.BAD_BINARY_TYPE),
    (b"abc", 4, XiaozhiErrorCode.UNSUPPORTED_VERSION),
    (b"x" * 70_000, 1, XiaozhiErrorCode.TOO_LARGE),
])
def test_bad_binary_frames_are_refused(data: bytes, version: int, code: XiaozhiErrorCode) -> None:
    with pytest.raises(XiaozhiError) as refused:
        wire.decode_binary(data, version)
    assert refused.value.code is code


@given(payload=st.binary(max_size=2000), version=st.sampled_from(wire.PROTOCOL_VERSIONS),
       timestamp=st.integers(0, 2**32 - 1), kind=st.sampled_from((wire.BINARY_TYPE_OPUS, wire.BINARY_TYPE_JSON)))
def test_binary_round_trip(payload: bytes, version: int, timestamp: int, kind: int) -> None:
    frame = wire.decode_binary(wire.encode_binary(payload, version, timestamp=timestamp, type=kind), version)
    assert frame.payload == payload
    if version > 1:
        assert frame.type == kind
    if version == 2:
        assert frame.timestamp == timestamp


@given(st.binary(max_size=300), st.sampled_from((1, 2, 3, 0, 9)))
def test_any_bytes_decode_or_raise_the_codecs_error(data: bytes, version: int) -> None:
    for decode in (lambda: wire.decode_binary(data, version), lambda: wire.decode_device_text(data),
                   lambda: wire.decode_server_text(data)):
        try:
            decode()
        except XiaozhiError:
            pass


# -- MCP ----------------------------------------------------------------------------------------------


def test_mcp_results_errors_and_notifications() -> None:
    ok = wire.parse_mcp_result({"jsonrpc": "2.0", "id": 2, "result": {"tools": []}})
    assert ok == wire.McpResult(2, result={"tools": []}) and ok.ok
    failed = wire.parse_mcp_result({"jsonrpc": "2.0", "id": 3,
                                    "error": {"code": -32601, "message": "Unknown tool: x"}})
    assert failed is not None and not failed.ok and failed.error_code == -32601
    # McpServer::ReplyError sends a message and no code.
    firmware = wire.parse_mcp_result({"jsonrpc": "2.0", "id": 4, "error": {"message": "Unknown tool: x"}})
    assert firmware == wire.McpResult(4, error_code=None, error_message="Unknown tool: x", failed=True)
    assert wire.parse_mcp_result({"jsonrpc": "2.0", "method": "notifications/state_changed"}) is None
    for bad in ({"id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 1}, {"jsonrpc": "2.0", "id": [1], "result": {}},
                {"jsonrpc": "2.0", "id": 1, "error": {"code": "x"}}):
        with pytest.raises(XiaozhiError):
            wire.parse_mcp_result(bad)


# -- detection ----------------------------------------------------------------------------------------


def test_detection_by_handshake_then_first_message() -> None:
    assert detect_from_handshake("/xiaozhi/v1/", []) == "xiaozhi"
    assert detect_from_handshake("/xiaozhi/v1/?device-id=x", []) == "xiaozhi"
    assert detect_from_handshake("/", [(b"Device-Id", b"a0:85:e3:00:00:01")]) == "xiaozhi"
    assert detect_from_handshake("/", [(b"protocol-version", b"1")]) == "xiaozhi"
    assert detect_from_handshake("/?token=t", [(b"user-agent", b"x")]) is None
    assert detect_protocol(None) == "xiaoai"
    assert detect_protocol('{"Event":{}}') == "xiaoai"
    assert detect_protocol(b"VG\x01") == "native"
