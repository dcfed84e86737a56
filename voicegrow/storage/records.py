"""The records persistence stores, how audio objects are named, and the pagination cursor.

Timestamps are unix seconds as floats everywhere (database columns are ``DOUBLE``), so that a value read
back compares equal to the one written and can serve as a keyset-pagination cursor without rounding.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from voicegrow.storage.errors import InvalidCursor

__all__ = [
    "SessionRecord", "TurnRecord", "Page", "TURN_OUTCOMES", "key_part", "audio_keys", "device_prefix",
    "encode_cursor", "decode_cursor",
]

TURN_OUTCOMES = ("completed", "interrupted", "failed", "empty")


@dataclass
class SessionRecord:
    session_id: str
    device_id: str
    protocol: str
    remote_addr: str
    started_at: float
    ended_at: float | None = None
    end_reason: str | None = None


@dataclass
class TurnRecord:
    turn_id: str
    session_id: str
    device_id: str
    started_at: float
    transcript: str
    reply_text: str
    language: str
    timings_ms: dict[str, float]
    outcome: str
    error: str | None = None
    audio_in_key: str | None = None
    audio_out_key: str | None = None
    #: The tools the model called in this turn (voicegrow.tools.ToolOutcome records), in order.
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Page:
    """One page of a listing; ``next_cursor`` is None on the last page."""

    items: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def key_part(value: str) -> str:
    """``value`` made safe as one path segment of an object key (S3 and a local directory alike).

    Device and session ids come from devices, so they may hold ``/`` or ``..``; such characters are
    replaced, and a short hash of the original is appended so that two ids that differ only in those
    characters can never share a prefix (deleting one device's audio must not touch another's). Long
    values are shortened the same way (a file name has at most 255 bytes).
    """
    cleaned = _UNSAFE.sub("_", value)
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    if cleaned == value and 0 < len(cleaned) <= 100:
        return cleaned
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:10]
    return f"{cleaned[:100]}~{digest}"


def device_prefix(device_id: str) -> str:
    """Every audio object of a device lives under this prefix."""
    return key_part(device_id) + "/"


def audio_keys(rec: TurnRecord) -> tuple[str, str]:
    """``{device}/{yyyy}/{mm}/{dd}/{session}/{turn}-in.wav`` and ``…-out.wav``, by the turn's UTC date."""
    day = time.strftime("%Y/%m/%d", time.gmtime(rec.started_at))
    base = f"{device_prefix(rec.device_id)}{day}/{key_part(rec.session_id)}/{key_part(rec.turn_id)}"
    return f"{base}-in.wav", f"{base}-out.wav"


def encode_cursor(position: tuple[Any, ...]) -> str:
    """An opaque URL-safe token for a keyset position (the sort columns of the last row returned)."""
    raw = json.dumps(list(position), separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(token: str, kinds: tuple[type, ...]) -> tuple[Any, ...]:
    """The position inside ``token``, checked against the expected column types."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        values = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor(f"cursor {token[:40]!r} is not one this server issued") from None
    if not isinstance(values, list) or len(values) != len(kinds):
        raise InvalidCursor(f"cursor {token[:40]!r} does not fit this listing")
    out: list[Any] = []
    for value, kind in zip(values, kinds):
        try:
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError("not a finite number")
            if isinstance(value, str):
                value.encode("utf-8")  # lone surrogates cannot reach a database
        except (OverflowError, ValueError):  # UnicodeEncodeError is a ValueError
            raise InvalidCursor(f"cursor {token[:40]!r} is not one this server issued") from None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidCursor(f"cursor {token[:40]!r} does not fit this listing")
        out.append(value)
    return tuple(out)
