"""PCM helpers shared by every stage: WAV in and out, level, and sample-rate conversion.

Devices record at 16 kHz, the TTS service speaks 24 kHz, piper speaks 22.05 kHz and some devices want
48 kHz, so audio is resampled on the hot path of every turn. The resampler here is a polyphase
windowed-sinc (Kaiser) FIR in numpy: stop band at the lower Nyquist frequency, so nothing aliases, and
a streaming form that keeps its filter history across chunks, so TTS audio can be converted as it
arrives without clicks at chunk boundaries. All PCM is signed 16-bit little-endian, the wire format.
"""

from __future__ import annotations

import functools
import io
import math
import os
import wave
from os import PathLike

import numpy as np

__all__ = [
    "WavFormatError",
    "read_wav",
    "wav_bytes",
    "write_wav",
    "resample",
    "StreamResampler",
    "pcm_to_float32",
    "float32_to_pcm",
    "as_int16",
    "to_mono_int16",
    "duration_s",
    "silence",
    "rms_dbfs",
    "SAMPLE_WIDTH",
]

#: Bytes per sample of the only sample format used anywhere in VoiceGrow (s16le).
SAMPLE_WIDTH = 2

#: Level reported for digital silence instead of minus infinity, so it can be logged and compared.
SILENCE_DBFS = -120.0


class WavFormatError(ValueError):
    """A WAV file the server cannot use (not PCM s16, broken header); ``code`` is for clients/logs."""

    code = "wav_format"


def as_int16(pcm: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """View s16le bytes (or an int16 array) as an int16 array, without copying where possible."""
    if isinstance(pcm, np.ndarray):
        if pcm.dtype != np.int16:
            raise TypeError(f"expected int16 samples, got {pcm.dtype}")
        return pcm
    if len(pcm) % SAMPLE_WIDTH:
        raise ValueError(f"s16 PCM needs an even byte count, got {len(pcm)}")
    return np.frombuffer(pcm, dtype="<i2")


def read_wav(source: str | PathLike[str] | bytes | bytearray) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV as mono int16 samples and its sample rate; stereo is mixed down."""
    stream = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else os.fspath(source)
    try:
        with wave.open(stream, "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise WavFormatError(f"not a readable PCM WAV: {exc}") from exc
    if width != SAMPLE_WIDTH:
        raise WavFormatError(f"only 16-bit PCM WAV is supported, got {8 * width}-bit")
    samples = np.frombuffer(frames, dtype="<i2")
    if channels > 1:
        usable = len(samples) - len(samples) % channels
        mixed = samples[:usable].reshape(-1, channels).astype(np.int32).sum(axis=1) / channels
        samples = np.round(mixed).astype(np.int16)
    return samples.astype(np.int16, copy=False), rate


def wav_bytes(pcm: bytes | bytearray | np.ndarray, sample_rate: int, channels: int = 1) -> bytes:
    """Wrap interleaved s16le PCM in a WAV container (for the TTS ``wav`` format, storage, debugging)."""
    data = as_int16(pcm).astype("<i2", copy=False).tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(SAMPLE_WIDTH)
        wav.setframerate(sample_rate)
        wav.writeframes(data)
    return buffer.getvalue()


def write_wav(path: str | PathLike[str], pcm: bytes | bytearray | np.ndarray, sample_rate: int) -> None:
    """Write mono s16le PCM to a WAV file."""
    with open(path, "wb") as file:
        file.write(wav_bytes(pcm, sample_rate))


def pcm_to_float32(pcm: bytes | bytearray | np.ndarray) -> np.ndarray:
    """s16 PCM as float32 in [-1, 1), the input format of Whisper and of the DSP below."""
    return as_int16(pcm).astype(np.float32) / 32768.0


def float32_to_pcm(samples: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] back to int16, rounded and clipped rather than wrapped."""
    return np.clip(np.rint(np.asarray(samples) * 32768.0), -32768, 32767).astype(np.int16)


def duration_s(nbytes: int, rate: int) -> float:
    """Seconds of mono s16 audio in ``nbytes`` bytes at ``rate`` Hz."""
    return nbytes / (SAMPLE_WIDTH * rate)


def silence(ms: float, rate: int) -> bytes:
    """``ms`` milliseconds of digital silence as mono s16le bytes."""
    return bytes(SAMPLE_WIDTH * round(rate * ms / 1000))


def rms_dbfs(pcm: bytes | bytearray | np.ndarray) -> float:
    """RMS level relative to full scale (a full-scale square wave is 0 dBFS; silence is -120)."""
    samples = pcm_to_float32(pcm)
    if samples.size == 0:
        return SILENCE_DBFS
    rms = math.sqrt(float(np.mean(np.square(samples, dtype=np.float64))))
    return max(SILENCE_DBFS, 20.0 * math.log10(rms)) if rms > 0 else SILENCE_DBFS


# ---------------------------------------------------------------------------------------------------
# Resampling

#: Half length of the anti-alias filter in samples of the *lower* rate; sets the transition width
#: (≈ 5 %·lower rate at 80 dB, i.e. the pass band reaches ~7.2 kHz at 16 kHz) and the cost.
_HALF_TAPS_AT_LOW_RATE = 32
_STOPBAND_DB = 80.0


@functools.lru_cache(maxsize=32)
def _polyphase_filter(src_rate: int, dst_rate: int) -> tuple[int, int, int, np.ndarray]:
    """Design the filter bank once per rate pair: ``(up, down, half, taps[up, 2*half])``.

    Phase ``p`` holds the windowed sinc sampled at input offsets ``k - p/up`` for
    ``k = -half+1 … half``; each phase is normalised to unit DC gain so that the phase pattern
    does not modulate the level.
    """
    common = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // common, src_rate // common
    low = min(src_rate, dst_rate)
    half = math.ceil(_HALF_TAPS_AT_LOW_RATE * src_rate / low)
    taps = 2 * half
    # Kaiser design: transition width from the length; put the stop band edge at the low Nyquist.
    transition_hz = (_STOPBAND_DB - 8.0) / (2.285 * 2 * math.pi * taps) * src_rate
    cutoff_hz = low / 2 - transition_hz / 2
    beta = 0.1102 * (_STOPBAND_DB - 8.7)
    fc = cutoff_hz / src_rate  # cycles per input sample
    offsets = np.arange(-half + 1, half + 1, dtype=np.float64)[None, :] - (
        np.arange(up, dtype=np.float64)[:, None] / up)
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (offsets / half) ** 2, 0.0, 1.0))) / np.i0(beta)
    bank = 2 * fc * np.sinc(2 * fc * offsets) * window
    bank /= bank.sum(axis=1, keepdims=True)
    return up, down, half, bank.astype(np.float32)


class StreamResampler:
    """Resample a PCM stream chunk by chunk, keeping the filter history across chunks.

    Output sample ``n`` sits at input time ``n * src / dst``; it is produced as soon as the input
    ``half`` samples past that time has arrived, so the output lags the input by the filter's half
    length (~2 ms at 16 kHz). :meth:`flush` pads the end with silence and returns the rest, after
    which the total output is ``ceil(len(input) * dst / src)`` samples, the same as :func:`resample`.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {src_rate} → {dst_rate}")
        self.src_rate, self.dst_rate = src_rate, dst_rate
        self._up, self._down, self._half, self._bank = _polyphase_filter(src_rate, dst_rate)
        self._passthrough = src_rate == dst_rate
        # Input history as float32; _start is the absolute input index of _history[0]. The stream
        # is preceded by virtual silence so the first outputs see a full filter.
        self._history = np.zeros(self._half - 1, dtype=np.float32)
        self._start = -(self._half - 1)
        self._consumed = 0  # input samples received
        self._produced = 0  # output samples returned

    def process(self, chunk: bytes | bytearray | np.ndarray) -> np.ndarray:
        """Feed s16 samples (bytes or int16 array); return the int16 output ready so far."""
        samples = as_int16(chunk)
        self._consumed += len(samples)
        if self._passthrough:
            self._produced += len(samples)
            return samples.copy()
        self._history = np.concatenate((self._history, samples.astype(np.float32)))
        available_end = self._start + len(self._history)  # one past the last input index
        last = ((available_end - self._half) * self._up - 1) // self._down
        return self._produce(last + 1)

    def flush(self) -> np.ndarray:
        """End of stream: return the remaining output (the input is padded with silence)."""
        if self._passthrough:
            return np.zeros(0, dtype=np.int16)
        total = -(-self._consumed * self._up // self._down)
        self._history = np.concatenate((self._history, np.zeros(self._half, dtype=np.float32)))
        out = self._produce(total)
        self._history = np.zeros(self._half - 1, dtype=np.float32)
        self._start, self._consumed, self._produced = -(self._half - 1), 0, 0
        return out

    def _produce(self, stop: int) -> np.ndarray:
        """Compute outputs ``_produced … stop-1`` from the history and trim what is no longer needed."""
        if stop <= self._produced:
            return np.zeros(0, dtype=np.int16)
        n = np.arange(self._produced, stop, dtype=np.int64)
        position = n * self._down
        base, phase = position // self._up, position % self._up
        windows = np.lib.stride_tricks.sliding_window_view(self._history, 2 * self._half)
        rows = windows[base - self._half + 1 - self._start]
        out = np.einsum("ij,ij->i", rows, self._bank[phase])
        self._produced = stop
        keep_from = (stop * self._down) // self._up - self._half + 1
        drop = keep_from - self._start
        if drop > 0:
            self._history = self._history[drop:]
            self._start = keep_from
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def resample(pcm_int16: bytes | bytearray | np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample a whole clip; returns ``ceil(len * dst / src)`` int16 samples, aligned in time."""
    resampler = StreamResampler(src_rate, dst_rate)
    head = resampler.process(pcm_int16)
    return np.concatenate((head, resampler.flush()))


def to_mono_int16(raw: bytes | bytearray, width: int, channels: int) -> np.ndarray:
    """Little-endian PCM of any common layout (8-bit unsigned, 16/24/32-bit signed, interleaved
    channels) as int16 mono, channels averaged: for clients that send what their microphone gives."""
    if width not in (1, 2, 3, 4) or channels < 1:
        raise ValueError(f"unsupported PCM layout: {width}-byte samples, {channels} channels")
    frame = width * channels
    if len(raw) % frame:
        raise ValueError(f"PCM of {width}-byte samples × {channels} channels needs a multiple of {frame} bytes, "
                         f"got {len(raw)}")
    if width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.int32) - 128) << 8
    elif width == 2:
        samples = np.frombuffer(raw, dtype="<i2").astype(np.int32)
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        samples = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 16  # sign from the top byte
    else:
        samples = np.frombuffer(raw, dtype="<i4") >> 16
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return np.clip(np.rint(samples) if channels > 1 else samples, -32768, 32767).astype(np.int16)
