"""The xiaozhi-esp32 WebSocket protocol: a byte-exact, sans-IO codec of what the firmware sends and reads.

An ESP32 board running the xiaozhi firmware connects to ``ws://HOST:PORT/xiaozhi/v1/`` with
``Authorization``, ``Protocol-Version``, ``Device-Id`` and ``Client-Id`` headers, sends a JSON
``hello`` and waits (10 s) for the server's ``hello``. After that, text messages are JSON objects
dispatched by ``type`` and binary messages are Opus packets, bare (protocol version 1) or behind the
``BinaryProtocol2`` (16 bytes, big-endian) or ``BinaryProtocol3`` (4 bytes) header. The facts and the
firmware source lines they come from are in ``docs/xiaozhi.md``.

No sockets and no trio: a driver feeds text/bytes in and gets typed messages out, and asks for the
text/bytes to send. Bad input raises :class:`XiaozhiError` and nothing else. The Opus payloads are
carried, not decoded: that is :mod:`voicegrow.opus`'s job.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from voicegrow.protocol import strictjson
from voicegrow.protocol.errors import CodecError

__all__ = [
    "ABORT_REASONS",
    "BINARY_TYPE_JSON",
    "BINARY_TYPE_OPUS",
    "DEFAULT_PATH",
    "DEVICE_QUEUE_PACKETS",
    "FRAME_DURATION_MS",
    "HEADER_V2",
    "HEADER_V3",
    "HELLO_TIMEOUT_S",
    "LISTEN_MODES",
    "LISTEN_STATES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSIONS",
    "TTS_STATES",
    "Abort",
    "Alert",
    "AudioParams",
    "BinaryFrame",
    "DeviceMessage",
    "Hello",
    "Listen",
    "Llm",
    "Mcp",
    "McpCall",
    "McpResult",
    "ServerHello",
    "ServerMessage",
    "Stt",
    "System",
    "Tts",
    "XiaozhiError",
    "XiaozhiErrorCode",
    "decode_binary",
    "decode_device_text",
    "decode_server_text",
    "encode_binary",
    "encode_text",
    "mcp_call",
    "mcp_notification",
    "parse_mcp_result",
]

#: The path every reference server serves and the firmware's default ``websocket.url`` points to.
DEFAULT_PATH = "/xiaozhi/v1/"
#: Binary framing versions (``Protocol-Version`` header, hello ``version``): 1 raw Opus, 2 and 3 headers.
PROTOCOL_VERSIONS = (1, 2, 3)
#: ``xEventGroupWaitBits(..., pdMS_TO_TICKS(10000))`` in ``WebsocketProtocol::OpenAudioChannel``.
HELLO_TIMEOUT_S = 10.0
#: ``OPUS_FRAME_DURATION_MS`` (audio_service.h): the firmware encodes and decodes 60 ms packets.
FRAME_DURATION_MS = 60
#: ``MAX_DECODE_PACKETS_IN_QUEUE`` = 2400 / 60: packets beyond this are dropped by the device.
DEVICE_QUEUE_PACKETS = 2400 // FRAME_DURATION_MS
#: Largest message this codec parses; a 60 ms Opus packet is ~100–300 bytes, a tools/list page a few KiB.
MAX_MESSAGE_BYTES = 64 * 1024
#: ``BinaryProtocol2``: u16 version, u16 type, u32 reserved, u32 timestamp (ms), u32 payload_size.
HEADER_V2 = struct.Struct(">HHIII")
#: ``BinaryProtocol3``: u8 type, u8 reserved, u16 payload_size.
HEADER_V3 = struct.Struct(">BBH")
#: ``type`` of a v2 frame (the v3 type byte uses the same values): 0 Opus, 1 JSON.
BINARY_TYPE_OPUS = 0
BINARY_TYPE_JSON = 1

LISTEN_STATES = ("start", "stop", "detect")
LISTEN_MODES = ("auto", "manual", "realtime")
TTS_STATES = ("start", "stop", "sentence_start", "sentence_end")
#: ``Protocol::SendAbortSpeaking`` sends no reason or ``wake_word_detected``.
ABORT_REASONS = ("wake_word_detected",)
_MAX_DEPTH = 32
_MAX_TEXT_CHARS = 4096


class XiaozhiErrorCode(enum.Enum):
    """Why a message was refused; the value is a stable string for logs, metric labels and ``error`` messages."""

    TOO_LARGE = "too_large"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    TOO_DEEP = "too_deep"
    BAD_SHAPE = "bad_shape"
    BAD_FIELD = "bad_field"
    UNKNOWN_TYPE = "unknown_type"
    TRUNCATED = "truncated"
    LENGTH_MISMATCH = "length_mismatch"
    BAD_BINARY_TYPE = "bad_binary_type"
    UNSUPPORTED_VERSION = "unsupported_version"

    @property
    def ws_close_code(self) -> int:
        """The WebSocket close code for a server that hangs up over this error (RFC 6455 §7.4.1)."""
        if self is XiaozhiErrorCode.TOO_LARGE:
            return 1009
        if self is XiaozhiErrorCode.UNSUPPORTED_VERSION:
            return 1003
        return 1007 if self in (XiaozhiErrorCode.INVALID_UTF8, XiaozhiErrorCode.INVALID_JSON) else 1002


class XiaozhiError(CodecError):
    """Input the xiaozhi codec refuses."""

    code: XiaozhiErrorCode


# -- messages ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AudioParams:
    """``audio_params`` of either hello: the device's upstream format, or the server's downstream one."""

    format: str = "opus"
    sample_rate: int = 16000
    channels: int = 1
    frame_duration: int = FRAME_DURATION_MS

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "sample_rate": self.sample_rate, "channels": self.channels,
                "frame_duration": self.frame_duration}


@dataclass(frozen=True, slots=True)
class Hello:
    """The device's first message. ``features`` as sent (``mcp``, ``aec``, ``glyph_push``)."""

    version: int = 1
    transport: str = "websocket"
    audio_params: AudioParams = AudioParams()
    features: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mcp(self) -> bool:
        return self.features.get("mcp") is True


@dataclass(frozen=True, slots=True)
class Listen:
    """``listen`` start/stop/detect. ``mode`` comes with ``start``; ``text`` (the wake word) with ``detect``."""

    state: str
    mode: str | None = None
    text: str | None = None
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class Abort:
    reason: str | None = None
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class Mcp:
    """A JSON-RPC 2.0 message in either direction (``payload`` is the JSON-RPC object)."""

    payload: Mapping[str, Any]
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class ServerHello:
    session_id: str
    audio_params: AudioParams = AudioParams(sample_rate=24000)
    transport: str = "websocket"


@dataclass(frozen=True, slots=True)
class Stt:
    text: str
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class Llm:
    """The face on the device's screen: ``emotion`` is one of the firmware's names, ``text`` its emoji."""

    emotion: str
    text: str = ""
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class Tts:
    state: str
    text: str | None = None
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class System:
    command: str
    session_id: str = ""


@dataclass(frozen=True, slots=True)
class Alert:
    status: str
    message: str
    emotion: str
    session_id: str = ""


DeviceMessage = Union[Hello, Listen, Abort, Mcp]
ServerMessage = Union[ServerHello, Stt, Llm, Tts, Mcp, System, Alert]


@dataclass(frozen=True, slots=True)
class BinaryFrame:
    """One binary message: an Opus packet (``type`` 0), or JSON inside a v2/v3 header (``type`` 1).

    ``timestamp`` is the v2 header's milliseconds (the device's clock, for server-side AEC); 0 otherwise.
    """

    payload: bytes
    type: int = BINARY_TYPE_OPUS
    timestamp: int = 0


# -- JSON helpers -------------------------------------------------------------------------------------


def _loads(data: str | bytes | bytearray | memoryview, max_bytes: int) -> dict[str, Any]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > max_bytes:
            raise XiaozhiError(XiaozhiErrorCode.TOO_LARGE, f"{len(data)} bytes, limit {max_bytes}")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise XiaozhiError(XiaozhiErrorCode.INVALID_UTF8, str(exc)) from None
    else:
        text = data
        if len(text) > max_bytes:  # characters: at least as many bytes
            raise XiaozhiError(XiaozhiErrorCode.TOO_LARGE, f"{len(text)} characters, limit {max_bytes}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: not UTF-8 on the wire
            raise XiaozhiError(XiaozhiErrorCode.INVALID_UTF8, str(exc)) from None
    if _nesting(text) > _MAX_DEPTH:
        raise XiaozhiError(XiaozhiErrorCode.TOO_DEEP, f"JSON nested deeper than {_MAX_DEPTH}")
    try:
        value = strictjson.loads(text)
    except strictjson.NumberOutOfRange:  # cJSON would not produce it, and it cannot be sent back
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "number out of range") from None
    except (ValueError, RecursionError) as exc:
        raise XiaozhiError(XiaozhiErrorCode.INVALID_JSON, str(exc)[:200]) from None
    if not isinstance(value, dict):
        raise XiaozhiError(XiaozhiErrorCode.BAD_SHAPE, f"expected a JSON object, got {type(value).__name__}")
    try:
        strictjson.refuse_lone_surrogates(text, value)
    except strictjson.LoneSurrogate:
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "a lone surrogate escape in a string") from None
    return value


def _nesting(text: str) -> int:
    """An upper bound of the JSON nesting depth (brackets inside strings count too: only stricter)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _string(obj: Mapping[str, Any], key: str, *, required: bool = False, choices: tuple[str, ...] | None = None,
            max_chars: int = _MAX_TEXT_CHARS) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, f"{key!r} is required")
        return None
    if not isinstance(value, str):
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, f"{key!r} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, f"{key!r} is longer than {max_chars} characters")
    if choices is not None and value not in choices:
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, f"{key!r} must be one of {', '.join(choices)}; got {value[:40]!r}")
    return value


def _int(obj: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = obj.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # cJSON prints whole numbers without a fraction, but a peer may not
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, f"{key!r} must be an integer from {low} to {high}")
    return value


def _audio_params(value: Any) -> AudioParams:
    if value is None:
        return AudioParams()
    if not isinstance(value, dict):
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "'audio_params' must be an object")
    fmt = _string(value, "format") or "opus"
    return AudioParams(format=fmt, sample_rate=_int(value, "sample_rate", 16000, 8000, 48000),
                       channels=_int(value, "channels", 1, 1, 2),
                       frame_duration=_int(value, "frame_duration", FRAME_DURATION_MS, 1, 120))


def _session_id(obj: Mapping[str, Any]) -> str:
    return _string(obj, "session_id", max_chars=128) or ""


# -- decoding ---------------------------------------------------------------------------------------


def decode_device_text(data: str | bytes | bytearray | memoryview, *,
                       max_bytes: int = MAX_MESSAGE_BYTES) -> DeviceMessage:
    """A text message from the device: ``hello``, ``listen``, ``abort`` or ``mcp``.

    Unknown fields are ignored (the firmware adds ``text_font`` and future features freely); a known
    field of the wrong type, an unknown ``type`` or a value outside the protocol raises.
    """
    obj = _loads(data, max_bytes)
    kind = _string(obj, "type", required=True, max_chars=64)
    if kind == "hello":
        features = obj.get("features", {})
        if not isinstance(features, dict):
            raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "'features' must be an object")
        return Hello(version=_int(obj, "version", 1, 0, 65535), transport=_string(obj, "transport", max_chars=64)
                     or "websocket", audio_params=_audio_params(obj.get("audio_params")), features=features)
    if kind == "listen":
        state = _string(obj, "state", required=True, choices=LISTEN_STATES)
        assert state is not None
        mode = _string(obj, "mode", choices=LISTEN_MODES)
        return Listen(state=state, mode=mode, text=_string(obj, "text"), session_id=_session_id(obj))
    if kind == "abort":
        return Abort(reason=_string(obj, "reason", max_chars=64), session_id=_session_id(obj))
    if kind == "mcp":
        payload = obj.get("payload")
        if not isinstance(payload, dict):
            raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "'payload' must be a JSON-RPC object")
        return Mcp(payload=payload, session_id=_session_id(obj))
    raise XiaozhiError(XiaozhiErrorCode.UNKNOWN_TYPE, f"no device message of type {kind[:40]!r}")


def decode_server_text(data: str | bytes | bytearray | memoryview, *,
                       max_bytes: int = MAX_MESSAGE_BYTES) -> ServerMessage:
    """A text message from the server, as the firmware reads it (the emulator's side)."""
    obj = _loads(data, max_bytes)
    kind = _string(obj, "type", required=True, max_chars=64)
    sid = _session_id(obj)
    if kind == "hello":
        transport = _string(obj, "transport", required=True, max_chars=64)
        assert transport is not None
        params = obj.get("audio_params")  # absent: the firmware keeps its 24 kHz default (protocol.h)
        audio = _audio_params({"sample_rate": 24000, **params} if isinstance(params, dict) else
                              {"sample_rate": 24000} if params is None else params)
        return ServerHello(session_id=sid, audio_params=audio, transport=transport)
    if kind == "stt":
        return Stt(text=_string(obj, "text", required=True) or "", session_id=sid)
    if kind == "llm":
        return Llm(emotion=_string(obj, "emotion", required=True, max_chars=64) or "",
                   text=_string(obj, "text") or "", session_id=sid)
    if kind == "tts":
        state = _string(obj, "state", required=True, choices=TTS_STATES)
        assert state is not None
        return Tts(state=state, text=_string(obj, "text"), session_id=sid)
    if kind == "mcp":
        payload = obj.get("payload")
        if not isinstance(payload, dict):
            raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "'payload' must be a JSON-RPC object")
        return Mcp(payload=payload, session_id=sid)
    if kind == "system":
        return System(command=_string(obj, "command", required=True, max_chars=64) or "", session_id=sid)
    if kind == "alert":
        return Alert(status=_string(obj, "status", required=True) or "", message=_string(obj, "message", required=True)
                     or "", emotion=_string(obj, "emotion", required=True) or "", session_id=sid)
    raise XiaozhiError(XiaozhiErrorCode.UNKNOWN_TYPE, f"no server message of type {kind[:40]!r}")


def decode_binary(data: bytes | bytearray | memoryview, version: int, *,
                  max_bytes: int = MAX_MESSAGE_BYTES) -> BinaryFrame:
    """A binary message in framing ``version`` (1, 2 or 3).

    The firmware trusts ``payload_size`` and reads that many bytes past the header; here a size that
    disagrees with the message length is refused either way (:attr:`XiaozhiErrorCode.LENGTH_MISMATCH`).
    """
    if len(data) > max_bytes:
        raise XiaozhiError(XiaozhiErrorCode.TOO_LARGE, f"{len(data)} bytes, limit {max_bytes}")
    raw = bytes(data)
    if version == 1:
        return BinaryFrame(payload=raw)
    if version == 2:
        if len(raw) < HEADER_V2.size:
            raise XiaozhiError(XiaozhiErrorCode.TRUNCATED, f"{len(raw)} bytes, a v2 header is {HEADER_V2.size}")
        frame_version, kind, _reserved, timestamp, size = HEADER_V2.unpack_from(raw)
        if frame_version != 2:
            raise XiaozhiError(XiaozhiErrorCode.UNSUPPORTED_VERSION, f"v2 header says version {frame_version}")
        header = HEADER_V2.size
    elif version == 3:
        if len(raw) < HEADER_V3.size:
            raise XiaozhiError(XiaozhiErrorCode.TRUNCATED, f"{len(raw)} bytes, a v3 header is {HEADER_V3.size}")
        kind, _reserved, size = HEADER_V3.unpack_from(raw)
        timestamp = 0
        header = HEADER_V3.size
    else:
        raise XiaozhiError(XiaozhiErrorCode.UNSUPPORTED_VERSION, f"binary protocol version {version}")
    if kind not in (BINARY_TYPE_OPUS, BINARY_TYPE_JSON):
        raise XiaozhiError(XiaozhiErrorCode.BAD_BINARY_TYPE, f"frame type {kind}")
    if size != len(raw) - header:
        raise XiaozhiError(XiaozhiErrorCode.LENGTH_MISMATCH,
                           f"payload_size {size} but {len(raw) - header} bytes follow the header")
    return BinaryFrame(payload=raw[header:], type=kind, timestamp=timestamp)


# -- encoding ---------------------------------------------------------------------------------------


def encode_binary(payload: bytes, version: int, *, timestamp: int = 0, type: int = BINARY_TYPE_OPUS) -> bytes:
    """An Opus packet (or JSON, ``type`` 1) framed for protocol ``version``, exactly as the firmware packs it."""
    if version == 1:
        return bytes(payload)
    if version == 2:
        return HEADER_V2.pack(2, type, 0, timestamp & 0xFFFFFFFF, len(payload)) + payload
    if version == 3:
        if len(payload) > 0xFFFF:
            raise XiaozhiError(XiaozhiErrorCode.TOO_LARGE, f"{len(payload)} bytes do not fit a v3 u16 size")
        return HEADER_V3.pack(type, 0, len(payload)) + payload
    raise XiaozhiError(XiaozhiErrorCode.UNSUPPORTED_VERSION, f"binary protocol version {version}")


def _message_json(message: DeviceMessage | ServerMessage) -> dict[str, Any]:
    """Field order as the firmware's ``Protocol::Send*`` strings and the reference server write them."""
    def with_session(body: dict[str, Any], sid: str) -> dict[str, Any]:
        return {"session_id": sid, **body} if sid else body

    if isinstance(message, Hello):
        return {"type": "hello", "version": message.version, "features": dict(message.features),
                "transport": message.transport, "audio_params": message.audio_params.to_json()}
    if isinstance(message, ServerHello):
        return {"type": "hello", "transport": message.transport, "session_id": message.session_id,
                "audio_params": message.audio_params.to_json()}
    if isinstance(message, Listen):
        body: dict[str, Any] = {"type": "listen", "state": message.state}
        if message.mode is not None:
            body["mode"] = message.mode
        if message.text is not None:
            body["text"] = message.text
        return with_session(body, message.session_id)
    if isinstance(message, Abort):
        body = {"type": "abort"}
        if message.reason is not None:
            body["reason"] = message.reason
        return with_session(body, message.session_id)
    if isinstance(message, Mcp):
        return with_session({"type": "mcp", "payload": dict(message.payload)}, message.session_id)
    if isinstance(message, Stt):
        return with_session({"type": "stt", "text": message.text}, message.session_id)
    if isinstance(message, Llm):
        return with_session({"type": "llm", "text": message.text, "emotion": message.emotion}, message.session_id)
    if isinstance(message, Tts):
        body = {"type": "tts", "state": message.state}
        if message.text is not None:
            body["text"] = message.text
        return with_session(body, message.session_id)
    if isinstance(message, System):
        return with_session({"type": "system", "command": message.command}, message.session_id)
    if isinstance(message, Alert):
        return with_session({"type": "alert", "status": message.status, "message": message.message,
                             "emotion": message.emotion}, message.session_id)
    raise TypeError(f"not a xiaozhi message: {message!r}")


def encode_text(message: DeviceMessage | ServerMessage) -> str:
    """Compact JSON (as ``cJSON_PrintUnformatted``), UTF-8 text unescaped."""
    return json.dumps(_message_json(message), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# -- MCP (JSON-RPC 2.0 inside type "mcp"): the server is the client, the device the tool server ---------


@dataclass(frozen=True, slots=True)
class McpCall:
    """A request we send; ``id`` matches the device's answer."""

    id: int
    method: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": self.method, "params": dict(self.params), "id": self.id}


@dataclass(frozen=True, slots=True)
class McpResult:
    """The device's answer: ``result`` on success, else ``error_message`` (and ``error_code`` if any:
    the firmware's ``McpServer::ReplyError`` sends only a message)."""

    id: int | str | None
    result: Mapping[str, Any] | None = None
    error_code: int | None = None
    error_message: str = ""
    failed: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed


def mcp_call(call_id: int, method: str, params: Mapping[str, Any] | None = None, *, session_id: str = "") -> Mcp:
    return Mcp(payload=McpCall(call_id, method, params or {}).payload(), session_id=session_id)


def mcp_notification(method: str, params: Mapping[str, Any] | None = None, *, session_id: str = "") -> Mcp:
    payload: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params:
        payload["params"] = dict(params)
    return Mcp(payload=payload, session_id=session_id)


def parse_mcp_result(payload: Mapping[str, Any]) -> McpResult | None:
    """The device's JSON-RPC response, or None for a request/notification from the device.

    Raises :class:`XiaozhiError` for a payload that is neither.
    """
    if payload.get("jsonrpc") != "2.0":
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "MCP payload without jsonrpc \"2.0\"")
    if "method" in payload:
        if not isinstance(payload["method"], str):
            raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "MCP 'method' must be a string")
        return None
    call_id = payload.get("id")
    if isinstance(call_id, bool) or not isinstance(call_id, (int, str, type(None))):
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "MCP 'id' must be a number or a string")
    if "error" in payload:
        error = payload["error"]
        if not isinstance(error, dict):
            raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "MCP 'error' must be an object")
        code = error.get("code")
        if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
            raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "MCP error 'code' must be an integer")
        message = error.get("message", "")
        return McpResult(call_id, error_code=code, error_message=message if isinstance(message, str) else "",
                         failed=True)
    result = payload.get("result")
    if not isinstance(result, dict):
        raise XiaozhiError(XiaozhiErrorCode.BAD_FIELD, "MCP response without an object 'result' or 'error'")
    return McpResult(call_id, result=result)
