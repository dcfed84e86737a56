"""A native-protocol speaker in a room: its microphone hears its own playback (bench/acoustics.py).

The microphone streams 20 ms AUDIO frames in real time, paced against the trio clock; each frame is
what the :class:`~bench.acoustics.Room` hears: the echo of the reply the device is playing, the
room's noise, and the user when :meth:`NativeRoomSpeaker.talk` mixes a clip in. Reply audio plays
as a device's jitter buffer would: each frame from when it arrives or when the previous one ends,
whichever is later; ``tts_stop`` with reason ``aborted`` flushes it (the device stops playing, and
the room hears nothing more of it).

Everything the tests and ``python -m bench echo`` read is in microphone samples
(:attr:`NativeRoomSpeaker.events` carries the position each server event arrived at), so latencies
come from the audio stream, not from a loaded machine's wall clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import trio

from bench.acoustics import EchoPath, Room
from voicegrow.client import open_native_client
from voicegrow.protocol import native as wire

__all__ = ["NativeRoomSpeaker", "SpeakerEvent", "open_room_speaker"]

MIC_RATE = 16000
FRAME_SAMPLES = 320  # 20 ms


@dataclasses.dataclass(frozen=True)
class SpeakerEvent:
    """A control event from the server and the microphone position (samples sent) when it arrived."""

    position: int
    event: str
    turn_id: int
    data: dict[str, Any]


class NativeRoomSpeaker:
    def __init__(self, client: Any, room: Room, *, output_rate: int) -> None:
        self.client = client
        self.room = room
        self.output_rate = output_rate
        self.events: list[SpeakerEvent] = []
        self.mic_samples_sent = 0
        self.played_s: dict[int, float] = {}  # reply audio played per turn (seconds)
        self._t0 = 0.0  # trio time of microphone sample 0
        self._playing_until = -1e9  # trio time the jitter buffer runs dry
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[NativeRoomSpeaker], bool], timeout: float) -> None:
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()

    def talk(self, pcm: bytes | np.ndarray, *, dbfs: float | None = None, lead_s: float = 0.04) -> int:
        """Mix a user's clip in from just ahead of the microphone's position; returns its first sample."""
        at = self.room.position + round(lead_s * MIC_RATE)
        self.room.add_talker(pcm, at, dbfs=dbfs, reverb=False)
        return at

    def events_named(self, name: str, turn_id: int | None = None) -> list[SpeakerEvent]:
        return [e for e in self.events if e.event == name and (turn_id is None or e.turn_id == turn_id)]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._microphone)
            await self._receive()
            nursery.cancel_scope.cancel()

    async def _microphone(self) -> None:
        self._t0 = trio.current_time()
        next_at = self._t0
        while True:
            next_at += FRAME_SAMPLES / MIC_RATE
            await trio.sleep_until(next_at)
            await self.client.send_audio(self.room.capture(FRAME_SAMPLES))
            self.mic_samples_sent += FRAME_SAMPLES
            self._notify()

    async def _receive(self) -> None:
        while True:
            frame = await self.client.next_frame()
            now = trio.current_time()
            if isinstance(frame, wire.Audio):
                plays_from = max(now, self._playing_until)
                self._playing_until = plays_from + len(frame.pcm) / 2 / self.output_rate
                self.room.play(frame.pcm, self.output_rate, round((plays_from - self._t0) * MIC_RATE))
                self.played_s[frame.turn_id] = self.played_s.get(frame.turn_id, 0.0) + len(frame.pcm) / 2 / self.output_rate
            elif isinstance(frame, wire.Control):
                self.events.append(SpeakerEvent(self.mic_samples_sent, frame.event, frame.turn_id, dict(frame.data)))
                if frame.event == "tts_stop" and frame.data.get("reason") == "aborted":
                    self._playing_until = now  # the device drops what it buffered: it is never heard
                    self.room.stop_playback(round((now - self._t0) * MIC_RATE))
            elif isinstance(frame, wire.Close):
                return
            self._notify()


@contextlib.asynccontextmanager
async def open_room_speaker(url: str, path: EchoPath, *, device_id: str = "room-speaker",
                            capabilities: dict[str, Any] | None = None, output_rate: int = 24000,
                            babble_clips: Any = ()) -> AsyncIterator[NativeRoomSpeaker]:
    """A connected :class:`NativeRoomSpeaker` streaming its room's microphone for the block."""
    async with open_native_client(url, device_id=device_id, audio_out=wire.AudioFormat(output_rate),
                                  capabilities=capabilities) as client:
        speaker = NativeRoomSpeaker(client, Room(path, babble_clips=babble_clips), output_rate=output_rate)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(speaker.run)
            try:
                yield speaker
            finally:
                nursery.cancel_scope.cancel()
