"""An open-xiaoai speaker without the speaker: the Rust client's wire behaviour, for tests and bench runs.

It does what ``packages/client-rust/src/bin/client.rs`` does (details and source lines in
docs/xiaoai.md): connects to the URL as given (no path, no extra headers), says nothing until it has
an event, answers requests with the client's exact JSON (unknown commands with ``code -1, "command
not found"``), streams one ``record`` frame per ``buffer_size`` frames paced against a monotonic
clock once recording starts, and plays ``play`` frames only between ``start_play`` and
``stop_play``. It never executes a shell script: ``run_shell`` is answered from a small table of
fake outputs for the fixed scripts a server may send.

Playback models the client's pipeline: a 50-chunk queue (a full queue stalls the reader, as
``mpsc::Sender::send().await`` does) feeding ``aplay`` through a pipe with a 100 ms write timeout;
the pipe plus the ALSA buffer drain at the playback rate, so a server that runs far ahead of real
time sees audio cut, as it would on a speaker.

With a ``room`` (:class:`bench.acoustics.EchoPath`) the microphone hears the speaker's own
playback as a real one does: every chunk the emulated ``aplay`` accepts is placed on the microphone's
timeline at the moment it plays, delayed, attenuated and reverberated, over background noise; speech
from :meth:`SpeakerEmulator.stream_pcm` is mixed on top (the user in the same room). Positions are
microphone samples, so :attr:`SpeakerEmulator.request_positions` tells how much audio after the user
began talking the server's ``stop_play`` came, whatever the machine's load.

Command line::

    python -m bench.xiaoai_emulator --url ws://127.0.0.1:4399 --wav clip.wav --kws 小爱同学 \\
        --save-play answer.wav --duration 20
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, connect_websocket_url

from bench.emulator import EmulatorError, run_cli, running
from voicegrow.client import connect_websocket_from
from voicegrow.protocol import xiaoai as proto
from voicegrow.protocol.xiaoai import AudioConfig, Event, PlayingState, Request, Response, Stream, XiaoaiError

__all__ = [
    "DEFAULT_MODEL",
    "FAST_SPEED",
    "DEFAULT_SERIAL",
    "EmulatorError",
    "PlayFrame",
    "PlayWrite",
    "PlaybackPipe",
    "SpeakerEmulator",
    "fake_shell_outputs",
    "main",
    "recognize_result_line",
    "run_emulator",
]

DEFAULT_MODEL = "LX06"
DEFAULT_SERIAL = "27473/716890001"
#: tungstenite's default ``max_message_size``: the client accepts messages up to 64 MiB.
CLIENT_MAX_MESSAGE_BYTES = 64 << 20
#: ``Semaphore::new(32)`` in message.rs: requests handled at once before the reader waits.
CLIENT_REQUEST_CONCURRENCY = 32
#: ``mpsc::channel::<Vec<u8>>(50)`` and ``timeout(100 ms, write_all)`` in play.rs.
CLIENT_PLAY_QUEUE_CHUNKS = 50
CLIENT_PLAY_WRITE_TIMEOUT_S = 0.1
#: The default Linux pipe capacity between the client and ``aplay``.
PIPE_BUFFER_BYTES = 65536
#: client.rs sleeps 1 s after a failed connect and reconnects at once after a disconnect.
CLIENT_RETRY_INTERVAL_S = 1.0
#: How many times real time ``stream_pcm(realtime=False)`` sends: a definite pace, so a test's
#: MAX_AUDIO_RATE (up to 100) can be set above it. Frames sent back to back ran at whatever the
#: machine allowed, over 200x on an idle moment, and tripped even MAX_AUDIO_RATE=100.
FAST_SPEED = 10.0


ShellOutput = tuple[str, str, int]


def fake_shell_outputs(model: str, serial: str) -> dict[str, ShellOutput]:
    """``(stdout, stderr, exit_code)`` for the fixed scripts, keyed by the stripped script text."""
    return {
        proto.DEVICE_INFO_COMMAND: (f"{model} {serial}\n", "", 0),
        proto.ABORT_XIAOAI_COMMAND: ("", "", 0),  # its output goes to /dev/null on the speaker too
        proto.CANCEL_WAKE_COMMAND.strip(): ("", "", 0),
    }


def recognize_result_line(text: str, *, is_final: bool = True, is_vad_begin: bool = False,
                          dialog_id: str | None = None) -> str:
    """A ``SpeechRecognizer/RecognizeResult`` line as the built-in assistant logs it."""
    line = {
        "header": {"dialog_id": dialog_id or proto.new_id(), "id": proto.new_id(),
                   "name": "RecognizeResult", "namespace": "SpeechRecognizer"},
        "payload": {"is_final": is_final, "is_vad_begin": is_vad_begin,
                    "results": [{"confidence": 0.0, "text": text}]},
    }
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def _serde_not_a_string(value: Any) -> str:
    """The message serde_json gives when ``run_shell``'s payload is not a string."""
    if isinstance(value, bool):
        found = f"boolean `{str(value).lower()}`"
    elif isinstance(value, int):
        found = f"integer `{value}`"
    elif isinstance(value, float):
        found = f"floating point `{value!r}`"
    elif isinstance(value, list):
        found = "sequence"
    else:
        found = "map"
    return f"invalid type: {found}, expected a string"


@dataclass(frozen=True, slots=True)
class PlayFrame:
    """A ``play`` Stream as it arrived; ``accepted`` is False when no player was running (dropped)."""

    received_at: float
    size: int
    accepted: bool


@dataclass(frozen=True, slots=True)
class PlayWrite:
    """One chunk written to the emulated ``aplay``: when, how much got in before the timeout, and
    the stretch of the playback timeline it occupies."""

    at: float
    offered: int
    accepted: int
    plays_from: float
    plays_until: float


class PlaybackPipe:
    """The pipe into ``aplay`` plus its ALSA buffer, as a bucket drained at the playback rate.

    Pure arithmetic on a caller-supplied clock so it can be tested without sleeping. A write that
    does not fit waits for room; if that takes longer than the client's write timeout, only what
    fitted by then is kept (``write_all`` was cancelled half-way), rounded to whole sample frames.
    """

    def __init__(self, config: AudioConfig, *, pipe_bytes: int = PIPE_BUFFER_BYTES,
                 write_timeout: float = CLIENT_PLAY_WRITE_TIMEOUT_S) -> None:
        self.bytes_per_second = config.bytes_per_second
        self.sample_frame_bytes = max(config.channels, 1) * (max(config.bits_per_sample, 8) // 8)
        self.capacity_bytes = pipe_bytes + config.buffer_size * self.sample_frame_bytes
        self.write_timeout = write_timeout
        self.playing_until = -math.inf

    def backlog_seconds(self, now: float) -> float:
        return max(0.0, self.playing_until - now)

    def write(self, now: float, nbytes: int) -> tuple[float, int]:
        """``(seconds the write blocks, bytes accepted)`` for a chunk offered at ``now``."""
        capacity_s = self.capacity_bytes / self.bytes_per_second
        backlog = self.backlog_seconds(now)
        wait = backlog + nbytes / self.bytes_per_second - capacity_s
        if wait <= self.write_timeout:
            blocked, accepted = max(wait, 0.0), nbytes
        else:
            room_s = capacity_s - backlog + self.write_timeout
            room = math.floor(room_s * self.bytes_per_second + 1e-6) // self.sample_frame_bytes * self.sample_frame_bytes
            blocked, accepted = self.write_timeout, max(0, min(nbytes, room))
        self.playing_until = max(self.playing_until, now) + accepted / self.bytes_per_second
        return blocked, accepted


class SpeakerEmulator:
    """One emulated speaker. Use :func:`run_emulator`, or start :meth:`run` in a nursery.

    Everything observable is a plain attribute: ``requests_seen`` (every Request received, in
    order), ``responses_sent``, ``events_sent``, ``record_frames_sent``, ``play_frames`` (arrival
    times), ``play_writes`` (what reached the emulated ``aplay``), ``played_pcm``.
    """

    def __init__(self, url: str, *, serial: str = DEFAULT_SERIAL, model: str = DEFAULT_MODEL,
                 room: Any = None, babble_clips: Any = (),
                 version: str = proto.CLIENT_VERSION, auto_reconnect: bool = False,
                 connect_timeout: float | None = 10.0, retry_interval: float = CLIENT_RETRY_INTERVAL_S,
                 shell_outputs: Mapping[str, ShellOutput] | None = None,
                 play_queue_chunks: int = CLIENT_PLAY_QUEUE_CHUNKS,
                 play_write_timeout: float = CLIENT_PLAY_WRITE_TIMEOUT_S,
                 pipe_buffer_bytes: int = PIPE_BUFFER_BYTES,
                 max_message_size: int = CLIENT_MAX_MESSAGE_BYTES, keep_played_audio: bool = True,
                 source_address: str | None = None, fast_speed: float = FAST_SPEED) -> None:
        """``keep_played_audio=False`` counts played bytes without keeping them (long soak runs);
        ``fast_speed`` how many times real time ``stream_pcm(realtime=False)`` sends;
        ``source_address`` is the speaker's own address (many speakers from one machine); ``room``
        an :class:`bench.acoustics.EchoPath` (the microphone hears the playback; see the module
        docstring), ``babble_clips`` its babble noise's voices."""
        self.url = url
        self.source_address = source_address
        self.keep_played_audio = keep_played_audio
        self.serial = serial
        self.model = model
        self.version = version
        self.auto_reconnect = auto_reconnect
        self.connect_timeout = connect_timeout
        self.retry_interval = retry_interval
        self.shell_outputs = dict(fake_shell_outputs(model, serial) if shell_outputs is None else shell_outputs)
        self.play_queue_chunks = play_queue_chunks
        self.play_write_timeout = play_write_timeout
        self.pipe_buffer_bytes = pipe_buffer_bytes
        self.max_message_size = max_message_size
        if not fast_speed >= 1.0:
            raise ValueError(f"fast_speed must be at least 1 (times real time), not {fast_speed!r}")
        self.fast_speed = fast_speed

        self.requests_seen: list[Request] = []
        self.responses_sent: list[Response] = []
        self.events_sent: list[Event] = []
        self.record_frames_sent = 0
        self.record_bytes_sent = 0
        self.play_frames: list[PlayFrame] = []
        self.play_writes: list[PlayWrite] = []
        self.connections = 0
        self.media_state = PlayingState.IDLE
        self.volume: int | None = None  # set by the model's fixed volume script (proto.VOLUME_COMMANDS)
        self.record_config: AudioConfig | None = None
        self.play_config: AudioConfig | None = None

        self._played = bytearray()
        self.played_bytes = 0
        self._answered: list[Request] = []
        self._claimed: dict[str, int] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._session: trio.Nursery | None = None
        self._ws: WebSocketConnection | None = None
        self._closing = False
        self._reconnect_requested = False
        self._record_scope: trio.CancelScope | None = None
        self._record_generation = 0
        self._mic = bytearray()
        self._mic_taken = 0
        self._mic_burst = 0
        self._play_send: trio.MemorySendChannel[bytes] | None = None
        self._play_receive: trio.MemoryReceiveChannel[bytes] | None = None
        self._play_scope: trio.CancelScope | None = None
        self.room: Any = None
        if room is not None:
            from bench.acoustics import Room

            self.room = Room(room, babble_clips=babble_clips)
        self._record_t0 = 0.0  # trio time at which microphone sample 0 (room position 0) was captured
        #: ``(command, microphone samples sent when it arrived)`` for every request received.
        self.request_positions: list[tuple[str, int]] = []
        self.mic_samples_sent = 0

    # -- state -----------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def recording(self) -> bool:
        return self._record_scope is not None

    @property
    def playing(self) -> bool:
        """True between ``start_play`` and ``stop_play`` (the player accepts ``play`` frames)."""
        return self._play_send is not None

    @property
    def played_pcm(self) -> bytes:
        """Every byte written to the emulated ``aplay``, across players and connections."""
        return bytes(self._played)

    @property
    def play_frames_dropped(self) -> int:
        """``play`` frames that arrived with no player running (before ``start_play``)."""
        return sum(1 for frame in self.play_frames if not frame.accepted)

    @property
    def play_bytes_cut(self) -> int:
        """Bytes lost to the 100 ms write timeout because the server ran too far ahead."""
        return sum(write.offered - write.accepted for write in self.play_writes)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    # -- connection loop -------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying every ``retry_interval``), serve, and reconnect per ``auto_reconnect``.

        ``task_status.started()`` fires once the first connection is up.
        """
        failure: EmulatorError | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            started = False
            while not self._closing:
                try:
                    ws = await self._connect(nursery, None if started else self.connect_timeout)
                except EmulatorError as exc:
                    failure = exc  # raised outside the nursery, so callers see it unwrapped
                    break
                self._reconnect_requested = False
                if not started:
                    task_status.started()
                    started = True
                await self._serve(ws)
                if not self.auto_reconnect:
                    while not (self._reconnect_requested or self._closing):
                        await self._changed.wait()
            # No cancel here: the connection's own reader task must live to finish a close handshake.
        if failure is not None:
            raise failure

    async def _connect(self, nursery: trio.Nursery, give_up_after: float | None) -> WebSocketConnection:
        deadline = math.inf if give_up_after is None else trio.current_time() + give_up_after
        dial_errors = (OSError, HandshakeError, ConnectionClosed)
        while True:
            try:
                return await nursery.start(self._dial)
            except dial_errors as exc:
                failure: BaseException = exc
            except BaseExceptionGroup as group:  # a refused handshake (an HTTP 502 from a proxy, say)
                refused, rest = group.split(dial_errors)
                if rest is not None or refused is None:
                    raise
                failure = refused
            if trio.current_time() + self.retry_interval > deadline:
                raise EmulatorError(f"could not connect to {self.url}: {failure!r}") from failure
            await trio.sleep(self.retry_interval)

    async def _dial(self, task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED) -> None:
        """One connection attempt. trio-websocket's reader raises a refused handshake inside the nursery
        it runs in: a nursery of this attempt's own makes that an error of this call (as the Rust
        client's connect fails) instead of the speaker's end."""
        async with trio.open_nursery() as connection:
            if self.source_address is not None:
                ws = await connect_websocket_from(connection, self.url, self.source_address,
                                                  max_message_size=self.max_message_size)
            else:
                ws = await connect_websocket_url(connection, self.url, max_message_size=self.max_message_size)
            task_status.started(ws)

    async def _serve(self, ws: WebSocketConnection) -> None:
        self.connections += 1
        self._ws = ws
        self._notify()
        requests_in_flight = trio.Semaphore(CLIENT_REQUEST_CONCURRENCY)
        try:
            async with trio.open_nursery() as session:
                self._session = session
                try:
                    while True:
                        message = await ws.get_message()
                        if isinstance(message, str):
                            await self._on_text(ws, message, requests_in_flight)
                        else:
                            await self._on_binary(message)
                except ConnectionClosed:
                    pass
                session.cancel_scope.cancel()
        finally:
            self._stop_recorder()
            self._stop_player()
            self._session = None
            self._ws = None
            self._notify()
            with trio.move_on_after(2) as cleanup:
                cleanup.shield = True
                await ws.aclose()

    async def _on_text(self, ws: WebSocketConnection, text: str, in_flight: trio.Semaphore) -> None:
        try:
            message = proto.decode_text(text, max_bytes=self.max_message_size)
        except XiaoaiError:
            return  # the client drops what serde cannot parse
        if not isinstance(message, Request):
            return  # a Response matches none of the client's own calls; server Events are only printed
        self.requests_seen.append(message)
        self.request_positions.append((message.command, self.mic_samples_sent))
        await in_flight.acquire()
        assert self._session is not None
        self._session.start_soon(self._answer, ws, message, in_flight)

    async def _answer(self, ws: WebSocketConnection, request: Request, in_flight: trio.Semaphore) -> None:
        try:
            response = self._handle(request)
            try:
                await ws.send_message(proto.encode_text(response))
            except ConnectionClosed:
                return
            self.responses_sent.append(response)
            self._answered.append(request)
            self._notify()
        finally:
            in_flight.release()

    def _handle(self, request: Request) -> Response:
        """The client's command table (client.rs ``init``) and its answers."""
        command, payload = request.command, request.payload
        if command == "get_version":
            return Response(request.id, data=self.version)
        if command == "run_shell":
            if payload is None:
                return Response(request.id, code=-1, msg="empty command")
            if not isinstance(payload, str):
                return Response(request.id, code=-1, msg=_serde_not_a_string(payload))
            stdout, stderr, exit_code = self._fake_shell(payload)
            return Response(request.id, data={"stdout": stdout, "stderr": stderr, "exit_code": exit_code})
        if command in ("start_play", "start_recording"):
            config = AudioConfig.from_payload(payload) or proto.CLIENT_DEFAULT_AUDIO_CONFIG
            if command == "start_play":
                self._start_player(config)
            elif not self.recording:  # a running recorder keeps its config
                self._start_recorder(config)
        elif command == "stop_play":
            self._stop_player()
        elif command == "stop_recording":
            self._stop_recorder()
        else:
            return Response(request.id, code=-1, msg="command not found")
        return Response(request.id, code=0, msg="success")

    def _fake_shell(self, script: str) -> ShellOutput:
        key = script.strip()
        if key == proto.PLAYBACK_STATUS_COMMAND:
            status = {PlayingState.PLAYING: "1", PlayingState.PAUSED: "2"}.get(self.media_state, "0")
            return f"{status}\n", "", 0
        found = self.shell_outputs.get(key)
        if found is not None:
            return found
        template = proto.VOLUME_COMMANDS.get(self.model, proto.VOLUME_COMMANDS["default"])[0]
        volume = re.fullmatch(re.escape(template).replace("%d", "([0-9]{1,3})"), key)
        if volume is not None and int(volume[1]) <= 100:
            self.volume = int(volume[1])
            return "", "", 0
        return "", "/bin/sh: the emulator runs no scripts and has no fake output for this one\n", 127

    async def _on_binary(self, data: bytes) -> None:
        try:
            stream = proto.decode_binary(data, max_bytes=self.max_message_size)
        except XiaoaiError:
            return
        if stream.tag != proto.PLAY_TAG:
            return
        send = self._play_send
        self.play_frames.append(PlayFrame(trio.current_time(), len(stream.bytes), send is not None))
        if send is None:
            return
        try:
            await send.send(stream.bytes)  # blocks the reader while the 50-chunk queue is full
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the player stopped meanwhile

    # -- recorder --------------------------------------------------------------------------------------

    def _start_recorder(self, config: AudioConfig) -> None:
        assert self._session is not None and self._ws is not None
        scope = trio.CancelScope()
        self._record_scope = scope
        self.record_config = config
        self._session.start_soon(self._record, self._ws, config, scope)
        self._notify()

    def _stop_recorder(self) -> None:
        if self._record_scope is not None:
            self._record_scope.cancel()
            self._record_scope = None
            self._record_generation += 1
            self._mic.clear()
            self._notify()

    def stall_recorder(self) -> None:
        """Stop recording without a word, as the client does when ``arecord`` is silent for 500 ms."""
        self._stop_recorder()

    async def _record(self, ws: WebSocketConnection, config: AudioConfig, scope: trio.CancelScope) -> None:
        frame_bytes = config.frame_bytes
        period = config.buffer_size / max(config.sample_rate, 1)
        with scope:
            next_at = trio.current_time() + period
            if self.room is not None:  # the room's clock continues across recorder restarts
                self._record_t0 = next_at - period - self.room.position / max(config.sample_rate, 1)
            while True:
                if self._mic_burst and self._mic:
                    # Paced from the last frame, not against a schedule: a stall here (a loaded
                    # machine) is not made up in a burst, so the pace never exceeds fast_speed.
                    await trio.sleep(period / self.fast_speed)
                    next_at = trio.current_time() + period
                else:
                    await trio.sleep_until(next_at)
                    next_at += period
                taken = min(len(self._mic), frame_bytes)
                chunk = bytes(self._mic[:taken]) + bytes(frame_bytes - taken)
                del self._mic[:taken]
                if self.room is not None:
                    chunk = _mix_pcm(chunk, self.room.capture(frame_bytes // 2))
                try:
                    await ws.send_message(proto.encode_stream(Stream(proto.new_id(), proto.RECORD_TAG, chunk)))
                except ConnectionClosed:
                    return
                self._mic_taken += taken
                self.mic_samples_sent += frame_bytes // 2
                self.record_frames_sent += 1
                self.record_bytes_sent += frame_bytes
                self._notify()

    def user_onset(self) -> int:
        """The microphone position (samples sent) at which speech queued now starts to go out."""
        return self.mic_samples_sent + len(self._mic) // 2

    async def stream_pcm(self, pcm: bytes, realtime: bool = True) -> int:
        """Speak ``pcm`` (in the recording format, normally 16 kHz mono s16le) into the microphone.

        Returns once all of it went out in ``record`` frames, or when recording stopped first;
        the result is how many of its bytes were sent. ``realtime=False`` sends them
        ``fast_speed`` times faster than one per period, for fast tests (no real speaker does:
        its server's MAX_AUDIO_RATE must allow that pace).
        """
        if not self.recording:
            raise EmulatorError("the speaker is not recording (no start_recording yet)")
        generation = self._record_generation
        target = self._mic_taken + len(self._mic) + len(pcm)
        start = target - len(pcm)
        self._mic += pcm
        if not realtime:
            self._mic_burst += 1
        try:
            await self._wait_until(
                lambda: self._mic_taken >= target or self._record_generation != generation, math.inf)
        finally:
            if not realtime:
                self._mic_burst -= 1
        return max(0, min(len(pcm), self._mic_taken - start))

    # -- player ----------------------------------------------------------------------------------------

    def _start_player(self, config: AudioConfig) -> None:
        self._stop_player()  # a running player is stopped and started afresh with the new config
        assert self._session is not None
        send, receive = trio.open_memory_channel[bytes](self.play_queue_chunks)
        scope = trio.CancelScope()
        self._play_send, self._play_receive, self._play_scope = send, receive, scope
        self.play_config = config
        self._session.start_soon(self._drain, receive, config, scope)
        self._notify()

    def _stop_player(self) -> None:
        if self.room is not None and self._play_send is not None:
            # ``stop_play`` kills aplay with what it buffered: the room hears nothing more of it.
            rate = self.record_config.sample_rate if self.record_config else 16000
            self.room.stop_playback(round((trio.current_time() - self._record_t0) * rate))
        if self._play_send is not None:
            self._play_send.close()
        if self._play_receive is not None:
            self._play_receive.close()  # wakes a reader blocked on a full queue
        if self._play_scope is not None:
            self._play_scope.cancel()
        changed = self._play_send is not None
        self._play_send = self._play_receive = self._play_scope = None
        if changed:
            self._notify()

    async def _drain(self, receive: trio.MemoryReceiveChannel[bytes], config: AudioConfig,
                     scope: trio.CancelScope) -> None:
        pipe = PlaybackPipe(config, pipe_bytes=self.pipe_buffer_bytes, write_timeout=self.play_write_timeout)
        with scope:
            try:
                async for chunk in receive:
                    now = trio.current_time()
                    plays_from = max(pipe.playing_until, now)
                    blocked, accepted = pipe.write(now, len(chunk))
                    self.played_bytes += accepted
                    if self.keep_played_audio:
                        self._played += chunk[:accepted]
                    self.play_writes.append(PlayWrite(now, len(chunk), accepted, plays_from, pipe.playing_until))
                    if self.room is not None and accepted:
                        rate = self.record_config.sample_rate if self.record_config else 16000
                        self.room.play(chunk[:accepted], config.sample_rate,
                                       round((plays_from - self._record_t0) * rate))
                    self._notify()
                    if blocked > 0:
                        await trio.sleep(blocked)
            except trio.ClosedResourceError:
                pass

    def save_play(self, path: str | Path) -> None:
        """Write :attr:`played_pcm` as a WAV at the last player's sample rate (24 kHz if none)."""
        from voicegrow.audio import write_wav

        rate = self.play_config.sample_rate if self.play_config else 24000
        pcm = self._played[: len(self._played) // 2 * 2]
        write_wav(path, bytes(pcm), rate)

    # -- driving it from a test ----------------------------------------------------------------------

    async def wait_for_request(self, command: str, timeout: float = 5.0) -> Request:
        """The next not yet claimed ``command`` request, once the emulator has answered it.

        Requests that arrived before the call count, so the order of test steps does not race the
        server; each call claims one, so a second call waits for the second such request.
        """
        def ready() -> bool:
            return sum(1 for r in self._answered if r.command == command) > self._claimed.get(command, 0)

        await self._wait_until(ready, timeout)
        index = self._claimed.get(command, 0)
        self._claimed[command] = index + 1
        return [r for r in self._answered if r.command == command][index]

    async def wait_until_played(self, nbytes: int, timeout: float = 5.0) -> None:
        """Return once at least ``nbytes`` have been written to the emulated ``aplay``."""
        await self._wait_until(lambda: self.played_bytes >= nbytes, timeout)

    async def wait_until(self, predicate: Callable[[SpeakerEmulator], bool], timeout: float = 5.0) -> None:
        """Return once ``predicate(emulator)`` holds; it is re-checked after every state change."""
        await self._wait_until(lambda: predicate(self), timeout)

    async def send_event(self, event: str, data: Any = None) -> Event:
        ws = self._ws
        if ws is None:
            raise EmulatorError("not connected")
        message = Event(proto.new_id(), event, data)
        await ws.send_message(proto.encode_text(message))
        self.events_sent.append(message)
        return message

    async def send_kws(self, keyword: str | None = "小爱同学") -> Event:
        """A wake word from open-xiaoai-kws; ``None`` sends ``"Started"`` (the engine came up)."""
        return await self.send_event("kws", "Started" if keyword is None else {"Keyword": keyword})

    async def send_playing(self, state: PlayingState | str) -> Event:
        """A change of the built-in player's state (also what ``mphelper mute_stat`` reports)."""
        self.media_state = PlayingState(state)
        return await self.send_event("playing", self.media_state.value)

    async def send_instruction(self, line: str | Mapping[str, Any] | None) -> Event:
        """A new ``instruction.log`` line (a dict is written as compact JSON); None means NewFile."""
        if line is None:
            return await self.send_event("instruction", "NewFile")
        if not isinstance(line, str):
            line = json.dumps(line, ensure_ascii=False, separators=(",", ":"))
        return await self.send_event("instruction", {"NewLine": line})

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Drop the connection from the speaker's side (it reconnects at once if ``auto_reconnect``)."""
        ws = self._ws
        if ws is None:
            return
        await ws.aclose()
        await self._wait_until(lambda: self._ws is not ws, timeout)

    async def reconnect(self, timeout: float = 10.0) -> None:
        """Disconnect if connected, then connect again; returns once the new connection is up."""
        before = self.connections
        self._reconnect_requested = True
        self._notify()
        await self.disconnect(timeout)
        await self._wait_until(lambda: self.connections > before and self._ws is not None, timeout)

    async def aclose(self) -> None:
        self._closing = True
        self._notify()
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(2) as cleanup:
                cleanup.shield = True
                await ws.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def summary(self) -> dict[str, Any]:
        """Counts for a bench report or the command line."""
        rate = self.play_config.bytes_per_second if self.play_config else 48000
        return {
            "connections": self.connections,
            "requests": [r.command for r in self.requests_seen],
            "record_frames_sent": self.record_frames_sent,
            "record_bytes_sent": self.record_bytes_sent,
            "events_sent": [e.event for e in self.events_sent],
            "play_frames_received": len(self.play_frames),
            "play_frames_dropped_before_start_play": self.play_frames_dropped,
            "played_bytes": self.played_bytes,
            "played_seconds": round(self.played_bytes / rate, 3),
            "play_bytes_cut_by_write_timeout": self.play_bytes_cut,
        }


def _mix_pcm(a: bytes, b: bytes) -> bytes:
    """Two s16le signals of one length summed, clipped rather than wrapped."""
    import numpy as np

    mixed = np.frombuffer(a, dtype="<i2").astype(np.int32) + np.frombuffer(b, dtype="<i2")
    return np.clip(mixed, -32768, 32767).astype("<i2").tobytes()


def run_emulator(url: str, **options: Any) -> AbstractAsyncContextManager[SpeakerEmulator]:
    """A connected :class:`SpeakerEmulator` for the body of the block (options as its constructor's)."""
    return running(SpeakerEmulator(url, **options))


# -- command line -----------------------------------------------------------------------------------------


def _load_pcm16k(path: str) -> bytes:
    from voicegrow.audio import read_wav, resample

    samples, rate = read_wav(path)
    if rate != 16000:
        samples = resample(samples, rate, 16000)
    return samples.astype("<i2").tobytes()


async def _run_cli(args: argparse.Namespace) -> dict[str, Any]:
    pcm = _load_pcm16k(args.wav) if args.wav else b""
    duration = args.duration if args.duration is not None else (len(pcm) / 32000 + 10 if pcm else 30.0)
    async with run_emulator(args.url, serial=args.serial, model=args.model, auto_reconnect=args.reconnect,
                            connect_timeout=None) as emulator:
        with trio.move_on_after(duration):
            await emulator.wait_for_request("start_recording", timeout=math.inf)
            if args.kws:
                await emulator.send_kws(args.kws)
            if pcm:
                await emulator.stream_pcm(pcm)
            await trio.sleep_forever()
        if args.save_play:
            emulator.save_play(args.save_play)
        return emulator.summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.xiaoai_emulator", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="server URL as the speaker's server.txt has it, ws://HOST:4399")
    parser.add_argument("--wav", help="speech to stream once recording starts (resampled to 16 kHz mono)")
    parser.add_argument("--save-play", help="write the audio the server played to this WAV")
    parser.add_argument("--kws", help="send this custom wake word as a kws event before the speech")
    parser.add_argument("--serial", default=DEFAULT_SERIAL)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--duration", type=float, help="seconds to stay connected (default: speech + 10 s, or 30 s)")
    parser.add_argument("--reconnect", action="store_true", help="reconnect after a disconnect, as the client does")
    return run_cli("xiaoai_emulator", _run_cli, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
