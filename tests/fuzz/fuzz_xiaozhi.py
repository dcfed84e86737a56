"""Fuzz target: the xiaozhi-esp32 decoders — device and server text, binary framing v1/v2/v3, MCP results.

A finding is any exception other than :class:`XiaozhiError`, a decoded message that does not survive
encode → decode unchanged, text read as bytes and as str disagreeing, or a binary frame that does not
re-encode to the very same bytes but its reserved fields (the header is the firmware's packed struct).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["voicegrow.protocol"]):
    from voicegrow.protocol import xiaozhi as wire

from tests.fuzz import JSON_TOKENS, all_checks, outcome, run_target

SMALL_MAX_BYTES = 96

#: Inputs that once were findings; they stay in every run's corpus, so a regression crashes at once.
REGRESSIONS = (
    # A lone surrogate escape inside an MCP payload was accepted, then could not be sent back.
    b'{"type":"mcp","payload":{"jsonrpc":"2.0","method":"tools/call","params":{"name":"a\\ud800b"},"id":3}}',
    b'{"type":"mcp","payload":{"\\udc00":1}}',
)


def seeds() -> list[bytes]:
    """The firmware's and the server's messages of the codec's tests, and framed packets of each version."""
    from tests.test_protocol_xiaozhi import FIRMWARE_TEXT, SERVER_TEXT

    texts = [text.encode("utf-8") for text, _ in FIRMWARE_TEXT] + [text.encode("utf-8") for _, text in SERVER_TEXT]
    texts += [b'{"type":"hello","version":3,"features":{"aec":true,"mcp":true},"text_font":{"size":20},'
              b'"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,'
              b'"frame_duration":60}}',
              b'{"type":"alert","status":"Warning","message":"Battery low","emotion":"sad"}',
              b'{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"Unknown tool"}}']
    packet = bytes(range(64))
    frames = [wire.encode_binary(packet, version, timestamp=123456) for version in wire.PROTOCOL_VERSIONS]
    frames += [wire.encode_binary(b'{"type":"abort"}', 2, type=wire.BINARY_TYPE_JSON), wire.encode_binary(b"", 3)]
    return texts + frames + list(REGRESSIONS)


TOKENS = (*JSON_TOKENS, '"type"', '"hello"', '"listen"', '"abort"', '"mcp"', '"stt"', '"tts"', '"llm"',
          '"state"', '"mode"', '"start"', '"stop"', '"detect"', '"auto"', '"manual"', '"realtime"',
          '"audio_params"', '"sample_rate"', '"frame_duration"', '"features"', '"payload"', '"jsonrpc"',
          '"2.0"', '"result"', '"error"', '"id"', '"session_id"', '"transport"', '"websocket"',
          b"\x00\x02", b"\x00\x00\x00\x00", b"\x00\x01")


def _check_text(data: bytes) -> None:
    text = data.decode("utf-8", errors="surrogateescape")
    for decode in (wire.decode_device_text, wire.decode_server_text):
        as_bytes = outcome(decode, data)
        as_str = outcome(decode, text)
        if not isinstance(as_bytes, wire.XiaozhiErrorCode) and as_str != as_bytes:
            raise AssertionError(f"{decode.__name__} disagrees on bytes and str: {as_bytes!r} vs {as_str!r}")
        if not isinstance(as_bytes, wire.XiaozhiErrorCode):
            again = decode(wire.encode_text(as_bytes))
            if again != as_bytes:
                raise AssertionError(f"text round trip changed the message: {as_bytes!r} -> {again!r}")
        outcome(lambda raw: decode(raw, max_bytes=SMALL_MAX_BYTES), data)
    device = outcome(wire.decode_device_text, data)
    if isinstance(device, wire.Mcp):
        outcome(wire.parse_mcp_result, device.payload)


def _reserved_zeroed(data: bytes, version: int) -> bytes:
    """The firmware ignores the headers' reserved fields, and so does the decoder; we send zeros."""
    if version == 2:
        return data[:4] + bytes(4) + data[8:]
    if version == 3:
        return data[:1] + b"\x00" + data[2:]
    return data


def _check_binary(data: bytes) -> None:
    for version in (*wire.PROTOCOL_VERSIONS, 0):
        frame = outcome(lambda raw: wire.decode_binary(raw, version), data)
        if isinstance(frame, wire.BinaryFrame):
            again = wire.encode_binary(frame.payload, version, timestamp=frame.timestamp, type=frame.type)
            if again != _reserved_zeroed(data, version):
                raise AssertionError(f"v{version} frame does not re-encode to its bytes: {data!r} -> {again!r}")
            if frame.type == wire.BINARY_TYPE_JSON:
                outcome(wire.decode_device_text, frame.payload)


fuzz_one_input = all_checks(_check_text, _check_binary)

if __name__ == "__main__":
    run_target(sys.argv, fuzz_one_input, seeds(), TOKENS)
