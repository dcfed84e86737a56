"""The open-xiaoai speaker protocol: a byte-exact, sans-IO codec of the Rust client's messages.

The speaker runs the open-xiaoai Rust client, which connects to us and speaks serde JSON: text
messages carry an externally tagged ``AppMessage`` (``{"Request":{…}}``, ``{"Response":{…}}``,
``{"Event":{…}}``), binary messages carry a bare ``Stream`` whose audio is a JSON array of byte
values. Everything here reproduces what serde_json writes and accepts — field order, omitted
``None`` fields, nested maps with sorted keys (serde_json's ``Value`` map is a ``BTreeMap`` in the
client's build) — so that a byte-for-byte comparison with the real client is meaningful. The facts
and the source lines they come from are in ``docs/xiaoai.md``.

No sockets and no trio: a driver feeds text/bytes in and gets typed messages out, and asks for the
text/bytes to send. Bad input raises :class:`XiaoaiError` and nothing else.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import orjson

from voicegrow.protocol import strictjson
from voicegrow.protocol.errors import CodecError

__all__ = [
    "ABORT_XIAOAI_COMMAND",
    "CANCEL_WAKE_COMMAND",
    "CLIENT_DEFAULT_AUDIO_CONFIG",
    "CLIENT_VERSION",
    "DEFAULT_PORT",
    "DEVICE_INFO_COMMAND",
    "MAX_MESSAGE_BYTES",
    "PLAYBACK_STATUS_COMMAND",
    "PLAY_TAG",
    "RECORD_TAG",
    "REQUEST_TIMEOUT_S",
    "SILENCE_BUILTIN_COMMANDS",
    "VOLUME_COMMANDS",
    "AudioConfig",
    "Event",
    "InstructionLine",
    "InstructionNewFile",
    "KwsKeyword",
    "KwsStarted",
    "Message",
    "PlayingState",
    "RecognizeResult",
    "Request",
    "RequestTracker",
    "Response",
    "Stream",
    "XiaoaiError",
    "XiaoaiErrorCode",
    "decode_binary",
    "decode_text",
    "encode_stream",
    "encode_text",
    "get_version",
    "new_id",
    "parse_device_info",
    "parse_event",
    "parse_instruction",
    "parse_kws",
    "parse_playing",
    "run_shell",
    "volume_command",
    "start_play",
    "start_recording",
    "stop_play",
    "stop_recording",
]

#: The port the client's install scripts and every reference server use (``ws://HOST:4399``).
DEFAULT_PORT = 4399
#: ``RPC::call_remote``'s default timeout; the reference servers never pass another one.
REQUEST_TIMEOUT_S = 10.0
#: ``VERSION`` (the crate version) that the client answers ``get_version`` with.
CLIENT_VERSION = "1.0.0"
#: Stream tags: microphone audio goes up as ``record``; the client plays only ``play`` frames.
RECORD_TAG = "record"
PLAY_TAG = "play"
#: Largest message this codec parses. A 90 ms record frame is ~11 KB and the client caps nothing
#: below tungstenite's 64 MiB; 1 MiB leaves room for long play frames and big shell outputs.
MAX_MESSAGE_BYTES = 1 << 20

#: Fixed shell scripts, verbatim from the reference servers (examples/xiaozhi, examples/migpt,
#: client-rust ``SpeakerManager``). The server may send only scripts from a fixed, configured set;
#: never a script built from anything a client or a user said.
ABORT_XIAOAI_COMMAND = "/etc/init.d/mico_aivs_lab restart >/dev/null 2>&1"
CANCEL_WAKE_COMMAND = (
    "ubus call pnshelper event_notify '{\"src\":3, \"event\":7}'\n"
    "sleep 0.1\n"
    "ubus call pnshelper event_notify '{\"src\":3, \"event\":8}'"
)
PLAYBACK_STATUS_COMMAND = "mphelper mute_stat"
DEVICE_INFO_COMMAND = "echo $(micocfg_model) $(micocfg_sn)"
#: What the reference xiaozhi server runs when it takes over from the built-in assistant
#: (``speaker.abort_xiaoai()``): restarting ``mico_aivs_lab`` stops its answer and its TTS.
#: ``CANCEL_WAKE_COMMAND`` is not in the default: it toggles pnshelper's mic events 7/8, which
#: ``SpeakerManager`` also names mic on/off, and may leave the wake-word engine muted.
SILENCE_BUILTIN_COMMANDS: tuple[str, ...] = (ABORT_XIAOAI_COMMAND,)
#: Setting the volume, per speaker model (``micocfg_model``): a fixed script with one ``%d`` and the
#: integer range it accepts. The level is checked to be an int in range before it is formatted in,
#: so nothing a user or a model says can reach the shell. (mediaplayer's ``player_set_volume``, as
#: the mi-gpt / open-xiaoai servers use it.)
_SET_VOLUME = "ubus call mediaplayer player_set_volume '{\"volume\":%d}'"
VOLUME_COMMANDS: dict[str, tuple[str, int, int]] = {
    "LX06": (_SET_VOLUME, 0, 100),
    "OH2P": (_SET_VOLUME, 0, 100),
    "default": (_SET_VOLUME, 0, 100),
}


class XiaoaiErrorCode(enum.Enum):
    """Why a message was refused; the value is a stable string for logs and metric labels."""

    TOO_LARGE = "too_large"
    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    TOO_DEEP = "too_deep"
    BAD_SHAPE = "bad_shape"
    BAD_FIELD = "bad_field"
    BYTE_OUT_OF_RANGE = "byte_out_of_range"
    UNKNOWN_MESSAGE = "unknown_message"
    BAD_EVENT = "bad_event"
    UNENCODABLE = "unencodable"
    DUPLICATE_ID = "duplicate_id"

    @property
    def ws_close_code(self) -> int:
        """The WebSocket close code to use if a server chooses to hang up over this error."""
        if self is XiaoaiErrorCode.TOO_LARGE:
            return 1009
        if self in (XiaoaiErrorCode.UNENCODABLE, XiaoaiErrorCode.DUPLICATE_ID):
            return 1011
        return 1007


class XiaoaiError(CodecError):
    """Input the open-xiaoai codec refuses (or a message it cannot produce).

    The real client silently drops what it cannot parse, and a server usually logs and does the same.
    """

    code: XiaoaiErrorCode


# -- messages ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A command for the other side; ``payload`` is any JSON value (``None`` is sent as ``null``)."""

    id: str
    command: str
    payload: Any = None


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to a :class:`Request` with the same ``id``.

    The client answers success as ``code=0, msg="success"``, data-only answers (``get_version``,
    ``run_shell``) with ``code`` and ``msg`` absent, and every failure as ``code=-1`` with the
    error's text in ``msg`` (``"command not found"`` for unknown commands).
    """

    id: str
    code: int | None = None
    msg: str | None = None
    data: Any = None

    @property
    def ok(self) -> bool:
        return self.code is None or self.code == 0


@dataclass(frozen=True, slots=True)
class Event:
    """A notification from the speaker (``kws``, ``instruction``, ``playing``); ids are fresh uuid4s."""

    id: str
    event: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class Stream:
    """Audio in a WebSocket binary message: ``record`` (mic, up) or ``play`` (speaker, down)."""

    id: str
    tag: str
    bytes: bytes
    data: Any = None


Message = Union[Request, Response, Event]


def new_id() -> str:
    """A request/event/stream id as the client makes them: a lowercase hyphenated uuid4."""
    return str(uuid.uuid4())


# -- encoding ---------------------------------------------------------------------------------------

_json_value = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
).encode
_json_string = json.JSONEncoder(ensure_ascii=False).encode


def _value(value: Any) -> str:
    """A nested JSON value as serde_json writes a ``Value``: compact, raw UTF-8, map keys sorted."""
    try:
        return _json_value(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, f"not a JSON value: {exc}") from None


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, f"{field} must be a string, got {type(value).__name__}")
    return _json_string(value)


def encode_text(message: Message) -> str:
    """The text of a WebSocket text message carrying ``message``, exactly as serde_json writes it.

    Struct fields keep their declaration order (``id`` first); ``Request.payload`` is always
    present (``null`` when ``None``), the optional fields of Response and Event are left out when
    ``None`` (``skip_serializing_if = "Option::is_none"``).
    """
    if isinstance(message, Request):
        text = (
            f'{{"Request":{{"id":{_string(message.id, "id")},'
            f'"command":{_string(message.command, "command")},"payload":{_value(message.payload)}}}}}'
        )
    elif isinstance(message, Response):
        parts = [f'"id":{_string(message.id, "id")}']
        if message.code is not None:
            if not _is_i32(message.code):
                raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, f"code must be an i32, got {message.code!r}")
            parts.append(f'"code":{int(message.code)}')
        if message.msg is not None:
            parts.append(f'"msg":{_string(message.msg, "msg")}')
        if message.data is not None:
            parts.append(f'"data":{_value(message.data)}')
        text = '{"Response":{' + ",".join(parts) + "}}"
    elif isinstance(message, Event):
        data = "" if message.data is None else f',"data":{_value(message.data)}'
        text = f'{{"Event":{{"id":{_string(message.id, "id")},"event":{_string(message.event, "event")}{data}}}}}'
    elif isinstance(message, Stream):
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, "a Stream travels in a binary message: use encode_stream")
    else:
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, f"not an open-xiaoai message: {type(message).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, "text contains lone surrogates") from None
    return text


# Each byte value's decimal digits plus a comma, left-aligned in 4 bytes and NUL padded: one gather
# builds the whole array text, and dropping the NULs leaves "12,0,255,"; ~10x faster than str.join.
_BYTE_TEXT = np.zeros((256, 4), np.uint8)
for _v in range(256):
    _digits = f"{_v},".encode()
    _BYTE_TEXT[_v, : len(_digits)] = np.frombuffer(_digits, np.uint8)
_BYTE_TEXT_WORDS = _BYTE_TEXT.view(np.uint32).ravel()
del _v, _digits


def _byte_array_text(data: bytes | bytearray | memoryview) -> bytes:
    """``Vec<u8>`` as serde_json writes it, without the brackets: ``"0,12,255"``."""
    if not len(data):
        return b""
    text: np.ndarray = _BYTE_TEXT_WORDS[np.frombuffer(data, np.uint8)].view(np.uint8)
    return bytes(text[text != 0][:-1].data)


def encode_stream(stream: Stream) -> bytes:
    """The payload of a WebSocket *binary* message: the Stream's JSON, audio as an array of ints.

    This is ``serde_json::to_vec(&Stream)``: ``{"id":…,"tag":…,"bytes":[…]}`` plus ``"data"`` only
    when it is not ``None``. The client drops a binary message it cannot parse, and plays only
    ``tag == "play"``.
    """
    if not isinstance(stream, Stream):
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, f"not a Stream: {type(stream).__name__}")
    if not isinstance(stream.bytes, (bytes, bytearray, memoryview)):
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, "Stream.bytes must be bytes")
    head = f'{{"id":{_string(stream.id, "id")},"tag":{_string(stream.tag, "tag")},"bytes":['
    tail = "]}" if stream.data is None else f'],"data":{_value(stream.data)}}}'
    try:
        return b"".join((head.encode("utf-8"), _byte_array_text(stream.bytes), tail.encode("utf-8")))
    except UnicodeEncodeError:
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, "text contains lone surrogates") from None


# -- decoding ---------------------------------------------------------------------------------------


def _loads(raw: str | bytes | bytearray | memoryview, max_bytes: int) -> Any:
    if isinstance(raw, str):
        if len(raw) > max_bytes:
            raise XiaoaiError(XiaoaiErrorCode.TOO_LARGE, f"message of {len(raw)} characters > {max_bytes}")
        text = raw
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        if len(raw) > max_bytes:
            raise XiaoaiError(XiaoaiErrorCode.TOO_LARGE, f"message of {len(raw)} bytes > {max_bytes}")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise XiaoaiError(XiaoaiErrorCode.INVALID_UTF8, str(exc)) from None
    else:
        raise XiaoaiError(XiaoaiErrorCode.BAD_SHAPE, f"expected str or bytes, got {type(raw).__name__}")
    try:
        value = strictjson.loads(text)
    except RecursionError:
        raise XiaoaiError(XiaoaiErrorCode.TOO_DEEP, "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, constants, 1e400, ints longer than Python's digit limit
        raise XiaoaiError(XiaoaiErrorCode.INVALID_JSON, str(exc)) from None
    try:  # serde_json refuses a lone surrogate anywhere, and a message holding one could not be encoded again
        strictjson.refuse_lone_surrogates(text, value)
    except strictjson.LoneSurrogate as exc:
        raise XiaoaiError(XiaoaiErrorCode.BAD_FIELD, str(exc)) from None
    return value


def _string_field(body: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise XiaoaiError(XiaoaiErrorCode.BAD_FIELD, f"missing field `{key}`")
        return None
    if not isinstance(value, str):
        raise XiaoaiError(XiaoaiErrorCode.BAD_FIELD, f"`{key}` must be a string")
    return value  # lone surrogates were refused by _loads, in every string of the message


def _is_i32(value: Any) -> bool:
    return type(value) is int and -(2**31) <= value < 2**31


def decode_text(text: str | bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """The Request, Response or Event in a WebSocket text message.

    Accepts what the client's serde derive accepts: exactly one variant key, unknown fields
    ignored, a missing or ``null`` optional field read as ``None``. A ``{"Stream":…}`` text
    message (which the client ignores) is refused as ``UNKNOWN_MESSAGE``.
    """
    obj = _loads(text, max_bytes)
    if not isinstance(obj, dict) or len(obj) != 1:
        raise XiaoaiError(XiaoaiErrorCode.BAD_SHAPE, "expected an object with one variant key")
    ((variant, body),) = obj.items()
    if variant not in ("Request", "Response", "Event"):
        raise XiaoaiError(XiaoaiErrorCode.UNKNOWN_MESSAGE, f"unknown variant {variant[:40]!r}")
    if not isinstance(body, dict):
        raise XiaoaiError(XiaoaiErrorCode.BAD_SHAPE, f"{variant} must be an object")
    message_id = _string_field(body, "id", required=True)
    assert message_id is not None
    if variant == "Request":
        command = _string_field(body, "command", required=True)
        assert command is not None
        return Request(message_id, command, body.get("payload"))
    if variant == "Response":
        code = body.get("code")
        if code is not None and not _is_i32(code):
            raise XiaoaiError(XiaoaiErrorCode.BAD_FIELD, "`code` must be an i32")
        return Response(message_id, code, _string_field(body, "msg", required=False), body.get("data"))
    event = _string_field(body, "event", required=True)
    assert event is not None
    return Event(message_id, event, body.get("data"))


_STREAM_ID_PREFIX = b'{"id":"'
_ARRAY_TEXT_CHARS = b"0123456789,"


def _fast_stream(data: bytes) -> Stream | None:
    """The client's own layout, ``{"id":"…","tag":"…","bytes":[…]}``, parsed without json.loads.

    Returns None for anything else (other key order, whitespace, escapes, ``data``), which then
    takes the general path; that path is also the one that raises, so both agree on every input.
    """
    if not data.startswith(_STREAM_ID_PREFIX) or not data.endswith(b"]}"):
        return None
    id_end = data.find(b'"', 7)
    tag_start = id_end + 9  # past '","tag":"'
    if id_end < 0 or data[id_end:tag_start] != b'","tag":"':
        return None
    tag_end = data.find(b'"', tag_start)
    array_start = tag_end + 11  # past '","bytes":['
    if tag_end < 0 or data[tag_end:array_start] != b'","bytes":[':
        return None
    raw_id, raw_tag = data[7:id_end], data[tag_start:tag_end]
    if b"\\" in raw_id or b"\\" in raw_tag or not (raw_id + raw_tag).isascii():
        return None
    if min(raw_id + raw_tag + b"\x7f") < 0x20:  # control characters: invalid in JSON strings
        return None
    body = data[array_start:-2]
    if not body:
        return Stream(raw_id.decode("ascii"), raw_tag.decode("ascii"), b"")
    if body.translate(None, _ARRAY_TEXT_CHARS):
        return None
    # Digits and commas only: orjson (strict JSON: no empty element, no leading zero) makes the ints,
    # bytes() refuses any beyond 255. About 3x quicker than numpy's text parser and its checks, and
    # this runs for every 90 ms frame of every speaker.
    try:
        pcm = bytes(orjson.loads(data[array_start - 1:-1]))
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    return Stream(raw_id.decode("ascii"), raw_tag.decode("ascii"), pcm)


def decode_binary(data: bytes | bytearray | memoryview | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Stream:
    """The Stream in a WebSocket binary message (``serde_json::from_slice::<Stream>``).

    ``id``, ``tag`` and ``bytes`` are required, ``bytes`` must be integers 0..=255; ``data`` is
    optional and unknown fields are ignored. The client's own frames take a fast path (~4x faster
    than ``json.loads``; figures in docs/xiaoai.md).
    """
    if isinstance(data, str):
        try:
            data = data.encode("utf-8")
        except UnicodeEncodeError:
            raise XiaoaiError(XiaoaiErrorCode.INVALID_UTF8, "text contains lone surrogates") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise XiaoaiError(XiaoaiErrorCode.BAD_SHAPE, f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise XiaoaiError(XiaoaiErrorCode.TOO_LARGE, f"message of {len(data)} bytes > {max_bytes}")
    raw = bytes(data)
    fast = _fast_stream(raw)
    if fast is not None:
        return fast
    obj = _loads(raw, max_bytes)
    if not isinstance(obj, dict):
        raise XiaoaiError(XiaoaiErrorCode.BAD_SHAPE, "a Stream must be a JSON object")
    stream_id = _string_field(obj, "id", required=True)
    tag = _string_field(obj, "tag", required=True)
    values = obj.get("bytes")
    if not isinstance(values, list):
        raise XiaoaiError(XiaoaiErrorCode.BAD_FIELD, "`bytes` must be an array of integers")
    if any(type(v) is not int for v in values):
        raise XiaoaiError(XiaoaiErrorCode.BAD_FIELD, "`bytes` must hold only integers")
    try:
        pcm = bytes(values)
    except ValueError:
        raise XiaoaiError(XiaoaiErrorCode.BYTE_OUT_OF_RANGE, "`bytes` values must be in 0..=255") from None
    assert stream_id is not None and tag is not None
    return Stream(stream_id, tag, pcm, obj.get("data"))


# -- the server's requests ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AudioConfig:
    """The payload of ``start_recording`` / ``start_play`` (client ``services/audio/config.rs``).

    ``pcm`` is the ALSA device ``arecord -D`` opens (the player ignores it); the reference servers
    send ``"noop"``. ``period_size``/``buffer_size`` are in frames; the recorder sends one ``record``
    Stream per ``buffer_size`` frames. For 16-bit requests the client captures S32 from the A113
    PDM mic and converts, so the frames that arrive are still s16le.
    """

    pcm: str = "noop"
    channels: int = 1
    bits_per_sample: int = 16
    sample_rate: int = 16000
    period_size: int = 360
    buffer_size: int = 1440

    def to_payload(self) -> dict[str, Any]:
        return {
            "pcm": self.pcm,
            "channels": self.channels,
            "bits_per_sample": self.bits_per_sample,
            "sample_rate": self.sample_rate,
            "period_size": self.period_size,
            "buffer_size": self.buffer_size,
        }

    @classmethod
    def from_payload(cls, payload: Any) -> AudioConfig | None:
        """The config the client would parse from ``payload``, or None where it falls back to defaults.

        Mirrors ``serde_json::from_value::<AudioConfig>(payload).ok()``: every field required,
        u16/u32 ranges, no floats or bools; unknown fields ignored.
        """
        if not isinstance(payload, dict) or not isinstance(payload.get("pcm"), str):
            return None
        limits = {"channels": 0xFFFF, "bits_per_sample": 0xFFFF, "sample_rate": 0xFFFFFFFF,
                  "period_size": 0xFFFFFFFF, "buffer_size": 0xFFFFFFFF}
        for key, high in limits.items():
            value = payload.get(key)
            if type(value) is not int or not 0 <= value <= high:
                return None
        return cls(payload["pcm"], payload["channels"], payload["bits_per_sample"], payload["sample_rate"],
                   payload["period_size"], payload["buffer_size"])

    @property
    def frame_bytes(self) -> int:
        """Bytes per ``record`` Stream the client sends for this config (what it reads per buffer)."""
        return self.buffer_size * max(self.channels, 1) * (max(self.bits_per_sample, 8) // 8)

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * max(self.channels, 1) * (max(self.bits_per_sample, 8) // 8)


#: The client's fallback when a payload is missing or does not parse (``AUDIO_CONFIG`` in config.rs).
CLIENT_DEFAULT_AUDIO_CONFIG = AudioConfig(period_size=160, buffer_size=480)


def start_recording(*, pcm: str = "noop", channels: int = 1, bits_per_sample: int = 16,
                    sample_rate: int = 16000, period_size: int = 360, buffer_size: int = 1440) -> Request:
    """Start the mic; one ``record`` frame per ``buffer_size`` frames (1440 @ 16 kHz = 90 ms).

    A speaker already recording answers success and keeps its old config: stop first to change it.
    """
    config = AudioConfig(pcm, channels, bits_per_sample, sample_rate, period_size, buffer_size)
    return Request(new_id(), "start_recording", config.to_payload())


def stop_recording() -> Request:
    return Request(new_id(), "stop_recording", None)


def start_play(*, pcm: str = "noop", channels: int = 1, bits_per_sample: int = 16,
               sample_rate: int = 24000, period_size: int = 360, buffer_size: int = 1440) -> Request:
    """Start ``aplay``; ``play`` frames sent before this are dropped. Restarts a running player."""
    config = AudioConfig(pcm, channels, bits_per_sample, sample_rate, period_size, buffer_size)
    return Request(new_id(), "start_play", config.to_payload())


def stop_play() -> Request:
    return Request(new_id(), "stop_play", None)


def get_version() -> Request:
    return Request(new_id(), "get_version", None)


def run_shell(script: str) -> Request:
    """Run ``/bin/sh -c script`` on the speaker; the answer's data is ``{exit_code, stderr, stdout}``.

    Callers must pass one of their fixed, configured scripts (see ``SILENCE_BUILTIN_COMMANDS``).
    """
    if not isinstance(script, str):
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, "the script must be a string")
    return Request(new_id(), "run_shell", script)


def volume_command(model: str | None, level: int) -> str:
    """The model's fixed volume script with ``level`` in it; :class:`XiaoaiError` unless ``level`` is
    an integer (not a bool, not text) within the model's range."""
    template, low, high = VOLUME_COMMANDS.get(model or "", VOLUME_COMMANDS["default"])
    if type(level) is not int or not low <= level <= high:
        raise XiaoaiError(XiaoaiErrorCode.UNENCODABLE, f"volume {level!r:.40} is not an integer from {low} to {high}")
    return template % level


def parse_device_info(stdout: str) -> dict[str, str | None]:
    """``{"model": …, "serial": …}`` from the output of :data:`DEVICE_INFO_COMMAND`.

    Missing parts are None rather than the reference servers' ``"unknown"``, so two speakers that
    failed to answer never share an identity.
    """
    words = stdout.split() if isinstance(stdout, str) else []
    return {"model": words[0] if words else None, "serial": words[1] if len(words) > 1 else None}


# -- matching responses to requests ---------------------------------------------------------------------


class RequestTracker:
    """Pending requests by id, each with a deadline; the caller supplies the clock (sans-IO).

    A response whose id is unknown (late, duplicated, or never ours) is ignored, as the client's
    ``RPC::on_response`` does.
    """

    def __init__(self, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._pending: dict[str, tuple[Request, float]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def register(self, request: Request, now: float, timeout: float | None = None) -> str:
        if request.id in self._pending:
            raise XiaoaiError(XiaoaiErrorCode.DUPLICATE_ID, f"request id {request.id!r} is already pending")
        self._pending[request.id] = (request, now + (self.timeout if timeout is None else timeout))
        return request.id

    def on_response(self, response: Response) -> tuple[Request, Response] | None:
        entry = self._pending.pop(response.id, None)
        return None if entry is None else (entry[0], response)

    def expired(self, now: float) -> list[Request]:
        """Requests whose deadline has passed, oldest deadline first; they are forgotten."""
        late = sorted((deadline, rid) for rid, (_, deadline) in self._pending.items() if deadline <= now)
        return [self._pending.pop(rid)[0] for _, rid in late]

    def next_deadline(self) -> float | None:
        """When :meth:`expired` will next return something, for a driver's sleep."""
        return min((deadline for _, deadline in self._pending.values()), default=None)

    def cancel_all(self) -> list[Request]:
        """Forget every pending request (the connection is gone) and return them."""
        requests = [request for request, _ in self._pending.values()]
        self._pending.clear()
        return requests


# -- events --------------------------------------------------------------------------------------------


class PlayingState(enum.Enum):
    """The built-in media player's state (``mphelper mute_stat``), sent on every change."""

    PLAYING = "Playing"
    PAUSED = "Paused"
    IDLE = "Idle"


@dataclass(frozen=True, slots=True)
class KwsStarted:
    """The custom wake-word engine (open-xiaoai-kws) has started (``"Started"``)."""


@dataclass(frozen=True, slots=True)
class KwsKeyword:
    """A custom wake word was heard (``{"Keyword": "…"}``)."""

    keyword: str


@dataclass(frozen=True, slots=True)
class RecognizeResult:
    """The built-in assistant's ASR (``SpeechRecognizer/RecognizeResult``), first result.

    An empty ``text`` with ``is_vad_begin`` false is how the reference xiaozhi server recognises
    that the user woke the built-in assistant ("小爱同学").
    """

    text: str
    is_final: bool
    is_vad_begin: bool
    is_stop: bool


@dataclass(frozen=True, slots=True)
class InstructionLine:
    """One line of the built-in assistant's ``instruction.log``; ``message`` is None if not JSON."""

    raw: str
    message: Any
    recognize: RecognizeResult | None

    @property
    def namespace(self) -> str | None:
        return _header_field(self.message, "namespace")

    @property
    def name(self) -> str | None:
        return _header_field(self.message, "name")


@dataclass(frozen=True, slots=True)
class InstructionNewFile:
    """``instruction.log`` was truncated or replaced (the assistant restarted)."""


def _header_field(message: Any, key: str) -> str | None:
    header = message.get("header") if isinstance(message, dict) else None
    value = header.get(key) if isinstance(header, dict) else None
    return value if isinstance(value, str) else None


def parse_kws(data: Any) -> KwsStarted | KwsKeyword:
    if data == "Started":
        return KwsStarted()
    if isinstance(data, dict) and len(data) == 1 and isinstance(data.get("Keyword"), str):
        return KwsKeyword(data["Keyword"])
    raise XiaoaiError(XiaoaiErrorCode.BAD_EVENT, "kws data must be \"Started\" or {\"Keyword\": str}")


def parse_playing(data: Any) -> PlayingState:
    try:
        return PlayingState(data)
    except (ValueError, TypeError):
        raise XiaoaiError(XiaoaiErrorCode.BAD_EVENT, "playing data must be Playing, Paused or Idle") from None


def _recognize_result(message: Any) -> RecognizeResult | None:
    if _header_field(message, "namespace") != "SpeechRecognizer" or _header_field(message, "name") != "RecognizeResult":
        return None
    payload = message.get("payload")
    if not isinstance(payload, dict):
        return None
    results = payload.get("results")
    first = results[0] if isinstance(results, list) and results and isinstance(results[0], dict) else {}
    text = first.get("text")
    return RecognizeResult(
        text=text if isinstance(text, str) else "",
        is_final=payload.get("is_final") is True,
        is_vad_begin=payload.get("is_vad_begin") is True,
        is_stop=first.get("is_stop") is True,
    )


def parse_instruction(data: Any, *, max_line_bytes: int = MAX_MESSAGE_BYTES) -> InstructionLine | InstructionNewFile:
    """An ``instruction`` event's data: ``"NewFile"`` or ``{"NewLine": "<log line>"}``.

    The log line is JSON-decoded again; a line that is not JSON is kept as ``raw`` with
    ``message=None`` (the log is the assistant's, not the protocol's, so it is no error).
    """
    if data == "NewFile":
        return InstructionNewFile()
    if not (isinstance(data, dict) and len(data) == 1 and isinstance(data.get("NewLine"), str)):
        raise XiaoaiError(XiaoaiErrorCode.BAD_EVENT, "instruction data must be \"NewFile\" or {\"NewLine\": str}")
    raw = data["NewLine"]
    try:
        message = _loads(raw, max_line_bytes)
    except XiaoaiError:
        message = None
    return InstructionLine(raw, message, _recognize_result(message))


def parse_event(event: Event) -> KwsStarted | KwsKeyword | InstructionLine | InstructionNewFile | PlayingState | None:
    """The typed meaning of a client event, or None for an event name this codec does not know."""
    if event.event == "kws":
        return parse_kws(event.data)
    if event.event == "instruction":
        return parse_instruction(event.data)
    if event.event == "playing":
        return parse_playing(event.data)
    return None
