"""The microphone front end of a speaker that hears itself: echo cancellation and noise suppression.

Xiaomi speakers under open-xiaoai and many ESP32 boards send their raw microphone, which hears the
reply they are playing. The server knows exactly what it sent and when it plays, so it cancels that
echo itself: WebRTC's audio processing module (AEC3 with its own delay estimator, noise suppression,
a high-pass filter), from the ``livekit`` wheel, fed the downlink audio as the far end.

One :class:`EchoCanceller` per session. Everything is positioned on the *microphone stream's*
timeline (seconds of 16 kHz audio since the stream began): :meth:`EchoCanceller.play` places reply
audio where the device plays it, :meth:`EchoCanceller.process` takes microphone audio in order and
returns it cleaned. The canceller also measures what the barge-in decision needs: whether playback
can be heard at the microphone now (:meth:`EchoCanceller.far_end_recent`), and how much of what the
microphone heard survived cancellation (:meth:`EchoCanceller.kept_db`) — little, when it was echo.

Why this library (measured with ``python -m bench echo``, README): it installs as a manylinux wheel,
finds a 100–400 ms echo path by itself, removed 40–50 dB of echo after its first two seconds with a
talker over it losing under 1 dB, and costs about 1–2 % of a core per session; Debian's speexdsp
(MDF) needs the delay given and a filter as long as the echo path, and removed far less.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

from voicegrow.audio import StreamResampler, as_int16

__all__ = ["EchoCanceller", "EchoUnavailable", "echo_cancellation_available"]

RATE = 16000
FRAME = RATE // 100  # the module works on 10 ms frames
#: After the last played sample reaches the microphone, the room still rings and the device's path
#: may be longer than we assumed: playback counts as audible for this long after its position.
ECHO_TAIL_S = 0.8
#: Playback placed within this much of where the previous chunk ended continues it (rounding of
#: the pacer's clock); a later chunk is a new stream (a next reply, a real underrun).
CONTIGUOUS_S = 0.02
#: Per-frame energies kept for the decision (the longest utterance span asked about).
_HISTORY_S = 20.0
#: The longest echo path expected (device buffer plus air, 100–400 ms, and a margin): this long after a
#: playout stream starts, its echo has reached the microphone if the microphone hears the device at all.
ECHO_PATH_MAX_S = 0.5
#: A playout stream's echo must have been loud this long before the canceller's measure of it counts.
_PROOF_LOUD_S = 0.3


def _loud_s(frames: list[tuple[int, float, float, list[int] | None]], floor: float) -> float:
    """Seconds of ``frames`` whose microphone energy is 10 dB over the room's noise ``floor``."""
    return sum(1 for frame in frames if frame[1] >= 10.0 * floor) * FRAME / RATE


class EchoUnavailable(RuntimeError):
    """The echo canceller's library is not installed or would not start."""


_apm_module: Any = None


def _rtc() -> Any:
    """``livekit.rtc``, imported once and only when a session needs it (it starts a native runtime)."""
    global _apm_module
    if _apm_module is None:
        try:
            from livekit import rtc
        except Exception as exc:  # noqa: BLE001 - any import failure means the same to the caller
            raise EchoUnavailable(f"the livekit package (WebRTC audio processing) is unavailable: {exc}") from exc
        _apm_module = rtc
    return _apm_module


def echo_cancellation_available() -> bool:
    try:
        _rtc()
    except EchoUnavailable:
        return False
    return True


class EchoCanceller:
    """WebRTC AEC + NS over one microphone stream, with the device's playback as the reference."""

    def __init__(self, *, noise_suppression: bool = True) -> None:
        rtc = _rtc()
        self._rtc = rtc
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True, noise_suppression=noise_suppression,
                                              high_pass_filter=True)
        self._pending = bytearray()  # microphone bytes short of a whole frame
        self._processed = 0  # microphone samples processed (the position of the next frame)
        # The far end, from _processed on: reference samples not yet matched with a microphone frame.
        self._reference = np.zeros(0, dtype=np.int16)
        self._last_reference_end = -math.inf  # mic position (samples) one past the last played sample
        self._resampler: StreamResampler | None = None
        self._play_rate = 0
        self._cursor: float | None = None  # where a contiguous playback continues (seconds)
        self._out_pos = 0  # where the next resampled reference sample goes (samples)
        #: Each playout stream's ``[start, end)`` (mic samples, in order): each start of playback after
        #: a gap is a new stream, and the device may start it with another latency than the last one.
        self._streams: collections.deque[list[int]] = collections.deque(maxlen=64)
        # (frame position, raw energy, clean energy, the audible playout stream or None)
        self._history: collections.deque[tuple[int, float, float, list[int] | None]] = collections.deque(
            maxlen=int(_HISTORY_S * 100))

    @property
    def position_s(self) -> float:
        """Seconds of microphone audio processed."""
        return self._processed / RATE

    # -- the far end ----------------------------------------------------------------------------------

    def play(self, pcm: bytes, rate: int, at_s: float) -> None:
        """The device plays ``pcm`` (s16 mono at ``rate``) from microphone-stream position ``at_s`` on.

        Consecutive chunks (each starting within :data:`CONTIGUOUS_S` of where the last ended) are
        one stream, placed end to end; a longer gap or another rate starts afresh at ``at_s``. A part that lies
        before the audio already processed is dropped: its echo went by uncancelled.
        """
        samples = as_int16(pcm)
        if samples.size == 0:
            return
        if self._cursor is None or rate != self._play_rate or abs(at_s - self._cursor) > CONTIGUOUS_S:
            self._play_rate = rate
            self._resampler = StreamResampler(rate, RATE) if rate != RATE else None
            self._out_pos = round(at_s * RATE)
            self._cursor = at_s
            if not self._streams or self._out_pos > self._streams[-1][0]:
                self._streams.append([self._out_pos, self._out_pos])
        self._cursor += samples.size / rate
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        start, self._out_pos = self._out_pos, self._out_pos + samples.size
        self._last_reference_end = max(self._last_reference_end, self._out_pos)
        if self._streams:
            self._streams[-1][1] = max(self._streams[-1][1], self._out_pos)
        if start < self._processed:
            samples = samples[self._processed - start:]
            start = self._processed
        if samples.size == 0:
            return
        offset = start - self._processed
        end = offset + samples.size
        if end > self._reference.size:
            self._reference = np.concatenate((self._reference, np.zeros(end - self._reference.size, dtype=np.int16)))
        mixed = self._reference[offset:end].astype(np.int32) + samples
        self._reference[offset:end] = np.clip(mixed, -32768, 32767)

    def stop(self, at_s: float) -> None:
        """The device stops playing at microphone-stream position ``at_s`` (an interrupted reply: it
        drops what it buffered). The reference placed from there on is taken back: the microphone
        will never hear it, and a far end that plays loud over a microphone without its echo makes
        AEC3's suppressor treat the user, who is talking just then, as echo (it cut syllables out of
        every barge-in on open-xiaoai, whose player is killed with its buffer)."""
        at = max(round(at_s * RATE), self._processed)
        keep = at - self._processed
        if keep < self._reference.size:
            self._reference = self._reference[:keep]
        self._last_reference_end = min(self._last_reference_end, at)
        for stream in self._streams:
            stream[1] = min(stream[1], at)
        self._cursor = None  # what plays next is a new stream

    def far_end_recent(self, tail_s: float = ECHO_TAIL_S) -> bool:
        """Playback can still be heard at the microphone position just processed (or the room rings)."""
        return self._processed < self._last_reference_end + tail_s * RATE

    # -- the microphone -----------------------------------------------------------------------------------

    def process(self, pcm: bytes) -> bytes:
        """Microphone s16le at 16 kHz in, cleaned audio out: whole 10 ms frames, the rest held back."""
        self._pending += pcm
        whole = len(self._pending) // (2 * FRAME) * (2 * FRAME)
        if not whole:
            return b""
        out = bytearray()
        rtc = self._rtc
        for offset in range(0, whole, 2 * FRAME):
            mic = bytearray(self._pending[offset: offset + 2 * FRAME])
            if self._reference.size >= FRAME:
                far, self._reference = self._reference[:FRAME], self._reference[FRAME:]
            else:
                far = np.zeros(FRAME, dtype=np.int16)
                far[: self._reference.size] = self._reference
                self._reference = np.zeros(0, dtype=np.int16)
            reverse = rtc.AudioFrame(bytearray(far.astype("<i2").tobytes()), RATE, 1, FRAME)
            self._apm.process_reverse_stream(reverse)
            raw = np.frombuffer(mic, dtype="<i2").astype(np.float64)
            frame = rtc.AudioFrame(mic, RATE, 1, FRAME)
            self._apm.process_stream(frame)
            clean_bytes = bytes(frame.data)
            clean = np.frombuffer(clean_bytes, dtype="<i2").astype(np.float64)
            self._history.append((self._processed, float(raw @ raw), float(clean @ clean), self._audible_stream()))
            self._processed += FRAME
            out += clean_bytes
        del self._pending[:whole]
        return bytes(out)

    def kept_db(self, since_s: float) -> float | None:
        """How much of the microphone's energy since ``since_s`` survived cancellation, in dB.

        Energy-weighted over the span: the loud frames decide. A user talking over the reply keeps
        most of it (−2 … −6 dB for a voice as loud as the echo); echo alone loses 15–50 dB. None when
        nothing was processed in the span.
        """
        return self._kept(since_s * RATE, math.inf, audible_only=False)[0]

    def proven_db(self, before_s: float, span_s: float = 1.5) -> tuple[float | None, float]:
        """What cancellation kept of the echo of the *current* playout stream in the ``span_s`` before
        ``before_s``: ``(kept dB or None, seconds of that stream's audible playback in the span)``.

        The canceller proves itself on the echo heard just before someone speaks, and on this
        playout's echo only: each start of playback (a reply, a restart after an underrun) reaches
        the device with its own latency (network, the device's buffer, a busy server), and WebRTC's
        AEC3 tracks a longer echo path at once but one shorter by even a few milliseconds only
        seconds later (``python -m bench echo --jitter-ms``): the previous reply's perfect
        cancellation says nothing about this one's. A canceller that has not converged keeps most
        of the echo, and then its measure of the speech means nothing. ``None`` while this stream's
        echo has not been loud for :data:`_PROOF_LOUD_S` yet.
        """
        start, end = (before_s - span_s) * RATE, before_s * RATE
        frames = [f for f in self._history if start <= f[0] < end and f[3] is not None]
        if not frames:
            return None, 0.0
        floor = self._noise_floor()
        if _loud_s(frames, floor) < _PROOF_LOUD_S:
            # Nothing above the room's noise while playback could be heard: this microphone does not
            # hear the device (a clean or echo-cancelled one), so there is nothing to cancel. That
            # needs playback whose echo would have arrived by then (the first moments of a stream
            # are quiet at every microphone, and so is the room after it).
            settled = sum(1 for f in frames if f[3][0] + ECHO_PATH_MAX_S * RATE <= f[0] < f[3][1]) * FRAME / RATE
            return (-math.inf if settled >= 0.5 else None), len(frames) * FRAME / RATE
        current = frames[-1][3]
        mine = [f for f in frames if f[3] is current]
        if _loud_s(mine, floor) < _PROOF_LOUD_S:
            return None, len(mine) * FRAME / RATE
        raw = sum(f[1] for f in mine)
        clean = sum(f[2] for f in mine)
        return 10.0 * math.log10(max(clean, 1e-9) / raw), len(mine) * FRAME / RATE

    def _audible_stream(self) -> list[int] | None:
        """The playout stream audible at the frame just processed, or None if none is."""
        if not self.far_end_recent():
            return None
        for stream in reversed(self._streams):
            if stream[0] <= self._processed:
                return stream
        return None

    def _noise_floor(self) -> float:
        """The room's noise: the quietest tenth of recent frames' energies."""
        energies = sorted(r for _, r, _, _ in self._history)
        return max(energies[len(energies) // 10], 1.0) if energies else 1.0

    def _kept(self, start: float, end: float, *, audible_only: bool) -> tuple[float | None, float]:
        raw = clean = 0.0
        frames = 0
        for position, r, c, audible in reversed(self._history):
            if position + FRAME <= start:
                break
            if position >= end or (audible_only and audible is None):
                continue
            raw += r
            clean += c
            frames += 1
        if raw <= 0.0:
            return None, frames * FRAME / RATE
        return 10.0 * math.log10(max(clean, 1e-9) / raw), frames * FRAME / RATE
