"""docs/protocol.md cannot drift from the code: its sample session and tables are checked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from voicegrow.protocol import (
    ErrorCode,
    FrameType,
    ServerConnectionState,
    decode_message,
    encode,
)
from voicegrow.protocol.native import HEADER_SIZE

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
SAMPLE_BLOCK = re.compile(r"^```hex sample-session\n(.*?)^```", re.MULTILINE | re.DOTALL)
DIRECTION = re.compile(r"^#\s*(device|server)\s*→\s*(device|server):\s*([A-Z_]+)", re.MULTILINE)

EXPECTED_SESSION = [
    ("device", "HELLO"), ("server", "HELLO_ACK"),
    ("device", "AUDIO"), ("device", "AUDIO"),
    ("server", "CONTROL"), ("server", "CONTROL"), ("server", "CONTROL"), ("server", "CONTROL"),
    ("server", "AUDIO"), ("server", "AUDIO"),
    ("server", "CONTROL"), ("server", "CONTROL"), ("server", "CONTROL"),
    ("device", "PING"), ("server", "PONG"),
    ("device", "CLOSE"), ("server", "CLOSE"),
]
EXPECTED_SERVER_EVENTS = ["asr_final", "llm_text", "tts_start", "tts_sentence", "tts_stop", "turn_end",
                          "turn_timings"]


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def sample_frames() -> list[tuple[str, str, bytes]]:
    """(sender, declared type name, message bytes) for every sample-session block, in order."""
    frames = []
    for block in SAMPLE_BLOCK.findall(doc_text()):
        match = DIRECTION.search(block)
        assert match, f"sample block without a '# device → server: TYPE' line:\n{block}"
        sender, receiver, type_name = match.groups()
        assert sender != receiver
        hex_digits = "".join(line.split("#", 1)[0] for line in block.splitlines())
        frames.append((sender, type_name, bytes.fromhex(hex_digits)))
    return frames


def test_sample_session_decodes_to_the_declared_frames_in_order() -> None:
    frames = sample_frames()
    assert [(sender, name) for sender, name, _ in frames] == EXPECTED_SESSION
    state = ServerConnectionState()
    events = []
    for sender, type_name, message in frames:
        frame = decode_message(message)
        assert frame.frame_type.name == type_name
        assert encode(frame) == message  # the doc shows the canonical encoding
        (state.receive if sender == "device" else state.send)(frame)  # and a legal order
        if type_name == "CONTROL":
            events.append(frame.event)  # type: ignore[union-attr]
    assert events == EXPECTED_SERVER_EVENTS
    assert state.closed_by  # the session ends with CLOSE


def test_header_comment_lines_match_the_bytes() -> None:
    for block in SAMPLE_BLOCK.findall(doc_text()):
        header = re.search(r"^# header: 'VG' v(\d+) type 0x([0-9a-f]{2}) flags (\d+) turn (\d+) seq (\d+) "
                           r"t (\d+) ms, payload (\d+) bytes", block, re.MULTILINE)
        assert header, block
        message = bytes.fromhex("".join(line.split("#", 1)[0] for line in block.splitlines()))
        version, frame_type, flags, turn, seq, ts, length = header.groups()
        assert message[2] == int(version) and message[3] == int(frame_type, 16)
        assert [int.from_bytes(message[i:i + 4], "big") for i in range(4, HEADER_SIZE, 4)] == [
            int(flags), int(turn), int(seq), int(ts), int(length)]


def test_error_code_table_lists_every_code_with_its_close_code() -> None:
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`([A-Z_]+)`\s*\|\s*(\d+)\s*\|", doc_text(), re.MULTILINE)
    assert {(int(code), name, int(ws)) for code, name, ws in rows} == {
        (code.value, code.name, code.ws_close_code) for code in ErrorCode}


def test_frame_type_table_lists_every_type() -> None:
    rows = re.findall(r"^\|\s*`0x([0-9a-f]{2})`\s*\|\s*([A-Z_]+)\s*\|", doc_text(), re.MULTILINE)
    assert {(int(value, 16), name) for value, name in rows} == {(t.value, t.name) for t in FrameType}


@pytest.mark.parametrize("heading", ["## open-xiaoai speakers", "## Protocol detection on port 4399"])
def test_sections_for_the_other_protocol_exist(heading: str) -> None:
    assert re.search(rf"^{re.escape(heading)}\s*$", doc_text(), re.MULTILINE)
