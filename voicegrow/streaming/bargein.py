"""When speech over a reply may stop it: the barge-in policy of one device, and its echo guard.

A speaker whose microphone hears its own reply would otherwise interrupt itself a fraction of a
second into every answer (DESIGN §6: 9 self-interruptions and 19 LLM requests for 3 questions). The
policy (``BARGE_IN``) decides per device:

* ``vad`` (default, until ``auto`` holds live) — any ``BARGE_IN_MIN_MS`` of speech over a reply stops it.
  For devices that cancel their own echo.
* ``auto`` — ``vad`` for a device that declares echo cancellation (a native device's HELLO
  capability ``"echo_cancellation": true``); for every other device *echo-safe* barge-in: the
  server cancels the echo itself (:mod:`voicegrow.echo`, the reply it sent as the reference), speech
  counts only when it clearly survived cancellation (the echo canceller kept at least
  ``BARGE_IN_ECHO_KEPT_DB`` of what the microphone heard — echo alone loses 15–50 dB, a user talking
  as loud as the echo 2–6 dB), and an utterance heard during a reply whose transcript repeats the
  reply is dropped (echo-transcript rejection), so no LLM request is spent on the speaker's own voice.
* ``wake_word`` — speech never interrupts; a wake word (open-xiaoai ``kws``, the native
  ``listen_start`` or ``wake`` events) does, and utterances heard while a reply was audible are
  dropped as echo.
* ``off`` — nothing heard interrupts, wake words included; only an explicit device abort does.

A wake word interrupts under every policy but ``off``: it is the user's unambiguous signal.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from typing import Any

from voicegrow.textmetrics import normalize_transcript

__all__ = ["BargeInMode", "BargeInPolicy", "EchoGuard", "PlayoutTap", "echo_transcript_distance", "resolve_mode"]

log = logging.getLogger(__name__)

#: An utterance heard during a reply whose transcript is within this character error rate of some
#: stretch of the reply's text is the reply's own echo.
ECHO_TRANSCRIPT_MAX_CER = 0.35
#: The canceller counts as converged when it removed at least this much of the echo just heard (a
#: converged AEC3 removes 40–50 dB; one re-locking after a change of the echo path 1–20 dB).
PROVEN_DB = -25.0
#: Shorter transcripts (normalised characters) match some stretch of almost any reply by chance.
_ECHO_TRANSCRIPT_MIN_CHARS = 4


class BargeInPolicy(enum.Enum):
    AUTO = "auto"
    VAD = "vad"
    WAKE_WORD = "wake_word"
    OFF = "off"


@dataclasses.dataclass(frozen=True)
class BargeInMode:
    """The resolved policy of one session.

    ``speech_interrupts``: speech over a reply may stop it; ``wake_interrupts``: a wake word does;
    ``cancel_echo``: the server cancels the device's echo (front end before the VAD);
    ``echo_gate``: speech during a reply must survive cancellation to count (and echo transcripts
    are rejected). ``name`` is what logs, metrics and the console show.
    """

    name: str
    speech_interrupts: bool
    wake_interrupts: bool
    cancel_echo: bool
    echo_gate: bool


def resolve_mode(setting: str, *, device_cancels_echo: bool, echo_available: bool = True) -> BargeInMode:
    """``BARGE_IN`` for one device; ``device_cancels_echo`` from what it declared.

    Without the echo canceller's library (``echo_available`` False) ``auto`` still guards against
    echo, by the transcript alone, and logs why at the caller.
    """
    policy = BargeInPolicy(setting)
    cancel = not device_cancels_echo and echo_available
    if policy is BargeInPolicy.VAD or (policy is BargeInPolicy.AUTO and device_cancels_echo):
        return BargeInMode("vad", True, True, False, False)
    if policy is BargeInPolicy.AUTO:
        return BargeInMode("echo_safe", True, True, cancel, True)
    if policy is BargeInPolicy.WAKE_WORD:
        return BargeInMode("wake_word", False, True, cancel, False)
    return BargeInMode("off", False, False, cancel, False)


def echo_transcript_distance(transcript: str, reply: str, lang: str) -> float:
    """The character error rate of ``transcript`` against its best-matching stretch of ``reply``.

    Approximate substring matching (Sellers' edit distance: the match may start and end anywhere in
    the reply), on the normalised text of :func:`voicegrow.textmetrics.normalize_transcript`.
    ``inf`` when the transcript is too short to tell anything.
    """
    hyp = normalize_transcript(transcript, lang)
    ref = normalize_transcript(reply, lang)
    if len(hyp) < _ECHO_TRANSCRIPT_MIN_CHARS or not ref:
        return math.inf
    previous = [0] * (len(ref) + 1)  # a match may start anywhere: row 0 costs nothing
    for i, h in enumerate(hyp, start=1):
        current = [i] + [0] * len(ref)
        for j, r in enumerate(ref, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r))
        previous = current
    return min(previous) / len(hyp)


class _MicClock:
    """Maps the trio clock to microphone-stream positions.

    A frame arrives after its last sample was captured, never before: the smallest ``arrival −
    position`` seen is the best estimate of when position 0 was captured (as the ingest-lag meter
    reasons), robust to frames that arrive late on a busy machine.
    """

    __slots__ = ("_offset",)

    def __init__(self) -> None:
        self._offset = math.inf

    def observe(self, now: float, stream_end_s: float) -> None:
        self._offset = min(self._offset, now - stream_end_s)

    def position_s(self, at: float) -> float | None:
        return None if self._offset == math.inf else at - self._offset


class PlayoutTap:
    """What a turn tells the echo guard about the audio it sends: ``played(pcm, rate, at)``, ``at``
    on the trio clock being when the pacer expects the device to start playing it.

    A small object of its own (not a method of the session) so that turns, which the session owns,
    hold no reference back to it.
    """

    __slots__ = ("_canceller", "_clock")

    def __init__(self, canceller: Any, clock: _MicClock) -> None:
        self._canceller = canceller
        self._clock = clock

    def played(self, pcm: bytes, rate: int, at: float) -> None:
        position = self._clock.position_s(at)
        if position is not None:
            self._canceller.play(pcm, rate, position)

    def stopped(self, at: float) -> None:
        """The device was told at ``at`` (trio clock) to stop playing and drop what it buffered."""
        position = self._clock.position_s(at)
        if position is not None:
            self._canceller.stop(position)


class EchoGuard:
    """The echo side of one session: the front end before the VAD and the barge-in tests.

    With ``mode.cancel_echo`` it owns an :class:`~voicegrow.echo.EchoCanceller`; otherwise it
    passes the microphone through and every test says "not echo".
    """

    def __init__(self, mode: BargeInMode, *, kept_db: float, canceller: Any = None) -> None:
        self.mode = mode
        self.kept_db_threshold = kept_db
        self.canceller = canceller
        self._clock = _MicClock()
        self.tap = PlayoutTap(canceller, self._clock) if canceller is not None else None
        self.cpu_s = 0.0  # time spent cancelling, for the bench

    def front_end(self, pcm: bytes, now: float, stream_end_s: float) -> bytes:
        """Microphone audio (16 kHz) in, the audio the VAD should hear out; ``stream_end_s`` is the
        stream position after this chunk, ``now`` when it arrived."""
        self._clock.observe(now, stream_end_s)
        if self.canceller is None:
            return pcm
        started = time.perf_counter()
        try:
            return self.canceller.process(pcm)
        finally:
            self.cpu_s += time.perf_counter() - started

    def reply_audible(self) -> bool:
        """The device's playback can be heard at the microphone now (or its room still rings)."""
        return self.canceller is not None and self.canceller.far_end_recent()

    def canceller_proven(self, onset_s: float) -> bool:
        """The canceller removed at least :data:`PROVEN_DB` of the echo of the playout heard just
        before ``onset_s`` (over at least half a second of it): its measure of the speech can be
        trusted. Each playout (a reply, a restart after an underrun) proves it anew
        (:meth:`voicegrow.echo.EchoCanceller.proven_db`)."""
        if self.canceller is None:
            return False
        kept, audible_s = self.canceller.proven_db(onset_s)
        return kept is not None and audible_s >= 0.5 and kept <= PROVEN_DB

    def speech_counts(self, onset_s: float) -> bool:
        """May the speech since ``onset_s`` (VAD stream position) interrupt a reply now?

        Echo-safe: while the reply can be heard, only if the canceller proved itself on the echo
        just before and kept at least ``BARGE_IN_ECHO_KEPT_DB`` of the speech. While it is unproven
        (a session's first reply), speech does not interrupt: the wake word still does.
        """
        if not self.mode.speech_interrupts:
            return False
        if not self.mode.echo_gate or not self.reply_audible():
            return True
        if not self.canceller_proven(onset_s):
            return False
        kept = self.canceller.kept_db(onset_s)
        return kept is not None and kept >= self.kept_db_threshold

    def kept_db_since(self, onset_s: float) -> str:
        """For logs: the canceller's kept energy since ``onset_s``, or ``-`` without a canceller."""
        kept = self.canceller.kept_db(onset_s) if self.canceller is not None else None
        return "-" if kept is None else f"{kept:.1f}"

    def is_echo_transcript(self, transcript: str, reply: str, lang: str) -> bool:
        """The utterance repeats the reply it was heard over (echo-transcript rejection)."""
        if not self.mode.echo_gate or not reply:
            return False
        return echo_transcript_distance(transcript, reply, lang) <= ECHO_TRANSCRIPT_MAX_CER
