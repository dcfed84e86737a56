"""The xiaozhi-esp32 session driver: an ESP32 board on the shared speaker port, Opus both ways.

The board leads: it connects to ``/xiaozhi/v1/`` with its token and ids in the headers, sends
``hello`` and waits for ours. Then ``listen start`` (mode auto, manual or realtime) opens the
microphone; Opus packets are decoded to 16 kHz PCM for the :class:`~voicegrow.streaming.voice.
VoiceSession`; replies go back as ``stt``, ``llm`` (emotion) and ``tts`` messages around 60 ms Opus
packets, paced by the turn. A board with ``features.mcp`` has its tools listed at session start
(:class:`~voicegrow.streaming.device_mcp.DeviceMcpClient`).

Wire details live in :mod:`voicegrow.protocol.xiaozhi`; the rules this driver follows (access,
listen modes, errors) are in docs/xiaozhi.md.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from voicegrow.auth_throttle import address_key
from voicegrow.logsetup import device_id_var
from voicegrow.opus import OpusDecoder, OpusEncoder, OpusError
from voicegrow.protocol import xiaozhi as wire
from voicegrow.protocol.detect import header
from voicegrow.protocol.xiaozhi import XiaozhiError, XiaozhiErrorCode
from voicegrow.services import Services
from voicegrow.streaming.connection import DeviceConnection
from voicegrow.streaming.device_mcp import DeviceMcpClient, DeviceToolError
from voicegrow.streaming.events import ReplySentence, ReplyStarted, ReplyStopped, TranscriptFinal, TurnEvent
from voicegrow.streaming.ingest import AudioIngress, AudioTooFast
from voicegrow.listening import resolve_listen_mode
from voicegrow.streaming.outbox import Outbox
from voicegrow.sessions.registry import SessionInfo
from voicegrow.streaming.voice import VAD_RATE, VoiceSession, begin_device_session, listen_mode_override

__all__ = ["CLOSE_AUTH_FAILED", "CLOSE_AUTH_REQUIRED", "XiaozhiAccessPolicy", "XiaozhiLink", "XiaozhiSession"]

log = logging.getLogger(__name__)

#: WebSocket close codes, as the native protocol's AUTH_REQUIRED / AUTH_FAILED.
CLOSE_AUTH_REQUIRED = 4401
CLOSE_AUTH_FAILED = 4403
CLOSE_PROTOCOL = 1002
CLOSE_TIMEOUT = 1008
#: Audio a board may send ahead of the MAX_AUDIO_RATE allowance (packets buffered during connect).
_AUDIO_BURST_S = 3.0
#: Bad packets answered with an ``error`` message before they are only counted (a broken encoder
#: would otherwise get an answer per 60 ms).
_ERRORS_ANSWERED = 5

_DEVICE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")

#: What a turn event becomes on the board's screen: the firmware's emotion names (``llm`` messages).
_THINKING = wire.Llm(emotion="thinking", text="🤔")
_SPEAKING = wire.Llm(emotion="happy", text="🙂")


# -- access ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class XiaozhiAccessPolicy:
    """``XIAOZHI_TOKEN`` and ``XIAOZHI_ALLOWLIST``; each one that is set must be satisfied.

    The token is what the OTA answer handed the board (``websocket.token``); the firmware sends it as
    ``Authorization: Bearer <token>``. The allowlist names boards by ``Device-Id`` (the MAC address),
    ``Client-Id`` or source address.
    """

    token: str = ""
    allowlist: frozenset[str] = frozenset()

    @classmethod
    def from_settings_text(cls, token: str, allowlist: str) -> XiaozhiAccessPolicy:
        return cls(token, frozenset(part.strip().lower() for part in allowlist.split(",") if part.strip()))

    def refusal(self, authorization: str | None, device_id: str, client_id: str, host: str) -> tuple[int, str] | None:
        """``(close code, reason)`` when the board may not come in, else None."""
        if self.token:
            if not authorization:
                return CLOSE_AUTH_REQUIRED, "missing_token"
            scheme, _, given = authorization.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return CLOSE_AUTH_FAILED, "bad_token"
        if self.allowlist and not ({device_id.lower(), client_id.lower(), host.lower()} & self.allowlist):
            return CLOSE_AUTH_FAILED, "not_allowlisted"
        return None


def device_ids(request: WebSocketRequest) -> tuple[str, str]:
    """``Device-Id`` and ``Client-Id`` from the headers, or from the query (``?device-id=``) as browsers must."""
    query = parse_qs(urlsplit(request.path).query)
    device_id = header(request.headers, b"device-id") or (query.get("device-id") or [""])[0]
    client_id = header(request.headers, b"client-id") or (query.get("client-id") or [""])[0]
    return device_id[:64], client_id[:64]


# -- the device link --------------------------------------------------------------------------------


class XiaozhiLink:
    """The :class:`~voicegrow.streaming.turn.DeviceLink` of a xiaozhi board.

    Turn events become the firmware's messages (:class:`TranscriptFinal` → ``stt``, :class:`ReplyStarted`
    → ``tts start`` …); PCM becomes one Opus packet per 60 ms, framed for the board's protocol version. The
    board plays only between ``tts start`` and ``tts stop`` and queues 40 packets (2.4 s), so the
    pacer's lead (``TTS_LEAD_MS``) must stay well under that, and an interruption leaves at most the
    lead in its buffer.
    """

    protocol = "xiaozhi"
    chunk_ms = wire.FRAME_DURATION_MS

    def __init__(self, outbox: Outbox, *, version: int, session_id: str, output_rate: int) -> None:
        self._outbox = outbox
        self.version = version
        self.session_id = session_id
        self.output_rate = output_rate
        self._encoder = OpusEncoder(output_rate, frame_ms=self.chunk_ms)
        self._sentence: str | None = None
        self._sent_ms = 0
        self.packets_sent = 0

    async def _send(self, message: wire.ServerMessage) -> None:
        await self._outbox.put(wire.encode_text(message))

    async def send_event(self, event: TurnEvent) -> None:
        sid = self.session_id
        if isinstance(event, TranscriptFinal):
            if event.text:
                await self._send(wire.Stt(text=event.text, session_id=sid))
                await self._send(dataclasses.replace(_THINKING, session_id=sid))
        elif isinstance(event, ReplyStarted):
            self._sentence = None
            await self._send(dataclasses.replace(_SPEAKING, session_id=sid))
            await self._send(wire.Tts(state="start", session_id=sid))
        elif isinstance(event, ReplySentence):
            await self._end_sentence()
            self._sentence = event.text
            await self._send(wire.Tts(state="sentence_start", text=self._sentence, session_id=sid))
        elif isinstance(event, ReplyStopped):
            await self._end_sentence()
            await self._send(wire.Tts(state="stop", session_id=sid))
        else:  # the firmware has no message for the reply's text, the timings or the turn's end
            log.debug("turn %s: %s", event.turn_id, event)

    async def _end_sentence(self) -> None:
        if self._sentence is not None:
            sentence, self._sentence = self._sentence, None
            await self._send(wire.Tts(state="sentence_end", text=sentence, session_id=self.session_id))

    async def send_audio(self, pcm: bytes, turn_id: int) -> None:
        packet = self._encoder.encode(pcm)
        frame = wire.encode_binary(packet, self.version, timestamp=self._sent_ms)
        self._sent_ms += self.chunk_ms
        self.packets_sent += 1
        await self._outbox.put_audio(frame, turn_id)

    async def interrupt(self, turn_id: int) -> None:
        self._outbox.drop_audio_through(turn_id)


# -- the session --------------------------------------------------------------------------------------


class _Refused(Exception):
    def __init__(self, code: int, reason: str, error: str) -> None:
        super().__init__(reason)
        self.code, self.reason, self.error = code, reason, error


def _mcp_sender(outbox: Outbox) -> Callable[[wire.Mcp], Awaitable[None]]:
    """How the board's MCP client sends: through the outbox alone. A method of the session would tie
    session and client (which the session holds) in a reference cycle, freed only by a full collection."""
    async def send(message: wire.Mcp) -> None:
        await outbox.put(wire.encode_text(message))

    return send


class XiaozhiSession:
    """Drives one xiaozhi connection from the handshake to close (constructed by server.py)."""

    def __init__(self, services: Services, ws: WebSocketConnection, info: SessionInfo, request: WebSocketRequest,
                 handshake_deadline: float) -> None:
        settings = services.settings
        self.services = services
        self.ws = ws
        self.info = info
        self._handshake_deadline = handshake_deadline
        self.host = info.remote_host  # the device's address, behind a trusted proxy too
        self.device_id, self.client_id = device_ids(request)
        self.authorization = header(request.headers, b"authorization")
        version_header = header(request.headers, b"protocol-version")
        self.header_version = int(version_header) if version_header and version_header.isdigit() else None
        self.access = XiaozhiAccessPolicy.from_settings_text(settings.xiaozhi_token, settings.xiaozhi_allowlist)
        self.connection = DeviceConnection(services, ws)
        self.outbox = self.connection.outbox
        self.max_bytes = min(settings.max_frame_bytes, wire.MAX_MESSAGE_BYTES)
        self.hello: wire.Hello | None = None
        self.voice: VoiceSession | None = None
        self.link: XiaozhiLink | None = None
        self.mcp: DeviceMcpClient | None = None
        self.mode: str = "auto"
        self._decoder = OpusDecoder(VAD_RATE)
        self._errors_answered = 0
        self._ingress = AudioIngress(services.metrics, "xiaozhi", bytes_per_s=2 * VAD_RATE,
                                     max_audio_rate=settings.max_audio_rate, burst_s=_AUDIO_BURST_S,
                                     sample_rate=VAD_RATE, core_rate=VAD_RATE)

    async def run(self) -> None:
        self.info.protocol = "xiaozhi"
        throttle, address = self.services.auth_throttle, address_key(self.host)
        if self.access.token and throttle.retry_after(address) is not None:
            await self._refuse(CLOSE_AUTH_FAILED, "throttled")
            return
        refusal = self.access.refusal(self.authorization, self.device_id, self.client_id, self.host)
        if refusal is not None:
            if refusal[1] == "bad_token":  # a guess at XIAOZHI_TOKEN counts towards this address's lock-out
                throttle.failed(address, self.authorization or "")
            await self._refuse(*refusal)
            return
        async with self.connection.running(self.info) as nursery:
            try:
                hello = await self._handshake()
            except _Refused as exc:
                await self._fail(exc.code, exc.error, exc.reason)
                return
            except ConnectionClosed:
                return
            if hello is None:
                return
            await self._establish(hello, nursery)
            try:
                await self._read_forever()
            except ConnectionClosed:
                pass
            finally:
                if self.mcp is not None:
                    self.mcp.close()
            self.connection.end()

    # -- handshake ----------------------------------------------------------------------------------

    async def _handshake(self) -> wire.Hello | None:
        """The board's ``hello`` before the handshake deadline; anything else first ends the connection."""
        with trio.move_on_at(self._handshake_deadline):
            message = await self.ws.get_message()
            if isinstance(message, bytes):
                raise _Refused(CLOSE_PROTOCOL, "a binary message before hello", "hello_expected")
            try:
                hello = wire.decode_device_text(message, max_bytes=self.max_bytes)
            except XiaozhiError as exc:
                raise _Refused(exc.code.ws_close_code, exc.reason, exc.code.value) from None
            if not isinstance(hello, wire.Hello):
                raise _Refused(CLOSE_PROTOCOL, f"a {type(hello).__name__.lower()} message before hello",
                               "hello_expected")
            self._check_hello(hello)
            return hello
        log.info("no hello before the handshake deadline; closing")
        await self._fail(CLOSE_TIMEOUT, "hello_timeout", "no hello before the handshake deadline (HANDSHAKE_TIMEOUT_S)")
        return None

    def _check_hello(self, hello: wire.Hello) -> None:
        if hello.transport != "websocket":
            raise _Refused(1003, f"transport {hello.transport[:40]!r}; this server speaks websocket", "bad_transport")
        if hello.version not in wire.PROTOCOL_VERSIONS:
            raise _Refused(1003, f"binary protocol version {hello.version}; supported: 1, 2, 3", "unsupported_version")
        params = hello.audio_params
        if params.format != "opus" or params.channels != 1 or params.frame_duration not in (10, 20, 40, 60):
            raise _Refused(1003, f"audio {params.format[:20]} x{params.channels} {params.frame_duration} ms; "
                                 "this server takes mono Opus", "unsupported_audio")
        if self.header_version is not None and self.header_version != hello.version:
            log.info("Protocol-Version header %s but hello version %s: using the hello's",
                     self.header_version, hello.version)

    async def _establish(self, hello: wire.Hello, nursery: trio.Nursery) -> None:
        services, info = self.services, self.info
        self.hello = hello
        name = self.device_id or self.client_id or f"ip-{self.host}"
        info.device_id = _DEVICE_ID_UNSAFE.sub("_", f"xiaozhi-{name}")[:128]
        device_id_var.set(info.device_id)
        output_rate = services.settings.xiaozhi_output_rate
        self.link = XiaozhiLink(self.outbox, version=hello.version, session_id=info.session_id,
                                output_rate=output_rate)
        if hello.mcp:
            self.mcp = info.device_tools = DeviceMcpClient(
                _mcp_sender(self.outbox), timeout_s=services.settings.xiaozhi_mcp_timeout_s,
                session_id=info.session_id)
        # The hello first: the board gives up 10 s after its own; history and model can follow.
        await self.outbox.put(wire.encode_text(wire.ServerHello(
            session_id=info.session_id,
            audio_params=wire.AudioParams(sample_rate=output_rate, frame_duration=wire.FRAME_DURATION_MS))))
        history = await begin_device_session(services, info)
        mode = resolve_listen_mode(setting=services.settings.listen_mode, devices=services.settings.listen_mode_devices,
                                   protocol="xiaozhi", device_id=info.device_id)
        self.voice = VoiceSession(services, self.link, info, history=history,
                                  listen_mode=mode,
                                  listen_override=await listen_mode_override(services, info.device_id))
        await nursery.start(self.voice.run)
        if self.mcp is not None:
            nursery.start_soon(self._list_device_tools, self.mcp)
        log.info("xiaozhi session established", extra={
            "remote": info.remote_addr, "version": hello.version, "client_id": self.client_id})

    async def _list_device_tools(self, mcp: DeviceMcpClient) -> None:
        try:
            tools = await mcp.start()
        except DeviceToolError as exc:
            log.info("the board's MCP tools could not be listed: %s", exc)
            return
        log.info("the board offers %d MCP tools: %s", len(tools), ", ".join(t.name for t in tools)[:300])

    # -- reading ------------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        assert self.hello is not None
        while True:
            message = await self.ws.get_message()
            try:
                if isinstance(message, str):
                    await self._on_text(message)
                else:
                    await self._on_binary(message)
            except XiaozhiError as exc:
                if exc.code is XiaozhiErrorCode.TOO_LARGE:
                    await self._fail(1009, exc.code.value, exc.reason)
                    return
                await self._bad_input(exc.code.value, exc.reason)

    async def _on_text(self, text: str | bytes) -> None:
        message = wire.decode_device_text(text, max_bytes=self.max_bytes)
        voice = self.voice
        assert voice is not None
        if isinstance(message, wire.Listen):
            await self._on_listen(message, voice)
        elif isinstance(message, wire.Abort):
            log.info("the board asked to abort (%s)", message.reason or "no reason")
            await voice.abort("device_abort")
        elif isinstance(message, wire.Mcp):
            if self.mcp is None or not self.mcp.on_payload(message.payload):
                log.debug("ignoring an MCP message nobody waits for")
        else:
            await self._bad_input("unexpected_hello", "a second hello on the same connection")

    async def _on_listen(self, listen: wire.Listen, voice: VoiceSession) -> None:
        if listen.state == "start":
            self.mode = listen.mode or "auto"
            voice.set_push_to_talk(self.mode == "manual")
            voice.open_listening()  # the board opens its microphone after its wake word or button
            # The microphone (re)opens: a new stream, whose clock starts now (the board sent nothing
            # while it was speaking, and that pause is not lag).
            self._ingress.restart()
            log.debug("listening (%s)", self.mode)
        elif listen.state == "stop":
            await voice.end_of_speech()
        else:  # detect: the wake word was heard; stop talking and listen
            log.info("wake word %r", (listen.text or "")[:40])
            await voice.wake()

    async def _on_binary(self, data: bytes) -> None:
        assert self.hello is not None and self.voice is not None
        frame = wire.decode_binary(data, self.hello.version, max_bytes=self.max_bytes)
        if frame.type == wire.BINARY_TYPE_JSON:
            await self._on_text(frame.payload)
            return
        metrics = self.services.metrics
        try:
            pcm = self._decoder.decode(frame.payload)
        except OpusError as exc:
            metrics.audio_frames_dropped.labels("xiaozhi_bad_opus").inc()
            await self._bad_input("bad_opus", str(exc))
            return
        now = trio.current_time()
        try:
            pcm = self._ingress.admit(pcm, now)
        except AudioTooFast as exc:
            await self._fail(CLOSE_TIMEOUT, "rate_limited", str(exc))
            return
        self._ingress.observe_lag(now)
        await self.voice.feed_audio(pcm)

    # -- errors and closing ---------------------------------------------------------------------------

    def _error_message(self, code: str, reason: str) -> str:
        """An ``error`` message: not a firmware type (it logs and ignores it), but readable by people and tools."""
        return json.dumps({"session_id": self.info.session_id, "type": "error", "code": code,
                           "reason": reason[:200]}, ensure_ascii=False, separators=(",", ":"))

    async def _bad_input(self, code: str, reason: str) -> None:
        """Bad input after hello is answered and dropped; the session goes on, as the firmware's does."""
        log.info("ignoring a bad xiaozhi message (%s): %s", code, reason[:200])
        self.services.metrics.protocol_errors.labels(f"xiaozhi_{code}").inc()
        if self._errors_answered < _ERRORS_ANSWERED:
            self._errors_answered += 1
            await self.outbox.put(self._error_message(code, reason))

    async def _fail(self, close_code: int, code: str, reason: str) -> None:
        """Answer with an ``error`` message, then close with ``close_code``."""
        log.info("xiaozhi protocol error %s: %s", code, reason[:200])
        self.services.metrics.protocol_errors.labels(f"xiaozhi_{code}").inc()
        with trio.move_on_after(2.0):
            try:
                await self.outbox.put(self._error_message(code, reason))
            except ConnectionClosed:
                pass
        await self.connection.close(close_code, reason)

    async def _refuse(self, close_code: int, reason: str) -> None:
        log.warning("refused xiaozhi board %s from %s: %s", self.device_id or "?", self.host, reason)
        self.services.metrics.auth_refusals.labels("xiaozhi", reason).inc()
        with trio.move_on_after(2.0):
            try:
                await self.ws.send_message(self._error_message(reason, "access refused (XIAOZHI_TOKEN, XIAOZHI_ALLOWLIST)"))
                await self.ws.aclose(close_code, reason)
            except ConnectionClosed:
                pass
