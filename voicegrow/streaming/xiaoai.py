"""The open-xiaoai session driver: a flashed Xiaomi speaker served on the shared WebSocket port.

The speaker is a WebSocket client that says nothing until spoken to, so the server leads: it asks
who the speaker is (the device-info script, which doubles as the handshake), checks access, resumes
the speaker's conversation, and starts the microphone and the player. From then on ``record`` frames
feed the :class:`~voicegrow.streaming.voice.VoiceSession` and replies go back as ``play`` frames,
paced by the turn. Every connection is a new session; the conversation survives reconnects because
the device id (``xiaoai-<serial>``) stays the same.

Wire details live in :mod:`voicegrow.protocol.xiaoai`; the rules this driver follows (handshake,
access control, barge-in, watchdog, silencing the built-in assistant) are in docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from voicegrow.auth_throttle import address_key
from voicegrow.logsetup import device_id_var
from voicegrow.protocol import xiaoai as wire
from voicegrow.protocol.xiaoai import Request, Response, Stream, XiaoaiError
from voicegrow.services import Services
from voicegrow.streaming.ingest import AudioIngress, AudioTooFast
from voicegrow.listening import resolve_listen_mode
from voicegrow.streaming.connection import DeviceConnection
from voicegrow.streaming.events import TurnEvent
from voicegrow.streaming.outbox import Outbox
from voicegrow.sessions.registry import SessionInfo
from voicegrow.streaming.voice import VAD_RATE, VoiceSession, begin_device_session, listen_mode_override

__all__ = [
    "CLOSE_REFUSED",
    "CLOSE_UNRESPONSIVE",
    "PLAY_CHUNK_MS",
    "PLAY_RATE",
    "RECORD_RATE",
    "RequestFailure",
    "SpeakerCalls",
    "SpeakerIdentity",
    "SpeakerRequestError",
    "SpeakerRpc",
    "XiaoaiAccessPolicy",
    "XiaoaiLink",
    "XiaoaiSession",
    "parse_silence_commands",
    "speaker_identity",
]

log = logging.getLogger(__name__)

#: What we ask the speaker for: the reference servers' formats (16 kHz up in 90 ms frames, 24 kHz down).
RECORD_RATE = 16000
PLAY_RATE = 24000
#: Reply audio per ``play`` frame. The client queues 50 frames (5 s at 100 ms) and the pipe into
#: ``aplay`` holds ~1.4 s more, far beyond the pacer's lead, so its reader never stalls on a full queue.
PLAY_CHUNK_MS = 100
#: WebSocket close codes: 4403 mirrors HTTP 403 (as the native protocol's AUTH_FAILED does).
CLOSE_REFUSED = 4403
CLOSE_UNRESPONSIVE = 1008
#: A speaker whose microphone outruns MAX_AUDIO_RATE (1008: policy violation, as for the unresponsive).
CLOSE_TOO_FAST = 1008
#: Audio a speaker may send ahead of the MAX_AUDIO_RATE allowance: ``arecord``'s start-up burst, frames
#: buffered while the connection was slow, the start of a clip from the emulator's fast mode in tests.
AUDIO_BURST_S = 5.0
#: How long a new connection waits for an older session of the same speaker to finish (its last
#: turn saves the conversation the new session resumes).
SUPERSEDE_WAIT_S = 3.0

_DEVICE_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


# -- requests to the speaker --------------------------------------------------------------------------


class RequestFailure(enum.Enum):
    """Why a request to the speaker brought no usable answer; the value is a stable string for logs."""

    TIMEOUT = "timeout"  # no answer in time: the speaker (or its connection) is gone
    REFUSED = "refused"  # it answered with a non-zero code


class SpeakerRequestError(Exception):
    """A request to the speaker failed; ``code`` tells a dead speaker from a refused command."""

    def __init__(self, code: RequestFailure, request: Request, reason: str) -> None:
        super().__init__(f"{request.command}: {code.value}: {reason}")
        self.code = code
        self.request = request
        self.reason = reason


class _PendingCall:
    __slots__ = ("answered", "response")

    def __init__(self) -> None:
        self.answered = trio.Event()
        self.response: Response | None = None


class SpeakerRpc:
    """Our requests to the speaker and their answers, matched by id, each bounded by a deadline.

    The speaker handles requests concurrently and may answer out of order, so answers are matched
    by id (the codec's :class:`~voicegrow.protocol.xiaoai.RequestTracker`); an answer nobody waits
    for any more (late, duplicated, foreign) is ignored.
    """

    def __init__(self, outbox: Outbox, *, timeout_s: float) -> None:
        self._outbox = outbox
        self._tracker = wire.RequestTracker(timeout_s)
        self._waiting: dict[str, _PendingCall] = {}

    @property
    def timeout_s(self) -> float:
        return self._tracker.timeout

    async def call(self, request: Request, *, deadline: float | None = None) -> Response:
        """Send ``request`` and return the speaker's successful answer.

        Raises :class:`SpeakerRequestError` when no answer came before ``deadline`` (default: now
        plus the request timeout) or when the speaker answered with an error code.
        """
        now = trio.current_time()
        timeout = self._tracker.timeout if deadline is None else max(0.0, deadline - now)
        self._tracker.register(request, now, timeout)
        pending = self._waiting[request.id] = _PendingCall()
        try:
            await self._outbox.put(wire.encode_text(request))
            with trio.move_on_at(now + timeout):
                await pending.answered.wait()
        finally:
            self._waiting.pop(request.id, None)
            self._forget_expired()
        response = pending.response
        if response is None:
            raise SpeakerRequestError(RequestFailure.TIMEOUT, request, f"no answer within {timeout:g} s")
        if not response.ok:
            raise SpeakerRequestError(RequestFailure.REFUSED, request, f"code {response.code}: {response.msg}")
        return response

    def on_response(self, response: Response) -> bool:
        """Hand an answer to its waiting caller; False if it matches no pending request."""
        if self._tracker.on_response(response) is None:
            return False
        pending = self._waiting.get(response.id)
        if pending is not None:
            pending.response = response
            pending.answered.set()
        return True

    def _forget_expired(self) -> None:
        for request in self._tracker.expired(trio.current_time()):
            self._waiting.pop(request.id, None)


class SpeakerCalls:
    """Requests whose failure the session absorbs: a timeout means the speaker is gone, so the
    connection is closed; a refusal is logged. Callable as ``await calls(request)``.

    An object of its own rather than a method of the session, because the device link calls it too:
    a link holding a method of the session that holds the link would be a reference cycle, and a
    session in a cycle (its last turn's audio included) outlives its connection until the cycle
    collector's next full pass, hours later in a process holding a big model.
    """

    def __init__(self, rpc: SpeakerRpc, connection: DeviceConnection, metrics: Any) -> None:
        self._rpc = rpc
        self._connection = connection
        self._metrics = metrics

    async def __call__(self, request: Request) -> Response | None:
        try:
            return await self._rpc.call(request)
        except SpeakerRequestError as exc:
            if exc.code is RequestFailure.TIMEOUT:
                log.warning("the speaker stopped answering (%s); closing", exc)
                self._metrics.protocol_errors.labels("xiaoai_request_timeout").inc()
                await self._connection.close(CLOSE_UNRESPONSIVE, "the speaker stopped answering requests")
            else:
                log.warning("speaker request failed: %s", exc)
            return None


# -- who the speaker is and whether it may come in ------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SpeakerIdentity:
    device_id: str
    model: str | None
    serial: str | None


def speaker_identity(device_info: Response | None, host: str) -> SpeakerIdentity:
    """The device id from the answer to ``DEVICE_INFO_COMMAND``, else from the source address.

    The serial is what the speaker says about itself: it names the conversation, it does not prove
    anything. Characters outside the native protocol's device-id alphabet become ``_``.
    """
    data = device_info.data if device_info is not None else None
    info: dict[str, str | None] = {"model": None, "serial": None}
    if isinstance(data, dict) and data.get("exit_code") == 0:
        info = wire.parse_device_info(data.get("stdout"))
    serial = info["serial"]
    name = f"xiaoai-{serial}" if serial else f"xiaoai-ip-{host}"
    return SpeakerIdentity(_DEVICE_ID_UNSAFE.sub("_", name)[:128], info["model"], serial)


@dataclasses.dataclass(frozen=True)
class XiaoaiAccessPolicy:
    """``XIAOAI_TOKEN`` and ``XIAOAI_ALLOWLIST``; each one that is set must be satisfied.

    The token travels in the URL the speaker is configured with (``ws://HOST:4399/?token=…``);
    the allowlist admits a source address at once, or a serial once the speaker has said it.
    """

    token: str = ""
    allowlist: frozenset[str] = frozenset()

    @classmethod
    def from_settings_text(cls, token: str, allowlist: str) -> XiaoaiAccessPolicy:
        return cls(token, frozenset(part.strip() for part in allowlist.split(",") if part.strip()))

    def url_refusal(self, path: str) -> str | None:
        """The refusal reason for the request target (path and query), or None."""
        if not self.token:
            return None
        given = parse_qs(urlsplit(path).query).get("token")
        if not given:
            return "missing_token"
        if not hmac.compare_digest(given[0].encode(), self.token.encode()):
            return "bad_token"
        return None

    def admits_address(self, host: str) -> bool:
        return not self.allowlist or host in self.allowlist

    def device_refusal(self, host: str, serial: str | None) -> str | None:
        """The refusal reason once the speaker's serial is known (or could not be read), or None."""
        if self.admits_address(host) or (serial is not None and serial in self.allowlist):
            return None
        return "not_allowlisted"


def parse_silence_commands(setting: str) -> tuple[str, ...]:
    """``XIAOAI_SILENCE_COMMANDS`` (``;;``-separated); empty means the codec's fixed default."""
    commands = tuple(part.strip() for part in setting.split(";;") if part.strip())
    return commands or wire.SILENCE_BUILTIN_COMMANDS


# -- the device link --------------------------------------------------------------------------------


SpeakerCall = Callable[[Request], Awaitable[Response | None]]


class XiaoaiLink:
    """The :class:`~voicegrow.streaming.turn.DeviceLink` of an open-xiaoai speaker.

    The speaker has no use for our turn events (its client only prints server events), so they are
    logged, not sent. Reply audio goes out as ``play`` frames. An interruption drops queued audio
    and restarts the player (``stop_play`` kills ``aplay`` with whatever it still buffered, then
    ``start_play`` for the next reply); audio waits until the player answered it is running, as the
    client drops ``play`` frames while no player runs. ``stop_play`` and ``start_play`` are sent one
    after the other because the client handles requests concurrently and could reorder them.
    """

    protocol = "xiaoai"
    chunk_ms = PLAY_CHUNK_MS

    def __init__(self, outbox: Outbox, call: SpeakerCall, nursery: trio.Nursery, *,
                 output_rate: int = PLAY_RATE, model: str | None = None) -> None:
        self._outbox = outbox
        self.model = model
        self._call = call
        self._nursery = nursery
        self.output_rate = output_rate
        self._player_ready = trio.Event()
        self._player_lock = trio.Lock()
        self._restarts = 0
        self._audio_since_start = False

    async def start_player(self) -> None:
        """Arm the player on a fresh connection."""
        await self._restart_player(self._restarts, stop_first=False)

    async def send_event(self, event: TurnEvent) -> None:
        log.debug("turn %s: %s", event.turn_id, event)

    async def send_audio(self, pcm: bytes, turn_id: int) -> None:
        await self._player_ready.wait()
        self._audio_since_start = True
        frame = wire.encode_stream(Stream(wire.new_id(), wire.PLAY_TAG, pcm))
        await self._outbox.put_audio(frame, turn_id)

    async def interrupt(self, turn_id: int) -> None:
        self._outbox.drop_audio_through(turn_id)
        if not self._audio_since_start:
            return  # nothing of the reply reached the player: no need to restart it
        self._audio_since_start = False
        self._restarts += 1
        if self._player_ready.is_set():
            self._player_ready = trio.Event()  # waiters on an unset event keep it: it is set later
        self._nursery.start_soon(self._restart_player, self._restarts)

    async def set_volume(self, level: int) -> None:
        """The model's fixed volume script (``VOLUME_COMMANDS``); raises if the level is not a valid
        integer or the speaker did not run it."""
        script = wire.volume_command(self.model, level)  # XiaoaiError before anything is sent
        response = await self._call(wire.run_shell(script))
        data = response.data if response is not None else None
        if not isinstance(data, dict) or data.get("exit_code") != 0:
            raise RuntimeError("the speaker did not run the volume command")

    async def _restart_player(self, restart: int, stop_first: bool = True) -> None:
        async with self._player_lock:
            if stop_first:
                await self._call(wire.stop_play())
            await self._call(wire.start_play(sample_rate=self.output_rate))
        if restart == self._restarts:  # a newer interruption sets it when its own restart is done
            self._player_ready.set()


# -- the session --------------------------------------------------------------------------------------


class XiaoaiSession:
    """Drives one open-xiaoai connection from the handshake to close (constructed by server.py)."""

    def __init__(self, services: Services, ws: WebSocketConnection, info: SessionInfo,
                 first_message: bytes | str | None, handshake_deadline: float,
                 request: WebSocketRequest) -> None:
        settings = services.settings
        self.services = services
        self.ws = ws
        self.info = info
        self._first = first_message
        self._handshake_deadline = handshake_deadline
        self._target = request.path
        self.host = info.remote_host  # the device's address, behind a trusted proxy too
        self.access = XiaoaiAccessPolicy.from_settings_text(settings.xiaoai_token, settings.xiaoai_allowlist)
        self.silence_commands = parse_silence_commands(settings.xiaoai_silence_commands)
        self.connection = DeviceConnection(services, ws)
        self.outbox = self.connection.outbox
        self.rpc = SpeakerRpc(self.outbox, timeout_s=settings.xiaoai_request_timeout_s)
        self.call = SpeakerCalls(self.rpc, self.connection, services.metrics)
        self.identity: SpeakerIdentity | None = None
        self.voice: VoiceSession | None = None
        self.link: XiaoaiLink | None = None
        self._nursery: trio.Nursery | None = None
        self._silencing = False
        self._recording_armed_at = trio.current_time()
        self._last_record_at = -1.0
        #: The record stream since recording was (re)armed: MAX_AUDIO_RATE's clock and the ingest lag.
        self._ingress = AudioIngress(services.metrics, "xiaoai", bytes_per_s=2 * RECORD_RATE,
                                     max_audio_rate=settings.max_audio_rate, burst_s=AUDIO_BURST_S,
                                     sample_rate=RECORD_RATE, core_rate=VAD_RATE)

    async def run(self) -> None:
        self.info.protocol = "xiaoai"
        if self.access.token:
            retry = self.services.auth_throttle.retry_after(address_key(self.host))
            if retry is not None:
                await self._refuse("throttled")
                return
        refusal = self.access.url_refusal(self._target)
        if refusal is not None:
            if refusal == "bad_token":  # a guess at XIAOAI_TOKEN counts towards this address's lock-out
                guess = parse_qs(urlsplit(self._target).query).get("token", [""])[0]
                self.services.auth_throttle.failed(address_key(self.host), guess)
            await self._refuse(refusal)
            return
        async with self.connection.running(self.info) as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reader)
            if not await self._establish(nursery):
                return
            await self._watch_recorder()

    # -- establishing the session -------------------------------------------------------------------

    async def _establish(self, nursery: trio.Nursery) -> bool:
        """Identify the speaker (the handshake), check access, resume its conversation, arm audio."""
        services, info = self.services, self.info
        timeout_at = min(self._handshake_deadline, trio.current_time() + self.rpc.timeout_s)
        device_info: Response | None = None
        try:
            device_info = await self.rpc.call(wire.run_shell(wire.DEVICE_INFO_COMMAND), deadline=timeout_at)
        except SpeakerRequestError as exc:
            if exc.code is RequestFailure.TIMEOUT:
                log.info("no answer from %s before the handshake deadline; closing", self.host)
                services.metrics.protocol_errors.labels("xiaoai_handshake_timeout").inc()
                await self.connection.close(CLOSE_UNRESPONSIVE, "no answer before the handshake deadline")
                return False
            log.info("device info failed (%s); naming the speaker by its address", exc.reason)
        identity = self.identity = speaker_identity(device_info, self.host)
        refusal = self.access.device_refusal(self.host, identity.serial)
        if refusal is not None:
            await self._refuse(refusal)
            return False
        info.device_id = identity.device_id
        device_id_var.set(info.device_id)
        await self._supersede_older_sessions()
        history = await begin_device_session(services, info)
        self.link = XiaoaiLink(self.outbox, self.call, nursery, model=identity.model)
        mode = resolve_listen_mode(setting=services.settings.listen_mode, devices=services.settings.listen_mode_devices,
                                   protocol="xiaoai", device_id=info.device_id)
        self.voice = VoiceSession(services, self.link, info, history=history,
                                  listen_mode=mode,
                                  listen_override=await listen_mode_override(services, info.device_id))
        await nursery.start(self.voice.run)
        await self._start_recording()
        await self.link.start_player()
        log.info("open-xiaoai session established", extra={
            "remote": info.remote_addr, "model": identity.model, "serial": identity.serial})
        return True

    async def _supersede_older_sessions(self) -> None:
        """A speaker keeps one connection: an older session of the same device is dead or dying.

        Waiting for it to end also means its last turn has saved the conversation we are about to
        load, so a reconnect mid-reply continues where it left off.
        """
        registry = self.services.registry
        older = [s for s in registry if s.device_id == self.info.device_id and s.session_id != self.info.session_id]
        if not older:
            return
        for session in older:
            if session.request_close is not None:
                session.request_close(1000, "superseded by a new connection of the same speaker")
        with trio.move_on_after(SUPERSEDE_WAIT_S):
            await registry.wait_until(lambda r: all(s.session_id not in r for s in older))

    # -- requests ---------------------------------------------------------------------------------

    async def _start_recording(self) -> None:
        await self.call(wire.start_recording(sample_rate=RECORD_RATE))
        self._recording_armed_at = trio.current_time()
        self._ingress.restart()  # a new stream: its clock starts again

    async def _watch_recorder(self) -> None:
        """The client's recorder stops silently when ``arecord`` is quiet for 500 ms; restart it."""
        quiet_limit = self.services.settings.xiaoai_record_watchdog_s
        while True:
            due = max(self._last_record_at, self._recording_armed_at) + quiet_limit
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            log.info("no record frame for %.1f s: restarting the speaker's recorder", quiet_limit)
            await self.call(wire.stop_recording())  # a running recorder would ignore start_recording
            await self._start_recording()

    def _spawn(self, action: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run an interruption beside the reader: it waits for the turn to wind down, and the
        reader must go on reading meanwhile (the player restart needs the speaker's answers)."""
        assert self._nursery is not None
        self._nursery.start_soon(action, *args)

    def _silence_builtin_assistant(self) -> None:
        """Stop the speaker's own assistant from answering (fixed, operator-configured scripts only)."""
        if not self.services.settings.xiaoai_silence_builtin or self._silencing:
            return
        self._silencing = True

        async def silence() -> None:
            try:
                for command in self.silence_commands:
                    await self.call(wire.run_shell(command))
            finally:
                self._silencing = False

        self._spawn(silence)

    # -- reading ----------------------------------------------------------------------------------

    async def _reader(self) -> None:
        try:
            while True:
                if self._first is not None:
                    message, self._first = self._first, None
                else:
                    message = await self.ws.get_message()
                try:
                    if isinstance(message, str):
                        await self._on_text(message)
                    else:
                        await self._on_stream(wire.decode_binary(message))
                except XiaoaiError as exc:
                    self._protocol_error(exc.code.value, exc.reason)
        except ConnectionClosed:
            self.connection.end()

    def _protocol_error(self, code: str, reason: str) -> None:
        """Bad input is counted and ignored, as the client itself does: it never ends the session."""
        log.info("ignoring a bad open-xiaoai message (%s): %s", code, reason[:200])
        self.services.metrics.protocol_errors.labels(f"xiaoai_{code}").inc()

    async def _on_text(self, text: str) -> None:
        message = wire.decode_text(text)
        if isinstance(message, Response):
            if not self.rpc.on_response(message):
                log.debug("ignoring an answer to no pending request: %s", message.id)
        elif isinstance(message, wire.Event):
            await self._on_event(message)
        else:  # the client calls nothing on the server; answer as it answers unknown commands
            self._protocol_error("unexpected_request", f"the speaker sent a {message.command[:40]!r} request")
            await self.outbox.put(wire.encode_text(Response(message.id, code=-1, msg="command not found")))

    async def _on_stream(self, stream: Stream) -> None:
        if stream.tag != wire.RECORD_TAG:
            self._protocol_error("unexpected_stream", f"a {stream.tag[:40]!r} stream from the speaker")
            return
        now = trio.current_time()
        self._last_record_at = now
        metrics = self.services.metrics
        if self.voice is None:
            metrics.audio_frames_dropped.labels("xiaoai_before_session").inc()
            return
        try:
            pcm = self._ingress.admit(stream.bytes, now)
        except AudioTooFast as exc:
            log.warning("closing an open-xiaoai speaker whose audio arrives faster than %gx real time",
                        exc.max_audio_rate)
            await self.connection.close(CLOSE_TOO_FAST, str(exc))
            return
        self._ingress.observe_lag(now)
        await self.voice.feed_audio(pcm)

    async def _on_event(self, event: wire.Event) -> None:
        """Wake words and the built-in assistant's recognition interrupt our reply (docs/protocol.md)."""
        meaning = wire.parse_event(event)
        voice = self.voice
        if meaning is None:
            self._protocol_error("unknown_event", f"event {event.event[:40]!r}")
        elif voice is None:
            log.debug("ignoring %s before the session is established", event.event)
        elif isinstance(meaning, wire.KwsKeyword):
            log.info("wake word %r", meaning.keyword)
            self._spawn(voice.wake, voice.position_s)
        elif isinstance(meaning, wire.InstructionLine) and meaning.recognize is not None:
            heard = meaning.recognize
            if not heard.text and not heard.is_vad_begin:
                log.info("the built-in assistant woke up")
                self._silence_builtin_assistant()
                self._spawn(voice.wake, voice.position_s)
            elif heard.text and heard.is_final:
                log.info("the built-in assistant heard %r", heard.text[:80])
                self._silence_builtin_assistant()
                self._spawn(voice.abort, "builtin_heard")
        else:
            log.debug("speaker event %s: %r", event.event, meaning)

    # -- writing and closing ------------------------------------------------------------------------

    async def _refuse(self, reason: str) -> None:
        log.warning("refused open-xiaoai speaker from %s: %s", self.host, reason)
        self.services.metrics.auth_refusals.labels("xiaoai", reason).inc()
        await self.connection.close(CLOSE_REFUSED, reason)
