"""Microphone audio on its way in: one ingress every driver feeds, whatever its codec.

A driver decodes its wire into PCM (native AUDIO frames, open-xiaoai ``record`` streams, xiaozhi Opus
packets) and hands each frame to an :class:`AudioIngress` before the session core sees it. Here, once
for every protocol: the frame metric, whole samples only, ``MAX_AUDIO_RATE`` (a device may not send
faster than that many times real time, beyond a burst allowance for buffered starts), resampling to the
session core's rate, and the ingest lag. The driver only says how its own protocol refuses a device that
sends too fast.

Frame-ingest lag: device and server clocks share no origin, so the lag is measured against the best
case seen so far: for each frame, ``offset = processed_at - sent_at`` (``sent_at`` on the device's clock:
the frame's timestamp, or for devices that send none, the audio position of a real-time stream); the
lag is that offset minus the smallest offset of the stream. A server keeping up reports lags near zero;
one falling behind reports how far, which is what matters for barge-in and end-of-speech detection.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from voicegrow.audio import StreamResampler, to_mono_int16

__all__ = ["AudioIngress", "AudioTooFast", "IngestLagMeter"]

_U32 = 1 << 32


class IngestLagMeter:
    def __init__(self) -> None:
        self._best_offset = math.inf

    def observe(self, processed_at_s: float, sent_at_s: float) -> float:
        """Record one frame; returns its lag in seconds (0 for the best frame so far)."""
        offset = processed_at_s - sent_at_s
        if offset < self._best_offset:
            self._best_offset = offset
        return offset - self._best_offset


class AudioTooFast(Exception):
    """The device's audio arrives faster than ``MAX_AUDIO_RATE`` × real time (plus its burst)."""

    def __init__(self, max_audio_rate: float) -> None:
        super().__init__(f"audio arrives faster than {max_audio_rate:g}x real time (MAX_AUDIO_RATE)")
        self.max_audio_rate = max_audio_rate


class AudioIngress:
    """One device's microphone stream: s16le at ``bytes_per_s``, metrics labelled ``protocol``.

``channels`` > 1 (interleaved, as the native HELLO allows) is averaged to mono before anything else.

    With ``sample_rate`` (the device's) and ``core_rate`` (the session core's) both given and different,
    :meth:`admit` returns the audio resampled to ``core_rate``; the rate limit and the lag still count the
    device's own audio.

    :meth:`restart` begins a new stream (a recorder re-armed, a microphone reopened): the rate's clock
    and the lag's best case start again, since the pause before it was the device's, not lag. The
    resampler's state carries on, as the VAD it feeds does.
    """

    def __init__(self, metrics: Any, protocol: str, *, bytes_per_s: int, max_audio_rate: float,
                 burst_s: float, sample_rate: int | None = None, core_rate: int | None = None,
                 channels: int = 1) -> None:
        self._frames = metrics.audio_frames_received.labels(protocol)
        self._rate_hits = metrics.limit_hits.labels("audio_rate")
        self._lag = metrics.ingest_lag.labels(protocol)
        self._bytes_per_s = bytes_per_s
        self._max_audio_rate = max_audio_rate
        self._burst_s = burst_s
        self._sample_bytes = 2 * channels  # one s16le sample of every channel
        self._channels = channels
        self._resampler = (StreamResampler(sample_rate, core_rate)
                           if sample_rate is not None and core_rate is not None and sample_rate != core_rate else None)
        self.restart()

    def restart(self) -> None:
        self._meter = IngestLagMeter()
        self._audio_s = 0.0  # seconds of audio received in this stream
        self._first_at: float | None = None  # when its first frame came (MAX_AUDIO_RATE's clock)
        self._last_timestamp_ms: int | None = None
        self._sent_at_s = 0.0  # the device's clock, unwrapped from its 32-bit milliseconds

    @property
    def audio_s(self) -> float:
        """Seconds of audio received in this stream: where a real-time device's clock stands."""
        return self._audio_s

    def admit(self, pcm: bytes, now: float) -> bytes:
        """Count one frame received at ``now`` and return its whole samples at the core's rate; raises
        :class:`AudioTooFast` (counted as a limit hit) when the stream has outrun ``MAX_AUDIO_RATE``."""
        self._frames.inc()
        if len(pcm) % self._sample_bytes:
            pcm = pcm[: len(pcm) // self._sample_bytes * self._sample_bytes]
        if self._first_at is None:
            self._first_at = now
        self._audio_s += len(pcm) / self._bytes_per_s
        if self._audio_s > (now - self._first_at) * self._max_audio_rate + self._burst_s:
            self._rate_hits.inc()
            raise AudioTooFast(self._max_audio_rate)
        if self._channels > 1:  # the core hears one microphone: interleaved channels averaged
            pcm = to_mono_int16(pcm, 2, self._channels).astype("<i2").tobytes()
        if self._resampler is not None:
            samples = self._resampler.process(np.frombuffer(pcm, dtype="<i2"))
            pcm = np.asarray(samples, dtype="<i2").tobytes()
        return pcm

    def observe_lag(self, processed_at: float, device_timestamp_ms: int | None = None) -> None:
        """The frame admitted last was processed at ``processed_at``. A device that stamps its frames
        (``device_timestamp_ms``, 32-bit, wrapping) is measured by its clock, another by the audio
        position, as a real-time stream's clock."""
        if device_timestamp_ms is None:
            sent_at = self._audio_s
        else:
            if self._last_timestamp_ms is not None:
                self._sent_at_s += ((device_timestamp_ms - self._last_timestamp_ms) % _U32) / 1000
            self._last_timestamp_ms = device_timestamp_ms
            sent_at = self._sent_at_s
        self._lag.observe(self._meter.observe(processed_at, sent_at))
