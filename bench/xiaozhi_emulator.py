"""A xiaozhi-esp32 board without the board: the firmware's wire behaviour, for tests and bench runs.

It does what ``main/protocols/websocket_protocol.cc`` and ``main/application.cc`` do (details and
source lines in docs/xiaozhi.md): connects with ``Authorization``, ``Protocol-Version``,
``Device-Id`` and ``Client-Id`` headers, sends ``hello`` and gives up unless the server's arrives
within 10 s, sends ``listen`` / ``abort`` messages, streams 60 ms Opus packets at 16 kHz paced
against a monotonic clock (framed for protocol version 1, 2 or 3), and plays server packets only
between ``tts start`` and ``tts stop``, decoding them at the rate the server's hello announced. The
decode queue holds 40 packets and drains at the playback rate; a packet arriving when it is full is
dropped, as ``AudioService::PushPacketToDecodeQueue`` does. It is also an MCP server with a couple
of tools (``self.get_device_status``, ``self.audio_speaker.set_volume``), like the firmware's.

Command line::

    python -m bench.xiaozhi_emulator --url ws://127.0.0.1:4399/xiaozhi/v1/ --wav clip.wav --save-play reply.wav
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, connect_websocket_url

from bench.emulator import EmulatorError, run_cli, running
from voicegrow.opus import OpusDecoder, OpusEncoder, OpusError
from voicegrow.protocol import xiaozhi as wire

__all__ = ["DEFAULT_DEVICE_ID", "EmulatorError", "FAST_SPEED", "ReceivedMessage", "XiaozhiEmulator", "default_tools",
           "main", "run_xiaozhi_emulator"]

DEFAULT_DEVICE_ID = "a0:85:e3:00:00:01"
DEFAULT_CLIENT_ID = "b7f0c1a2-3d4e-4f50-8a6b-7c8d9e0f1a2b"
UPLINK_RATE = 16000  # AudioService: the encoder always runs at 16 kHz
#: How many times real time ``stream_pcm(realtime=False)`` sends (as the open-xiaoai emulator's fast
#: mode): a definite pace a test's MAX_AUDIO_RATE can be set above, not whatever the machine allows.
FAST_SPEED = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class ReceivedMessage:
    at: float
    message: wire.ServerMessage


@dataclasses.dataclass
class EmulatedTool:
    name: str
    description: str
    input_schema: dict[str, Any]
    run: Callable[[dict[str, Any]], Any]


def default_tools(state: dict[str, Any]) -> list[EmulatedTool]:
    """Two of the firmware's common tools (``McpServer::AddCommonTools``), acting on ``state``."""
    def status(_: dict[str, Any]) -> Any:
        return json.dumps({"audio_speaker": {"volume": state["volume"]}, "network": {"type": "wifi"}})

    def set_volume(arguments: dict[str, Any]) -> Any:
        volume = arguments.get("volume")
        if isinstance(volume, bool) or not isinstance(volume, int) or not 0 <= volume <= 100:
            raise ValueError("volume must be an integer from 0 to 100")
        state["volume"] = volume
        return True

    return [
        EmulatedTool("self.get_device_status", "Provides the real-time information of the device.",
                     {"type": "object", "properties": {}}, status),
        EmulatedTool("self.audio_speaker.set_volume", "Set the volume of the audio speaker.",
                     {"type": "object", "properties": {"volume": {"type": "integer", "minimum": 0, "maximum": 100}},
                      "required": ["volume"]}, set_volume),
    ]


class XiaozhiEmulator:
    def __init__(self, url: str, *, device_id: str = DEFAULT_DEVICE_ID, client_id: str = DEFAULT_CLIENT_ID,
                 token: str = "", version: int = 1, mcp: bool = True, hello_timeout: float = wire.HELLO_TIMEOUT_S,
                 tools_page_size: int = 1, keep_played_audio: bool = True, live_mic: bool = True,
                 fast_speed: float = FAST_SPEED) -> None:
        if not fast_speed >= 1.0:
            raise ValueError(f"fast_speed must be at least 1 (times real time), not {fast_speed!r}")
        self.fast_speed = fast_speed
        self.url = url
        self.device_id = device_id
        self.client_id = client_id
        self.token = token
        self.version = version
        self.mcp = mcp
        self.hello_timeout = hello_timeout
        self.tools_page_size = tools_page_size
        self.keep_played_audio = keep_played_audio
        self.live_mic = live_mic  # silence between what it is told to say, as a real microphone
        self.mode = "auto"
        self.listening = False
        self._say = bytearray()
        self._burst = False
        self.state: dict[str, Any] = {"volume": 70}
        self.tools = default_tools(self.state)
        self.tool_calls: list[tuple[str, dict[str, Any]]] = []
        self.mcp_requests: list[dict[str, Any]] = []
        self.messages: list[ReceivedMessage] = []
        self.errors: list[dict[str, Any]] = []  # the server's ``error`` messages (not a firmware type)
        self.session_id = ""
        self.server_audio = wire.AudioParams(sample_rate=24000)
        self.speaking = False
        self.packets_received = 0
        self.packets_dropped_not_speaking = 0
        self.packets_dropped_queue_full = 0
        self.packets_played = 0
        self.played_pcm = bytearray()
        self.played_bytes = 0
        self.first_packet_at: float | None = None  # first packet accepted into the decode queue in a reply
        self.opus_errors = 0
        self.packets_sent = 0
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._ws: WebSocketConnection | None = None
        self._decoder: OpusDecoder | None = None
        self._encoder = OpusEncoder(UPLINK_RATE, frame_ms=wire.FRAME_DURATION_MS)
        self._queue_until = 0.0  # when the decode queue will have played everything accepted so far
        self._changed = trio.Event()
        self._sent_ms = 0

    # -- connection

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [(b"Protocol-Version", str(self.version).encode()), (b"Device-Id", self.device_id.encode()),
                   (b"Client-Id", self.client_id.encode())]
        if self.token:
            token = self.token if " " in self.token else f"Bearer {self.token}"
            headers.insert(0, (b"Authorization", token.encode()))
        return headers

    def hello_message(self) -> wire.Hello:
        features = {"mcp": True} if self.mcp else {}
        return wire.Hello(version=self.version, features=features,
                          audio_params=wire.AudioParams(sample_rate=UPLINK_RATE, frame_duration=wire.FRAME_DURATION_MS))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, say hello, wait for the server's; ``task_status.started()`` once the channel is open."""
        failure: EmulatorError | None = None
        async with trio.open_nursery() as nursery:
            try:
                ws = await connect_websocket_url(nursery, self.url, extra_headers=self.headers(),
                                                 max_message_size=1 << 20)
            except (OSError, HandshakeError, ConnectionClosed) as exc:
                failure = EmulatorError(f"could not connect to {self.url}: {exc!r}")
            else:
                self._ws = ws
                await ws.send_message(wire.encode_text(self.hello_message()))
                hello_seen = trio.Event()
                nursery.start_soon(self._reader, ws, hello_seen)
                with trio.move_on_after(self.hello_timeout):
                    while not hello_seen.is_set() and self._ws is not None:
                        await self._changed.wait()
                if hello_seen.is_set():
                    nursery.start_soon(self._microphone)
                    task_status.started()
                else:
                    failure = EmulatorError(f"no server hello (closed with {self.close_code} {self.close_reason})"
                                            if self._ws is None else "no server hello within the board's timeout")
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure  # outside the nursery, so callers see it unwrapped

    async def _reader(self, ws: WebSocketConnection, hello_seen: trio.Event) -> None:
        try:
            while True:
                message = await ws.get_message()
                if isinstance(message, str):
                    await self._on_text(message, hello_seen)
                else:
                    self._on_binary(message)
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
            self.close_reason = exc.reason.reason if exc.reason else None
        finally:
            self._ws = None
            self._notify()

    async def _on_text(self, text: str, hello_seen: trio.Event) -> None:
        now = trio.current_time()
        try:
            message = wire.decode_server_text(text)
        except wire.XiaozhiError:
            raw = json.loads(text) if text.startswith("{") else {}
            if isinstance(raw, dict) and raw.get("type") == "error":
                self.errors.append(raw)  # the firmware would log "Unknown message type" and go on
                self._notify()
            return
        if isinstance(message, wire.ServerHello):
            if message.transport == "websocket":
                self.session_id = message.session_id
                self.server_audio = message.audio_params
                self._decoder = OpusDecoder(message.audio_params.sample_rate)
                hello_seen.set()
        elif isinstance(message, wire.Tts):
            if message.state == "start":
                self.speaking = True
                self.first_packet_at = None
            elif message.state == "stop":
                # Speaking -> Listening (auto, realtime) sends listen start again, before the microphone
                # reopens (the flag below reopens it); manual -> Idle.
                if self.listening and self.mode != "manual":
                    await self.send(wire.Listen(state="start", mode=self.mode, session_id=self.session_id))
                elif self.mode == "manual":
                    self.listening = False
                self.speaking = False
        elif isinstance(message, wire.Mcp):
            await self._on_mcp(message.payload)
        self.messages.append(ReceivedMessage(now, message))
        self._notify()

    def _on_binary(self, data: bytes) -> None:
        self.packets_received += 1
        if not self.speaking:  # OnIncomingAudio pushes packets only in the speaking state
            self.packets_dropped_not_speaking += 1
            return
        now = trio.current_time()
        frame_s = self.server_audio.frame_duration / 1000
        queued = max(0.0, self._queue_until - now) / frame_s
        if queued >= wire.DEVICE_QUEUE_PACKETS:
            self.packets_dropped_queue_full += 1
            return
        try:
            frame = wire.decode_binary(data, self.version)
            assert self._decoder is not None
            pcm = self._decoder.decode(frame.payload)
        except (wire.XiaozhiError, OpusError):
            self.opus_errors += 1
            return
        self._queue_until = max(self._queue_until, now) + frame_s
        self.first_packet_at = now if self.first_packet_at is None else self.first_packet_at
        self.packets_played += 1
        self.played_bytes += len(pcm)
        if self.keep_played_audio:
            self.played_pcm += pcm
        self._notify()

    async def _on_mcp(self, payload: dict[str, Any]) -> None:
        self.mcp_requests.append(payload)
        method, call_id = payload.get("method"), payload.get("id")
        if call_id is None:
            return  # a notification
        params = payload.get("params") or {}
        if method == "initialize":
            result: dict[str, Any] = {"protocolVersion": "2024-11-05", "capabilities": {"tools": {}},
                                      "serverInfo": {"name": "bread-compact-wifi", "version": "2.0.0"}}
        elif method == "tools/list":
            start = int(params.get("cursor") or 0)
            page = self.tools[start: start + self.tools_page_size]
            nxt = start + self.tools_page_size
            result = {"tools": [{"name": t.name, "description": t.description, "inputSchema": t.input_schema}
                                for t in page]}
            if nxt < len(self.tools):
                result["nextCursor"] = str(nxt)
        elif method == "tools/call":  # McpServer::ReplyError answers failures with a message, no code
            name, arguments = params.get("name"), params.get("arguments") or {}
            tool = next((t for t in self.tools if t.name == name), None)
            if tool is None:
                await self._send_mcp({"jsonrpc": "2.0", "id": call_id, "error": {"message": f"Unknown tool: {name}"}})
                return
            self.tool_calls.append((name, arguments))
            try:
                value = tool.run(arguments)
            except ValueError as exc:
                await self._send_mcp({"jsonrpc": "2.0", "id": call_id, "error": {"message": str(exc)}})
                return
            text = value if isinstance(value, str) else json.dumps(value)
            result = {"content": [{"type": "text", "text": text}], "isError": False}
        else:
            await self._send_mcp({"jsonrpc": "2.0", "id": call_id,
                                  "error": {"message": f"Method not implemented: {method}"}})
            return
        await self._send_mcp({"jsonrpc": "2.0", "id": call_id, "result": result})

    async def _send_mcp(self, payload: dict[str, Any]) -> None:
        await self.send(wire.Mcp(payload=payload, session_id=self.session_id))

    # -- what the board does

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def send(self, message: wire.DeviceMessage) -> None:
        if self._ws is None:
            raise EmulatorError("not connected")
        await self._ws.send_message(wire.encode_text(message))

    async def send_raw(self, data: bytes | str) -> None:
        if self._ws is None:
            raise EmulatorError("not connected")
        await self._ws.send_message(data)

    async def listen_start(self, mode: str = "auto") -> None:
        """``SendStartListening``: the microphone opens (and streams until listen stop or tts start)."""
        self.mode, self.listening = mode, True
        await self.send(wire.Listen(state="start", mode=mode, session_id=self.session_id))
        self._notify()

    async def listen_stop(self) -> None:
        self.listening = False
        await self.send(wire.Listen(state="stop", session_id=self.session_id))
        self._notify()

    async def wake_word(self, text: str = "你好小智") -> None:
        await self.send(wire.Listen(state="detect", text=text, session_id=self.session_id))

    async def abort(self, reason: str | None = None) -> None:
        """``SendAbortSpeaking``: the board also stops playing at once."""
        self.speaking = False
        await self.send(wire.Abort(reason=reason, session_id=self.session_id))

    @property
    def mic_open(self) -> bool:
        """Listening, and not speaking unless in realtime mode (the firmware's AEC keeps the mic on)."""
        return self.listening and (self.mode == "realtime" or not self.speaking)

    async def stream_pcm(self, pcm: bytes, *, realtime: bool = True) -> int:
        """Say ``pcm`` (16 kHz) into the microphone: 60 ms Opus packets on the monotonic clock, or
        ``fast_speed`` times faster (``realtime=False``: the server's MAX_AUDIO_RATE must allow it). Returns when the last packet has gone; needs an open microphone."""
        if not self.mic_open:
            raise EmulatorError("the microphone is closed: listen start first (or the board is speaking)")
        frame_bytes = UPLINK_RATE * wire.FRAME_DURATION_MS // 1000 * 2
        self._say += pcm
        self._burst = not realtime
        self._notify()
        while self._say and self._ws is not None:
            await self._changed.wait()
        return -(-len(pcm) // frame_bytes)

    async def _microphone(self) -> None:
        """One packet per 60 ms while the mic is open: what it was told to say, else (live) silence."""
        frame_bytes = UPLINK_RATE * wire.FRAME_DURATION_MS // 1000 * 2
        tick_s = wire.FRAME_DURATION_MS / 1000
        next_at: float | None = None
        while self._ws is not None:
            if not self.mic_open or not (self._say or self.live_mic):
                next_at = None
                await self._changed.wait()
                continue
            if self._say:
                frame, self._say[:] = bytes(self._say[:frame_bytes]), self._say[frame_bytes:]
            else:
                frame = bytes(frame_bytes)
            burst = self._burst and len(self._say) > 0
            try:
                await self.send_opus(self._encoder.encode(frame))
            except (EmulatorError, ConnectionClosed):
                return
            if not self._say:
                self._notify()
            if burst:  # paced from the last packet: a stall is not made up in a faster burst
                next_at = None
                await trio.sleep(tick_s / self.fast_speed)
                continue
            now = trio.current_time()
            next_at = now + tick_s if next_at is None else next_at + tick_s
            await trio.sleep_until(next_at)

    async def send_opus(self, packet: bytes) -> None:
        if self._ws is None:
            raise EmulatorError("not connected")
        await self._ws.send_message(wire.encode_binary(packet, self.version, timestamp=self._sent_ms))
        self._sent_ms += wire.FRAME_DURATION_MS
        self.packets_sent += 1

    # -- observing

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[XiaozhiEmulator], bool], timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()

    def of_type(self, kind: type) -> list[Any]:
        return [m.message for m in self.messages if isinstance(m.message, kind)]

    def tts_states(self) -> list[str]:
        return [m.state for m in self.of_type(wire.Tts)]

    async def wait_for_tts(self, state: str, count: int = 1, timeout: float = 30.0) -> None:
        await self.wait_until(lambda e: e.tts_states().count(state) >= count, timeout)

    def save_play(self, path: str | Path) -> None:
        from voicegrow.audio import write_wav

        import numpy as np

        write_wav(path, np.frombuffer(bytes(self.played_pcm), dtype="<i2"), self.server_audio.sample_rate)

    async def aclose(self) -> None:
        ws = self._ws
        if ws is not None:
            with trio.move_on_after(2) as cleanup:
                cleanup.shield = True
                await ws.aclose()

    def summary(self) -> dict[str, Any]:
        rate = self.server_audio.sample_rate
        return {
            "session_id": self.session_id,
            "messages": [wire.encode_text(m.message)[:120] for m in self.messages if not isinstance(m.message, wire.Mcp)],
            "packets_sent": self.packets_sent,
            "packets_received": self.packets_received,
            "packets_played": self.packets_played,
            "packets_dropped_not_speaking": self.packets_dropped_not_speaking,
            "packets_dropped_queue_full": self.packets_dropped_queue_full,
            "played_seconds": round(self.played_bytes / 2 / rate, 3),
            "tool_calls": self.tool_calls,
        }


def run_xiaozhi_emulator(url: str, **options: Any) -> AbstractAsyncContextManager[XiaozhiEmulator]:
    """A board with an open audio channel for the body of the block (options as the constructor's)."""
    return running(XiaozhiEmulator(url, **options))


# -- command line -----------------------------------------------------------------------------------------


async def _run_cli(args: argparse.Namespace) -> dict[str, Any]:
    from bench.xiaoai_emulator import _load_pcm16k

    pcm = _load_pcm16k(args.wav) if args.wav else b""
    async with run_xiaozhi_emulator(args.url, token=args.token, version=args.version,
                                    device_id=args.device_id) as board:
        with trio.move_on_after(args.duration if args.duration is not None else len(pcm) / 32000 + 15):
            await board.listen_start(args.mode)
            await board.stream_pcm(pcm)
            if args.mode == "manual":
                await board.listen_stop()
            await board.wait_for_tts("stop", timeout=3600)
        if args.save_play:
            board.save_play(args.save_play)
        return board.summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.xiaozhi_emulator", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the board's websocket.url, ws://HOST:4399/xiaozhi/v1/")
    parser.add_argument("--wav", help="speech to stream after listen start (resampled to 16 kHz mono)")
    parser.add_argument("--save-play", help="write the audio the server played to this WAV")
    parser.add_argument("--token", default="", help="websocket.token (sent as Authorization: Bearer …)")
    parser.add_argument("--version", type=int, choices=wire.PROTOCOL_VERSIONS, default=1)
    parser.add_argument("--mode", choices=wire.LISTEN_MODES, default="auto")
    parser.add_argument("--device-id", default=DEFAULT_DEVICE_ID)
    parser.add_argument("--duration", type=float, help="seconds to stay connected (default: speech + 15 s)")
    return run_cli("xiaozhi_emulator", _run_cli, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
