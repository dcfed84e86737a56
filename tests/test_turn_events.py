"""The session core's typed turn events and how each driver puts them on its wire.

The core (``streaming/voice.py``, ``streaming/turn.py``) speaks only :mod:`voicegrow.streaming.events`;
the native link maps them to CONTROL frames through one table, the xiaozhi link to the firmware's
messages. These tests pin the mapping byte for byte where a wire exists, and keep the core free of
the native vocabulary.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from voicegrow.protocol import native as wire
from voicegrow.streaming import events
from voicegrow.streaming.events import (
    TIMING_ORDER,
    AnnouncementStarted,
    ReplySentence,
    ReplyStarted,
    ReplyStopped,
    ReplyText,
    SpokenError,
    TranscriptFinal,
    TurnEnded,
    TurnTimings,
)
from voicegrow.streaming.native import control_event

ROOT = Path(__file__).resolve().parent.parent
CORE = [ROOT / "voicegrow" / "streaming" / "voice.py", ROOT / "voicegrow" / "streaming" / "turn.py"]

#: One event of every type, and the CONTROL event the native protocol has always sent for it
#: (name and data, key order included: the JSON payload's bytes follow it).
NATIVE = [
    (TranscriptFinal(3, "开灯", "zh", 2), "asr_final", {"text": "开灯", "lang": "zh", "dropped": 2}),
    (AnnouncementStarted(4, "Time's up", {"timer_id": "t1", "label": "tea"}), "announcement",
     {"text": "Time's up", "timer_id": "t1", "label": "tea"}),
    (ReplyText(3, "Sure"), "llm_text", {"text": "Sure"}),
    (SpokenError(3, "timeout", "Sorry."), "error_spoken", {"reason": "timeout", "text": "Sorry."}),
    (ReplyStarted(3, 24000), "tts_start", {"sample_rate": 24000}),
    (ReplySentence(3, "Sure, the light is on."), "tts_sentence", {"text": "Sure, the light is on."}),
    (ReplyStopped(3), "tts_stop", {"reason": "done"}),
    (ReplyStopped(3, interrupted_by="barge_in"), "tts_stop", {"reason": "aborted", "cause": "barge_in"}),
    (TurnEnded(3, "failed", "llm: timeout: read"), "turn_end", {"outcome": "failed", "error": "llm: timeout: read"}),
    (TurnEnded(3, "completed"), "turn_end", {"outcome": "completed", "error": None}),
    (TurnTimings(3, {"speech_start": 0.0, "speech_end": 812.5, "asr_done": 901.0}), "turn_timings",
     {"speech_start": 0.0, "speech_end": 812.5, "asr_done": 901.0}),
]


@pytest.mark.parametrize(("event", "name", "data"), NATIVE, ids=lambda v: type(v).__name__ if hasattr(v, "turn_id") else "")
def test_each_event_is_the_native_control_frame_it_always_was(event, name, data) -> None:
    got_name, got_data = control_event(event)
    assert got_name == name
    assert json.dumps(got_data) == json.dumps(data)  # same keys, same order: the same payload bytes
    frame = wire.Control(event=got_name, data=got_data, turn_id=event.turn_id, seq=1)
    decoded = wire.decode_message(wire.encode(frame))
    assert decoded == frame  # and the native codec accepts it as a valid server event


def test_every_event_type_has_a_native_mapping() -> None:
    mapped = {type(event) for event, _name, _data in NATIVE}
    assert mapped == set(events.TurnEvent.__args__)


def test_events_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ReplyText(1, "a").text = "b"  # type: ignore[misc]


def test_the_timing_order_is_the_one_the_native_protocol_documents() -> None:
    assert TIMING_ORDER == wire.TIMING_KEYS


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_session_core_holds_no_native_wire_names(path: Path) -> None:
    """No string in the core names a CONTROL event a native server sends, and the core imports no
    protocol module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wire_names = wire.SERVER_EVENTS | {"announcement", "volume"}
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & wire_names
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.startswith("voicegrow.protocol")}


class _Outbox:
    def __init__(self) -> None:
        self.sent: list[bytes | str] = []

    async def put(self, message: bytes | str) -> None:
        self.sent.append(message)

    async def put_audio(self, message: bytes | str, turn_id: int) -> None:
        self.sent.append(message)


async def test_the_xiaozhi_link_maps_a_turn_to_the_firmwares_messages() -> None:
    from voicegrow.streaming.xiaozhi import XiaozhiLink

    outbox = _Outbox()
    link = XiaozhiLink(outbox, version=1, session_id="s1", output_rate=24000)  # type: ignore[arg-type]
    for event in [TranscriptFinal(1, "hello", "en"), ReplyText(1, "Hi"), ReplyStarted(1, 24000),
                  ReplySentence(1, "Hi."), ReplySentence(1, "Bye."), ReplyStopped(1), TurnEnded(1, "completed"),
                  TurnTimings(1, {"speech_start": 0.0})]:
        await link.send_event(event)
    messages = [json.loads(text) for text in outbox.sent]
    assert [(m["type"], m.get("state"), m.get("text")) for m in messages] == [
        ("stt", None, "hello"), ("llm", None, "🤔"), ("llm", None, "🙂"), ("tts", "start", None),
        ("tts", "sentence_start", "Hi."), ("tts", "sentence_end", "Hi."), ("tts", "sentence_start", "Bye."),
        ("tts", "sentence_end", "Bye."), ("tts", "stop", None)]
    assert {m["session_id"] for m in messages} == {"s1"}


async def test_an_empty_transcript_tells_a_xiaozhi_board_nothing() -> None:
    from voicegrow.streaming.xiaozhi import XiaozhiLink

    outbox = _Outbox()
    link = XiaozhiLink(outbox, version=1, session_id="s1", output_rate=24000)  # type: ignore[arg-type]
    await link.send_event(TranscriptFinal(1, "", "en"))
    assert outbox.sent == []
