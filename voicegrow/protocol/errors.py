"""Error codes of the native protocol, the one exception its codec raises, and the codecs' common base.

The codes travel in ERROR frames, so a device can act on them (re-negotiate the audio format, fetch a
new token, back off); each also maps to the WebSocket close code the server closes with afterwards, so
that a client which never parsed the ERROR frame still learns what class of failure it was.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["CodecError", "ErrorCode", "ProtocolError"]


class ErrorCode(enum.IntEnum):
    """Wire error codes (u16). 1–99: the peer broke the protocol; 100 and up: the server's condition."""

    BAD_MAGIC = 1
    UNSUPPORTED_VERSION = 2
    UNKNOWN_FRAME_TYPE = 3
    TRUNCATED = 4
    OVERSIZED = 5
    TRAILING_DATA = 6
    BAD_PAYLOAD = 7
    BAD_AUDIO = 8
    UNEXPECTED_FRAME = 9
    AUTH_REQUIRED = 10
    AUTH_FAILED = 11
    UNSUPPORTED_AUDIO_FORMAT = 12

    INTERNAL_ERROR = 100
    SERVER_BUSY = 101
    RATE_LIMITED = 102
    HANDSHAKE_TIMEOUT = 103
    AUTH_THROTTLED = 104

    @property
    def ws_close_code(self) -> int:
        """The WebSocket close code (RFC 6455 §7.4) that goes with this error."""
        return _WS_CLOSE_CODES[self]


_WS_CLOSE_CODES: dict[ErrorCode, int] = {
    ErrorCode.BAD_MAGIC: 1002,
    ErrorCode.UNSUPPORTED_VERSION: 1002,
    ErrorCode.UNKNOWN_FRAME_TYPE: 1002,
    ErrorCode.TRUNCATED: 1002,
    ErrorCode.TRAILING_DATA: 1002,
    ErrorCode.UNEXPECTED_FRAME: 1002,
    ErrorCode.BAD_PAYLOAD: 1007,
    ErrorCode.BAD_AUDIO: 1007,
    ErrorCode.OVERSIZED: 1009,
    ErrorCode.AUTH_REQUIRED: 4401,
    ErrorCode.AUTH_FAILED: 4403,
    ErrorCode.UNSUPPORTED_AUDIO_FORMAT: 1003,
    ErrorCode.INTERNAL_ERROR: 1011,
    ErrorCode.SERVER_BUSY: 1013,
    ErrorCode.RATE_LIMITED: 1008,
    ErrorCode.HANDSHAKE_TIMEOUT: 1008,
    ErrorCode.AUTH_THROTTLED: 4429,
}


class CodecError(Exception):
    """What each device codec raises for input it refuses: a ``code`` the peer can act on, and why.

    Each codec has one subclass and raises nothing else for any input, so a driver needs exactly one
    ``except``; ``code`` is that protocol's enum and knows its WebSocket close code.
    """

    code: Any

    def __init__(self, code: Any, reason: str) -> None:
        super().__init__(f"{self._code_text(code)}: {reason}")
        self.code = code
        self.reason = reason

    @staticmethod
    def _code_text(code: Any) -> str:
        return str(code.value)

    @property
    def ws_close_code(self) -> int:
        """The WebSocket close code for a server that hangs up over this error."""
        return int(self.code.ws_close_code)


class ProtocolError(CodecError):
    """A frame (or the order of frames) breaks the native protocol.

    A connection handler answers it with an ERROR frame carrying ``code`` and closes with
    ``ws_close_code``.
    """

    code: ErrorCode

    @staticmethod
    def _code_text(code: Any) -> str:
        return str(code.name)
