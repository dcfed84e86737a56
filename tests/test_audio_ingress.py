"""The one audio ingress every driver feeds (``streaming/ingest.py``), without sockets or a clock.

The drivers' own tests (``test_limits.py``, the session tests) show it wired in; these pin its rules:
``MAX_AUDIO_RATE`` with its burst allowance, a new stream's fresh clock, whole samples, and the lag
by the device's 32-bit timestamps or by the audio position.
"""

from __future__ import annotations

import numpy as np
import pytest

from voicegrow.metrics import Metrics
from voicegrow.streaming.ingest import AudioIngress, AudioTooFast

RATE = 16000
FRAME_90_MS = bytes(2 * RATE * 90 // 1000)  # an open-xiaoai record frame


def _ingress(metrics: Metrics, *, max_audio_rate: float = 2.0, burst_s: float = 5.0) -> AudioIngress:
    return AudioIngress(metrics, "xiaoai", bytes_per_s=2 * RATE, max_audio_rate=max_audio_rate, burst_s=burst_s)


def _value(metric, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


def test_a_real_time_stream_with_a_start_up_burst_is_never_limited() -> None:
    metrics = Metrics()
    ingress = _ingress(metrics, max_audio_rate=1.0)
    now = 0.0
    for _ in range(40):  # arecord's start: 3.6 s of buffered frames at once
        ingress.admit(FRAME_90_MS, now)
    for _ in range(10 * 60 * 1000 // 90):  # then ten minutes at its 90 ms cadence
        now += 0.09
        ingress.admit(FRAME_90_MS, now)
    assert _value(metrics.limit_hits, "audio_rate") == 0
    assert _value(metrics.audio_frames_received, "xiaoai") == 40 + 10 * 60 * 1000 // 90


def test_a_stream_faster_than_the_limit_is_refused_once_past_the_burst() -> None:
    metrics = Metrics()
    ingress = _ingress(metrics, max_audio_rate=2.0, burst_s=5.0)
    now, admitted = 0.0, 0
    with pytest.raises(AudioTooFast, match=r"faster than 2x real time \(MAX_AUDIO_RATE\)"):
        while True:  # three times real time
            ingress.admit(FRAME_90_MS, now)
            admitted += 1
            now += 0.03
    # frame n (from 0) arrives at 0.03 n with 0.09 (n + 1) s received: over 2 x 0.03 n + 5 from n = 164
    assert admitted == 164
    assert _value(metrics.limit_hits, "audio_rate") == 1


def test_a_real_time_speaker_stalled_on_the_network_catches_up_and_one_far_faster_is_cut_off() -> None:
    """A speaker whose frames were held up (a loaded network or machine) sends what it buffered at once
    when the link recovers: still a real-time stream. One sending 200 times real time (what the open-xiaoai
    emulator's fast mode did, frames back to back) is cut off even at MAX_AUDIO_RATE=100."""
    metrics = Metrics()
    ingress = _ingress(metrics, max_audio_rate=1.0)
    now = 0.0
    for _ in range(100):
        ingress.admit(FRAME_90_MS, now)
        now += 0.09
    for stall_s in (3.0, 4.5, 1.0):  # nothing arrives for stall_s; then all of it, in one burst
        now += stall_s
        for _ in range(round(stall_s / 0.09)):
            ingress.admit(FRAME_90_MS, now)
        for _ in range(20):
            ingress.admit(FRAME_90_MS, now)
            now += 0.09
    assert _value(metrics.limit_hits, "audio_rate") == 0

    flood, now = _ingress(metrics, max_audio_rate=100.0), 0.0
    with pytest.raises(AudioTooFast):
        for _ in range(1000):  # 90 s of audio
            flood.admit(FRAME_90_MS, now)
            now += 0.09 / 200
    assert _value(metrics.limit_hits, "audio_rate") == 1


def test_a_restarted_stream_starts_its_clock_again() -> None:
    ingress = _ingress(Metrics(), max_audio_rate=1.0, burst_s=1.0)
    for _ in range(10):
        ingress.admit(FRAME_90_MS, 0.0)  # 0.9 s at once: inside the burst
    ingress.restart()
    assert ingress.audio_s == 0.0
    for _ in range(10):
        ingress.admit(FRAME_90_MS, 100.0)  # the same again on the new stream's clock
    with pytest.raises(AudioTooFast):
        for _ in range(3):
            ingress.admit(FRAME_90_MS, 100.0)


def test_only_whole_samples_go_in() -> None:
    ingress = _ingress(Metrics())
    assert ingress.admit(b"\x01\x02\x03", 0.0) == b"\x01\x02"
    assert ingress.audio_s == pytest.approx(1 / RATE)


def test_the_lag_follows_the_devices_wrapping_timestamps() -> None:
    metrics = Metrics()
    ingress = AudioIngress(metrics, "native", bytes_per_s=2 * RATE, max_audio_rate=10.0, burst_s=3.0)
    frame = bytes(2 * RATE // 50)  # 20 ms
    start = (1 << 32) - 40  # the device's millisecond clock wraps after the second frame
    for i, processed_at in enumerate([10.0, 10.02, 10.04, 10.56]):  # the last one 500 ms late
        ingress.admit(frame, processed_at)
        ingress.observe_lag(processed_at, (start + 20 * i) % (1 << 32))
    histogram = metrics.ingest_lag.labels("native")
    assert histogram._sum.get() == pytest.approx(0.5)


def test_without_timestamps_the_lag_is_measured_by_the_audio_position() -> None:
    metrics = Metrics()
    ingress = _ingress(metrics)
    for processed_at in [0.0, 0.09, 0.18, 0.47]:  # the fourth frame 200 ms late
        ingress.admit(FRAME_90_MS, processed_at)
        ingress.observe_lag(processed_at)
    assert metrics.ingest_lag.labels("xiaoai")._sum.get() == pytest.approx(0.2)


def test_a_device_at_another_rate_comes_out_at_the_cores_rate_and_is_limited_by_its_own_seconds() -> None:
    """A 48 kHz microphone: the core gets 16 kHz audio of the same tone, and MAX_AUDIO_RATE counts the
    device's seconds (one second of 48 kHz audio is one second, not three)."""
    metrics = Metrics()
    device_rate = 48000
    ingress = AudioIngress(metrics, "native", bytes_per_s=2 * device_rate, max_audio_rate=1.0, burst_s=0.5,
                           sample_rate=device_rate, core_rate=RATE)
    t = np.arange(device_rate) / device_rate
    tone = (8000 * np.sin(2 * np.pi * 1000 * t)).astype("<i2").tobytes()
    out = b"".join(ingress.admit(tone[i:i + 1920], now=i / (2 * device_rate)) for i in range(0, len(tone), 1920))
    samples = np.frombuffer(out, dtype="<i2")
    assert RATE - 100 <= len(samples) <= RATE  # less only the filter's half length still held back
    assert ingress.audio_s == pytest.approx(1.0)
    spectrum = np.abs(np.fft.rfft(samples[1000:1000 + RATE // 2]))
    assert np.argmax(spectrum) * RATE / (RATE // 2) == pytest.approx(1000, abs=4)
    assert _value(metrics.limit_hits, "audio_rate") == 0


def test_a_device_at_the_cores_rate_passes_through_unchanged() -> None:
    ingress = AudioIngress(Metrics(), "xiaozhi", bytes_per_s=2 * RATE, max_audio_rate=2.0, burst_s=5.0,
                           sample_rate=RATE, core_rate=RATE)
    pcm = np.arange(-800, 800, dtype="<i2").tobytes()
    assert ingress.admit(pcm, 0.0) == pcm


def test_interleaved_channels_are_averaged_to_one_microphone_and_counted_as_device_seconds() -> None:
    metrics = Metrics()
    ingress = AudioIngress(metrics, "native", bytes_per_s=4 * RATE, max_audio_rate=1.0, burst_s=1.0, channels=2)
    left = np.arange(-800, 800, dtype="<i2")
    right = np.full(1600, 1000, dtype="<i2")
    frame = np.stack([left, right], axis=1).astype("<i2").tobytes()
    out = np.frombuffer(ingress.admit(frame + b"\x01\x02\x03", 0.0), dtype="<i2")  # a torn sample frame
    assert np.array_equal(out, ((left.astype(np.int32) + right) / 2).round().astype(np.int16))
    assert ingress.audio_s == pytest.approx(0.1)  # 1600 stereo samples at 16 kHz
