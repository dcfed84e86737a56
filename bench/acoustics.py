"""A room for emulated speakers: echo of their own playback, reverb, background noise, a second talker.

Clean-microphone tests never show what a speaker in a living room does: its microphone hears its
own reply (device buffer plus air, 100–400 ms late, −20 … −3 dB), smeared by the room, over a fan or
a television, with the user talking on top. This module makes that signal, deterministically from a
seed, for the emulators (``bench/xiaoai_emulator.py``, the native speakers of ``bench/common.py``),
the tests and the benches.

Two layers:

* plain functions on whole signals — :func:`white_noise`, :func:`brown_noise` (a fan's rumble),
  :func:`babble` (several fixture voices at once), :func:`room_impulse_response`, :func:`mix_at_snr`,
  :func:`scale_to_dbfs` — float32 samples in [-1, 1] at any rate;
* :class:`Room`, the streaming acoustic path of one device: playback goes in (:meth:`Room.play`,
  placed on the playback timeline the device really plays it at), microphone samples come out
  (:meth:`Room.capture`, in order, any chunk size), with echo, reverb, noise and any talker clips
  queued with :meth:`Room.add_talker` at a microphone sample position.

Positions are sample indices of the microphone stream (16 kHz by default), never wall-clock time,
so a run on a loaded machine puts the echo exactly where it would be on an idle one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from voicegrow.audio import StreamResampler, as_int16, float32_to_pcm, pcm_to_float32, read_wav, resample

__all__ = [
    "NOISE_KINDS",
    "EchoPath",
    "NoiseSource",
    "Room",
    "active_rms",
    "babble",
    "brown_noise",
    "db_to_gain",
    "load_clip",
    "load_fixture_clips",
    "mix_at_snr",
    "noise",
    "rms",
    "room_impulse_response",
    "scale_to_dbfs",
    "television",
    "white_noise",
]

MIC_RATE = 16000
NOISE_KINDS = ("white", "brown", "fan", "babble")
_EPS = 1e-12


# -- levels -------------------------------------------------------------------------------------------


def db_to_gain(db: float) -> float:
    """An amplitude factor from decibels (−6 dB ≈ 0.5)."""
    return float(10.0 ** (db / 20.0))


def rms(samples: np.ndarray) -> float:
    """Root mean square of float samples (0 for an empty array)."""
    x = np.asarray(samples, dtype=np.float64)
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def active_rms(samples: np.ndarray, sample_rate: int = MIC_RATE, *, frame_ms: int = 20,
               floor_db: float = -40.0) -> float:
    """RMS over the frames within ``floor_db`` of the loudest frame: a voice's level without its pauses.

    A clip with half a second of silence around a short command has a whole-clip RMS several dB
    below its speech; mixing "at the echo's level" means the speech's level, so this is what counts.
    """
    x = np.asarray(samples, dtype=np.float64)
    n = max(1, sample_rate * frame_ms // 1000)
    frames = x[: len(x) // n * n].reshape(-1, n) if len(x) >= n else x.reshape(1, -1)
    if frames.size == 0:
        return 0.0
    energy = np.mean(np.square(frames), axis=1)
    peak = float(energy.max())
    if peak <= 0:
        return 0.0
    keep = energy >= peak * 10.0 ** (floor_db / 10.0)
    return float(np.sqrt(np.mean(energy[keep])))


def scale_to_dbfs(samples: np.ndarray, dbfs: float, *, active: bool = False,
                  sample_rate: int = MIC_RATE) -> np.ndarray:
    """``samples`` scaled so that their RMS (or with ``active`` the :func:`active_rms`) is ``dbfs``.

    0 dBFS is the RMS of a full-scale square wave, as :func:`voicegrow.audio.rms_dbfs` measures it.
    """
    x = np.asarray(samples, dtype=np.float32)
    level = active_rms(x, sample_rate) if active else rms(x)
    if level <= _EPS:
        return x.copy()
    return (x * (db_to_gain(dbfs) / level)).astype(np.float32)


def mix_at_snr(signal: np.ndarray, noise_samples: np.ndarray, snr_db: float, *, active: bool = False,
               sample_rate: int = MIC_RATE, offset: int = 0) -> np.ndarray:
    """``signal`` plus ``noise_samples`` scaled to ``snr_db`` below it; the result has the signal's length.

    The noise is tiled (from ``offset``) when shorter than the signal and cut when longer. The
    signal's power is its whole RMS, or with ``active`` the RMS of its speech frames only
    (:func:`active_rms`): a short command padded with silence would otherwise get a noise floor
    several dB too low for the SNR named. The sum is not clipped (callers converting to PCM clip).
    """
    s = np.asarray(signal, dtype=np.float32)
    n = np.asarray(noise_samples, dtype=np.float32)
    if s.size == 0:
        return s.copy()
    if n.size == 0:
        raise ValueError("mix_at_snr needs some noise samples")
    reps = math.ceil((offset % n.size + s.size) / n.size)
    n = np.tile(n, reps)[offset % n.size: offset % n.size + s.size] if reps > 1 or offset else n[: s.size]
    signal_level = active_rms(s, sample_rate) if active else rms(s)
    noise_level = rms(n)
    if noise_level <= _EPS or signal_level <= _EPS:
        return s.copy()
    gain = signal_level / noise_level / db_to_gain(snr_db)
    return (s + gain * n).astype(np.float32)


# -- noise ----------------------------------------------------------------------------------------------


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian white noise with unit RMS."""
    return rng.standard_normal(n).astype(np.float32)


class _BrownState:
    """Leaky integrator state of :func:`brown_noise`, so a stream continues without a click."""

    __slots__ = ("y",)

    def __init__(self) -> None:
        self.y = 0.0


#: The integrator's leak: a pole at ~20 Hz for 16 kHz, so the rumble has no DC drift.
_BROWN_LEAK = 0.992
#: RMS of the leaky integral of unit white noise, sqrt(1 / (1 - leak²)); divides it to unit RMS.
_BROWN_RMS = 1.0 / math.sqrt(1.0 - _BROWN_LEAK ** 2)


def brown_noise(n: int, rng: np.random.Generator, _state: _BrownState | None = None) -> np.ndarray:
    """Brown ("red") noise with unit RMS: a fan or an air conditioner, energy falling 6 dB an octave."""
    state = _state or _BrownState()
    white = rng.standard_normal(n)
    out = np.empty(n, dtype=np.float64)
    # The recursion y[i] = leak·y[i-1] + w[i] in closed form per block (numpy has no lfilter):
    # y[i] = leak^i·(y0 + Σ_{k≤i} w[k]·leak^-k); blocks of 512 keep leak^-k within ~60.
    block = 512
    powers = _BROWN_LEAK ** np.arange(block + 1)
    y = state.y
    for start in range(0, n, block):
        w = white[start: start + block]
        m = w.size
        acc = np.cumsum(w / powers[1: m + 1] * _BROWN_LEAK)  # w[k]·leak^-(k) with k from 1
        seg = powers[1: m + 1] * (y + acc / _BROWN_LEAK)
        out[start: start + m] = seg
        y = float(seg[-1])
    state.y = y
    return (out / _BROWN_RMS).astype(np.float32)


def babble(n: int, rng: np.random.Generator, clips: Sequence[np.ndarray], *, voices: int = 4) -> np.ndarray:
    """Several voices at once (a television, people talking across the room), unit RMS.

    Each voice is a random fixture clip after another, from a random start, without gaps; ``voices``
    of them are summed. Needs at least one clip (see :func:`load_fixture_clips`).
    """
    usable = [np.asarray(c, dtype=np.float32) for c in clips if np.asarray(c).size]
    if not usable:
        raise ValueError("babble needs at least one non-empty speech clip")
    out = np.zeros(n, dtype=np.float64)
    for _ in range(max(1, voices)):
        track: list[np.ndarray] = []
        have = 0
        while have < n:
            clip = usable[int(rng.integers(len(usable)))]
            if not track:
                clip = clip[int(rng.integers(clip.size)):]
            track.append(clip / (active_rms(clip) or 1.0))
            have += clip.size
        out += np.concatenate(track)[:n]
    level = rms(out)
    return (out / level if level > _EPS else out).astype(np.float32)


def television(n: int, rng: np.random.Generator, clips: Sequence[np.ndarray], *,
               gap_s: tuple[float, float] = (0.15, 0.9)) -> np.ndarray:
    """A television talking: one voice at a time, sentence after sentence (random fixture clips, each
    at unit active RMS) with ``gap_s`` pauses as in a dialogue — other people's speech, for minutes,
    that a speaker must not answer. Unlike :func:`babble` it has the pauses a VAD ends utterances in."""
    usable = [np.asarray(c, dtype=np.float32) for c in clips if np.asarray(c).size]
    if not usable:
        raise ValueError("television needs at least one non-empty speech clip")
    out = np.zeros(n, dtype=np.float32)
    position = 0
    while position < n:
        clip = usable[int(rng.integers(len(usable)))]
        take = min(clip.size, n - position)
        out[position: position + take] = clip[:take] / (active_rms(clip) or 1.0)
        position += take + int(rng.uniform(*gap_s) * MIC_RATE)
    return out


def noise(kind: str, n: int, rng: np.random.Generator, clips: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Unit-RMS noise of ``kind``: ``white``, ``brown`` (or its alias ``fan``), or ``babble``."""
    if kind == "white":
        return white_noise(n, rng)
    if kind in ("brown", "fan"):
        return brown_noise(n, rng)
    if kind == "babble":
        return babble(n, rng, clips)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")


class NoiseSource:
    """Endless noise of one kind at a fixed level, read in chunks that join seamlessly.

    Babble is made once as a loop (20 s) and cycled; white and brown noise are generated as read.
    """

    def __init__(self, kind: str, dbfs: float, *, seed: int = 0, clips: Sequence[np.ndarray] = (),
                 sample_rate: int = MIC_RATE, loop_s: float = 20.0) -> None:
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")
        self.kind = kind
        self.gain = db_to_gain(dbfs)
        self._rng = np.random.default_rng(seed)
        self._brown = _BrownState()
        self._loop = babble(int(loop_s * sample_rate), self._rng, clips) if kind == "babble" else None
        self._pos = 0

    def read(self, n: int) -> np.ndarray:
        if self._loop is not None:
            idx = (self._pos + np.arange(n)) % self._loop.size
            self._pos = (self._pos + n) % self._loop.size
            return self._loop[idx] * self.gain
        if self.kind == "white":
            return white_noise(n, self._rng) * self.gain
        return brown_noise(n, self._rng, self._brown) * self.gain


# -- the room ---------------------------------------------------------------------------------------------


def room_impulse_response(rt60_s: float, sample_rate: int = MIC_RATE, rng: np.random.Generator | None = None,
                          *, predelay_ms: float = 3.0, drr_db: float = 6.0) -> np.ndarray:
    """A short synthetic room: a direct path, then exponentially decaying noise (reverberation).

    The tail starts ``predelay_ms`` after the direct sound, falls by 60 dB over ``rt60_s`` and is cut
    there; its energy is ``drr_db`` below the direct sound's (a device's speaker is centimetres from
    its microphone, so the direct path dominates, as it does for a user across a small room). The response is normalised to unit
    energy, so a gain applied after it is the echo's level relative to the played signal.
    ``rt60_s`` = 0 is no room at all (a single unit impulse).
    """
    if rt60_s <= 0:
        return np.ones(1, dtype=np.float32)
    rng = rng or np.random.default_rng(0)
    predelay = max(1, round(predelay_ms * sample_rate / 1000))
    length = predelay + max(1, round(rt60_s * sample_rate))
    t = np.arange(length - predelay) / sample_rate
    tail = rng.standard_normal(t.size) * np.exp(-6.907755 * t / rt60_s)
    tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / float(np.sum(tail * tail)))
    h = np.zeros(length, dtype=np.float64)
    h[0] = 1.0
    h[predelay:] = tail
    return (h / math.sqrt(float(np.sum(h * h)))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class EchoPath:
    """How a device's own playback reaches its microphone, and what else the room adds.

    ``delay_ms``: playout to microphone (device buffer plus air), ``gain_db``: the echo's level
    relative to the played signal, ``rt60_s``: the room's reverberation (0: none), ``noise``: a kind
    of :data:`NOISE_KINDS` or None, at ``noise_dbfs``. ``seed`` fixes every random choice.
    ``gain_db=None`` is a device that hears nothing of itself (the clean microphone of older tests).
    """

    delay_ms: float = 250.0
    gain_db: float | None = -6.0
    rt60_s: float = 0.25
    noise: str | None = "fan"
    noise_dbfs: float = -55.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.delay_ms <= 2000:
            raise ValueError(f"delay_ms must be 0…2000, got {self.delay_ms}")
        if self.gain_db is not None and not -80 <= self.gain_db <= 12:
            raise ValueError(f"gain_db must be −80…12 dB, got {self.gain_db}")
        if self.rt60_s < 0 or self.rt60_s > 2:
            raise ValueError(f"rt60_s must be 0…2 s, got {self.rt60_s}")
        if self.noise is not None and self.noise not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_KINDS)} or None, got {self.noise!r}")

    @classmethod
    def clean(cls) -> EchoPath:
        """No echo, no room, no noise: what every test before the room used."""
        return cls(gain_db=None, rt60_s=0.0, noise=None)


class Room:
    """The streaming acoustic path of one device (see the module docstring).

    ``play(pcm, rate, at_sample)`` takes audio the device plays, starting at microphone sample
    ``at_sample``; ``capture(n)`` returns the next ``n`` microphone samples as int16 PCM bytes.
    Playback may be handed in any time before it is captured (the echo is ``delay_ms`` late anyway);
    audio placed at a position already captured loses the part in the past, as a real room would
    have played it unheard by a microphone that was not yet listening.
    """

    def __init__(self, path: EchoPath, *, sample_rate: int = MIC_RATE, babble_clips: Sequence[np.ndarray] = ()) -> None:
        self.path = path
        self.sample_rate = sample_rate
        rng = np.random.default_rng(path.seed)
        self._rir = room_impulse_response(path.rt60_s, sample_rate, rng)
        self._gain = 0.0 if path.gain_db is None else db_to_gain(path.gain_db)
        self._delay = round(path.delay_ms * sample_rate / 1000)
        self._noise = (NoiseSource(path.noise, path.noise_dbfs, seed=path.seed + 1, clips=babble_clips,
                                   sample_rate=sample_rate) if path.noise is not None else None)
        self._buffer = np.zeros(0, dtype=np.float32)  # what the mic hears from position _base on
        self._base = 0  # microphone sample index of _buffer[0] == samples captured so far
        self._resampler: StreamResampler | None = None
        self._play_rate = 0
        self._cursor: int | None = None  # where contiguous playback continues (mic samples)
        self._origin = 0  # where the current contiguous playback started
        self._out = 0  # where the next resampled sample goes
        self._in_samples = 0  # input samples of the current contiguous playback
        self.echo_energy = 0.0  # sum of squares of the echo added, for level checks
        self.talker_onsets: list[int] = []
        #: Playback handed in but not yet played: ``[start sample, samples]``, placed in the room as the
        #: microphone reaches it, so that :meth:`stop_playback` can still take it back.
        self._scheduled: list[list] = []

    @property
    def position(self) -> int:
        """Microphone samples captured so far (the index of the next one)."""
        return self._base

    def _add(self, signal: np.ndarray, at: int) -> None:
        """Add ``signal`` to what the microphone will hear from sample ``at`` on."""
        if signal.size == 0:
            return
        if at < self._base:
            signal = signal[self._base - at:]
            at = self._base
            if signal.size == 0:
                return
        end = at - self._base + signal.size
        if end > self._buffer.size:
            self._buffer = np.concatenate((self._buffer, np.zeros(end - self._buffer.size, dtype=np.float32)))
        self._buffer[at - self._base: end] += signal

    def play(self, pcm: bytes | np.ndarray, rate: int, at_sample: int) -> None:
        """The device plays ``pcm`` (s16 at ``rate``) starting at microphone sample ``at_sample``.

        Calls that continue where the last one ended (within 2 ms: the caller's positions are
        rounded) make one continuous signal, resampled without a seam; a gap or a new rate starts
        afresh at ``at_sample``. Each chunk's reverberation is added in full (overlap-add), so a
        reply's tail rings on after it ends.
        """
        if self._gain == 0.0:
            return
        samples = as_int16(pcm)
        slack = 2 * self.sample_rate // 1000
        contiguous = (self._cursor is not None and rate == self._play_rate
                      and abs(at_sample - self._cursor) <= slack)
        if not contiguous:
            self._play_rate = rate
            self._resampler = StreamResampler(rate, self.sample_rate) if rate != self.sample_rate else None
            self._cursor = self._out = self._origin = at_sample
            self._in_samples = 0
        assert self._cursor is not None
        # Where the next contiguous call should start, from the input's duration (the resampler's
        # output lags its input by a couple of milliseconds, so its count would drift from it).
        self._in_samples += samples.size
        self._cursor = round(self._origin + self._in_samples * self.sample_rate / rate)
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        x = pcm_to_float32(samples)
        start = self._out
        self._out = start + x.size
        if x.size == 0:
            return
        self._scheduled.append([start, x])

    def stop_playback(self, at_sample: int) -> None:
        """The device stops playing at microphone sample ``at_sample`` and drops what it buffered
        (an interrupted reply): playback scheduled from there on is never heard."""
        kept = []
        for item in self._scheduled:
            start, x = item
            if start >= at_sample:
                continue
            if start + x.size > at_sample:
                item[1] = x[: at_sample - start]
            kept.append(item)
        self._scheduled = kept
        self._cursor = None  # what plays next is a new stream

    def _play_due(self, until: int) -> None:
        """Put the playback that starts before microphone sample ``until`` into the room (its echo,
        reverb included, lands ``delay_ms`` later; the convolution is linear, so playing a chunk in
        pieces sounds the same as whole)."""
        due = []
        for item in self._scheduled:
            start, x = item
            if start >= until:
                due.append(item)
                continue
            piece, rest = x[: until - start], x[until - start:]
            echo = np.convolve(piece, self._rir).astype(np.float32) * self._gain
            self.echo_energy += float(np.sum(np.square(echo[: piece.size], dtype=np.float64)))
            self._add(echo, start + self._delay)
            if rest.size:
                due.append([start + piece.size, rest])
        self._scheduled = due

    def add_talker(self, clip: np.ndarray | bytes, at_sample: int, *, dbfs: float | None = None,
                   gain_db: float = 0.0, reverb: bool = True) -> None:
        """A second talker (the user) at microphone sample ``at_sample``: float or int16 16 kHz audio.

        ``dbfs`` sets the speech's level (:func:`active_rms`), else ``gain_db`` scales it. The talker
        is in the same room (the reverb applies), but nearer the microphone than the echo's path.
        """
        if isinstance(clip, (bytes, bytearray)) or np.asarray(clip).dtype == np.int16:
            x = pcm_to_float32(clip)
        else:
            x = np.asarray(clip, dtype=np.float32)
        if dbfs is not None:
            x = scale_to_dbfs(x, dbfs, active=True, sample_rate=self.sample_rate)
        else:
            x = x * db_to_gain(gain_db)
        if reverb and self._rir.size > 1:
            x = np.convolve(x, self._rir).astype(np.float32)
        self.talker_onsets.append(at_sample)
        self._add(x.astype(np.float32), at_sample)

    def capture(self, n: int) -> bytes:
        """The next ``n`` microphone samples (echo + talkers + noise) as s16le PCM."""
        if self._scheduled:
            self._play_due(self._base + n)
        have = min(n, self._buffer.size)
        out = np.zeros(n, dtype=np.float32)
        out[:have] = self._buffer[:have]
        self._buffer = self._buffer[have:]
        self._base += n
        if self._noise is not None:
            out += self._noise.read(n)
        return float32_to_pcm(out).astype("<i2").tobytes()

    def expected_echo_dbfs(self, playback_dbfs: float) -> float:
        """The level the echo of a signal played at ``playback_dbfs`` has at the microphone."""
        if self.path.gain_db is None:
            return -120.0
        return playback_dbfs + self.path.gain_db


# -- fixture clips ------------------------------------------------------------------------------------------


def load_clip(path: str | Path, sample_rate: int = MIC_RATE) -> np.ndarray:
    """A WAV as float32 mono at ``sample_rate``."""
    samples, rate = read_wav(str(path))
    if rate != sample_rate:
        samples = resample(samples, rate, sample_rate)
    return pcm_to_float32(samples)


def load_fixture_clips(directory: str | Path, *, lang: str | None = None, limit: int | None = None,
                       sample_rate: int = MIC_RATE) -> list[tuple[dict, np.ndarray]]:
    """``(manifest entry, samples)`` for the clips of a fixture directory (its ``manifest.json``)."""
    directory = Path(directory)
    entries = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    chosen = [e for e in entries if lang is None or e.get("lang") == lang]
    if limit is not None:
        chosen = chosen[:limit]
    return [(entry, load_clip(directory / entry["file"], sample_rate)) for entry in chosen]
