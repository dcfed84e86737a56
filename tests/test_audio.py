"""Tests for voicegrow.audio: WAV I/O, levels, and the resampler's quality and streaming behaviour."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest

from voicegrow.audio import (
    StreamResampler,
    WavFormatError,
    duration_s,
    float32_to_pcm,
    pcm_to_float32,
    read_wav,
    resample,
    rms_dbfs,
    silence,
    wav_bytes,
    write_wav,
)

RATE_PAIRS = [
    (16000, 24000), (24000, 16000), (16000, 22050), (22050, 16000),
    (48000, 16000), (16000, 48000), (24000, 22050), (22050, 48000),
]


def tone(freq: float, rate: int, seconds: float = 0.5, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return float32_to_pcm(amplitude * np.sin(2 * np.pi * freq * t))


def middle(samples: np.ndarray) -> np.ndarray:
    """The steady-state half of a clip, away from the filter's edge transients."""
    return samples[len(samples) // 4: 3 * len(samples) // 4]


def test_wav_round_trip_through_bytes_and_file(tmp_path: Path) -> None:
    samples = tone(440, 16000, 0.1)
    data = wav_bytes(samples, 16000)
    decoded, rate = read_wav(data)
    assert rate == 16000
    assert np.array_equal(decoded, samples)

    path = tmp_path / "clip.wav"
    write_wav(path, samples.tobytes(), 16000)
    decoded, rate = read_wav(path)
    assert rate == 16000 and np.array_equal(decoded, samples)


def test_read_wav_mixes_stereo_to_mono() -> None:
    left = np.array([1000, -2000, 3001, 0], dtype=np.int16)
    right = np.array([3000, 2000, 3000, -1], dtype=np.int16)
    stereo = np.stack([left, right], axis=1).reshape(-1)
    mono, rate = read_wav(wav_bytes(stereo, 8000, channels=2))
    assert rate == 8000
    assert mono.dtype == np.int16
    assert mono.tolist() == [2000, 0, 3000, 0]


def test_read_wav_rejects_other_sample_widths_and_garbage() -> None:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(8000)
        wav.writeframes(bytes(100))
    with pytest.raises(WavFormatError, match="16-bit"):
        read_wav(buffer.getvalue())
    with pytest.raises(WavFormatError) as info:
        read_wav(b"not a wav file at all")
    assert info.value.code == "wav_format"


def test_read_wav_reads_a_shared_fixture(audio_fixtures: Path, manifest: list[dict]) -> None:
    entry = manifest[0]
    samples, rate = read_wav(audio_fixtures / entry["file"])
    assert rate == entry["sample_rate"] == 16000
    assert len(samples) / rate == pytest.approx(entry["duration_s"], abs=0.01)


def test_float_conversion_round_trips_and_clips() -> None:
    samples = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    assert np.array_equal(float32_to_pcm(pcm_to_float32(samples)), samples)
    assert pcm_to_float32(samples.tobytes()).dtype == np.float32
    assert float32_to_pcm(np.array([2.0, -2.0])).tolist() == [32767, -32768]


def test_small_helpers() -> None:
    assert duration_s(32000, 16000) == 1.0
    assert silence(20, 16000) == bytes(640)
    assert rms_dbfs(silence(20, 16000)) == -120.0
    assert rms_dbfs(b"") == -120.0
    full_square = np.array([32767, -32768] * 100, dtype=np.int16)
    assert rms_dbfs(full_square) == pytest.approx(0.0, abs=0.01)
    assert rms_dbfs(tone(1000, 16000, amplitude=0.5)) == pytest.approx(-9.03, abs=0.05)
    with pytest.raises(ValueError):
        pcm_to_float32(b"\x00\x01\x02")


@pytest.mark.parametrize(("src", "dst"), RATE_PAIRS)
def test_resample_preserves_a_tone(src: int, dst: int) -> None:
    pcm = tone(1000, src)
    out = resample(pcm, src, dst)
    expected = tone(1000, dst)
    assert out.dtype == np.int16
    assert len(out) == len(expected)
    error = middle(out).astype(np.float64) - middle(expected)
    signal_power = np.mean(middle(expected).astype(np.float64) ** 2)
    snr_db = 10 * np.log10(signal_power / max(np.mean(error ** 2), 1e-12))
    assert snr_db > 60  # measured ~88-93 dB; int16 rounding alone limits it to ~90 dB


@pytest.mark.parametrize(("src", "dst"), [p for p in RATE_PAIRS if p[0] > p[1]])
def test_downsampling_does_not_alias(src: int, dst: int) -> None:
    # A tone above the new Nyquist frequency must vanish instead of folding back into the band.
    above_nyquist = dst / 2 + 0.25 * (src / 2 - dst / 2)
    out = resample(tone(above_nyquist, src), src, dst)
    assert rms_dbfs(middle(out)) < -70


@pytest.mark.parametrize(("src", "dst"), [p for p in RATE_PAIRS if p[0] < p[1]])
def test_upsampling_does_not_create_images(src: int, dst: int) -> None:
    # A 3 kHz tone must come out as a pure 3 kHz tone: no energy at its image src - 3 kHz (folded
    # back below the new Nyquist frequency when it lies above it).
    out = middle(resample(tone(3000, src, 1.0), src, dst)).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    freqs = np.fft.rfftfreq(len(out), 1 / dst)
    image_hz = src - 3000 if src - 3000 <= dst / 2 else dst - (src - 3000)
    peak = spectrum.max()
    image = spectrum[np.abs(freqs - image_hz) < 50].max()
    assert 20 * np.log10(image / peak) < -70


def test_pass_band_reaches_six_and_a_half_khz_at_16k() -> None:
    out = resample(tone(6500, 48000), 48000, 16000)
    assert rms_dbfs(middle(out)) == pytest.approx(rms_dbfs(tone(6500, 48000)), abs=0.5)


@pytest.mark.parametrize(("src", "dst"), [(24000, 16000), (22050, 16000), (16000, 24000), (16000, 16000)])
def test_streaming_in_random_chunks_equals_one_shot(src: int, dst: int) -> None:
    rng = np.random.default_rng(src + dst)
    pcm = float32_to_pcm(rng.standard_normal(src // 2) * 0.2)
    one_shot = resample(pcm, src, dst)
    for _ in range(3):
        resampler = StreamResampler(src, dst)
        parts, position = [], 0
        while position < len(pcm):
            size = int(rng.integers(0, 900))
            chunk = pcm[position: position + size]
            parts.append(resampler.process(chunk.tobytes() if size % 2 else chunk))
            position += size
        parts.append(resampler.flush())
        streamed = np.concatenate(parts)
        assert len(streamed) == len(one_shot)
        assert np.abs(streamed.astype(np.int32) - one_shot).max() <= 1


def test_stream_resampler_can_be_reused_after_flush() -> None:
    resampler = StreamResampler(24000, 16000)
    pcm = tone(500, 24000, 0.1)
    first = np.concatenate((resampler.process(pcm), resampler.flush()))
    second = np.concatenate((resampler.process(pcm), resampler.flush()))
    assert np.array_equal(first, second)


def test_stream_resampler_has_no_click_at_chunk_boundaries() -> None:
    # A smooth tone streamed in 20 ms TTS-like chunks must stay smooth: no sample-to-sample jump
    # larger than the tone's own steepest slope.
    pcm = tone(440, 24000, 0.5)
    resampler = StreamResampler(24000, 16000)
    out = np.concatenate([resampler.process(pcm[i: i + 480]) for i in range(0, len(pcm), 480)]
                         + [resampler.flush()]).astype(np.int32)
    max_step = 0.5 * 32768 * 2 * np.pi * 440 / 16000
    assert np.abs(np.diff(middle(out))).max() <= max_step * 1.05


def test_rejects_bad_rates_and_odd_bytes() -> None:
    with pytest.raises(ValueError):
        StreamResampler(0, 16000)
    with pytest.raises(ValueError):
        resample(b"\x00\x00\x00", 16000, 24000)
