"""Which protocol a connection on the speaker port speaks: from its handshake, else its first message.

Three protocols share the port. A xiaozhi board says who it is in the WebSocket handshake itself
(its path ``/xiaozhi/…`` and its ``Protocol-Version``/``Device-Id``/``Client-Id`` headers), so it is
known before any message. The other two are told apart by the first message (docs/protocol.md):
open-xiaoai speakers say nothing or JSON; native devices send a binary HELLO frame.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["XIAOZHI_HEADERS", "XIAOZHI_PATH_PREFIX", "detect_from_handshake", "detect_protocol", "header"]

XIAOZHI_PATH_PREFIX = "/xiaozhi/"
#: Headers ``WebsocketProtocol::OpenAudioChannel`` sets on every connection (lower case).
XIAOZHI_HEADERS = (b"protocol-version", b"device-id", b"client-id")


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case) as text, or None."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def detect_from_handshake(path: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """``xiaozhi`` when the handshake names it; None when only the first message can tell."""
    if urlsplit(path).path.startswith(XIAOZHI_PATH_PREFIX):
        return "xiaozhi"
    if any(key.lower() in XIAOZHI_HEADERS for key, _ in headers):
        return "xiaozhi"
    return None


def detect_protocol(first_message: bytes | str | None) -> str:
    """``native`` or ``xiaoai`` from the first message a client sent within the detection window."""
    if first_message is None:
        return "xiaoai"
    if isinstance(first_message, str):
        return "xiaoai"
    if first_message[:1] == b"{":
        return "xiaoai"  # an open-xiaoai Stream frame is JSON in a binary message
    return "native"  # a garbage first frame is answered by the native decoder's error frame
