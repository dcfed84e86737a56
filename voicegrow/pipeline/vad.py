"""The utterance segmenter: microphone PCM in, utterance events out (webrtcvad, sans-IO).

A pure, synchronous state machine in the style of h11: the session feeds it whatever byte chunks the
device sends (16 kHz mono s16le, any size, odd byte counts included) and acts on the events it
returns. It never blocks, sleeps or reads a clock: every position is *seconds of audio since the
stream start*, computed from sample counts, so the same audio cut into different chunks yields the
very same events, and callers map positions to wall-clock time themselves.

How an utterance is cut (frame = ``frame_ms`` of audio classified by webrtcvad):

* **Onset.** A ring window of the last ``2 * speech_start_ms`` of frame decisions is kept; onset is
  confirmed once at least ``speech_start_ms`` of it is voiced (a 50 % ratio, the classic webrtcvad
  example's idea with a short window so that speech is confirmed ~100 ms after it starts). The onset
  *position* is the first voiced frame of that window, earlier than the confirmation.
* **Pre-roll.** The utterance audio starts ``preroll_ms`` (rounded up to whole frames) before the
  onset, or at the oldest audio still held (stream start, or the end of the previous utterance),
  so the first syllable is never lost and no audio is handed out twice.
* **Pause and hangover.** The first non-voiced frame after speech starts the hangover and emits
  :class:`SpeechPaused` with the audio so far, so a speculative transcription can start at once;
  a voiced frame before ``silence_ms`` of non-voiced frames emits :class:`SpeechResumed` (the
  speculation is stale). After ``silence_ms`` the utterance ends with the trailing silence included.
* **Background speech.** With ``relative_db`` set, in a noisy room (a classifier with a ``noisy``
  attribute says; one without is always in one), a voiced frame more than ``relative_db`` under the
  loudest speech of the open utterance counts as non-voiced (a television far behind the user does
  not extend the user's utterance), and audio before the first frame that loud is left out (the TV
  sentence the user began to speak over); ``UtteranceEnded.level_dbfs`` is that loudest level.
* **Too short / too long.** An utterance whose speech span (onset to speech end) is under
  ``min_speech_ms`` is dropped (a click, a cough); its pauses emit no :class:`SpeechPaused`, since no
  one should transcribe it. Audio never exceeds ``max_utterance_s`` (pre-roll included): at that
  length the utterance is cut (``forced=True``) and onset detection starts afresh on what follows.

The speculative-transcript contract: ``UtteranceEnded.paused_audio_len`` is the length of the audio
of the last :class:`SpeechPaused` when no resume followed it (else ``None``); then
``ended.audio[:ended.paused_audio_len] == paused.audio`` and the rest is non-voiced audio, so a
transcript of ``paused.audio`` is the transcript of the utterance.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Union

import webrtcvad

from voicegrow.pipeline.vad_classifiers import frame_dbfs

__all__ = [
    "VadConfigError",
    "VadEvent",
    "VadSegmenter",
    "SpeechStarted",
    "SpeechPaused",
    "SpeechResumed",
    "UtteranceEnded",
    "UtteranceDropped",
    "DROP_TOO_SHORT",
]

_SAMPLE_WIDTH = 2
_WEBRTC_RATES = (8000, 16000, 32000, 48000)
_WEBRTC_FRAME_MS = (10, 20, 30)

#: ``UtteranceDropped.reason`` when the speech span was shorter than ``min_speech_ms``.
DROP_TOO_SHORT = "too_short"


class VadConfigError(ValueError):
    """A segmenter parameter webrtcvad cannot work with; ``code`` names the class of error."""

    code = "vad_config"


@dataclasses.dataclass(frozen=True)
class SpeechStarted:
    """Speech onset confirmed. ``at_s``: where speech began; ``confirmed_s``: where it was confirmed."""

    at_s: float
    confirmed_s: float


@dataclasses.dataclass(frozen=True)
class SpeechPaused:
    """First non-voiced frame after speech; ``audio`` is the utterance so far (pre-roll included),
    ending at ``at_s``."""

    at_s: float
    audio: bytes = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class SpeechResumed:
    """Speech came back during the hangover: the audio of the last :class:`SpeechPaused` is stale."""

    at_s: float


@dataclasses.dataclass(frozen=True)
class UtteranceEnded:
    """A finished utterance.

    ``start_s``/``end_s``: speech onset and speech end (the start of the hangover, not its end).
    ``audio``: from ``audio_start_s`` (pre-roll) through the trailing non-voiced audio.
    ``forced``: cut at ``max_utterance_s`` or by :meth:`VadSegmenter.flush` while speech was still
    going on, rather than ended by silence. ``paused_audio_len``: see the module docstring.
    """

    start_s: float
    end_s: float
    audio: bytes = dataclasses.field(repr=False)
    forced: bool
    audio_start_s: float
    paused_audio_len: int | None
    level_dbfs: float = -100.0


@dataclasses.dataclass(frozen=True)
class UtteranceDropped:
    """An utterance that was too short to be speech (``reason`` = :data:`DROP_TOO_SHORT`)."""

    start_s: float
    end_s: float
    reason: str


VadEvent = Union[SpeechStarted, SpeechPaused, SpeechResumed, UtteranceEnded, UtteranceDropped]


@dataclasses.dataclass
class _Utterance:
    """The running utterance; positions are in samples since the stream start."""

    audio_start: int
    onset: int
    audio: bytearray
    frames: int
    voiced_frames: int
    silence_run: int = 0  # consecutive non-voiced frames (the hangover so far)
    speech_end: int = 0  # valid while silence_run > 0
    paused_audio_len: int | None = None  # set by an emitted SpeechPaused, cleared by a resume
    loud_db: float = -100.0  # the loudest voiced level held for two frames (relative_db)
    last_voiced_db: float = -100.0
    levels: list[float] = dataclasses.field(default_factory=list)  # per frame, with relative_db only


class VadSegmenter:
    """Cut a 16 kHz mono s16le stream into utterances (see the module docstring for the rules)."""

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        frame_ms: int = 30,
        aggressiveness: int = 2,
        preroll_ms: int = 300,
        silence_ms: int = 500,
        min_speech_ms: int = 250,
        max_utterance_s: float = 15.0,
        speech_start_ms: int = 90,
        classifier: Callable[[bytes], bool] | None = None,
        relative_db: float = 0.0,
    ) -> None:
        if sample_rate not in _WEBRTC_RATES:
            raise VadConfigError(f"sample_rate must be one of {_WEBRTC_RATES}, got {sample_rate}")
        if frame_ms not in _WEBRTC_FRAME_MS:
            raise VadConfigError(f"frame_ms must be one of {_WEBRTC_FRAME_MS}, got {frame_ms}")
        if aggressiveness not in (0, 1, 2, 3):
            raise VadConfigError(f"aggressiveness must be 0..3, got {aggressiveness}")
        if min(preroll_ms, silence_ms, min_speech_ms) < 0 or speech_start_ms <= 0:
            raise VadConfigError("durations must not be negative (speech_start_ms must be positive)")
        if max_utterance_s * 1000 < 2 * frame_ms:
            raise VadConfigError(f"max_utterance_s must hold at least two frames, got {max_utterance_s}")
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        #: Frame → voiced? webrtcvad unless the caller brings another (voicegrow/pipeline/vad_classifiers.py).
        self.classifier = self._classify = classifier or functools.partial(webrtcvad.Vad(aggressiveness).is_speech,
                                                                           sample_rate=sample_rate)
        self._frame_samples = sample_rate * frame_ms // 1000
        self._frame_bytes = self._frame_samples * _SAMPLE_WIDTH
        self._onset_frames = math.ceil(speech_start_ms / frame_ms)
        self._window_frames = 2 * self._onset_frames
        self._preroll_frames = math.ceil(preroll_ms / frame_ms)
        self._hangover_frames = max(1, math.ceil(silence_ms / frame_ms))
        self._min_speech_samples = sample_rate * min_speech_ms // 1000
        self._max_frames = int(max_utterance_s * 1000 // frame_ms)
        self.relative_db = relative_db
        self._pending = bytearray()
        self._frames_done = 0
        # Idle history: (frame index, frame bytes, voiced), enough for the pre-roll and the window.
        self._history: collections.deque[tuple[int, bytes, bool]] = collections.deque(
            maxlen=self._preroll_frames + self._window_frames)
        self._window_voiced = 0  # voiced frames among the last window_frames of the history
        self._utterance: _Utterance | None = None
        #: Push-to-talk: silence never ends an utterance, only :meth:`flush` (or the length cap) does.
        self.hold_until_flush = False

    # -- what the session reads between events

    @property
    def in_speech(self) -> bool:
        """An utterance is open: onset confirmed and neither ended nor dropped yet."""
        return self._utterance is not None

    @property
    def position_s(self) -> float:
        """Seconds of audio classified so far (bytes short of a whole frame wait in a buffer)."""
        return self._seconds(self._frames_done * self._frame_samples)

    @property
    def speech_ms_so_far(self) -> float:
        """Span of the open utterance from its onset to now, hangover included; 0 when idle."""
        if self._utterance is None:
            return 0.0
        return 1000 * self._seconds(self._frames_done * self._frame_samples - self._utterance.onset)

    @property
    def current_speech_ms(self) -> float:
        """Voiced audio in the open utterance (ms); 0 when idle. For barge-in: unlike a run length,
        one unvoiced frame in the middle of a word does not reset it, and unlike the span, the
        hangover does not grow it."""
        if self._utterance is None:
            return 0.0
        return float(self._utterance.voiced_frames * self.frame_ms)

    # -- input

    def feed(self, pcm: bytes | bytearray | memoryview) -> list[VadEvent]:
        """Take any number of s16le bytes; return the events of every whole frame now complete."""
        self._pending += pcm
        events: list[VadEvent] = []
        whole = len(self._pending) - len(self._pending) % self._frame_bytes
        for offset in range(0, whole, self._frame_bytes):
            self._step(bytes(self._pending[offset: offset + self._frame_bytes]), events)
        del self._pending[:whole]
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: finish a running utterance. Bytes short of a whole frame are discarded.

        The segmenter is then idle with an empty history; positions keep counting if fed again.
        """
        events: list[VadEvent] = []
        self._pending.clear()
        if self._utterance is not None:
            self._finish(events, forced=self._utterance.silence_run == 0)
        self._history.clear()
        self._window_voiced = 0
        return events

    # -- the state machine

    def _seconds(self, samples: int) -> float:
        return samples / self.sample_rate

    def _step(self, frame: bytes, events: list[VadEvent]) -> None:
        index = self._frames_done
        self._frames_done += 1
        voiced = self._classify(frame)
        if self._utterance is None:
            self._idle_step(index, frame, voiced, events)
        else:
            self._speech_step(index, frame, voiced, events)

    def _idle_step(self, index: int, frame: bytes, voiced: bool, events: list[VadEvent]) -> None:
        # A running count, not a sum over a copy of the window: this runs for every frame of every
        # idle speaker (a few hundred streaming at once).
        history = self._history
        if len(history) >= self._window_frames:
            self._window_voiced -= history[-self._window_frames][2]  # leaves the window now
        history.append((index, frame, voiced))
        self._window_voiced += voiced
        if self._window_voiced < self._onset_frames:
            return
        window = list(history)[-self._window_frames:]
        onset_frame = next(i for i, _, v in window if v)
        first_frame = max(onset_frame - self._preroll_frames, self._history[0][0])
        held = [(i, f, v) for i, f, v in self._history if i >= first_frame]
        self._history.clear()
        self._window_voiced = 0
        self._utterance = _Utterance(
            audio_start=first_frame * self._frame_samples,
            onset=onset_frame * self._frame_samples,
            audio=bytearray(b"".join(f for _, f, _ in held)),
            frames=len(held),
            voiced_frames=sum(v for i, _, v in held if i >= onset_frame),
        )
        if self.relative_db > 0:
            utterance = self._utterance
            utterance.levels = [frame_dbfs(f) for _, f, _ in held]
            for (_, _, v), level in zip(held, utterance.levels):
                self._note_level(utterance, level, v)
        events.append(SpeechStarted(at_s=self._seconds(self._utterance.onset),
                                     confirmed_s=self._seconds((index + 1) * self._frame_samples)))
        if self._utterance.frames >= self._max_frames:
            self._finish(events, forced=True)

    def _speech_step(self, index: int, frame: bytes, voiced: bool, events: list[VadEvent]) -> None:
        utterance = self._utterance
        assert utterance is not None
        frame_start = index * self._frame_samples
        if self.relative_db > 0:
            level = frame_dbfs(frame)
            utterance.levels.append(level)
            self._note_level(utterance, level, voiced)
            if getattr(self._classify, "noisy", True):  # a quiet room: nothing to tell the user from
                voiced = voiced and level >= utterance.loud_db - self.relative_db
        if voiced:
            utterance.voiced_frames += 1
            if utterance.silence_run and utterance.paused_audio_len is not None:
                events.append(SpeechResumed(at_s=self._seconds(frame_start)))
            utterance.silence_run = 0
            utterance.paused_audio_len = None
        else:
            utterance.silence_run += 1
            if utterance.silence_run == 1:
                utterance.speech_end = frame_start
                if frame_start - utterance.onset >= self._min_speech_samples:
                    utterance.paused_audio_len = len(utterance.audio)
                    events.append(SpeechPaused(at_s=self._seconds(frame_start), audio=bytes(utterance.audio)))
        utterance.audio += frame
        utterance.frames += 1
        if utterance.silence_run >= self._hangover_frames and not self.hold_until_flush:
            self._finish(events, forced=False)
        elif utterance.frames >= self._max_frames:
            self._finish(events, forced=True)

    @staticmethod
    def _note_level(utterance: _Utterance, level: float, voiced: bool) -> None:
        """The utterance's loudest voiced level, held for two frames (a click is not a voice)."""
        if voiced:
            utterance.loud_db = max(utterance.loud_db, min(level, utterance.last_voiced_db))
            utterance.last_voiced_db = level
        else:
            utterance.last_voiced_db = -100.0

    def _trim_background(self, utterance: _Utterance) -> None:
        """Leave out what came before the first frame near the utterance's loudest level (minus the
        pre-roll): speech much quieter than the user's, which the user began to talk over."""
        if self.relative_db <= 0 or not utterance.levels or not getattr(self._classify, "noisy", True):
            return
        bar = utterance.loud_db - self.relative_db
        first_loud = next((i for i, level in enumerate(utterance.levels) if level >= bar), 0)
        keep_from = max(0, first_loud - self._preroll_frames)
        onset_frame = (utterance.onset - utterance.audio_start) // self._frame_samples
        if keep_from <= onset_frame:
            return
        cut = keep_from * self._frame_bytes
        del utterance.audio[:cut]
        utterance.audio_start += keep_from * self._frame_samples
        utterance.onset = utterance.audio_start + min(first_loud - keep_from, self._preroll_frames) * self._frame_samples
        utterance.paused_audio_len = None  # the speculative transcript was of the untrimmed audio

    def _finish(self, events: list[VadEvent], *, forced: bool) -> None:
        """Close the open utterance as ended or dropped and return to idle with no history."""
        utterance = self._utterance
        assert utterance is not None
        self._utterance = None
        self._history.clear()
        self._window_voiced = 0
        self._trim_background(utterance)
        position = self._frames_done * self._frame_samples
        end = utterance.speech_end if utterance.silence_run else position
        start_s, end_s = self._seconds(utterance.onset), self._seconds(end)
        if end - utterance.onset < self._min_speech_samples:
            events.append(UtteranceDropped(start_s=start_s, end_s=end_s, reason=DROP_TOO_SHORT))
            return
        events.append(UtteranceEnded(
            start_s=start_s,
            end_s=end_s,
            audio=bytes(utterance.audio),
            forced=forced,
            audio_start_s=self._seconds(utterance.audio_start),
            paused_audio_len=utterance.paused_audio_len,
            level_dbfs=utterance.loud_db,
        ))
