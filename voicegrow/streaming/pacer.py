"""Real-time pacing of reply audio.

Audio goes to the device only slightly ahead of the moment it will be played (``lead_s``), never in
one burst: a barge-in then leaves at most ``lead_s`` of stale audio in the device's buffer, and we know
when the last sample has actually been heard, so "TTS stopped" is not announced while the speaker is
still talking (the classic "last words cut" bug).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["AudioPacer"]


class AudioPacer:
    """Sends PCM s16le mono in chunks of ``chunk_ms``, holding the stream ``lead_s`` ahead of playback.

    The playback clock starts with the first chunk. If the producer falls behind (TTS slower than real
    time), the clock restarts at the next chunk, as the device's buffer ran dry meanwhile.
    """

    def __init__(self, send: Callable[[bytes], Awaitable[None]], *, sample_rate: int, lead_s: float = 0.2,
                 chunk_ms: int = 40) -> None:
        self._send = send
        self.sample_rate = sample_rate
        self.lead_s = lead_s
        self._chunk_bytes = max(2, int(sample_rate * chunk_ms / 1000) * 2)
        self._pending = b""
        self._clock_start: float | None = None
        self._queued_s = 0.0  # seconds of audio sent since the clock started
        self.sent_s = 0.0  # seconds of audio sent in total
        self.first_sent_at: float | None = None
        self.last_sent_at: float | None = None
        #: While ``send`` runs: when the device should start playing the chunk being sent (the echo
        #: canceller's reference is placed there).
        self.plays_at = 0.0

    def _playhead(self, now: float) -> float:
        return 0.0 if self._clock_start is None else now - self._clock_start

    async def feed(self, pcm: bytes) -> None:
        """Queue ``pcm`` and send every whole chunk, waiting as pacing demands."""
        self._pending += pcm
        while len(self._pending) >= self._chunk_bytes:
            chunk, self._pending = self._pending[:self._chunk_bytes], self._pending[self._chunk_bytes:]
            await self._send_paced(chunk)

    async def flush(self) -> None:
        """Send what is left (an even number of bytes)."""
        if len(self._pending) >= 2:
            chunk, self._pending = self._pending[: len(self._pending) // 2 * 2], b""
            await self._send_paced(chunk)

    async def _send_paced(self, chunk: bytes) -> None:
        now = trio.current_time()
        if self._clock_start is None or self._playhead(now) > self._queued_s:
            # First chunk, or an underrun: the device has played everything; restart the clock.
            self._clock_start, self._queued_s = now, 0.0
        ahead = self._queued_s - self._playhead(now)
        if ahead > self.lead_s:
            await trio.sleep(ahead - self.lead_s)
        self.plays_at = self._clock_start + self._queued_s
        await self._send(chunk)
        duration = len(chunk) / 2 / self.sample_rate
        self._queued_s += duration
        self.sent_s += duration
        self.last_sent_at = trio.current_time()
        if self.first_sent_at is None:
            self.first_sent_at = self.last_sent_at

    def remaining_playback_s(self) -> float:
        """Seconds until the device has played everything sent so far."""
        if self._clock_start is None:
            return 0.0
        return max(0.0, self._queued_s - self._playhead(trio.current_time()))

    async def wait_played(self) -> None:
        await trio.sleep(self.remaining_playback_s())
