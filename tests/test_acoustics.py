"""The emulated room (bench/acoustics.py): levels, SNR, noise colours, echo placement, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.acoustics import (
    EchoPath,
    NoiseSource,
    Room,
    active_rms,
    babble,
    brown_noise,
    db_to_gain,
    load_fixture_clips,
    mix_at_snr,
    noise,
    rms,
    room_impulse_response,
    scale_to_dbfs,
    white_noise,
)
from voicegrow.audio import pcm_to_float32

RATE = 16000


def _db(x: float) -> float:
    return 20 * math.log10(x)


def _band_energy(x: np.ndarray, lo: float, hi: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / RATE)
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum())


@pytest.mark.parametrize("snr_db", [20.0, 10.0, 0.0, -5.0])
def test_mix_at_snr_sets_the_ratio_named(snr_db: float) -> None:
    rng = np.random.default_rng(3)
    signal = 0.1 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE).astype(np.float32)
    fan = brown_noise(RATE // 3, rng)  # shorter than the signal: tiled
    mixed = mix_at_snr(signal, fan, snr_db)
    assert mixed.shape == signal.shape
    added = mixed - signal
    assert _db(rms(signal) / rms(added)) == pytest.approx(snr_db, abs=0.05)


def test_mix_at_snr_active_uses_the_speech_level_not_the_padding() -> None:
    rng = np.random.default_rng(4)
    speech = np.concatenate([np.zeros(RATE), 0.2 * white_noise(RATE, rng), np.zeros(RATE)]).astype(np.float32)
    hiss = white_noise(3 * RATE, rng)
    mixed = mix_at_snr(speech, hiss, 10.0, active=True)
    added = mixed - speech
    assert _db(0.2 / rms(added)) == pytest.approx(10.0, abs=0.3)
    # the whole-signal measure puts the noise ~4.8 dB lower for the same clip
    quieter = mix_at_snr(speech, hiss, 10.0) - speech
    assert _db(rms(added) / rms(quieter)) == pytest.approx(10 * math.log10(3), abs=0.3)


def test_mix_at_snr_refuses_empty_noise() -> None:
    with pytest.raises(ValueError):
        mix_at_snr(np.ones(10, dtype=np.float32), np.zeros(0, dtype=np.float32), 10)


def test_brown_noise_is_a_low_rumble_and_white_is_flat() -> None:
    rng = np.random.default_rng(5)
    fan, hiss = brown_noise(4 * RATE, rng), white_noise(4 * RATE, rng)
    assert rms(fan) == pytest.approx(1.0, rel=0.25)
    assert rms(hiss) == pytest.approx(1.0, rel=0.05)
    assert _band_energy(fan, 20, 500) > 100 * _band_energy(fan, 4000, 8000)
    assert _band_energy(hiss, 20, 500) < _band_energy(hiss, 4000, 8000)
    assert abs(float(np.mean(fan))) < 0.3  # the leak keeps it from drifting away


def test_noise_streams_join_seamlessly_and_repeat_with_the_seed() -> None:
    one = NoiseSource("brown", -40, seed=9).read(3000)
    a = NoiseSource("brown", -40, seed=9)
    chunked = np.concatenate([a.read(700), a.read(1300), a.read(1000)])
    np.testing.assert_allclose(chunked, one, atol=1e-6)
    assert _db(rms(one)) == pytest.approx(-40, abs=3)
    other = NoiseSource("brown", -40, seed=10).read(3000)
    assert not np.allclose(one, other)
    with pytest.raises(ValueError):
        NoiseSource("pink", -40)
    with pytest.raises(ValueError):
        noise("pink", 10, np.random.default_rng(0))


def test_babble_from_fixture_clips(audio_fixtures) -> None:
    clips = [samples for _, samples in load_fixture_clips(audio_fixtures, limit=6)]
    rng = np.random.default_rng(1)
    tv = babble(5 * RATE, rng, clips)
    assert tv.shape == (5 * RATE,)
    assert rms(tv) == pytest.approx(1.0, rel=0.01)
    assert _band_energy(tv, 200, 3000) > _band_energy(tv, 5000, 8000)  # speech, not hiss
    np.testing.assert_array_equal(tv, babble(5 * RATE, np.random.default_rng(1), clips))
    with pytest.raises(ValueError):
        babble(10, rng, [])
    loop = NoiseSource("babble", -30, seed=2, clips=clips, loop_s=1.0)
    first, second = loop.read(RATE), loop.read(RATE)
    np.testing.assert_allclose(first, second)  # a loop of one second, cycled


def test_room_impulse_response_is_unit_energy_and_decays() -> None:
    h = room_impulse_response(0.3, RATE, np.random.default_rng(0))
    assert float(np.sum(h.astype(np.float64) ** 2)) == pytest.approx(1.0, rel=1e-4)
    assert h[0] == max(abs(h))
    quarter = h.size // 4
    early, late = np.sum(h[1:quarter] ** 2), np.sum(h[-quarter:] ** 2)
    assert late < early / 1000  # 45 dB of the 60 dB decay fall between the first and last quarter
    assert h.size == pytest.approx(0.3 * RATE, rel=0.05)
    np.testing.assert_array_equal(room_impulse_response(0.0), np.ones(1, dtype=np.float32))


def test_scale_to_dbfs_and_active_level() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate([np.zeros(RATE), white_noise(RATE, rng)])
    assert _db(rms(scale_to_dbfs(x, -20))) == pytest.approx(-20, abs=0.01)
    assert _db(active_rms(scale_to_dbfs(x, -20, active=True))) == pytest.approx(-20, abs=0.01)
    assert db_to_gain(-6) == pytest.approx(0.501, abs=0.001)


def _played(seconds: float, rate: int, dbfs: float, seed: int = 0) -> bytes:
    x = scale_to_dbfs(white_noise(int(seconds * rate), np.random.default_rng(seed)), dbfs)
    return np.clip(np.rint(x * 32768), -32768, 32767).astype("<i2").tobytes()


def test_room_places_the_echo_after_its_delay_at_its_gain() -> None:
    path = EchoPath(delay_ms=250, gain_db=-6, rt60_s=0.2, noise=None, seed=1)
    room = Room(path)
    room.play(_played(1.0, RATE, -20), RATE, at_sample=0)
    mic = pcm_to_float32(room.capture(2 * RATE))
    delay = int(0.25 * RATE)
    assert rms(mic[: delay - 1]) == 0.0  # nothing before the echo arrives
    heard = mic[delay: delay + RATE]
    assert _db(rms(heard)) == pytest.approx(-26, abs=1.0)
    assert room.expected_echo_dbfs(-20) == -26
    tail = mic[delay + RATE: delay + RATE + 800]  # the room rings on after the playback ended
    assert 0 < rms(tail) < rms(heard)


def test_room_chunked_playback_at_24k_equals_one_piece() -> None:
    path = EchoPath(delay_ms=120, gain_db=-3, rt60_s=0.1, noise="white", noise_dbfs=-60, seed=7)
    pcm = _played(1.0, 24000, -15, seed=3)
    whole = Room(path)
    whole.play(pcm, 24000, at_sample=800)
    parts = Room(path)
    chunk = 2400 * 2  # 100 ms at 24 kHz
    for i, offset in enumerate(range(0, len(pcm), chunk)):
        parts.play(pcm[offset: offset + chunk], 24000, at_sample=800 + i * 1600 + (1 if i % 3 == 1 else 0))
    a = np.concatenate([pcm_to_float32(whole.capture(1440)) for _ in range(20)])
    b = np.concatenate([pcm_to_float32(parts.capture(1000)) for _ in range(int(20 * 1440 / 1000) + 1)])[: a.size]
    np.testing.assert_allclose(a, b, atol=2 / 32768)


def test_a_stopped_device_plays_nothing_more_of_what_it_buffered() -> None:
    path = EchoPath(delay_ms=250, gain_db=-6, rt60_s=0.0, noise=None, seed=1)
    room = Room(path)
    room.play(_played(1.0, RATE, -20), RATE, at_sample=0)
    before = pcm_to_float32(room.capture(RATE // 2))  # half a second captured: the echo has begun
    room.stop_playback(RATE // 2)  # the device stops there and drops the rest
    after = pcm_to_float32(room.capture(RATE))
    delay = int(0.25 * RATE)
    assert rms(before[delay:]) > 0
    heard = after[: delay]  # the echo of what played before the stop still arrives ...
    assert _db(rms(heard)) == pytest.approx(-26, abs=1.0)
    assert rms(after[delay + 1:]) == 0.0  # ... and nothing of what was dropped


def test_room_is_deterministic_with_a_seed_and_differs_without() -> None:
    def run(seed: int) -> bytes:
        room = Room(EchoPath(seed=seed))
        room.play(_played(0.5, 24000, -20), 24000, at_sample=0)
        return room.capture(RATE)

    assert run(4) == run(4)
    assert run(4) != run(5)


def test_room_mixes_a_talker_at_a_level_and_a_clean_path_hears_only_the_talker() -> None:
    room = Room(EchoPath.clean())
    room.play(_played(1.0, RATE, -10), RATE, at_sample=0)  # no echo on a clean path
    talker = scale_to_dbfs(white_noise(RATE // 2, np.random.default_rng(8)), -3)
    room.add_talker(talker, at_sample=4000, dbfs=-26)
    mic = pcm_to_float32(room.capture(RATE))
    assert rms(mic[:4000]) == 0.0
    assert _db(rms(mic[4000: 4000 + RATE // 2])) == pytest.approx(-26, abs=0.1)
    assert room.talker_onsets == [4000]
    assert room.position == RATE


def test_room_audio_placed_in_the_past_loses_only_what_was_missed() -> None:
    room = Room(EchoPath(delay_ms=0, gain_db=0, rt60_s=0, noise=None))
    room.capture(1000)
    room.play(_played(0.25, RATE, -20), RATE, at_sample=0)  # 4000 samples, 1000 of them already past
    mic = pcm_to_float32(room.capture(4000))
    assert rms(mic[:3000]) > 0 and rms(mic[3000:]) == 0.0


def test_echo_path_validates_its_fields() -> None:
    with pytest.raises(ValueError):
        EchoPath(delay_ms=-1)
    with pytest.raises(ValueError):
        EchoPath(noise="pink")
    with pytest.raises(ValueError):
        EchoPath(rt60_s=5)
