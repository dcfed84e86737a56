"""Wyoming's framing as a sans-IO codec: bytes in, :class:`wyoming.event.Event` out, and back.

A Wyoming event on the wire is one JSON header line (``type``, optional ``data``, ``data_length``,
``payload_length``, ``version``), then ``data_length`` bytes of extra JSON merged into ``data``, then
``payload_length`` bytes of payload (audio). The ``wyoming`` package owns the event classes
(:mod:`wyoming.asr`, :mod:`wyoming.tts`, :mod:`wyoming.audio`, ...) and we use them unchanged; its own
reader and writer are bound to asyncio streams (``async_read_event`` on an ``asyncio.StreamReader``) and
its blocking ones to file objects, and neither bounds the sizes it reads. So the byte level is done here:
a decoder fed whatever the socket returned, with limits on every length a peer declares, and an encoder
that writes exactly what the package's ``async_write_event`` writes.
"""

from __future__ import annotations

import json
from typing import Any

from wyoming.event import Event
from wyoming.version import __version__ as WYOMING_VERSION

__all__ = ["WyomingDecoder", "WyomingProtocolError", "encode_event", "WYOMING_VERSION"]

MAX_HEADER_BYTES = 64 * 1024
MAX_DATA_BYTES = 256 * 1024


class WyomingProtocolError(ValueError):
    """The peer sent bytes that are no Wyoming event; ``code`` goes into the ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode_event(event: Event) -> bytes:
    """The bytes of one event, as ``wyoming.event.async_write_event`` lays them out."""
    header: dict[str, Any] = {"type": event.type, "version": WYOMING_VERSION}
    data = json.dumps(event.data, ensure_ascii=False).encode("utf-8") if event.data else b""
    if data:
        header["data_length"] = len(data)
    if event.payload:
        header["payload_length"] = len(event.payload)
    line = json.dumps(header, ensure_ascii=False).encode("utf-8") + b"\n"
    return line + data + (event.payload or b"")


class WyomingDecoder:
    """Incremental decoder: :meth:`feed` the received bytes, get the events now complete.

    After a :class:`WyomingProtocolError` the stream cannot be re-synchronised (lengths are only in
    headers), so the caller answers with an ``error`` event and closes the connection.
    """

    def __init__(self, *, max_payload_bytes: int, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_data_bytes: int = MAX_DATA_BYTES) -> None:
        self.max_payload_bytes = max_payload_bytes
        self.max_header_bytes = max_header_bytes
        self.max_data_bytes = max_data_bytes
        self._buffer = bytearray()
        self._pending: tuple[str, dict[str, Any], int, int] | None = None  # type, data, data_len, payload_len

    @property
    def buffered(self) -> int:
        """Bytes received that belong to no complete event yet (a peer closing here truncated one)."""
        return len(self._buffer) + (1 if self._pending is not None else 0)

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events: list[Event] = []
        while (event := self._next()) is not None:
            events.append(event)
        return events

    def _next(self) -> Event | None:
        if self._pending is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_header_bytes:
                    raise WyomingProtocolError("oversized", f"header line longer than {self.max_header_bytes} bytes")
                return None
            if end > self.max_header_bytes:
                raise WyomingProtocolError("oversized", f"header line longer than {self.max_header_bytes} bytes")
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            self._pending = self._parse_header(line)
        event_type, data, data_length, payload_length = self._pending
        if len(self._buffer) < data_length + payload_length:
            return None
        if data_length:
            try:
                extra = json.loads(bytes(self._buffer[:data_length]))
            except (ValueError, RecursionError):  # bad UTF-8 is a ValueError too; [[[[… nests too deep
                raise WyomingProtocolError("bad_data", "event data is not JSON") from None
            if not isinstance(extra, dict):
                raise WyomingProtocolError("bad_data", "event data is not a JSON object")
            data.update(extra)
        payload = bytes(self._buffer[data_length:data_length + payload_length]) if payload_length else None
        del self._buffer[:data_length + payload_length]
        self._pending = None
        return Event(type=event_type, data=data, payload=payload)

    def _parse_header(self, line: bytes) -> tuple[str, dict[str, Any], int, int]:
        try:
            header = json.loads(line)
        except (ValueError, RecursionError):  # bad UTF-8 is a ValueError too; [[[[… nests too deep
            raise WyomingProtocolError("bad_header", "event header is not a JSON line") from None
        if not isinstance(header, dict) or not isinstance(header.get("type"), str) or not header["type"]:
            raise WyomingProtocolError("bad_header", "event header has no type")
        data = header.get("data") or {}
        if not isinstance(data, dict):
            raise WyomingProtocolError("bad_header", "event data is not a JSON object")
        data_length = self._length(header, "data_length", self.max_data_bytes)
        payload_length = self._length(header, "payload_length", self.max_payload_bytes)
        return header["type"], data, data_length, payload_length

    @staticmethod
    def _length(header: dict[str, Any], key: str, limit: int) -> int:
        value = header.get(key)
        if value is None:
            return 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise WyomingProtocolError("bad_header", f"{key} must be a non-negative integer")
        if value > limit:
            raise WyomingProtocolError("oversized", f"{key} {value} is over the limit of {limit} bytes")
        return value
