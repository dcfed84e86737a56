"""What the session core tells a device, as typed events, whatever the device's protocol.

A turn (``turn.py``) and the session around it (``voice.py``) emit only these; each driver's link
(``DeviceLink.send_event``) maps them to its own wire in one place: the native CONTROL table in
``streaming/native.py``, the xiaozhi firmware's messages in ``streaming/xiaozhi.py``, nothing at all
for an open-xiaoai speaker, whose client has no use for them. A new device protocol then adds a
mapping, never a branch in the core, and the core holds no wire names or wire-shaped dicts.

Every event carries the id of the turn it belongs to; events of one turn arrive in the order below,
from ``TranscriptFinal`` (or ``AnnouncementStarted``) to ``TurnTimings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = [
    "TIMING_ORDER",
    "AnnouncementStarted",
    "ReplyStarted",
    "ReplySentence",
    "ReplyStopped",
    "ReplyText",
    "SpokenError",
    "TranscriptFinal",
    "TurnEnded",
    "TurnEvent",
    "TurnTimings",
]

#: The turn's timing marks in the order they happen (milliseconds since speech start in the record
#: and in :class:`TurnTimings`). The native protocol documents the same keys for ``turn_timings``
#: (``protocol.native.TIMING_KEYS``; ``tests/test_turn_events.py`` keeps the two equal).
TIMING_ORDER = ("speech_start", "speech_end", "asr_done", "llm_first_token", "first_sentence",
                "tts_first_audio", "first_audio_sent", "last_audio_sent")


@dataclasses.dataclass(frozen=True, slots=True)
class TranscriptFinal:
    """What the user said, once recognised (empty when nothing was understood)."""

    turn_id: int
    text: str
    language: str
    #: Characters the recogniser's guards dropped (a hallucinated repetition, say).
    dropped: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class AnnouncementStarted:
    """The server speaks on its own (a timer going off); ``data`` is the announcement's own payload
    (which timer, say), passed through to the device."""

    turn_id: int
    text: str
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyText:
    """A piece of the reply as the LLM writes it, before it is spoken."""

    turn_id: int
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class SpokenError:
    """Something failed (the recogniser, the LLM) and ``text``, an apology, is spoken instead."""

    turn_id: int
    reason: str
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyStarted:
    """Reply audio begins, at ``sample_rate`` (the link's output rate)."""

    turn_id: int
    sample_rate: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReplySentence:
    """The sentence whose audio follows."""

    turn_id: int
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReplyStopped:
    """Reply audio is over: played to its end, or cut off, and then ``interrupted_by`` says why
    (``barge_in``, ``wake``, ``device_abort``, ``new_utterance``)."""

    turn_id: int
    interrupted_by: str | None = None

    @property
    def completed(self) -> bool:
        return self.interrupted_by is None


@dataclasses.dataclass(frozen=True, slots=True)
class TurnEnded:
    """The turn is over: ``completed``, ``empty``, ``failed`` (``error`` says what), ``interrupted``
    or ``echo``."""

    turn_id: int
    outcome: str
    error: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TurnTimings:
    """Milliseconds since speech start for every mark the turn reached, in :data:`TIMING_ORDER`."""

    turn_id: int
    timings_ms: Mapping[str, float]


TurnEvent = (TranscriptFinal | AnnouncementStarted | ReplyText | SpokenError | ReplyStarted | ReplySentence
             | ReplyStopped | TurnEnded | TurnTimings)
