"""The native-protocol session driver: one reader, one writer, one voice session per connection.

Wire details (framing, frame order, error codes) live in :class:`voicegrow.protocol.native.NativeConnection`,
the same state machine the ``talk`` client drives; this module only moves its frames between the
socket and the :class:`~voicegrow.streaming.voice.VoiceSession`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import trio
from trio_websocket import ConnectionClosed

from voicegrow import __version__
from voicegrow.auth_throttle import address_key
from voicegrow.device_auth import new_nonce
from voicegrow.protocol import native as wire
from voicegrow.protocol.errors import ErrorCode, ProtocolError
from voicegrow.services import Services
from voicegrow.streaming.events import (
    AnnouncementStarted,
    ReplySentence,
    ReplyStarted,
    ReplyStopped,
    ReplyText,
    SpokenError,
    TranscriptFinal,
    TurnEnded,
    TurnEvent,
    TurnTimings,
)
from voicegrow.streaming.ingest import AudioIngress, AudioTooFast
from voicegrow.listening import ListenMode, ListenModeError, parse_mode, resolve_listen_mode
from voicegrow.streaming.connection import DeviceConnection
from voicegrow.streaming.outbox import Outbox
from voicegrow.sessions.registry import SessionInfo
from voicegrow.streaming.voice import VAD_RATE, VoiceSession, begin_device_session, listen_mode_override

__all__ = ["NativeSession", "NativeLink", "control_event"]

log = logging.getLogger(__name__)


def _stopped(event: ReplyStopped) -> dict[str, Any]:
    if event.interrupted_by is None:
        return {"reason": "done"}
    return {"reason": "aborted", "cause": event.interrupted_by}


#: Each turn event as a native CONTROL event: its name and its ``data`` (docs/protocol.md). The one
#: place the session core's events meet the native vocabulary.
_CONTROL: dict[type, tuple[str, Callable[[Any], dict[str, Any]]]] = {
    TranscriptFinal: ("asr_final", lambda e: {"text": e.text, "lang": e.language, "dropped": e.dropped}),
    AnnouncementStarted: ("announcement", lambda e: {"text": e.text, **e.data}),
    ReplyText: ("llm_text", lambda e: {"text": e.text}),
    SpokenError: ("error_spoken", lambda e: {"reason": e.reason, "text": e.text}),
    ReplyStarted: ("tts_start", lambda e: {"sample_rate": e.sample_rate}),
    ReplySentence: ("tts_sentence", lambda e: {"text": e.text}),
    ReplyStopped: ("tts_stop", _stopped),
    TurnEnded: ("turn_end", lambda e: {"outcome": e.outcome, "error": e.error}),
    TurnTimings: ("turn_timings", lambda e: dict(e.timings_ms)),
}


def control_event(event: TurnEvent) -> tuple[str, dict[str, Any]]:
    """The CONTROL event name and data that tell a native device of ``event``."""
    name, data = _CONTROL[type(event)]
    return name, data(event)


class NativeLink:
    """The :class:`~voicegrow.streaming.turn.DeviceLink` of a native-protocol device."""

    protocol = "native"
    chunk_ms = 40

    def __init__(self, outbox: Outbox, conn: wire.NativeConnection, output_rate: int, output_channels: int = 1) -> None:
        self._outbox = outbox
        self._conn = conn
        self.output_rate = output_rate
        self._output_channels = output_channels  # the reply is mono; a stereo device gets it on both
        self._seq = 0

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    async def send_event(self, event: TurnEvent) -> None:
        name, data = control_event(event)
        await self._send_control(name, data, event.turn_id)

    async def _send_control(self, event: str, data: dict[str, Any], turn_id: int) -> None:
        if self._conn.we_closed:  # the session said goodbye; a turn still unwinding has nothing to add
            return
        await self._outbox.put(self._conn.send(wire.Control(event=event, data=data, turn_id=turn_id,
                                                            seq=self._next_seq())))

    async def send_audio(self, pcm: bytes, turn_id: int) -> None:
        if self._conn.we_closed:
            return
        if self._output_channels > 1:
            pcm = np.repeat(np.frombuffer(pcm, dtype="<i2"), self._output_channels).astype("<i2").tobytes()
        frame = wire.Audio(pcm=pcm, turn_id=turn_id, seq=self._next_seq(), timestamp_ms=wire.wire_ms(trio.current_time()))
        await self._outbox.put_audio(self._conn.send(frame), turn_id)

    async def interrupt(self, turn_id: int) -> None:
        self._outbox.drop_audio_through(turn_id)

    async def set_volume(self, level: int) -> None:
        """The ``volume`` event (docs/protocol.md): the device sets its speaker to ``level`` percent."""
        if type(level) is not int or not 0 <= level <= 100:
            raise ValueError(f"volume {level!r} is not an integer from 0 to 100")
        await self._send_control("volume", {"level": level}, 0)


#: Audio a device may send ahead of the MAX_AUDIO_RATE allowance (a buffered start after a reconnect).
_AUDIO_BURST_S = 3.0


class NativeSession:
    """Drives one native-protocol connection from hello to close."""

    def __init__(self, services: Services, ws: Any, info: SessionInfo,
                 first_message: bytes | str | None, handshake_deadline: float, *,
                 auth_mode: str | None = None) -> None:
        self.services = services
        #: ``DEVICE_AUTH`` unless the caller knows better (the browser's talk socket): ``off`` for the
        #: operator, ``operator`` for a peer that is not and has no device credential to offer.
        self._auth_mode = auth_mode or services.settings.device_auth
        self.ws = ws
        self.info = info
        self._first = first_message
        self._handshake_deadline = handshake_deadline
        self.connection = DeviceConnection(services, ws, goodbye=_close_frame)
        self.outbox = self.connection.outbox
        self.conn = wire.NativeConnection(wire.Role.SERVER, max_payload=services.settings.max_frame_bytes)
        self._requested_mode: ListenMode | None = None  # the hello's capabilities.listen_mode
        self._listen_mode = ListenMode.ALWAYS  # from the settings and the hello
        self._listen_override: ListenMode | None = None  # set through the admin API
        self._declared: dict[str, Any] = {}

    async def run(self) -> None:
        async with self.connection.running(self.info) as nursery:
            hello = await self._handshake()
            if hello is not None:
                await self._serve(hello, nursery)

    async def _next_frame(self) -> wire.Frame:
        if self._first is not None:
            message, self._first = self._first, None
        else:
            message = await self.ws.get_message()
        self.conn.receive_data(message)
        frame = self.conn.next_event()
        assert frame is not None  # one WebSocket message is one frame
        return frame

    async def _handshake(self) -> wire.Hello | None:
        """HELLO, device authentication if configured, HELLO_ACK — all before the handshake deadline."""
        try:
            with trio.fail_at(self._handshake_deadline):
                hello = await self._next_frame()
                while not isinstance(hello, wire.Hello):  # the state machine admits ERROR and CLOSE too
                    if isinstance(hello, wire.Close):
                        await self._answer_close()
                        return None
                    log.info("device error before HELLO: %s", hello)
                    hello = await self._next_frame()
                self._requested_mode = _requested_listen_mode(hello)
                self._declared = _barge_in_declared(hello.capabilities)  # a bad one: refused before HELLO_ACK
                await self._authenticate(hello)
        except trio.TooSlowError:
            log.info("handshake not finished before its deadline; closing")
            await self._fail(ProtocolError(ErrorCode.HANDSHAKE_TIMEOUT, "handshake not finished before the deadline"))
            return None
        except ProtocolError as exc:
            await self._fail(exc)
            return None
        except ConnectionClosed:
            return None
        return hello

    async def _authenticate(self, hello: wire.Hello) -> None:
        """Check the device's credentials (DEVICE_AUTH); answers HELLO_ACK on success."""
        mode = self._auth_mode
        if mode == "operator":
            self._refuse("not_operator")
            raise ProtocolError(ErrorCode.AUTH_REQUIRED, "sign in with the admin token (ADMIN_TOKEN) first")
        credentials = self.services.device_credentials
        info = self.info
        nonce = new_nonce() if mode == "hmac" else ""
        if mode != "off":
            self._check_not_locked_out()
        if mode == "token":
            if not hello.token:
                self._refuse("missing_token")
                raise ProtocolError(ErrorCode.AUTH_REQUIRED, "this server requires a device token in HELLO")
            if not credentials.check_token(hello.device_id, hello.token):
                self._refuse("bad_token", guess=f"{hello.device_id}\n{hello.token}")
                raise ProtocolError(ErrorCode.AUTH_FAILED, "unknown device or wrong token")
        settings = self.services.settings
        self._listen_mode = resolve_listen_mode(
            setting=settings.listen_mode, devices=settings.listen_mode_devices, protocol="native",
            device_id=hello.device_id or info.session_id, requested=self._requested_mode)
        self._listen_override = await listen_mode_override(self.services, hello.device_id)
        await self.outbox.put(self.conn.send(wire.HelloAck(
            session_id=info.session_id, audio_in=hello.audio_in, audio_out=hello.audio_out,
            server=f"voicegrow/{__version__}", nonce=nonce,
            capabilities={"max_payload": settings.max_frame_bytes, "auth": mode,
                          "listen_mode": (self._listen_override or self._listen_mode).value})))
        if mode != "hmac":
            return
        answer = await self._next_frame()
        if not (isinstance(answer, wire.Control) and answer.event == "auth"):
            self._refuse("no_proof")
            raise ProtocolError(ErrorCode.AUTH_REQUIRED,
                                "this server requires a CONTROL auth event with the HMAC of its nonce first")
        proof = answer.data.get("hmac")
        if not isinstance(proof, str) or not credentials.check_proof(hello.device_id, nonce, info.session_id, proof):
            self._refuse("bad_proof", guess=proof if isinstance(proof, str) and proof else None)
            raise ProtocolError(ErrorCode.AUTH_FAILED, "unknown device or wrong HMAC")
        await self.outbox.put(self.conn.send(wire.Control(event="auth_ok", data={})))

    def _check_not_locked_out(self) -> None:
        """An address that guessed too many credentials is refused before its credential is looked at."""
        retry = self.services.auth_throttle.retry_after(address_key(self.info.remote_host))
        if retry is not None:
            self._refuse("throttled")
            raise ProtocolError(ErrorCode.AUTH_THROTTLED,
                                f"too many failed authentications from this address; retry in {retry} s")

    def _refuse(self, reason: str, *, guess: str | None = None) -> None:
        """Count a refusal; a wrong credential (``guess``) also counts towards this address's lock-out."""
        log.warning("device authentication refused: %s", reason)
        self.services.metrics.auth_refusals.labels("native", reason).inc()
        if guess is not None:
            self.services.auth_throttle.failed(address_key(self.info.remote_host), guess)

    async def _serve(self, hello: wire.Hello, nursery: trio.Nursery) -> None:
        services = self.services
        settings = services.settings
        info = self.info
        info.device_id = hello.device_id or info.session_id
        info.protocol = "native"
        from voicegrow.logsetup import device_id_var

        device_id_var.set(info.device_id)
        history = await begin_device_session(services, info)
        link = NativeLink(self.outbox, self.conn, output_rate=hello.audio_out.sample_rate,
                          output_channels=hello.audio_out.channels)
        voice = VoiceSession(services, link, info, history=history,
                             listen_mode=self._listen_mode, listen_override=self._listen_override, **self._declared)
        await nursery.start(voice.run)
        log.info("native session established", extra={"remote": info.remote_addr})
        ingress = AudioIngress(services.metrics, "native", bytes_per_s=hello.audio_in.bytes_per_second,
                               max_audio_rate=settings.max_audio_rate, burst_s=_AUDIO_BURST_S,
                               sample_rate=hello.audio_in.sample_rate, core_rate=VAD_RATE,
                               channels=hello.audio_in.channels)
        while True:
            try:
                frame = await self._next_frame()
            except ProtocolError as exc:
                await self._fail(exc)
                return
            except ConnectionClosed:
                return
            if isinstance(frame, wire.Audio):
                try:
                    pcm = ingress.admit(frame.pcm, trio.current_time())
                except AudioTooFast as exc:
                    await self._fail(ProtocolError(ErrorCode.RATE_LIMITED, str(exc)))
                    return
                await voice.feed_audio(pcm)
                ingress.observe_lag(trio.current_time(), frame.timestamp_ms)
            elif isinstance(frame, wire.Control):
                try:
                    await self._on_control(frame, voice)
                except ProtocolError as exc:
                    await self._fail(exc)
                    return
            elif isinstance(frame, wire.Ping):
                await self.outbox.put(self.conn.send(wire.Pong(nonce=frame.nonce)))
            elif isinstance(frame, wire.Close):
                await self._answer_close()
                return

    async def _on_control(self, frame: wire.Control, voice: VoiceSession) -> None:
        if frame.event == "abort":
            await voice.abort("device_abort")
        elif frame.event == "listen_stop":
            await voice.end_of_speech()
        elif frame.event in ("listen_start", "wake"):  # a button, or the device's own wake word
            await voice.wake()
        elif frame.event == "text":
            text = frame.data.get("text")
            if not isinstance(text, str) or not text.strip():
                raise ProtocolError(ErrorCode.BAD_PAYLOAD, "a text event needs a non-empty string in data.text")
            await voice.text_input(text.strip())
        else:
            log.debug("ignoring control event %r", frame.event)

    async def _answer_close(self) -> None:
        """The device said goodbye: answer with our CLOSE, then close the WebSocket normally."""
        self.connection.outbox.put_nowait(self.conn.send(wire.Close(code=1000, reason="")))
        await self.connection.close(1000, "bye")

    async def _fail(self, exc: ProtocolError) -> None:
        """Answer a protocol error with an error frame, then close with the matching code."""
        log.info("protocol error %s: %s", exc.code.name, exc.reason)
        self.services.metrics.protocol_errors.labels(exc.code.name.lower()).inc()
        with trio.move_on_after(2.0):
            try:
                if not self.conn.we_closed:
                    await self.outbox.put(self.conn.send(wire.Error(code=int(exc.code), reason=exc.reason)))
                await self.outbox.drain()
            except ConnectionClosed:
                pass
        await self.connection.close(exc.ws_close_code, exc.reason)


def _requested_listen_mode(hello: wire.Hello) -> ListenMode | None:
    """``capabilities.listen_mode`` of a HELLO: how the device means to be listened to, if it says."""
    requested = hello.capabilities.get("listen_mode")
    if requested is None:
        return None
    if not isinstance(requested, str):
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, "hello capabilities.listen_mode must be a string")
    try:
        return parse_mode(requested, "capabilities.listen_mode")
    except ListenModeError as exc:
        raise ProtocolError(ErrorCode.BAD_PAYLOAD, f"hello {exc}") from None


def _barge_in_declared(capabilities: dict[str, Any]) -> dict[str, Any]:
    """What HELLO says about barge-in: ``echo_cancellation: true`` (the device cancels its own echo,
    so ``BARGE_IN=auto`` trusts its microphone) and optionally the ``barge_in`` policy it wants."""
    declared: dict[str, Any] = {"device_cancels_echo": capabilities.get("echo_cancellation") is True}
    wanted = capabilities.get("barge_in")
    if wanted is not None:
        if wanted not in ("auto", "vad", "wake_word", "off"):
            raise ProtocolError(ErrorCode.BAD_PAYLOAD,
                                "capabilities.barge_in must be one of auto, vad, wake_word, off")
        declared["barge_in"] = wanted
    return declared


def _close_frame(code: int, reason: str) -> bytes:
    """The native goodbye: a CLOSE frame before the WebSocket close."""
    return wire.encode(wire.Close(code=code, reason=reason))
