"""Endpointing in a noisy room: the frame classifiers of VAD_ENGINE (voicegrow/pipeline/vad_classifiers.py).

DESIGN §6: over a fan 10 dB under the user, webrtcvad alone never heard the end of the question.
These tests put a fixture question into the seeded room noise of bench/acoustics.py and check where
the server's segmenter ends it, by sample position (no clock, no model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.acoustics import db_to_gain, noise, scale_to_dbfs
from voicegrow.audio import read_wav
from voicegrow.pipeline.vad import UtteranceEnded, VadSegmenter
from voicegrow.pipeline.vad_classifiers import NoiseFloor, SileroClassifier, frame_dbfs, make_classifier

RATE = 16000
LEAD_S, TAIL_S = 8.0, 5.0


def _speech(audio_fixtures: Path, clip_id: str, dbfs: float = -18.0) -> np.ndarray:
    samples, _ = read_wav(audio_fixtures / f"{clip_id}.wav")
    return scale_to_dbfs(samples.astype(np.float32) / 32768, dbfs, active=True)


def _room(speech: np.ndarray, kind: str | None, snr_db: float, seed: int = 3, speech_dbfs: float = -18.0) -> bytes:
    stream = np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), speech, np.zeros(int(TAIL_S * RATE), np.float32)])
    if kind is not None:
        n = noise(kind, stream.size, np.random.default_rng(seed))
        stream = stream + n * db_to_gain(speech_dbfs - snr_db)
    return np.clip(stream * 32768, -32768, 32767).astype("<i2").tobytes()


def _ends(engine: str, pcm: bytes, relative_db: float = 0.0) -> list[tuple[UtteranceEnded, float]]:
    seg = VadSegmenter(classifier=make_classifier(engine, sample_rate=RATE, frame_ms=30, aggressiveness=2),
                       relative_db=relative_db)
    out = []
    for offset in range(0, len(pcm), 2880):
        out += [(e, seg.position_s) for e in seg.feed(pcm[offset: offset + 2880]) if isinstance(e, UtteranceEnded)]
    return out


def test_the_noise_floor_learns_the_room_and_sets_the_bar_above_it() -> None:
    rng = np.random.default_rng(0)
    floor = NoiseFloor(frame_ms=30)
    hiss = (rng.standard_normal(RATE * 10) * 32768 * db_to_gain(-40)).astype("<i2").tobytes()
    for offset in range(0, len(hiss), 960):
        threshold = floor.update(frame_dbfs(hiss[offset: offset + 960]))
    assert floor.median_dbfs == pytest.approx(-40, abs=1)
    assert -34.5 <= threshold <= -32  # 6 dB over steady hiss (it hardly wobbles)
    assert frame_dbfs(bytes(960)) == -100.0


def test_over_a_fan_10_db_under_the_user_the_end_of_the_question_is_heard(audio_fixtures) -> None:
    speech = _speech(audio_fixtures, "zh-03")
    clean_end = _ends("webrtc_floor", _room(speech, None, 0))[0][1]
    pcm = _room(speech, "brown", 10)
    question_end = LEAD_S + speech.size / RATE
    # webrtcvad alone: the fan is speech to it, the utterance runs on to VAD_MAX_UTTERANCE_S.
    assert not [at for e, at in _ends("webrtc", pcm) if not e.forced and at <= question_end + 4.0]
    ended = [(e, at) for e, at in _ends("webrtc_floor", pcm) if e.end_s > LEAD_S]
    event, at = ended[0]
    assert not event.forced and at <= clean_end + 0.3
    assert event.start_s <= LEAD_S + 0.5  # the whole question, from its start


def test_on_clean_audio_the_noise_floor_changes_nothing(audio_fixtures) -> None:
    for clip_id in ("zh-00", "en-01", "en-espeak-02"):
        pcm = _room(_speech(audio_fixtures, clip_id, -22.0), None, 0)
        plain = [(e.start_s, e.end_s, len(e.audio), at) for e, at in _ends("webrtc", pcm)]
        assert plain and [(e.start_s, e.end_s, len(e.audio), at) for e, at in _ends("webrtc_floor", pcm)] == plain
        # The server's defaults (VAD_ENGINE=webrtc_floor, VAD_RELATIVE_DB=10) cut the same utterances.
        assert [(e.start_s, e.end_s, len(e.audio), at) for e, at in _ends("webrtc_floor", pcm, 10.0)] == plain


@pytest.mark.parametrize("kind", ["white", "babble"])
def test_over_white_noise_or_people_talking_10_db_under_the_user_the_end_is_heard(audio_fixtures, manifest,
                                                                                  kind) -> None:
    speech = _speech(audio_fixtures, "en-02")
    clean_end = _ends("webrtc_floor", _room(speech, None, 0))[0][1]
    if kind == "babble":
        clips = [read_wav(audio_fixtures / e["file"])[0] for e in manifest]
        stream = np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), speech,
                                 np.zeros(int(TAIL_S * RATE), np.float32)])
        n = noise("babble", stream.size, np.random.default_rng(4), clips)
        pcm = np.clip((stream + n * db_to_gain(-28.0)) * 32768, -32768, 32767).astype("<i2").tobytes()
    else:
        pcm = _room(speech, kind, 10)
    ended = [(e, at) for e, at in _ends("webrtc_floor", pcm) if e.end_s > LEAD_S]
    event, at = ended[0]
    assert not event.forced and at <= clean_end + 0.3


def test_silero_hears_speech_and_not_silence(audio_fixtures) -> None:
    speech = _speech(audio_fixtures, "en-00")
    pcm = np.clip(speech * 32768, -32768, 32767).astype("<i2").tobytes()
    silero = SileroClassifier()
    verdicts = [silero(pcm[o: o + 960]) for o in range(0, len(pcm) - 960, 960)]
    assert sum(verdicts) >= len(verdicts) // 3
    quiet = SileroClassifier()
    assert not any(quiet(bytes(960)) for _ in range(30))
    with pytest.raises(ValueError, match="unknown VAD engine"):
        make_classifier("nope", sample_rate=RATE, frame_ms=30, aggressiveness=2)


def test_a_television_10_db_under_the_user_neither_leads_nor_extends_the_question(audio_fixtures, manifest) -> None:
    from bench.acoustics import television

    clips = [read_wav(audio_fixtures / e["file"])[0] for e in manifest]
    speech = _speech(audio_fixtures, "en-03")
    stream = np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), speech, np.zeros(int(TAIL_S * RATE), np.float32)])
    tv = television(stream.size, np.random.default_rng(11), clips) * db_to_gain(-28.0)
    tv += np.random.default_rng(12).standard_normal(stream.size) * db_to_gain(-60.0)  # the room's hiss
    pcm = np.clip((stream + tv) * 32768, -32768, 32767).astype("<i2").tobytes()
    question_start, question_end = LEAD_S, LEAD_S + speech.size / RATE

    def the_question(relative_db: float) -> UtteranceEnded:
        return next(e for e, _ in _ends("webrtc_floor", pcm, relative_db) if e.end_s > question_start + 0.5)

    merged, separate = the_question(0.0), the_question(10.0)
    assert separate.start_s >= question_start - 0.3 and separate.end_s <= question_end + 0.3
    assert (separate.end_s - separate.start_s) < (merged.end_s - merged.start_s)
