"""Echo handling: the canceller on a simulated room, the barge-in policy, echo-transcript rejection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.acoustics import EchoPath, Room, active_rms, load_fixture_clips, rms
from voicegrow.audio import float32_to_pcm, pcm_to_float32, resample
from voicegrow.echo import EchoCanceller
from voicegrow.streaming.bargein import EchoGuard, echo_transcript_distance, resolve_mode

RATE = 16000


def _reply(audio_fixtures, seconds: float = 6.0) -> np.ndarray:
    clips = [c for e, c in load_fixture_clips(audio_fixtures, lang="en") if e["voice"] == "piper-joe"]
    reply = np.concatenate(clips)[: int(seconds * RATE)]
    return reply / active_rms(reply) * 10 ** (-20 / 20)


def _cancel(room: Room, reply16: np.ndarray, start: int, total: int, *, chunk: int = 1440) -> tuple[np.ndarray, np.ndarray, EchoCanceller]:
    """Play ``reply16`` (as 24 kHz, in 100 ms chunks) from ``start``, run mic and canceller to ``total``."""
    canceller = EchoCanceller()
    pcm24 = resample(float32_to_pcm(reply16), RATE, 24000).astype("<i2").tobytes()
    step = 4800  # 100 ms at 24 kHz
    for i, offset in enumerate(range(0, len(pcm24), step)):
        at = start + i * 1600
        room.play(pcm24[offset: offset + step], 24000, at)
        canceller.play(pcm24[offset: offset + step], 24000, at / RATE)
    raw, clean = bytearray(), bytearray()
    while len(raw) // 2 < total:
        mic = room.capture(chunk)
        raw += mic
        clean += canceller.process(mic)
    return pcm_to_float32(bytes(raw)), pcm_to_float32(bytes(clean)), canceller


def test_canceller_removes_the_echo_and_keeps_a_talker(audio_fixtures) -> None:
    reply = _reply(audio_fixtures)
    path = EchoPath(delay_ms=250, gain_db=-6, rt60_s=0.25, noise="fan", noise_dbfs=-60, seed=3)
    start, total = 4000, 4000 + reply.size + RATE // 2
    raw, clean, canceller = _cancel(Room(path), reply, start, total)
    later = slice(start + 3 * RATE, start + reply.size)
    erle = 20 * math.log10(rms(raw[later]) / max(rms(clean[later]), 1e-9))
    assert erle >= 15, erle
    # The decision's measure: most of what the microphone heard was removed, so it was echo.
    kept = canceller.kept_db((start + 3 * RATE) / RATE)
    assert kept is not None and kept < -15, kept
    assert canceller.far_end_recent()  # just after the reply: the room still rings
    for _ in range(60):
        canceller.process(bytes(3200))
    assert not canceller.far_end_recent()

    # The same echo with a user talking over it, as loud as the echo: most of the user survives.
    user = [c for e, c in load_fixture_clips(audio_fixtures, lang="zh", limit=1)][0]
    room = Room(path)
    onset = start + 4 * RATE
    room.add_talker(user, onset, dbfs=-26, reverb=False)
    raw, clean, canceller = _cancel(room, reply, start, total)
    kept = canceller.kept_db(onset / RATE)
    assert kept is not None and kept > -10, kept


def test_canceller_passes_a_clean_microphone_through(audio_fixtures) -> None:
    user = [c for _, c in load_fixture_clips(audio_fixtures, lang="en", limit=1)][0]
    canceller = EchoCanceller()
    pcm = float32_to_pcm(user).astype("<i2").tobytes()
    out = b"".join(canceller.process(pcm[i: i + 1000]) for i in range(0, len(pcm), 1000))
    assert len(out) == len(pcm) // 320 * 320  # whole 10 ms frames; the rest waits for more
    assert not canceller.far_end_recent()
    kept = canceller.kept_db(0.0)
    assert kept is not None and kept > -3, kept


def test_reference_before_the_processed_audio_is_dropped() -> None:
    canceller = EchoCanceller()
    canceller.process(bytes(3200))  # 100 ms processed
    canceller.play(np.full(1600, 1000, dtype="<i2").tobytes(), RATE, 0.05)  # half of it in the past
    assert canceller.far_end_recent()
    assert canceller.kept_db(1.0) is None  # nothing processed after 1 s yet


@pytest.mark.parametrize(("setting", "declared", "name", "speech", "wake", "cancel"), [
    ("auto", False, "echo_safe", True, True, True),
    ("auto", True, "vad", True, True, False),
    ("vad", False, "vad", True, True, False),
    ("wake_word", False, "wake_word", False, True, True),
    ("wake_word", True, "wake_word", False, True, False),
    ("off", False, "off", False, False, True),
])
def test_barge_in_policy_per_device(setting, declared, name, speech, wake, cancel) -> None:
    mode = resolve_mode(setting, device_cancels_echo=declared)
    assert (mode.name, mode.speech_interrupts, mode.wake_interrupts, mode.cancel_echo) == (name, speech, wake, cancel)
    assert resolve_mode(setting, device_cancels_echo=declared, echo_available=False).cancel_echo is False


def test_guard_without_a_reply_lets_speech_interrupt_and_off_never_does() -> None:
    guard = EchoGuard(resolve_mode("auto", device_cancels_echo=False), kept_db=-10, canceller=EchoCanceller())
    assert guard.front_end(bytes(640), 1.0, 0.02)  # passes audio (cleaned)
    assert guard.speech_counts(0.0)  # nothing played: speech is speech
    off = EchoGuard(resolve_mode("off", device_cancels_echo=False), kept_db=-10)
    assert not off.speech_counts(0.0)
    assert off.front_end(b"\x01\x00" * 10, 1.0, 0.001) == b"\x01\x00" * 10  # no canceller: passed through


def test_echo_transcript_rejection() -> None:
    reply = "Tell me a joke. What is one plus one? It is two, of course."
    assert echo_transcript_distance("what is one plus one", reply, "en") == 0
    assert echo_transcript_distance("what is 1 plus one", reply, "en") <= 0.35  # numbers normalised
    assert echo_transcript_distance("why do bears like honey", reply, "en") > 0.35
    assert echo_transcript_distance("ok", reply, "en") == math.inf  # too short to judge
    assert echo_transcript_distance("今天天气怎么样", "好的。今天天气怎么样？晴天。", "zh") == 0
    guard = EchoGuard(resolve_mode("auto", device_cancels_echo=False), kept_db=-10)
    assert guard.is_echo_transcript("What is one plus one?", reply, "en")
    assert not guard.is_echo_transcript("Please stop.", reply, "en")
    plain = EchoGuard(resolve_mode("vad", device_cancels_echo=False), kept_db=-10)
    assert not plain.is_echo_transcript("What is one plus one?", reply, "en")


def test_the_canceller_proves_itself_on_each_playout_of_its_own(audio_fixtures) -> None:
    """A reply that reaches the device 60 ms sooner after its reference than the last one (its first
    chunk was less late): AEC3 keeps most of that echo for seconds, so the previous reply's
    cancellation is no proof; the proof comes from this playout's echo."""
    reply = _reply(audio_fixtures, seconds=4.0)
    room = Room(EchoPath(delay_ms=250, gain_db=-6, rt60_s=0.25, noise="fan", noise_dbfs=-55, seed=13))
    guard = EchoGuard(resolve_mode("auto", device_cancels_echo=False), kept_db=-10, canceller=EchoCanceller())
    pcm24 = resample(float32_to_pcm(reply), RATE, 24000).astype("<i2").tobytes()

    def feed_until(position: int) -> None:
        while room.position < position:
            guard.front_end(room.capture(1440), (room.position + 1440) / RATE, (room.position + 1440) / RATE)

    feed_until(RATE)
    starts = []
    for late in (60 * 16, 0):  # samples the device starts after the reference
        start = room.position + 1440
        starts.append(start)
        for i, offset in enumerate(range(0, len(pcm24), 4800)):
            room.play(pcm24[offset: offset + 4800], 24000, start + late + i * 1600)
            guard.tap.played(pcm24[offset: offset + 4800], 24000, (start + i * 1600) / RATE)
        feed_until(start + reply.size + RATE)
    first, second = starts
    # The first reply converged: its echo late in the reply proves the canceller.
    assert guard.canceller.proven_db((first + 3 * RATE) / RATE)[0] <= -20
    # The second one's echo (from ~250 ms in) passes largely uncancelled ...
    kept = guard.canceller._kept(second + RATE // 4, second + RATE, audible_only=True)[0]
    assert kept is not None and kept > -10, kept
    # ... and the canceller is not proven at the echo's onset, although the previous reply's tail,
    # well cancelled, lies in the span before it: that echo does not pass for a user.
    assert not guard.canceller_proven((second + RATE // 4 + 800) / RATE)
