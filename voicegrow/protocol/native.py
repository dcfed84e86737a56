"""The native VoiceGrow protocol: typed frames in WebSocket binary messages, without any I/O.

Every frame is a 24-byte big-endian header followed by a payload (``docs/protocol.md`` has the byte
tables). This module turns frames into bytes (:func:`encode`) and bytes into frames
(:class:`FrameDecoder`, :func:`decode_message`), checks the order of frames on a connection
(:class:`ConnectionState`), and joins the two into one side of a connection (:class:`NativeConnection`:
``receive_data`` / ``next_event`` / ``send``), in the manner of h11 and wsproto: the caller owns the
socket, so the same code serves the server, the ``talk`` client, benchmarks and tests that never open a
port.

Anything a peer sends either decodes into one of the frame dataclasses or raises
:class:`~voicegrow.protocol.errors.ProtocolError`; no other exception may escape, because the
connection handler answers that one error with an ERROR frame and a close code. Constructing a frame
with bad field values raises the same error, so a frame object that exists is always encodable
(except for JSON payloads holding values that JSON cannot represent, which :func:`encode` rejects).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import re
import struct
from collections.abc import Iterator
from typing import Any, ClassVar, Union

from voicegrow.protocol import strictjson
from voicegrow.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "DEFAULT_MAX_PAYLOAD",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_REASON_BYTES",
    "FLAG_LAST_AUDIO",
    "FrameType",
    "FrameHeader",
    "ControlEvent",
    "DEVICE_EVENTS",
    "SERVER_EVENTS",
    "TIMING_KEYS",
    "TTS_STOP_REASONS",
    "AudioFormat",
    "Hello",
    "HelloAck",
    "Audio",
    "Control",
    "Ping",
    "Pong",
    "Error",
    "Close",
    "Frame",
    "encode",
    "decode_message",
    "FrameDecoder",
    "Role",
    "ConnectionState",
    "ServerConnectionState",
    "ClientConnectionState",
    "NativeConnection",
    "wire_ms",
]

MAGIC = b"VG"
VERSION = 1
#: magic, version, type, flags, turn id, sequence number, timestamp (ms), payload length
_HEADER = struct.Struct("!2sBBIIIII")
HEADER_SIZE = _HEADER.size
DEFAULT_MAX_PAYLOAD = 256 * 1024
#: JSON payloads are small control messages; anything bigger or deeper is an attack or a bug.
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_DEPTH = 16
MAX_REASON_BYTES = 1024
#: AUDIO flag: the last audio frame of its turn in this direction.
FLAG_LAST_AUDIO = 0x0000_0001

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_NAME_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_EVENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


class FrameType(enum.IntEnum):
    HELLO = 0x01
    HELLO_ACK = 0x02
    AUDIO = 0x10
    CONTROL = 0x11
    PING = 0x20
    PONG = 0x21
    ERROR = 0x30
    CLOSE = 0x31


@dataclasses.dataclass(frozen=True)
class FrameHeader:
    """The fixed part of a frame, available before its payload has arrived."""

    frame_type: FrameType
    flags: int
    turn_id: int
    seq: int
    timestamp_ms: int
    payload_length: int


class ControlEvent(str, enum.Enum):
    """Event names this version defines; a CONTROL frame may carry others (forward compatibility)."""

    LISTEN_START = "listen_start"
    LISTEN_STOP = "listen_stop"
    ABORT = "abort"
    ASR_PARTIAL = "asr_partial"
    ASR_FINAL = "asr_final"
    LLM_TEXT = "llm_text"
    TTS_START = "tts_start"
    TTS_SENTENCE = "tts_sentence"
    TTS_STOP = "tts_stop"
    TURN_END = "turn_end"
    TURN_TIMINGS = "turn_timings"
    ERROR_SPOKEN = "error_spoken"


DEVICE_EVENTS = frozenset({"listen_start", "listen_stop", "abort"})
SERVER_EVENTS = frozenset(e.value for e in ControlEvent) - DEVICE_EVENTS
TTS_STOP_REASONS = ("done", "aborted", "error")
#: Keys of ``turn_timings`` data: milliseconds on the server's clock from the start of the turn.
TIMING_KEYS = ("speech_start", "speech_end", "asr_done", "llm_first_token", "first_sentence",
               "tts_first_audio", "first_audio_sent", "last_audio_sent")

#: Required fields of known events and their types; extra fields are allowed and kept.
_EVENT_FIELDS: dict[str, dict[str, type]] = {
    "asr_partial": {"text": str},
    "asr_final": {"text": str, "lang": str},
    "llm_text": {"text": str},
    "tts_start": {"sample_rate": int},
    "tts_sentence": {"text": str},
    "tts_stop": {"reason": str},
    "error_spoken": {"reason": str},
    "turn_end": {"outcome": str},
}


def wire_ms(seconds: float) -> int:
    """A clock reading in seconds as a header timestamp: whole milliseconds modulo 2**32."""
    return int(seconds * 1000) & _U32_MAX


# ---------------------------------------------------------------------------------------------------
# Field checks shared by the frame classes (they raise ProtocolError, so decoding needs no try/except)

def _bad(reason: str, code: ErrorCode = ErrorCode.BAD_PAYLOAD) -> ProtocolError:
    return ProtocolError(code, reason)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_uint(name: str, value: object, maximum: int) -> None:
    if not _is_int(value) or not 0 <= value <= maximum:  # type: ignore[operator]
        raise _bad(f"{name} must be an integer in 0..{maximum}, got {value!r}")


_HEADER_FIELDS = ("turn_id", "seq", "timestamp_ms")


def _check_header_fields(frame: object) -> None:
    for name in _HEADER_FIELDS:
        if hasattr(frame, name):
            _check_uint(name, getattr(frame, name), _U32_MAX)


def _header_fields(cls: type, header: FrameHeader) -> dict[str, int]:
    """The header values a frame class keeps; the others are ignored on decoding (sent as 0)."""
    names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return {name: getattr(header, name) for name in _HEADER_FIELDS if name in names}


def _check_text(name: str, value: object, max_chars: int) -> None:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise _bad(f"{name} is longer than {max_chars} characters")
    _check_unicode(name, value)


def _check_unicode(name: str, value: str) -> None:
    """Reject lone surrogates (legal in JSON escapes, unencodable as UTF-8 on the way out)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{name} holds an unpaired surrogate") from None


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not _NAME_ID.fullmatch(value):
        raise _bad(f"{name} must be 1-128 characters of A-Z a-z 0-9 . _ : -, got {value!r}")


def _check_object(name: str, value: object) -> None:
    if not isinstance(value, dict):
        raise _bad(f"{name} must be a JSON object, got {type(value).__name__}")


def _check_reason(value: object) -> None:
    _check_text("reason", value, MAX_REASON_BYTES)
    if len(value.encode("utf-8")) > MAX_REASON_BYTES:  # type: ignore[union-attr]
        raise _bad(f"reason is longer than {MAX_REASON_BYTES} bytes")


# ---------------------------------------------------------------------------------------------------
# JSON payloads

def _json_payload(obj: dict[str, Any]) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        payload = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise _bad(f"payload is not representable as JSON: {exc}") from None
    _check_json_limits(obj, len(payload))
    return payload


def _parse_json_object(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_JSON_BYTES:
        raise _bad(f"{what} JSON of {len(payload)} bytes exceeds {MAX_JSON_BYTES}", ErrorCode.OVERSIZED)
    try:
        obj = strictjson.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad(f"{what} payload is not valid UTF-8") from None
    except RecursionError:
        raise _bad(f"{what} JSON is nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as exc:  # JSONDecodeError, huge integers, NaN/Infinity, 1e400
        raise _bad(f"{what} payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _bad(f"{what} payload must be a JSON object, got {type(obj).__name__}")
    _check_json_limits(obj, len(payload))
    return obj


def _check_json_limits(obj: dict[str, Any], size: int) -> None:
    """Depth and string checks over a parsed (or to-be-sent) JSON value, without recursion."""
    if size > MAX_JSON_BYTES:
        raise _bad(f"JSON payload of {size} bytes exceeds {MAX_JSON_BYTES}", ErrorCode.OVERSIZED)
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_unicode("JSON string", value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _bad(f"JSON is nested deeper than {MAX_JSON_DEPTH}")
            if isinstance(value, dict):
                stack.extend((key, depth) for key in value)
                stack.extend((item, depth + 1) for item in value.values())
            else:
                stack.extend((item, depth + 1) for item in value)


def _get(obj: dict[str, Any], what: str, key: str, kind: type, default: Any = ...) -> Any:
    """``obj[key]`` checked against ``kind`` (``None`` allowed when it is the default)."""
    if key not in obj:
        if default is ...:
            raise _bad(f"{what} is missing {key!r}")
        return default
    value = obj[key]
    if value is None and default is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(f"{what}.{key} must be {kind.__name__}, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------
# Frames

@dataclasses.dataclass(frozen=True)
class AudioFormat:
    """A PCM stream's format; version 1 carries only signed 16-bit little-endian PCM."""

    sample_rate: int = 16000
    channels: int = 1
    sample_width: int = 2
    codec: str = "pcm_s16le"

    def __post_init__(self) -> None:
        unsupported = ErrorCode.UNSUPPORTED_AUDIO_FORMAT
        for name in ("sample_rate", "channels", "sample_width"):
            if not _is_int(getattr(self, name)):
                raise _bad(f"audio format {name} must be an integer, got {getattr(self, name)!r}")
        if not 8000 <= self.sample_rate <= 48000:
            raise _bad(f"sample rate {self.sample_rate} is outside 8000..48000", unsupported)
        if self.channels not in (1, 2):
            raise _bad(f"{self.channels} channels; only 1 or 2 are supported", unsupported)
        if self.sample_width != 2:
            raise _bad(f"sample width {self.sample_width}; only 2 (16-bit) is supported", unsupported)
        if self.codec != "pcm_s16le":
            raise _bad(f"codec {self.codec!r}; only 'pcm_s16le' is supported", unsupported)

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * self.sample_width

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: object, what: str = "audio format") -> AudioFormat:
        _check_object(what, obj)
        assert isinstance(obj, dict)
        return cls(
            sample_rate=_get(obj, what, "sample_rate", int),
            channels=_get(obj, what, "channels", int, 1),
            sample_width=_get(obj, what, "sample_width", int, 2),
            codec=_get(obj, what, "codec", str, "pcm_s16le"),
        )


_DIRECTIONS = ("audio_in", "audio_out")


def _check_audio_formats(frame: object) -> None:
    for name in _DIRECTIONS:
        if not isinstance(getattr(frame, name), AudioFormat):
            raise _bad(f"{name} must be an AudioFormat")


def _audio_formats_json(frame: Any) -> dict[str, Any]:
    return {name: getattr(frame, name).to_json() for name in _DIRECTIONS}


def _audio_formats_from(obj: dict[str, Any], what: str) -> dict[str, AudioFormat]:
    return {name: AudioFormat.from_json(_get(obj, what, name, dict), f"{what}.{name}") for name in _DIRECTIONS}


@dataclasses.dataclass(frozen=True)
class Hello:
    """Device → server, first frame: who the device is, what it sends and what it wants back."""

    frame_type: ClassVar[FrameType] = FrameType.HELLO

    device_id: str
    audio_in: AudioFormat
    audio_out: AudioFormat
    token: str | None = dataclasses.field(default=None, repr=False)
    capabilities: dict[str, Any] = dataclasses.field(default_factory=dict)
    client: str = ""
    timestamp_ms: int = dataclasses.field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        _check_id("device_id", self.device_id)
        _check_audio_formats(self)
        if self.token is not None:
            _check_text("token", self.token, 4096)
        _check_object("capabilities", self.capabilities)
        _check_text("client", self.client, 256)
        _check_header_fields(self)

    def _payload(self) -> bytes:
        return _json_payload({
            "device_id": self.device_id,
            **_audio_formats_json(self),
            "token": self.token,
            "capabilities": self.capabilities,
            "client": self.client,
        })

    @classmethod
    def _from_wire(cls, header: FrameHeader, payload: bytes) -> Hello:
        obj = _parse_json_object(payload, "hello")
        return cls(
            device_id=_get(obj, "hello", "device_id", str),
            **_audio_formats_from(obj, "hello"),
            token=_get(obj, "hello", "token", str, None),
            capabilities=_get(obj, "hello", "capabilities", dict, {}),
            client=_get(obj, "hello", "client", str, ""),
            **_header_fields(cls, header),
        )


@dataclasses.dataclass(frozen=True)
class HelloAck:
    """Server → device, answer to HELLO: the formats the server will actually use on this session."""

    frame_type: ClassVar[FrameType] = FrameType.HELLO_ACK

    session_id: str
    audio_in: AudioFormat
    audio_out: AudioFormat
    server: str
    nonce: str = ""
    capabilities: dict[str, Any] = dataclasses.field(default_factory=dict)
    timestamp_ms: int = dataclasses.field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        _check_id("session_id", self.session_id)
        _check_audio_formats(self)
        _check_text("server", self.server, 256)
        _check_text("nonce", self.nonce, 256)
        _check_object("capabilities", self.capabilities)
        _check_header_fields(self)

    def _payload(self) -> bytes:
        return _json_payload({
            "session_id": self.session_id,
            **_audio_formats_json(self),
            "server": self.server,
            "nonce": self.nonce,
            "capabilities": self.capabilities,
        })

    @classmethod
    def _from_wire(cls, header: FrameHeader, payload: bytes) -> HelloAck:
        obj = _parse_json_object(payload, "hello_ack")
        what = "hello_ack"
        return cls(
            session_id=_get(obj, what, "session_id", str),
            **_audio_formats_from(obj, what),
            server=_get(obj, what, "server", str, ""),
            nonce=_get(obj, what, "nonce", str, ""),
            capabilities=_get(obj, what, "capabilities", dict, {}),
            **_header_fields(cls, header),
        )


@dataclasses.dataclass(frozen=True)
class Audio:
    """PCM in the format agreed in the handshake (s16le, interleaved when stereo)."""

    frame_type: ClassVar[FrameType] = FrameType.AUDIO

    pcm: bytes
    turn_id: int = 0
    seq: int = 0
    timestamp_ms: int = 0
    last: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.pcm, (bytes, bytearray, memoryview)):
            raise _bad(f"pcm must be bytes, got {type(self.pcm).__name__}", ErrorCode.BAD_AUDIO)
        if not isinstance(self.pcm, bytes):
            object.__setattr__(self, "pcm", bytes(self.pcm))
        if len(self.pcm) % 2:
            raise _bad(f"s16 PCM needs an even byte count, got {len(self.pcm)}", ErrorCode.BAD_AUDIO)
        if not isinstance(self.last, bool):
            raise _bad("last must be a bool")
        _check_header_fields(self)

    def _payload(self) -> bytes:
        return self.pcm

    @classmethod
    def _from_wire(cls, header: FrameHeader, payload: bytes) -> Audio:
        return cls(payload, last=bool(header.flags & FLAG_LAST_AUDIO), **_header_fields(cls, header))


@dataclasses.dataclass(frozen=True)
class Control:
    """A named event with a JSON object; known events must carry their documented fields."""

    frame_type: ClassVar[FrameType] = FrameType.CONTROL

    event: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    turn_id: int = 0
    seq: int = dataclasses.field(default=0, kw_only=True)
    timestamp_ms: int = dataclasses.field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        if isinstance(self.event, ControlEvent):
            object.__setattr__(self, "event", self.event.value)
        if not isinstance(self.event, str) or not _EVENT_NAME.fullmatch(self.event):
            raise _bad(f"event name must match [a-z][a-z0-9_]{{0,63}}, got {self.event!r}")
        _check_object("data", self.data)
        _check_event_data(self.event, self.data)
        _check_header_fields(self)

    def _payload(self) -> bytes:
        return _json_payload({"event": self.event, "data": self.data})

    @classmethod
    def _from_wire(cls, header: FrameHeader, payload: bytes) -> Control:
        obj = _parse_json_object(payload, "control")
        return cls(_get(obj, "control", "event", str), _get(obj, "control", "data", dict, {}),
                   **_header_fields(cls, header))


def _check_event_data(event: str, data: dict[str, Any]) -> None:
    what = f"{event} data"
    for key, kind in _EVENT_FIELDS.get(event, {}).items():
        _get(data, what, key, kind)
    if event == "tts_stop" and data["reason"] not in TTS_STOP_REASONS:
        raise _bad(f"tts_stop reason must be one of {TTS_STOP_REASONS}, got {data['reason']!r}")
    if event == "tts_start" and not 8000 <= data["sample_rate"] <= 48000:
        raise _bad(f"tts_start sample_rate {data['sample_rate']} is outside 8000..48000")
    if event == "turn_timings":
        for key, value in data.items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise _bad(f"turn_timings.{key} must be a number of milliseconds or null")


class _NonceFrame:
    """PING and PONG: a u64 nonce, nothing else."""

    frame_type: ClassVar[FrameType]
    _payload_struct: ClassVar[struct.Struct] = struct.Struct("!Q")
    nonce: int
    timestamp_ms: int

    def __post_init__(self) -> None:
        _check_uint("nonce", self.nonce, _U64_MAX)
        _check_header_fields(self)

    def _payload(self) -> bytes:
        return self._payload_struct.pack(self.nonce)

    @classmethod
    def _from_wire(cls, header: FrameHeader, payload: bytes) -> Any:
        if len(payload) != cls._payload_struct.size:
            raise _bad(f"{cls.frame_type.name} payload must be 8 bytes, got {len(payload)}")
        return cls(cls._payload_struct.unpack(payload)[0], **_header_fields(cls, header))


@dataclasses.dataclass(frozen=True)
class Ping(_NonceFrame):
    """Either side may ask; the other answers PONG with the same nonce (a liveness and RTT probe)."""

    frame_type: ClassVar[FrameType] = FrameType.PING

    nonce: int
    timestamp_ms: int = dataclasses.field(default=0, kw_only=True)


@dataclasses.dataclass(frozen=True)
class Pong(_NonceFrame):
    frame_type: ClassVar[FrameType] = FrameType.PONG

    nonce: int
    timestamp_ms: int = dataclasses.field(default=0, kw_only=True)


class _CodeReasonFrame:
    """ERROR and CLOSE: a u16 code and a UTF-8 reason."""

    frame_type: ClassVar[FrameType]
    _code_struct: ClassVar[struct.Struct] = struct.Struct("!H")
    code: int
    reason: str
    timestamp_ms: int

    def __post_init__(self) -> None:
        _check_uint("code", self.code, _U16_MAX)
        _check_reason(self.reason)
        _check_header_fields(self)

    def _payload(self) -> bytes:
        return self._code_struct.pack(self.code) + self.reason.encode("utf-8")

    @classmethod
    def _from_wire(cls, header: FrameHeader, payload: bytes) -> Any:
        if len(payload) < cls._code_struct.size:
            raise _bad(f"{cls.frame_type.name} payload needs a 2-byte code, got {len(payload)} bytes")
        try:
            reason = payload[cls._code_struct.size:].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"{cls.frame_type.name} reason is not valid UTF-8") from None
        return cls(cls._code_struct.unpack_from(payload)[0], reason, **_header_fields(cls, header))


@dataclasses.dataclass(frozen=True)
class Error(_CodeReasonFrame):
    """Something failed; ``code`` is an :class:`ErrorCode` where known (a plain int otherwise)."""

    frame_type: ClassVar[FrameType] = FrameType.ERROR

    code: int
    reason: str = ""
    turn_id: int = dataclasses.field(default=0, kw_only=True)
    timestamp_ms: int = dataclasses.field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            object.__setattr__(self, "code", ErrorCode(self.code))
        except ValueError:
            pass  # a code from a newer peer: kept as a plain int


@dataclasses.dataclass(frozen=True)
class Close(_CodeReasonFrame):
    """The sender will send nothing more; ``code`` follows WebSocket close codes (1000 = normal)."""

    frame_type: ClassVar[FrameType] = FrameType.CLOSE

    code: int
    reason: str = ""
    timestamp_ms: int = dataclasses.field(default=0, kw_only=True)


Frame = Union[Hello, HelloAck, Audio, Control, Ping, Pong, Error, Close]

_FRAME_CLASSES: dict[int, Any] = {
    cls.frame_type: cls for cls in (Hello, HelloAck, Audio, Control, Ping, Pong, Error, Close)
}


# ---------------------------------------------------------------------------------------------------
# Encoding and decoding

def encode(frame: Frame, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """The frame as one binary WebSocket message (header + payload).

    ``max_payload`` is the peer's limit: refusing to build a frame it would reject makes the bug show
    up at the sender, with a stack trace, instead of as a dropped connection.
    """
    if type(frame) not in _FRAME_CLASSES.values():
        raise TypeError(f"not a native protocol frame: {frame!r}")
    payload = frame._payload()
    if len(payload) > max_payload:
        raise _bad(f"{frame.frame_type.name} payload of {len(payload)} bytes exceeds {max_payload}",
                   ErrorCode.OVERSIZED)
    flags = FLAG_LAST_AUDIO if getattr(frame, "last", False) else 0
    header = _HEADER.pack(MAGIC, VERSION, frame.frame_type, flags, getattr(frame, "turn_id", 0),
                          getattr(frame, "seq", 0), frame.timestamp_ms, len(payload))
    return header + payload


def _check_header(data: bytes | bytearray | memoryview, max_payload: int) -> FrameHeader | None:
    """Check as much of a header as has arrived; return it once all 24 bytes are there.

    Checking each field as soon as its bytes arrive lets a stream decoder reject garbage (and, above
    all, an oversized length) before buffering what follows.
    """
    have = len(data)
    if bytes(data[:2]) != MAGIC[:have]:
        raise _bad(f"bad magic {bytes(data[:2])!r}, expected {MAGIC!r}", ErrorCode.BAD_MAGIC)
    if have >= 3 and data[2] != VERSION:
        raise _bad(f"protocol version {data[2]} is not supported (this side speaks {VERSION})",
                   ErrorCode.UNSUPPORTED_VERSION)
    if have >= 4 and data[3] not in _FRAME_CLASSES:
        raise _bad(f"unknown frame type 0x{data[3]:02x}", ErrorCode.UNKNOWN_FRAME_TYPE)
    if have < HEADER_SIZE:
        return None
    _, _, frame_type, flags, turn_id, seq, timestamp_ms, length = _HEADER.unpack_from(data)
    if length > max_payload:
        raise _bad(f"declared payload of {length} bytes exceeds {max_payload}", ErrorCode.OVERSIZED)
    return FrameHeader(FrameType(frame_type), flags, turn_id, seq, timestamp_ms, length)


def _decode_payload(header: FrameHeader, payload: bytes) -> Frame:
    frame: Frame = _FRAME_CLASSES[header.frame_type]._from_wire(header, payload)
    return frame


def decode_message(message: bytes | bytearray | memoryview, *,
                   max_payload: int = DEFAULT_MAX_PAYLOAD) -> Frame:
    """Decode one WebSocket message, which must hold exactly one whole frame."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise _bad(f"native frames travel in binary messages, got {type(message).__name__}")
    header = _check_header(message, max_payload)
    if header is None:
        raise _bad(f"message of {len(message)} bytes is shorter than the {HEADER_SIZE}-byte header",
                   ErrorCode.TRUNCATED)
    end = HEADER_SIZE + header.payload_length
    if len(message) < end:
        raise _bad(f"{header.frame_type.name} declares {header.payload_length} payload bytes, "
                   f"message holds {len(message) - HEADER_SIZE}", ErrorCode.TRUNCATED)
    if len(message) > end:
        raise _bad(f"{len(message) - end} bytes after the {header.frame_type.name} frame",
                   ErrorCode.TRAILING_DATA)
    return _decode_payload(header, bytes(message[HEADER_SIZE:]))


class FrameDecoder:
    """Frames from a byte stream (back to back, split anywhere), or from single messages.

    After a :class:`ProtocolError` the stream is unusable (frame boundaries are lost), so every later
    call raises the same error again.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if not _is_int(max_payload) or max_payload < 0:
            raise ValueError(f"max_payload must be a non-negative integer, got {max_payload!r}")
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer stream bytes; a bad header at the front is rejected before its payload is kept."""
        self._raise_if_failed()
        if self._eof:
            raise RuntimeError("receive_data() after receive_eof()")
        missing = HEADER_SIZE - len(self._buffer)
        if missing > 0:
            self._guard(_check_header, self._buffer + bytes(data[:missing]), self.max_payload)
        self._buffer += data

    def receive_eof(self) -> None:
        """The stream ended; a partial frame left in the buffer will raise TRUNCATED."""
        self._eof = True

    def next_frame(self) -> Frame | None:
        """The next whole frame, or ``None`` until more data arrives."""
        self._raise_if_failed()
        header = self._guard(_check_header, self._buffer, self.max_payload)
        end = HEADER_SIZE + header.payload_length if header else None
        if end is None or len(self._buffer) < end:
            if self._eof and self._buffer:
                self._guard(self._truncated)
            return None
        assert header is not None
        payload = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        return self._guard(_decode_payload, header, payload)

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame

    def decode_message(self, message: bytes | bytearray | memoryview) -> Frame:
        """Decode one WebSocket message with this decoder's limit (independent of the stream)."""
        return decode_message(message, max_payload=self.max_payload)

    def _truncated(self) -> None:
        raise _bad(f"stream ended inside a frame ({len(self._buffer)} bytes left)", ErrorCode.TRUNCATED)

    def _guard(self, func: Any, *args: Any) -> Any:
        try:
            return func(*args)
        except ProtocolError as exc:
            self._error = exc
            raise

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise ProtocolError(self._error.code, self._error.reason)


# ---------------------------------------------------------------------------------------------------
# Frame order

class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class ConnectionState:
    """Which frames may travel now, for one side of a connection (h11-style, no I/O).

    Call :meth:`receive` with every decoded frame from the peer and :meth:`send` with every frame
    before encoding it; both raise ProtocolError(UNEXPECTED_FRAME) for a frame out of order. Rules:
    HELLO first from the client and only once; HELLO_ACK once, from the server, after HELLO; AUDIO,
    CONTROL, PING and PONG from the client after its HELLO and from the server after its HELLO_ACK;
    ERROR and CLOSE at any time; nothing from a side after its own CLOSE.
    """

    def __init__(self, our_role: Role) -> None:
        self.our_role = our_role
        self.hello: Hello | None = None
        self.hello_ack: HelloAck | None = None
        self.closed_by: set[Role] = set()

    @property
    def peer_role(self) -> Role:
        return Role.SERVER if self.our_role is Role.CLIENT else Role.CLIENT

    @property
    def is_open(self) -> bool:
        """Handshake done and neither side has closed."""
        return self.hello_ack is not None and not self.closed_by

    def receive(self, frame: Frame) -> None:
        self._advance(self.peer_role, frame)

    def send(self, frame: Frame) -> None:
        self._advance(self.our_role, frame)

    def _advance(self, sender: Role, frame: Frame) -> None:
        name = frame.frame_type.name
        if sender in self.closed_by:
            raise _unexpected(f"{name} from the {sender.value} after its CLOSE")
        if isinstance(frame, Close):
            self.closed_by.add(sender)
        elif isinstance(frame, Error):
            pass
        elif isinstance(frame, Hello):
            if sender is not Role.CLIENT or self.hello is not None:
                raise _unexpected(f"HELLO from the {sender.value}" if sender is Role.SERVER
                                  else "HELLO sent twice")
            self.hello = frame
        elif isinstance(frame, HelloAck):
            if sender is not Role.SERVER or self.hello is None or self.hello_ack is not None:
                raise _unexpected("HELLO_ACK only comes from the server, once, after HELLO")
            self.hello_ack = frame
        else:
            ready = self.hello if sender is Role.CLIENT else self.hello_ack
            if ready is None:
                expected = "HELLO" if sender is Role.CLIENT else "HELLO_ACK"
                raise _unexpected(f"{name} from the {sender.value} before its {expected}")


def _unexpected(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNEXPECTED_FRAME, reason)


class ServerConnectionState(ConnectionState):
    """The server's view: :meth:`receive` checks what the device sends."""

    def __init__(self) -> None:
        super().__init__(Role.SERVER)


class ClientConnectionState(ConnectionState):
    """The device's view: :meth:`receive` checks what the server sends."""

    def __init__(self) -> None:
        super().__init__(Role.CLIENT)


# ---------------------------------------------------------------------------------------------------
# One side of a connection

class NativeConnection:
    """One side of a native-protocol connection, bytes in and frames out, in the manner of h11.

    The caller owns the transport: it hands over what arrived with :meth:`receive_data`, takes the
    frames with :meth:`next_event` (``None``: nothing complete yet), and turns each frame it wants to
    send into bytes with :meth:`send`. Decoding and the order of frames (:class:`ConnectionState`) are
    checked in one place, for either role, so the server's driver and the ``talk`` client cannot
    drift apart.

    ``framing`` ``"message"`` (the protocol over WebSocket): each :meth:`receive_data` is one whole
    binary message holding exactly one frame, as :func:`decode_message` demands; a text message is
    BAD_PAYLOAD. ``"stream"``: bytes back to back, split anywhere (:class:`FrameDecoder`).

    A :class:`ProtocolError` from :meth:`next_event` breaks the connection (frame boundaries or the
    order are lost): every later :meth:`next_event` raises it again. :meth:`send` raises
    ``ProtocolError(UNEXPECTED_FRAME)`` for a frame this side may not send now, and leaves the
    connection usable.
    """

    def __init__(self, our_role: Role, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 max_send_payload: int = DEFAULT_MAX_PAYLOAD, framing: str = "message") -> None:
        if framing not in ("message", "stream"):
            raise ValueError(f"framing must be 'message' or 'stream', got {framing!r}")
        self._decoder = FrameDecoder(max_payload)
        self._state = ConnectionState(our_role)
        self._framing = framing
        self._messages: collections.deque[bytes | bytearray | memoryview | str] = collections.deque()
        self._error: ProtocolError | None = None
        self.max_payload = max_payload
        self.max_send_payload = max_send_payload

    @property
    def our_role(self) -> Role:
        return self._state.our_role

    @property
    def peer_role(self) -> Role:
        return self._state.peer_role

    @property
    def hello(self) -> Hello | None:
        """The client's HELLO once it travelled (received by a server, sent by a client)."""
        return self._state.hello

    @property
    def hello_ack(self) -> HelloAck | None:
        return self._state.hello_ack

    @property
    def is_open(self) -> bool:
        """Handshake done and neither side has closed."""
        return self._state.is_open

    @property
    def we_closed(self) -> bool:
        """This side sent CLOSE: it may send nothing more."""
        return self.our_role in self._state.closed_by

    @property
    def peer_closed(self) -> bool:
        return self.peer_role in self._state.closed_by

    def receive_data(self, data: bytes | bytearray | memoryview | str) -> None:
        """What the transport delivered: one WebSocket message, or stream bytes (see ``framing``)."""
        if self._framing == "message":
            self._messages.append(data)
        elif isinstance(data, str):
            raise TypeError("a byte stream carries bytes, not str")
        else:
            self._guard(self._decoder.receive_data, data)

    def receive_eof(self) -> None:
        """The peer's stream ended (``stream`` framing); a partial frame then raises TRUNCATED."""
        self._decoder.receive_eof()

    def next_event(self) -> Frame | None:
        """The next frame from the peer, checked against the order rules; ``None`` until one is whole."""
        if self._error is not None:
            raise ProtocolError(self._error.code, self._error.reason)
        if self._framing == "message":
            if not self._messages:
                return None
            message = self._messages.popleft()
            frame = self._guard(decode_message, message, max_payload=self.max_payload)
        else:
            frame = self._guard(self._decoder.next_frame)
            if frame is None:
                return None
        self._guard(self._state.receive, frame)
        return frame

    def send(self, frame: Frame) -> bytes:
        """The bytes of ``frame``, after checking that this side may send it now."""
        self._state.send(frame)
        return encode(frame, max_payload=self.max_send_payload)

    def _guard(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ProtocolError as exc:
            self._error = exc
            raise
