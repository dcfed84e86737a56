"""Tests for the utterance segmenter: real speech fixtures and synthetic audio, fed in any chunking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from voicegrow.audio import float32_to_pcm, read_wav, rms_dbfs, silence
from voicegrow.pipeline.vad import (
    DROP_TOO_SHORT,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    UtteranceDropped,
    UtteranceEnded,
    VadConfigError,
    VadEvent,
    VadSegmenter,
)

RATE = 16000
BYTES_PER_S = 2 * RATE


def vowel(ms: int, f0: float = 140.0) -> bytes:
    """A steady voiced sound (a harmonic series), which webrtcvad classifies as speech throughout."""
    t = np.arange(RATE * ms // 1000) / RATE
    signal = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 25))
    return float32_to_pcm(0.25 * signal / np.abs(signal).max()).tobytes()


def quiet(ms: int) -> bytes:
    return silence(ms, RATE)


def run(segmenter: VadSegmenter, pcm: bytes, chunk: int | None = None) -> list[VadEvent]:
    if chunk is None:
        return segmenter.feed(pcm) + segmenter.flush()
    events: list[VadEvent] = []
    for offset in range(0, len(pcm), chunk):
        events += segmenter.feed(pcm[offset: offset + chunk])
    return events + segmenter.flush()


def kinds(events: list[VadEvent]) -> list[str]:
    return [type(event).__name__ for event in events]


def speech_bounds(samples: np.ndarray) -> tuple[float, float]:
    """Where a clean clip's speech starts and ends: the first and last 10 ms above -50 dBFS."""
    active = [i for i in range(0, len(samples) - 159, 160) if rms_dbfs(samples[i: i + 160]) > -50]
    return active[0] / RATE, (active[-1] + 160) / RATE


def check_pause_contract(events: list[VadEvent]) -> None:
    """The audio of an UtteranceEnded extends the audio of the last unresumed SpeechPaused."""
    last_pause: SpeechPaused | None = None
    for event in events:
        if isinstance(event, SpeechPaused):
            last_pause = event
        elif isinstance(event, (SpeechResumed, SpeechStarted, UtteranceDropped)):
            last_pause = None
        elif isinstance(event, UtteranceEnded):
            if event.paused_audio_len is None:
                assert last_pause is None or event.forced
            else:
                assert last_pause is not None
                assert event.audio[: event.paused_audio_len] == last_pause.audio
                assert event.audio_start_s + len(last_pause.audio) / BYTES_PER_S == pytest.approx(
                    last_pause.at_s)
            last_pause = None


@pytest.fixture(scope="module")
def clips(audio_fixtures: Path, manifest: list[dict]) -> list[tuple[str, np.ndarray]]:
    loaded = []
    for entry in manifest:
        samples, rate = read_wav(audio_fixtures / entry["file"])
        assert rate == RATE
        loaded.append((entry["id"], samples))
    return loaded


def test_each_fixture_clip_is_one_utterance_with_preroll(clips: list[tuple[str, np.ndarray]]) -> None:
    for clip_id, samples in clips:
        segmenter = VadSegmenter()
        # Like open-xiaoai: 90 ms upstream frames, then the speaker keeps sending silence.
        pcm = samples.tobytes() + quiet(1000)
        events = run(segmenter, pcm, chunk=2880)
        assert kinds(events) == ["SpeechStarted", "SpeechPaused", "UtteranceEnded"], clip_id
        started, paused, ended = events
        assert isinstance(ended, UtteranceEnded) and not ended.forced
        speech_start, speech_end = speech_bounds(samples)
        assert started.at_s == ended.start_s
        assert speech_start - 0.1 <= ended.start_s <= speech_start + 0.05, clip_id
        assert speech_end - 0.1 <= ended.end_s <= speech_end + 0.2, clip_id
        # Pre-roll: ≥ 300 ms before the onset, or from the start of the stream.
        assert ended.audio_start_s == 0.0 or ended.start_s - ended.audio_start_s >= 0.3, clip_id
        start = round(ended.audio_start_s * BYTES_PER_S)
        assert ended.audio == pcm[start: start + len(ended.audio)], clip_id
        # The audio runs from the pre-roll through the whole hangover.
        assert len(ended.audio) / BYTES_PER_S == pytest.approx(
            ended.end_s + 0.51 - ended.audio_start_s, abs=1e-9)
        check_pause_contract(events)


def test_utterance_audio_is_the_stream_slice_from_the_preroll() -> None:
    pcm = quiet(1000) + vowel(600) + quiet(1000)
    events = run(VadSegmenter(), pcm)
    ended = events[-1]
    assert isinstance(ended, UtteranceEnded)
    start = round(ended.audio_start_s * BYTES_PER_S)
    assert ended.audio == pcm[start: start + len(ended.audio)]
    assert ended.start_s - ended.audio_start_s == pytest.approx(0.3)
    assert ended.start_s == pytest.approx(0.99)  # the 30 ms frame holding the vowel's start


def test_silence_gives_no_events() -> None:
    segmenter = VadSegmenter()
    assert run(segmenter, quiet(5000), chunk=3333) == []
    assert segmenter.position_s == pytest.approx(4.98)  # whole 30 ms frames only


def test_a_click_is_dropped() -> None:
    events = run(VadSegmenter(), quiet(500) + vowel(50) + quiet(1000))
    assert kinds(events) == ["SpeechStarted", "UtteranceDropped"]
    dropped = events[1]
    assert isinstance(dropped, UtteranceDropped)
    assert dropped.reason == DROP_TOO_SHORT
    assert dropped.end_s - dropped.start_s < 0.25


def test_two_utterances_separated_by_a_second_of_silence() -> None:
    pcm = quiet(300) + vowel(800) + quiet(1000) + vowel(700) + quiet(1000)
    events = run(VadSegmenter(), pcm)
    ended = [event for event in events if isinstance(event, UtteranceEnded)]
    assert len(ended) == 2
    first, second = ended
    assert first.start_s < first.end_s < second.start_s < second.end_s
    assert second.start_s == pytest.approx(2.1, abs=0.06)
    # The second pre-roll starts where the first utterance's audio stopped: nothing handed out twice.
    assert second.audio_start_s >= first.audio_start_s + len(first.audio) / BYTES_PER_S - 1e-9
    check_pause_contract(events)


def test_two_fixture_clips_in_a_row(clips: list[tuple[str, np.ndarray]]) -> None:
    pcm = clips[0][1].tobytes() + quiet(1000) + clips[10][1].tobytes() + quiet(1000)
    events = run(VadSegmenter(), pcm, chunk=2880)
    assert kinds(events).count("UtteranceEnded") == 2
    assert "UtteranceDropped" not in kinds(events)


def test_speech_past_max_length_is_cut_and_continues() -> None:
    events = run(VadSegmenter(max_utterance_s=2.0), quiet(300) + vowel(5000) + quiet(1000))
    ended = [event for event in events if isinstance(event, UtteranceEnded)]
    assert [event.forced for event in ended] == [True, True, False]
    for event in ended:
        assert len(event.audio) <= 2.0 * BYTES_PER_S
    first, second, third = ended
    assert first.paused_audio_len is None
    # The next utterance starts exactly where the cut was: no audio lost, none repeated.
    assert second.audio_start_s == pytest.approx(first.audio_start_s + len(first.audio) / BYTES_PER_S)
    assert third.audio_start_s == pytest.approx(second.audio_start_s + len(second.audio) / BYTES_PER_S)
    assert third.end_s == pytest.approx(5.3, abs=0.2)


def test_a_short_gap_pauses_and_resumes_within_one_utterance() -> None:
    events = run(VadSegmenter(), quiet(300) + vowel(600) + quiet(300) + vowel(600) + quiet(1000))
    assert kinds(events) == ["SpeechStarted", "SpeechPaused", "SpeechResumed", "SpeechPaused",
                             "UtteranceEnded"]
    first_pause, resumed, last_pause, ended = events[1:]
    assert isinstance(ended, UtteranceEnded) and isinstance(last_pause, SpeechPaused)
    assert first_pause.at_s < resumed.at_s < last_pause.at_s == ended.end_s
    assert ended.paused_audio_len == len(last_pause.audio)
    check_pause_contract(events)


def test_no_pause_event_while_the_speech_is_still_too_short() -> None:
    events = run(VadSegmenter(min_speech_ms=400), quiet(300) + vowel(200) + quiet(1000))
    assert kinds(events) == ["SpeechStarted", "UtteranceDropped"]


def test_identical_events_for_any_chunking() -> None:
    pcm = quiet(200) + vowel(400) + quiet(250) + vowel(100) + quiet(700) + vowel(50) + quiet(800)
    reference = run(VadSegmenter(), pcm)
    assert "UtteranceEnded" in kinds(reference) and "UtteranceDropped" in kinds(reference)
    for chunk in (1, 3, 320, 479, 960, 4097):
        assert run(VadSegmenter(), pcm, chunk=chunk) == reference, chunk
    rng = np.random.default_rng(7)
    segmenter, events, offset = VadSegmenter(), [], 0
    while offset < len(pcm):
        size = int(rng.integers(0, 2000))
        events += segmenter.feed(pcm[offset: offset + size])
        offset += size
    assert events + segmenter.flush() == reference


def test_odd_byte_counts_are_buffered() -> None:
    segmenter = VadSegmenter(frame_ms=10)
    assert segmenter.feed(b"\x00" * 319) == []
    assert segmenter.position_s == 0.0
    segmenter.feed(b"\x00")
    assert segmenter.position_s == pytest.approx(0.01)
    segmenter.feed(b"\x00" * 641)
    assert segmenter.position_s == pytest.approx(0.03)
    segmenter.feed(b"\x00" * 319)
    assert segmenter.position_s == pytest.approx(0.04)


def test_speech_properties_follow_the_utterance() -> None:
    segmenter = VadSegmenter()
    assert not segmenter.in_speech and segmenter.current_speech_ms == 0
    events = segmenter.feed(quiet(300) + vowel(600))
    assert kinds(events) == ["SpeechStarted"]
    assert segmenter.in_speech
    assert 500 <= segmenter.current_speech_ms <= 660
    assert segmenter.speech_ms_so_far == pytest.approx(segmenter.position_s * 1000 - 300, abs=31)
    segmenter.feed(quiet(300))  # the hangover: the span grows, the voiced time does not
    voiced = segmenter.current_speech_ms
    assert segmenter.speech_ms_so_far > voiced
    segmenter.feed(quiet(700))
    assert not segmenter.in_speech
    assert segmenter.current_speech_ms == 0 and segmenter.speech_ms_so_far == 0


def test_flush_finishes_a_running_utterance() -> None:
    segmenter = VadSegmenter()
    assert kinds(segmenter.feed(quiet(300) + vowel(800))) == ["SpeechStarted"]
    mid_speech = segmenter.flush()
    assert kinds(mid_speech) == ["UtteranceEnded"]
    assert mid_speech[0].forced and mid_speech[0].paused_audio_len is None
    assert not segmenter.in_speech

    segmenter = VadSegmenter()
    events = segmenter.feed(quiet(300) + vowel(800) + quiet(200))
    events += segmenter.flush()
    assert kinds(events) == ["SpeechStarted", "SpeechPaused", "UtteranceEnded"]
    assert not events[-1].forced
    check_pause_contract(events)
    assert segmenter.flush() == []


@pytest.mark.parametrize("kwargs", [
    {"sample_rate": 22050}, {"frame_ms": 25}, {"aggressiveness": 4}, {"silence_ms": -1},
    {"speech_start_ms": 0}, {"max_utterance_s": 0.01},
])
def test_bad_parameters_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(VadConfigError) as info:
        VadSegmenter(**kwargs)
    assert info.value.code == "vad_config"
