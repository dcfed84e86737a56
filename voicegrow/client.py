"""A native-protocol device in Python: what ``voicegrow talk``, end-to-end tests and ``bench/`` drive.

It behaves like firmware would: HELLO first, microphone audio streamed in real time (silence included,
since a real microphone never stops), PINGs answered, reply audio collected as it arrives. The codec
and the frame-order rules come from :mod:`voicegrow.protocol`; this module only adds the socket and
the clock, so a protocol bug shows up in the same place for the server and for this client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
import trio_websocket

from voicegrow import __version__
from voicegrow.device_auth import auth_proof
from voicegrow.protocol import (
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    Audio,
    AudioFormat,
    Close,
    Control,
    Error,
    ErrorCode,
    Frame,
    Hello,
    HelloAck,
    NativeConnection,
    Ping,
    Pong,
    ProtocolError,
    Role,
)
from voicegrow.protocol.native import wire_ms

__all__ = [
    "NativeClientError",
    "ConnectFailed",
    "HandshakeFailed",
    "ConnectionClosed",
    "NativeClient",
    "open_native_client",
    "TalkEvent",
    "TalkResult",
    "stream_wav_and_collect",
]

_STREAM_RATE = 16000  # stream_wav_and_collect sends 16 kHz mono s16le
_CLOSE_GRACE_S = 2.0


class NativeClientError(Exception):
    """Base of the client's own errors; ``code`` says which failure it was, for scripts and logs."""

    code = "client_error"


class ConnectFailed(NativeClientError):
    """No WebSocket connection: unreachable host, refused port, bad URL, HTTP-level rejection."""

    code = "connect_failed"


class HandshakeFailed(NativeClientError):
    """The server did not answer HELLO with HELLO_ACK.

    ``error_code`` is the code of the server's ERROR frame (for example ``AUTH_FAILED``) when it sent
    one, ``ws_close_code`` the WebSocket close code when the connection was closed instead.
    """

    code = "handshake_failed"

    def __init__(self, reason: str, *, error_code: int | None = None,
                 ws_close_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_code = error_code
        self.ws_close_code = ws_close_code


class ConnectionClosed(NativeClientError):
    """The session is over: the server sent CLOSE or the WebSocket closed. ``close_code`` says why."""

    code = "connection_closed"

    def __init__(self, close_code: int | None, reason: str = "") -> None:
        super().__init__(f"connection closed ({close_code}{': ' + reason if reason else ''})")
        self.close_code = close_code
        self.reason = reason


class NativeClient:
    """One native-protocol session on an open trio-websocket connection (see :func:`open_native_client`).

    Sending is safe from several tasks at once (trio-websocket serialises writes); receiving belongs to
    one task. PINGs from the server are answered automatically and still returned to the reader.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection, *,
                 max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._ws = ws
        #: The protocol state machine, the same one the server's driver runs (``Role.CLIENT`` here).
        self.conn = NativeConnection(Role.CLIENT, max_payload=max_payload, max_send_payload=max_payload)
        self.hello_ack: HelloAck | None = None
        self._audio_seq = 0
        self._control_seq = 0
        self._closed: ConnectionClosed | None = None

    @property
    def audio_in(self) -> AudioFormat:
        """The format the server expects from us (after the handshake)."""
        return self._ack().audio_in

    @property
    def audio_out(self) -> AudioFormat:
        """The format of the server's AUDIO frames (after the handshake)."""
        return self._ack().audio_out

    async def handshake(self, hello: Hello, *, timeout_s: float = 10.0, secret: str | None = None) -> HelloAck:
        """Send HELLO and wait for HELLO_ACK; any other answer raises :class:`HandshakeFailed`.

        When the server sends a nonce (``DEVICE_AUTH=hmac``), answer it with ``secret``.
        """
        try:
            await self.send(hello)
            with trio.fail_after(timeout_s):
                frame = await self.next_frame()
                if isinstance(frame, HelloAck) and frame.nonce:
                    if secret is None:
                        raise HandshakeFailed("the server asks for an HMAC proof; pass the device secret",
                                              error_code=ErrorCode.AUTH_REQUIRED)
                    proof = auth_proof(secret, frame.nonce, hello.device_id, frame.session_id)
                    self.hello_ack = frame
                    await self.send_control("auth", {"hmac": proof})
                    answer = await self.next_frame()
                    if isinstance(answer, Control) and answer.event == "auth_ok":
                        return frame
                    frame = answer
        except trio.TooSlowError:
            raise HandshakeFailed(f"no HELLO_ACK within {timeout_s:g} s",
                                  error_code=ErrorCode.HANDSHAKE_TIMEOUT) from None
        except ConnectionClosed as exc:
            raise HandshakeFailed(f"server closed the connection during the handshake: {exc}",
                                  ws_close_code=exc.close_code) from None
        except ProtocolError as exc:
            raise HandshakeFailed(f"server does not speak the native protocol: {exc}",
                                  error_code=exc.code) from None
        if isinstance(frame, HelloAck):
            self.hello_ack = frame
            return frame
        if isinstance(frame, Error):
            name = frame.code.name if isinstance(frame.code, ErrorCode) else str(frame.code)
            raise HandshakeFailed(f"server refused the session: {name}: {frame.reason}",
                                  error_code=frame.code)
        raise HandshakeFailed(f"server answered HELLO with {frame.frame_type.name}")

    async def send(self, frame: Frame) -> None:
        """Check the frame is allowed now, encode it and send it as one binary message."""
        if self._closed is not None:
            raise self._closed
        message = self.conn.send(frame)
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed_by_websocket(exc) from None

    async def send_audio(self, pcm: bytes, *, turn_id: int = 0, last: bool = False) -> None:
        """Send one AUDIO frame (microphone PCM in the agreed ``audio_in`` format)."""
        frame = Audio(pcm, turn_id, self._audio_seq & 0xFFFF_FFFF, self._now_ms(), last=last)
        await self.send(frame)
        self._audio_seq += 1

    async def send_control(self, event: str, data: dict[str, Any] | None = None, *,
                           turn_id: int = 0) -> None:
        frame = Control(event, data or {}, turn_id, seq=self._control_seq & 0xFFFF_FFFF,
                        timestamp_ms=self._now_ms())
        await self.send(frame)
        self._control_seq += 1

    async def next_frame(self) -> Frame:
        """The next frame from the server; raises :class:`ConnectionClosed` once the session is over.

        A CLOSE frame is returned once (so the caller sees its code and reason); the call after it
        raises. ProtocolError propagates: a server that breaks the protocol is a bug worth a trace.
        """
        if self._closed is not None:
            raise self._closed
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise self._closed_by_websocket(exc) from None
        self.conn.receive_data(message)
        frame = self.conn.next_event()
        assert frame is not None  # one WebSocket message is one frame
        if isinstance(frame, Ping):
            with contextlib.suppress(ConnectionClosed):
                await self.send(Pong(frame.nonce, timestamp_ms=self._now_ms()))
        elif isinstance(frame, Close):
            self._closed = ConnectionClosed(frame.code, frame.reason)
        return frame

    def __aiter__(self) -> AsyncIterator[Frame]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[Frame]:
        """Every frame until the session ends (the CLOSE frame included)."""
        while True:
            try:
                yield await self.next_frame()
            except ConnectionClosed:
                return

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send CLOSE (unless the session is already over) and close the WebSocket; never raises."""
        with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_GRACE_S):
            if self._closed is None and not self.conn.we_closed:
                with contextlib.suppress(NativeClientError):
                    await self.send(Close(code, reason, timestamp_ms=self._now_ms()))
            await self._ws.aclose(code, reason or None)
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason)

    def _ack(self) -> HelloAck:
        if self.hello_ack is None:
            raise RuntimeError("no HELLO_ACK yet: call handshake() first")
        return self.hello_ack

    def _closed_by_websocket(self, exc: trio_websocket.ConnectionClosed) -> ConnectionClosed:
        reason = exc.reason
        self._closed = ConnectionClosed(reason.code if reason else None, (reason.reason or "") if reason else "")
        return self._closed

    @staticmethod
    def _now_ms() -> int:
        return wire_ms(trio.current_time())


async def connect_websocket_from(nursery: trio.Nursery, url: str, local_address: str, *,
                                 ssl_context: ssl.SSLContext | None = None, subprotocols: tuple[str, ...] = (),
                                 extra_headers: list[tuple[bytes, bytes]] | None = None,
                                 max_message_size: int = 1 << 20) -> trio_websocket.WebSocketConnection:
    """A WebSocket client connection whose TCP source address is ``local_address``.

    trio-websocket's own connect functions choose the source address themselves; tests and benchmarks
    that play many devices from many addresses (127.0.0.0/8 is all loopback on Linux) need to choose it.
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    port = parts.port or (443 if secure else 80)
    stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port, local_address=local_address)
    if secure:
        stream = trio.SSLStream(stream, ssl_context or ssl.create_default_context(),
                                server_hostname=parts.hostname, https_compatible=True)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return await trio_websocket.wrap_client_stream(nursery, stream, host, resource, subprotocols=list(subprotocols),
                                                   extra_headers=extra_headers, max_message_size=max_message_size)


@contextlib.asynccontextmanager
async def open_websocket_from(url: str, local_address: str, *, connect_timeout: float = 10.0, **options: Any
                              ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """:func:`connect_websocket_from` with a nursery of its own, closed on exit, like trio-websocket's
    ``open_websocket_url``: a refused handshake raises its :class:`trio_websocket.HandshakeError` (which
    the library's reader task raises inside the nursery), not an exception group."""
    connected = False
    refusal: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await connect_websocket_from(nursery, url, local_address, **options)
            connected = True
            try:
                yield ws
            finally:
                await ws.aclose()
    except BaseExceptionGroup as group:
        refused = None if connected else group.subgroup(trio_websocket.HandshakeError)
        if refused is None:
            raise
        refusal = refused
        while isinstance(refusal, BaseExceptionGroup):
            refusal = refusal.exceptions[0]
    if refusal is not None:  # raised here, outside the handler, so the group is not its context
        raise refusal


@contextlib.asynccontextmanager
async def open_native_client(
    url: str,
    *,
    device_id: str = "voicegrow-talk",
    audio_in: AudioFormat = AudioFormat(16000),
    audio_out: AudioFormat = AudioFormat(24000),
    token: str | None = None,
    secret: str | None = None,
    capabilities: dict[str, Any] | None = None,
    client_name: str = f"voicegrow-talk/{__version__}",
    connect_timeout_s: float = 10.0,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    ssl_context: ssl.SSLContext | None = None,
    local_address: str | None = None,
    subprotocols: tuple[str, ...] = (),
) -> AsyncIterator[NativeClient]:
    """Connect, do the HELLO/HELLO_ACK handshake, and close cleanly on exit.

    A ``wss://`` URL verifies the server against the system's CAs, or against ``ssl_context`` when given
    (a private CA or a self-signed certificate: ``ssl.create_default_context(cafile=...)``).
    ``local_address`` binds the connection's source address (many simulated devices on one machine).
    ``subprotocols``: WebSocket subprotocols to offer (the HTTP port's ``/api/v1/talk`` wants
    ``voicegrow.native.v1``, and the admin token as ``voicegrow.bearer.<base64url>``).

    Raises :class:`ConnectFailed` when no WebSocket could be opened and :class:`HandshakeFailed`
    when the server refused the session.
    """
    hello = Hello(device_id, audio_in, audio_out, token=token, capabilities=capabilities or {},
                  client=client_name)
    async with contextlib.AsyncExitStack() as stack:
        try:
            if local_address is None:
                ws = await stack.enter_async_context(trio_websocket.open_websocket_url(
                    url, ssl_context=ssl_context, subprotocols=list(subprotocols),
                    connect_timeout=connect_timeout_s, disconnect_timeout=_CLOSE_GRACE_S,
                    max_message_size=HEADER_SIZE + max_payload))
            else:
                ws = await stack.enter_async_context(open_websocket_from(
                    url, local_address, connect_timeout=connect_timeout_s, ssl_context=ssl_context,
                    subprotocols=subprotocols, max_message_size=HEADER_SIZE + max_payload))
        except (OSError, ValueError, trio_websocket.HandshakeError, trio.TooSlowError) as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            raise ConnectFailed(f"cannot connect to {url}: {cause or type(exc).__name__}") from exc
        client = NativeClient(ws, max_payload=max_payload)
        try:
            await client.handshake(hello, timeout_s=connect_timeout_s, secret=secret)
            yield client
        finally:
            await client.close()


# ---------------------------------------------------------------------------------------------------
# One spoken turn, as a device would do it

@dataclasses.dataclass(frozen=True)
class TalkEvent:
    """A CONTROL event as the client saw it; ``at_s`` is seconds since streaming started."""

    at_s: float
    event: str
    data: dict[str, Any]
    turn_id: int


@dataclasses.dataclass
class TalkResult:
    """What one turn produced, with the server's timings and the client's own clock readings."""

    transcript: str = ""
    reply: str = ""
    timings_ms: dict[str, float | None] = dataclasses.field(default_factory=dict)
    reply_audio: bytes = b""
    reply_sample_rate: int = 24000
    #: seconds from sending the clip's last sample to receiving the first reply audio (negative when the
    #: reply began during the clip's own trailing silence)
    client_first_audio_s: float | None = None
    events: list[TalkEvent] = dataclasses.field(default_factory=list)
    lang: str = ""
    turn_id: int | None = None
    #: tts_stop's reason ("done", "aborted", "error"), None if it never came
    stop_reason: str | None = None
    #: turn_end's outcome ("completed", "interrupted", "failed", "empty"), None if it never came
    outcome: str | None = None
    #: seconds since streaming started at which the clip's last sample was sent
    clip_sent_s: float | None = None
    timed_out: bool = False
    #: why the turn ended badly: a server ERROR or an early close, None when it went well
    failure: str | None = None

    @property
    def reply_audio_s(self) -> float:
        return len(self.reply_audio) / (2 * self.reply_sample_rate)


class _ReplyCollector:
    """Folds the server's frames for one turn into a TalkResult and says when the turn is over.

    The turn is the first one whose ``asr_final`` has text (frames with turn id 0 always count, for
    servers that do not number turns). It is over when ``turn_timings`` and one of ``tts_stop`` or
    ``turn_end`` have arrived, or ``linger_s`` after the first of them, since the order is the server's
    choice and a turn with nothing to say has no ``tts_stop``.
    """

    def __init__(self, result: TalkResult, *, started_at: float, linger_s: float,
                 on_event: Callable[[TalkEvent], None] | None) -> None:
        self.result = result
        self._started_at = started_at
        self._linger_s = linger_s
        self._on_event = on_event
        self._seen_end = self._seen_timings = False
        self._adopted = False
        self._ignored_turns: set[int] = set()
        self.linger_until = math.inf
        self.clip_sent_at: float | None = None
        self.first_audio_at: float | None = None

    def clip_sent(self, now: float) -> None:
        """The clip's last sample went out; a reply already playing (the trailing silence of a clip
        outlasted the hangover) started that long before it, a negative ``client_first_audio_s``."""
        self.clip_sent_at = now
        if self.first_audio_at is not None:
            self.result.client_first_audio_s = self.first_audio_at - now

    @property
    def heard_only_noise(self) -> bool:
        return not self._adopted and bool(self._ignored_turns)

    @property
    def finished(self) -> bool:
        return self._seen_end and self._seen_timings

    def add(self, frame: Frame, now: float) -> None:
        if isinstance(frame, Audio):
            if self._ours(frame.turn_id) and frame.pcm:
                if self.first_audio_at is None:
                    self.first_audio_at = now
                    if self.clip_sent_at is not None:
                        self.result.client_first_audio_s = now - self.clip_sent_at
                self.result.reply_audio += frame.pcm
        elif isinstance(frame, Control):
            self._add_event(frame, now)
        elif isinstance(frame, Error):
            name = frame.code.name if isinstance(frame.code, ErrorCode) else str(frame.code)
            self.result.failure = f"server error {name}: {frame.reason}"

    def _ours(self, turn_id: int) -> bool:
        if turn_id == 0:
            return True
        if turn_id in self._ignored_turns:
            return False
        return not self._adopted or turn_id == self.result.turn_id

    def _add_event(self, frame: Control, now: float) -> None:
        event = TalkEvent(now - self._started_at, frame.event, frame.data, frame.turn_id)
        self.result.events.append(event)
        if self._on_event is not None:
            self._on_event(event)
        if frame.event == "asr_final" and not self._adopted:
            if frame.data["text"].strip():
                self._adopted = True
                self.result.turn_id = frame.turn_id
                self.result.transcript = frame.data["text"]
                self.result.lang = frame.data["lang"]
            elif frame.turn_id:
                self._ignored_turns.add(frame.turn_id)  # noise: the server heard nothing
        if not self._ours(frame.turn_id):
            return
        if frame.event == "llm_text":
            self.result.reply += frame.data["text"]
        elif frame.event == "tts_start":
            self.result.reply_sample_rate = frame.data["sample_rate"]
        elif frame.event == "tts_stop":
            self.result.stop_reason = frame.data["reason"]
            self._seen_end = True
        elif frame.event == "turn_end":
            self.result.outcome = frame.data["outcome"]
            self._seen_end = True
        elif frame.event == "turn_timings":
            self.result.timings_ms = dict(frame.data)
            self._seen_timings = True
        if self._seen_end or self._seen_timings:
            self.linger_until = min(self.linger_until, now + self._linger_s)


async def stream_wav_and_collect(
    client: NativeClient,
    pcm16k: bytes,
    *,
    frame_ms: int = 20,
    speed: float = 1.0,
    tail_silence_s: float = 15.0,
    timeout_s: float = 30.0,
    linger_s: float = 1.0,
    on_event: Callable[[TalkEvent], None] | None = None,
) -> TalkResult:
    """Speak one clip to the server like a device and collect the reply.

    ``pcm16k`` (16 kHz mono s16le) goes out in ``frame_ms`` frames paced against ``trio.current_time()``
    at ``speed`` times real time; then silence follows at the same pace, as from a live microphone,
    until the turn is over or ``tail_silence_s`` of silence has been sent. The wait ends at the latest
    ``timeout_s`` after the clip's last frame was due (``timed_out`` is then set).
    """
    if speed <= 0 or frame_ms <= 0:
        raise ValueError("speed and frame_ms must be positive")
    if len(pcm16k) % 2:
        raise ValueError("pcm16k must be s16 PCM (an even number of bytes)")
    if client.audio_in != AudioFormat(_STREAM_RATE):
        raise NativeClientError(f"server expects {client.audio_in}, this helper streams 16 kHz mono")
    frame_bytes = 2 * _STREAM_RATE * frame_ms // 1000
    frame_interval = frame_ms / 1000 / speed
    clip_frames = [pcm16k[i:i + frame_bytes] for i in range(0, len(pcm16k), frame_bytes)]
    tail_frames = math.ceil(tail_silence_s * 1000 / frame_ms)
    silence = bytes(frame_bytes)

    result = TalkResult(reply_sample_rate=client.audio_out.sample_rate)
    started_at = trio.current_time()
    collector = _ReplyCollector(result, started_at=started_at, linger_s=linger_s, on_event=on_event)

    async def send_microphone() -> None:
        with contextlib.suppress(ConnectionClosed):
            for index, chunk in enumerate([*clip_frames, *[silence] * tail_frames]):
                await trio.sleep_until(started_at + index * frame_interval)
                await client.send_audio(chunk)
                if index == len(clip_frames) - 1:
                    collector.clip_sent(trio.current_time())
                    result.clip_sent_s = (collector.clip_sent_at or started_at) - started_at
            if not clip_frames:
                collector.clip_sent(trio.current_time())

    async def receive_reply() -> None:
        with trio.move_on_at(started_at + len(clip_frames) * frame_interval + timeout_s) as overall:
            while not collector.finished and result.failure is None:
                with trio.move_on_at(collector.linger_until) as linger:
                    try:
                        frame = await client.next_frame()
                    except ConnectionClosed as exc:
                        result.failure = result.failure or f"{exc}"
                        return
                if linger.cancelled_caught:
                    return
                collector.add(frame, trio.current_time())
                if isinstance(frame, Close):
                    result.failure = result.failure or f"server closed the session ({frame.code})"
        result.timed_out = overall.cancelled_caught
        if result.timed_out and not result.transcript and collector.heard_only_noise:
            result.failure = "the server heard nothing intelligible (only empty turns)"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_microphone)
        await receive_reply()
        nursery.cancel_scope.cancel()
    return result
